"""CPU benchmark of the train_ae stage: the Ray Train + DeepSpeed ZeRO-3 job (2 workers) against a bare
single-process PyTorch loop on the same model, data and global batch.

    .venv/bin/python benchmarks/bench_train_ae.py                 # tiny preset, 30 steps each, ~3 minutes
    .venv/bin/python benchmarks/bench_train_ae.py --steps 15 --variant Sd2-Sd4/1x16x16

Data: the first --images JPEGs of bench_ingest.py's web-crawl mix (random crops of the photos in the
scikit-image wheel, long side 256-1024; generated and cached under .data/bench_ingest/ if missing),
ingested once with jobs.ingest into .data/bench_train_ae/ (cached by the ingest key).

Both sides train the same variant from the same seed at one token budget (--budget, default 256) with a
global batch of --batch images: the same ReconstructionLoss (Charbonnier + SSIM; DINO off as in the tiny
preset), torch AdamW with the same parameter groups, lr schedule and gradient clipping, and batches from
vitok_core.loader.BucketLoader decoded in the training process (loader_workers=0 on both sides).
  bare  one process, world size 1: torch using every core, and again with 1 thread.
  job   jobs.train_ae.run on a local Ray with 2 CPUs: 2 Ray Train workers (1 CPU each, so Ray gives each
        one torch thread), DeepSpeed ZeRO-3 over gloo, micro-batch = batch / 2, no accumulation; then
        1 worker on 1 CPU (micro-batch = batch), compared with the 1-thread bare loop (equal resources).
A second table breaks each step down (median ms): data wait, forward + backward, DeepSpeed's step,
the step's one all-reduce + read, and the rest; the job's phases come from its metrics JSONL.
tokens/s = valid tokens of a step / its wall time (the job: all ranks' tokens / rank 0's step time, as
logged in its metrics JSONL), median over the steps after --warmup. Start-up is reported apart: for the
job, the wall time of run() minus the sum of its step times (Ray Train worker group, DeepSpeed
initialize, checkpoint at the end, export); for the bare loop, model + optimizer + loader set-up.
Goal: job tokens/s >= 0.85 x bare tokens/s on both comparisons.
Results also go to benchmarks/results/bench_train_ae.json.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

import torch
from common import cpu_model, format_table

REPO = Path(__file__).resolve().parent.parent
DATA = REPO / ".data" / "bench_train_ae"
RESULTS = Path(__file__).resolve().parent / "results" / "bench_train_ae.json"
RAY_CPUS = 2
PHASES = ("data_wait_s", "forward_backward_s", "optimizer_s", "sync_s")


def overrides(args: argparse.Namespace, source: Path, root: Path, workers: int = 2) -> list[str]:
    return [
        f"ingest.source={source}",
        f"ingest.root={DATA / 'ingest'}",
        f"train.root={root}",
        f"data.budgets=[{args.budget}]",
        "data.budget_switch=[]",
        f"train.steps={args.steps}",
        f"train.batch_size={args.batch}",
        f"train.micro_batch_size={args.batch // workers}",
        f"train.workers={workers}",
        "train.loader_workers=0",
        "train.log_every=1",
        f"train.checkpoint_every={args.steps}",
        "optim.warmup_steps=5",
        *([f"model.variant={args.variant}"] if args.variant else []),
    ]


def prepare_source(n: int) -> Path:
    """The first n images of bench_ingest's web mix, linked into a folder of their own."""
    import bench_ingest

    names = bench_ingest.photo_names()
    info = bench_ingest.prepare_images(bench_ingest.MIXES[0], n, names, workers=2)
    folder = DATA / f"source-{n}"
    if not folder.is_dir() or len(list(folder.iterdir())) != n:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
        for i, path in enumerate(info["paths"][:n]):
            os.symlink(path, folder / f"{i:06d}.jpg")
    return folder


def bare_loop(cfg: Any, ingest_uri: str, steps: int, cores: int, rank: int = 0, world: int = 1) -> dict[str, Any]:
    """The same training step in one process: no Ray, no DeepSpeed, no collectives. With `world` > 1 it
    trains on shard `rank` with batch / world images (one of a pair of independent loops)."""
    from vitok_core.loader import Augment, BucketLoader, ShardIndex, valid_tokens
    from vitok_core.losses import ReconstructionLoss
    from vitok_core.model import build_autoencoder, parse_variant
    from vitok_core.optim import parameter_groups
    from vitok_core.schedules import lr_at_step

    torch.set_num_threads(cores)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    spec = parse_variant(cfg.model.variant)
    model = build_autoencoder(spec, layer_scale_init=cfg.model.layer_scale_init)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    loss_fn = ReconstructionLoss(cfg.loss, spec.patch_size)
    budget = cfg.data.budgets[0]
    index = ShardIndex.build(ingest_uri, budget, rank, world)
    loader = BucketLoader(
        index,
        cfg.train.batch_size // world,
        cfg.train.seed,
        spec.patch_size,
        Augment.from_config(cfg.data.augment),
        window=cfg.train.shuffle_window,
        workers=0,
    )
    batches = loader.batches()
    setup = time.perf_counter() - start
    records = []
    for step in range(steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(step, steps, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr)
        generator = torch.Generator().manual_seed(step)
        loss = loss_fn(model(batch)["patches"], batch, generator)["loss"]
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t2 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        elapsed = time.perf_counter() - t0
        records.append(
            {"step": step + 1, "tokens": valid_tokens(batch), "step_s": elapsed, "loss": loss.item()}
            | {"data_wait_s": t1 - t0, "forward_backward_s": t2 - t1, "optimizer_s": elapsed - (t2 - t0)}
        )
    return {"setup_s": setup, "steps": records}


def _paired(arguments: tuple) -> dict[str, Any]:
    overrides_, ingest_uri, steps, rank = arguments
    from vitok_core.config import load_config

    return bare_loop(load_config("tiny", overrides_), ingest_uri, steps, 1, rank, 2)


def paired_bare_loops(overrides_: list[str], ingest_uri: str, steps: int, warmup: int) -> float:
    """Two independent 1-thread bare loops at once, each on half the batch: what two busy processes get
    from this machine's two cores, with no Ray and no communication (the ceiling for 2 workers)."""
    import multiprocessing

    with multiprocessing.get_context("spawn").Pool(2) as pool:
        halves = pool.map(_paired, [(overrides_, ingest_uri, steps, rank) for rank in (0, 1)])
    return sum(median_rate(half["steps"], warmup) for half in halves)


def median_rate(records: list[dict], warmup: int) -> float:
    return statistics.median(r["tokens"] / r["step_s"] for r in records[warmup:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5, help="steps left out of the median")
    parser.add_argument("--batch", type=int, default=16, help="global batch (images)")
    parser.add_argument("--budget", type=int, default=256)
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--variant", default="", help="model variant (default: the tiny preset's)")
    parser.add_argument(
        "--persistence",
        type=lambda text: [int(float(x)) for x in text.split(",")],
        default=[1_000_000, 0],
        help="train.zero_persistence_threshold values to run the job with (the first is the default's)",
    )
    args = parser.parse_args()
    sys.path.insert(0, str(REPO))
    from jobs.ingest import run as run_ingest
    from jobs.train_ae import run as run_train
    from jobs.train_common import read_metrics
    from vitok_core.config import load_config

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    print(f"ViTok-v2 train_ae benchmark  {time.strftime('%Y-%m-%dT%H:%M:%S')}")
    print(f"cpu: {cpu_model()}  cores: {cores}  torch {torch.__version__}")
    source = prepare_source(args.images)
    runs = DATA / "runs"
    shutil.rmtree(runs, ignore_errors=True)
    cfg = load_config("tiny", overrides(args, source, runs))
    import ray

    ray.init(address="local", num_cpus=RAY_CPUS, include_dashboard=False)
    ingest = run_ingest(cfg)
    print(f"data: {ingest['counts']['accepted']} images at {ingest['output']}")
    print(f"model {cfg.model.variant}, budget {args.budget} tokens, global batch {args.batch}, {args.steps} steps")

    # Two comparisons: all cores (the job's 2 workers against a bare loop using both cores), and equal
    # resources (1 worker on 1 CPU against a 1-thread bare loop: no contention on either side).
    bares = {}
    for threads in sorted({cores, 1}, reverse=True):
        bares[threads] = bare_loop(cfg, ingest["output"], args.steps, threads)
        bares[threads]["tokens_per_s"] = median_rate(bares[threads]["steps"], args.warmup)
        print(f"  bare, {threads} thread(s): {bares[threads]['tokens_per_s']:.0f} tokens/s (median)", flush=True)
    torch.set_num_threads(cores)
    pair_rate = paired_bare_loops(overrides(args, source, runs), ingest["output"], args.steps, args.warmup)
    print(f"  2 bare loops at once, 1 thread each: {pair_rate:.0f} tokens/s together", flush=True)

    runs_to_do = [(2, threshold) for threshold in args.persistence] + [(1, args.persistence[0])]
    jobs = []
    for workers, threshold in runs_to_do:
        extra = [f"train.zero_persistence_threshold={threshold}"]
        job_cfg = load_config("tiny", [*overrides(args, source, runs, workers), *extra])
        started = time.perf_counter()
        manifest = run_train(job_cfg)
        wall = time.perf_counter() - started
        metrics = read_metrics(manifest["output"])
        rate = median_rate(metrics, args.warmup)
        baseline = bares[cores if workers == 2 else 1]["tokens_per_s"]
        jobs.append(
            {"workers": workers, "threshold": threshold, "tokens_per_s": rate, "wall_s": wall}
            | {"startup_s": wall - sum(m["step_s"] for m in metrics), "ratio": rate / baseline, "metrics": metrics}
        )
        print(f"  job ({workers} worker(s), persistence {threshold:,}): {rate:.0f} tokens/s, run() {wall:.1f} s")
        shutil.rmtree(runs, ignore_errors=True)
    ray.shutdown()

    def phases(records: list[dict]) -> list[str]:
        """Mean ms per step of each phase (means, so that they add up to the step); 'other' = the step's
        rest (lr, batch transfer, bookkeeping)."""
        kept = records[args.warmup :]
        cols = [statistics.fmean(r.get(k, 0.0) for r in kept) for k in PHASES]
        other = statistics.fmean(r["step_s"] for r in kept) - sum(cols)
        return [f"{1000 * c:.0f}" for c in cols] + [f"{1000 * other:.0f}"]

    rows, breakdown = [], []
    for threads, bare in bares.items():
        label = f"bare loop, 1 process, {threads} thread(s)"
        rows.append([label, f"{bare['tokens_per_s']:.0f}", "1.00", f"{bare['setup_s']:.1f}"])
        breakdown.append([label, *phases(bare["steps"])])
    rows.append(["2 bare loops at once, 1 thread each, half batch (vs 2 threads)", f"{pair_rate:.0f}",
                 f"{pair_rate / bares[cores]['tokens_per_s']:.2f}", "-"])  # fmt: skip
    for job in jobs:
        label = f"job, {job['workers']} worker(s) x 1 CPU, persistence {job['threshold']:,}"
        vs = f" (vs {cores if job['workers'] == 2 else 1} thread(s))"
        rows.append([label + vs, f"{job['tokens_per_s']:.0f}", f"{job['ratio']:.2f}", f"{job['startup_s']:.1f}"])
        breakdown.append([label, *phases(job["metrics"])])
    print()
    print(format_table(["", "tokens/s", "ratio", "start-up s"], rows))
    print()
    print("mean ms per step (after warm-up):")
    print(format_table(["", "data wait", "fwd + bwd", "optimizer step", "sync", "other"], breakdown))
    print("  persistence = train.zero_persistence_threshold (elements): smaller parameters stay whole on every rank;")
    print("  0 = every parameter is partitioned and gathered for each use. Start-up = run() wall - sum of step times")
    print("  (worker group, DeepSpeed initialize, checkpoints, export). data wait = decode + augment, inline.")
    print("  fwd + bwd holds ZeRO-3's module hooks and, with 2 workers, the gradient reduce-scatter DeepSpeed starts")
    print("  in backward; optimizer step = DeepSpeed's step (clipping, AdamW on the partition, re-partition);")
    print("  sync = the job's one all-reduce + read of the step's numbers (StepStats).")
    for job in jobs:
        met = "yes" if job["ratio"] >= 0.85 else "NO"
        print(f"  goal >= 0.85x, {job['workers']} worker(s), persistence {job['threshold']:,}: {met}")
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {"args": vars(args), "variant": cfg.model.variant, "cores": cores, "bare": bares, "jobs": jobs}
            | {"paired_bare_tokens_per_s": pair_rate},
            indent=1,
        )
    )
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
