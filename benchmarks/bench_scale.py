"""Cost curves of planning at scale (issue 13): loader start-up per rank, ingest planning on the driver, and
cache_latents and evaluate planning, against the number N of data files, on S3 with 20 ms per request; each
with wall time and peak memory, least-squares fits in N and in log N, extrapolated to 2B images.

    .venv/bin/python benchmarks/bench_scale.py            # N = 1k, 10k, 100k + a check at 976,563 files (934 s)
    .venv/bin/python benchmarks/bench_scale.py --quick    # N = 1k, 10k only, no check at 976,563 (309 s)
    .venv/bin/python benchmarks/bench_scale.py --only ingest_driver   # the ingest driver rows and fits only,
        at N = 1k, 10k, 100k (~13 min, 6 of them 100k PUTs); results in bench_scale_ingest_driver.json
(times: the 2-core VM, 2026-11-30; 100k PUTs to moto are 269 s of the full run, the old footer path ~130 s)

S3: a real moto server (moto.server.ThreadedMotoServer, in its own process, 127.0.0.1) behind
tests/s3_proxy.py's S3FaultProxy with latency_s = --latency-ms / 1000 (default 20 ms: every request waits that
long in the proxy before it is forwarded; no faults). Every measured client talks to the proxy (the environment's
AWS_ENDPOINT_URL); the setup writes straight to moto, bypassing the proxy. Each measurement runs in a fresh
subprocess (`--worker`), one at a time. A calibration first times sequential small GETs
straight to moto and through the proxy: the round trip per request the measurements below actually met (the
proxy sets TCP_NODELAY: with Nagle's algorithm its two writes per response cost ~40 ms more per request).

What exists on S3 for each N (one bucket per N and per role, so moto never lists more keys than the N asked):
  source   bench-scale-src-N/shards/: N objects `shard-NNNNNNN.tar` of 64 bytes (not valid tar archives:
           planning lists shards and never opens one), written by --put-threads threads of unsigned HTTP PUTs.
  output   bench-scale-out-N/ingest/out-N/: `_SUCCESS`, `manifest.json` and `index.parquet` describing N data
           files of 2048 rows each (8 row groups of 256 rows, the default rows_per_file, as at 2B images in
           976,563 files), budgets 256 and 1024. No data file exists, except at N in --footer-sizes (default
           1000): N real Parquet data files of those rows (only the two bucket columns, so a file is ~10 KiB;
           a real one is ~185 MiB, but the old loader read only its footer and bucket column chunks).
  parquet  at N = 1000 only: bench-scale-pq-1000/parts/: 1000 Parquet source files (img2dataset layout, one
           row group of 4 rows each), for ingest planning of a Parquet source (a footer per file).
Buckets: 100,000 sizes drawn like bench_model.py's synthetic set (an aspect from common.ASPECTS by weight, a
uniform short side of 300-3000 px, seed 0), stored as ingest stores them (vitok_core.ingest.storage_size at
store_max_pixels) and bucketed with vitok_core.budget.bucket_of (p = 16) at 256 and 1024 tokens: the joint
frequencies of (bucket at 256, bucket at 1024). A data file holds one bucket at 256 (files dealt to buckets in
proportion to their share), its rows' buckets at 1024 drawn from that bucket's conditional frequencies and
sorted as ingest-3 sorts them, so its index runs are what ingest would write for such rows; files in the index's
hash order, written by ingest's own index writer (aligned index row groups, the layout in the footer).

Measured, each in its own process (wall = the call(s) named, not the interpreter start or the imports):
  loader        `ShardIndex.build(output, budget, rank=--rank, world=--world)` and the first item of its
                `batch_plan` (micro-batch 32, window 16), at budget 256 and at 1024: what one rank does before
                its first batch (reads `_SUCCESS`, `manifest.json`, the index's footer and one index row group).
  loader_resume the same from Position(epoch 0, block blocks // 2, batch 10): a resume mid-epoch (one block).
  loader_footers   at N in --footer-sizes, the loader before ingest-3, for contrast: `IngestOutput.data_files()`
                (a listing of data/) + `ShardIndex.from_files` (every file's footer, then the bucket column of
                the rank's row groups), budget 256; checked equal to `ShardIndex.build`'s units and buckets.
  ingest_driver `jobs.ingest.list_tasks` on the N shards (the driver's planning: the listing), then the rest of
                the driver's own work in `jobs.ingest.run`, on results that stand in for the Ray workers' (each
                of the N tasks read 2048 images, 1% rejected as too_small, the rest drawn from the joint bucket
                frequencies; no duplicates; each written file's runs drawn as above), made one at a time as the
                driver takes them (as jobs.ingest.map_tasks yields Ray Data's results): done_tasks, the rows
                handed to Ray Data, tally_results, finish_plan (cpus = CLUSTER_CPUS), absorb_written of step 3's
                results (IndexBuilder.add), count, publish_plan, absorb_written of step 4's, IndexBuilder.write
                (through the proxy), the manifest; what run() drops (the listing after step 2, the publish jobs)
                is dropped at the same point. This mirrors run() at commit f47b088 (2026-11-30): keep it in step
                with run(). Ray itself (from_items' blocks and Ray Data's state for N tasks) is not in this
                process and not measured. Per phase: wall and CPU (the stand-ins' own time left out), RSS held
                after it and the peak so far (VmRSS, VmHWM), minus the baseline.
  ingest_list_direct   for N <= --direct-max (default 10k): `list_tasks` alone, straight to moto (no proxy):
                moto's own share of the listing (moto's list_objects_v2 sorts every key of the bucket for every page
                of 1000, so its cost per page grows with N; S3's does not). At larger N the moto CPU column shows it.
  ingest_list_parquet  at N = 1000: `list_tasks` on a Parquet source (one footer per file, in sequence).
  cache_plan    cache_latents' planning from the ingest output: `IngestOutput(...).data_uris()` (the index's
                `file` column), `done_files` of a fresh output, the todo list (the encoder's checks, a constant, left
                out).
  evaluate_plan `jobs.evaluate.list_images` (the eval set's tasks from the index, evaluate.images_per_task 16)
                at evaluate.max_images=50000, and at max_images=0 (every image: the default) for N <= --all-max.
The index-only measurements (loader, cache_plan, evaluate_plan) run --repeat times (default 2; the machine is
shared): the table shows the fastest wall time and the largest peak; the JSON has every run.
Memory: peak RSS of the measuring process, its VmHWM (/proc/self/status: the kernel's high-water mark of the
process's resident memory), minus the mean VmHWM of two idle processes with the same imports (`noop`, measured
in this run; one import set for ingest_*, which does not import torch, and one for the readers). Not getrusage's
ru_maxrss: on Linux a child's ru_maxrss also counts the peak RSS of the address space it replaced at exec, i.e.
this script's own (which holds a 976,563-file index while it sets one up); a first run read exactly this
script's 3.0 GiB in two workers whose own peaks were lower. ru_maxrss is kept in the JSON. Also per measurement:
requests the proxy received, the client's CPU seconds, moto's and the proxy's CPU seconds (moto's process; this
process, which runs only the proxy while a worker runs), the 1-minute load average at its start.

Fits: least squares of a + b N and of a + b ln N on the measured N (three in a full run) for the time and peak of
the loader, cache_latents and evaluate planning, for list_tasks' wall time and client CPU, the ingest driver's
requests and its peak; the better one by the RMS of relative residuals; both extrapolated to N = 976,563 (2.0B
rows; for ingest, 976,563 source shards of 2048 images). In a full run the index-only measurements (loader,
cache_plan, evaluate_plan at max_images=50000) are also measured at 976,563 files, a check of the extrapolation
(not in the fit). The driver's memory is also split by phase (the memory each phase adds to what is held), each
part fitted linearly. Derived, and printed as such: list_tasks on S3 at 976,563 shards = its fitted client CPU +
fitted requests x the request latency (moto's own per-page listing cost, which grows with N, left out); the
footer path and the Parquet-source listing, whose requests are per file, scaled by 976,563 / N from their one N.
Goals (issue 13): loader start-up <= 60 s per rank at 1M files, flat or logarithmic in N; driver memory of a
2B-image ingest <= 4 GB.
Results also go to benchmarks/results/bench_scale.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import http.client
import json
import math
import os
import platform
import resource
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import ASPECTS, cpu_model, format_table  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "bench_scale.json"
ROWS_PER_FILE = 2048  # ingest.rows_per_file's default
ROWS_PER_GROUP = 256  # jobs.ingest.ROWS_PER_GROUP
BUDGETS = (256, 1024)
PATCH = 16
TARGET_FILES = 976_563  # 2.0B rows at 2048 rows per file (docs/scaling.md section 2)
SHORT_SIDE = (300, 3000)  # bench_model.py's synthetic sizes
SIZES_DRAWN = 100_000
MICRO_BATCH, WINDOW = 32, 16  # the loader's first batch: train.micro_batch_size of the 5b preset, shuffle_window
REJECT_SHARE = 0.01  # of each task's 2048 images, rejected as too_small (the driver sim's summaries)
MEASURED_MODULES = (
    "vitok_core/loader.py",
    "vitok_core/row_index.py",
    "vitok_core/ingest_output.py",
    "jobs/ingest.py",
    "jobs/cache_latents.py",
    "jobs/evaluate.py",
    "vitok_core/io_retry.py",
)
IMPORTS = {  # what each worker imports before it is measured; its baseline imports the same
    "driver": ("jobs.ingest", "s3fs", "pyarrow.parquet"),
    "readers": ("vitok_core.loader", "jobs.cache_latents", "jobs.evaluate", "jobs.ingest", "s3fs"),
}
MOTO = """
import sys, time
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.readline()  # until the parent closes our stdin (or dies)
server.stop()
"""


# ------------------------------------------------------------------------------------------------
# Bucket frequencies and index runs
# ------------------------------------------------------------------------------------------------
def joint_buckets(seed: int = 0) -> dict[str, Any]:
    """Joint frequencies of (bucket at 256, bucket at 1024) over SIZES_DRAWN synthetic photo sizes."""
    from vitok_core.budget import bucket_of
    from vitok_core.config import IngestConfig
    from vitok_core.ingest import storage_size

    rng = np.random.default_rng(seed)
    weights = np.array([w for _, _, w in ASPECTS])
    picks = rng.choice(len(ASPECTS), size=SIZES_DRAWN, p=weights / weights.sum())
    shorts = rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1, size=SIZES_DRAWN)
    cap = IngestConfig().store_max_pixels
    joint: Counter = Counter()
    for idx, short in zip(picks.tolist(), shorts.tolist(), strict=True):
        ratio = ASPECTS[idx][1]
        h, w = (short, round(short * ratio)) if ratio >= 1 else (round(short / ratio), short)
        w, h = storage_size(w, h, cap)
        key = tuple("{}x{}".format(*bucket_of(h, w, PATCH, t)) for t in BUDGETS)
        joint[key] += 1
    first = sorted({a for a, _ in joint})
    cond = {}
    for a in first:  # the rows of a file are sorted by their bucket at 1024 (as strings), as ingest-3 does
        later = sorted(b for x, b in joint if x == a)
        counts = np.array([joint[(a, b)] for b in later], dtype=np.float64)
        cond[a] = {"names": later, "p": (counts / counts.sum()).tolist()}
    share = {a: sum(joint[(x, b)] for x, b in joint if x == a) / SIZES_DRAWN for a in first}
    pairs = sorted(joint)
    return {
        "first": first,
        "share": share,
        "cond": cond,
        "pairs": [list(p) for p in pairs],
        "pair_p": [joint[p] / SIZES_DRAWN for p in pairs],
    }


def runs_of(counts: np.ndarray, rows_per_group: int = ROWS_PER_GROUP) -> dict[str, np.ndarray]:
    """The index runs of F files whose rows hold `counts[f, k]` rows of category k, in category order (how
    ingest-3 sorts a file), cut into row groups of `rows_per_group`: per run its file (0..F-1), row group, start,
    rows and category. The same runs as vitok_core.row_index.file_runs (checked in `check_runs`)."""
    counts = np.asarray(counts, dtype=np.int64)
    files, _ = counts.shape
    sizes = counts.sum(axis=1)
    stride = int(sizes.max()) + 1
    seg_file, seg_cat = np.nonzero(counts)  # row-major: by file, then category: ascending positions
    seg_pos = (np.cumsum(counts, axis=1) - counts)[seg_file, seg_cat]
    seg_key = seg_file * stride + seg_pos
    groups = -(-sizes // rows_per_group)
    group_file = np.repeat(np.arange(files), groups)
    group_pos = (np.arange(group_file.size) - np.repeat(np.cumsum(groups) - groups, groups)) * rows_per_group
    keys = np.unique(np.concatenate([seg_key, group_file * stride + group_pos]))
    run_file, run_pos = keys // stride, keys % stride
    ends = sizes[run_file].copy()
    same = run_file[1:] == run_file[:-1]
    ends[:-1][same] = run_pos[1:][same]
    cat = seg_cat[np.searchsorted(seg_key, keys, side="right") - 1]
    return {
        "file": run_file,
        "row_group": run_pos // rows_per_group,
        "start": run_pos % rows_per_group,
        "rows": ends - run_pos,
        "cat": cat,
    }


def check_runs(dist: dict[str, Any], seed: int = 1) -> int:
    """runs_of against the project's file_runs on files drawn from `dist`; returns the files checked."""
    from vitok_core.row_index import file_runs, group_sizes

    rng = np.random.default_rng(seed)
    checked = 0
    for first in dist["first"][:: max(1, len(dist["first"]) // 8)]:
        names, p = dist["cond"][first]["names"], dist["cond"][first]["p"]
        for size in (ROWS_PER_FILE, 1000, 257, 3):
            counts = rng.multinomial(size, p)[None, :]
            mine = runs_of(counts)
            later = np.repeat(np.array(names, dtype=object), counts[0]).tolist()
            ref = file_runs({"bucket_256": [first] * size, "bucket_1024": later}, group_sizes(size, ROWS_PER_GROUP))
            got = {
                "row_group": mine["row_group"].tolist(),
                "start": mine["start"].tolist(),
                "rows": mine["rows"].tolist(),
                "bucket_1024": [names[c] for c in mine["cat"].tolist()],
            }
            for key, values in got.items():
                if ref[key] != values:
                    raise AssertionError(f"runs_of differs from file_runs in {key} ({first}, {size} rows)")
            checked += 1
    return checked


def file_name(bucket: str, part: int) -> str:
    return f"data/bucket={bucket}/part-{part:05d}-000.parquet"


def synth_output(
    n_files: int, dist: dict[str, Any], seed: int, keep_rows: bool = False
) -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """(index table, per-bucket counts, per-file rows if `keep_rows`, for writing data files) of an output of
    `n_files` files of ROWS_PER_FILE rows, files dealt to first-budget buckets by their share (largest remainder)."""
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    first = dist["first"]
    quota = np.array([dist["share"][a] for a in first]) * n_files
    per = np.floor(quota).astype(np.int64)
    per[np.argsort(-(quota - per), kind="stable")[: n_files - int(per.sum())]] += 1
    names, file_col, rg, st, rows, b1, b2 = [], [], [], [], [], [], []
    per_bucket = {str(t): Counter() for t in BUDGETS}
    files_rows: dict[str, list] = {}
    offset = 0
    cat_names: list[str] = []
    for a, count in zip(first, per.tolist(), strict=True):
        if not count:
            continue
        later, p = dist["cond"][a]["names"], dist["cond"][a]["p"]
        counts = rng.multinomial(ROWS_PER_FILE, p, size=count)
        runs = runs_of(counts)
        base = len(cat_names)
        cat_names += later
        # sorted as the index sorts files (as strings: part-100000 comes before part-10001); the files' counts are
        # independent draws, so dealing them to the names in that order changes nothing else
        names += sorted(file_name(a, part) for part in range(count))
        file_col.append(runs["file"] + offset)
        rg.append(runs["row_group"])
        st.append(runs["start"])
        rows.append(runs["rows"])
        b1.append(np.full(runs["rows"].size, first.index(a), dtype=np.int64))
        b2.append(runs["cat"] + base)
        per_bucket["256"][a] += count * ROWS_PER_FILE
        for name, n in zip(later, counts.sum(axis=0).tolist(), strict=True):
            if n:
                per_bucket["1024"][name] += n
        if keep_rows:
            files_rows[a] = [(offset + i, counts[i], later) for i in range(count)]
        offset += count
    if names != sorted(names):
        raise AssertionError("synthetic file names are not in sorted order")
    from vitok_core.row_index import files_in_index_order

    # the index lists files in hash order; a file's runs stay in order
    by_hash = files_in_index_order(names)
    place = np.empty(len(names), dtype=np.int64)
    place[by_hash] = np.arange(len(names))
    order = pa.array(np.argsort(place[np.concatenate(file_col)], kind="stable"))
    cat = lambda parts: pa.array(np.concatenate(parts))  # noqa: E731
    table = pa.table(
        {
            "file": pa.array(names, pa.string()).take(cat(file_col)),
            "row_group": pa.array(np.concatenate(rg).astype(np.int32)),
            "start": pa.array(np.concatenate(st).astype(np.int32)),
            "rows": pa.array(np.concatenate(rows).astype(np.int32)),
            "bucket_256": pa.array(first, pa.string()).take(cat(b1)),
            "bucket_1024": pa.array(cat_names, pa.string()).take(cat(b2)),
        }
    ).take(order)
    counts = {t: {b: n for b, n in sorted(c.items())} for t, c in per_bucket.items()}
    return table, counts, {"names": names, "files": files_rows}


# ------------------------------------------------------------------------------------------------
# Setup on moto (straight, not through the proxy)
# ------------------------------------------------------------------------------------------------
class Moto:
    """moto's server in a process of its own (its CPU is then apart from the proxy's and the client's)."""

    def __init__(self) -> None:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.proc = subprocess.Popen(
            [sys.executable, "-c", MOTO, str(self.port)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        if self.proc.stdout.readline().strip() != "ready":
            raise RuntimeError("moto server did not start")
        self.url = f"http://127.0.0.1:{self.port}"
        self._local = threading.local()

    def cpu_s(self) -> float:
        fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def put(self, path: str, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        """An unsigned PUT (moto does not check signatures) on a connection kept per thread."""
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
        conn.request("PUT", path, body=body, headers=headers or {})
        response = conn.getresponse()
        response.read()
        if response.status != 200:
            raise RuntimeError(f"PUT {path}: {response.status}")

    def put_many(self, items: list[tuple[str, bytes]], threads: int) -> None:
        with ThreadPoolExecutor(max_workers=threads) as pool:
            for _ in pool.map(lambda item: self.put(*item), items):
                pass

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.proc.stdin.close()
            self.proc.wait(timeout=20)
        if self.proc.poll() is None:
            self.proc.kill()


def put_sources(moto: Moto, n: int, threads: int) -> dict[str, Any]:
    bucket = f"bench-scale-src-{n}"
    started = time.perf_counter()
    moto.put(f"/{bucket}")
    moto.put_many([(f"/{bucket}/shards/shard-{i:07d}.tar", b"\0" * 64) for i in range(n)], threads)
    return {"uri": f"s3://{bucket}/shards", "objects": n, "seconds": time.perf_counter() - started}


def put_parquet_sources(moto: Moto, n: int, threads: int) -> dict[str, Any]:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    bucket = f"bench-scale-pq-{n}"
    started = time.perf_counter()
    moto.put(f"/{bucket}")
    table = pa.table({"jpg": pa.array([b"\xff\xd8" + bytes(62)] * 4, pa.binary()), "caption": ["x"] * 4})
    sink = io.BytesIO()
    pq.write_table(table, sink)
    body = sink.getvalue()
    moto.put_many([(f"/{bucket}/parts/part-{i:05d}.parquet", body) for i in range(n)], threads)
    return {"uri": f"s3://{bucket}/parts", "objects": n, "seconds": time.perf_counter() - started}


def put_output(moto: Moto, n: int, dist: dict[str, Any], data_files: bool, threads: int) -> dict[str, Any]:
    """The ingest output of N files: index.parquet, manifest.json, _SUCCESS (and the data files if asked)."""
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    from vitok_core.row_index import write_index_file

    bucket = f"bench-scale-out-{n}"
    key = f"out-{n}"
    uri = f"s3://{bucket}/ingest/{key}"
    started = time.perf_counter()
    table, counts, files = synth_output(n, dist, seed=n, keep_rows=data_files)
    built = time.perf_counter()
    sink = io.BytesIO()  # written by ingest's own writer (aligned index row groups, the layout in the footer)
    layout = write_index_file(sink, table.schema, table.to_batches(max_chunksize=1 << 20))
    index_bytes = sink.getvalue()
    moto.put(f"/{bucket}")
    rows = n * ROWS_PER_FILE
    manifest = {
        "stage": "ingest",
        "key": key,
        "output": uri,
        "settings": {"budgets": list(BUDGETS), "patch_size": PATCH, "rows_per_file": ROWS_PER_FILE},
        "counts": {"read": rows, "accepted": rows, "rejected": 0, "rejected_by_reason": {}, "per_bucket": counts},
        "index": {"file": "index.parquet", "row_groups": n * ROWS_PER_FILE // ROWS_PER_GROUP, "runs": table.num_rows},
        "note": "synthetic (benchmarks/bench_scale.py)",
    }
    moto.put(f"/{bucket}/ingest/{key}/index.parquet", index_bytes)
    moto.put(f"/{bucket}/ingest/{key}/manifest.json", json.dumps(manifest).encode())
    moto.put(f"/{bucket}/ingest/{key}/_SUCCESS", b"")
    written = 0
    if data_files:

        def body(item: tuple[int, np.ndarray, list[str]], first: str) -> tuple[str, bytes]:
            index, counts_, later = item
            values = np.repeat(np.array(later, dtype=object), counts_).tolist()
            part = pa.table({"bucket_256": [first] * len(values), "bucket_1024": values})
            out = io.BytesIO()
            pq.write_table(part, out, row_group_size=ROWS_PER_GROUP)
            return f"/{bucket}/ingest/{key}/{files['names'][index]}", out.getvalue()

        items = [body(item, first) for first, entries in files["files"].items() for item in entries]
        moto.put_many(items, threads)
        written = len(items)
    return {
        "uri": uri,
        "files": n,
        "rows": rows,
        "row_groups": n * ROWS_PER_FILE // ROWS_PER_GROUP,
        "runs": table.num_rows,
        "index_row_groups": len(layout.group_runs),
        "index_bytes": len(index_bytes),
        "data_files_written": written,
        "build_s": built - started,
        "seconds": time.perf_counter() - started,
    }


# ------------------------------------------------------------------------------------------------
# Workers: one measurement in a fresh process
# ------------------------------------------------------------------------------------------------
def _status() -> dict[str, float]:
    """VmRSS and VmHWM (peak so far) of this process, MiB."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _config(overrides: list[str]) -> Any:
    from vitok_core.config import load_config

    return load_config("5b", overrides)  # budgets 256 and 1024, patch 16: the paper-scale settings


CLUSTER_CPUS = 960  # the paper-scale ingest cluster (docs/scaling.md): finish_plan's `cpus` in the driver sim


def worker_driver(p: dict[str, Any], phases: list[dict[str, Any]]) -> dict[str, Any]:
    """jobs.ingest.run's driver-side work, with the Ray workers' outputs synthesized (see the docstring): the
    same calls in the same order, each map's results handed to the driver as a stream, as map_tasks does."""
    from jobs.ingest import (
        absorb_written,
        count,
        done_tasks,
        finish_plan,
        ingest_settings,
        list_tasks,
        publish_plan,
        tally_results,
    )
    from vitok_core.artifacts import join, mark_success, remove, write_json
    from vitok_core.row_index import INDEX, IndexBuilder

    cfg = _config([f"ingest.source={p['source']}", f"ingest.root={p['root']}"])
    settings = ingest_settings(cfg)
    budgets = settings["budgets"]
    rows_per_file = settings["rows_per_file"]
    out = join(p["root"], "ingest", "driver")
    staging = join(out, "_staging")
    dist = p["dist"]
    rng = np.random.default_rng(p["seed"])
    clock = {"t": time.perf_counter(), "cpu": _cpu()}
    simulated = {"s": 0.0, "since_wall": 0.0, "since_cpu": 0.0}

    def phase(name: str) -> None:  # wall and CPU of the driver's own work: the stand-ins' time left out
        now, cpu = time.perf_counter(), _cpu()
        wall, used = now - clock["t"] - simulated["since_wall"], cpu - clock["cpu"] - simulated["since_cpu"]
        phases.append({"phase": name, "wall_s": wall, "cpu_s": used, **_status()})
        clock["t"], clock["cpu"] = time.perf_counter(), _cpu()
        simulated["since_wall"] = simulated["since_cpu"] = 0.0

    def simulate(results: Any) -> Any:  # the workers' results, made one at a time as the driver asks for them
        iterator = iter(results)
        while True:
            started, cpu = time.perf_counter(), _cpu()
            try:
                result = next(iterator)
            except StopIteration:
                return
            finally:
                spent = time.perf_counter() - started
                simulated["s"] += spent
                simulated["since_wall"] += spent
                simulated["since_cpu"] += _cpu() - cpu
            yield result

    kind, tasks = list_tasks(settings, cfg.io)
    phase("list_tasks")
    done = done_tasks(staging)
    for t in tasks:  # as run(): the listing's dicts are the rows handed to Ray Data
        t["done"] = t["task"] in done
    phase("done_tasks + rows for Ray Data")

    pairs, pair_p = dist["pairs"], np.array(dist["pair_p"])
    first_of = np.array([dist["first"].index(a) for a, _ in pairs])
    later_names = sorted({b for _, b in pairs})
    later_of = np.array([later_names.index(b) for _, b in pairs])
    n_tasks = len(tasks)

    def task_results() -> Any:  # ingest_task's results
        for lo in range(0, n_tasks, 1000):
            hi = min(n_tasks, lo + 1000)
            rejected = rng.binomial(ROWS_PER_FILE, REJECT_SHARE, size=hi - lo)
            draws = np.stack([rng.multinomial(ROWS_PER_FILE - r, pair_p) for r in rejected])
            for i, (row, rej) in enumerate(zip(draws, rejected.tolist(), strict=True)):
                nz = np.flatnonzero(row)
                b256 = np.bincount(first_of[nz], weights=row[nz], minlength=len(dist["first"]))
                b1024 = np.bincount(later_of[nz], weights=row[nz], minlength=len(later_names))
                summary = {
                    "read": ROWS_PER_FILE,
                    "accepted": ROWS_PER_FILE - rej,
                    "rejected_by_reason": {"too_small": rej} if rej else {},
                    "per_bucket": {
                        "256": {dist["first"][j]: int(b256[j]) for j in np.flatnonzero(b256)},
                        "1024": {later_names[j]: int(b1024[j]) for j in np.flatnonzero(b1024)},
                    },
                }
                yield {"task": lo + i, "done": False, "summary": json.dumps(summary)}

    tally = tally_results(simulate(task_results()), budgets)
    del tasks  # as run()
    phase("tally (summaries as they arrive)")
    remove(join(out, "data"))
    remove(join(out, "rejects"))
    remove(join(out, INDEX))
    plan, large = finish_plan(tally, budgets, rows_per_file, p.get("cpus", CLUSTER_CPUS))
    jobs = [{"job": json.dumps(j)} for j in plan]
    phase("remove + finish_plan")

    def files_index(bucket: str, part: int, n: int) -> dict[str, dict[str, list]]:  # a job's files' runs
        sizes = [min(rows_per_file, n - o) for o in range(0, n, rows_per_file)]
        later, p_ = dist["cond"][bucket]["names"], dist["cond"][bucket]["p"]
        runs = runs_of(np.stack([rng.multinomial(s, p_) for s in sizes]))
        index = {}
        for k in range(len(sizes)):
            sel = runs["file"] == k
            cats = runs["cat"][sel].tolist()
            index[f"data/bucket={bucket}/part-{part:05d}-{k:03d}.parquet"] = {
                "row_group": runs["row_group"][sel].tolist(),
                "start": runs["start"][sel].tolist(),
                "rows": runs["rows"][sel].tolist(),
                "bucket_256": [bucket] * len(cats),
                "bucket_1024": [later[c] for c in cats],
            }
        return index

    def rejected_rows(job_tasks: list[int]) -> int:
        tasks_, rows_ = tally.rejected()
        return int(rows_[np.isin(tasks_, job_tasks)].sum())

    def finish_results(jobs: list[dict[str, str]]) -> Any:  # finish_task's results (no duplicates)
        by_bucket = tally.by_bucket()
        for entry in jobs:
            job = json.loads(entry["job"])
            if job["kind"] == "dedup":
                dedup = {"bucket": job["bucket"], "duplicates": 0, "file": ""}
                dedup["per_bucket"] = {"256": {}, "1024": {}}
                result = {"kind": "dedup", "rows": 0, "index": "", "duplicates": [dedup]}
            elif job["kind"] == "rejects":
                result = {"kind": "rejects", "rows": rejected_rows(job["tasks"]), "index": "", "duplicates": []}
            else:
                index, rows = {}, 0
                for bucket in job["buckets"]:
                    n = int(by_bucket[bucket][1].sum())
                    index.update(files_index(bucket, 0, n))
                    rows += n
                result = {"kind": "data", "rows": rows, "index": json.dumps(index), "duplicates": []}
            yield {"result": json.dumps(result)}

    index = IndexBuilder([f"bucket_{t}" for t in budgets])
    rows_written, duplicates = absorb_written(simulate(finish_results(jobs)), index)
    counts = count(tally, duplicates, budgets)
    phase("finish: index.add + count")
    jobs = [{"job": json.dumps(j)} for j in publish_plan(tally, duplicates, budgets, rows_per_file, large)]
    publish_jobs = len(jobs)
    phase("publish_plan")

    def publish_results(jobs: list[dict[str, str]]) -> Any:  # publish_part's results
        by_bucket = tally.by_bucket()
        for entry in jobs:
            job = json.loads(entry["job"])
            tasks_, rows_ = by_bucket[job["bucket"]]
            at = int(np.searchsorted(tasks_, job["tasks"][0]))
            n = int(rows_[at : at + len(job["tasks"])].sum())
            yield {"kind": "data", "rows": n, "index": json.dumps(files_index(job["bucket"], job["part"], n))}

    rows_written += absorb_written(simulate(publish_results(jobs)), index)[0]
    del jobs
    if rows_written != counts["accepted"]:
        raise RuntimeError(f"driver sim: {rows_written} rows written, {counts['accepted']} accepted")
    phase("publish: index.add")
    index.write(out)
    manifest = {
        "stage": "ingest",
        "settings": settings,
        "counts": counts,
        "index": {"file": INDEX, "row_groups": index.row_groups, "runs": index.runs},
    }
    write_json(join(out, "manifest.json"), manifest)
    mark_success(out)
    phase("index.write + manifest")
    held = (tally, plan, duplicates, index, counts)  # what run() still holds at its end
    return {
        "kind": kind,
        "tasks": tally.tasks,
        "images": tally.read,
        "finish_jobs": len(plan),
        "publish_jobs": publish_jobs,
        "files": index.files,
        "runs": index.runs,
        "simulated_s": simulated["s"],
        "held": len(held),
    }


def calibrate(p: dict[str, Any]) -> dict[str, Any]:
    """ms per sequential GET of a 4 KiB object on one kept-alive connection, to each endpoint in p["urls"]."""
    out = {}
    for label, url in p["urls"].items():
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        conn = http.client.HTTPConnection(host, int(port), timeout=60)
        times = []
        for i in range(p["gets"] + 1):
            started = time.perf_counter()
            conn.request("GET", p["path"])
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise RuntimeError(f"calibration GET {url}{p['path']}: {response.status}")
            if i:  # the first opens the connection
                times.append((time.perf_counter() - started) * 1000)
        conn.close()
        out[label] = {"median_ms": float(np.median(times)), "mean_ms": float(np.mean(times)), "gets": len(times)}
    return out


def worker_run(kind: str, p: dict[str, Any]) -> dict[str, Any]:
    """One measurement; returns its numbers (wall and CPU of the measured calls, peak RSS, phases)."""
    import importlib

    if kind == "calibrate":
        return calibrate(p)
    for module in IMPORTS[p["imports"]]:
        importlib.import_module(module)
    after_imports = _status()
    phases: list[dict[str, Any]] = []
    info: dict[str, Any] = {}
    cpu0, t0 = _cpu(), time.perf_counter()
    if kind == "noop":
        pass
    elif kind in ("loader", "loader_resume"):
        from vitok_core.loader import Position, ShardIndex, batch_plan

        index = ShardIndex.build(p["uri"], p["budget"], p["rank"], p["world"])
        start = Position(0, index.blocks // 2, 10) if kind == "loader_resume" else Position()
        position, shard, _ = next(batch_plan(index, MICRO_BATCH, 0, WINDOW, start))  # what precedes batch 1
        info = {"blocks": index.blocks, "block": position.block, "units": len(shard.units), "rows": shard.rows}
        info.update(buckets=len(index.bucket_sizes()))
    elif kind == "loader_footers":
        from vitok_core.ingest_output import IngestOutput
        from vitok_core.loader import Shard
        from vitok_core.row_index import in_index_order, resolve

        filesystem, files = IngestOutput(p["uri"]).data_files()
        files = in_index_order(files, resolve(p["uri"], None)[1])
        index = Shard.from_files(filesystem, files, f"bucket_{p['budget']}", p["rank"], p["world"])
        info = {"units": len(index.units), "rows": index.rows, "buckets": len(index.buckets), "files": len(files)}
    elif kind in ("ingest_list", "ingest_list_parquet"):
        from jobs.ingest import ingest_settings, list_tasks

        cfg = _config([f"ingest.source={p['source']}"])
        found, tasks = list_tasks(ingest_settings(cfg), cfg.io)
        info = {"kind": found, "tasks": len(tasks)}
    elif kind == "ingest_driver":
        info = worker_driver(p, phases)
    elif kind == "cache_plan":
        from jobs.cache_latents import done_files
        from vitok_core.ingest_output import IngestOutput

        uris = IngestOutput(p["uri"]).data_uris()
        done = done_files(p["cache_out"])
        todo = [{"index": i, "path": uri} for i, uri in enumerate(uris) if i not in done]
        info = {"files": len(uris), "todo": len(todo)}
    elif kind == "evaluate_plan":
        from jobs.evaluate import list_images

        cfg = _config([f"evaluate.data={p['uri']}", f"evaluate.max_images={p['max_images']}"])
        described, tasks = list_images(cfg)
        info = {"images": described["images"], "tasks": len(tasks)}
    else:
        raise ValueError(f"unknown worker {kind}")
    wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    peak_mib = _status()["VmHWM"]  # this process's own peak (see the docstring: not ru_maxrss)
    ru_maxrss_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    result = {"wall_s": wall, "cpu_s": cpu, "peak_mib": peak_mib, "ru_maxrss_mib": ru_maxrss_mib}
    result.update(after_imports=after_imports, info=info)
    result["phases"] = phases
    if kind == "loader_footers":  # the footer path must give what the index gives (not timed)
        from vitok_core.loader import ShardIndex

        ref = ShardIndex.build(p["uri"], p["budget"], p["rank"], p["world"]).whole()
        same = (
            np.array_equal(ref.units, index.units)
            and np.array_equal(ref.unit_start, index.unit_start)
            and np.array_equal(np.array(ref.buckets)[ref.bucket_codes], np.array(index.buckets)[index.bucket_codes])
            and [f.rsplit("/", 3)[-3:] for f in ref.files] == [f.rsplit("/", 3)[-3:] for f in files]
        )
        result["equal_to_index"] = bool(same)
    return result


# ------------------------------------------------------------------------------------------------
# The parent: setup, measurements, fits
# ------------------------------------------------------------------------------------------------
class Runner:
    def __init__(self, moto: Moto, proxy: Any, log: Any) -> None:
        self.moto, self.proxy, self.log = moto, proxy, log
        self.env = {
            **os.environ,
            "AWS_ACCESS_KEY_ID": "testing",
            "AWS_SECRET_ACCESS_KEY": "testing",
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true",
        }
        self.baseline: dict[str, float] = {}
        self.rows: list[dict[str, Any]] = []

    def run(
        self, name: str, kind: str, n: int, params: dict[str, Any], direct: bool = False, keep: bool = True
    ) -> dict[str, Any]:
        env = {**self.env, "AWS_ENDPOINT_URL": self.moto.url if direct else self.proxy.url}
        before = self.proxy.stats()
        moto_cpu, own_cpu, load = self.moto.cpu_s(), _cpu(), os.getloadavg()[0]
        started = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", kind, "--params", json.dumps(params)],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        elapsed = time.perf_counter() - started
        after = self.proxy.stats()
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"{name} (N={n}) failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}")
        result = json.loads(lines[-1][len("RESULT ") :])
        row = {
            "name": name,
            "kind": kind,
            "n": n,
            "direct": direct,
            **{k: result[k] for k in ("wall_s", "cpu_s", "peak_mib", "ru_maxrss_mib", "info", "phases")},
            "after_imports_mib": result["after_imports"],
            "baseline_mib": self.baseline.get(params["imports"]),
            "peak_over_baseline_mib": (
                result["peak_mib"] - self.baseline[params["imports"]] if params["imports"] in self.baseline else None
            ),
            "requests": after["requests"] - before["requests"],
            "requests_by_method": {
                m: c - before["by_method"].get(m, 0)
                for m, c in after["by_method"].items()
                if c - before["by_method"].get(m, 0)
            },
            "faults": after["faults_total"] - before["faults_total"],
            "moto_cpu_s": self.moto.cpu_s() - moto_cpu,
            "proxy_cpu_s": _cpu() - own_cpu,
            "process_s": elapsed,
            "loadavg_1m": round(load, 2),
        }
        if "equal_to_index" in result:
            row["equal_to_index"] = result["equal_to_index"]
        if kind != "noop" and keep:
            self.keep(row)
        return row

    def calibrate(self, urls: dict[str, str]) -> dict[str, Any]:
        """Round trip per request to each of `urls` (the client in its own process, one after the other)."""
        self.moto.put("/bench-scale-cal")
        self.moto.put("/bench-scale-cal/object", b"\0" * 4096, {"x-amz-acl": "public-read"})  # unsigned GETs
        params = {"urls": urls, "path": "/bench-scale-cal/object", "gets": 40}
        proc = subprocess.run(
            [sys.executable, __file__, "--worker", "calibrate", "--params", json.dumps(params)],
            env=self.env,
            cwd=REPO,
            capture_output=True,
            text=True,
        )
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise RuntimeError(f"calibration failed:\n{proc.stderr[-3000:]}")
        return json.loads(lines[-1][len("RESULT ") :])

    def repeat(self, times: int, name: str, kind: str, n: int, params: dict[str, Any]) -> dict[str, Any]:
        """`run` `times` times; one row: the fastest run's numbers, the largest peak, every run in `runs`."""
        done = [self.run(name, kind, n, params, keep=False) for _ in range(max(1, times))]
        best = dict(min(done, key=lambda r: r["wall_s"]))
        best["peak_over_baseline_mib"] = max(r["peak_over_baseline_mib"] for r in done)
        best["peak_mib"] = max(r["peak_mib"] for r in done)
        best["runs"] = [{k: r[k] for k in ("wall_s", "cpu_s", "peak_mib", "requests", "loadavg_1m")} for r in done]
        self.keep(best)
        return best

    def keep(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        extra = f" (equal to the index's: {row['equal_to_index']})" if "equal_to_index" in row else ""
        walls = "/".join(f"{r['wall_s']:.2f}" for r in row.get("runs", [row]))
        self.log(
            f"  {row['name']:38s} N={row['n']:>7,}  {walls:>12s} s  {row['requests']:>6} req  "
            f"peak +{row['peak_over_baseline_mib']:7.1f} MiB  {json.dumps(row['info'])}{extra}"
        )

    def baselines(self) -> dict[str, Any]:
        out = {}
        for imports in IMPORTS:
            peaks = [self.run("noop", "noop", 0, {"imports": imports})["peak_mib"] for _ in range(2)]
            self.baseline[imports] = float(np.mean(peaks))
            out[imports] = {"peaks_mib": peaks, "mean_mib": self.baseline[imports]}
            self.log(f"  baseline ({imports}: {', '.join(IMPORTS[imports])}): VmHWM {peaks} MiB")
        return out


def fit(ns: list[int], ys: list[float], target: int = TARGET_FILES) -> dict[str, Any]:
    """Least squares of y = a + b N and y = a + b ln N; the better by RMS relative residual; both at `target`."""
    x = np.asarray(ns, dtype=np.float64)
    y = np.asarray(ys, dtype=np.float64)
    out: dict[str, Any] = {}
    for name, feature in (("linear", x), ("log", np.log(x))):
        design = np.stack([np.ones_like(x), feature], axis=1)
        (a, b), *_ = np.linalg.lstsq(design, y, rcond=None)
        predicted = a + b * feature
        rel = (predicted - y) / np.where(np.abs(y) > 1e-12, np.abs(y), 1.0)
        at = a + b * (target if name == "linear" else math.log(target))
        out[name] = {"a": float(a), "b": float(b), "rms_rel_residual": float(np.sqrt(np.mean(rel**2))), "at": float(at)}
    out["better"] = min(("linear", "log"), key=lambda k: out[k]["rms_rel_residual"])
    out["target"] = target
    return out


def git_state() -> dict[str, Any]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.rstrip()

    dirty = git("status", "--porcelain", "--", *MEASURED_MODULES).splitlines()
    return {
        "head": git("rev-parse", "--short", "HEAD"),
        "measured_modules_uncommitted": [line[3:] for line in dirty],
        "measured_modules_sha256": {
            m: hashlib.sha256((REPO / m).read_bytes()).hexdigest()[:12] for m in MEASURED_MODULES if (REPO / m).exists()
        },
    }


def fmt(x: float | None, digits: int = 2) -> str:
    if x is None:
        return "-"
    return f"{x:,.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="N = 1k and 10k only, no check at 976,563 files")
    parser.add_argument("--sizes", type=int, nargs="+", help="N to measure (default 1000 10000 100000)")
    parser.add_argument("--latency-ms", type=float, default=20.0)
    parser.add_argument("--rank", type=int, default=3)
    parser.add_argument("--world", type=int, default=8)
    parser.add_argument("--footer-sizes", type=int, nargs="*", default=[1000], help="N with the old footer path")
    parser.add_argument("--all-max", type=int, default=10_000, help="largest N for evaluate at max_images=0")
    parser.add_argument("--no-check", action="store_true", help="skip the measured check at 976,563 files")
    parser.add_argument("--put-threads", type=int, default=8)
    parser.add_argument("--repeat", type=int, default=2, help="runs of each index-only measurement")
    parser.add_argument(
        "--direct-max", type=int, default=10_000, help="largest N for list_tasks straight to moto (moto's share)"
    )
    parser.add_argument(
        "--only",
        choices=["ingest_driver", "readers"],
        help="measure only this (ingest_driver: the driver rows and fits; no output index, no check at 976,563; "
        "readers: the loader, cache_latents and evaluate planning, with the check)",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--params", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_run(args.worker, json.loads(args.params))
        print("RESULT " + json.dumps(result), flush=True)
        return

    from tests.s3_proxy import S3FaultProxy

    sizes = args.sizes or ([1000, 10_000] if args.quick else [1000, 10_000, 100_000])
    check = not (args.quick or args.no_check or args.only == "ingest_driver")
    everything = args.only != "ingest_driver"  # the readers' rows
    drivers = args.only != "readers"  # ingest's planning rows
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    begun = time.perf_counter()
    env_info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "cpu": cpu_model(),
        "cores": cores,
        "python": platform.python_version(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
        "git": git_state(),
    }
    settings = {
        "sizes": sizes,
        "latency_ms": args.latency_ms,
        "rank": args.rank,
        "world": args.world,
        "budgets": list(BUDGETS),
        "rows_per_file": ROWS_PER_FILE,
        "rows_per_group": ROWS_PER_GROUP,
        "footer_sizes": args.footer_sizes,
        "all_max": args.all_max,
        "check_at": TARGET_FILES if check else None,
        "put_threads": args.put_threads,
        "repeat": args.repeat,
        "direct_max": args.direct_max,
        "only": args.only,
    }

    def log(message: str) -> None:
        print(message, flush=True)

    log(f"ViTok scale benchmark  {env_info['date']}")
    log(f"cpu: {env_info['cpu']}  cores: {cores}  load average {env_info['loadavg_start']}")
    git = env_info["git"]
    log(f"git {git['head']}; measured modules uncommitted: {git['measured_modules_uncommitted']}")
    dist = joint_buckets()
    pairs_per_first = {a: len(dist["cond"][a]["names"]) for a in dist["first"]}
    log(
        f"buckets: {len(dist['first'])} at 256, {len({b for _, b in dist['pairs']})} at 1024, "
        f"{len(dist['pairs'])} pairs; runs_of == file_runs on {check_runs(dist)} files"
    )
    moto = Moto()
    proxy = S3FaultProxy(
        moto.url, latency_s=args.latency_ms / 1000, max_requests=10**12, max_lifetime_s=6 * 3600
    ).start()
    runner = Runner(moto, proxy, log)
    setup: dict[str, Any] = {}
    try:
        calibration = runner.calibrate({"straight to moto": moto.url, "proxy": proxy.url})
        log(
            "round trip per request, sequential 4 KiB GETs: "
            + "; ".join(f"{k} {v['median_ms']:.1f} ms" for k, v in calibration.items())
        )
        log("baselines (idle processes with the same imports):")
        baselines = runner.baselines()
        measured_n = sorted(set(sizes) | ({TARGET_FILES} if check else set()))
        for n in measured_n:
            in_fit = n in sizes
            log(f"N = {n:,} data files ({n * ROWS_PER_FILE:,} rows){'' if in_fit else ': check, not in the fit'}")
            s: dict[str, Any] = {}
            if everything:
                s["output"] = put_output(moto, n, dist, n in args.footer_sizes, args.put_threads)
                o = s["output"]
                log(
                    f"  setup: index of {o['runs']:,} runs ({o['index_bytes'] / 2**10:,.0f} KiB) "
                    f"in {o['seconds']:.1f} s"
                    + (f", with {o['data_files_written']:,} data files" if o["data_files_written"] else "")
                )
            if in_fit and drivers:
                s["source"] = put_sources(moto, n, args.put_threads)
                log(
                    f"  setup: {n:,} source objects PUT in {s['source']['seconds']:.1f} s "
                    f"({n / s['source']['seconds']:.0f}/s)"
                )
            if n == 1000 and everything and drivers:
                s["parquet_source"] = put_parquet_sources(moto, n, args.put_threads)
            setup[str(n)] = s
            if in_fit and drivers:
                source = s["source"]["uri"]
                p = {
                    "imports": "driver",
                    "source": source,
                    "root": f"s3://bench-scale-out-{n}/driver",
                    "seed": n,
                    "dist": dist,
                }
                runner.run("ingest driver (list_tasks + after the map)", "ingest_driver", n, p)
            if not everything:
                continue
            uri = o["uri"]
            common = {"imports": "readers", "rank": args.rank, "world": args.world}
            r = args.repeat
            for budget in BUDGETS:
                runner.repeat(
                    r, f"loader start-up, budget {budget}", "loader", n, {**common, "uri": uri, "budget": budget}
                )
            runner.repeat(
                r, "loader resume mid-epoch, budget 256", "loader_resume", n, {**common, "uri": uri, "budget": 256}
            )
            if n in args.footer_sizes:
                runner.run(
                    "loader, footer path (before ingest-3)", "loader_footers", n, {**common, "uri": uri, "budget": 256}
                )
            runner.repeat(
                r,
                "cache_latents planning",
                "cache_plan",
                n,
                {**common, "uri": uri, "cache_out": f"s3://bench-scale-out-{n}/cache_latents/fresh"},
            )
            runner.repeat(
                r,
                "evaluate planning, max_images 50000",
                "evaluate_plan",
                n,
                {**common, "uri": uri, "max_images": 50_000},
            )
            if n <= args.all_max:
                runner.run(
                    "evaluate planning, max_images 0 (all)", "evaluate_plan", n, {**common, "uri": uri, "max_images": 0}
                )
            if in_fit and drivers and n <= args.direct_max:
                runner.run(
                    "ingest list_tasks, straight to moto",
                    "ingest_list",
                    n,
                    {"imports": "driver", "source": s["source"]["uri"]},
                    direct=True,
                )
            if n == 1000 and drivers:
                runner.run(
                    "ingest list_tasks, Parquet source",
                    "ingest_list_parquet",
                    n,
                    {"imports": "driver", "source": s["parquet_source"]["uri"]},
                )
    except BaseException:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        partial = {"partial": True, "environment": env_info, "settings": settings, "measurements": runner.rows}
        RESULTS.with_suffix(".partial.json").write_text(json.dumps(partial, indent=2, default=str))
        print(f"failed; what was measured is in {RESULTS.with_suffix('.partial.json').relative_to(REPO)}", flush=True)
        raise
    finally:
        proxy_stats = proxy.stats()
        proxy.stop()
        moto.close()
    env_info["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    env_info["run_s"] = time.perf_counter() - begun
    settings["calibration"] = calibration
    results = RESULTS if not args.only else RESULTS.with_name(f"bench_scale_{args.only}.json")
    report(runner, setup, baselines, settings, env_info, sizes, pairs_per_first, proxy_stats, dist, results)


def _driver_phase(row: dict[str, Any], name: str) -> dict[str, Any]:
    return next(ph for ph in row["phases"] if ph["phase"] == name)


def _info(info: dict[str, Any]) -> str:
    return ", ".join(
        f"{k} {v:,}" if isinstance(v, int) else f"{k} {v}" for k, v in info.items() if k not in ("held", "simulated_s")
    )


def report(
    runner: Runner,
    setup: dict[str, Any],
    baselines: dict[str, Any],
    settings: dict[str, Any],
    env_info: dict[str, Any],
    sizes: list[int],
    pairs_per_first: dict[str, int],
    proxy_stats: dict[str, Any],
    dist: dict[str, Any],
    results: Path = RESULTS,
) -> None:
    rows = runner.rows
    latency_s = settings["latency_ms"] / 1000
    print()
    print(
        f"Measurements ({settings['latency_ms']:.0f} ms per request through the proxy unless 'straight to moto'; "
        f"rank {settings['rank']} of {settings['world']}; peak = VmHWM minus the idle baseline)"
    )
    headers = ["measurement", "N files", "wall s", "client CPU s", "requests", "moto CPU s", "peak MiB", "load 1m"]
    table = [
        (
            r["name"],
            f"{r['n']:,}",
            fmt(r["wall_s"]),
            fmt(r["cpu_s"]),
            r["requests"],
            fmt(r["moto_cpu_s"]),
            fmt(r["peak_over_baseline_mib"], 1),
            r["loadavg_1m"],
            _info(r["info"]),
        )
        for r in rows
    ]
    print(format_table([*headers, "what it planned"], table))

    driver_rows = sorted((r for r in rows if r["kind"] == "ingest_driver"), key=lambda r: r["n"])
    phase_names = [ph["phase"] for ph in driver_rows[0]["phases"]] if driver_rows else []
    if driver_rows:
        print()
        print(
            "Ingest driver by phase (MiB over the idle baseline: held after the phase / peak so far; "
            "wall s of the phase)"
        )
        lines = []
        for name in phase_names:
            cells = [name]
            for r in driver_rows:
                ph, base = _driver_phase(r, name), r["baseline_mib"]
                cells.append(f"{ph['VmRSS'] - base:,.0f} / {ph['VmHWM'] - base:,.0f} ({ph['wall_s']:.2f} s)")
            lines.append(cells)
        print(format_table(["phase", *(f"N = {r['n']:,}" for r in driver_rows)], lines))
        sims = ", ".join(f"N = {r['n']:,}: {r['info']['simulated_s']:.1f} s" for r in driver_rows)
        print(f"(building the stand-in worker outputs, not driver work, not in the phases: {sims})")

    # ---- fits
    def series(name: str, key: str) -> tuple[list[int], list[float]]:
        pts = sorted((r["n"], r[key]) for r in rows if r["name"] == name and r["n"] in sizes and not r["direct"])
        return [n for n, _ in pts], [y for _, y in pts]

    def checked(name: str, key: str) -> float | None:
        return next((r[key] for r in rows if r["name"] == name and r["n"] == TARGET_FILES), None)

    quantities: list[dict[str, Any]] = []

    def add(label: str, ns: list[int], ys: list[float], measured: float | None = None, **extra: Any) -> None:
        if len(set(ns)) >= 2:
            quantities.append(
                {"quantity": label, "ns": ns, "ys": ys, "fit": fit(ns, ys), "measured_at_target": measured}
            )
            quantities[-1].update(extra)

    readers = ("loader", "loader_resume", "cache_plan", "evaluate_plan")
    for name in dict.fromkeys(r["name"] for r in rows if r["kind"] in readers):
        for key, unit in (("wall_s", "s"), ("peak_over_baseline_mib", "MiB")):
            add(f"{name}: {unit}", *series(name, key), checked(name, key), name=name, key=key)
    fitted = [r for r in driver_rows if r["n"] in sizes]
    if fitted:
        ns = [r["n"] for r in fitted]
        add("ingest list_tasks (through moto): wall s", ns, [_driver_phase(r, "list_tasks")["wall_s"] for r in fitted])
        add("ingest list_tasks: client CPU s", ns, [_driver_phase(r, "list_tasks")["cpu_s"] for r in fitted])
        add("ingest driver: requests (all phases)", ns, [float(r["requests"]) for r in fitted])
        peaks = [r["peak_over_baseline_mib"] for r in fitted]
        add("ingest driver: peak MiB", ns, peaks, name="driver_peak")
    print()
    print(
        f"Fits on N = {', '.join(f'{n:,}' for n in sizes)}: y = a + b N and y = a + b ln N (least squares); "
        f"'better' by the RMS of relative residuals; extrapolated to N = {TARGET_FILES:,} files "
        f"({TARGET_FILES * ROWS_PER_FILE / 1e9:.1f}B rows); 'measured there' is the check at that N"
    )
    lines = []
    for q in quantities:
        f = q["fit"]
        lines.append(
            (
                q["quantity"],
                " / ".join(fmt(y, 2) for y in q["ys"]),
                f"{f['linear']['a']:.3g} + {f['linear']['b']:.3g} N ({f['linear']['rms_rel_residual']:.0%})",
                f"{f['log']['a']:.3g} + {f['log']['b']:.3g} ln N ({f['log']['rms_rel_residual']:.0%})",
                f["better"],
                fmt(f["linear"]["at"], 1),
                fmt(f["log"]["at"], 1),
                fmt(q["measured_at_target"], 1),
            )
        )
    at = f"at {TARGET_FILES:,}"
    fit_headers = ["quantity", "measured", "linear (rms rel. resid.)", "log (rms rel. resid.)", "better"]
    print(format_table([*fit_headers, f"linear {at}", f"log {at}", "measured there"], lines))

    components = []
    if fitted:
        print()
        print(
            f"Ingest driver memory by what it holds (MiB added to what is held by each phase; linear fit, "
            f"extrapolated to {TARGET_FILES:,} tasks = 2.0B images read; per task at the largest N)"
        )
        ns = [r["n"] for r in fitted]
        previous = [0.0] * len(fitted)
        lines = []
        for name in phase_names:
            held = [_driver_phase(r, name)["VmRSS"] - r["baseline_mib"] for r in fitted]
            added = [h - p for h, p in zip(held, previous, strict=True)]
            previous = held
            f = fit(ns, added)
            per_task = added[-1] * 2**20 / ns[-1]
            components.append({"phase": name, "added_mib": added, "fit": f, "bytes_per_task": per_task})
            lines.append(
                (name, " / ".join(f"{a:,.0f}" for a in added), f"{per_task:,.0f}", f"{f['linear']['at']:,.0f}")
            )
        print(format_table(["phase", "added MiB", "bytes per task", f"MiB {at}"], lines))

    # ---- goals and estimates
    print()
    goals = []
    for budget in BUDGETS:
        q = next((q for q in quantities if q["quantity"] == f"loader start-up, budget {budget}: s"), None)
        if q:
            f, measured = q["fit"], q["measured_at_target"]
            worst = max(f["linear"]["at"], f["log"]["at"], measured or 0.0)
            goals.append(
                f"loader start-up per rank, budget {budget}, {TARGET_FILES:,} files: extrapolated "
                f"{f['linear']['at']:.1f} s (linear) / {f['log']['at']:.1f} s (log)"
                + (f", measured {measured:.1f} s" if measured is not None else "")
                + f"; goal <= 60 s: {'met' if worst <= 60 else 'NOT met'}; the {f['better']} fit is the closer one"
            )
    q = next((q for q in quantities if q.get("name") == "driver_peak"), None)
    if q:
        gb = q["fit"]["linear"]["at"] * 2**20 / 1e9
        goals.append(
            f"ingest driver peak memory, 2.0B images ({TARGET_FILES:,} tasks of {ROWS_PER_FILE} images): "
            f"linear {gb:.1f} GB; goal <= 4 GB: {'met' if gb <= 4 else 'NOT met'} (Ray's own driver state not in it)"
        )
    cpu = next((q for q in quantities if q["quantity"] == "ingest list_tasks: client CPU s"), None)
    req = next((q for q in quantities if q["quantity"] == "ingest driver: requests (all phases)"), None)
    estimates: dict[str, Any] = {}
    if cpu and req:
        est = cpu["fit"]["linear"]["at"] + req["fit"]["linear"]["at"] * latency_s
        estimates["list_tasks_s3_s"] = est
        goals.append(
            f"ingest list_tasks on S3 at {TARGET_FILES:,} shards, from measured components (moto's own listing cost "
            f"left out): client CPU {cpu['fit']['linear']['at']:.0f} s + {req['fit']['linear']['at']:,.0f} requests "
            f"x {settings['latency_ms']:.0f} ms = {est:.0f} s"
        )
    for kind, label in (("loader_footers", "loader, footer path"), ("ingest_list_parquet", "list_tasks, Parquet")):
        for r in (r for r in rows if r["kind"] == kind):
            scaled = r["wall_s"] * TARGET_FILES / r["n"]
            estimates[f"{kind}_{r['n']}"] = scaled
            goals.append(
                f"{label}: {r['wall_s']:.1f} s and {r['requests']:,} requests at N = {r['n']:,}; its requests are "
                f"per file, so x {TARGET_FILES / r['n']:,.0f} at {TARGET_FILES:,} files: {scaled / 3600:.1f} h"
            )
    for line in goals:
        print(line)
    s_lines = []
    for n, s in setup.items():
        parts = [f"index {s['output']['seconds']:.1f} s"] if "output" in s else []
        if "source" in s:
            parts.append(f"{int(n):,} source PUTs {s['source']['seconds']:.1f} s")
        s_lines.append(f"N = {int(n):,}: " + ", ".join(parts))
    print("setup: " + "; ".join(s_lines))
    print(
        f"load average {env_info['loadavg_start']} -> {env_info['loadavg_end']}; run {env_info['run_s']:.0f} s; "
        f"proxy: {proxy_stats['requests']:,} requests, {proxy_stats['faults_total']} faults"
    )
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(
        json.dumps(
            {
                "environment": env_info,
                "settings": settings,
                "baselines": baselines,
                "buckets": {"first": len(dist["first"]), "pairs": len(dist["pairs"]), "per_first": pairs_per_first},
                "setup": setup,
                "measurements": rows,
                "fits": quantities,
                "driver_components": components,
                "estimates": estimates,
                "goals": goals,
                "proxy": {k: v for k, v in proxy_stats.items() if k != "fault_log"},
            },
            indent=2,
            default=str,
        )
    )
    print(f"results: {results.relative_to(REPO)}")


if __name__ == "__main__":
    main()
