"""Multi-process DeepSpeed cases run by tests/test_precision.py: each rank is its own Python process (real
gloo process group on 127.0.0.1, real DeepSpeed), started by `run_ranks`, and writes its findings as JSON.

    python -m tests.distributed_cases CASE RANK WORLD PORT OUT_DIR [key=value ...]
"""

from __future__ import annotations

import collections
import json
import os
import resource
import subprocess
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils._python_dispatch import TorchDispatchMode

REPO = Path(__file__).resolve().parent.parent


def run_ranks(case: str, world: int, out: Path, *args: str, timeout: float = 300) -> list[dict[str, Any]]:
    """Run CASE on `world` processes; returns each rank's JSON (fails with the ranks' output otherwise)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out.mkdir(parents=True, exist_ok=True)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.distributed_cases", case, str(rank), str(world), str(port), str(out), *args],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world)
    ]
    logs = [p.communicate(timeout=timeout)[0] for p in procs]
    for rank, (p, log) in enumerate(zip(procs, logs, strict=True)):
        if p.returncode != 0:
            raise AssertionError(f"rank {rank} of {case} exited {p.returncode}:\n{log[-4000:]}")
    return [json.loads((out / f"{case}-rank{rank}.json").read_text()) for rank in range(world)]


def _config(precision: str, variant: str, world: int):
    from vitok_core.config import load_config

    return load_config(
        "tiny",
        [
            f"model.variant={variant}",
            f"train.workers={world}",
            f"train.batch_size={2 * world}",
            "train.micro_batch_size=2",
            f"train.precision={precision}",
        ],
    )


def _batch(patch: int = 16) -> dict[str, torch.Tensor]:
    from vitok_core.naflex import collate, patchify

    generator = torch.Generator().manual_seed(5)
    images = [torch.rand(3, 128, 96, generator=generator) * 2 - 1 for _ in range(2)]
    return collate([patchify(image, patch) for image in images])


def case_build(options: dict[str, str]) -> dict[str, Any]:
    """Build the model as the job does (zero.Init at stage 3) and report this rank's share, its peak RSS
    and, on request, the gathered weights' checksum next to a plain build's from the same seed."""
    from jobs.train_ae import build_model, deepspeed_config
    from jobs.train_common import import_deepspeed
    from vitok_core.model import build_autoencoder

    deepspeed = import_deepspeed()
    cfg = _config(options.get("precision", "fp32"), options["variant"], dist.get_world_size())
    ds_config = deepspeed_config(cfg)
    if options.get("zero_init", "true") == "false":
        ds_config["zero_optimization"]["stage"] = 0  # the old construction: the whole model on every rank
    model = build_model(cfg, ds_config)
    local = sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel() for p in model.parameters())
    result: dict[str, Any] = {"local_elements": local, "rss_peak_mib": _peak_rss_mib()}
    if options.get("compare") == "true":
        torch.manual_seed(cfg.train.seed)
        plain = build_autoencoder(cfg.model.variant, layer_scale_init=cfg.model.layer_scale_init)
        mismatched = []
        for (name, param), reference in zip(model.named_parameters(), plain.parameters(), strict=True):
            with deepspeed.zero.GatheredParameters([param]):
                if not torch.equal(param.detach(), reference.detach().to(param.dtype)):
                    mismatched.append(name)
        result["mismatched"] = mismatched
        result["total_elements"] = sum(p.numel() for p in plain.parameters())
    return result


def case_engine_rss(options: dict[str, str]) -> dict[str, Any]:
    """Peak RSS of a rank once DeepSpeed's engine (ZeRO-3, AdamW) exists: the construction plus the
    optimizer's partitioned state. zero_init=false builds the way the job did before zero.Init: the whole
    fp32 model on every rank, partitioned by deepspeed.initialize."""
    import time

    from jobs.train_ae import deepspeed_config, setup_training
    from jobs.train_common import import_deepspeed
    from vitok_core.model import build_autoencoder
    from vitok_core.optim import parameter_groups

    cfg = _config(options.get("precision", "fp32"), options["variant"], dist.get_world_size())
    started = time.perf_counter()
    if options.get("zero_init", "true") == "true":
        setup_training(cfg, torch.device("cpu"))
    else:
        torch.manual_seed(cfg.train.seed)
        model = build_autoencoder(cfg.model.variant, layer_scale_init=cfg.model.layer_scale_init)
        optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr)
        import_deepspeed().initialize(
            model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False
        )
    return {"rss_peak_mib": _peak_rss_mib(), "setup_s": time.perf_counter() - started}


class _ScalarReads(TorchDispatchMode):
    """Counts scalar reads (`float()`, `bool()`, `int()`, `.item()`: aten._local_scalar_dense, the
    device-to-host read that waits for a GPU's queue), by the innermost project or DeepSpeed frame."""

    def __init__(self) -> None:
        super().__init__()
        self.reads: collections.Counter[str] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            self.reads[_reader()] += 1
        return func(*args, **(kwargs or {}))


def _reader() -> str:
    for frame in reversed(traceback.extract_stack()):
        if "deepspeed" in frame.filename:
            return "deepspeed"
        path = Path(frame.filename)
        if REPO in path.parents and ".venv" not in path.parts and path.name != "distributed_cases.py":
            return f"{path.relative_to(REPO)}:{frame.name}"
    return "other"


def case_host_reads(options: dict[str, str]) -> dict[str, Any]:
    """train_ae's step as the job runs it (micro_step per micro-batch, StepStats read once) for a few
    steps, one of them non-finite: where the scalar reads come from, and the guard's behaviour."""
    import numpy as np

    from jobs.train_ae import micro_step, setup_training
    from jobs.train_common import StepStats, full_fp32_state
    from vitok_core.naflex import to_device

    cfg = _config(options.get("precision", "bf16"), options.get("variant", "Tid2-Tid4/1x16x16"), dist.get_world_size())
    engine, _, loss_fn, _ = setup_training(cfg, torch.device("cpu"))
    batch, steps = _batch(), []
    for step in range(4):
        before = full_fp32_state(engine, dist.get_rank()) if step == 2 else None
        with _ScalarReads() as reads:
            stats = StepStats(torch.device("cpu"))
            generator = torch.Generator().manual_seed(step)
            terms = micro_step(engine, loss_fn, to_device(batch, "cpu"), generator, poison=step == 2)
            for name, value in terms.items():
                stats.add(name, value)
            stats.add("grad_norm", engine.get_global_grad_norm())
            read = stats.reduce_and_read()
        unchanged = None
        if before is not None:
            after = full_fp32_state(engine, dist.get_rank())
            unchanged = all(torch.equal(before[k], after[k]) for k in before)
        steps.append({"read": read, "reads": dict(reads.reads), "weights_unchanged": unchanged})
    finite = [s["read"]["finite"] for s in steps]
    return {"steps": steps, "finite": finite, "loss_finite": [bool(np.isfinite(s["read"]["loss"])) for s in steps]}


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


CASES = {"build": case_build, "engine_rss": case_engine_rss, "host_reads": case_host_reads}


def main() -> None:
    case, rank, world, port, out = sys.argv[1:6]
    options = dict(arg.split("=", 1) for arg in sys.argv[6:])
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=rank, WORLD_SIZE=world, LOCAL_RANK=rank)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=int(rank), world_size=int(world))
    result = CASES[case](options)
    Path(out, f"{case}-rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
