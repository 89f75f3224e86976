"""Stage ingest: filter raw images and bucket them by aspect ratio into Parquet, with Ray Data.

    python -m jobs.ingest --config tiny ingest.source=DIR_OR_S3_PREFIX [ingest.root=runs] [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.ingest --config 350m ingest.source=s3://bucket/raw ingest.root=s3://bucket/runs

Output under {root}/ingest/{key}/ (key = hash of the ingest settings, budgets, patch size, code version):
    data/bucket=RxC/*.parquet   accepted images, Hive-partitioned by their grid at the first budget
    rejects/*.parquet           source, reason, detail for every rejected image (no bytes)
    manifest.json               counts (read, accepted, rejected by reason, per bucket), timings, settings
    _SUCCESS                    written last; a reader trusts nothing without it

How it runs, and why it survives a crash:
  1. The source files are listed and sorted, then cut into tasks of `files_per_task` files.
  2. Ray Data maps the tasks over the cluster. Each task reads its files, applies
     `vitok_core.ingest.process_image` and writes ONE Parquet file with every outcome to _staging/tasks/,
     under a temporary name first, so a task file is there whole or not at all. A rerun lists the task
     files that exist and skips those tasks: a crash costs only the tasks in flight.
  3. Exact duplicates (same SHA-256 of the source bytes) are found from the id/source columns alone with a
     Ray Data groupby; the copy with the smallest source URI is kept, so the choice is deterministic.
  4. Accepted rows go to data/ partitioned by bucket (at least `rows_per_file` rows per file), rejects to
     rejects/; then manifest.json, then _SUCCESS, then the staging area is deleted. A crash in this step
     leaves no _SUCCESS; the rerun deletes data/ and rejects/ and redoes only this step.
The driver streams summaries and small columns; it never holds image records.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import tarfile
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from jobs.common import init_ray, parse_config, setup_logging
from vitok_core import __version__
from vitok_core.artifacts import is_complete, join, mark_success, read_json, remove, stage_key, write_json
from vitok_core.config import VitokConfig, to_dict
from vitok_core.ingest import IngestRules, Outcome, process_image
from vitok_core.variants import parse_variant

log = logging.getLogger("vitok.ingest")

IMAGE_EXTENSIONS = {"jpg", "jpeg", "png", "webp", "gif"}  # members of tar shards that are images
CODE_VERSION = "ingest-1"  # bump when a change alters what ingest writes
ROWS_PER_GROUP = 256  # ~25 MB of 0.4 MP JPEGs: the unit a streaming loader reads at a time


# ------------------------------------------------------------------------------------------------
# Settings, key and layout
# ------------------------------------------------------------------------------------------------
def absolute(uri: str) -> str:
    """Local paths become absolute: Ray workers may run in another working directory."""
    return uri if "://" in uri else os.path.abspath(uri)


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


def compression(budgets: list[int]) -> dict[str, str]:
    """Snappy for every column but the encoded images: on JPEG/WebP bytes it saved nothing and cost
    0.25-0.74 ms per image per write (measured on this project's 2-core machine)."""
    return {**{name: "SNAPPY" for name in row_schema(budgets).names}, "bytes": "NONE"}


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


def list_tasks(settings: dict[str, Any]) -> tuple[str, list[dict[str, Any]]]:
    """(source format, tasks). Files: `files_per_task` sorted files a task; tar: one shard a task;
    Parquet: one row group a task (the driver reads only the footers)."""
    source = settings["source"]
    fs, root = fsspec.core.url_to_fs(source)
    if fs.isfile(root):
        paths = [root]
    elif fs.isdir(root):
        paths = sorted(fs.find(root))
    else:
        raise FileNotFoundError(f"ingest.source={source!r} does not exist")
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
            with fs.open(path, "rb") as f:
                meta = pq.ParquetFile(f).metadata
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


# ------------------------------------------------------------------------------------------------
# Step 2: one task -> one staging Parquet file
# ------------------------------------------------------------------------------------------------
# (source URI, label, the encoded bytes or the error that stopped us reading them)
Item = tuple[str, str, "bytes | Exception"]


def _read_files(uris: list[str], label_from: str) -> Iterator[Item]:
    for uri in uris:
        label = os.path.basename(os.path.dirname(uri)) if label_from == "folder" else ""
        try:
            with fsspec.open(uri, "rb") as f:
                yield uri, label, f.read()
        except Exception as err:
            yield uri, label, err


def _read_tar(uri: str, label_from: str) -> Iterator[Item]:
    """WebDataset shard: `key.<image ext>` members are images, `key.cls` their label. Streamed member by
    member; a corrupt or truncated shard ends with one unreadable item naming where it broke."""
    folder_label = os.path.basename(os.path.dirname(uri)) if label_from == "folder" else ""
    images: dict[str, tuple[str, bytes]] = {}
    labels: dict[str, str] = {}
    last = "<start>"
    broken: Exception | None = None
    try:
        with fsspec.open(uri, "rb") as f, tarfile.open(fileobj=f, mode="r|*") as tar:
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
        broken = err
    for key, (source, data) in images.items():
        yield source, labels.get(key, folder_label), data
    if broken is not None:
        yield f"{uri}#after:{last}", folder_label, broken


def _read_parquet(item: dict[str, Any], image_column: str, label_column: str) -> Iterator[Item]:
    uri = item["uris"][0]
    with fsspec.open(uri, "rb") as f:
        table = pq.ParquetFile(f).read_row_group(item["row_group"])
    images = table.column(image_column).to_pylist()
    labels = table.column(label_column).to_pylist() if label_column else [None] * len(images)
    for i, (data, label) in enumerate(zip(images, labels, strict=True)):
        value = data if data is not None else ValueError(f"null in column {image_column!r}")
        yield f"{uri}#row={item['first_row'] + i}", "" if label is None else str(label), value


def _items(item: dict[str, Any], settings: dict[str, Any]) -> Iterator[Item]:
    if item["kind"] == "files":
        return _read_files(item["uris"], settings["label_from"])
    if item["kind"] == "tar":
        return _read_tar(item["uris"][0], settings["label_from"])
    return _read_parquet(item, settings["parquet_image_column"], settings["parquet_label_column"])


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


def process_task(item: dict[str, Any], settings: dict[str, Any], staging: str) -> dict[str, Any]:
    """Ray Data map function: process the images of one task and write its staging file whole."""
    rules, budgets = rules_from(settings), settings["budgets"]
    records = []
    for source, label, data in _items(item, settings):
        if isinstance(data, Exception):  # an unreadable source is a reject, not a crash
            detail = f"{type(data).__name__}: {data}"
            outcome = Outcome(id="", accepted=False, reason="unreadable_source", detail=detail)
        else:
            outcome = process_image(data, rules)
        records.append(_record(source, label, outcome, budgets))
    table = pa.Table.from_pylist(records, schema=row_schema(budgets))
    fs, path = fsspec.core.url_to_fs(task_file(staging, item["task"]))
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{uuid.uuid4().hex}"
    with fs.open(tmp, "wb") as f:
        pq.write_table(table, f, compression=compression(budgets))
    fs.mv(tmp, path)
    return {"task": item["task"], "read": len(records), "accepted": sum(r["accepted"] for r in records)}


def task_file(staging: str, task: int) -> str:
    return join(staging, "tasks", f"task-{task:07d}.parquet")


def done_tasks(staging: str) -> set[int]:
    fs, path = fsspec.core.url_to_fs(join(staging, "tasks"))
    if not fs.exists(path):
        return set()
    names = [os.path.basename(p) for p in fs.ls(path, detail=False)]
    return {int(n[5:12]) for n in names if n.startswith("task-") and n.endswith(".parquet")}


# ------------------------------------------------------------------------------------------------
# Step 3: exact duplicates
# ------------------------------------------------------------------------------------------------
def _extra_copies(group: dict[str, Any]) -> dict[str, Any]:
    """All rows of one content id but the one with the smallest source URI."""
    sources = sorted(group["source"])
    return {"source": sources[1:], "id": list(group["id"][1:])}


def find_duplicates(task_files: list[str]) -> set[str]:
    """Sources whose bytes another, smaller source URI also has. Only duplicates reach the driver."""
    import ray
    from ray.data.expressions import col, lit

    ids = ray.data.read_parquet(task_files).select_columns(["id", "source", "accepted"])
    ids = ids.filter(expr=col("accepted") == lit(True))
    partitions = max(2, min(1000, len(task_files) // 4))
    copies = ids.groupby("id", num_partitions=partitions).map_groups(_extra_copies, batch_format="numpy")
    return {row["source"] for row in copies.iter_rows()}


# ------------------------------------------------------------------------------------------------
# Step 4: publish
# ------------------------------------------------------------------------------------------------
def _is_duplicate(batch: pa.Table, duplicates: set[str]) -> pa.Array:
    return pc.is_in(batch["source"], value_set=pa.array(sorted(duplicates), pa.string()))


def _keep_accepted(batch: pa.Table, duplicates: set[str]) -> pa.Table:
    keep = pc.and_(batch["accepted"], pc.invert(_is_duplicate(batch, duplicates)))
    return batch.filter(keep).drop_columns(["accepted", "reason", "detail"])


def _keep_rejected(batch: pa.Table, duplicates: set[str]) -> pa.Table:
    dup = pc.and_(batch["accepted"], _is_duplicate(batch, duplicates))
    reason = pc.if_else(dup, "duplicate", batch["reason"])
    detail = pc.if_else(
        dup, pc.binary_join_element_wise("same bytes as another source (id ", batch["id"], ")", ""), batch["detail"]
    )
    batch = batch.set_column(batch.schema.get_field_index("reason"), "reason", reason)
    batch = batch.set_column(batch.schema.get_field_index("detail"), "detail", detail)
    return batch.filter(pc.or_(pc.invert(batch["accepted"]), dup)).drop_columns(["accepted"])


def publish(out: str, task_files: list[str], duplicates: set[str], rows_per_file: int, budgets: list[int]) -> None:
    """data/ partitioned by bucket (rows sorted by bucket, so each bucket is one file or a few of at most
    `rows_per_file` rows), then rejects/. Both are rewritten from scratch: a rerun after a crash is clean."""
    import ray

    remove(join(out, "data"))
    remove(join(out, "rejects"))
    staged = ray.data.read_parquet(task_files)
    accepted = staged.map_batches(_keep_accepted, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow")
    accepted = accepted.sort("bucket")
    accepted.write_parquet(
        join(out, "data"),
        partition_cols=["bucket"],
        max_rows_per_file=rows_per_file,
        row_group_size=min(ROWS_PER_GROUP, rows_per_file),
        compression=compression(budgets),
    )
    columns = ["id", "source", "label", "accepted", "reason", "detail", "orig_width", "orig_height"]
    rejects = ray.data.read_parquet(task_files).select_columns(columns)
    rejects = rejects.map_batches(_keep_rejected, fn_kwargs={"duplicates": duplicates}, batch_format="pyarrow")
    rejects.write_parquet(join(out, "rejects"))


def count(task_files: list[str], duplicates: set[str], budgets: list[int]) -> dict[str, Any]:
    """Manifest counts, streamed over the small columns of the staging files."""
    read, reasons, per_bucket = 0, Counter(), {t: Counter() for t in budgets}
    columns = ["source", "accepted", "reason", *(f"bucket_{t}" for t in budgets)]
    for path in task_files:
        with fsspec.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        for row in table.to_pylist():
            read += 1
            if row["accepted"] and row["source"] in duplicates:
                reasons["duplicate"] += 1
            elif not row["accepted"]:
                reasons[row["reason"]] += 1
            else:
                for t in budgets:
                    per_bucket[t][row[f"bucket_{t}"]] += 1
    accepted = sum(per_bucket[budgets[0]].values())
    return {
        "read": read,
        "accepted": accepted,
        "rejected": read - accepted,
        "rejected_by_reason": dict(sorted(reasons.items())),
        "per_bucket": {str(t): dict(sorted(per_bucket[t].items())) for t in budgets},
    }


def versions() -> dict[str, str]:
    import PIL
    import ray

    return {"vitok": __version__, "ray": ray.__version__, "pyarrow": pa.__version__, "pillow": PIL.__version__}


# ------------------------------------------------------------------------------------------------
# The job
# ------------------------------------------------------------------------------------------------
def run(cfg: VitokConfig) -> dict[str, Any]:
    """Run (or skip, when already complete) the ingest stage; returns its manifest."""
    if not cfg.ingest.source:
        raise ValueError("ingest.source is empty: give a folder or s3:// prefix of images")
    settings = ingest_settings(cfg)
    out = output_uri(cfg)
    if is_complete(out):
        log.info("ingest %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    start = time.time()
    staging = join(out, "_staging")
    kind, tasks = list_tasks(settings)
    done = done_tasks(staging)
    todo = [t for t in tasks if t["task"] not in done]
    log.info("ingest %s: %s source, %d tasks (%d already done)", out, kind, len(tasks), len(tasks) - len(todo))
    listed = time.time()

    init_ray()
    import ray
    from ray.data.context import ShuffleStrategy

    # The dedup groupby and the sort by bucket are the two shuffles. The pull-based sort shuffle runs as
    # plain tasks; the default actor-based one costs ~10 s of start-up per shuffle on a small run.
    ray.data.DataContext.get_current().shuffle_strategy = ShuffleStrategy.SORT_SHUFFLE_PULL_BASED

    if todo:
        ds = ray.data.from_items(todo, override_num_blocks=len(todo))
        ds = ds.map(process_task, fn_kwargs={"settings": settings, "staging": staging})
        with tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="task", desc="ingest") as bar:
            for summary in ds.iter_rows():
                bar.update(1)
                bar.set_postfix(images=summary["read"], accepted=summary["accepted"])
    processed = time.time()

    task_files = [task_file(staging, t["task"]) for t in tasks]
    duplicates = find_duplicates(task_files)
    counts = count(task_files, duplicates, settings["budgets"])
    publish(out, task_files, duplicates, settings["rows_per_file"], settings["budgets"])
    manifest = {
        "stage": "ingest",
        "key": out.rstrip("/").rsplit("/", 1)[-1],
        "output": out,
        "settings": settings,
        "counts": counts,
        "timing_s": {
            "list": listed - start,
            "process": processed - listed,
            "publish": time.time() - processed,
            "total": time.time() - start,
        },
        "versions": versions(),
        "code_version": CODE_VERSION,
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
