"""CPU benchmark of the ingest stage: the Ray Data job (`jobs.ingest.run`) against a bare single-core loop.

Run from the repository root:

    .venv/bin/python benchmarks/bench_ingest.py             # 2 x 2000 images + the 1-CPU row: 6-8 minutes
    .venv/bin/python benchmarks/bench_ingest.py --quick     # 2 x 300 images, about 2 minutes
    .venv/bin/python benchmarks/bench_ingest.py --n 5000 --repeats 3
    .venv/bin/python benchmarks/bench_ingest.py --equal-only --equal-repeats 5 --quiet-wait 120
                                                            # only the equal-resources row (web mix, 1 CPU)

Generating the images the first time adds about 1 minute per 1000 high-resolution images (2 processes).

Images. Two sets of JPEGs (quality 90, Pillow defaults: 4:2:0, no EXIF) are generated once and cached under
.data/bench_ingest/<mix>/images/ (git-ignored). Every image is a random crop of one of the real colour photos
that ship in the installed scikit-image wheel (astronaut, coffee, chelsea, rocket, and motorcycle_left,
hubble_deep_field, retina when present; skimage itself is not imported), resized with Lanczos to a drawn
size: an aspect ratio from common photo ratios (weighted; 3:2 and 4:3 most common, up to 3:1) and a long side
  (a) web: 256-1024 px, density rising towards 1024 (~0.4 MP mean), like a web crawl capped at 1024 px;
  (b) highres: 1000-4000 px, uniform (~5 MP mean), like camera output.
Image i of a mix depends only on (seed, mix, i), so a cache made for another count is trimmed or extended;
another seed or recipe regenerates it. The sources are at most 1411 px, so the high-resolution images are
up-scaled and smoother than camera photos (fewer bits per pixel, so cheaper to entropy-decode): the output
prints bits per pixel.

What is measured, per mix (everything printed is measured in this run, nothing is hard-coded):
  bare loop   one Python process pinned to one core: read each file's bytes, `process_image(data, rules)`
              with the IngestRules the job derives from the same config (`ingest_settings` + `rules_from`),
              the job's own record dicts, and one Parquet file per 256 images (pyarrow, written to a local
              path with the job's writer options: bare_parquet_options), like the staging files. img/s =
              n / wall seconds of that loop. Untimed before it, as the job gets its warm-up
              job: every file is read once (page cache) and the first WARM_N images are processed and
              written (imports, Pillow's plugins, pyarrow's writer).
  2 bare      the same loop in two pinned processes at once, each on half of the images (context only:
              what two busy processes get from this machine's two vCPUs).
  Ray job     `jobs.ingest.run(cfg)` (config `tiny` + ingest.source/root/files_per_task overrides, default
              store_max_pixels) on a local Ray started once with ray.init(num_cpus=2, include_dashboard=False)
              before any timing and reused, after one untimed warm-up job, on a fresh output root per run.
              img/s = n / wall seconds of run(); per core = that / 2 (the CPUs given to Ray). The
              'process' phase (manifest timing_s.process: the parallel map writing staging files) is also
              reported alone, with the manifest's times of the other steps (list, dedup, publish).
              files_per_task is the config default unless that leaves fewer tasks than the 2 CPUs (then
              n / 2), or --files-per-task.
              Instrumentation (the repository's files are untouched): while a run lasts, the benchmark
              wraps jobs.ingest.map_tasks so that each map function the job hands it (ingest_task, and
              the later steps' functions) runs through a wrapper that writes the task's wall/CPU times to a
              small JSON file beside the output root (for ingest_task also the time in _items, process_image,
              _record and summarize; the rest of the task is the staging write), and times each ray_map
              call (with the driver's CPU meanwhile) and the driver's list_tasks, done_tasks, remove,
              IndexBuilder.write, write_json and mark_success.
  equal resources (web mix only; --equal-repeats pairs, default 3): the bare loop above on one core, then
              right after it a Ray session of its own, ray.init(num_cpus=1), started in a child process
              pinned to that same core before ray.init, so the driver and everything Ray starts (GCS,
              raylet, workers, agents) inherit the pin: the whole job gets one core, as the bare loop does,
              and Ray's own processes compete with the worker there (their CPU is reported per process
              kind). Ray's start and one untimed warm-up job are excluded; one timed job, then the session
              ends. ratio = bare wall / job wall (img/s per img/s), goal >= 0.85; min/median/max over the
              pairs, with the 1-minute load average before and after each pair. The median pair's job is
              cut into consecutive parts that add up to its wall time: per Ray Data step (process; dedup,
              which also publishes the buckets small enough for one task; publish, the files of larger
              buckets) the launch (call to first task start), time in tasks, gaps between tasks and the
              collect after the last; the driver's own parts (removes, plans, index.parquet); the
              manifest, _SUCCESS and staging removal. files_per_task: the config default unless that leaves
              no task (then n), or --files-per-task. --quiet-wait S waits before each pair, up to S seconds,
              for a 2 s window in which the machine is less than 25% busy.
              Two floors follow the job in each pair, each in a pinned 1-CPU Ray session of its own, warmed
              up on the same WARM_N images (run_floor): the bare loop's own work mapped as the job's tasks
              (what Ray costs), and a single-copy floor: each task file sorted by bucket in row groups of one
              bucket, then one task counting repeated ids across the files (the least a design writing each
              image once and deduplicating across tasks would cost). floor ratio = bare wall / floor wall.
  profile     cProfile of process_image over a sample of each mix (header, EXIF, decode, resize, encode,
              SHA-256 ...), run in-process before Ray starts; cProfile inflates Python-level calls
              (exif_transpose, Image.open), so read the shares as rough.
CPU-seconds: the bare loop's own process time; for the job, the driver plus every Ray process under it
(psutil, sampled every 0.2 s). "foreign" is the share of the machine's CPU taken by other processes
meanwhile (from /proc/stat): the machine is shared, so also read the load average printed at start and end.
Results also go to benchmarks/results/bench_ingest.json (with per-task timelines of the job).

Goals checked: Ray job img/s per core >= 0.8 x the bare loop on both mixes, and >= 150 img/s/core on (a);
equal resources: the job on 1 CPU >= 0.85 x the bare loop on 1 core (median of the pairs).
With --equal-only the results go to benchmarks/results/bench_ingest_equal.json.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import datetime as dt
import hashlib
import importlib.util
import json
import logging
import math
import multiprocessing as mp
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (jobs.common sets it too)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # as in the tests: keeps the output readable

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from common import ASPECTS, cpu_model, format_table
from PIL import Image

from jobs.ingest import _record, ingest_settings, row_schema, rules_from
from vitok_core.config import load_config
from vitok_core.ingest import process_image

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".data" / "bench_ingest"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_ingest.json"
SEED = 0
RECIPE = "crop-lanczos-q90-v1"  # bump when the way images are made changes: the cache is then regenerated
JPEG_QUALITY = 90
REQUIRED_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
OPTIONAL_PHOTOS = ("motorcycle_left.png", "hubble_deep_field.jpg", "retina.jpg")
WARM_N = 32  # images of the untimed warm-up job (and of the bare loop's untimed warm-up pass)
PART_ROWS = 256  # bare loop: one Parquet file per this many images (the job's default files_per_task)
RAY_CPUS = 2
PRESET = "tiny"
# The code the measured work runs: fingerprinted at start and end, since a change in between (another session
# editing the tree) would make the bare loop and the Ray workers run different versions.
SOURCES = (
    "jobs/ingest.py",
    "jobs/common.py",
    "vitok_core/ingest.py",
    "vitok_core/images.py",
    "vitok_core/budget.py",
    "vitok_core/variants.py",
    "vitok_core/config.py",
    "vitok_core/artifacts.py",
)

# (label, width : height, relative weight): the same photo-ratio mix as bench_model.py, all within the
# job's max_aspect of 4.


@dataclass(frozen=True)
class Mix:
    """One image set: long side = lo + (hi - lo) * u ** power, u uniform in [0, 1)."""

    name: str
    title: str
    index: int  # part of every image's seed
    long_lo: int
    long_hi: int
    power: float  # < 1 puts more images near long_hi
    crop_min: float  # smallest crop side, as a fraction of the largest crop of that aspect in the photo


MIXES = (
    Mix("web", "(a) web-crawl sizes", 0, 256, 1024, 0.5, 0.5),
    Mix("highres", "(b) high resolution", 1, 1000, 4000, 1.0, 0.7),
)


# -- environment -----------------------------------------------------------------------------------


def available_cores() -> list[int]:
    # The affinity mask, not os.cpu_count(): a container may see more CPUs than it may run on.
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def environment() -> dict[str, Any]:
    import PIL

    ray_spec = importlib.util.find_spec("ray")
    ray_version = "?"
    if ray_spec is not None:  # read the version without importing ray (it starts threads)
        from importlib.metadata import version

        ray_version = version("ray")
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "python": platform.python_version(),
        "cpu": cpu_model(),
        "cores": len(available_cores()),
        "ray": ray_version,
        "pillow": PIL.__version__,
        "pyarrow": pa.__version__,
        "numpy": np.__version__,
        "loadavg_start": loadavg(),
        "sources_start": source_fingerprint(),
    }


def source_fingerprint() -> dict[str, str]:
    """git HEAD (+ '-dirty' when SOURCES differ from it) and a short SHA-256 of each file in SOURCES."""
    out = {}
    for rel in SOURCES:
        path = REPO / rel
        out[rel] = hashlib.sha256(path.read_bytes()).hexdigest()[:12] if path.is_file() else "missing"
    try:
        git = {"cwd": REPO, "capture_output": True, "text": True}
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *SOURCES], **git)
        out["git_head"] = (head.stdout.strip() or "?") + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        out["git_head"] = "?"
    return out


def machine_busy_seconds() -> float | None:
    """CPU-seconds the whole machine was busy (incl. VM steal) since boot, or None."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except OSError:
        return None
    # user nice system idle iowait irq softirq steal: all but idle and iowait is time a core was taken.
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


class TreeCPU:
    """CPU-seconds (user + system) of this process and all its descendants (Ray's GCS, raylet, workers).

    A thread samples the tree every `interval` seconds, so a process that exits during the window is counted
    up to its last sample (at most `interval` of its CPU time is missed). `by_kind` splits the total by
    process: driver (this process, the sampling thread included), workers (Ray worker processes: tasks,
    Ray Data's stats actor, idle ones), raylet, gcs_server, other (Ray's agents and monitors). None without
    psutil."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._kind: dict[int, str] = {}
        self.seconds: float | None = None
        self.by_kind: dict[str, float] | None = None
        self.sampler_cpu_s: float | None = None

    @staticmethod
    def kind(proc: Any, me: int) -> str:
        if proc.pid == me:
            return "driver"
        try:
            name, cmdline = proc.name(), " ".join(proc.cmdline())
        except Exception:
            return "other"
        if name.startswith("ray::") or "default_worker.py" in cmdline:
            return "workers"
        for kind in ("raylet", "gcs_server"):
            if kind in name or kind in cmdline.split(" ", 1)[0]:
                return kind
        return "other"

    def _sample(self) -> dict[int, float]:
        import psutil

        me = psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
                if proc.pid not in self._kind:
                    self._kind[proc.pid] = self.kind(proc, me.pid)
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(self._sample())
        self.sampler_cpu_s = time.thread_time()  # this thread's own CPU: part of the driver's share

    def __enter__(self) -> TreeCPU:
        if importlib.util.find_spec("psutil") is not None:
            self._first = self._sample()
            self._last = dict(self._first)
            self._thread = threading.Thread(target=self._loop, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._last.update(self._sample())
        used = {pid: t - self._first.get(pid, 0.0) for pid, t in self._last.items()}
        self.seconds = sum(used.values())
        self.by_kind = dict.fromkeys(("driver", "workers", "raylet", "gcs_server", "other"), 0.0)
        for pid, seconds in used.items():
            self.by_kind[self._kind.get(pid, "other")] += seconds


def foreign_share(busy: float | None, own_cpu: float | None, wall: float, cores: int) -> float | None:
    """Share of the machine's cores taken by processes other than the measured ones during `wall` seconds."""
    if busy is None or own_cpu is None or wall <= 0:
        return None
    return max(0.0, busy - own_cpu) / (wall * cores)


# -- images ----------------------------------------------------------------------------------------


def photo_folder() -> Path:
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; it ships the real photos this benchmark crops")
    return Path(spec.submodule_search_locations[0]) / "data"


def photo_names() -> list[str]:
    folder = photo_folder()
    missing = [n for n in REQUIRED_PHOTOS if not (folder / n).is_file()]
    if missing:
        raise RuntimeError(f"{folder} lacks {missing}")
    return [*REQUIRED_PHOTOS, *(n for n in OPTIONAL_PHOTOS if (folder / n).is_file())]


_PHOTOS: list[Image.Image] = []


def _load_photos(names: Sequence[str]) -> None:
    folder = photo_folder()
    _PHOTOS.clear()
    for name in names:
        with Image.open(folder / name) as img:
            _PHOTOS.append(img.convert("RGB"))


def image_spec(mix: Mix, i: int, n_photos: int) -> dict[str, Any]:
    """Size, aspect, photo and crop box of image i of a mix: a function of (SEED, mix, i) only."""
    rng = np.random.default_rng([SEED, mix.index, i])
    weights = np.array([w for _, _, w in ASPECTS])
    label, ratio, _ = ASPECTS[int(rng.choice(len(ASPECTS), p=weights / weights.sum()))]
    long_side = round(mix.long_lo + (mix.long_hi - mix.long_lo) * float(rng.random()) ** mix.power)
    width, height = (long_side, round(long_side / ratio)) if ratio >= 1 else (round(long_side * ratio), long_side)
    photo = int(rng.integers(n_photos))
    scale = float(rng.uniform(mix.crop_min, 1.0))
    fx, fy = float(rng.random()), float(rng.random())
    return {"aspect": label, "width": width, "height": height, "photo": photo, "scale": scale, "pos": (fx, fy)}


def _make_image(job: tuple[Mix, int, str]) -> None:
    mix, i, path = job
    spec = image_spec(mix, i, len(_PHOTOS))
    src = _PHOTOS[spec["photo"]]
    sw, sh = src.size
    ratio = spec["width"] / spec["height"]
    cw = min(sw, sh * ratio) * spec["scale"]  # largest crop of the target aspect, times the drawn scale
    ch = cw / ratio
    x0 = (sw - cw) * spec["pos"][0]
    y0 = (sh - ch) * spec["pos"][1]
    img = src.resize((spec["width"], spec["height"]), Image.Resampling.LANCZOS, box=(x0, y0, x0 + cw, y0 + ch))
    tmp = f"{path}.tmp"
    img.save(tmp, format="JPEG", quality=JPEG_QUALITY)
    os.replace(tmp, path)


def image_path(folder: Path, i: int) -> Path:
    return folder / f"img-{i:06d}.jpg"


def prepare_images(mix: Mix, n: int, names: list[str], workers: int) -> dict[str, Any]:
    """Generate (or reuse the cached) n images of a mix; return how they were made and their statistics."""
    root = DATA / mix.name
    folder = root / "images"
    meta_path = root / "meta.json"
    recipe = {"recipe": RECIPE, "seed": SEED, "quality": JPEG_QUALITY, "photos": names, "mix": asdict(mix)}
    recipe["aspects"] = [list(a) for a in ASPECTS]
    meta = json.loads(meta_path.read_text()) if meta_path.is_file() else None
    if meta is None or meta.get("recipe") != recipe:
        shutil.rmtree(folder, ignore_errors=True)  # another seed or recipe: nothing is reusable
    folder.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)  # rewritten once the folder holds exactly the n images
    wanted = {image_path(folder, i).name for i in range(n)}
    removed = 0
    for entry in folder.iterdir():
        if entry.name not in wanted:  # images beyond n, or temporary files of an interrupted run
            entry.unlink()
            removed += 1
    todo = [(mix, i, str(image_path(folder, i))) for i in range(n) if not image_path(folder, i).is_file()]
    start = time.perf_counter()
    if todo:
        ctx = mp.get_context("spawn")
        with ctx.Pool(workers, initializer=_load_photos, initargs=(names,)) as pool:
            for _ in pool.imap_unordered(_make_image, todo, chunksize=8):
                pass
    seconds = time.perf_counter() - start
    sizes, nbytes = [], []
    for i in range(n):
        path = image_path(folder, i)
        with Image.open(path) as img:
            sizes.append(img.size)
        nbytes.append(path.stat().st_size)
    meta_path.write_text(json.dumps({"recipe": recipe, "n": n}, indent=1) + "\n")
    pixels = np.array([w * h for w, h in sizes], dtype=np.float64)
    longs = [max(s) for s in sizes]
    nb = np.array(nbytes, dtype=np.float64)
    return {
        "mix": mix.name,
        "title": mix.title,
        "folder": str(folder),
        "n": n,
        "reused": n - len(todo),
        "generated": len(todo),
        "removed": removed,
        "generate_s": seconds,
        "mean_mp": float(pixels.mean() / 1e6),
        "median_mp": float(np.median(pixels) / 1e6),
        "min_mp": float(pixels.min() / 1e6),
        "max_mp": float(pixels.max() / 1e6),
        "long_side_min": min(longs),
        "long_side_max": max(longs),
        "over_store_cap": None,  # filled in by main (needs the config)
        "mean_kb": float(nb.mean() / 1024),
        "total_mb": float(nb.sum() / 2**20),
        "bits_per_pixel": float(8 * nb.sum() / pixels.sum()),
        "paths": [str(image_path(folder, i)) for i in range(n)],
        "sizes": sizes,
    }


# -- config ----------------------------------------------------------------------------------------


def job_overrides(source: Path, root: Path, files_per_task: int) -> list[str]:
    return [f"ingest.source={source}", f"ingest.root={root}", f"ingest.files_per_task={files_per_task}"]


def choose_files_per_task(n: int, default: int, cores: int) -> int:
    """The config default, unless it leaves fewer tasks than cores: then n / cores (rounded up)."""
    return default if math.ceil(n / default) >= cores else max(1, math.ceil(n / cores))


def task_sizes(n: int, per: int) -> list[int]:
    return [min(per, n - i) for i in range(0, n, per)]


# -- bare loop -------------------------------------------------------------------------------------


def bare_parquet_options(schema: pa.Schema) -> dict[str, Any]:
    """The bare loop's Parquet writer options, fixed here (not taken from the job, so that a comparison with
    another version of the job keeps the same baseline): no compression, dictionary or statistics for the
    image bytes, Snappy for the other columns (what jobs/ingest.py writes since ingest's parquet_options)."""
    others = [name for name in schema.names if name != "bytes"]
    compression = {name: "SNAPPY" for name in others} | {"bytes": "NONE"}
    return {"compression": compression, "use_dictionary": others, "write_statistics": others}


def _bare_loop(paths: list[str], overrides: list[str], out_dir: str, cpu: int) -> dict[str, Any]:
    """Child process: the job's per-image work on one pinned core, timed. Like the job's warm-up, an untimed
    pass over the first WARM_N images first (imports, Pillow's plugins, pyarrow's Parquet writer), and the
    files' bytes are read once beforehand (page cache), as they are for the job, which runs after."""
    os.sched_setaffinity(0, {cpu})
    cfg = load_config(PRESET, overrides)
    settings = ingest_settings(cfg)
    rules, budgets = rules_from(settings), settings["budgets"]
    schema = row_schema(budgets)
    options = bare_parquet_options(schema)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, path in enumerate(paths):
        data = Path(path).read_bytes()
        if i < WARM_N:
            warm = [_record(path, "", process_image(data, rules), budgets)]
            pq.write_table(pa.Table.from_pylist(warm, schema=schema), out / "warm-up.parquet", **options)
    (out / "warm-up.parquet").unlink(missing_ok=True)
    accepted, parts, records, in_process_image = 0, 0, [], 0.0
    busy0, wall0, cpu0 = machine_busy_seconds(), time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        t = time.perf_counter()
        outcome = process_image(data, rules)
        in_process_image += time.perf_counter() - t
        accepted += outcome.accepted
        records.append(_record(path, "", outcome, budgets))
        if len(records) == PART_ROWS:
            pq.write_table(pa.Table.from_pylist(records, schema=schema), out / f"part-{parts:05d}.parquet", **options)
            parts, records = parts + 1, []
    if records:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), out / f"part-{parts:05d}.parquet", **options)
        parts += 1
    wall, cpu_s, busy1 = time.perf_counter() - wall0, time.process_time() - cpu0, machine_busy_seconds()
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    foreign = foreign_share(busy, cpu_s, wall, len(available_cores()))
    result = {"wall_s": wall, "cpu_s": cpu_s, "foreign_cpu_share": foreign, "accepted": accepted}
    return result | {"parquet_files": parts, "process_image_s": in_process_image}


def run_bare_pair(paths: list[str], overrides: list[str], out_dir: Path, cpus: list[int]) -> dict[str, Any]:
    """Two bare loops at once, one per core, each on half of the images: what two busy processes get
    from this machine (shared caches, memory bandwidth, a hypervisor), next to the one-process loop."""
    shutil.rmtree(out_dir, ignore_errors=True)
    halves = [paths[0::2], paths[1::2]]
    with mp.get_context("spawn").Pool(2) as pool:
        pending = [
            pool.apply_async(_bare_loop, (half, overrides, str(out_dir / f"half-{i}"), cpu))
            for i, (half, cpu) in enumerate(zip(halves, cpus, strict=True))
        ]
        results = [p.get() for p in pending]
    shutil.rmtree(out_dir, ignore_errors=True)
    wall = max(r["wall_s"] for r in results)
    return {"wall_s": wall, "images_per_s": len(paths) / wall, "images_per_s_per_core": len(paths) / wall / 2}


def run_bare(paths: list[str], overrides: list[str], out_dir: Path, cpu: int) -> dict[str, Any]:
    shutil.rmtree(out_dir, ignore_errors=True)
    with mp.get_context("spawn").Pool(1) as pool:
        result = pool.apply(_bare_loop, (paths, overrides, str(out_dir), cpu))
    result["stored_mb"] = sum(p.stat().st_size for p in out_dir.glob("*.parquet")) / 2**20
    shutil.rmtree(out_dir, ignore_errors=True)
    n = len(paths)
    result["images_per_s"] = n / result["wall_s"]
    result["cpu_ms_per_image"] = 1000 * result["cpu_s"] / n
    return result


# -- Ray job ---------------------------------------------------------------------------------------


# The functions of jobs.ingest whose time the benchmark adds up inside each process task (a worker patches
# them in jobs.ingest's namespace for the duration of one task; `_items` is the generator reading the source).
TASK_PHASES = ("_items", "process_image", "_record", "summarize")


def _timed_task(row: dict[str, Any], _bench: dict[str, str], **kwargs: Any) -> dict[str, Any]:
    """Runs in a Ray worker in place of the job's map function `_bench["fn"]` (ingest_task, dedup_shard or
    publish_part): the same call, plus its wall/CPU times written to `_bench["folder"]` (read by run_job; the
    job never looks there). For ingest_task, also the time spent in each of TASK_PHASES; the rest of the
    task is the Arrow table, its sort, the staging Parquet write and the rename."""
    import jobs.ingest as job

    fn = getattr(job, _bench["fn"])  # a worker imports jobs.ingest afresh: the job's own function
    spent = dict.fromkeys(TASK_PHASES, 0.0)
    originals = {name: getattr(job, name) for name in TASK_PHASES} if _bench["fn"] == "ingest_task" else {}

    def timed(name: str, f: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            t = time.perf_counter()
            try:
                return f(*args, **kw)
            finally:
                spent[name] += time.perf_counter() - t

        return call

    def items(*args: Any, **kw: Any) -> Any:  # time each step of the reading generator, not the consumer's
        source = iter(originals["_items"](*args, **kw))
        while True:
            t = time.perf_counter()
            try:
                item = next(source)
            except StopIteration:
                spent["_items"] += time.perf_counter() - t
                return
            spent["_items"] += time.perf_counter() - t
            yield item

    for name, f in originals.items():
        setattr(job, name, items if name == "_items" else timed(name, f))
    try:
        start, cpu0 = time.time(), time.process_time()
        result = fn(row, **kwargs)
        end, cpu_s = time.time(), time.process_time() - cpu0
    finally:
        for name, f in originals.items():
            setattr(job, name, f)
    record = {"fn": _bench["fn"], "desc": _bench["desc"], "start": start, "end": end, "cpu_s": cpu_s}
    record["pid"] = os.getpid()
    if _bench["fn"] == "ingest_task":
        record.update(task=row["task"], images=json.loads(result["summary"])["read"], phases_s=spent)
    folder = _bench["folder"]
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"{_bench['fn']}-{time.time_ns()}-{os.getpid()}.json"), "w") as f:
        json.dump(record, f)
    return result


# Driver-side calls of jobs.ingest.run timed by instrumented_job (besides map_tasks, which is timed per step,
# and IndexBuilder.write, recorded as "write_index").
DRIVER_CALLS = ("list_tasks", "done_tasks", "init_ray", "remove", "write_json", "mark_success")


def ship_by_value() -> None:
    """Functions of this module handed to Ray Data go by value when it was imported (a spawned child's
    __mp_main__): benchmarks/ is not on the workers' path."""
    from ray import cloudpickle

    if __name__ != "__main__":
        cloudpickle.register_pickle_by_value(sys.modules[__name__])


@contextlib.contextmanager
def instrumented_job(folder: Path, calls: list[dict[str, Any]]):
    """While the run lasts (the repository's files are untouched): every map function the job hands to
    jobs.ingest.map_tasks runs through _timed_task (per-task records under `folder`), and each map_tasks call (as
    "ray_map": from the call until its last result is taken), IndexBuilder.write (as "write_index") and each of
    DRIVER_CALLS made by the driver is appended to `calls` as {name, desc, start, end}."""
    import jobs.ingest as job

    ship_by_value()
    originals = {name: getattr(job, name) for name in ("map_tasks", *DRIVER_CALLS)}
    builder_write = job.IndexBuilder.write

    def timed(name: str, f: Any) -> Any:
        def call(*args: Any, **kw: Any) -> Any:
            start = time.time()
            try:
                return f(*args, **kw)
            finally:
                calls.append({"name": name, "desc": "", "start": start, "end": time.time()})

        return call

    def map_tasks(fn: Any, rows: list[dict[str, Any]], kwargs: dict[str, Any], desc: str) -> Iterator[dict[str, Any]]:
        start, cpu0 = time.time(), time.process_time()
        try:
            bench = {"fn": fn.__name__, "desc": desc, "folder": str(folder)}
            yield from originals["map_tasks"](_timed_task, rows, {**kwargs, "_bench": bench}, desc)
        finally:
            call = {"name": "ray_map", "desc": desc, "start": start, "end": time.time(), "rows": len(rows)}
            calls.append(call | {"driver_cpu_s": time.process_time() - cpu0})

    job.map_tasks = map_tasks
    job.IndexBuilder.write = timed("write_index", builder_write)
    for name in DRIVER_CALLS:
        setattr(job, name, timed(name, originals[name]))
    try:
        yield
    finally:
        for name, f in originals.items():
            setattr(job, name, f)
        job.IndexBuilder.write = builder_write


def task_stats(records: list[dict], run_start: float, process_s: float, n: int, cpus: int) -> dict[str, Any]:
    """Per-task timings of one job run's process step -> utilisation of the Ray CPUs during it."""
    if not records:
        return {}
    busy = sum(r["end"] - r["start"] for r in records)
    phases = {name: sum(r["phases_s"][name] for r in records) for name in TASK_PHASES}
    return {
        "tasks": len(records),
        "worker_pids": len({r["pid"] for r in records}),
        "first_task_start_s": min(r["start"] for r in records) - run_start,
        "last_task_end_s": max(r["end"] for r in records) - run_start,
        "task_wall_s": sorted(r["end"] - r["start"] for r in records),
        "task_busy_s": busy,
        # Summed over tasks: the calls of TASK_PHASES, and the rest of the task (Arrow table, sort, staging write).
        "phases_s": phases | {"staging write (table, sort, Parquet, rename)": busy - sum(phases.values())},
        "worker_cpu_s": sum(r["cpu_s"] for r in records),
        "worker_cpu_ms_per_image": 1000 * sum(r["cpu_s"] for r in records) / n,
        "worker_wall_ms_per_image": 1000 * busy / n,
        # Share of the Ray CPUs' time in the process phase spent inside process_task.
        "process_utilisation": busy / (cpus * process_s) if process_s > 0 else None,
        "timeline": [
            {"task": r["task"], "pid": r["pid"], "images": r["images"], "start_s": r["start"] - run_start}
            | {"end_s": r["end"] - run_start, "cpu_s": r["cpu_s"]}
            for r in sorted(records, key=lambda r: r["start"])
        ],
    }


def _union(intervals: list[tuple[float, float]]) -> float:
    """Seconds covered by at least one of the intervals."""
    total, reach = 0.0, -math.inf
    for a, b in sorted(intervals):
        if b > reach:
            total += b - max(a, reach)
            reach = b
    return total


def map_steps(calls: list[dict], records: list[dict]) -> dict[str, dict[str, float]]:
    """Each ray_map call of a run (process, dedup, publish) split into: launch (from the call to the first
    task's start: Ray Data plans and starts the dataset, a worker picks the task up), tasks (time covered by
    at least one task's map function), between (idle gaps between tasks: per-task scheduling, Ray Data's
    block handling), collect (from the last task's end to the call's return)."""
    out = {}
    for call in (c for c in calls if c["name"] == "ray_map"):
        mine = [(r["start"], r["end"], r["cpu_s"]) for r in records if r["desc"] == call["desc"]]
        step = call["desc"].split(": ", 1)[-1]
        wall = call["end"] - call["start"]
        cpu = {"driver_cpu": call["driver_cpu_s"], "task_cpu": sum(c for _, _, c in mine)}
        if not mine:
            out[step] = {"wall": wall, "tasks": 0, "launch": 0.0, "in_tasks": 0.0, "between": 0.0, "collect": wall}
            out[step] |= cpu
            continue
        first, last = min(a for a, _, _ in mine), max(b for _, b, _ in mine)
        covered = _union([(a, b) for a, b, _ in mine])
        out[step] = cpu | {
            "wall": wall,
            "tasks": len(mine),
            "launch": first - call["start"],
            "in_tasks": covered,
            "task_sum": sum(b - a for a, b, _ in mine),
            "between": (last - first) - covered,
            "collect": call["end"] - last,
        }
    return out


def breakdown(wall: float, run_start: float, timing: dict[str, float], calls: list[dict], steps: dict) -> dict:
    """The wall time of one run() cut into consecutive parts that add up to it (seconds)."""

    def spent(name: str, after: float = -math.inf, before: float = math.inf) -> float:
        return sum(c["end"] - c["start"] for c in calls if c["name"] == name and after <= c["start"] < before)

    begin = min((c["start"] for c in calls if c["name"] == "list_tasks"), default=run_start)
    maps = {c["desc"].split(": ", 1)[-1]: c for c in calls if c["name"] == "ray_map"}
    dedup_start = maps["dedup"]["start"] if "dedup" in maps else math.inf
    publish_end = maps["publish"]["end"] if "publish" in maps else math.inf
    parts: dict[str, float] = {"before list (key, is_complete)": begin - run_start, "list": timing["list"]}
    for step in ("process", "dedup", "publish"):
        s = steps.get(step, {})
        parts[f"{step}: launch (to 1st task)"] = s.get("launch", 0.0)
        parts[f"{step}: in tasks"] = s.get("in_tasks", 0.0)
        parts[f"{step}: between tasks"] = s.get("between", 0.0)
        parts[f"{step}: collect (after last task)"] = s.get("collect", 0.0)
        step_total = timing[step] - s.get("wall", 0.0)
        if step == "dedup":  # data/, rejects/, index.parquet removed before the dedup map
            removes = spent("remove", after=begin, before=dedup_start)
            parts["dedup: remove old data/, rejects/, index"] = removes
            parts["dedup: driver (plan, counts)"] = step_total - removes
        elif step == "publish":
            index = spent("write_index", after=publish_end)
            parts["publish: write index.parquet"] = index
            parts["publish: driver (plan, index runs)"] = step_total - index
        else:
            parts["process: driver (init_ray, plan, summaries)"] = step_total
    after = wall - (begin - run_start) - timing["total"]  # the manifest's total ends before the manifest
    last = max((c["end"] for c in calls if c["name"] == "ray_map"), default=run_start)
    parts["after: manifest.json"] = spent("write_json", after=last)
    parts["after: _SUCCESS"] = spent("mark_success", after=last)
    parts["after: remove _staging"] = spent("remove", after=last)
    parts["after: the rest"] = after - sum(spent(n, after=last) for n in ("write_json", "mark_success", "remove"))
    return parts


def run_job(source: Path, root: Path, files_per_task: int, cpus: int = RAY_CPUS) -> dict[str, Any]:
    """One timed run() on a fresh output root. On 1 CPU the CPU sampler looks once a second (it shares the
    core with the job; Ray's processes outlive the run, so little is missed), else every 0.2 s."""
    from jobs.ingest import run

    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(PRESET, job_overrides(source, root, files_per_task))
    calls: list[dict[str, Any]] = []
    bench_folder = Path(f"{root}_bench")
    shutil.rmtree(bench_folder, ignore_errors=True)
    with instrumented_job(bench_folder, calls), TreeCPU(1.0 if cpus == 1 else 0.2) as tree:
        busy0, run_start, start = machine_busy_seconds(), time.time(), time.perf_counter()
        manifest = run(cfg)
        wall = time.perf_counter() - start
        busy1 = machine_busy_seconds()
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    output = Path(manifest["output"])
    stored = sum(p.stat().st_size for p in (output / "data").rglob("*.parquet")) / 2**20
    records = [json.loads(p.read_text()) for p in sorted(bench_folder.glob("*.json"))]
    process_records = [r for r in records if r["fn"] == "ingest_task"]
    n = manifest["counts"]["read"]
    shutil.rmtree(root, ignore_errors=True)
    shutil.rmtree(bench_folder, ignore_errors=True)
    steps = map_steps(calls, records)
    return {
        "wall_s": wall,
        "timing_s": manifest["timing_s"],
        "tasks": task_stats(process_records, run_start, manifest["timing_s"]["process"], n, cpus),
        "steps_s": steps,
        "breakdown_s": breakdown(wall, run_start, manifest["timing_s"], calls, steps),
        "counts": manifest["counts"],
        "cpu_s": tree.seconds,
        "cpu_s_by_process": tree.by_kind,
        "cpu_sampler_s": tree.sampler_cpu_s,
        "foreign_cpu_share": foreign_share(busy, tree.seconds, wall, len(available_cores())),
        "stored_mb": stored,
    }


def start_ray(cpus: int = RAY_CPUS) -> dict[str, Any]:
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=cpus, include_dashboard=False)
    import ray.data  # configures its loggers on import

    # Console only (the file log under /tmp/ray stays as it is): Ray Data prints INFO lines per dataset run.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    return {"init_s": time.perf_counter() - start, "cpus": ray.cluster_resources().get("CPU")}


def warm_up(paths: list[str], n: int, cpus: int = RAY_CPUS) -> float:
    """One untimed job on n images (links into a scratch folder): Ray starts its workers, which import the job."""
    folder = DATA / "runs" / "warmup-source"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in paths[:n]:
        (folder / Path(path).name).symlink_to(path)
    start = time.perf_counter()
    run_job(folder, DATA / "runs" / "warmup", choose_files_per_task(n, n, cpus), cpus)
    shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - start


# -- equal resources: the job on 1 CPU against the bare loop on 1 core -----------------------------


def tree_affinity() -> dict[str, list[int]]:
    """The CPU affinity of this process and every descendant, by process kind (as TreeCPU names them)."""
    import psutil

    me = psutil.Process()
    out: dict[str, set[int]] = {}
    for proc in [me, *me.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            out.setdefault(TreeCPU.kind(proc, me.pid), set()).update(proc.cpu_affinity())
    return {kind: sorted(cpus) for kind, cpus in sorted(out.items())}


def _floor_task(row: dict[str, Any], settings: dict[str, Any], out_dir: str, by_bucket: bool) -> dict[str, Any]:
    """Ray Data map function of the floors: the bare loop's work on one task's files (read, process_image,
    records, one Parquet file with the bare loop's options). `by_bucket`: the file's rows sorted by
    (bucket, id), in row groups of one bucket each (what a data file read by bucket needs). `settings`: the
    job's ingest_settings, handed over as the job hands them to its tasks."""
    from jobs.ingest import _runs_of_bucket

    rules, budgets = rules_from(settings), settings["budgets"]
    schema = row_schema(budgets)
    records = []
    for path in row["paths"]:
        with open(path, "rb") as f:
            records.append(_record(path, "", process_image(f.read(), rules), budgets))
    if by_bucket:
        records.sort(key=lambda r: (r["bucket"], r["id"]))
    table = pa.Table.from_pylist(records, schema=schema)
    with pq.ParquetWriter(f"{out_dir}/part-{row['task']:05d}.parquet", schema, **bare_parquet_options(schema)) as w:
        for part in _runs_of_bucket(table) if by_bucket else [table]:
            w.write_table(part)
    return {"task": row["task"], "rows": table.num_rows}


def _floor_duplicates(row: dict[str, Any], out_dir: str) -> dict[str, Any]:
    """Ray Data map function of the single-copy floor's second step: every task file's id and source
    columns (no image bytes; the source is read, unused here, because a real dedup keeps the copy with the
    smallest source), and the ids that repeat (the copies a single-copy ingest would drop)."""
    table = pa.concat_tables(
        pq.read_table(p, columns=["id", "source"]) for p in sorted(Path(out_dir).glob("*.parquet"))
    )
    ids = table.filter(pc.and_kleene(pc.is_valid(table["id"]), pc.not_equal(table["id"], "")))["id"]
    counts = pc.value_counts(ids)
    return {"rows": len(ids), "repeated_ids": int(pc.sum(pc.greater(counts.field("counts"), 1)).as_py() or 0)}


def run_floor(
    paths: list[str], overrides: list[str], out_dir: Path, files_per_task: int, single_copy: bool = False
) -> dict[str, Any]:
    """A floor of any Ray Data ingest on this Ray: the bare loop's work cut into the job's tasks and mapped
    as the job maps them (jobs.ingest.map_tasks: one block per task, results streamed to the driver), with no
    staging, dedup, publish, index or manifest: what Ray's scheduling, its processes and the driver's
    executor cost over the bare loop, whatever the job does after the map. `single_copy`: the least a
    single-copy ingest (each task writes its data file once, duplicates found across tasks) would add: the
    task files sorted by bucket in row groups of one bucket, then one task reading every file's ids and
    finding the repeated ones (no index, manifest, rejects or commit)."""
    from jobs.ingest import map_tasks

    ship_by_value()
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    rows = [{"task": i, "paths": paths[i : i + files_per_task]} for i in range(0, len(paths), files_per_task)]
    settings = ingest_settings(load_config(PRESET, overrides))
    kwargs = {"settings": settings, "out_dir": str(out_dir), "by_bucket": single_copy}
    start = time.perf_counter()
    done = list(map_tasks(_floor_task, rows, kwargs, "floor"))
    mapped = time.perf_counter() - start
    dups = list(map_tasks(_floor_duplicates, [{"step": 0}], {"out_dir": str(out_dir)}, "ids")) if single_copy else []
    wall = time.perf_counter() - start
    shutil.rmtree(out_dir, ignore_errors=True)
    result = {"wall_s": wall, "map_s": mapped, "tasks": len(done), "rows": sum(r["rows"] for r in done)}
    return result | ({"duplicates_s": wall - mapped, **dups[0]} if dups else {})


def _equal_session(
    measure: str, source: str, paths: list[str], root: str, files_per_task: int, core: int, warm_n: int
) -> dict:
    """Child process: a Ray of its own with num_cpus=1, and every process of it (this driver, GCS, raylet,
    workers) pinned to `core`: the affinity is set before ray.init and inherited by everything Ray starts.
    Ray is started and warmed up (one untimed run of the same kind on warm_n images) before the timed run of
    `measure` (job, floor or single_copy: run_floor), then shut down. Each measure gets a session of its own:
    a worker that has already processed the images runs them faster (memory touched for the first time is
    expensive on this VM), so one after another on the same Ray would favour the later."""
    os.sched_setaffinity(0, {core})
    import ray

    info = start_ray(1)
    if measure == "job":
        warm = warm_up(paths, warm_n, 1)
        result = run_job(Path(source), Path(root), files_per_task, cpus=1)
    else:
        overrides, scratch = job_overrides(Path(source), Path(root), files_per_task), Path(f"{root}_{measure}")
        start = time.perf_counter()
        run_floor(paths[:warm_n], overrides, scratch, files_per_task, single_copy=measure == "single_copy")
        warm = time.perf_counter() - start
        result = run_floor(paths, overrides, scratch, files_per_task, single_copy=measure == "single_copy")
    affinity = tree_affinity()
    ray.shutdown()
    return {"ray": info, "warmup_s": warm, measure: result, "affinity": affinity}


def wait_quiet(limit_s: float, share: float = 0.25, window_s: float = 2.0) -> float | None:
    """Wait (at most limit_s) for a window in which the machine is busy less than `share` of its cores;
    returns the busy share of the last window (None without /proc/stat)."""
    deadline = time.monotonic() + limit_s
    cores = len(available_cores())
    while True:
        b0 = machine_busy_seconds()
        time.sleep(window_s)
        b1 = machine_busy_seconds()
        if b0 is None or b1 is None:
            return None
        busy = (b1 - b0) / (window_s * cores)
        if busy < share or time.monotonic() >= deadline:
            return busy


def run_equal(info: dict, overrides: list[str], files_per_task: int, core: int, repeats: int, quiet_s: float) -> list:
    """`repeats` pairs, each the bare loop on `core` and right after it a fresh 1-CPU Ray session pinned to
    the same core running the job once (after its warm-up), then a session each for the two floors
    (run_floor), with the load average before and after."""
    runs_dir = DATA / "runs"
    pairs = []
    for rep in range(repeats):
        idle = wait_quiet(quiet_s) if quiet_s > 0 else None
        load0 = loadavg()
        bare = run_bare(info["paths"], overrides, runs_dir / "equal-bare", core)
        warm_n = min(info["n"], WARM_N)
        session: dict[str, Any] = {}
        for measure in ("job", "floor", "single_copy"):  # the job first: right after the bare loop, as before
            args = (measure, info["folder"], info["paths"], str(runs_dir / "equal-job"), files_per_task, core, warm_n)
            with mp.get_context("spawn").Pool(1) as pool:
                part = pool.apply(_equal_session, args)
            session[measure] = part[measure]
            if measure == "job":
                session.update({k: v for k, v in part.items() if k != "job"})
        load1 = loadavg()
        job = session["job"]
        ratio = bare["wall_s"] / job["wall_s"]
        for floor in ("floor", "single_copy"):
            session[floor]["ratio"] = bare["wall_s"] / session[floor]["wall_s"]
        pairs.append(
            {"bare": bare, **session, "ratio": ratio, "loadavg_before": load0, "loadavg_after": load1}
            | {"busy_share_before": idle}
        )
        t = job["timing_s"]
        print(
            f"  pair {rep + 1}: bare {bare['wall_s']:.2f} s ({bare['images_per_s']:.1f} img/s), "
            f"job {job['wall_s']:.2f} s"
            f" (list {t['list']:.2f}, process {t['process']:.2f}, dedup {t['dedup']:.2f}, publish {t['publish']:.2f})"
            f", ratio {ratio:.3f}; floor {session['floor']['wall_s']:.2f} s (ratio {session['floor']['ratio']:.3f})"
            f", single-copy floor {session['single_copy']['wall_s']:.2f} s"
            f" (ratio {session['single_copy']['ratio']:.3f})"
            f"; foreign bare {pct(bare['foreign_cpu_share'])} job {pct(job['foreign_cpu_share'])}"
            f"; load {load0[0]} -> {load1[0]}",
            flush=True,
        )
    return pairs


def equal_table(title: str, n: int, pairs: list[dict]) -> str:
    headers = ["mix", "n", "pairs", "bare img/s (1 core) min/med", "job img/s (1 CPU) min/med", "ratio min/med/max"]
    headers += ["process-step ratio med", "floor ratio min/med/max", "single-copy floor ratio min/med/max"]
    headers += ["CPU ratio med"]
    headers += ["load avg 1-min before -> after (each pair)"]
    ratios = sorted(p["ratio"] for p in pairs)
    floor = sorted(p["floor"]["ratio"] for p in pairs)
    single = sorted(p["single_copy"]["ratio"] for p in pairs)
    bare = sorted(n / p["bare"]["wall_s"] for p in pairs)
    job = sorted(n / p["job"]["wall_s"] for p in pairs)
    proc = sorted(p["bare"]["wall_s"] / p["job"]["timing_s"]["process"] for p in pairs)
    cpu = sorted(p["bare"]["cpu_s"] / p["job"]["cpu_s"] for p in pairs if p["job"]["cpu_s"])
    loads = ", ".join(f"{p['loadavg_before'][0]}->{p['loadavg_after'][0]}" for p in pairs)
    med = statistics.median
    row = [title, n, len(pairs), f"{bare[0]:.1f}/{med(bare):.1f}", f"{job[0]:.1f}/{med(job):.1f}"]
    row += [f"{ratios[0]:.3f}/{med(ratios):.3f}/{ratios[-1]:.3f}", f"{med(proc):.3f}"]
    row += [f"{floor[0]:.3f}/{med(floor):.3f}/{floor[-1]:.3f}", f"{single[0]:.3f}/{med(single):.3f}/{single[-1]:.3f}"]
    row += [f"{med(cpu):.3f}" if cpu else "n/a", loads]
    return format_table(headers, [row])


def equal_breakdown_table(pair: dict, n: int) -> str:
    """The median pair's job wall time, part by part, next to the bare loop's."""
    job, bare = pair["job"], pair["bare"]
    wall = job["wall_s"]

    def line(label: str, s: float) -> list[str]:
        return [label, f"{s:.3f}", f"{100 * s / wall:.1f}%", f"{1000 * s / n:.3f}"]

    body = [line(part, s) for part, s in job["breakdown_s"].items()]
    body.append(line("sum of the parts", sum(job["breakdown_s"].values())))
    body.append(line("job wall (run())", wall))
    body.append(line("bare loop wall (same images, same core)", bare["wall_s"]))
    return format_table(["part of the job's wall time", "s", "share", "ms/img"], body)


def equal_steps_table(pair: dict) -> str:
    """Each Ray Data step: wall, tasks, CPU inside the tasks and CPU of the driver (all its threads) meanwhile."""
    body = []
    for step, s in pair["job"]["steps_s"].items():
        row = [step, f"{s['wall']:.3f}", s["tasks"], f"{s['in_tasks']:.3f}", f"{s['task_cpu']:.3f}"]
        body.append([*row, f"{s['driver_cpu']:.3f}"])
    headers = ["Ray Data step", "wall s", "tasks", "in tasks s", "task CPU s", "driver CPU s meanwhile"]
    return format_table(headers, body)


def equal_task_table(pair: dict, n: int) -> str:
    """Inside the process tasks (summed over tasks) against the same work in the bare loop."""
    ts, bare = pair["job"]["tasks"], pair["bare"]

    def line(label: str, s: float) -> list[str]:
        return [label, f"{s:.3f}", f"{1000 * s / n:.3f}"]

    names = {"_items": "read the source (_items)", "process_image": "process_image", "_record": "records (_record)"}
    names["summarize"] = "summary (summarize)"
    body = [line(names.get(part, part), s) for part, s in ts["phases_s"].items()]
    body.append(line("all tasks (in the map function)", ts["task_busy_s"]))
    body.append(line("bare loop: process_image", bare["process_image_s"]))
    body.append(line("bare loop: the rest (read, records, Parquet)", bare["wall_s"] - bare["process_image_s"]))
    body.append(line("bare loop: wall", bare["wall_s"]))
    return format_table(["inside the process tasks", "s", "ms/img"], body)


def equal_cpu_table(pair: dict) -> str:
    job, bare = pair["job"], pair["bare"]
    body = [[kind, f"{s:.3f}", pct(s / job["wall_s"])] for kind, s in (job["cpu_s_by_process"] or {}).items()]
    body.append(["all (job)", f"{job['cpu_s'] or 0:.3f}", pct((job["cpu_s"] or 0) / job["wall_s"])])
    body.append(["bare loop", f"{bare['cpu_s']:.3f}", pct(bare["cpu_s"] / bare["wall_s"])])
    return format_table(["CPU of", "CPU s", "of wall"], body)


# -- profile ---------------------------------------------------------------------------------------

# (label, file name ending, function name): cumulative time of these calls inside process_image.
PROFILE_PARTS = (
    ("sha256 (content id)", "~", "<built-in method _hashlib.openssl_sha256>"),
    ("Image.open (header)", "PIL/Image.py", "open"),
    ("getexif", "PIL/Image.py", "getexif"),
    ("draft", "PIL/JpegImagePlugin.py", "draft"),
    ("decode (ImageFile.load)", "PIL/ImageFile.py", "load"),
    ("exif_transpose", "PIL/ImageOps.py", "exif_transpose"),
    ("to_rgb", "vitok_core/images.py", "to_rgb"),
    ("resize (bicubic)", "PIL/Image.py", "resize"),
    ("encode (Image.save)", "PIL/Image.py", "save"),
    ("bucket_of", "vitok_core/budget.py", "bucket_of"),
)
DIRECT_CALLERS = {"_process", "content_id", "<dictcomp>"}


def profile_mix(paths: list[str], rules: Any) -> dict[str, Any]:
    """cProfile of process_image over the given files (bytes read beforehand)."""
    blobs = []
    for path in paths:
        with open(path, "rb") as f:
            blobs.append(f.read())
    process_image(blobs[0], rules)  # first-call imports and plugin set-up stay out of the profile
    profiler = cProfile.Profile()
    profiler.enable()
    for data in blobs:
        process_image(data, rules)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = next(ct for (_, _, func), (_, _, _, ct, _) in stats.items() if func == "process_image")
    parts: dict[str, float] = {}
    for label, file_end, func in PROFILE_PARTS:
        seconds = 0.0
        for (file, _, name), (_, _, _, _, callers) in stats.items():
            if name == func and file.endswith(file_end):
                # Only the calls made by process_image itself: exif_transpose calls getexif and load again.
                seconds += sum(c[3] for (_, _, caller), c in callers.items() if caller in DIRECT_CALLERS)
        parts[label] = seconds
    parts["other (Python glue)"] = max(0.0, total - sum(parts.values()))
    return {"images": len(blobs), "total_s": total, "ms_per_image": 1000 * total / len(blobs), "parts_s": parts}


# -- output ----------------------------------------------------------------------------------------


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def summary_table(rows: Sequence[dict]) -> str:
    headers = ["mix", "n", "mean MP", "bare img/s (1 core)", "job img/s total", "job img/s/core", "ratio"]
    headers += ["process img/s/core", "process ratio", "2 bare loops img/s/core", "goals (>=0.8x; >=150/core on a)"]
    body = []
    for r in rows:
        goals = f"0.8x: {'yes' if r['goal_ratio_met'] else 'NO'}"
        if r["goal_abs_met"] is not None:
            goals += f"; 150/core: {'yes' if r['goal_abs_met'] else 'NO'}"
        body.append(
            [
                r["title"],
                r["n"],
                f"{r['mean_mp']:.2f}",
                f"{r['bare_images_per_s']:.1f}",
                f"{r['job_images_per_s']:.1f}",
                f"{r['job_images_per_s_per_core']:.1f}",
                f"{r['ratio']:.2f}",
                f"{r['process_images_per_s_per_core']:.1f}",
                f"{r['process_ratio']:.2f}",
                f"{r['bare_median']['pair']['images_per_s_per_core']:.1f}" if "pair" in r["bare_median"] else "n/a",
                goals,
            ]
        )
    return format_table(headers, body)


def detail_table(rows: Sequence[dict]) -> str:
    headers = ["mix", "files/task", "tasks", "bare s", "bare CPU ms/img", "bare foreign", "job s", "list s"]
    headers += ["process s", "dedup s", "publish s", "rest s", "job CPU ms/img", "job foreign"]
    headers += ["accepted", "stored MB"]
    body = []
    for r in rows:
        job, bare = r["job_median"], r["bare_median"]
        t = job["timing_s"]
        rest = job["wall_s"] - t["list"] - t["process"] - t["dedup"] - t["publish"]
        cpu = "n/a" if job["cpu_s"] is None else f"{1000 * job['cpu_s'] / r['n']:.1f}"
        body.append(
            [
                r["title"],
                r["files_per_task"],
                len(r["task_sizes"]),
                f"{bare['wall_s']:.1f}",
                f"{bare['cpu_ms_per_image']:.2f}",
                pct(bare["foreign_cpu_share"]),
                f"{job['wall_s']:.1f}",
                f"{t['list']:.2f}",
                f"{t['process']:.1f}",
                f"{t['dedup']:.2f}",
                f"{t['publish']:.2f}",
                f"{rest:.2f}",
                cpu,
                pct(job["foreign_cpu_share"]),
                f"{bare['accepted']}/{job['counts']['accepted']}",
                f"{bare['stored_mb']:.0f}/{job['stored_mb']:.0f}",
            ]
        )
    return format_table(headers, body)


def process_table(rows: Sequence[dict]) -> str:
    headers = ["mix", "process s", "1st task starts at s", "task wall s (min-max)", "last task ends at s"]
    headers += ["worker wall ms/img", "worker CPU ms/img", "bare wall ms/img", "Ray CPUs busy in process_task"]
    body = []
    for r in rows:
        job, bare = r["job_median"], r["bare_median"]
        ts = job["tasks"]
        if not ts:
            continue
        body.append(
            [
                r["title"],
                f"{job['timing_s']['process']:.1f}",
                f"{ts['first_task_start_s']:.2f}",
                f"{ts['task_wall_s'][0]:.1f}-{ts['task_wall_s'][-1]:.1f}",
                f"{ts['last_task_end_s']:.1f}",
                f"{ts['worker_wall_ms_per_image']:.2f}",
                f"{ts['worker_cpu_ms_per_image']:.2f}",
                f"{1000 * bare['wall_s'] / r['n']:.2f}",
                pct(ts["process_utilisation"]),
            ]
        )
    return format_table(headers, body)


def profile_table(profiles: dict[str, dict]) -> str:
    names = list(profiles)
    labels = list(next(iter(profiles.values()))["parts_s"])
    headers = ["part of process_image", *(f"{m} ms/img" for m in names), *(f"{m} share" for m in names)]
    body = []
    for label in labels:
        ms = [1000 * profiles[m]["parts_s"][label] / profiles[m]["images"] for m in names]
        shares = [profiles[m]["parts_s"][label] / profiles[m]["total_s"] for m in names]
        body.append([label, *(f"{x:.2f}" for x in ms), *(f"{100 * s:.1f}%" for s in shares)])
    body.append(["total (under cProfile)", *(f"{profiles[m]['ms_per_image']:.2f}" for m in names), *("100%",) * 2])
    return format_table(headers, body)


def pick_median(runs: list[dict], key: str) -> dict:
    """The run with the median value of `key` (the lower middle one for an even count)."""
    ordered = sorted(runs, key=lambda r: r[key])
    return ordered[(len(ordered) - 1) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 images per mix instead of 2000")
    parser.add_argument("--n", type=int, default=None, help="images per mix (default 2000, --quick 300)")
    parser.add_argument("--repeats", type=int, default=1, help="timed runs of each measurement (median reported)")
    parser.add_argument("--profile-n", type=int, default=None, help="images per mix to cProfile (0: skip)")
    parser.add_argument("--files-per-task", type=int, default=None, help="override the job's files_per_task")
    parser.add_argument("--equal-only", action="store_true", help="only the equal-resources row (web mix, 1 CPU)")
    parser.add_argument("--equal-repeats", type=int, default=3, help="bare/job pairs of the equal-resources row")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=0.0,
        help="before each equal-resources pair, wait up to this many s for"
        " a 2 s window with the machine less than 25%% busy",
    )
    args = parser.parse_args()
    n = args.n or (300 if args.quick else 2000)
    default_profile_n = 0 if args.equal_only else 100 if args.quick else 300
    profile_n = args.profile_n if args.profile_n is not None else default_profile_n
    mixes = MIXES[:1] if args.equal_only else MIXES
    started = time.perf_counter()
    cores = available_cores()
    env = environment()

    base = load_config(PRESET, [f"ingest.source={DATA}"])
    default_fpt, store_cap = base.ingest.files_per_task, base.ingest.store_max_pixels
    files_per_task = args.files_per_task or choose_files_per_task(n, default_fpt, RAY_CPUS)
    equal_fpt = args.files_per_task or choose_files_per_task(n, default_fpt, 1)

    print(f"ViTok-v2 ingest benchmark ({'quick' if args.quick else 'full'}, {n} images per mix)  {env['date']}")
    print(f"cpu: {env['cpu']}  cores: {env['cores']}  python {env['python']}")
    print(f"ray {env['ray']}  pillow {env['pillow']}  pyarrow {env['pyarrow']}  numpy {env['numpy']}")
    print(f"load average at start (1/5/15 min): {env['loadavg_start']}")
    print(f"code: git {env['sources_start']['git_head']} (job sources fingerprinted; checked again at the end)")
    print(
        f"config '{PRESET}': store_max_pixels {store_cap:,} (default), store_quality {base.ingest.store_quality}, "
        f"keep_formats {list(base.ingest.keep_formats)}, budgets {list(base.data.budgets)}"
    )
    if files_per_task != default_fpt:
        why = "--files-per-task" if args.files_per_task else f"{default_fpt} would leave fewer tasks than {RAY_CPUS}"
        print(f"files_per_task {files_per_task} instead of the default {default_fpt} ({why})")
    else:
        print(f"files_per_task {files_per_task} (the default)")
    sizes = task_sizes(n, files_per_task)
    balance = n / (max(sizes) * RAY_CPUS)
    print(f"  tasks per mix: {len(sizes)} of {sizes[:3]}{' ...' if len(sizes) > 3 else ''} files")
    print(f"  best possible process-phase speed-up on {RAY_CPUS} cores with these tasks: {balance * RAY_CPUS:.2f}x")
    print()

    # 1. images
    names = photo_names()
    print(f"Images: random crops of {len(names)} real photos from the scikit-image wheel ({photo_folder()}):")
    print(f"  {', '.join(names)}")
    print(f"  resized with Lanczos to a drawn size, saved as JPEG quality {JPEG_QUALITY} (4:2:0, no EXIF), seed {SEED}")
    print(f"  aspects (weight): {' '.join(f'{a}({w:g})' for a, _, w in ASPECTS)}")
    image_sets = {}
    for mix in mixes:
        info = prepare_images(mix, n, names, workers=min(2, len(cores)))
        info["over_store_cap"] = sum(w * h > store_cap for w, h in info["sizes"])
        image_sets[mix.name] = info
        shape = "rising towards the top" if mix.power < 1 else "uniform"
        print(
            f"  {mix.title}: long side {mix.long_lo}-{mix.long_hi} ({shape}), crop {mix.crop_min:g}-1 of the largest"
            f" crop -> {n} files in {info['folder']}"
        )
        print(
            f"    measured: mean {info['mean_mp']:.2f} MP (median {info['median_mp']:.2f}, {info['min_mp']:.2f}-"
            f"{info['max_mp']:.2f}), long side {info['long_side_min']}-{info['long_side_max']}, "
            f"{info['mean_kb']:.0f} KB mean, {info['bits_per_pixel']:.2f} bits/px, {info['total_mb']:.0f} MB; "
            f"{info['over_store_cap']} over the storage cap (resized + re-encoded)"
        )
        print(
            f"    cache: {info['reused']} reused, {info['generated']} generated in {info['generate_s']:.1f} s, "
            f"{info['removed']} removed"
        )
    print()

    # 2. profile (in this process, before Ray)
    rules = rules_from(ingest_settings(base))
    profiles = {}
    if profile_n > 0:
        for mix in mixes:
            paths = image_sets[mix.name]["paths"]
            step = max(1, len(paths) // profile_n)
            profiles[mix.name] = profile_mix(paths[::step][:profile_n], rules)
        print(f"Profile: cProfile of process_image, {profile_n} images per mix (evenly spaced), cumulative times")
        print(profile_table(profiles))
        print()

    # 3. equal resources: the job on 1 CPU (its own Ray, pinned) against the bare loop on the same core
    runs_dir = DATA / "runs"
    pin = cores[0]
    web = image_sets[MIXES[0].name]
    print(
        f"Equal resources, {MIXES[0].title}: {args.equal_repeats} pair(s) of the bare loop on CPU {pin}, then a Ray"
        f" session of its own (num_cpus=1; driver, GCS, raylet and workers all pinned to CPU {pin}), warm-up job,"
        f" then the timed job (files_per_task {equal_fpt}: {len(task_sizes(n, equal_fpt))} tasks)",
        flush=True,
    )
    overrides = job_overrides(Path(web["folder"]), runs_dir, equal_fpt)
    equal = run_equal(web, overrides, equal_fpt, pin, args.equal_repeats, args.quiet_wait)
    equal_median = pick_median(equal, "ratio")
    print()
    report_equal(equal, equal_median, n, MIXES[0].title)
    if args.equal_only:
        finish(args, env, started, n, image_sets, names, profiles, {"equal": equal_summary(equal, n, equal_fpt)})
        return

    # 4. bare loops (before Ray starts, so its idle processes do not share the core)
    bare: dict[str, list[dict]] = {m.name: [] for m in MIXES}
    print(f"Bare loop: one process pinned to CPU {pin}, {args.repeats} run(s) per mix", flush=True)
    for rep in range(args.repeats):
        for mix in MIXES:
            info = image_sets[mix.name]
            overrides = job_overrides(Path(info["folder"]), runs_dir, files_per_task)
            result = run_bare(info["paths"], overrides, runs_dir / f"bare-{mix.name}", pin)
            if len(cores) >= 2:
                result["pair"] = run_bare_pair(info["paths"], overrides, runs_dir / f"pair-{mix.name}", cores[:2])
            bare[mix.name].append(result)
            print(
                f"  {mix.title} run {rep + 1}: {result['wall_s']:.1f} s, {result['images_per_s']:.1f} img/s, "
                f"{result['cpu_ms_per_image']:.1f} CPU ms/img, foreign {pct(result['foreign_cpu_share'])}"
                + (
                    f"; two at once: {result['pair']['images_per_s_per_core']:.1f} img/s/core"
                    if "pair" in result
                    else ""
                ),
                flush=True,
            )
    print()

    # 5. Ray job
    ray_info = start_ray()
    print(f"Ray: ray.init(num_cpus={RAY_CPUS}, include_dashboard=False) took {ray_info['init_s']:.1f} s", flush=True)
    warm = warm_up(image_sets[MIXES[0].name]["paths"], min(n, WARM_N))
    print(f"  warm-up job on {min(n, WARM_N)} images (untimed in the results): {warm:.1f} s", flush=True)
    jobs: dict[str, list[dict]] = {m.name: [] for m in MIXES}
    for rep in range(args.repeats):
        for mix in MIXES:
            info = image_sets[mix.name]
            result = run_job(Path(info["folder"]), runs_dir / f"job-{mix.name}", files_per_task)
            jobs[mix.name].append(result)
            t = result["timing_s"]
            print(
                f"  {mix.title} run {rep + 1}: {result['wall_s']:.1f} s (list {t['list']:.2f}, process "
                f"{t['process']:.1f}, dedup {t['dedup']:.1f}, publish {t['publish']:.1f}), "
                f"{n / result['wall_s']:.1f} img/s, foreign {pct(result['foreign_cpu_share'])}",
                flush=True,
            )
    shutil.rmtree(runs_dir, ignore_errors=True)
    print()

    # 6. results
    rows = []
    for mix in MIXES:
        info = image_sets[mix.name]
        b = pick_median(bare[mix.name], "wall_s")
        j = pick_median(jobs[mix.name], "wall_s")
        bare_rate = n / b["wall_s"]
        job_rate = n / j["wall_s"]
        proc_rate = n / j["timing_s"]["process"]
        ratio = job_rate / RAY_CPUS / bare_rate
        per_core = job_rate / RAY_CPUS
        rows.append(
            {
                "mix": mix.name,
                "title": mix.title,
                "n": n,
                "mean_mp": info["mean_mp"],
                "files_per_task": files_per_task,
                "task_sizes": sizes,
                "bare_images_per_s": bare_rate,
                "job_images_per_s": job_rate,
                "job_images_per_s_per_core": per_core,
                "ratio": ratio,
                "process_images_per_s_per_core": proc_rate / RAY_CPUS,
                "process_ratio": proc_rate / RAY_CPUS / bare_rate,
                "goal_ratio_met": ratio >= 0.8,
                "goal_abs_met": per_core >= 150 if mix.name == "web" else None,
                "bare_median": b,
                "job_median": j,
                "bare_runs": bare[mix.name],
                "job_runs": jobs[mix.name],
            }
        )
    print(f"Table 1: ingest throughput, {n} images per mix (median of {args.repeats} run(s))")
    print(summary_table(rows))
    print("  bare: 1 process, 1 pinned core; job: jobs.ingest.run on local Ray with 2 CPUs, wall time of run()")
    print("  ratio = (job img/s / 2 cores) / bare img/s; process = manifest timing_s.process (the parallel map)")
    print("  2 bare loops: two pinned bare loops at once, each on half of the images (context: what two busy")
    print("  processes get from this machine; not a goal)")
    all_met = all(r["goal_ratio_met"] and r["goal_abs_met"] is not False for r in rows)
    print(f"  goals met: {'YES' if all_met else 'NO'}")
    print()
    print("Table 2: where the time goes")
    print(detail_table(rows))
    print("  list/process/dedup/publish: the manifest's timing_s (dedup = per-bucket duplicate search, publish =")
    print("  copying each bucket's rows into data/ + rejects/); rest = manifest + _SUCCESS + deleting the staging area")
    print("  job CPU = driver + all Ray processes (GCS, raylet, workers), sampled every 0.2 s; foreign = other")
    print("  processes' share of the machine meanwhile; accepted and stored MB: bare loop / job (the bare loop's")
    print("  Parquet holds all rows, the job's data/ the accepted ones)")
    print()
    print("Table 3: the job's process phase (per-task wall and CPU time measured inside the Ray workers)")
    print(process_table(rows))
    print("  task start/end times are relative to the start of run(); 'Ray CPUs busy' = sum of task wall times /")
    print(f"  ({RAY_CPUS} x process s); worker ms/img = summed over tasks / n")

    print()
    report_equal(equal, equal_median, n, MIXES[0].title)  # again, next to the 2-CPU tables
    extra = {
        "repeats": args.repeats,
        "config": {"preset": PRESET, "store_max_pixels": store_cap, "files_per_task": files_per_task},
        "ray": {**ray_info, "warmup_s": warm},
        "results": rows,
        "goals_met": all_met,
        "equal": equal_summary(equal, n, equal_fpt),
    }
    finish(args, env, started, n, image_sets, names, profiles, extra)


def equal_summary(pairs: list[dict], n: int, files_per_task: int) -> dict[str, Any]:
    ratios = [p["ratio"] for p in pairs]
    return {
        "mix": MIXES[0].name,
        "n": n,
        "files_per_task": files_per_task,
        "ratio_min": min(ratios),
        "ratio_median": statistics.median(ratios),
        "ratio_max": max(ratios),
        "goal_met": statistics.median(ratios) >= 0.85,
        "floor_ratio_median": statistics.median(p["floor"]["ratio"] for p in pairs),
        "single_copy_floor_ratio_median": statistics.median(p["single_copy"]["ratio"] for p in pairs),
        "pairs": pairs,
    }


def report_equal(pairs: list[dict], median: dict, n: int, title: str) -> None:
    print(f"Table E1: equal resources, the job on 1 CPU against the bare loop on 1 core ({len(pairs)} pair(s))")
    print(equal_table(title, n, pairs))
    print("  bare: the bare loop pinned to one core; job: jobs.ingest.run on a Ray of its own (num_cpus=1) whose")
    print("  every process (driver, GCS, raylet, workers) is pinned to that same core; Ray's start and one warm-up")
    print("  job are untimed. ratio = job img/s / bare img/s = bare wall / job wall (goal >= 0.85);")
    print("  process-step ratio = bare wall / the manifest's timing_s.process; CPU ratio = the bare loop's CPU")
    print("  seconds / the job's (driver + every Ray process). Pairs run one after the other.")
    print("  floor ratio = bare wall / the floor's wall: the bare loop's own work (read, process_image, records,")
    print("  one Parquet per task) as the job's tasks through jobs.ingest.map_tasks, each floor in a pinned 1-CPU")
    print("  Ray session of its own after the job's (warmed up the same way): what Ray costs before any step of")
    print("  the job's own (staging sort, dedup, publish, index, manifest)")
    print("  single-copy floor ratio: the same with each task file sorted by bucket (row groups of one bucket),")
    print("  then one task reading every file's id column and counting repeated ids: the least a design that")
    print("  writes each image once (no staging copy) and deduplicates across tasks would cost")
    met = statistics.median(p["ratio"] for p in pairs) >= 0.85
    print(f"  goal (median ratio >= 0.85): {'met' if met else 'NOT met'}")
    affinity = ", ".join(f"{k} {v}" for k, v in median["affinity"].items())
    print(f"  affinity seen after the timed job: {affinity}")
    print()
    print(f"Table E2: where the job's wall time goes (the pair with the median ratio, {median['ratio']:.3f})")
    print(equal_breakdown_table(median, n))
    print("  consecutive parts of run(): each Ray Data step (ray_map) as launch (call -> first task starts), in")
    print("  tasks (inside the map function), between tasks (gaps: scheduling, Ray Data block handling), collect")
    print("  (last task ends -> call returns); driver = the step's time outside its ray_map; the manifest's")
    print("  timing_s gives list and the step totals, the benchmark's wrappers the rest")
    print()
    print(equal_steps_table(median))
    print("  driver CPU: the driver process's CPU time (every thread: Ray Data's executor, the CPU sampler) while")
    print("  the step ran; on one core it is time the worker could not run")
    print()
    print("Table E3: inside the process tasks (summed over tasks), against the bare loop")
    print(equal_task_table(median, n))
    print()
    print("Table E4: CPU seconds of the job's processes during run(), against the bare loop")
    print(equal_cpu_table(median))
    sampler = median["job"]["cpu_sampler_s"]
    print(f"  sampled with psutil once a second; the sampling thread ({sampler or 0:.3f} s) is in the driver's share")
    print()


def finish(args: Any, env: dict, started: float, n: int, image_sets: dict, names: list, profiles: dict, extra: dict):
    runtime = time.perf_counter() - started
    env["loadavg_end"] = loadavg()
    env["sources_end"] = source_fingerprint()
    changed = [k for k, v in env["sources_start"].items() if env["sources_end"].get(k) != v]
    env["sources_changed"] = changed
    print(f"runtime {runtime:.1f} s; load average at end (1/5/15 min): {env['loadavg_end']}")
    if changed:
        print(f"WARNING: {', '.join(changed)} changed during the run: the measurements mix code versions; rerun")
    for info in image_sets.values():
        info.pop("paths")
        info.pop("sizes")
    result = {
        "environment": env,
        "quick": args.quick,
        "n": n,
        "runtime_s": runtime,
        "images": {"photos": names, "seed": SEED, "recipe": RECIPE, "quality": JPEG_QUALITY, "sets": image_sets},
        "profile": profiles,
        **extra,
    }
    path = RESULTS.with_name("bench_ingest_equal.json") if args.equal_only else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
