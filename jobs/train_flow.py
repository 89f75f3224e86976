"""Stage train_flow: a class-conditional flow-matching DiT on cached latents, with Ray Train + DeepSpeed.

    python -m jobs.train_flow --config tiny flow.cache=runs/cache_latents/<key> [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- python -m jobs.train_flow --config 5b \\
        flow.cache=s3://bucket/runs/cache_latents/KEY flow.root=s3://bucket/runs flow.workers=64 flow.use_gpu=true

The run lives in {flow.root}/train_flow/{key}/ (key = the flow settings that change the weights + the
cache key), which is also the Ray Train run: rerunning the same command resumes from the latest
checkpoint (layout as in train_ae: step-NNNNNNNN/, metrics/, then export/, manifest.json, _SUCCESS).
export/ holds dit.safetensors (raw weights), dit_ema.safetensors (the EMA, what a sampler should use) and
export.json (size, channels, classes, the cache's latent mean/std, step).

Each worker: build the DiT (same seed everywhere), wrap it in DeepSpeed ZeRO (stage 0-2: the EMA is kept
on whole parameters on every rank), restore the latest checkpoint, then per step: micro-batches of one
latent grid from this rank's shard of the cache, standardised with the cache's stats.json; rectified flow
(x_t = t x + (1 - t) noise, velocity target x - noise) at logit-normal t, labels dropped to the null class
with probability flow.label_dropout; warm-up + cosine learning rate; EMA update after every step.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import fsspec
import numpy as np
import torch
from omegaconf import OmegaConf
from safetensors.torch import save as save_bytes

from jobs import train_common as common
from jobs.common import init_ray, parse_config, setup_logging
from jobs.train_common import (
    Progress,
    StepStats,
    fault_fires,
    fit,
    full_fp32_state,
    import_deepspeed,
    inject_fault,
    load_checkpoint,
    record_start,
    save_checkpoint,
    write_metrics,
)
from vitok_core import __version__
from vitok_core.artifacts import absolute, is_complete, join, read_json, stage_key, write_json
from vitok_core.config import VitokConfig, config_from_dict, config_hash, mixed_precision, to_dict
from vitok_core.fingerprint import manifest_fields
from vitok_core.flow import EMA, flow_loss
from vitok_core.loader import LatentLoader, Position, ShardIndex
from vitok_core.model.dit import build_dit
from vitok_core.naflex import to_device
from vitok_core.optim import parameter_groups
from vitok_core.row_index import require_index
from vitok_core.schedules import lr_at_step

log = logging.getLogger("vitok.train_flow")

CODE_VERSION = "train_flow-3"  # 2: fp32 EMA, t and RoPE, fp32 master export; 3: the block-wise data plan
# Settings that do not change the weights: where things are, how often to log and checkpoint (a resume is
# exact; train_flow has no restore-on-NaN), loader processes, restarts, where to pause, the sampler.
_NOT_IN_KEY = (
    "root",
    "cache",
    "loader_workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "max_failures",
    "stop_at_step",
    "cpus_per_worker",
    "sample",
    # A recovered crash leaves the weights as an uninterrupted run has them (tested): drills share the key.
    "fail_at_step",
    "kill_in_checkpoint_at_step",
)


# ------------------------------------------------------------------------------------------------
# Settings, key and layout
# ------------------------------------------------------------------------------------------------
def cache_uri(cfg: VitokConfig) -> str:
    """flow.cache, else the cache_latents output this config's cache section produces."""
    if cfg.flow.cache:
        return cfg.flow.cache
    from jobs.cache_latents import cache_settings, encoder_uri
    from jobs.cache_latents import output_uri as cache_output_uri
    from jobs.ingest import output_uri as ingest_output_uri
    from vitok_core.ingest_output import IngestOutput

    ingest = IngestOutput(cfg.cache.ingest or ingest_output_uri(cfg))
    encoder = encoder_uri(cfg, ingest)
    return cache_output_uri(cfg, ingest, cache_settings(cfg, encoder))


def open_cache(uri: str) -> dict[str, Any]:
    """The cache's manifest and stats; fails before any cluster work when the cache is not complete."""
    if not is_complete(uri):
        raise FileNotFoundError(f"{uri} is not a completed cache_latents output (no _SUCCESS)")
    return {"manifest": read_json(join(uri, "manifest.json")), "stats": read_json(join(uri, "stats.json"))}


def flow_settings(cfg: VitokConfig, cache_key: str) -> dict[str, Any]:
    return {**{k: v for k, v in to_dict(cfg.flow).items() if k not in _NOT_IN_KEY}, "cache_key": cache_key}


def output_uri(cfg: VitokConfig, cache_key: str) -> str:
    key = stage_key("train_flow", flow_settings(cfg, cache_key), [cache_key], CODE_VERSION)
    return join(absolute(cfg.flow.root), "train_flow", key)


def micro_batch_and_accumulation(cfg: VitokConfig) -> tuple[int, int]:
    f = cfg.flow
    return common.micro_batch_and_accumulation(f.batch_size, f.micro_batch_size, f.workers)


def deepspeed_config(cfg: VitokConfig) -> dict[str, Any]:
    f = cfg.flow
    bf16 = mixed_precision(f.precision, f.use_gpu)
    return common.deepspeed_config(
        f.batch_size, f.micro_batch_size, f.workers, f.grad_clip, bf16, {"stage": f.zero_stage}
    )


# ------------------------------------------------------------------------------------------------
# Inside a Ray Train worker
# ------------------------------------------------------------------------------------------------
def setup_training(cfg: VitokConfig, stats: dict, device: torch.device) -> tuple[Any, Any, EMA]:
    """(DeepSpeed engine, its optimizer, the EMA) for this rank. The EMA is copied from the fp32 model
    before DeepSpeed casts it to bf16, and stays fp32 (vitok_core.flow.EMA)."""
    deepspeed = import_deepspeed()
    f = cfg.flow
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.manual_seed(f.seed)  # the same seed everywhere: every rank builds the same initial weights
    model = build_dit(f.size, stats["channels"], len(stats["classes"]))
    ema = EMA(model, f.ema_decay)
    optimizer = torch.optim.AdamW(parameter_groups(model, f.weight_decay), lr=f.lr, betas=tuple(f.betas))
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False
    )
    ema.model.to(device)
    return engine, optimizer, ema


def micro_step(
    engine: Any, host: dict[str, torch.Tensor], device: torch.device, generator: torch.Generator, label_dropout: float
) -> torch.Tensor:
    """One micro-batch: to the device (x in the model's dtype; t, noise and the path stay fp32 in flow_loss),
    loss, backward, DeepSpeed step. Returns the loss on the device (nothing here reads it)."""
    batch = to_device(host, device, next(engine.module.parameters()).dtype)
    loss = flow_loss(engine, batch["x"], batch["labels"], batch, generator, label_dropout, engine.module.null_class)
    engine.backward(loss)
    engine.step()
    return loss.detach()


def _export(engine: Any, ema: EMA, out: str, cfg: VitokConfig, stats: dict, step: int, rank: int) -> None:
    """dit.safetensors: the fp32 master weights (every rank takes part in gathering them); dit_ema: the
    fp32 EMA."""
    masters = full_fp32_state(engine, rank)
    if rank != 0:
        return
    fs, path = fsspec.core.url_to_fs(join(out, "export"))
    fs.makedirs(path, exist_ok=True)
    for name, state in (("dit", masters), ("dit_ema", ema.state_dict())):
        tensors = {k: v.detach().float().cpu().contiguous() for k, v in state.items()}
        with fs.open(f"{path}/{name}.safetensors", "wb") as f:
            f.write(save_bytes(tensors, metadata={"format": "pt"}))
    info = {
        "size": cfg.flow.size,
        "channels": stats["channels"],
        "num_classes": len(stats["classes"]),
        "classes": stats["classes"],
        "latent_mean": stats["mean"],
        "latent_std": stats["std"],
        "cache": cfg.flow.cache,
        "config_hash": config_hash(cfg),
        "step": step,
    }
    write_json(join(out, "export", "export.json"), info)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (every rank runs this)."""
    import ray.train
    import ray.train.torch

    setup_logging()
    cfg = config_from_dict(config["config"])
    out, cache, stats = config["out"], config["cache"], config["stats"]
    f = cfg.flow
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if f.use_gpu else torch.device("cpu")
    stop = min(f.steps, f.stop_at_step or f.steps)
    micro, accumulation = micro_batch_and_accumulation(cfg)

    engine, optimizer, ema = setup_training(cfg, stats, device)
    state: dict[str, Any] = {"step": 0, "position": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint, rank)
        ema.load_state_dict(state.pop("ema"))
        if rank == 0:
            log.info("resumed from %s at step %d", checkpoint.path, state["step"])
    if rank == 0:
        record_start(out, state["step"], checkpoint.path if checkpoint is not None else None)
    index = ShardIndex.from_index(cache, "bucket", 0, rank, world, stage="cache_latents")  # the cache's index.parquet
    loader = LatentLoader(
        index,
        micro,
        f.seed,
        stats["classes"],
        stats["mean"],
        stats["std"],
        f.shuffle_window,
        f.loader_workers,
        pin_memory=f.use_gpu,
    )
    loader.retry = to_dict(cfg.io)  # reading the cache's index blocks and row groups (vitok_core/io_retry.py)
    batches = loader.batches(start=state["position"])
    if rank == 0:
        n_params = sum(p.numel() for p in engine.module.parameters())
        log.info(
            "train_flow %s: DiT-%s (%.1fM parameters) on %d cached latents, %d classes; %d workers x %d x %d "
            "accumulation = batch %d; steps %d..%d of %d",
            out, f.size, n_params / 1e6, index.rows, len(stats["classes"]), world, micro, accumulation,
            f.batch_size, state["step"], stop, f.steps,
        )  # fmt: skip
    lines: list[dict] = []
    progress = Progress(out, "train_flow", state["step"], stop, f.steps) if rank == 0 else None
    while state["step"] < stop:
        step = state["step"]
        inject_fault(f.fail_at_step, "flow.fail_at_step", out, step, rank, world)
        lr = lr_at_step(step, f.steps, f.lr, f.warmup_steps, f.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        engine.train()
        started = time.perf_counter()
        measured = StepStats(device)  # read once, at the end of the step
        for micro in range(accumulation):
            t0 = time.perf_counter()
            batch = next(batches)
            measured.add("data_wait_s", time.perf_counter() - t0)
            measured.add("tokens", int(batch["patch_mask"].sum()))  # host tensor: no device read
            state["position"] = Position.after(batch).state()
            seed = np.random.default_rng([f.seed, rank, step, micro]).integers(2**62)
            generator = torch.Generator().manual_seed(int(seed))  # t, noise and label drops: a function of the step
            measured.add("loss", micro_step(engine, batch, device, generator, f.label_dropout) / accumulation)
        ema.update(engine.module)
        grad_norm = engine.get_global_grad_norm()
        measured.add("grad_norm", grad_norm if grad_norm is not None else float("nan"))
        reduced = measured.reduce_and_read()
        elapsed = time.perf_counter() - started
        state["step"] = step + 1
        metrics = {
            "step": step + 1,
            "loss": reduced["loss"] / world,
            "lr": lr,
            "grad_norm": reduced["grad_norm"] / world,  # the same global norm on every rank
            "tokens": reduced["tokens"],
            "tokens_per_s": reduced["tokens"] / elapsed,
            "step_s": elapsed,
            "data_wait_s": reduced["data_wait_s"] / world,
        }
        done = state["step"] == stop
        if (state["step"] % f.log_every == 0 or done) and rank == 0:
            lines.append(metrics)
            progress.update(metrics)
            log.info("step %d/%d loss %.4f lr %.2e %.0f tok/s", state["step"], f.steps, metrics["loss"], lr,
                     metrics["tokens_per_s"])  # fmt: skip
        # Ray Train hears of checkpoints only (why: save_checkpoint).
        if state["step"] % f.checkpoint_every == 0 or done:
            if rank == 0:
                write_metrics(out, lines, state["step"])
            files = {"config.yaml": OmegaConf.to_yaml(cfg)}
            kill = fault_fires(f.kill_in_checkpoint_at_step, "kill_in_checkpoint", out, state["step"], rank, world)
            save_checkpoint(engine, {**state, "ema": ema.state_dict()}, metrics, rank, files, kill_mid_upload=kill)
    batches.close()
    if state["step"] == f.steps:
        _export(engine, ema, out, cfg, stats, f.steps, rank)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
def planned_output(cfg: VitokConfig) -> str:
    return output_uri(cfg, open_cache(cache_uri(cfg))["manifest"]["key"])


def run(cfg: VitokConfig) -> dict[str, Any]:
    """Train (or resume, or skip when finished); returns the manifest (status 'paused' on stop_at_step)."""
    cache = cache_uri(cfg)
    opened = open_cache(cache)  # before any cluster work
    require_index(cache, "cache_latents")  # the loader plans from it: a cache from before it needs `vitok index`
    cache_key = opened["manifest"]["key"]
    out = output_uri(cfg, cache_key)
    if is_complete(out):
        log.info("train_flow %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    start = time.time()
    with fsspec.open(join(out, "config.yaml"), "w") as fh:
        fh.write(OmegaConf.to_yaml(cfg))
    init_ray()
    f = cfg.flow
    loop_config = {"config": to_dict(cfg), "out": out, "cache": cache, "stats": opened["stats"]}
    result = fit(
        train_loop, loop_config, out, f.workers, f.use_gpu, f.cpus_per_worker, f.max_failures, f.keep_checkpoints
    )
    manifest = common.finish(
        "train_flow",
        out,
        f.steps,
        result,
        {"cache": cache},
        config_hash=config_hash(cfg),
        wall_s_this_run=time.time() - start,
        versions={"vitok": __version__, "torch": torch.__version__},
        code_version=CODE_VERSION,
        **manifest_fields("train_flow"),
    )
    log.info("train_flow %s: %s at step %d of %d", out, manifest["status"], manifest["step"], f.steps)
    return manifest


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"train_flow output: {manifest['output']} ({manifest['status']} at step {manifest['step']})")


if __name__ == "__main__":
    main()
