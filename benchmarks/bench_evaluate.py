"""CPU benchmark of the evaluate stage: the cost of each metric per image, and the Ray Data job (2 actors)
against a bare loop that runs the same per-task work in one process.

    .venv/bin/python benchmarks/bench_evaluate.py                  # 64 images, ~6 minutes on 2 cores
    .venv/bin/python benchmarks/bench_evaluate.py --images 128 --skip-extractors

Part 1, time per image of each metric (one process, torch on every core, --metric-images real-photo
crops at 256 x 256): PSNR, SSIM, the FID Inception features (299 bicubic), DINOv2 ViT-L/14 CLS at 224,
DINOv3 ViT-B/16 CLS at 512 (random weights: the cost does not depend on them), and the Frechet distance
of two 2048-d sets, once by the low-rank path (sets of --metric-images) and once by sqrtm (sets larger
than 2048, which is what 50k-image evaluations use), per distance.
Part 2, the job: the first --images JPEGs of bench_ingest.py's web-crawl mix as a folder eval set, a
random-initialised tiny autoencoder, the default settings (256p centre crop, 512p centre crop, 1024p
native), bicubic baseline, Inception features.
  bare  jobs.evaluate.EvaluateTasks called in-process on every task in turn (decode, references, encode +
        decode, bicubic, scores, features, staging files), torch on every core.
  job   jobs.evaluate.run on a local Ray with 2 CPUs: 2 actors of 1 CPU each, wall time of run() (actor
        start-up, merge, distances, figures and report included).
Results also go to benchmarks/results/bench_evaluate.json.
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

import numpy as np
import torch
from common import cpu_model, format_table

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".data" / "bench_evaluate"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_evaluate.json"


def per_metric(n: int, skip_extractors: bool) -> list[tuple[str, float, str]]:
    """(metric, seconds per image or per distance, unit) for each metric."""
    from vitok_core.config import load_config
    from vitok_core.demo import load_demo_images
    from vitok_core.evaluation import center_crop
    from vitok_core.features import build_extractor
    from vitok_core.images import to_uint8
    from vitok_core.metrics import FeatureStats, frechet_distance_of, psnr, ssim_image

    photos = load_demo_images()
    refs = [center_crop(photos[i % len(photos)], 256 + 8 * (i // len(photos))) for i in range(n)]
    refs = [r[:, :256, :256] for r in refs]
    recons = [(r + 0.05 * torch.randn_like(r)).clamp(-1, 1) for r in refs]
    as_uint8 = [to_uint8(r) for r in refs]
    rows = []

    def timed(name: str, fn, count: int, unit: str = "image") -> None:
        fn()  # warm-up (first calls allocate and pick kernels)
        start = time.perf_counter()
        fn()
        rows.append((name, (time.perf_counter() - start) / count, unit))
        print(f"  {name}: {rows[-1][1] * 1000:.1f} ms (per {unit})", flush=True)

    timed("PSNR", lambda: [psnr(a, b) for a, b in zip(recons, refs, strict=True)], n)
    timed("SSIM", lambda: [ssim_image(a, b) for a, b in zip(recons, refs, strict=True)], n)
    cfg = load_config("tiny", ["evaluate.dinov2_weights=''", "evaluate.dinov3_weights=''"]).evaluate
    names = ["inception"] + ([] if skip_extractors else ["dinov2", "dinov3"])
    labels = {
        "inception": "Inception features (299)",
        "dinov2": "DINOv2 ViT-L/14 CLS (224)",
        "dinov3": "DINOv3 ViT-B/16 CLS (512)",
    }
    for name in names:
        extractor = build_extractor(name, cfg)
        timed(labels[name], lambda e=extractor: [e(as_uint8[i : i + 8]) for i in range(0, n, 8)], n)
        del extractor
    rng = np.random.default_rng(0)
    small = [FeatureStats(2048), FeatureStats(2048)]
    for stats in small:
        stats.update(rng.normal(size=(n, 2048)))
    timed(f"Frechet 2048-d, {n} vs {n} (low-rank)", lambda: frechet_distance_of(*small), 1, "distance")
    large = [FeatureStats(2048, keep_rows=0), FeatureStats(2048, keep_rows=0)]
    for stats in large:
        stats.update(rng.normal(size=(3000, 2048)))
    start = time.perf_counter()
    frechet_distance_of(*large)  # one run: it is seconds long
    rows.append(("Frechet 2048-d, 3000 vs 3000 (sqrtm)", time.perf_counter() - start, "distance"))
    print(f"  {rows[-1][0]}: {rows[-1][1]:.1f} s", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--metric-images", type=int, default=16)
    parser.add_argument("--variant", default="Tid2-Tid4/1x16x16")
    parser.add_argument("--skip-extractors", action="store_true", help="time only Inception among the networks")
    parser.add_argument("--skip-metrics", action="store_true", help="part 2 only")
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    import bench_train_ae
    import ray

    from jobs.evaluate import EvaluateTasks, list_images, models_of
    from jobs.evaluate import run as run_evaluate
    from vitok_core.checkpoint import save_published
    from vitok_core.config import load_config, to_dict
    from vitok_core.model import build_autoencoder

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    torch.set_num_threads(cores)
    print(f"ViTok-v2 evaluate benchmark  {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    print(f"cpu: {cpu_model()}  cores: {cores}  torch {torch.__version__}")
    print(f"part 1: time per image of each metric ({args.metric_images} images of 256 x 256)")
    metric_rows = [] if args.skip_metrics else per_metric(args.metric_images, args.skip_extractors)

    source = bench_train_ae.prepare_source(args.images)
    export = DATA / f"export-{args.variant.replace('/', '_')}"
    if not (export / "encoder.safetensors").is_file():
        torch.manual_seed(0)
        save_published(build_autoencoder(args.variant), str(export), {"variant": args.variant})
    runs = DATA / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    overrides = [
        f"evaluate.data={source}",
        f"evaluate.autoencoder={export}",
        f"evaluate.root={runs}",
        "evaluate.features=[inception]",
        "evaluate.actors=2",
        "evaluate.max_images=0",
    ]
    cfg = load_config("tiny", overrides)
    _, tasks = list_images(cfg)
    images = sum(t["count"] for t in tasks)
    print(f"part 2: the job on {images} images ({len(tasks)} tasks), {args.variant}, 3 settings", flush=True)
    scratch = DATA / "bare"
    shutil.rmtree(scratch, ignore_errors=True)
    start = time.perf_counter()
    actor = EvaluateTasks(to_dict(cfg), models_of(cfg), str(scratch))
    setup = time.perf_counter() - start
    start = time.perf_counter()
    for i, task in enumerate(tasks):
        actor({"task": [json.dumps({**task, "index": i})]})
    bare_s = time.perf_counter() - start
    shutil.rmtree(scratch, ignore_errors=True)
    print(f"  bare: {images / bare_s:.2f} img/s ({bare_s:.1f} s, models load {setup:.1f} s)", flush=True)

    ray.init(address="local", num_cpus=2, include_dashboard=False)
    start = time.perf_counter()
    manifest = run_evaluate(cfg)
    job_s = time.perf_counter() - start
    ray.shutdown()
    ratio = bare_s / job_s
    print()
    print(format_table(["metric", "ms", "per"], [[m, f"{s * 1000:.1f}", u] for m, s, u in metric_rows]))
    print()
    rows = [
        [f"bare loop (1 process, {cores} threads)", f"{images / bare_s:.2f}", "1.00", f"{bare_s:.1f}"],
        ["Ray Data job, 2 actors x 1 CPU", f"{images / job_s:.2f}", f"{ratio:.2f}", f"{job_s:.1f}"],
    ]
    print(format_table(["", "images/s", "ratio", "wall s"], rows))
    print("  (an image is 3 settings x [reference + autoencoder + bicubic]: 3 reconstructions, 9 Inception passes)")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"args": vars(args), "metrics": metric_rows, "bare_s": bare_s, "job_s": job_s, "ratio": ratio}
            | {"job_manifest": manifest},
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")
    shutil.rmtree(runs, ignore_errors=True)


if __name__ == "__main__":
    main()
