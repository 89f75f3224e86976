"""CPU benchmark of the ViTok-v2 autoencoder: NaFlex batching throughput and padding waste.

Run from the repository root:

    .venv/bin/python benchmarks/bench_model.py            # full run, about 5-10 minutes on 2 cores
    .venv/bin/python benchmarks/bench_model.py --quick    # fewer iterations, about 2-3 minutes

Table 1 - forward+backward throughput on CPU (Charbonnier loss + loss.backward(), no optimizer step) of
the tiny `Tid2-Tid4/1x16x16` and the 350M `Ld4-Ld24/1x16x64` autoencoders, for two ways of batching the
same mixed-aspect samples at a token budget T:
  bucketed - samples with the same `bucket_of` grid stacked densely (no padded tokens),
  naive    - samples in shuffled order, each batch padded to T with `naflex.collate(..., max_tokens=T)`.
Valid tokens/s counts only tokens whose `patch_mask` is True; total tokens/s counts every token slot.
Throughput = tokens of one pass over all batches / sum over batches of that batch's median step time;
"step" is the median of all timed steps. Pixels are random (a fixed seed): content does not change speed.

Table 2 - padding of NaFlex batches over a mixed-aspect set of image sizes (no pixels): bucket batching,
padding to the longest sample of each batch, and padding to T, at T = 256 and 1024. Besides padded token
slots it reports the pixels inside valid tokens that lie outside the resized image (edge patches are
zero-padded to a multiple of p), which bucketing does not remove.

The image sizes are REAL (the photos shipped in the scikit-image wheel, read with PIL) plus SYNTHETIC
(drawn with a fixed seed from common photo aspect ratios); the output says which is which. Every number
printed is measured in the run. Results also go to benchmarks/results/bench_model.json.
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from common import ASPECTS, cpu_model, format_table
from PIL import Image

from vitok_core.losses import charbonnier
from vitok_core.model import Autoencoder, build_autoencoder, count_parameters
from vitok_core.naflex import PatchDict, bucket_of, collate, fit_to_token_budget, patchify

Size = tuple[int, int]  # (height, width)

PATCH = 16  # both benchmarked variants use 16 x 16 patches
SEED = 0
REAL_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")
RESULTS = Path(__file__).resolve().parent / "results" / "bench_model.json"

# (label, width : height, relative weight). Landscape 3:2 / 4:3 dominate camera output; phone portraits
# and video frames come next; the last four are the odd ones (cinema, panorama, social-media crops).
SHORT_SIDE = (300, 3000)


@dataclass(frozen=True)
class ModelCase:
    """One row pair of table 1: a model and the batch shape it is timed with."""

    variant: str
    budget: int
    batch_size: int
    n_buckets: int  # batches per pass: one full batch per bucket, so both constructions get the same count
    warmup_steps: int
    timed_passes: int


def model_cases(quick: bool) -> list[ModelCase]:
    # The 350M model takes about 10 s per step at 2 x 256 tokens on 2 cores, so it gets few steps.
    if quick:
        return [
            ModelCase("Tid2-Tid4/1x16x16", 256, 16, 3, warmup_steps=2, timed_passes=2),
            ModelCase("Ld4-Ld24/1x16x64", 256, 2, 2, warmup_steps=1, timed_passes=1),
        ]
    return [
        ModelCase("Tid2-Tid4/1x16x16", 256, 16, 3, warmup_steps=3, timed_passes=5),
        ModelCase("Ld4-Ld24/1x16x64", 256, 2, 2, warmup_steps=2, timed_passes=3),
    ]


# -- environment -----------------------------------------------------------------------------------


def available_cores() -> int:
    # The affinity mask, not os.cpu_count(): a container may see more CPUs than it may run on.
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def environment(threads: int) -> dict[str, object]:
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": threads,
        "cpu": cpu_model(),
        # Other processes on the machine skew timings; the load average makes that visible.
        "loadavg_start": [round(x, 2) for x in os.getloadavg()],
    }


def cpu_seconds() -> tuple[float, float, int] | None:
    """(CPU-seconds the whole machine was busy, incl. VM steal; CPU-seconds of this process; cores) or None."""
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return None
    fields = [int(x) for x in lines[0].split()[1:]]
    # user nice system idle iowait irq softirq steal ...: all but idle and iowait is time a core was taken.
    busy = sum(fields[:3]) + sum(fields[5:8])
    cores = sum(1 for line in lines if line.startswith("cpu") and line[3:4].isdigit())
    own = os.times()
    return busy / os.sysconf("SC_CLK_TCK"), own.user + own.system, cores


def foreign_cpu_share(
    before: tuple[float, float, int] | None, after: tuple[float, float, int] | None, wall: float
) -> float | None:
    """Share of the machine's CPU time that other processes (and the hypervisor) took between two readings."""
    if before is None or after is None or wall <= 0:
        return None
    foreign = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, foreign) / (wall * after[2])


# -- image sizes -----------------------------------------------------------------------------------


def real_photo_sizes() -> dict[str, Size]:
    """(height, width) of the photos in the installed scikit-image wheel, read with PIL (skimage not imported)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("scikit-image is not installed; it ships the real photos this benchmark reads")
    folder = Path(spec.submodule_search_locations[0]) / "data"
    sizes = {}
    for name in REAL_PHOTOS:
        with Image.open(folder / name) as img:
            width, height = img.size
        sizes[name] = (height, width)
    return sizes


def synthetic_sizes(n: int, seed: int) -> list[Size]:
    """`n` sizes with an aspect from ASPECTS (by weight) and a uniform short side in SHORT_SIDE."""
    rng = np.random.default_rng(seed)
    weights = np.array([w for _, _, w in ASPECTS])
    picks = rng.choice(len(ASPECTS), size=n, p=weights / weights.sum())
    shorts = rng.integers(SHORT_SIDE[0], SHORT_SIDE[1] + 1, size=n)
    sizes = []
    for idx, short in zip(picks.tolist(), shorts.tolist(), strict=True):
        ratio = ASPECTS[idx][1]  # width / height
        sizes.append((short, round(short * ratio)) if ratio >= 1 else (round(short / ratio), short))
    return sizes


# -- table 1: throughput ---------------------------------------------------------------------------


def bucket_samples(sizes: Sequence[Size], budget: int, n_buckets: int, per_bucket: int) -> list[list[Size]]:
    """Budget-resized sizes of the first `per_bucket` images of the `n_buckets` most common buckets."""
    groups: dict[tuple[int, int], list[Size]] = {}
    for h, w in sizes:
        groups.setdefault(bucket_of(h, w, PATCH, budget), []).append(fit_to_token_budget(h, w, PATCH, budget))
    common = sorted(groups.values(), key=len, reverse=True)[:n_buckets]
    if len(common) < n_buckets or len(common[-1]) < per_bucket:
        raise RuntimeError(f"fewer than {n_buckets} buckets with {per_bucket} images; draw more sizes")
    return [group[:per_bucket] for group in common]


def random_sample(size: Size, generator: torch.Generator) -> PatchDict:
    # Random pixels made directly at the budget size: resizing a random 4000 x 3000 image first would only
    # cost time, and the step sees the same token count either way.
    image = torch.rand(3, *size, generator=generator) * 2.0 - 1.0
    return patchify(image, PATCH)


def build_batches(groups: list[list[Size]], budget: int, seed: int) -> dict[str, list[PatchDict]]:
    """The same samples batched two ways: by bucket (dense) and shuffled + padded to the budget (naive)."""
    generator = torch.Generator().manual_seed(seed)
    samples = [[random_sample(size, generator) for size in group] for group in groups]
    flat = [s for group in samples for s in group]
    order = torch.randperm(len(flat), generator=generator).tolist()
    batch_size = len(groups[0])
    shuffled = [flat[i] for i in order]
    naive = [collate(shuffled[i : i + batch_size], max_tokens=budget) for i in range(0, len(flat), batch_size)]
    return {"bucketed": [collate(group) for group in samples], "naive": naive}


def timed_step(model: Autoencoder, batch: PatchDict) -> float:
    """Seconds of one forward + Charbonnier loss + backward."""
    # Zero (not free) the gradients outside the timed region: freeing them would make every backward
    # re-allocate and page-fault 1.4 GB of fresh gradient memory for the 350M model.
    model.zero_grad(set_to_none=False)
    start = time.perf_counter()
    out = model(batch)
    loss = charbonnier(out["patches"], batch["patches"], batch["patch_mask"])
    loss.backward()
    return time.perf_counter() - start


def time_constructions(
    model: Autoencoder, batches: dict[str, list[PatchDict]], case: ModelCase
) -> dict[str, list[list[float]]]:
    """Per construction, per batch, the timed step seconds. Constructions alternate pass by pass so that
    load from other processes drifts onto both alike."""
    for batch_list in batches.values():
        for i in range(case.warmup_steps):
            timed_step(model, batch_list[i % len(batch_list)])
    times = {name: [[] for _ in batch_list] for name, batch_list in batches.items()}
    for _ in range(case.timed_passes):
        for name, batch_list in batches.items():
            for i, batch in enumerate(batch_list):
                times[name][i].append(timed_step(model, batch))
    return times


def throughput_row(
    case: ModelCase, params: int, name: str, batches: list[PatchDict], times: list[list[float]]
) -> dict[str, object]:
    valid = sum(int(b["patch_mask"].sum()) for b in batches)
    slots = sum(b["patch_mask"].numel() for b in batches)
    # Median per batch, then summed: one slow outlier step does not move a whole pass.
    pass_seconds = sum(statistics.median(t) for t in times)
    all_steps = [s for t in times for s in t]
    return {
        "model": case.variant,
        "params": params,
        "batching": name,
        "budget": case.budget,
        "batch_size": case.batch_size,
        "batches": len(batches),
        "tokens_per_sample": sorted({int(b["patch_mask"].shape[1]) for b in batches}),
        "valid_tokens": valid,
        "token_slots": slots,
        "timed_steps": len(all_steps),
        "step_s_median": statistics.median(all_steps),
        "step_s_min": min(all_steps),
        "step_s_max": max(all_steps),
        "valid_tokens_per_s": valid / pass_seconds,
        "total_tokens_per_s": slots / pass_seconds,
        "step_seconds": times,
    }


def bench_model(case: ModelCase, sizes: Sequence[Size], log: Callable[[str], None]) -> list[dict]:
    groups = bucket_samples(sizes, case.budget, case.n_buckets, case.batch_size)
    batches = build_batches(groups, case.budget, SEED)
    torch.manual_seed(SEED)
    model = build_autoencoder(case.variant).train()
    params = count_parameters(model)["total"]
    log(f"  {case.variant}: {params / 1e6:.1f}M params, buckets {[b['grid'][0].tolist() for b in batches['bucketed']]}")
    times = time_constructions(model, batches, case)
    rows = [throughput_row(case, params, name, batches[name], times[name]) for name in batches]
    baseline = next(r["valid_tokens_per_s"] for r in rows if r["batching"] == "naive")
    for row in rows:
        row["ratio_valid_vs_naive"] = row["valid_tokens_per_s"] / baseline
    del model
    gc.collect()
    return rows


# -- table 2: padding ------------------------------------------------------------------------------


def token_stub(size: Size, budget: int) -> PatchDict:
    """The token layout of an image without pixels: collate only needs token counts, so 1-dim patches."""
    grid = bucket_of(*size, PATCH, budget)
    n = grid[0] * grid[1]
    return {
        "patches": torch.zeros(n, 1),
        "patch_mask": torch.ones(n, dtype=torch.bool),
        "row_idx": torch.zeros(n, dtype=torch.long),
        "col_idx": torch.zeros(n, dtype=torch.long),
        "grid": torch.tensor(grid),
        "orig_size": torch.tensor(fit_to_token_budget(*size, PATCH, budget)),
    }


def chunks(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def padding_batches(sizes: Sequence[Size], budget: int, batch_size: int, seed: int) -> dict[str, list[PatchDict]]:
    """Collated batches for the three strategies (order for the naive ones: a seeded shuffle)."""
    stubs = [token_stub(size, budget) for size in sizes]
    groups: dict[tuple[int, ...], list[PatchDict]] = {}
    for stub in stubs:
        groups.setdefault(tuple(stub["grid"].tolist()), []).append(stub)
    order = np.random.default_rng(seed).permutation(len(stubs)).tolist()
    shuffled = chunks([stubs[i] for i in order], batch_size)
    return {
        "bucket": [collate(chunk) for group in groups.values() for chunk in chunks(group, batch_size)],
        "pad-to-longest": [collate(chunk) for chunk in shuffled],
        "pad-to-T": [collate(chunk, max_tokens=budget) for chunk in shuffled],
    }


def padding_row(set_name: str, n_images: int, budget: int, strategy: str, batches: list[PatchDict]) -> dict:
    slots = sum(b["patch_mask"].numel() for b in batches)
    valid = sum(int(b["patch_mask"].sum()) for b in batches)
    image_pixels = sum(int(b["orig_size"].prod(-1).sum()) for b in batches)
    valid_pixels = valid * PATCH * PATCH
    return {
        "image_set": set_name,
        "images": n_images,
        "budget": budget,
        "batching": strategy,
        "batches": len(batches),
        "mean_batch": n_images / len(batches),
        "token_slots": slots,
        "padded_tokens": slots - valid,
        "token_pad_frac": (slots - valid) / slots,
        # Pixels of valid tokens outside the resized image: zero fill of the edge patches.
        "edge_pixel_pad_frac": (valid_pixels - image_pixels) / valid_pixels,
        # Everything computed on that is not image: padded tokens plus edge fill, over all slot pixels.
        "all_pixel_waste_frac": (slots * PATCH * PATCH - image_pixels) / (slots * PATCH * PATCH),
    }


def bench_padding(image_sets: dict[str, list[Size]], budgets: Sequence[int], batch_size: int) -> list[dict]:
    rows = []
    for set_name, sizes in image_sets.items():
        for budget in budgets:
            for strategy, batches in padding_batches(sizes, budget, batch_size, SEED).items():
                rows.append(padding_row(set_name, len(sizes), budget, strategy, batches))
    return rows


# -- output ----------------------------------------------------------------------------------------


def throughput_table(rows: Sequence[dict]) -> str:
    headers = ["model", "params", "batching", "T", "batch", "batches", "tokens/sample", "valid %"]
    headers += ["step s (med)", "valid tok/s", "total tok/s", "valid tok/s vs naive"]
    body = []
    for r in rows:
        body.append(
            [
                r["model"],
                f"{r['params'] / 1e6:.1f}M",
                r["batching"],
                r["budget"],
                r["batch_size"],
                r["batches"],
                "/".join(str(n) for n in r["tokens_per_sample"]),
                f"{100 * r['valid_tokens'] / r['token_slots']:.1f}",
                f"{r['step_s_median']:.3f}",
                f"{r['valid_tokens_per_s']:,.0f}",
                f"{r['total_tokens_per_s']:,.0f}",
                f"{r['ratio_valid_vs_naive']:.3f}" + (" (baseline)" if r["batching"] == "naive" else ""),
            ]
        )
    return format_table(headers, body)


def padding_table(rows: Sequence[dict]) -> str:
    headers = ["image set", "T", "batching", "batches", "mean batch", "token slots", "padded tok"]
    headers += ["token pad %", "edge-pixel pad % (valid tok)", "all non-image px %"]
    body = [
        [
            f"{r['image_set']} ({r['images']})",
            r["budget"],
            r["batching"],
            r["batches"],
            f"{r['mean_batch']:.1f}",
            f"{r['token_slots']:,}",
            f"{r['padded_tokens']:,}",
            f"{100 * r['token_pad_frac']:.2f}",
            f"{100 * r['edge_pixel_pad_frac']:.2f}",
            f"{100 * r['all_pixel_waste_frac']:.2f}",
        ]
        for r in rows
    ]
    return format_table(headers, body)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer warm-up and timed iterations")
    parser.add_argument("--n-synthetic", type=int, default=2000, help="synthetic image sizes to draw")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size for the padding table")
    args = parser.parse_args()
    started = time.perf_counter()

    threads = available_cores()
    torch.set_num_threads(threads)
    env = environment(threads)
    real = real_photo_sizes()
    synthetic = synthetic_sizes(args.n_synthetic, SEED)
    cases = model_cases(args.quick)

    print(f"ViTok-v2 model benchmark ({'quick' if args.quick else 'full'})  {env['date']}")
    print(f"torch {env['torch']}  python {env['python']}  threads {threads}  cpu: {env['cpu']}")
    print(f"load average at start (1/5/15 min): {env['loadavg_start']}")
    print("Image sizes:")
    print("  REAL: " + ", ".join(f"{k} {h}x{w}" for k, (h, w) in real.items()) + " (scikit-image wheel, PIL)")
    aspects = " ".join(label for label, _, _ in ASPECTS)
    print(f"  SYNTHETIC: {len(synthetic)} sizes, seed {SEED}, aspects {aspects}, short side {SHORT_SIDE}")
    print("  sizes are height x width; table 1 draws its samples from the SYNTHETIC sizes (random pixels)")
    print()

    print("Table 1: forward+backward (Charbonnier + backward) throughput on CPU, same samples two ways")
    throughput = []
    counters, t1_start = cpu_seconds(), time.perf_counter()
    for case in cases:
        throughput += bench_model(case, synthetic, lambda msg: print(msg, flush=True))
    share = foreign_cpu_share(counters, cpu_seconds(), time.perf_counter() - t1_start)
    env["foreign_cpu_share_table1"] = share
    print(throughput_table(throughput))
    if share is not None:
        # Other processes on these cores slow every step (OpenMP threads wait for descheduled peers).
        note = "  WARNING: timings are inflated by contention" if share > 0.1 else ""
        print(f"  CPU taken by other processes / VM steal while table 1 ran: {100 * share:.0f}% of the cores{note}")
    print("  valid tok/s vs naive: bucketed valid tokens/s / naive (padded to T) valid tokens/s, this run")
    print()

    print(f"Table 2: NaFlex padding, batch size {args.batch_size}, p={PATCH} (sizes only, no pixels)")
    image_sets = {"real": list(real.values()), "synthetic": synthetic, "real+synthetic": [*real.values(), *synthetic]}
    padding = bench_padding(image_sets, (256, 1024), args.batch_size)
    print(padding_table(padding))
    print("  token pad % = padded token slots / all token slots")
    print("  edge-pixel pad % = pixels of valid tokens outside the resized image / pixels of valid tokens")
    print("  all non-image px % = (padded-token pixels + edge pixels) / pixels of all token slots")

    runtime = time.perf_counter() - started
    env["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    print()
    print(f"runtime {runtime:.1f} s; load average at end (1/5/15 min): {env['loadavg_end']}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "environment": env,
        "quick": args.quick,
        "runtime_s": runtime,
        "image_sizes": {
            "real": {k: list(v) for k, v in real.items()},
            "synthetic": {"n": len(synthetic), "seed": SEED, "aspects": ASPECTS, "short_side": SHORT_SIDE},
        },
        "cases": [asdict(c) for c in cases],
        "throughput": throughput,
        "padding": padding,
    }
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
