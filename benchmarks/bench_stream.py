"""Simulated scale test of the data plane: ingest + training loader over >= 100k small images, with memory and
throughput sampled over time, so the streaming claims (nothing grows with the data set) hold beyond toy sizes.

Run from the repository root:

    .venv/bin/python benchmarks/bench_stream.py                  # 100,000 images (~10-15 minutes on 2 cores)
    .venv/bin/python benchmarks/bench_stream.py --images 5000    # smoke run (~2 minutes)

What runs, in order (each a phase of the timeline):
  generate  N JPEGs (quality 90): image i is a random crop of one of the real photos in the scikit-image wheel,
            resized to 64-128 x 64-96 px (30% portrait), with a brightness/contrast jitter; it depends only on
            (seed, i). Every 200th image is a byte copy of the image 100 before it (0.5% exact duplicates,
            which the ingest must reject). Written as WebDataset tar shards of --shard-size images (key.jpg +
            key.cls), one shard at a time: the generator never holds more than one shard. Cached in
            .data/bench_stream/ (git-ignored) and reused when the same images are asked for again.
  ingest    `jobs.ingest.run` on the shards (preset tiny, ingest.min_side=32 so the small images pass,
            source_format=tar) on a local Ray started with 2 CPUs ('ray_init' phase); a fresh output root
            each run. Progress = images of the shards whose staging file exists (one task = one shard).
  loader    `ShardIndex.build` + `BucketLoader` over the ingest output, as train_ae builds them (tiny preset:
            first budget 64 tokens, its augmentation, train.loader_workers decode processes, shuffle window
            train.shuffle_window), micro-batch --micro-batch, for exactly one epoch of the plan: every image
            once, except each bucket's last partial batch. Ray is shut down before this phase.

The sampler is a separate process (forked first, so the measured driver's threads and GIL cannot delay it).
Every --interval seconds it records: images done in the phase; images/s over the interval; the memory of the
driver and all its descendants except the sampler (Ray's GCS, raylet and workers; DataLoader processes), as
RSS summed and as private memory summed (RSS minus shared pages: the heaps, where a leak would show; Ray's
object store and mapped libraries are shared); the CPU-seconds used by that process tree; and the share of
the machine's CPU taken by everything else ("foreign", from /proc/stat). The machine is shared, so images
per own CPU-second are reported next to images/s: they do not move when another tenant takes cores, only
when the pipeline itself slows down.

Summary per phase: images/s and images per own CPU-second by quarter of a steady window (ingest: from its
first finished task to the end of its parallel step, from the manifest's timings; loader: first to last
batch; start-up is reported on its own), last quarter / first quarter, and max RSS (private) / RSS (private)
at 10% of the phase ("flat memory": close to 1.0). Everything printed is measured in this run. Results go to
benchmarks/results/bench_stream.json.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import itertools
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # loopback only (jobs.common sets it too)
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import psutil
from common import cpu_model, format_table
from PIL import Image

from jobs.ingest import output_uri
from jobs.ingest import run as run_ingest
from vitok_core.config import load_config
from vitok_core.demo import demo_photo_paths
from vitok_core.loader import Augment, BucketLoader, ShardIndex

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".data" / "bench_stream"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_stream.json"
RECIPE = "photo-crop-64-128-q90-dup200-v1"  # bump when the way images are made changes
SEED = 0
DUPLICATE_EVERY = 200  # image i with i % 200 == 199 is a copy of image i - 100
RAY_CPUS = 2


# -- synthetic source ------------------------------------------------------------------------------------
def load_photos() -> list[Image.Image]:
    photos = []
    for path in demo_photo_paths():
        with Image.open(path) as img:
            photos.append(img.convert("RGB"))
    return photos


def make_image(i: int, photos: list[Image.Image]) -> tuple[bytes, int]:
    """(JPEG bytes, class) of image i: a function of (SEED, i) only."""
    if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1:
        return make_image(i - DUPLICATE_EVERY // 2, photos)
    rng = np.random.default_rng([SEED, i])
    label = int(rng.integers(len(photos)))
    photo = photos[label]
    w, h = int(rng.integers(64, 129)), int(rng.integers(64, 97))
    if rng.random() < 0.3:
        w, h = h, w
    # The largest crop of aspect w:h inside the photo, scaled by 0.15-0.6, at a random place.
    scale = min(photo.width / w, photo.height / h) * rng.uniform(0.15, 0.6)
    cw, ch = max(8, int(w * scale)), max(8, int(h * scale))
    x, y = int(rng.integers(0, photo.width - cw + 1)), int(rng.integers(0, photo.height - ch + 1))
    img = photo.crop((x, y, x + cw, y + ch)).resize((w, h), Image.BILINEAR)
    pixels = np.asarray(img, dtype=np.float32) * rng.uniform(0.8, 1.2) + rng.uniform(-20, 20)
    out = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(out, "JPEG", quality=90)
    return out.getvalue(), label


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def generate(n: int, shard_size: int, counter: Any) -> dict[str, Any]:
    """Write (or reuse) the N images as tar shards; returns where they are and what they cost."""
    folder = DATA / f"shards-{n}-{shard_size}"
    marker = folder / "_DONE.json"
    if marker.is_file() and json.loads(marker.read_text()).get("recipe") == RECIPE:
        counter.value = n
        return {**json.loads(marker.read_text()), "reused": True}
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    photos = load_photos()
    start, total_bytes = time.perf_counter(), 0
    for first in range(0, n, shard_size):
        with tarfile.open(folder / f"shard-{first // shard_size:06d}.tar", "w") as tar:
            for i in range(first, min(first + shard_size, n)):
                data, label = make_image(i, photos)
                _add(tar, f"{i:09d}.jpg", data)
                _add(tar, f"{i:09d}.cls", str(label).encode())
                total_bytes += len(data)
                counter.value = i + 1
    info = {
        "recipe": RECIPE,
        "folder": str(folder),
        "images": n,
        "shards": (n + shard_size - 1) // shard_size,
        "shard_size": shard_size,
        "duplicates": sum(1 for i in range(n) if i % DUPLICATE_EVERY == DUPLICATE_EVERY - 1),
        "jpeg_bytes": total_bytes,
        "mean_kb": total_bytes / n / 1024,
        "seconds": time.perf_counter() - start,
    }
    marker.write_text(json.dumps(info, indent=1))
    return {**info, "reused": False}


# -- the sampler process -----------------------------------------------------------------------------------
HEADERS = ["t s", "phase", "phase t", "images", "img/s", "img/cpu-s", "foreign", "RSS MB", "priv MB", "procs"]
WIDTHS = [6, 9, 7, 8, 6, 9, 7, 7, 7, 5]


def _text(cells: list[Any]) -> str:
    return "  ".join(str(c).rjust(w) for c, w in zip(cells, WIDTHS, strict=True))


def _machine_busy_s() -> float:
    """CPU-seconds the whole machine was busy (user, nice, system, irq, softirq, steal) since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:3]) + sum(fields[5:8])) / os.sysconf("SC_CLK_TCK")


def _tree(root: int) -> tuple[float, float, float, int]:
    """(RSS MB, private MB, CPU-seconds, processes) of `root` and its descendants, this sampler left out.

    From /proc/PID/statm and /proc/PID/stat only: /proc/PID/smaps (PSS, USS) takes the process's mmap lock
    and stalled the sampler for up to 40 s while Ray workers mapped and unmapped object-store memory."""
    rss = private = cpu = 0.0
    me = os.getpid()
    try:
        parent = psutil.Process(root)
        procs = [parent, *(p for p in parent.children(recursive=True) if p.pid != me)]
    except psutil.NoSuchProcess:
        return 0.0, 0.0, 0.0, 0
    alive = 0
    for proc in procs:
        try:
            mem, times = proc.memory_info(), proc.cpu_times()
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        rss, private = rss + mem.rss, private + mem.rss - getattr(mem, "shared", 0)
        cpu, alive = cpu + times.user + times.system, alive + 1
    return rss / 2**20, private / 2**20, cpu, alive


def sampler_main(root: int, interval: float, commands: Any, counter: Any, out: str) -> None:
    """Sample until told to stop. Commands: ("phase", name, t0, counting) with counting ("counter",) or
    ("staging", folder, shard sizes), and ("stop",). Samples go to stdout and, as JSON lines, to `out`."""
    ncpu = len(os.sched_getaffinity(0))
    phase, counting, phase_t0, t_start = "start", ("counter",), time.monotonic(), time.monotonic()
    last = {"t": phase_t0, "images": 0, "cpu": _tree(root)[2], "busy": _machine_busy_s()}
    seen_tasks: set[int] = set()
    print(_text(HEADERS), flush=True)
    with open(out, "w") as log:

        def count() -> int:
            if counting[0] == "counter":
                return int(counter.value)
            folder, sizes = counting[1], counting[2]
            with contextlib.suppress(FileNotFoundError):  # staging files "task-NNNNNNN.parquet", until deleted
                seen_tasks.update(int(n[5:12]) for n in os.listdir(folder) if n.endswith(".parquet"))
            return sum(sizes[t] for t in seen_tasks)

        def sample() -> None:
            t, busy = time.monotonic(), _machine_busy_s()
            images, (rss, private, cpu, procs) = count(), _tree(root)
            dt_, dn, dcpu = t - last["t"], images - last["images"], cpu - last["cpu"]
            row = {
                "t": round(t - t_start, 2),
                "phase": phase,
                "phase_t": round(t - phase_t0, 2),
                "images": images,
                "images_per_s": round(dn / dt_, 1) if dt_ > 0.5 else None,
                "images_per_cpu_s": round(dn / dcpu, 1) if dt_ > 0.5 and dcpu > 0.05 else None,
                "own_cpu_share": round(dcpu / (ncpu * dt_), 3) if dt_ > 0.5 and dcpu >= 0 else None,
                # (a process that exits takes its CPU-seconds along: no foreign share for that interval)
                "foreign_cpu_share": round(max(0.0, busy - last["busy"] - dcpu) / (ncpu * dt_), 3)
                if dt_ > 0.5 and dcpu >= 0
                else None,
                "tree_cpu_s": round(cpu, 2),
                "rss_mb": round(rss, 1),
                "private_mb": round(private, 1),
                "processes": procs,
                "loadavg": round(os.getloadavg()[0], 2),
            }
            log.write(json.dumps(row) + "\n")
            log.flush()
            if dt_ > 0.5:
                last.update(t=t, images=images, cpu=cpu, busy=busy)
            rate, eff, foreign = (row[k] for k in ("images_per_s", "images_per_cpu_s", "foreign_cpu_share"))
            print(
                _text(
                    [
                        f"{row['t']:.0f}",
                        phase,
                        f"{row['phase_t']:.0f}",
                        images,
                        "-" if rate is None else f"{rate:.0f}",
                        "-" if eff is None else f"{eff:.0f}",
                        "-" if foreign is None else f"{foreign:.0%}",
                        f"{rss:.0f}",
                        f"{private:.0f}",
                        procs,
                    ]
                ),
                flush=True,
            )

        next_tick = time.monotonic()
        while True:
            try:
                message = commands.get(timeout=max(0.0, next_tick - time.monotonic()))
            except queue.Empty:
                sample()
                next_tick += interval
                continue
            if message[0] == "stop":
                sample()
                return
            _, phase, phase_t0, counting = message
            seen_tasks.clear()
            last.update(t=phase_t0, images=0)
            sample()


class Sampler:
    """The driver's handle on the sampler process."""

    def __init__(self, interval: float, out: Path) -> None:
        context = mp.get_context("fork")  # forked before Ray or any thread starts
        self.commands, self.counter, self.out = context.Queue(), context.RawValue("q", 0), out
        self.process = context.Process(
            target=sampler_main, args=(os.getpid(), interval, self.commands, self.counter, str(out)), daemon=True
        )
        self.process.start()

    def phase(self, name: str, counting: tuple[Any, ...] = ("counter",)) -> float:
        """Start a phase now; returns its start on the monotonic clock."""
        self.counter.value = 0
        t0 = time.monotonic()
        self.commands.put(("phase", name, t0, counting))
        return t0

    def stop(self) -> list[dict[str, Any]]:
        self.commands.put(("stop",))
        self.process.join(timeout=60)
        return [json.loads(line) for line in self.out.read_text().splitlines()]


# -- summaries ---------------------------------------------------------------------------------------------
def _at(samples: list[dict[str, Any]], t: float, key: str) -> float:
    """Linear interpolation of `key` at phase time t."""
    return float(np.interp(t, [s["phase_t"] for s in samples], [s[key] for s in samples]))


def _with_cpu_done(samples: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Samples with `cpu_done`: the tree's CPU-seconds summed over positive steps only (a process that exits
    takes its CPU-seconds out of the tree's total; that interval then counts nothing)."""
    out, total = [], 0.0
    for prev, cur in zip([samples[0], *samples[:-1]], samples, strict=True):
        total += max(0.0, cur["tree_cpu_s"] - prev["tree_cpu_s"])
        out.append({**cur, "cpu_done": total})
    return out


def steady_window(samples: list[dict[str, Any]], start: float) -> tuple[float, float]:
    """(start, time 95% of the phase's images were done): the drain of the last tasks / batches left out."""
    target = 0.95 * samples[-1]["images"]
    for prev, cur in itertools.pairwise(samples):
        if cur["images"] >= target > prev["images"]:
            frac = (target - prev["images"]) / (cur["images"] - prev["images"])
            return start, prev["phase_t"] + frac * (cur["phase_t"] - prev["phase_t"])
    return start, samples[-1]["phase_t"]


def phase_summary(samples: list[dict[str, Any]], start: float, end: float, quarters: bool = True) -> dict[str, Any]:
    """Throughput and CPU efficiency by quarter of [start, end] (phase time); memory over the whole phase."""
    samples = _with_cpu_done(samples)
    length = end - start
    marks = [start + length * q / 4 for q in range(5)]
    done = [_at(samples, m, "images") for m in marks]
    cpu = [_at(samples, m, "cpu_done") for m in marks]
    rates = [(done[q + 1] - done[q]) / (length / 4) for q in range(4)] if length > 0 else [0.0] * 4
    per_cpu = [(done[q + 1] - done[q]) / max(cpu[q + 1] - cpu[q], 1e-9) for q in range(4)]
    inside = [s for s in samples if start < s["phase_t"] <= end and s["foreign_cpu_share"] is not None]
    after = [s for s in samples if s["phase_t"] >= samples[-1]["phase_t"] * 0.1]
    rss10, private10 = after[0]["rss_mb"], after[0]["private_mb"]
    rss_max, private_max = max(s["rss_mb"] for s in samples), max(s["private_mb"] for s in samples)
    return {
        "window_s": [round(start, 1), round(end, 1)],
        "images": round(done[-1] - done[0]),
        "images_per_s": round((done[-1] - done[0]) / length, 1) if length > 0 else None,
        "images_per_cpu_s": round((done[-1] - done[0]) / max(cpu[-1] - cpu[0], 1e-9), 1),
        "quarter_images_per_s": [round(q, 1) for q in rates] if quarters else None,
        "quarter_images_per_cpu_s": [round(q, 1) for q in per_cpu] if quarters else None,
        "last_vs_first_quarter": round(rates[3] / rates[0], 3) if quarters and rates[0] else None,
        "last_vs_first_quarter_per_cpu_s": round(per_cpu[3] / per_cpu[0], 3) if quarters and per_cpu[0] else None,
        "foreign_cpu_share_mean": round(float(np.mean([s["foreign_cpu_share"] for s in inside])), 3)
        if inside
        else None,
        "samples_in_window": len(inside),
        "rss_mb_at_10pct": rss10,
        "rss_mb_max": rss_max,
        "max_vs_10pct_rss": round(rss_max / rss10, 3),
        "private_mb_at_10pct": private10,
        "private_mb_max": private_max,
        "max_vs_10pct_private": round(private_max / private10, 3),
    }


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Per-phase summaries from the samples. Steady windows (phase time) leave out start-up (Ray workers
    importing the job, DataLoader processes spawning) and the drain: the ingest's runs from its first sample
    with a finished task, the loader's from its first batch, each to when 95% of its images were done."""
    by_phase = {p: [s for s in result["samples"] if s["phase"] == p] for p in ("generate", "ingest", "loader")}
    summary = {}
    if not result["source"]["reused"]:
        summary["generate"] = phase_summary(by_phase["generate"], *steady_window(by_phase["generate"], 0.0))
    ingest = by_phase["ingest"]
    first_task = next(s["phase_t"] for s in ingest if s["images"] > 0)
    summary["ingest_process"] = phase_summary(ingest, *steady_window(ingest, first_task))
    summary["ingest_all"] = phase_summary(ingest, 0.0, ingest[-1]["phase_t"], quarters=False)
    summary["loader"] = phase_summary(
        by_phase["loader"], *steady_window(by_phase["loader"], result["loader"]["first_batch_s"])
    )
    return summary


def report(result: dict[str, Any]) -> None:
    """The printed summary of a run."""
    source, ingest, index, loader = (result[k] for k in ("source", "ingest", "index", "loader"))
    timing, counts = ingest["timing_s"], ingest["counts"]
    gen = "reused" if source["reused"] else f"{source['seconds']:.0f} s"
    print(f"\nsource: {source['images']} JPEGs ({source['mean_kb']:.1f} KiB mean) in {source['shards']} shards ({gen})")
    print(
        f"ingest: {timing['total']:.0f} s ({timing['process']:.0f} s process, {timing['dedup']:.0f} s dedup, "
        f"{timing['publish']:.0f} s publish), first task done by {ingest['first_task_done_by_s']:.0f} s; "
        f"read {counts['read']}, accepted {counts['accepted']} (expected {ingest['expected_accepted']}), "
        f"rejected {counts['rejected_by_reason']}"
    )
    print(
        f"loader: index of {index['files']} files, {index['row_groups']} row groups, {index['buckets']} buckets in "
        f"{index['seconds']:.2f} s; {loader['batches']} batches, {loader['images']} images "
        f"({100 * loader['coverage']:.1f}% of {index['rows']}) in {loader['seconds']:.0f} s, "
        f"first batch after {loader['first_batch_s']:.0f} s"
    )
    rows = []
    for name, s in result["summary"].items():
        quarters = s["quarter_images_per_s"]
        rows.append(
            [
                name,
                f"{s['window_s'][1] - s['window_s'][0]:.0f}",
                s["images"],
                s["images_per_s"],
                " / ".join(f"{q:.0f}" for q in quarters) if quarters else "-",
                s["last_vs_first_quarter"] or "-",
                " / ".join(f"{q:.0f}" for q in s["quarter_images_per_cpu_s"]) if quarters else "-",
                s["last_vs_first_quarter_per_cpu_s"] or "-",
                "-" if s["foreign_cpu_share_mean"] is None else f"{s['foreign_cpu_share_mean']:.0%}",
                f"{s['rss_mb_at_10pct']:.0f}",
                f"{s['rss_mb_max']:.0f}",
                s["max_vs_10pct_rss"],
                s["max_vs_10pct_private"],
            ]
        )
    headers = ["phase", "s", "images", "img/s", "img/s by quarter", "Q4/Q1", "img/cpu-s by quarter", "Q4/Q1"]
    print("\n" + format_table([*headers, "foreign", "RSS@10%", "RSS max", "max/10%", "private max/10%"], rows))


def git_head() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
        return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except OSError:
        return "?"


def epoch_batches(loader: BucketLoader) -> tuple[int, int]:
    """(batches, images) of epoch 0 of the loader's plan."""
    batches = images = 0
    for position, _, rows in loader.plan():
        if position.epoch > 0:
            break
        batches, images = batches + 1, images + len(rows)
    return batches, images


# -- main ----------------------------------------------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100_000, help="synthetic images (default 100000)")
    parser.add_argument("--shard-size", type=int, default=500, help="images per tar shard = per ingest task")
    parser.add_argument("--micro-batch", type=int, default=32, help="loader micro-batch (images)")
    parser.add_argument("--interval", type=float, default=0.0, help="seconds between samples (0: by size)")
    parser.add_argument("--summary-only", action="store_true", help=f"summarise {RESULTS.name} again, run nothing")
    args = parser.parse_args()
    if args.summary_only:
        result = json.loads(RESULTS.read_text())
        result["summary"] = summarize(result)
        RESULTS.write_text(json.dumps(result, indent=1))
        report(result)
        return
    interval = args.interval or (2.0 if args.images <= 20_000 else 4.0)
    memory_gib = psutil.virtual_memory().total / 2**30
    env = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{cpu_model()}, {len(os.sched_getaffinity(0))} cores, {memory_gib:.1f} GiB",
        "python": platform.python_version(),
        "git_head": git_head(),
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }
    print(f"bench_stream: {args.images} images, shards of {args.shard_size}; {env['machine']}; {env['date']}")
    DATA.mkdir(parents=True, exist_ok=True)
    sampler = Sampler(interval, DATA / f"samples-{args.images}.jsonl")
    starts = {"generate": sampler.phase("generate")}
    source = generate(args.images, args.shard_size, sampler.counter)
    shard_sizes = [min(args.shard_size, args.images - i) for i in range(0, args.images, args.shard_size)]

    root = DATA / f"runs-{args.images}"
    shutil.rmtree(root, ignore_errors=True)
    overrides = [
        f"ingest.source={source['folder']}",
        f"ingest.root={root}",
        "ingest.min_side=32",
        "ingest.source_format=tar",
    ]
    cfg = load_config("tiny", overrides)
    staging_tasks = f"{output_uri(cfg)}/_staging/tasks"

    import ray

    starts["ray_init"] = sampler.phase("ray_init")
    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
    starts["ingest"] = sampler.phase("ingest", ("staging", staging_tasks, shard_sizes))
    manifest = run_ingest(cfg)
    starts["shutdown"] = sampler.phase("shutdown")
    ray.shutdown()
    timing = manifest["timing_s"]

    starts["loader"] = sampler.phase("loader")
    start = time.perf_counter()
    index = ShardIndex.build(manifest["output"], budget=cfg.data.budgets[0])
    index_s = time.perf_counter() - start
    loader = BucketLoader(
        index,
        micro_batch=args.micro_batch,
        seed=cfg.train.seed,
        patch_size=16,
        augment=Augment.from_config(cfg.data.augment),
        window=cfg.train.shuffle_window,
        workers=cfg.train.loader_workers,
    )
    n_batches, n_images = epoch_batches(loader)
    images = tokens = 0
    grids, first_batch, last_batch = set(), None, 0.0
    for k, batch in enumerate(loader.batches()):
        if k == n_batches:
            break
        images += int(batch["patches"].shape[0])
        tokens += int(batch["patch_mask"].sum())
        sampler.counter.value = images
        grids.add(tuple(batch["grid"][0].tolist()))
        last_batch = time.monotonic() - starts["loader"]
        first_batch = first_batch or last_batch
    loader_s = time.monotonic() - starts["loader"]  # includes the index and stopping the DataLoader processes
    samples = sampler.stop()
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]

    process_end = timing["list"] + timing["process"]
    first_task = next((s["phase_t"] for s in samples if s["phase"] == "ingest" and s["images"] > 0), process_end)
    counts = manifest["counts"]
    expected_accepted = args.images - source["duplicates"]
    result = {
        "environment": env,
        "args": vars(args) | {"interval": interval},
        "source": source,
        "ingest": {
            "output": manifest["output"],
            "seconds": timing["total"],
            "timing_s": timing,
            "first_task_done_by_s": first_task,
            "images_per_s": args.images / timing["total"],
            "images_per_s_per_core": args.images / timing["total"] / RAY_CPUS,
            "counts": {k: counts[k] for k in ("read", "accepted", "rejected", "rejected_by_reason")},
            "expected_accepted": expected_accepted,
            "counts_ok": counts["accepted"] == expected_accepted
            and counts["rejected_by_reason"] == {"duplicate": source["duplicates"]},
        },
        "index": {
            "seconds": index_s,
            "files": len(index.whole().files),
            "row_groups": sum(index.layout.group_units),
            "blocks": index.blocks,
            "rows": index.rows,
            "buckets": len(index.bucket_sizes()),
        },
        "loader": {
            "seconds": loader_s,
            "first_batch_s": first_batch,
            "last_batch_s": last_batch,
            "batches": n_batches,
            "planned_images": n_images,
            "images": images,
            "tokens": tokens,
            "images_per_s": images / loader_s,
            "steady_images_per_s": images / (last_batch - first_batch) if first_batch else None,
            "tokens_per_s": tokens / loader_s,
            "workers": cfg.train.loader_workers,
            "micro_batch": args.micro_batch,
            "budget": cfg.data.budgets[0],
            "grids_seen": len(grids),
            "coverage": images / index.rows,
        },
        "samples": samples,
    }
    result["summary"] = summarize(result)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=1))
    report(result)
    print(f"\nwritten to {RESULTS.relative_to(REPO)}")


if __name__ == "__main__":
    main()
