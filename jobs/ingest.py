"""Stage ingest: filter raw images and bucket them by aspect ratio into Parquet, with Ray Data.

    python -m jobs.ingest --config tiny ingest.source=DIR_OR_S3_PREFIX [ingest.root=runs] [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.ingest --config 350m ingest.source=s3://bucket/raw ingest.root=s3://bucket/runs

Output under {root}/ingest/{key}/ (key = hash of the ingest settings, budgets, patch size, code version):
    data/bucket=RxC/*.parquet   accepted images, Hive-partitioned by their grid at the first budget
    rejects/*.parquet           source, reason, detail for every rejected image (no bytes)
    index.parquet               the row-group index: file, row group, rows and buckets at every budget
                                (vitok_core/row_index.py); readers plan from it, never from data footers
    manifest.json               counts (read, accepted, rejected by reason, per bucket), timings, settings
    _SUCCESS                    written last; a reader trusts nothing without it

How it runs, and why it survives a crash:
  1. The source files are listed and sorted, then cut into tasks of `files_per_task` files.
  2. process: Ray Data maps the tasks over the cluster. Each task reads its files, applies
     `vitok_core.ingest.process_image` and writes ONE Parquet file with every outcome to _staging/tasks/,
     sorted by bucket in row groups of one bucket each, under a temporary name first, so a task file is
     there whole or not at all. A rerun only summarises the task files that exist: a crash costs only
     the tasks in flight.
  3. dedup: identical bytes always land in the same bucket, so exact duplicates (same SHA-256 of the
     source bytes) are found per bucket (split by id into shards of at most DEDUP_ROWS ids), reading only
     the id/source columns of that bucket's row groups. The copy with the smallest source URI is kept, so
     the choice is deterministic; the others are written to rejects/ as `duplicate`. A bucket small
     enough for one output file (at most `rows_per_file` rows) is also published in this step, by the
     task that deduplicates it (several such buckets a task, finish_plan): its rows are read once. The
     rejects are published here too.
  4. publish: one Ray task per output file of the larger buckets copies a bucket's rows from a run of
     consecutive task files (at most `rows_per_file` rows) to data/bucket=RxC/, leaving out the
     duplicates. Either way a data file's rows are sorted by their buckets at the later budgets (then
     id), and its task returns the file's runs for the index; the files, rows and order do not depend on
     which step wrote them. Then index.parquet, manifest.json, _SUCCESS, and the staging area is deleted.
     A crash in steps 3-4 leaves no _SUCCESS; the rerun deletes data/, rejects/ and the index and redoes
     those steps.
Every step is a plain copy of bytes already encoded: no shuffle of image bytes through the object store.
The driver never holds image records or ids, nor every task's summary or every file's index runs: it counts
each task's summary as it arrives (Tally: totals, and each task's rows per first-budget bucket as int32 arrays),
hands Ray the plans as JSON, adds each data file's runs to the index as codes as they arrive (IndexBuilder),
and writes index.parquet sorted, a slice at a time (its memory at 2B images: docs/scaling.md section 3).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import tarfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterable, Iterator
from typing import Any

import fsspec
import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from tqdm import tqdm

from jobs.common import init_ray, parse_config, retry_transient_tasks, setup_logging
from vitok_core import __version__, io_retry
from vitok_core.artifacts import absolute, is_complete, join, mark_success, read_json, remove, stage_key, write_json
from vitok_core.config import VitokConfig, to_dict
from vitok_core.fingerprint import manifest_fields
from vitok_core.ingest import IngestRules, Outcome, process_image
from vitok_core.row_index import INDEX, IndexBuilder, file_runs, group_sizes
from vitok_core.variants import parse_variant

log = logging.getLogger("vitok.ingest")

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif"}  # members of tar shards that are images
# bump when a change alters what ingest writes. 3: index.parquet; a file's rows sorted by the later budgets' buckets
CODE_VERSION = "ingest-4"
ROWS_PER_GROUP = 256  # ~25 MB of 0.4 MP JPEGs: the unit a streaming loader reads at a time


# ------------------------------------------------------------------------------------------------
# Settings, key and layout
# ------------------------------------------------------------------------------------------------
def ingest_settings(cfg: VitokConfig) -> dict[str, Any]:
    """Everything that decides ingest's output: its section (minus where it is written), budgets, patch size."""
    settings = {k: v for k, v in to_dict(cfg.ingest).items() if k != "root"}
    settings["source"] = absolute(settings["source"])
    settings["budgets"] = list(cfg.data.budgets)
    settings["patch_size"] = parse_variant(cfg.model.variant).patch_size
    return settings


def rules_from(settings: dict[str, Any]) -> IngestRules:
    """The per-image rules: the settings of the same names (lists become tuples, so the rules hash)."""
    values = {f.name: settings[f.name] for f in dataclasses.fields(IngestRules)}
    return IngestRules(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def output_uri(cfg: VitokConfig) -> str:
    key = stage_key("ingest", ingest_settings(cfg), code_version=CODE_VERSION)
    return join(absolute(cfg.ingest.root), "ingest", key)


def planned_output(cfg: VitokConfig) -> str:
    return output_uri(cfg)


def compression(schema: pa.Schema) -> dict[str, str]:
    """Snappy for every column but the encoded images: on JPEG/WebP bytes it saved nothing and cost
    0.25-0.74 ms per image per write (measured on this project's 2-core machine)."""
    return {name: "NONE" if name == "bytes" else "SNAPPY" for name in schema.names}


def parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """Writer options of every Parquet file ingest writes: `compression`, and neither a dictionary nor
    statistics for the encoded images. A column chunk of fewer rows than the writer's batch (1024) was
    dictionary-encoded whole: every image hashed and copied into one dictionary page (the values read back
    are the same either way), and an image's min/max statistics, over the 4 KB Parquet keeps, were computed
    and dropped."""
    others = [name for name in schema.names if name != "bytes"]
    return {"compression": compression(schema), "use_dictionary": others, "write_statistics": others}


@contextlib.contextmanager
def _parquet_sink(uri: str) -> Iterator[Any]:
    """Where pyarrow writes a Parquet file at `uri` (its folder made): a local path, which pyarrow writes
    itself, else an fsspec file (S3). Through a Python file object every page is copied once more."""
    fs, path = fsspec.core.url_to_fs(uri)
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    if _is_local(fs):
        yield path
    else:
        with fs.open(path, "wb") as f:
            yield f


@contextlib.contextmanager
def _parquet_source(uri: str) -> Iterator[pq.ParquetFile]:
    """A Parquet file at `uri` to read: opened by pyarrow itself when local, else through fsspec."""
    fs, path = fsspec.core.url_to_fs(uri)
    if _is_local(fs):
        yield pq.ParquetFile(path)
    else:
        with fs.open(path, "rb") as f:
            yield pq.ParquetFile(f)


def _is_local(fs: fsspec.AbstractFileSystem) -> bool:
    return isinstance(fs, LocalFileSystem)


def row_schema(budgets: list[int]) -> pa.Schema:
    fields = [
        ("id", pa.string()),
        ("source", pa.string()),
        ("label", pa.string()),
        ("accepted", pa.bool_()),
        ("reason", pa.string()),
        ("detail", pa.string()),
        ("orig_width", pa.int32()),
        ("orig_height", pa.int32()),
        ("width", pa.int32()),
        ("height", pa.int32()),
        ("format", pa.string()),
        ("bytes", pa.binary()),
        ("bucket", pa.string()),
    ]
    fields += [(f"bucket_{t}", pa.string()) for t in budgets]
    return pa.schema(fields)


# ------------------------------------------------------------------------------------------------
# Step 1: list the source and cut it into tasks
# ------------------------------------------------------------------------------------------------
def _with_protocol(fs: fsspec.AbstractFileSystem, path: str) -> str:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return path if protocol in ("file", "local") else f"{protocol}://{path}"


def list_tasks(settings: dict[str, Any], retry: Any = None) -> tuple[str, list[dict[str, Any]]]:
    """(source format, tasks). Files: `files_per_task` sorted files a task; tar: one shard a task;
    Parquet: one row group a task (the driver reads only the footers, retried per `retry`, the io section:
    an error that remains stops the run before any work)."""
    source = settings["source"]
    fs, root = fsspec.core.url_to_fs(source)
    paths = _source_files(fs, source, root, retry)
    kind = settings["source_format"]
    if kind == "auto":
        suffixes = {os.path.splitext(p)[1].lower() for p in paths}
        kind = "tar" if ".tar" in suffixes else "parquet" if ".parquet" in suffixes else "files"
    tasks: list[dict[str, Any]] = []
    if kind == "files":
        wanted = {f".{e.lower().lstrip('.')}" for e in settings["extensions"]}
        uris = [_with_protocol(fs, p) for p in paths if os.path.splitext(p)[1].lower() in wanted]
        per = settings["files_per_task"]
        tasks = [{"uris": uris[i : i + per]} for i in range(0, len(uris), per)]
    elif kind == "tar":
        tasks = [{"uris": [_with_protocol(fs, p)]} for p in paths if p.lower().endswith(".tar")]
    else:
        for path in (p for p in paths if p.lower().endswith(".parquet")):
            meta = io_retry.retry_call(lambda path=path: _footer(fs, path), retry, path)
            for key in ("parquet_image_column", "parquet_label_column"):
                if settings[key] and settings[key] not in meta.schema.names:
                    raise ValueError(f"ingest.{key}={settings[key]!r}: {path} has columns {meta.schema.names}")
            offset = 0
            for group in range(meta.num_row_groups):
                tasks.append({"uris": [_with_protocol(fs, path)], "row_group": group, "first_row": offset})
                offset += meta.row_group(group).num_rows
    if not tasks:
        raise FileNotFoundError(f"no {kind} input under ingest.source={source!r}")
    return kind, [{"task": i, "kind": kind, "row_group": -1, "first_row": 0, **t} for i, t in enumerate(tasks)]


def _source_files(fs: fsspec.AbstractFileSystem, source: str, root: str, retry: Any = None) -> list[str]:
    """The source's files, sorted (paths as `fs` names them): `root` itself if it is a file, else every file
    under it. On S3 through Arrow's filesystem: s3fs's `isdir` lists a flat prefix whole and `find` lists it
    again, each holding a dict of ~1 KB per object (key, size, ETag, date...), and keeps them in its cache
    (measured: 2.3 KB per shard in the driver, 2.2 GB at 976,563 shards). Its requests are retried per
    `retry` (the io section), as the footers are."""
    if "s3" not in ([fs.protocol] if isinstance(fs.protocol, str) else list(fs.protocol)):
        if fs.isfile(root):
            return [root]
        if fs.isdir(root):
            return sorted(fs.find(root))
        raise FileNotFoundError(f"ingest.source={source!r} does not exist")

    def listing() -> list[str] | None:
        filesystem, path = pafs.FileSystem.from_uri(absolute(source))
        path = path.rstrip("/")
        kind = filesystem.get_file_info(path).type  # a HEAD, then a listing of at most one key
        if kind == pafs.FileType.File:
            return [path]
        if kind != pafs.FileType.Directory:
            return None
        infos = filesystem.get_file_info(pafs.FileSelector(path, recursive=True))
        return sorted(info.path for info in infos if info.type == pafs.FileType.File)

    paths = io_retry.retry_call(listing, retry, source)
    if paths is None:
        raise FileNotFoundError(f"ingest.source={source!r} does not exist")
    return paths


def _footer(fs: fsspec.AbstractFileSystem, path: str) -> pq.FileMetaData:
    with fs.open(path, "rb") as f:
        return pq.ParquetFile(f).metadata


# ------------------------------------------------------------------------------------------------
# Step 2: one task -> one staging Parquet file
# ------------------------------------------------------------------------------------------------
# (source URI, label, the encoded bytes or the error that stopped us reading them)
Item = tuple[str, str, "bytes | Exception"]
# Reading the source (vitok_core/io_retry.py): a transient error (5xx, throttling, timeout, reset) is retried
# per `retry` (the io config section); one that outlives its retries raises TransientIOError out of the task,
# which fails (Ray Data retries it; a rerun redoes it), never a reject. A permanent one (not found, access
# denied, undecodable shard or row group) is yielded as the item's error: a reject with its reason.


def _read_files(uris: list[str], label_from: str, retry: Any = None) -> Iterator[Item]:
    for uri in uris:
        label = os.path.basename(os.path.dirname(uri)) if label_from == "folder" else ""
        try:
            data = io_retry.read_bytes(uri, retry)
        except Exception as err:
            if io_retry.classify(err) != io_retry.PERMANENT:
                raise  # a TransientIOError (or a bug): the task fails
            yield uri, label, err
            continue
        yield uri, label, data


def _read_tar(uri: str, label_from: str, retry: Any = None) -> Iterator[Item]:
    """WebDataset shard: `key.<image ext>` members are images, `key.cls` their label. Streamed member by
    member; a corrupt or truncated shard ends with one unreadable item naming where it broke. A transient
    error on the way reads the whole shard again (retried per `retry`)."""
    folder_label = os.path.basename(os.path.dirname(uri)) if label_from == "folder" else ""

    def scan() -> tuple[dict[str, tuple[str, bytes]], dict[str, str], str, Exception | None]:
        images: dict[str, tuple[str, bytes]] = {}
        labels: dict[str, str] = {}
        last = "<start>"
        try:
            fs, path = io_retry.url_to_fs(uri)
            with fs.open(path, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    key, ext = os.path.splitext(member.name)
                    data = tar.extractfile(member).read()
                    last = member.name
                    if ext.lower() == ".cls":
                        labels[key] = data.decode(errors="replace").strip()
                    elif ext.lower().lstrip(".") in IMAGE_EXTENSIONS:
                        images[key] = (f"{uri}#{member.name}", data)
        except Exception as err:
            if io_retry.classify(err) == io_retry.TRANSIENT:
                raise
            return images, labels, last, err  # permanent: a corrupt or truncated shard, a missing object
        return images, labels, last, None

    images, labels, last, broken = io_retry.retry_call(scan, retry, uri)
    for key, (source, data) in images.items():
        yield source, labels.get(key, folder_label), data
    if broken is not None:
        yield f"{uri}#after:{last}", folder_label, broken


def _read_parquet(item: dict[str, Any], image_column: str, label_column: str, retry: Any = None) -> Iterator[Item]:
    uri = item["uris"][0]

    def read() -> pa.Table:
        fs, path = io_retry.url_to_fs(uri)
        with fs.open(path, "rb") as f:
            return pq.ParquetFile(f).read_row_group(item["row_group"])

    try:
        table = io_retry.retry_call(read, retry, f"{uri} row group {item['row_group']}")
    except Exception as err:
        if io_retry.classify(err) != io_retry.PERMANENT:
            raise  # a TransientIOError (or a bug): the task fails
        # permanent (a missing object, a corrupt row group): one reject for the row group
        yield f"{uri}#row_group={item['row_group']}", "", err
        return
    images = table.column(image_column).to_pylist()
    labels = table.column(label_column).to_pylist() if label_column else [None] * len(images)
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        value = data if data is not None else ValueError(f"null in column {image_column!r}")
        yield f"{uri}#row={item['first_row'] + i}", "" if label is None else str(label), value


def _items(item: dict[str, Any], settings: dict[str, Any], retry: Any = None) -> Iterator[Item]:
    if item["kind"] == "files":
        return _read_files(item["uris"], settings["label_from"], retry)
    if item["kind"] == "tar":
        return _read_tar(item["uris"][0], settings["label_from"], retry)
    return _read_parquet(item, settings["parquet_image_column"], settings["parquet_label_column"], retry)


def _record(uri: str, label: str, outcome: Outcome, budgets: list[int]) -> dict[str, Any]:
    buckets = {t: f"{r}x{c}" for t, (r, c) in outcome.buckets.items()}
    record = {
        "id": outcome.id,
        "source": uri,
        "label": label,
        "accepted": outcome.accepted,
        "reason": outcome.reason,
        "detail": outcome.detail,
        "orig_width": outcome.orig_width,
        "orig_height": outcome.orig_height,
        "width": outcome.width,
        "height": outcome.height,
        "format": outcome.format,
        "bytes": outcome.data if outcome.accepted else None,
        "bucket": buckets.get(budgets[0], ""),
    }
    record.update({f"bucket_{t}": buckets.get(t, "") for t in budgets})
    return record


def process_task(item: dict[str, Any], settings: dict[str, Any], staging: str, retry: Any = None) -> dict[str, Any]:
    """Process the images of one task and write its staging file whole; returns the task's summary.

    The file holds every outcome, sorted by (bucket, id) so that the rows of one bucket sit in a few row
    groups (rejects, whose bucket is "", come first): the later steps read one bucket from many task files
    through the row-group statistics, without touching the rest."""
    rules, budgets = rules_from(settings), settings["budgets"]
    records = []
    for source, label, data in _items(item, settings, retry):
        if isinstance(data, Exception):  # a permanently unreadable source is a reject, not a crash
            detail = f"{type(data).__name__}: {data}"
            outcome = Outcome(id="", accepted=False, reason="unreadable_source", detail=detail)
        else:
            outcome = process_image(data, rules)
        records.append(_record(source, label, outcome, budgets))
    schema = row_schema(budgets)
    # Sorted as records (Python's sort is stable, as Arrow's): a sort of the table would copy the image bytes.
    records.sort(key=lambda r: (r["bucket"], r["id"]))
    table = pa.Table.from_pylist(records, schema=schema)
    del records
    uri, tmp = task_file(staging, item["task"]), f".tmp-{uuid.uuid4().hex}"
    with _parquet_sink(uri + tmp) as f, pq.ParquetWriter(f, schema, **parquet_options(schema)) as writer:
        for bucket_rows in _runs_of_bucket(table):  # no row group spans two buckets
            writer.write_table(bucket_rows, row_group_size=ROWS_PER_GROUP)
    fs, path = fsspec.core.url_to_fs(uri)
    fs.mv(path + tmp, path)
    return summarize(table, budgets)


def _runs_of_bucket(table: pa.Table) -> Iterator[pa.Table]:
    """The slices of a table sorted by `bucket` that share one bucket value."""
    buckets = table["bucket"].to_pylist()
    start = 0
    for i in range(1, len(buckets) + 1):
        if i == len(buckets) or buckets[i] != buckets[start]:
            yield table.slice(start, i - start)
            start = i


def summarize(table: pa.Table, budgets: list[int]) -> dict[str, Any]:
    """Counts of one task: read, accepted, rejected by reason, accepted per bucket at each budget."""
    table = table.select(["accepted", "reason", *(f"bucket_{t}" for t in budgets)])  # filters copy no bytes
    accepted = table.filter(table["accepted"])
    rejected = table.filter(pc.invert(table["accepted"]))
    return {
        "read": table.num_rows,
        "accepted": accepted.num_rows,
        "rejected_by_reason": dict(Counter(rejected["reason"].to_pylist())),
        "per_bucket": {str(t): dict(Counter(accepted[f"bucket_{t}"].to_pylist())) for t in budgets},
    }


def ingest_task(item: dict[str, Any], settings: dict[str, Any], staging: str, retry: Any = None) -> dict[str, Any]:
    """Ray Data map function of step 2. A task whose staging file a previous attempt wrote is only summarised."""
    if item["done"]:
        columns = ["accepted", "reason", *(f"bucket_{t}" for t in settings["budgets"])]
        with fsspec.open(task_file(staging, item["task"]), "rb") as f:
            summary = summarize(pq.read_table(f, columns=columns), settings["budgets"])
    else:
        summary = process_task(item, settings, staging, retry)
    return {"task": item["task"], "done": item["done"], "summary": json.dumps(summary)}


def task_file(staging: str, task: int) -> str:
    return join(staging, "tasks", f"task-{task:07d}.parquet")


def done_tasks(staging: str) -> set[int]:
    fs, path = fsspec.core.url_to_fs(join(staging, "tasks"))
    if not fs.exists(path):
        return set()
    names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
    return {int(n[5:12]) for n in names if n.startswith("task-") and n.endswith(".parquet")}


def read_bucket(path: str, bucket: str, columns: list[str]) -> pa.Table:
    """The rows of one staging file whose first-budget bucket is `bucket` ("" = rejects)."""
    return read_buckets(path, [bucket], columns)


def read_buckets(path: str, buckets: list[str], columns: list[str]) -> pa.Table:
    """The rows of one staging file whose first-budget bucket is one of `buckets`, in file order. Only the
    row groups whose min/max statistics can hold one are read (the file is sorted by bucket, one bucket per
    row group), and the rows are filtered only when some row group's statistics do not show it holds a
    wanted bucket alone."""
    with _parquet_source(path) as parquet:
        return _read_groups(parquet, set(buckets), columns)


def _read_groups(parquet: pq.ParquetFile, wanted: set[str], columns: list[str]) -> pa.Table:
    """read_buckets on an open staging file."""
    index = parquet.schema_arrow.get_field_index("bucket")
    groups, exact = [], True
    for g in range(parquet.metadata.num_row_groups):
        stats = parquet.metadata.row_group(g).column(index).statistics
        if stats is not None and stats.has_min_max and stats.min == stats.max:
            if stats.min in wanted:
                groups.append(g)
        elif stats is None or not stats.has_min_max or any(stats.min <= b <= stats.max for b in wanted):
            groups.append(g)
            exact = False
    table = parquet.read_row_groups(groups, columns=list(dict.fromkeys([*columns, "bucket"])))
    if not exact:
        table = table.filter(pc.is_in(table["bucket"], value_set=pa.array(sorted(wanted), pa.string())))
    return table.select(columns)


# ------------------------------------------------------------------------------------------------
# Step 3: exact duplicates, per bucket
# ------------------------------------------------------------------------------------------------
# Identical bytes give identical outcomes, so every copy of an image lands in the same bucket: duplicates
# are found bucket by bucket, each bucket split into shards by id so one task holds at most this many ids.
DEDUP_ROWS = 4_000_000  # ~0.5 GB of id + source strings in one task
REJECT_COLUMNS = ["id", "source", "label", "reason", "detail", "orig_width", "orig_height"]


class Tally:
    """What the driver keeps of the tasks' summaries (step 2): the totals the manifest counts, and each
    task's accepted rows per first-budget bucket and its rejected rows, as int32 arrays (a task, a bucket
    code, rows), not a summary a task. Summaries are added one at a time as the tasks return them, so the
    driver never holds them all: at 976,563 tasks of ~20 buckets this is ~0.25 GB, where the summaries
    (JSON strings and dicts, with the counts at every budget) were ~11 GB."""

    def __init__(self, budgets: list[int]) -> None:
        self.budgets = [str(t) for t in budgets]
        self.tasks = 0
        self.read = 0
        self.reasons: Counter = Counter()
        self.per_bucket: dict[str, Counter] = {t: Counter() for t in self.budgets}
        self.buckets: list[str] = []  # the first budget's buckets, by code
        self._codes: dict[str, int] = {}
        self._pending: tuple[list[int], list[int], list[int]] = ([], [], [])  # task, bucket code, rows
        self._chunks: list[np.ndarray] = []  # (3, n) int32: task, bucket code, rows
        self._rejected: tuple[list[int], list[int]] = ([], [])  # task, rejected rows (tasks with any)
        self._grouped: dict[str, tuple[np.ndarray, np.ndarray]] | None = None

    @classmethod
    def of(cls, summaries: dict[int, dict[str, Any]], budgets: list[int]) -> Tally:
        """A tally of the summaries of `summaries` (task -> summary, summarize's)."""
        tally = cls(budgets)
        for task, summary in summaries.items():
            tally.add(task, summary)
        return tally

    def add(self, task: int, summary: dict[str, Any]) -> None:
        """Count one task's summary (summarize's)."""
        self.tasks += 1
        self.read += summary["read"]
        self.reasons.update(summary["rejected_by_reason"])
        for t in self.budgets:
            self.per_bucket[t].update(summary["per_bucket"][t])
        tasks, codes, rows = self._pending
        for bucket, n in summary["per_bucket"][self.budgets[0]].items():
            if bucket not in self._codes:
                self._codes[bucket] = len(self.buckets)
                self.buckets.append(bucket)
            tasks.append(task)
            codes.append(self._codes[bucket])
            rows.append(n)
        if summary["read"] > summary["accepted"]:
            self._rejected[0].append(task)
            self._rejected[1].append(summary["read"] - summary["accepted"])
        if len(tasks) >= 1 << 16:
            self._flush()
        self._grouped = None

    def _flush(self) -> None:
        if self._pending[0]:
            self._chunks.append(np.array(self._pending, dtype=np.int32))
            self._pending = ([], [], [])

    def by_bucket(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """First-budget bucket (sorted) -> (the tasks holding its rows, in task order; their rows there)."""
        if self._grouped is None:
            self._flush()
            pairs = np.concatenate(self._chunks, axis=1) if self._chunks else np.zeros((3, 0), np.int32)
            pairs = pairs[:, np.lexsort((pairs[0], pairs[1]))]  # by bucket, then task
            self._chunks = [pairs]  # sorted, once: the groups below are views of it
            task, code, rows = pairs
            bounds = np.flatnonzero(np.diff(code)) + 1
            starts, ends = np.concatenate([[0], bounds]), np.concatenate([bounds, [len(code)]])
            grouped = {self.buckets[code[b]]: (task[b:e], rows[b:e]) for b, e in zip(starts, ends, strict=True)}
            self._grouped = {bucket: grouped[bucket] for bucket in sorted(grouped)}
        return self._grouped

    def rejected(self) -> tuple[np.ndarray, np.ndarray]:
        """(the tasks with rejected rows, in task order; their rejected rows)."""
        tasks, rows = (np.asarray(x, dtype=np.int64) for x in self._rejected)
        order = np.argsort(tasks, kind="stable")
        return tasks[order], rows[order]


def dedup_plan(tally: Tally, budgets: list[int], buckets: set[str] | None = None) -> list[dict[str, Any]]:
    """One dedup job per (bucket, id shard) of `buckets` (None: all): which task files hold rows of the bucket,
    as ranges of task numbers (task_ranges). A large bucket has rows in almost every task and one shard per
    DEDUP_ROWS rows, so a list of its tasks in every shard's job grew as tasks x shards: at 2B images, 21
    buckets of ~25 shards, each naming ~1M tasks, ~3.7 GB of JSON in the driver."""
    jobs = []
    for bucket, (tasks, rows) in tally.by_bucket().items():
        if buckets is None or bucket in buckets:
            shards = math.ceil(int(rows.sum()) / DEDUP_ROWS)
            ranges = task_ranges(tasks)
            jobs += [{"bucket": bucket, "shard": s, "shards": shards, "task_ranges": ranges} for s in range(shards)]
    return jobs


def task_ranges(tasks: np.ndarray) -> list[list[int]]:
    """Sorted task numbers as [first, last] ranges of consecutive numbers."""
    if not len(tasks):
        return []
    breaks = np.flatnonzero(np.diff(tasks) != 1)
    firsts, lasts = np.concatenate([[0], breaks + 1]), np.concatenate([breaks, [len(tasks) - 1]])
    return [[int(tasks[a]), int(tasks[b])] for a, b in zip(firsts, lasts, strict=True)]


def ranges_tasks(ranges: list[list[int]]) -> list[int]:
    """The task numbers of task_ranges' ranges."""
    return [t for first, last in ranges for t in range(first, last + 1)]


def finish_plan(
    tally: Tally, budgets: list[int], rows_per_file: int, cpus: int
) -> tuple[list[dict[str, Any]], set[str]]:
    """Step 3's jobs, and the buckets left to step 4.

    A bucket of at most `rows_per_file` rows (and DEDUP_ROWS) has one dedup shard and one output file, so
    one task can find its duplicates and write its file: "buckets" jobs, each a run of such buckets (in
    bucket order) of at most `limit` rows, rows_per_file or less, so that each of `cpus` CPUs gets a job
    where the rows allow. A larger bucket is deduplicated here ("dedup", dedup_plan's shards) and published
    in step 4, which needs every shard's duplicates. The rejects (a duplicate is written by its dedup) are
    published here too. The output does not depend on `cpus`, only which task writes which file."""
    holders = {bucket: tasks for bucket, (tasks, _) in tally.by_bucket().items()}
    totals = {bucket: int(rows.sum()) for bucket, (_, rows) in tally.by_bucket().items()}
    small = [b for b in holders if totals[b] <= min(rows_per_file, DEDUP_ROWS)]
    limit = max(1, min(rows_per_file, math.ceil(sum(totals[b] for b in small) / max(1, cpus))))
    runs: list[list[str]] = []
    rows = limit
    for bucket in small:
        if rows + totals[bucket] > limit:
            runs.append([])
            rows = 0
        runs[-1].append(bucket)
        rows += totals[bucket]
    jobs = [
        {"kind": "buckets", "buckets": r, "tasks": np.unique(np.concatenate([holders[b] for b in r])).tolist()}
        for r in runs
    ]
    large = set(holders) - set(small)
    jobs += [{"kind": "dedup", **j} for j in dedup_plan(tally, budgets, large)]
    return [*jobs, *rejects_plan(tally)], large


def finish_task(row: dict[str, Any], staging: str, out: str, budgets: list[int], rows_per_file: int) -> dict:
    """Ray Data map function of step 3: one job of finish_plan. Its result: the rows and index runs of the
    data files it wrote, and the duplicates it found."""
    job = json.loads(row["job"])
    if job["kind"] == "dedup":
        result = {"kind": "dedup", "rows": 0, "index": "", "duplicates": [_dedup(job, staging, out, budgets)]}
    elif job["kind"] == "rejects":
        result = {**publish_part(row, staging, out, budgets, rows_per_file), "duplicates": []}
    else:
        result = publish_buckets(job, staging, out, budgets, rows_per_file)
    return {"result": json.dumps(result)}


def _repeats(table: pa.Table) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(order, repeat, kept) of the rows of `table` (columns id, source): `order` sorts them by (id, source),
    `repeat[i]` says the i-th row in that order has the id of the one before, and `kept` gives, for each
    repeated row, the position in that order of the first row of its id: the copy that is kept."""
    order = pc.sort_indices(table, sort_keys=[("id", "ascending"), ("source", "ascending")]).to_numpy()
    ids = table["id"].take(order).to_numpy(zero_copy_only=False)
    repeat = np.zeros(len(ids), dtype=bool)
    repeat[1:] = ids[1:] == ids[:-1]
    first = np.where(repeat, 0, np.arange(len(ids)))
    return order, repeat, np.maximum.accumulate(first)[repeat]


def _duplicates(dups: pa.Table, kept: pa.Array, out: str, bucket: str, shard: int, budgets: list[int]) -> dict:
    """Write the duplicates of one (bucket, shard) to rejects/ (rows in (id, source) order, each naming the
    copy that was kept) and return dedup's result for it."""
    result = {"bucket": bucket, "duplicates": dups.num_rows, "file": ""}
    result["per_bucket"] = {str(t): dict(Counter(dups[f"bucket_{t}"].to_pylist())) for t in budgets}
    if dups.num_rows:
        detail = pc.binary_join_element_wise("same bytes as ", kept, "")
        reason = pa.array(["duplicate"] * dups.num_rows, pa.string())
        dups = dups.append_column("reason", reason).append_column("detail", detail)
        result["file"] = duplicates_file(out, bucket, shard)
        _write(result["file"], dups.select(REJECT_COLUMNS))
    return result


def publish_buckets(job: dict[str, Any], staging: str, out: str, budgets: list[int], rows_per_file: int) -> dict:
    """Step 3 for a run of small buckets (finish_plan): for each bucket, what _dedup and then publish_part
    do (same files, rows and order), from its rows read once. Each staging file is read once for all the
    run's buckets (one read_row_groups a file, not one a bucket and file: each call sets up every column's
    reader and its read-ahead), then cut by bucket: a file's rows are sorted by bucket, so each bucket's are
    one slice. The task holds the run's rows, at most rows_per_file (finish_plan's limit), as publish_part
    holds one file's."""
    first = f"bucket_{budgets[0]}"
    dup_columns = ["id", "source", "label", "orig_width", "orig_height", *(f"bucket_{t}" for t in budgets)]
    slices: dict[str, list[pa.Table]] = defaultdict(list)
    for t in job["tasks"]:
        table = read_buckets(task_file(staging, t), job["buckets"], data_columns(budgets))
        buckets = table[first].to_numpy(zero_copy_only=False)
        starts = [0, *(np.flatnonzero(buckets[1:] != buckets[:-1]) + 1).tolist(), len(buckets)]
        for begin, end in itertools.pairwise(starts):
            if end > begin:
                slices[buckets[begin]].append(table.slice(begin, end - begin))
    duplicates, rows, index = [], 0, {}
    for bucket in job["buckets"]:
        table = pa.concat_tables(slices.pop(bucket, []) or [_empty(budgets)])
        table = table.combine_chunks()  # one chunk: a take from many chunks of binary is several times slower
        order, repeat, kept = _repeats(table.select(["id", "source"]))
        dups = table.select(dup_columns).take(pa.array(order[repeat], pa.int64()))
        if dups.num_rows:
            kept_sources = table["source"].take(pa.array(order[kept], pa.int64()))
            duplicates.append(_duplicates(dups, kept_sources, out, bucket, 0, budgets))
        dropped = dups["source"].combine_chunks()
        written, runs = _publish_rows(table, dropped, bucket, 0, out, budgets, rows_per_file)
        rows += written
        index.update(runs)
    return {"kind": "data", "rows": rows, "index": json.dumps(index), "duplicates": duplicates}


def _empty(budgets: list[int]) -> pa.Table:
    schema = row_schema(budgets)
    return schema.empty_table().select(data_columns(budgets))


def duplicates_file(out: str, bucket: str, shard: int) -> str:
    return join(out, "rejects", f"duplicates-{bucket}-{shard:04d}.parquet")


def dedup_shard(row: dict[str, Any], staging: str, out: str, budgets: list[int]) -> dict[str, Any]:
    """Map function of one dedup job (its result as JSON): see _dedup."""
    return {"result": json.dumps(_dedup(json.loads(row["job"]), staging, out, budgets))}


def _dedup(job: dict[str, Any], staging: str, out: str, budgets: list[int]) -> dict[str, Any]:
    """One (bucket, id shard): of each set of rows with the same id, keep the smallest source URI; the
    others go to rejects/ as `duplicate`, naming the copy that was kept."""
    columns = ["id", "source", "label", "orig_width", "orig_height", *(f"bucket_{t}" for t in budgets)]
    tasks = ranges_tasks(job["task_ranges"])
    table = pa.concat_tables([read_bucket(task_file(staging, t), job["bucket"], columns) for t in tasks])
    if job["shards"] > 1:
        keep = [int(i[:8], 16) % job["shards"] == job["shard"] for i in table["id"].to_pylist()]
        table = table.filter(pa.array(keep, pa.bool_()))
    order, repeat, kept = _repeats(table.select(["id", "source"]))
    dups = table.take(pa.array(order[repeat], pa.int64()))
    kept_sources = table["source"].take(pa.array(order[kept], pa.int64()))
    return _duplicates(dups, kept_sources, out, job["bucket"], job["shard"], budgets)


# ------------------------------------------------------------------------------------------------
# Step 4: publish
# ------------------------------------------------------------------------------------------------
REJECT_ROWS = 1_000_000  # rejects hold no bytes: large files


def _write(uri: str, table: pa.Table, rows_per_group: int = ROWS_PER_GROUP) -> None:
    with _parquet_sink(uri) as f:
        pq.write_table(table, f, row_group_size=rows_per_group, **parquet_options(table.schema))


def _chunks(tasks: Iterable[tuple[int, int]], limit: int) -> list[list[int]]:
    """Consecutive tasks grouped so that each group holds at most `limit` rows (or one task, if larger)."""
    groups: list[list[int]] = []
    rows = limit
    for task, n in tasks:
        if rows + n > limit:
            groups.append([])
            rows = 0
        groups[-1].append(task)
        rows += n
    return groups


def publish_plan(
    tally: Tally,
    duplicates: list[dict[str, Any]],
    budgets: list[int],
    rows_per_file: int,
    buckets: set[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """One publish job per output file of `buckets` (None: all): a bucket's rows from a run of consecutive
    tasks. Yielded one at a time, in bucket order: the driver keeps each only as the JSON it hands Ray."""
    dup_files: dict[str, list[str]] = defaultdict(list)
    for d in duplicates:
        if d["file"]:
            dup_files[d["bucket"]].append(d["file"])
    for bucket, (tasks, rows) in tally.by_bucket().items():
        if buckets is None or bucket in buckets:
            pairs = zip(tasks.tolist(), rows.tolist(), strict=True)
            for part, run in enumerate(_chunks(pairs, rows_per_file)):
                yield {"kind": "data", "bucket": bucket, "part": part, "tasks": run, "dups": dup_files[bucket]}


def rejects_plan(tally: Tally) -> list[dict[str, Any]]:
    """One job per rejects file: the rejects of a run of consecutive tasks."""
    tasks, rows = tally.rejected()
    parts = _chunks(zip(tasks.tolist(), rows.tolist(), strict=True), REJECT_ROWS)
    return [
        {"kind": "rejects", "bucket": "", "part": part, "tasks": tasks, "dups": []} for part, tasks in enumerate(parts)
    ]


def data_columns(budgets: list[int]) -> list[str]:
    """The columns of data/: the staging row minus the outcome fields and `bucket`, which is the path."""
    drop = {"accepted", "reason", "detail", "bucket"}
    return [name for name in row_schema(budgets).names if name not in drop]


def publish_part(row: dict[str, Any], staging: str, out: str, budgets: list[int], rows_per_file: int) -> dict:
    """Ray Data map function of step 4: copy one output file's rows out of the staging files."""
    job = json.loads(row["job"])
    if job["kind"] == "rejects":
        tables = [read_bucket(task_file(staging, t), "", REJECT_COLUMNS) for t in job["tasks"]]
        table = pa.concat_tables(tables)
        _write(join(out, "rejects", f"part-{job['part']:05d}.parquet"), table, rows_per_group=64 * ROWS_PER_GROUP)
        return {"kind": "rejects", "rows": table.num_rows, "index": ""}
    dropped = set()
    for path in job["dups"]:
        with fsspec.open(path, "rb") as f:
            dropped.update(pq.read_table(f, columns=["source"])["source"].to_pylist())
    tables = [read_bucket(task_file(staging, t), job["bucket"], data_columns(budgets)) for t in job["tasks"]]
    table = pa.concat_tables(tables).combine_chunks()  # one chunk: a take from many chunks of binary is slower
    dropped_sources = pa.array(sorted(dropped), pa.string())
    rows, index = _publish_rows(table, dropped_sources, job["bucket"], job["part"], out, budgets, rows_per_file)
    return {"kind": "data", "rows": rows, "index": json.dumps(index)}


def _publish_rows(
    table: pa.Table, dropped: pa.Array, bucket: str, part: int, out: str, budgets: list[int], rows_per_file: int
) -> tuple[int, dict[str, dict[str, list]]]:
    """Write one bucket's rows from a run of tasks (in task order) to data/, leaving out the sources in
    `dropped` (its duplicates), sorted by the later budgets' buckets then id, at most rows_per_file rows a
    file; return the rows written and each file's index runs."""
    if len(dropped):
        table = table.filter(pc.invert(pc.is_in(table["source"], value_set=dropped)))
    if len(budgets) > 1:  # the rows of one bucket combination together: few index runs per row group
        table = table.sort_by([*((f"bucket_{t}", "ascending") for t in budgets[1:]), ("id", "ascending")])
    rows_per_group = min(ROWS_PER_GROUP, rows_per_file)
    index: dict[str, dict[str, list]] = {}
    for k, offset in enumerate(range(0, table.num_rows, rows_per_file)):
        name = join("data", f"bucket={bucket}", f"part-{part:05d}-{k:03d}.parquet")
        rows = table.slice(offset, rows_per_file)
        _write(join(out, name), rows, rows_per_group)
        buckets = {f"bucket_{t}": rows[f"bucket_{t}"] for t in budgets}
        index[name] = file_runs(buckets, group_sizes(rows.num_rows, rows_per_group))
    return table.num_rows, index


def count(tally: Tally, duplicates: list[dict[str, Any]], budgets: list[int]) -> dict:
    """Manifest counts: the tasks' summaries, with the duplicates moved from their buckets to the rejects."""
    reasons = Counter(tally.reasons)
    per_bucket = {str(t): Counter(tally.per_bucket[str(t)]) for t in budgets}
    for d in duplicates:
        reasons["duplicate"] += d["duplicates"]
        for t in per_bucket:
            per_bucket[t].subtract(d["per_bucket"][t])
    per_bucket = {t: {b: n for b, n in sorted(c.items()) if n} for t, c in per_bucket.items()}
    read = tally.read
    accepted = sum(per_bucket[str(budgets[0])].values())
    return {
        "read": read,
        "accepted": accepted,
        "rejected": read - accepted,
        "rejected_by_reason": {r: n for r, n in sorted(reasons.items()) if n},
        "per_bucket": per_bucket,
    }


def versions() -> dict[str, str]:
    import PIL
    import ray

    return {"vitok": __version__, "ray": ray.__version__, "pyarrow": pa.__version__, "pillow": PIL.__version__}


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def map_tasks(fn: Any, rows: list[dict[str, Any]], kwargs: dict[str, Any], desc: str) -> Iterator[dict[str, Any]]:
    """Run `fn` on every row as one Ray Data task each (streamed, retried by Ray), with a progress bar; yields
    each task's result as it arrives, so that the driver keeps of it only what it needs."""
    import ray

    if not rows:
        return
    ds = ray.data.from_items(rows, override_num_blocks=len(rows)).map(fn, fn_kwargs=kwargs)
    with tqdm(total=len(rows), unit="task", desc=desc) as bar:
        for result in ds.iter_rows():
            yield result
            bar.update(1)


def tally_results(results: Iterable[dict[str, Any]], budgets: list[int]) -> Tally:
    """Step 2's results (ingest_task's), counted as they arrive: the summaries are not kept."""
    tally = Tally(budgets)
    for result in results:
        tally.add(result["task"], json.loads(result["summary"]))
    return tally


def absorb_written(results: Iterable[dict[str, Any]], index: IndexBuilder) -> tuple[int, list[dict[str, Any]]]:
    """Steps 3-4's results (finish_task's, publish_part's) as they arrive: each written data file's runs
    go to `index`; returns the data rows written and the duplicates found (dedup's results)."""
    rows, duplicates = 0, []
    for result in results:
        if "result" in result:  # finish_task's, wrapped as JSON
            result = json.loads(result["result"])
        if result["kind"] == "data":
            rows += result["rows"]
        for name, runs in json.loads(result["index"] or "{}").items():
            index.add(name, runs)
        duplicates += result.get("duplicates", [])
    return rows, duplicates


def run(cfg: VitokConfig) -> dict[str, Any]:
    """Run (or skip, when already complete) the ingest stage; returns its manifest."""
    if not cfg.ingest.source:
        raise ValueError("ingest.source is empty: give a folder or s3:// prefix of images")
    settings = ingest_settings(cfg)
    budgets = settings["budgets"]
    out = output_uri(cfg)
    if is_complete(out):
        log.info("ingest %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    start = time.time()
    staging = join(out, "_staging")
    kind, tasks = list_tasks(settings, cfg.io)
    done = done_tasks(staging)
    log.info("ingest %s: %s source, %d tasks (%d already done)", out, kind, len(tasks), len(done))
    listed = time.time()

    init_ray()
    import ray

    # Every step below is one map over independent tasks. Ray Data's per-operator resource reservation
    # would hold such a lone map to one task at a time for its first second or so (measured: 8 x 0.5 s
    # tasks on 2 CPUs took 3.1 s with it, 2.2 s without); there is nothing to reserve for here.
    ray.data.DataContext.get_current().op_resource_reservation_enabled = False
    retry_transient_tasks(cfg.io)  # a task whose read outlived its retries: retried by Ray Data, then fails
    for t in tasks:  # the rows handed to Ray Data: the listing's own dicts, not a copy
        t["done"] = t["task"] in done
    kwargs = {"settings": settings, "staging": staging, "retry": to_dict(cfg.io)}
    tally = tally_results(map_tasks(ingest_task, tasks, kwargs, "ingest: process"), budgets)
    del tasks  # the listing is not needed after step 2: its memory goes to the plans and the index
    processed = time.time()

    # A crash after this point leaves no _SUCCESS; the rerun summarises the staging files and redoes the rest.
    remove(join(out, "data"))
    remove(join(out, "rejects"))
    remove(join(out, INDEX))
    rows_per_file = settings["rows_per_file"]
    cpus = max(1, int(ray.cluster_resources().get("CPU", 1)))
    plan, large = finish_plan(tally, budgets, rows_per_file, cpus)
    kwargs = {"staging": staging, "out": out, "budgets": budgets, "rows_per_file": rows_per_file}
    jobs = [{"job": json.dumps(j)} for j in plan]
    index = IndexBuilder([f"bucket_{t}" for t in budgets])  # every data file's runs, as its task returns them
    rows_written, duplicates = absorb_written(map_tasks(finish_task, jobs, kwargs, "ingest: dedup"), index)
    counts = count(tally, duplicates, budgets)
    deduplicated = time.time()

    jobs = [{"job": json.dumps(j)} for j in publish_plan(tally, duplicates, budgets, rows_per_file, large)]
    rows_written += absorb_written(map_tasks(publish_part, jobs, kwargs, "ingest: publish"), index)[0]
    del jobs
    if rows_written != counts["accepted"]:  # never publish a set that disagrees with its own counts
        raise RuntimeError(f"ingest publish wrote {rows_written} rows, expected {counts['accepted']}")
    index.write(out)  # part of the output: before the manifest and _SUCCESS; sorted and written a slice at a time
    manifest = {
        "stage": "ingest",
        "key": out.rstrip("/").rsplit("/", 1)[-1],
        "output": out,
        "settings": settings,
        "counts": counts,
        "index": {"file": INDEX, "row_groups": index.row_groups, "runs": index.runs},
        "timing_s": {
            "list": listed - start,
            "process": processed - listed,
            "dedup": deduplicated - processed,
            "publish": time.time() - deduplicated,
            "total": time.time() - start,
        },
        "versions": versions(),
        "code_version": CODE_VERSION,
        **manifest_fields("ingest"),
    }
    write_json(join(out, "manifest.json"), manifest)
    mark_success(out)
    remove(staging)
    log.info(
        "ingest done: %d read, %d accepted, rejected %s",
        counts["read"],
        counts["accepted"],
        counts["rejected_by_reason"],
    )
    return manifest


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"ingest output: {manifest['output']}")
    print(
        f"read {manifest['counts']['read']}, accepted {manifest['counts']['accepted']}, "
        f"rejected {manifest['counts']['rejected_by_reason']}"
    )


if __name__ == "__main__":
    main()
