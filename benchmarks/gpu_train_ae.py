"""GPU check of the train_ae step: bf16 step time and MFU of the decoder-scaling presets on ONE GPU with
DeepSpeed ZeRO-3, at 256 and 1024 tokens. Prepared for an accelerator machine (see DEVELOPERS.md / the
`device` tool); on a CPU box it only runs as a smoke test.

    python benchmarks/gpu_train_ae.py                                   # dec_B dec_L dec_G dec_T, 256 + 1024
    python benchmarks/gpu_train_ae.py --presets dec_G --budgets 1024 --batch 1024=8 --steps 20
    python benchmarks/gpu_train_ae.py --device cpu --presets tiny --budgets 64 --steps 3   # smoke test

What one step is: the job's step (jobs/train_ae.py) without Ray and without data loading: a DeepSpeed
engine built from the job's own `deepspeed_config` (stage 3, bf16 on GPU, gradient clipping, torch
AdamW with the job's parameter groups), the preset's ReconstructionLoss with DINO switched off (its
weights cannot be fetched on an offline machine; the DINO forward is not part of the AE's MFU either),
activation checkpointing as in the preset unless --checkpointing says otherwise, on a synthetic batch of
one bucket (a 16 x 16 grid at 256 tokens, 32 x 32 at 1024: square images, so every token is valid).
Step time = median wall time of steps after --warmup, with torch.cuda.synchronize around each step.
MFU = vitok_core.flops.train_flops_per_token x tokens / step time / peak, the peak from
vitok_core.flops.peak_flops (H100/H200: 989 TFLOP/s dense bf16). A preset that runs out of memory at
a batch is retried at half the batch (down to 1) and the table says which batch ran.
Goal (issue 4): >= 45% MFU on the large decoders. Writes benchmarks/results/gpu_train_ae.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import format_table

from jobs.train_ae import deepspeed_config
from jobs.train_common import import_deepspeed
from vitok_core.config import load_config
from vitok_core.flops import peak_flops, train_flops_per_token
from vitok_core.losses import ReconstructionLoss
from vitok_core.model import build_autoencoder, count_parameters, parse_variant
from vitok_core.naflex import collate, patchify
from vitok_core.optim import parameter_groups

RESULTS = Path(__file__).resolve().parent / "results" / "gpu_train_ae.json"
DEFAULT_BATCH = {64: 8, 256: 64, 1024: 16}


def init_single_process(backend: str) -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group(backend=backend, rank=0, world_size=1)


def synthetic_batch(side: int, patch: int, batch: int, device: torch.device, dtype: torch.dtype) -> dict:
    image = torch.rand(3, side * patch, side * patch) * 2 - 1
    sample = patchify(image, patch)
    out = collate([sample] * batch)
    out = {k: v.to(device) for k, v in out.items()}
    out["patches"] = out["patches"].to(dtype)
    return out


def measure(preset: str, budget: int, batch: int, args: argparse.Namespace, device: torch.device) -> dict:
    deepspeed = import_deepspeed()
    on_gpu = device.type == "cuda"
    overrides = [
        f"train.batch_size={batch}",
        f"train.micro_batch_size={batch}",
        "train.workers=1",
        f"train.use_gpu={str(on_gpu).lower()}",
        "loss.dino_weight=0",
    ]
    if args.checkpointing is not None:
        overrides.append(f"model.activation_checkpointing={args.checkpointing}")
    cfg = load_config(preset, overrides)
    spec = parse_variant(cfg.model.variant)
    torch.manual_seed(0)
    model = build_autoencoder(
        spec, layer_scale_init=cfg.model.layer_scale_init, activation_checkpointing=cfg.model.activation_checkpointing
    )
    n_params = count_parameters(model)["total"]
    optimizer = torch.optim.AdamW(parameter_groups(model, cfg.optim.weight_decay), lr=1e-4, betas=(0.9, 0.95))
    engine, _, _, _ = deepspeed.initialize(
        model=model, optimizer=optimizer, config=deepspeed_config(cfg), dist_init_required=False
    )
    loss_fn = ReconstructionLoss(cfg.loss, spec.patch_size).to(device)
    side = int(budget**0.5)
    data = synthetic_batch(side, spec.patch_size, batch, device, torch.bfloat16 if on_gpu else torch.float32)
    times = []
    for _ in range(args.warmup + args.steps):
        if on_gpu:
            torch.cuda.synchronize()
        start = time.perf_counter()
        loss = loss_fn(engine(data)["patches"].float(), data)["loss"]
        engine.backward(loss)
        engine.step()
        if on_gpu:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    step_s = statistics.median(times[args.warmup :])
    tokens = batch * side * side
    peak, source = peak_flops(torch.cuda.get_device_name(device) if on_gpu else None, args.peak_tflops)
    flops = train_flops_per_token(spec, n_params, side * side) * tokens
    memory = torch.cuda.max_memory_allocated(device) / 2**30 if on_gpu else None
    del engine, model, optimizer
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    return {
        "preset": preset,
        "variant": cfg.model.variant,
        "params_m": n_params / 1e6,
        "budget": budget,
        "batch": batch,
        "checkpointing": bool(cfg.model.activation_checkpointing),
        "step_s": step_s,
        "tokens_per_s": tokens / step_s,
        "tflops": flops / step_s / 1e12,
        "mfu": flops / step_s / peak if peak else None,
        "peak_source": source,
        "max_memory_gib": memory,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", nargs="+", default=["dec_B", "dec_L", "dec_G", "dec_T"])
    parser.add_argument("--budgets", nargs="+", type=int, default=[256, 1024])
    parser.add_argument("--batch", nargs="*", default=[], help="BUDGET=IMAGES, e.g. 1024=8")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--checkpointing", choices=["true", "false"], default=None)
    parser.add_argument("--peak-tflops", type=float, default=0.0)
    args = parser.parse_args()
    batches = {**DEFAULT_BATCH, **{int(k): int(v) for k, v in (b.split("=") for b in args.batch)}}
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    init_single_process("nccl" if device.type == "cuda" else "gloo")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"gpu_train_ae on {name}, torch {torch.__version__}")
    rows = []
    for preset in args.presets:
        for budget in args.budgets:
            batch = batches.get(budget, 8)
            while True:
                try:
                    rows.append(measure(preset, budget, batch, args, device))
                    break
                except torch.cuda.OutOfMemoryError:
                    torch.cuda.empty_cache()
                    if batch == 1:
                        rows.append({"preset": preset, "budget": budget, "batch": 0, "error": "out of memory"})
                        break
                    batch //= 2
            r = rows[-1]
            if "error" in r:
                print(f"  {preset} @ {budget}: out of memory at batch 1", flush=True)
            else:
                mfu = "n/a" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"
                print(f"  {preset} @ {budget}: batch {r['batch']}, {r['step_s']:.3f} s/step, MFU {mfu}", flush=True)
    table = [
        [
            r["preset"],
            r.get("variant", ""),
            r["budget"],
            r["batch"],
            "OOM" if "error" in r else f"{r['step_s']:.3f}",
            "" if "error" in r else f"{r['tokens_per_s']:.0f}",
            "" if "error" in r else f"{r['tflops']:.1f}",
            "" if "error" in r or r["mfu"] is None else f"{100 * r['mfu']:.1f}%",
            "" if "error" in r or r["max_memory_gib"] is None else f"{r['max_memory_gib']:.1f}",
        ]
        for r in rows
    ]
    headers = ["preset", "variant", "tokens", "batch", "step s", "tokens/s", "TFLOP/s", "MFU", "max GiB"]
    print(format_table(headers, table))
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps({"device": name, "rows": rows}, indent=1))
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
