"""What the two Ray Train + DeepSpeed jobs (train_ae, train_flow) share: DeepSpeed import on CPU, rank
checkpoints through ray.train.report, metrics JSONL, fault injection and the TorchTrainer itself.

A checkpoint directory `step-NNNNNNNN/` holds DeepSpeed's files (tag `zero`: every rank's ZeRO shards),
one `rank-RRRRR.pt` per rank (the loop's state: step, data position, counters, and RNG states) and any
small text files rank 0 adds. Every rank writes its own files to a local temporary directory and reports
it; Ray Train merges the ranks' files into one checkpoint in the run directory.
"""

from __future__ import annotations

import importlib
import json
import os
import random
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from typing import Any

import fsspec
import numpy as np
import torch
import torch.distributed as dist

from vitok_core.artifacts import join, mark_success, write_json


def import_deepspeed() -> Any:
    """DeepSpeed, minus two start-up costs of features we do not use.

    - Its CPU shared-memory op is disabled: on CPU it JIT-compiles that op at start-up (75-90 s) for what
      gloo does anyway. `import deepspeed.comm.torch as m` would bind torch itself (deepspeed.comm
      re-exports it), hence importlib.
    - Its Muon optimizer module is imported with `torch.compile` as a no-op: `deepspeed.initialize` and
      the ZeRO optimizers import it only to check `isinstance(optimizer, MuonWithAuxAdam)`, and its
      module-level `torch.compile` loads Inductor, about 4 s per worker. We train with AdamW; a run that
      used DeepSpeed's Muon would get its Newton-Schulz step in eager mode.
    """
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    import deepspeed

    compile_ = torch.compile
    torch.compile = lambda model=None, **kwargs: model if model is not None else (lambda fn: fn)
    try:
        importlib.import_module("deepspeed.runtime.zero.muon.muon_optimizer")
    finally:
        torch.compile = compile_
    return deepspeed


class StepStats:
    """A step's numbers, kept where they are until the step ends, then reduced and read back at once.

    `add` accumulates device tensors (loss terms, flags) without reading them, and host numbers (tokens,
    data wait) as floats. `reduce_and_read` copies the host numbers to the device (from pinned memory,
    asynchronously, on CUDA), all-reduces everything in one SUM and reads it back: the only host sync of
    a training step outside DeepSpeed's own step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.on_device: dict[str, torch.Tensor] = {}
        self.on_host: dict[str, float] = {}

    def add(self, name: str, value: torch.Tensor | float) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().double().reshape(())
            self.on_device[name] = self.on_device[name] + value if name in self.on_device else value
        else:
            self.on_host[name] = self.on_host.get(name, 0.0) + float(value)

    def reduce_and_read(self) -> dict[str, float]:
        pinned = self.device.type == "cuda"
        host = torch.tensor(list(self.on_host.values()), dtype=torch.float64, pin_memory=pinned)
        parts = [host.to(self.device, non_blocking=True), *(v.to(self.device) for v in self.on_device.values())]
        stacked = torch.cat([p.reshape(-1) for p in parts])
        dist.all_reduce(stacked, op=dist.ReduceOp.SUM)
        names = [*self.on_host, *self.on_device]
        self.on_device, self.on_host = {}, {}
        return dict(zip(names, stacked.tolist(), strict=True))


def full_fp32_state(engine: Any, rank: int) -> dict[str, torch.Tensor]:
    """The model's full fp32 master weights (+ buffers) on rank 0's CPU ({} on other ranks); every rank
    must call it. In bf16 the module's own parameters are bf16 copies: the masters live in the optimizer
    (ZeRO-partitioned), so they are gathered one parameter at a time with DeepSpeed's accessor."""
    from deepspeed.utils import safe_get_full_fp32_param

    module = engine.module
    state = {}
    for name, param in module.named_parameters():
        full = safe_get_full_fp32_param(param)
        if full is None:  # no optimizer-held master: a plain fp32 parameter is its own master
            if param.dtype != torch.float32 or hasattr(param, "ds_id"):
                raise RuntimeError(f"no fp32 master weight for {name} ({param.dtype}); bf16 needs ZeRO stage >= 1")
            full = param.detach()
        if rank == 0:
            state[name] = full.detach().float().cpu().clone()
    if rank == 0:
        names = set(module.state_dict())
        state.update({name: b.detach().cpu().clone() for name, b in module.named_buffers() if name in names})
    return state


def micro_batch_and_accumulation(batch_size: int, micro_batch_size: int, workers: int) -> tuple[int, int]:
    """(images per worker per forward, accumulation steps); micro 0 = batch / workers, no accumulation."""
    micro = micro_batch_size or batch_size // workers
    return micro, batch_size // (micro * workers)


def deepspeed_config(
    batch_size: int, micro_batch_size: int, workers: int, grad_clip: float, bf16: bool, zero: dict[str, Any]
) -> dict[str, Any]:
    """A DeepSpeed config: bf16 modules with fp32 masters, or fp32; our own torch optimizer (no
    JIT-compiled FusedAdam)."""
    micro, accumulation = micro_batch_and_accumulation(batch_size, micro_batch_size, workers)
    return {
        "train_batch_size": batch_size,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": grad_clip,
        "bf16": {"enabled": bool(bf16)},
        "zero_optimization": {"contiguous_gradients": True, **zero},
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def checkpoint_name(step: int) -> str:
    return f"step-{step:08d}"


def _rank_state_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank-{rank:05d}.pt")


def rng_state() -> dict[str, Any]:
    """The process's RNG states in types `torch.load(weights_only=True)` reads: tensors, ints, floats,
    strings and tuples of them (numpy's state is a tuple holding an ndarray, which that loader refuses)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    numpy = {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos)}
    return {
        "torch": torch.get_rng_state(),
        "numpy": {**numpy, "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "python": random.getstate(),
    }


def set_rng_state(rng: dict[str, Any]) -> None:
    torch.set_rng_state(rng["torch"])
    n = rng["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    random.setstate(rng["python"])


def save_checkpoint(
    engine: Any,
    state: dict,
    metrics: dict,
    rank: int,
    files: dict[str, str] | None = None,
    kill_mid_upload: bool = False,
) -> None:
    """Every rank: DeepSpeed shards + its own state (+ rank 0's text `files`), reported to Ray Train.

    The training loops report to Ray Train only here, at checkpoints: Ray Train keeps one pending report
    per worker and its controller takes it every 2 s, so a report per logged step stalls short steps
    (logged lines go to the log and, at the next checkpoint, to metrics/*.jsonl).

    A checkpoint exists for a rerun only once every rank's report has reached Ray Train's controller, which
    records it in the run directory; a directory cut short by a dying rank is never handed to a restart.
    `kill_mid_upload` (fault drills) makes this rank copy half its files into the run directory and
    SIGKILL itself: such a cut-short checkpoint."""
    import ray.train

    step = state["step"]
    directory = tempfile.mkdtemp(prefix=f"vitok-step{step}-")
    engine.save_checkpoint(directory, tag="zero", client_state={"step": step})
    torch.save({**state, "rng": rng_state()}, _rank_state_path(directory, rank))
    if rank == 0:
        for name, text in (files or {}).items():
            with open(os.path.join(directory, name), "w") as f:
                f.write(text)
    checkpoint = ray.train.Checkpoint.from_directory(directory)
    upload = _killed_halfway if kill_mid_upload else None
    name = checkpoint_name(step)
    ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name, checkpoint_upload_fn=upload)
    shutil.rmtree(directory, ignore_errors=True)


def _killed_halfway(checkpoint: Any, checkpoint_dir_name: str) -> Any:
    """A checkpoint upload that copies half of this rank's files into the run directory, then SIGKILLs the
    process (Ray Train calls it after every rank has agreed on the directory name)."""
    import ray.train

    storage = ray.train.get_context().get_storage()
    target = f"{storage.experiment_fs_path}/{checkpoint_dir_name}"
    names = sorted(
        os.path.relpath(os.path.join(parent, name), checkpoint.path)
        for parent, _, found in os.walk(checkpoint.path)
        for name in found
    )
    for name in names[: max(1, len(names) // 2)]:
        storage.storage_filesystem.create_dir(os.path.dirname(f"{target}/{name}"))
        with (
            open(os.path.join(checkpoint.path, name), "rb") as src,
            storage.storage_filesystem.open_output_stream(f"{target}/{name}") as dst,
        ):
            dst.write(src.read())
    os.kill(os.getpid(), signal.SIGKILL)


def load_checkpoint(engine: Any, checkpoint: Any, rank: int) -> dict:
    """Weights and optimizer into `engine`, RNG states restored; returns this rank's saved state."""
    with checkpoint.as_directory() as directory:
        engine.load_checkpoint(directory, tag="zero", load_optimizer_states=True, load_lr_scheduler_states=False)
        state = torch.load(_rank_state_path(directory, rank), weights_only=True)  # no pickle runs on load
    set_rng_state(state.pop("rng"))
    return state


STARTS = "starts"


def record_start(out: str, step: int, checkpoint: str | None) -> None:
    """Rank 0, each time a worker group starts: the first start, a rerun, or Ray Train's restart after a lost
    worker or node. One small JSON file each ({"step", "checkpoint" (None: from scratch), "time"}), so the
    run's manifest can say what was redone and when."""
    record = {"step": step, "checkpoint": checkpoint, "time": time.time()}
    write_json(join(out, STARTS, f"{time.time_ns()}.json"), record)


def read_starts(out: str) -> list[dict]:
    """Every worker-group start of a run, oldest first."""
    fs, path = fsspec.core.url_to_fs(join(out, STARTS))
    if not fs.exists(path):
        return []
    found = []
    for name in sorted(fs.ls(path, detail=False)):
        with fs.open(name, "r") as f:
            found.append(json.load(f))
    return found


def write_metrics(out: str, lines: list[dict], step: int) -> None:
    """The lines logged since the last checkpoint, as metrics/step-N.jsonl (written at checkpoints only,
    so a run resumed from a checkpoint never repeats a line)."""
    if lines:
        with fsspec.open(join(out, "metrics", f"step-{step:08d}.jsonl"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        lines.clear()


def read_metrics(out: str) -> list[dict]:
    """Every logged step of a run, in order."""
    fs, path = fsspec.core.url_to_fs(join(out, "metrics"))
    if not fs.exists(path):
        return []
    lines = []
    for name in sorted(fs.ls(path, detail=False)):
        with fs.open(name, "r") as f:
            lines += [json.loads(line) for line in f if line.strip()]
    return lines


PROGRESS = "progress.json"


class Progress:
    """Rank 0's progress.json in the run directory: the last logged step, its loss and tokens/s, and an ETA,
    rewritten at every logged step. The step lines are logged by Ray Train worker processes, which only Ray's
    own log streaming sees; a file is what any watcher can read (the Prefect task of a local run polls it), on
    local disk or S3 alike."""

    def __init__(self, out: str, stage: str, first_step: int, stop: int, total: int) -> None:
        self.path, self.stage = join(out, PROGRESS), stage
        self.first_step, self.stop, self.total = first_step, stop, total
        self.started = time.monotonic()

    def update(self, metrics: dict[str, Any]) -> None:
        step = metrics["step"]
        done = step - self.first_step
        # Steps of this session only: a resumed run's earlier steps took no time here.
        eta = (self.stop - step) * (time.monotonic() - self.started) / done if done > 0 else None
        write_json(self.path, {
            "stage": self.stage, "step": step, "stop": self.stop, "total": self.total, "loss": metrics.get("loss"),
            "tokens_per_s": metrics.get("tokens_per_s"), "eta_s": eta, "time": time.time(),
        })  # fmt: skip


def fault_fires(fault_step: int, name: str, out: str, step: int, rank: int, world: int) -> bool:
    """True once, on one rank (1, or 0 alone), at `fault_step`: a marker in the run directory remembers that
    the fault fired, so the restarted or rerun worker goes on."""
    if step != fault_step or rank != min(1, world - 1):
        return False
    fs, path = fsspec.core.url_to_fs(join(out, "faults", f"{name}-{step}"))
    if fs.exists(path):
        return False
    fs.makedirs(os.path.dirname(path), exist_ok=True)
    fs.touch(path)
    return True


def inject_fault(fail_at_step: int, key: str, out: str, step: int, rank: int, world: int) -> None:
    """`fail_at_step`: one rank (1, or 0 alone) raises once when that many steps are done, as a crashed
    worker would."""
    if fault_fires(fail_at_step, "fail_at_step", out, step, rank, world):
        raise RuntimeError(f"injected fault before step {step} on rank {rank} ({key})")


def fit(
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    out: str,
    workers: int,
    use_gpu: bool,
    cpus_per_worker: float,
    max_failures: int,
    keep_checkpoints: int,
) -> Any:
    """Run `loop` on `workers` Ray Train workers; the run is `out` (name = its last part), so running the
    same `out` again resumes from its latest checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = {"CPU": cpus_per_worker, **({"GPU": 1} if use_gpu else {})}
    trainer = TorchTrainer(
        loop,
        train_loop_config=loop_config,
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=out.rstrip("/").rsplit("/", 1)[-1],
            storage_path=out.rstrip("/").rsplit("/", 1)[0],
            failure_config=FailureConfig(max_failures=max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=keep_checkpoints),
        ),
    )
    return trainer.fit()


def finish(stage: str, out: str, total_steps: int, result: Any, inputs: dict[str, Any], **extra: Any) -> dict:
    """The run's manifest from its metrics: 'complete' (manifest.json + _SUCCESS written) when the last
    step is done, else 'paused' (nothing written: a rerun resumes)."""
    metrics = read_metrics(out)
    step = metrics[-1]["step"] if metrics else 0
    complete = step == total_steps
    manifest = {
        "stage": stage,
        "key": out.rstrip("/").rsplit("/", 1)[-1],
        "output": out,
        **inputs,
        "status": "complete" if complete else "paused",
        "step": step,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final": metrics[-1] if metrics else {},
        "export": join(out, "export") if complete else None,
        "starts": read_starts(out),
        **extra,
    }
    if complete:
        write_json(join(out, "manifest.json"), manifest)
        mark_success(out)
    return manifest
