"""CPU benchmark of the cache_latents stage: the Ray Data job (2 encoder actors) against a bare loop that
runs the same per-file work in one process.

    .venv/bin/python benchmarks/bench_cache_latents.py            # 1200 images, tiny encoder, ~2 minutes
    .venv/bin/python benchmarks/bench_cache_latents.py --images 1000 --variant Sd4-Sd4/1x16x64

Data: the first --images JPEGs of bench_ingest.py's web-crawl mix (generated and cached if missing),
ingested with jobs.ingest (cached by key). The encoder: a random-initialised --variant written once in
the published layout (weights do not change the cost).
  bare  one process with torch using every core: jobs.cache_latents.EncodeFiles called in-process on
        each ingest file in turn (decode, deterministic budget resize, encode by grid, bf16 bytes, exact
        channel statistics, Parquet write), into a scratch directory.
  job   jobs.cache_latents.run on a local Ray with 2 CPUs: 2 encoder actors of 1 CPU each (Ray gives each
        one torch thread), wall time of run() (actor start-up included; it is also shown apart).
Equal threads: 2 in both. Goal: job images/s >= 0.8 x bare. Storage: bytes per cached row (all of
data/*.parquet / rows) against the theoretical tokens x channels x 2 bytes of bf16.
Results also go to benchmarks/results/bench_cache_latents.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch
from common import cpu_model, format_table

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".data" / "bench_cache_latents"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_cache_latents.json"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1200)
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--variant", default="Tid2-Tid4/1x16x16")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import bench_train_ae
    import pyarrow.parquet as pq
    import ray

    from jobs.cache_latents import EncodeFiles, cache_settings
    from jobs.cache_latents import run as run_cache
    from jobs.ingest import run as run_ingest
    from vitok_core.checkpoint import save_published
    from vitok_core.config import load_config
    from vitok_core.ingest_output import IngestOutput
    from vitok_core.model import build_autoencoder

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"ViTok-v2 cache_latents benchmark  {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    print(f"cpu: {cpu_model()}  cores: {cores}  torch {torch.__version__}")
    source = bench_train_ae.prepare_source(args.images)
    export = DATA / f"export-{args.variant.replace('/', '_')}"
    if not (export / "encoder.safetensors").is_file():
        torch.manual_seed(0)
        save_published(build_autoencoder(args.variant), str(export), {"variant": args.variant})
    runs = DATA / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    overrides = [
        f"ingest.source={source}",
        f"ingest.root={DATA / 'ingest'}",
        f"data.budgets=[{args.budget}]",
        "data.budget_switch=[]",
        f"cache.root={runs}",
        f"cache.encoder={export}",
        f"cache.budget={args.budget}",
        "cache.actors=2",
        f"model.variant={args.variant}",
    ]
    cfg = load_config("tiny", overrides)
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    ingest = run_ingest(cfg)
    out = IngestOutput(ingest["output"])
    _, files = out.data_files()
    n = out.counts["accepted"]
    print(f"data: {n} images in {len(files)} ingest files; encoder {args.variant}; budget {args.budget}")

    torch.set_num_threads(cores)
    settings = cache_settings(cfg, str(export))
    scratch = DATA / "bare"
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    actor = EncodeFiles(str(export), settings, str(scratch), cfg.cache.batch_size, -1)
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for i, path in enumerate(files):
        actor({"index": [i], "path": [path]})
    bare_s = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"  bare: {n / bare_s:.1f} img/s ({bare_s:.1f} s, encoder load {setup:.1f} s)", flush=True)

    start = time.perf_counter()
    manifest = run_cache(cfg)
    job_s = time.perf_counter() - start
    data = Path(manifest["output"]) / "data"
    stored = sum(p.stat().st_size for p in data.glob("*.parquet"))
    tokens = sum(
        int((t.column("rows").to_numpy().astype(int) * t.column("cols").to_numpy()).sum())
        for t in (pq.read_table(p, columns=["rows", "cols"]) for p in sorted(data.glob("*.parquet")))
    )
    channels = settings_channels(export)
    ray.shutdown()
    theory = tokens * channels * 2 / manifest["rows"]
    per_row = stored / manifest["rows"]
    ratio = (n / job_s) / (n / bare_s)
    rows = [
        [f"bare loop (1 process, {cores} threads)", f"{n / bare_s:.1f}", "1.00", f"{bare_s:.1f}"],
        ["Ray Data job, 2 encoder actors x 1 CPU", f"{n / job_s:.1f}", f"{ratio:.2f}", f"{job_s:.1f}"],
    ]
    print()
    print(format_table(["", "images/s", "ratio", "wall s"], rows))
    print(f"  goal >= 0.8x: {'yes' if ratio >= 0.8 else 'NO'} (job wall includes starting the actors)")
    print(
        f"  storage: {per_row / 1024:.1f} KiB per cached image vs {theory / 1024:.1f} KiB of bf16 latents "
        f"({tokens / manifest['rows']:.0f} tokens x {channels} channels x 2 B): overhead {per_row / theory - 1:+.1%}"
    )
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"args": vars(args), "images": n, "bare_s": bare_s, "job_s": job_s, "ratio": ratio}
            | {"bytes_per_row": per_row, "theoretical_bytes_per_row": theory, "job_manifest": manifest},
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")
    shutil.rmtree(runs, ignore_errors=True)


def settings_channels(export: Path) -> int:
    from vitok_core.checkpoint import read_export_info
    from vitok_core.variants import parse_variant

    return parse_variant(str(read_export_info(str(export))["variant"])).channels


if __name__ == "__main__":
    main()
