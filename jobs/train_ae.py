"""Stage train_ae: train the autoencoder on an ingest output with Ray Train + DeepSpeed ZeRO-3.

    python -m jobs.train_ae --config tiny ingest.source=DIR [train.root=runs] [key=value ...]
    ray job submit --address http://HEAD:8265 --working-dir . -- \
        python -m jobs.train_ae --config 5b train.ingest=s3://bucket/runs/ingest/KEY train.root=s3://bucket/runs

The run lives in {train.root}/train_ae/{key}/ (key = hash of everything that decides the weights: model,
data, loss, optim, the training settings that change results, and the ingest output's key). It is also
the Ray Train run (RunConfig(name=key, storage_path={root}/train_ae)), so rerunning the same command
resumes from the latest checkpoint:
    step-NNNNNNNN/          checkpoints: DeepSpeed ZeRO shards of every rank + rank-RRRRR.pt (step, data
                            position, RNG states, counters) + config.yaml
    metrics/step-*.jsonl    one line per logged step (loss terms, lr, grad norm, tokens/s, data wait, MFU)
    export/                 encoder.safetensors + decoder.safetensors (published layout) + export.json
    exports/step-NNNNNNNN/  the same layout every train.export_every steps (learning curves; off by default)
    manifest.json, _SUCCESS written by the driver when the run has finished

Every worker runs `train_loop`, top to bottom: build the model (same seed on every rank), wrap it in
DeepSpeed, restore the latest checkpoint if there is one, then for each step: pick the token budget,
draw `accumulation` micro-batches of one bucket from this rank's shard, forward, loss, backward, step.
A step whose loss or gradient norm is not finite is skipped (DeepSpeed drops the update) and counted;
after `max_bad_steps` in a row the weights and optimizer state of the last checkpoint are restored
and training continues with the data that follows (the bad stretch is not replayed).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf

from jobs import train_common as common
from jobs.common import init_ray, parse_config, setup_logging
from jobs.ingest import output_uri as ingest_output_uri
from jobs.train_common import (
    Progress,
    StepStats,
    checkpoint_name,
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
from vitok_core.artifacts import absolute, is_complete, join, read_json, stage_key
from vitok_core.checkpoint import save_published
from vitok_core.config import VitokConfig, config_from_dict, config_hash, mixed_precision, to_dict
from vitok_core.fingerprint import manifest_fields
from vitok_core.flops import peak_flops, train_flops_per_token
from vitok_core.ingest_output import IngestOutput
from vitok_core.loader import Augment, BucketLoader, Position, ShardIndex, describe_buckets, grid_of, valid_tokens
from vitok_core.losses import ReconstructionLoss
from vitok_core.model import build_autoencoder, count_parameters, parse_variant
from vitok_core.naflex import to_device
from vitok_core.optim import parameter_groups
from vitok_core.row_index import require_index
from vitok_core.schedules import budget_at_step, budget_boundaries, lr_at_step

log = logging.getLogger("vitok.train_ae")

CODE_VERSION = "train_ae-3"  # 2: zero.Init, fp32 RoPE, SSIM rewrite; 3: the block-wise data plan
# Settings that do not change the trained weights, so they stay out of the run key: where things are,
# how often to log and checkpoint (a resume is exact), how many loader processes, how many restarts, where to
# pause. checkpoint_every comes back into the key with faults.nan_at_steps (train_settings).
_NOT_IN_KEY = (
    "root",
    "ingest",
    "loader_workers",
    "log_every",
    "checkpoint_every",
    "keep_checkpoints",
    "export_every",
    "max_failures",
    "peak_tflops",
    "stop_at_step",
    "cpus_per_worker",
)


# ------------------------------------------------------------------------------------------------
# Settings, key and layout
# ------------------------------------------------------------------------------------------------
def ingest_uri(cfg: VitokConfig) -> str:
    return cfg.train.ingest or ingest_output_uri(cfg)


def train_settings(cfg: VitokConfig, ingest_key: str) -> dict[str, Any]:
    train = {k: v for k, v in to_dict(cfg.train).items() if k not in _NOT_IN_KEY}
    # A recovered crash leaves the weights as an uninterrupted run has them (tested), so fail_at_step is not
    # part of the key; non-finite steps change the weights, so nan_at_steps is.
    train["faults"] = {"nan_at_steps": train["faults"]["nan_at_steps"]}  # kill_in_checkpoint_at_step likewise
    if train["faults"]["nan_at_steps"]:
        # After max_bad_steps non-finite steps in a row the last checkpoint is restored, so where the injected
        # NaNs land relative to the checkpoints decides the weights. (A real NaN stretch cannot be known in
        # advance: a changed cadence there changes which checkpoint is restored; docs/orchestration.md.)
        train["checkpoint_every"] = cfg.train.checkpoint_every
    sections = {name: to_dict(getattr(cfg, name)) for name in ("model", "data", "loss", "optim")}
    return {**sections, "train": train, "ingest_key": ingest_key}


def output_uri(cfg: VitokConfig, ingest: IngestOutput) -> str:
    key = stage_key("train_ae", train_settings(cfg, ingest.manifest["key"]), [ingest.manifest["key"]], CODE_VERSION)
    return join(absolute(cfg.train.root), "train_ae", key)


def planned_output(cfg: VitokConfig) -> str:
    return output_uri(cfg, IngestOutput(ingest_uri(cfg)))


def micro_batch_and_accumulation(cfg: VitokConfig) -> tuple[int, int]:
    t = cfg.train
    return common.micro_batch_and_accumulation(t.batch_size, t.micro_batch_size, t.workers)


def deepspeed_config(cfg: VitokConfig) -> dict[str, Any]:
    """ZeRO-3 from our config (stage, persistence threshold), gradient clipping = optim.grad_clip."""
    t = cfg.train
    zero = {
        "stage": t.zero_stage,
        "overlap_comm": bool(t.use_gpu),
        "stage3_gather_16bit_weights_on_model_save": False,
        "stage3_param_persistence_threshold": t.zero_persistence_threshold,
    }
    bf16 = mixed_precision(t.precision, t.use_gpu)
    return common.deepspeed_config(t.batch_size, t.micro_batch_size, t.workers, cfg.optim.grad_clip, bf16, zero)


# ------------------------------------------------------------------------------------------------
# Inside a Ray Train worker
# ------------------------------------------------------------------------------------------------
class _Budgets:
    """The loaders of each budget, each resumable at this rank's position in its plan (a Position's state;
    a checkpoint from before positions were structured holds a count of batches, which the loader replays)."""

    def __init__(self, cfg: VitokConfig, ingest: str, rank: int, world: int, position: dict[str, Any]) -> None:
        self.cfg, self.ingest, self.rank, self.world = cfg, ingest, rank, world
        self.position: dict[str, Any] = {str(b): position.get(str(b), 0) for b in cfg.data.budgets}
        self.budget: int | None = None
        self._iterator: Iterator[dict[str, torch.Tensor]] | None = None

    def next(self, budget: int) -> tuple[dict[str, torch.Tensor], float]:
        """The next micro-batch at `budget` and the seconds spent waiting for it."""
        if budget != self.budget:
            self.close()
            cfg = self.cfg
            index = ShardIndex.build(self.ingest, budget, self.rank, self.world)
            micro, _ = micro_batch_and_accumulation(cfg)
            loader = BucketLoader(
                index,
                micro_batch=micro,
                seed=cfg.train.seed,
                patch_size=parse_variant(cfg.model.variant).patch_size,
                augment=Augment.from_config(cfg.data.augment),
                window=cfg.train.shuffle_window,
                workers=cfg.train.loader_workers,
                pin_memory=cfg.train.use_gpu,
            )
            loader.retry = to_dict(cfg.io)  # reading the index's blocks and the row groups (vitok_core/io_retry.py)
            self._iterator = loader.batches(start=self.position[str(budget)])
            self.budget = budget
            if self.rank == 0:
                log.info(
                    "budget %d tokens: %d images (all ranks) in %s, %d blocks",
                    budget, index.rows, describe_buckets(index.bucket_sizes()), index.blocks,
                )  # fmt: skip
        start = time.perf_counter()
        batch = next(self._iterator)
        self.position[str(budget)] = Position.after(batch).state()
        return batch, time.perf_counter() - start

    def close(self) -> None:
        if self._iterator is not None:
            self._iterator.close()
            self._iterator = None


def build_model(cfg: VitokConfig, ds_config: dict[str, Any]) -> torch.nn.Module:
    """The autoencoder, built under DeepSpeed's zero.Init at ZeRO stage 3: each module's parameters are
    partitioned as its constructor returns, so a rank holds its shards plus one module at a time in
    full, never the whole fp32 model (20 GB at 5B). The same seed on every rank gives one model."""
    deepspeed = import_deepspeed()
    spec = parse_variant(cfg.model.variant)
    options = {
        "layer_scale_init": cfg.model.layer_scale_init,
        "activation_checkpointing": cfg.model.activation_checkpointing,
    }
    torch.manual_seed(cfg.train.seed)
    if ds_config["zero_optimization"]["stage"] == 3:
        # zero.Init reads the world size from DeepSpeed's communicator: wrap the process group Ray Train
        # (or the caller) made, as deepspeed.initialize would.
        deepspeed.init_distributed(dist_backend=dist.get_backend(), dist_init_required=False)
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            return build_autoencoder(spec, **options)
    return build_autoencoder(spec, **options)


def setup_training(cfg: VitokConfig, device: torch.device) -> tuple[Any, Any, ReconstructionLoss, int]:
    """(DeepSpeed engine, its optimizer, the loss on `device`, parameter count) for this rank."""
    deepspeed = import_deepspeed()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # zero.Init and DeepSpeed allocate on the current device
    ds_config = deepspeed_config(cfg)
    model = build_model(cfg, ds_config)
    spec = parse_variant(cfg.model.variant)
    with torch.device("meta"):  # shards report 0 elements; count on an empty model
        n_params = count_parameters(build_autoencoder(spec))["total"]
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=ds_config, dist_init_required=False
    )
    return engine, optimizer, ReconstructionLoss(cfg.loss, spec.patch_size).to(device), n_params


def micro_step(
    engine: Any,
    loss_fn: ReconstructionLoss,
    batch: dict[str, torch.Tensor],
    generator: torch.Generator,
    poison: bool = False,
    timings: dict[str, float] | None = None,
) -> dict[str, torch.Tensor]:
    """Forward, loss, backward and DeepSpeed step on one device batch (fp32 pixels; the model gets them
    in its own dtype, the loss compares with the fp32 target). Returns the loss terms and `finite` (1 when
    every rank's loss is finite) as device tensors: nothing here reads the device.

    A rank whose loss is not finite makes every rank's gradients NaN, so DeepSpeed's own check drops the
    step's update on all ranks and clears the accumulated gradients (`poison` forces this, for tests).
    `timings` accumulates host seconds in forward + backward and in DeepSpeed's step (on a GPU, host time:
    where the host waits, not kernel time)."""
    started = time.perf_counter()
    model_dtype = next(engine.module.parameters()).dtype
    terms = loss_fn(engine({**batch, "patches": batch["patches"].to(model_dtype)})["patches"].float(), batch, generator)
    loss = terms["loss"]
    if poison:
        loss = terms["loss"] = loss * float("nan")
    finite = torch.isfinite(loss.detach()).float()
    dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    engine.backward(loss * torch.where(finite > 0, 1.0, float("nan")))
    stepping = time.perf_counter()
    engine.step()
    if timings is not None:
        timings["forward_backward_s"] = timings.get("forward_backward_s", 0.0) + stepping - started
        timings["optimizer_s"] = timings.get("optimizer_s", 0.0) + time.perf_counter() - stepping
    return {**{name: value.detach() for name, value in terms.items()}, "finite": finite}


def export_name(step: int) -> str:
    return f"exports/step-{step:08d}"


def _export(engine: Any, out: str, cfg: VitokConfig, step: int, rank: int, name: str = "export") -> None:
    """Write the fp32 master weights (gathered from the ZeRO shards; every rank takes part) in the
    published layout."""
    state = full_fp32_state(engine, rank)
    if rank == 0:
        metadata = {"variant": cfg.model.variant, "config_hash": config_hash(cfg), "step": step, "run": out}
        save_published(state, join(out, name), metadata=metadata)


def train_loop(config: dict[str, Any]) -> None:
    """Ray Train worker entry point (every rank runs this)."""
    import ray.train
    import ray.train.torch

    setup_logging()
    cfg = config_from_dict(config["config"])
    out, ingest = config["out"], config["ingest"]
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device() if cfg.train.use_gpu else torch.device("cpu")
    total = cfg.train.steps
    stop = min(total, cfg.train.stop_at_step or total)
    micro, accumulation = micro_batch_and_accumulation(cfg)

    # Model, optimizer, engine. The same seed everywhere: every rank builds the same initial weights.
    engine, optimizer, loss_fn, n_params = setup_training(cfg, device)
    spec = parse_variant(cfg.model.variant)
    peak, peak_source = peak_flops(
        torch.cuda.get_device_name(device) if device.type == "cuda" else None, cfg.train.peak_tflops
    )

    state: dict[str, Any] = {"step": 0, "position": {}, "skipped_steps": 0, "restores": 0}
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        state = load_checkpoint(engine, checkpoint, rank)
        if rank == 0:
            log.info("resumed from %s at step %d", checkpoint.path, state["step"])
    if rank == 0:
        record_start(out, state["step"], checkpoint.path if checkpoint is not None else None)
    last_checkpoint = checkpoint
    budgets = _Budgets(cfg, ingest, rank, world, state["position"])
    boundaries = budget_boundaries(total, cfg.data.budget_switch)
    if rank == 0:
        log.info(
            "train_ae %s: %s (%.1fM parameters), %d workers x %d images x %d accumulation = batch %d, "
            "steps %d..%d of %d, budgets %s switching at steps %s; MFU peak: %s",
            out, cfg.model.variant, n_params / 1e6, world, micro, accumulation, cfg.train.batch_size,
            state["step"], stop, total, list(cfg.data.budgets), boundaries, peak_source,
        )  # fmt: skip
    lines: list[dict] = []
    progress = Progress(out, "train_ae", state["step"], stop, total) if rank == 0 else None
    bad_in_a_row = 0
    previous_budget = budget_at_step(max(0, state["step"] - 1), total, cfg.data.budgets, cfg.data.budget_switch)
    while state["step"] < stop:
        step = state["step"]
        inject_fault(cfg.train.faults.fail_at_step, "train.faults.fail_at_step", out, step, rank, world)
        budget = budget_at_step(step, total, cfg.data.budgets, cfg.data.budget_switch)
        if budget != previous_budget and rank == 0:
            log.warning("budget switch at step %d: %d -> %d tokens", step, previous_budget, budget)
        previous_budget = budget
        lr = lr_at_step(step, total, cfg.optim.lr, cfg.optim.warmup_steps, cfg.optim.min_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr

        engine.train()
        started = time.perf_counter()
        # Everything a step measures stays on the device until one read at its end (StepStats).
        stats, grids, timings = StepStats(device), set(), {}
        for micro in range(accumulation):
            batch, waited = budgets.next(budget)
            stats.add("data_wait_s", waited)
            stats.add("tokens", valid_tokens(batch))  # host tensors: no device read
            grids.add(grid_of(batch))
            seed = np.random.default_rng([cfg.train.seed, rank, step, micro]).integers(2**62)
            generator = torch.Generator().manual_seed(int(seed))  # tile origins: a function of the step
            poison = step in cfg.train.faults.nan_at_steps
            terms = micro_step(engine, loss_fn, to_device(batch, device), generator, poison, timings)
            for name, value in terms.items():
                stats.add(name, value / accumulation if name != "finite" else value)
        grad_norm = engine.get_global_grad_norm()  # DeepSpeed's: a tensor, or inf on a dropped step
        stats.add("grad_norm", grad_norm if grad_norm is not None else float("nan"))
        for name, seconds in timings.items():
            stats.add(name, seconds)
        reading = time.perf_counter()
        reduced = stats.reduce_and_read()  # the step's one device-to-host read
        sync_s = time.perf_counter() - reading
        finite_step = reduced.pop("finite") == accumulation * world
        grad_norm = reduced.pop("grad_norm") / world  # the same global norm on every rank
        if not finite_step or not np.isfinite(grad_norm):
            state["skipped_steps"] += 1
            bad_in_a_row += 1
            if rank == 0:
                log.warning("step %d skipped: loss or gradient norm not finite (%d in a row)", step, bad_in_a_row)
            if bad_in_a_row >= cfg.train.max_bad_steps:
                if last_checkpoint is None:
                    raise RuntimeError(f"{bad_in_a_row} non-finite steps in a row and no checkpoint to restore")
                position, step_now, counters = dict(budgets.position), state["step"], dict(state)
                restored = load_checkpoint(engine, last_checkpoint, rank)
                state.update(counters, restores=counters["restores"] + 1, step=step_now, position=position)
                bad_in_a_row = 0
                if rank == 0:
                    log.warning("restored weights and optimizer of step %d after non-finite steps", restored["step"])
        else:
            bad_in_a_row = 0
        elapsed = time.perf_counter() - started
        global_tokens = reduced.pop("tokens")
        seq_len = grids.pop()
        seq_len = seq_len[0] * seq_len[1]
        state["step"] = step + 1
        state["position"] = dict(budgets.position)
        metrics = {
            "step": step + 1,
            "budget": budget,
            "lr": lr,
            "grad_norm": grad_norm,
            "tokens": global_tokens,
            "tokens_per_s": global_tokens / elapsed,
            "step_s": elapsed,
            "data_wait_s": reduced.pop("data_wait_s") / world,
            "forward_backward_s": reduced.pop("forward_backward_s") / world,
            "optimizer_s": reduced.pop("optimizer_s") / world,
            "sync_s": sync_s,  # rank 0's wait in the step's one reduce + read
            **{name: value / world for name, value in reduced.items()},  # the loss terms, averaged
            "skipped_steps": state["skipped_steps"],
            "restores": state["restores"],
        }
        if peak is not None:
            flops = train_flops_per_token(spec, n_params, seq_len) * global_tokens
            metrics["mfu"] = flops / elapsed / (peak * world)
        done = state["step"] == stop
        if (state["step"] % cfg.train.log_every == 0 or done) and rank == 0:
            lines.append(metrics)
            progress.update(metrics)
            log.info(
                "step %d/%d budget %d loss %.4f lr %.2e grad %.3f %.0f tok/s wait %.3fs",
                state["step"], total, budget, metrics["loss"], lr, grad_norm, metrics["tokens_per_s"],
                metrics["data_wait_s"],
            )  # fmt: skip
        # Before the checkpoint: a crash between the two then redoes the export (same weights: resume is exact)
        # instead of resuming past it.
        export_every = cfg.train.export_every
        if export_every and state["step"] % export_every == 0 and state["step"] < total:
            _export(engine, out, cfg, state["step"], rank, export_name(state["step"]))
        # Ray Train hears of checkpoints only (why: save_checkpoint).
        if state["step"] % cfg.train.checkpoint_every == 0 or done:
            if rank == 0:
                write_metrics(out, lines, state["step"])
            kill_at = cfg.train.faults.kill_in_checkpoint_at_step
            kill = fault_fires(kill_at, "kill_in_checkpoint", out, state["step"], rank, world)
            files = {"config.yaml": OmegaConf.to_yaml(cfg)}
            save_checkpoint(engine, state, metrics, rank, files, kill_mid_upload=kill)
            last_checkpoint = ray.train.Checkpoint(join(out, checkpoint_name(state["step"])))
    budgets.close()
    if state["step"] == total:
        _export(engine, out, cfg, total, rank)


# ------------------------------------------------------------------------------------------------
# The driver
# ------------------------------------------------------------------------------------------------
def run(cfg: VitokConfig) -> dict[str, Any]:
    """Train (or resume, or skip when finished); returns the manifest (status 'paused' on stop_at_step)."""
    ingest = IngestOutput(ingest_uri(cfg))  # fails here, before any cluster work, if it is not complete
    out = output_uri(cfg, ingest)
    if is_complete(out):
        log.info("train_ae %s is complete; skipped", out)
        return read_json(join(out, "manifest.json"))
    require_index(ingest.uri)  # every rank's loader plans from it: an output from before it fails here, not there
    start = time.time()
    fs, path = fsspec.core.url_to_fs(out)
    fs.makedirs(path, exist_ok=True)
    with fsspec.open(join(out, "config.yaml"), "w") as f:
        f.write(OmegaConf.to_yaml(cfg))
    init_ray()
    t = cfg.train
    loop_config = {"config": to_dict(cfg), "out": out, "ingest": ingest.uri}
    result = fit(
        train_loop, loop_config, out, t.workers, t.use_gpu, t.cpus_per_worker, t.max_failures, t.keep_checkpoints
    )
    manifest = common.finish(
        "train_ae",
        out,
        cfg.train.steps,
        result,
        {"ingest": ingest.uri},
        config_hash=config_hash(cfg),
        wall_s_this_run=time.time() - start,
        versions=_versions(),
        code_version=CODE_VERSION,
        exports=[join(out, export_name(s)) for s in range(t.export_every, t.steps, t.export_every or t.steps)],
        **manifest_fields("train_ae"),
    )
    log.info("train_ae %s: %s at step %d of %d", out, manifest["status"], manifest["step"], cfg.train.steps)
    return manifest


def _versions() -> dict[str, str]:
    import deepspeed
    import ray

    return {
        "vitok": __version__,
        "ray": ray.__version__,
        "deepspeed": deepspeed.__version__,
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"train_ae output: {manifest['output']} ({manifest['status']} at step {manifest['step']})")


if __name__ == "__main__":
    main()
