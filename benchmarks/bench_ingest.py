"""CPU benchmark of the ingest stage: the Ray Data job (`jobs.ingest.run`) against a bare single-core loop.

Run from the repository root:

    .venv/bin/python benchmarks/bench_ingest.py             # 2 x 2000 images, about 7 minutes on 2 cores
    .venv/bin/python benchmarks/bench_ingest.py --quick     # 2 x 300 images, about 2 minutes
    .venv/bin/python benchmarks/bench_ingest.py --n 5000 --repeats 3

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
              the job's own record dicts, and one Parquet file per 256 images (pyarrow), like the staging
              files. img/s = n / wall seconds of that loop.
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
              replaces jobs.ingest.ingest_task with a wrapper that calls it in the Ray worker and writes the
              task's wall/CPU times to a small JSON file beside the staging area.
  profile     cProfile of process_image over a sample of each mix (header, EXIF, decode, resize, encode,
              SHA-256 ...), run in-process before Ray starts; cProfile inflates Python-level calls
              (exif_transpose, Image.open), so read the shares as rough.
CPU-seconds: the bare loop's own process time; for the job, the driver plus every Ray process under it
(psutil, sampled every 0.2 s). "foreign" is the share of the machine's CPU taken by other processes
meanwhile (from /proc/stat): the machine is shared, so also read the load average printed at start and end.
Results also go to benchmarks/results/bench_ingest.json (with per-task timelines of the job).

Goals checked: Ray job img/s per core >= 0.8 x the bare loop on both mixes, and >= 150 img/s/core on (a).
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
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (jobs.common sets it too)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")  # as in the tests: keeps the output readable

import numpy as np
import pyarrow as pa
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
    up to its last sample (at most `interval` of its CPU time is missed). None without psutil."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self.seconds: float | None = None

    def _sample(self) -> dict[int, float]:
        import psutil

        me = psutil.Process()
        out = {}
        for proc in [me, *me.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                out[proc.pid] = t.user + t.system
            except psutil.Error:
                pass
        return out

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._last.update(self._sample())

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
        self.seconds = sum(t - self._first.get(pid, 0.0) for pid, t in self._last.items())


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


def _bare_loop(paths: list[str], overrides: list[str], out_dir: str, cpu: int) -> dict[str, Any]:
    """Child process: the job's per-image work on one pinned core, timed."""
    os.sched_setaffinity(0, {cpu})
    cfg = load_config(PRESET, overrides)
    settings = ingest_settings(cfg)
    rules, budgets = rules_from(settings), settings["budgets"]
    schema = row_schema(budgets)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    accepted, parts, records = 0, 0, []
    busy0, wall0, cpu0 = machine_busy_seconds(), time.perf_counter(), time.process_time()
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        outcome = process_image(data, rules)
        accepted += outcome.accepted
        records.append(_record(path, "", outcome, budgets))
        if len(records) == PART_ROWS:
            pq.write_table(pa.Table.from_pylist(records, schema=schema), out / f"part-{parts:05d}.parquet")
            parts, records = parts + 1, []
    if records:
        pq.write_table(pa.Table.from_pylist(records, schema=schema), out / f"part-{parts:05d}.parquet")
        parts += 1
    wall, cpu_s, busy1 = time.perf_counter() - wall0, time.process_time() - cpu0, machine_busy_seconds()
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    foreign = foreign_share(busy, cpu_s, wall, len(available_cores()))
    return {"wall_s": wall, "cpu_s": cpu_s, "foreign_cpu_share": foreign, "accepted": accepted, "parquet_files": parts}


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


def _timed_ingest_task(item: dict[str, Any], settings: dict[str, Any], staging: str) -> dict[str, Any]:
    """Runs in a Ray worker in place of jobs.ingest.ingest_task: the same call, plus its wall/CPU times
    written to {staging}_bench/ (read by run_job; the job never looks there)."""
    import jobs.ingest as job

    fn = getattr(job, "_bench_original_ingest_task", job.ingest_task)  # in a worker: the unpatched one
    start, cpu0 = time.time(), time.process_time()
    result = fn(item, settings, staging)
    record = {"task": item["task"], "images": json.loads(result["summary"])["read"], "start": start}
    record.update(end=time.time(), cpu_s=time.process_time() - cpu0, pid=os.getpid())
    folder = f"{staging}_bench"
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f"task-{item['task']:07d}.json"), "w") as f:
        json.dump(record, f)
    return result


@contextlib.contextmanager
def instrumented_job():
    """Time each task of the job's process step by swapping jobs.ingest.ingest_task for a timing wrapper
    while the run lasts (the repository's files are untouched)."""
    from ray import cloudpickle

    import jobs.ingest as job

    if __name__ != "__main__":  # imported (benchmarks/ is not on the workers' path): ship the wrapper by value
        cloudpickle.register_pickle_by_value(sys.modules[__name__])
    job._bench_original_ingest_task = job.ingest_task
    job.ingest_task = _timed_ingest_task
    try:
        yield
    finally:
        job.ingest_task = job._bench_original_ingest_task
        del job._bench_original_ingest_task


def task_stats(records: list[dict], run_start: float, process_s: float, n: int) -> dict[str, Any]:
    """Per-task timings of one job run -> utilisation of the Ray CPUs during the process phase."""
    if not records:
        return {}
    busy = sum(r["end"] - r["start"] for r in records)
    return {
        "tasks": len(records),
        "worker_pids": len({r["pid"] for r in records}),
        "first_task_start_s": min(r["start"] for r in records) - run_start,
        "last_task_end_s": max(r["end"] for r in records) - run_start,
        "task_wall_s": sorted(r["end"] - r["start"] for r in records),
        "task_busy_s": busy,
        "worker_cpu_s": sum(r["cpu_s"] for r in records),
        "worker_cpu_ms_per_image": 1000 * sum(r["cpu_s"] for r in records) / n,
        "worker_wall_ms_per_image": 1000 * busy / n,
        # Share of the Ray CPUs' time in the process phase spent inside process_task.
        "process_utilisation": busy / (RAY_CPUS * process_s) if process_s > 0 else None,
        "timeline": [
            {"task": r["task"], "pid": r["pid"], "images": r["images"], "start_s": r["start"] - run_start}
            | {"end_s": r["end"] - run_start, "cpu_s": r["cpu_s"]}
            for r in sorted(records, key=lambda r: r["start"])
        ],
    }


def run_job(source: Path, root: Path, files_per_task: int) -> dict[str, Any]:
    from jobs.ingest import run

    shutil.rmtree(root, ignore_errors=True)
    cfg = load_config(PRESET, job_overrides(source, root, files_per_task))
    with instrumented_job(), TreeCPU() as tree:
        busy0, run_start, start = machine_busy_seconds(), time.time(), time.perf_counter()
        manifest = run(cfg)
        wall = time.perf_counter() - start
        busy1 = machine_busy_seconds()
    busy = None if busy0 is None or busy1 is None else busy1 - busy0
    output = Path(manifest["output"])
    stored = sum(p.stat().st_size for p in (output / "data").rglob("*.parquet")) / 2**20
    records = [json.loads(p.read_text()) for p in sorted((output / "_staging_bench").glob("task-*.json"))]
    n = manifest["counts"]["read"]
    shutil.rmtree(root, ignore_errors=True)
    return {
        "wall_s": wall,
        "timing_s": manifest["timing_s"],
        "tasks": task_stats(records, run_start, manifest["timing_s"]["process"], n),
        "counts": manifest["counts"],
        "cpu_s": tree.seconds,
        "foreign_cpu_share": foreign_share(busy, tree.seconds, wall, len(available_cores())),
        "stored_mb": stored,
    }


def start_ray() -> dict[str, Any]:
    import ray

    start = time.perf_counter()
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
    import ray.data  # configures its loggers on import

    # Console only (the file log under /tmp/ray stays as it is): Ray Data prints INFO lines per dataset run.
    for handler in logging.getLogger("ray.data").handlers:
        if isinstance(handler, logging.StreamHandler):
            handler.setLevel(logging.WARNING)
    return {"init_s": time.perf_counter() - start, "cpus": ray.cluster_resources().get("CPU")}


def warm_up(paths: list[str], n: int) -> float:
    """One untimed job on n images (links into a scratch folder): Ray starts its workers, which import the job."""
    folder = DATA / "runs" / "warmup-source"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for path in paths[:n]:
        (folder / Path(path).name).symlink_to(path)
    start = time.perf_counter()
    run_job(folder, DATA / "runs" / "warmup", choose_files_per_task(n, n, RAY_CPUS))
    shutil.rmtree(folder, ignore_errors=True)
    return time.perf_counter() - start


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
    args = parser.parse_args()
    n = args.n or (300 if args.quick else 2000)
    profile_n = args.profile_n if args.profile_n is not None else (100 if args.quick else 300)
    started = time.perf_counter()
    cores = available_cores()
    env = environment()

    base = load_config(PRESET, [f"ingest.source={DATA}"])
    default_fpt, store_cap = base.ingest.files_per_task, base.ingest.store_max_pixels
    files_per_task = args.files_per_task or choose_files_per_task(n, default_fpt, RAY_CPUS)

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
    for mix in MIXES:
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
        for mix in MIXES:
            paths = image_sets[mix.name]["paths"]
            step = max(1, len(paths) // profile_n)
            profiles[mix.name] = profile_mix(paths[::step][:profile_n], rules)
        print(f"Profile: cProfile of process_image, {profile_n} images per mix (evenly spaced), cumulative times")
        print(profile_table(profiles))
        print()

    # 3. bare loops (before Ray starts, so its idle processes do not share the core)
    runs_dir = DATA / "runs"
    pin = cores[0]
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

    # 4. Ray job
    ray_info = start_ray()
    print(f"Ray: ray.init(num_cpus={RAY_CPUS}, include_dashboard=False) took {ray_info['init_s']:.1f} s", flush=True)
    warm = warm_up(image_sets[MIXES[0].name]["paths"], min(n, 32))
    print(f"  warm-up job on {min(n, 32)} images (untimed in the results): {warm:.1f} s", flush=True)
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

    # 5. results
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

    runtime = time.perf_counter() - started
    env["loadavg_end"] = loadavg()
    env["sources_end"] = source_fingerprint()
    changed = [k for k, v in env["sources_start"].items() if env["sources_end"].get(k) != v]
    env["sources_changed"] = changed
    print()
    print(f"runtime {runtime:.1f} s; load average at end (1/5/15 min): {env['loadavg_end']}")
    if changed:
        print(f"WARNING: {', '.join(changed)} changed during the run: the measurements mix code versions; rerun")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    for info in image_sets.values():
        info.pop("paths")
        info.pop("sizes")
    result = {
        "environment": env,
        "quick": args.quick,
        "n": n,
        "repeats": args.repeats,
        "runtime_s": runtime,
        "config": {"preset": PRESET, "store_max_pixels": store_cap, "files_per_task": files_per_task},
        "images": {"photos": names, "seed": SEED, "recipe": RECIPE, "quality": JPEG_QUALITY, "sets": image_sets},
        "ray": {**ray_info, "warmup_s": warm},
        "profile": profiles,
        "results": rows,
        "goals_met": all_met,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
