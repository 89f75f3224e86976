"""The numbers of docs/scaling.md: the paper-scale plan (2B images, the 5B autoencoder, 300k steps) computed from
this project's benchmark outputs, its configs and model code, and the assumptions stated below.

    .venv/bin/python infra/capacity_plan.py          # after `make bench` and benchmarks/bench_stream.py

Every input is printed with where it comes from: "measured" (a JSON under benchmarks/results/, written by the
script named), "code" (the configs, vitok_core.flops, the model built on the meta device), or "assumed" (the
constants below; change them and rerun). No GPU has been measured: GPU time comes from FLOPs per token and an
assumed MFU. The CPU measurements (2-core VM) cannot give a GPU MFU.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results"

# -- assumptions (not measured; docs/scaling.md says why each is what it is) ---------------------------------
IMAGES = 2_000_000_000  # images to ingest (the paper's "~2B images")
MIX_WEB = 0.9  # share of web-size images (bench_ingest mix a, 0.43 MP); the rest high resolution (mix b, 4.9 MP)
MFU = (0.30, 0.35, 0.45)  # low / planning / high model FLOPs utilisation of the 5B step on H100 (bf16, ZeRO-3)
PEAK_GPU = "H100"  # vitok_core.flops.PEAK_BF16_FLOPS key: 989 TFLOP/s dense bf16 (H200: the same peak)
GPUS_PER_NODE = 8  # p5.48xlarge
HBM_GB = {"H100 80GB": 80, "H200 141GB": 141}
NVLINK_GBPS = 450  # GB/s per GPU, one direction, inside a node (NVLink 4: 900 GB/s both ways)
EFA_GBPS = 50  # GB/s per GPU between nodes (3200 Gbit/s of EFA per p5 node / 8 GPUs)
ZERO_BUFFERS_GB = 3.0  # DeepSpeed ZeRO-3 defaults: 1e9 live params (2 GB bf16) + reduce bucket 5e8 (1 GB)
CPU_CORES = 960  # 16 x c7i.16xlarge pods of 60 CPUs (infra/kuberay)
CACHE_ACTORS = 8  # one per GPU of one p5 node (infra/kuberay: cache.actors=8)
IMAGENET22K = 14_197_122  # images of ImageNet-22k: what the paper trains its generators on (method.md section 5)
STORAGE_LATENCY_S = 0.02  # assumed time of one small ranged read from S3 (a Parquet footer or column chunk)


def load(name: str) -> dict[str, Any]:
    path = RESULTS / f"{name}.json"
    if not path.is_file():
        sys.exit(f"{path} is missing: run benchmarks/{name}.py first")
    return json.loads(path.read_text())


def row(*cells: object) -> str:
    return "| " + " | ".join(str(c) for c in cells) + " |"


def main() -> None:
    import torch

    from vitok_core.config import load_config
    from vitok_core.flops import PEAK_BF16_FLOPS, train_flops_per_token
    from vitok_core.model import build_autoencoder, count_parameters, parse_variant

    ingest, model, train, cache = (
        load(n) for n in ("bench_ingest", "bench_model", "bench_train_ae", "bench_cache_latents")
    )
    stream = load("bench_stream") if (RESULTS / "bench_stream.json").is_file() else None
    cfg = load_config("5b")
    spec = parse_variant(cfg.model.variant)
    with torch.device("meta"):
        counts = count_parameters(build_autoencoder(cfg.model.variant))
    n, n_enc = counts["total"], counts["encoder"]
    peak = PEAK_BF16_FLOPS[PEAK_GPU]

    print("## Inputs\n")
    print(row("input", "value", "source"))
    print(row("---", "---", "---"))
    web, high = ingest["results"]
    r_web, r_high = web["job_images_per_s_per_core"], high["job_images_per_s_per_core"]
    print(row("ingest, web mix (0.43 MP)", f"{r_web:.1f} img/s/core", "measured, bench_ingest (Ray job, 2 CPUs)"))
    print(row("ingest, high-res mix (4.89 MP)", f"{r_high:.1f} img/s/core", "measured, bench_ingest"))
    kib = {m["mix"]: m["job_median"]["stored_mb"] * 1024 / m["n"] for m in (web, high)}
    src_kib = {k: v["mean_kb"] for k, v in ingest["images"]["sets"].items()}
    print(row("stored bytes per image", f"{kib['web']:.1f} / {kib['highres']:.1f} KiB (web / high-res)", "measured"))
    print(row("source bytes per image", f"{src_kib['web']:.1f} / {src_kib['highres']:.1f} KiB", "measured (JPEG q90)"))
    pad = {(p["image_set"], p["budget"], p["batching"]): p for p in model["padding"]}
    tokens = {
        t: pad[("synthetic", t, "bucket")]["token_slots"] / pad[("synthetic", t, "bucket")]["images"]
        for t in (256, 1024)
    }
    print(row("valid tokens per image", f"{tokens[256]:.1f} @256, {tokens[1024]:.1f} @1024", "measured, bench_model"))
    big = [t for t in model["throughput"] if t["batching"] == "bucketed"][-1]
    print(
        row(
            f"largest CPU training measurement ({big['model']})",
            f"{big['valid_tokens_per_s']:.1f} tokens/s",
            "measured, bench_model: fwd+bwd, 2 threads",
        )
    )
    big_flops = train_flops_per_token(parse_variant(big["model"]), big["params"], 256) * big["valid_tokens_per_s"]
    print(row("  its achieved FLOP/s", f"{big_flops / 1e9:.0f} GFLOP/s", "formula x measured; no CPU peak, so no MFU"))
    jobs = {j["threshold"]: j for j in train["jobs"]}
    print(
        row(
            "train_ae job / bare loop (tiny, CPU)",
            f"{jobs[1_000_000]['tokens_per_s']:.0f} / {train['bare_tokens_per_s']:.0f} tokens/s",
            "measured, bench_train_ae",
        )
    )
    cache_rate = cache["images"] / cache["bare_s"]
    print(
        row(
            "cache_latents, one process (tiny encoder, CPU)",
            f"{cache_rate:.1f} img/s; job {cache['images'] / cache['job_s']:.1f} img/s on 2 CPUs",
            "measured, bench_cache_latents",
        )
    )
    overhead = cache["bytes_per_row"] - cache["theoretical_bytes_per_row"]
    cache_tokens = cache["theoretical_bytes_per_row"] / (16 * 2)
    print(row("cache row overhead", f"{overhead:.0f} B/row beyond the latent ({cache_tokens:.1f} tokens)", "measured"))
    if stream:
        print(
            row(
                "loader, one epoch",
                f"{stream['loader']['steady_images_per_s']:.0f} img/s with {stream['loader']['workers']} processes",
                "measured, bench_stream (64x64-128x96 JPEGs)",
            )
        )
        print(
            row(
                "index build",
                f"{stream['index']['seconds'] / stream['index']['files'] * 1e3:.2f} ms per file (local disk)",
                "measured, bench_stream",
            )
        )
    print(row("5B parameters", f"{n / 1e6:.1f}M (encoder {n_enc / 1e6:.1f}M)", "code, meta device"))
    f256, f1024 = (train_flops_per_token(spec, n, t) for t in (256, 1024))
    print(
        row("training FLOPs per token", f"{f256 / 1e9:.2f} G @256, {f1024 / 1e9:.2f} G @1024", "code, vitok_core.flops")
    )
    print(row("peak", f"{peak / 1e12:.0f} TFLOP/s ({PEAK_GPU} dense bf16)", "code, vitok_core.flops"))

    print("\n## Ingest\n")
    s_mix = MIX_WEB / r_web + (1 - MIX_WEB) / r_high
    print(row("mix", "core-hours", f"hours on {CPU_CORES} cores", "stored", "source read"))
    print(row("---", "---", "---", "---", "---"))
    for name, sec, stored, src in (
        ("all web", 1 / r_web, kib["web"], src_kib["web"]),
        (
            f"{MIX_WEB:.0%} web / {1 - MIX_WEB:.0%} high-res",
            s_mix,
            MIX_WEB * kib["web"] + (1 - MIX_WEB) * kib["highres"],
            MIX_WEB * src_kib["web"] + (1 - MIX_WEB) * src_kib["highres"],
        ),
        ("all high-res", 1 / r_high, kib["highres"], src_kib["highres"]),
    ):
        core_h = IMAGES * sec / 3600
        print(
            row(
                name,
                f"{core_h:,.0f}",
                f"{core_h / CPU_CORES:.1f}",
                f"{IMAGES * stored * 1024 / 1e12:.0f} TB",
                f"{IMAGES * src * 1024 / 1e12:.0f} TB",
            )
        )
    stored_mix = MIX_WEB * kib["web"] + (1 - MIX_WEB) * kib["highres"]
    files = math.ceil(IMAGES / cfg.ingest.rows_per_file)
    groups = math.ceil(IMAGES / 256)
    print(
        f"\nParquet: >= {files:,} files of {cfg.ingest.rows_per_file} rows "
        f"({cfg.ingest.rows_per_file * stored_mix / 1024:.0f} MiB at the mix), "
        f"{groups:,} row groups of 256 rows ({256 * stored_mix / 1024:.1f} MiB)"
    )
    per_rank = files * STORAGE_LATENCY_S / 3600
    print(
        f"loader start-up per rank at {STORAGE_LATENCY_S * 1e3:.0f} ms per read: footers {per_rank:.1f} h; "
        "bucket columns of "
        f"its row groups {groups / 8 * STORAGE_LATENCY_S / 3600:.1f} h (8 ranks)"
    )

    print("\n## train_ae, 5B, 300k steps\n")
    steps = cfg.train.steps
    s1024 = steps - round(cfg.data.budget_switch[0] * steps)
    s256 = steps - s1024
    print(row("scenario", "batch", "images seen", "tokens", "FLOPs", *(f"GPU-days @{m:.0%}" for m in MFU)))
    print(row(*["---"] * (5 + len(MFU))))
    scenarios = {"A: config batch": cfg.train.batch_size, "B: 2B images seen": IMAGES / steps}
    flops = {}
    for name, batch in scenarios.items():
        tok = batch * (s256 * tokens[256] + s1024 * tokens[1024])
        flops[name] = batch * (s256 * tokens[256] * f256 + s1024 * tokens[1024] * f1024)
        days = [flops[name] / (peak * m) / 86400 for m in MFU]
        print(
            row(
                name,
                f"{batch:,.0f}",
                f"{batch * steps / 1e9:.3f}B",
                f"{tok:.3g}",
                f"{flops[name]:.3g}",
                *(f"{d:,.0f}" for d in days),
            )
        )
    print()
    print(
        row(
            "scenario",
            "GPUs",
            "micro-batch",
            "tokens/GPU/micro @256",
            "compute s",
            "ZeRO-3 comm s",
            "comm/compute",
            *(f"days @{m:.0%}" for m in MFU),
        )
    )
    print(row(*["---"] * (7 + len(MFU))))
    for name, batch, gpus in (
        ("A: config batch", 256, 8),
        ("A: config batch", 256, 64),
        ("B: 2B images seen", 6656, 128),
        ("B: 2B images seen", 6656, 256),
    ):
        micro = batch / gpus
        tok = micro * tokens[256]
        compute = tok * f256 / (peak * MFU[1])
        comm = 3 * 2 * n / ((NVLINK_GBPS if gpus <= GPUS_PER_NODE else EFA_GBPS) * 1e9)
        days = [flops[name] / (gpus * peak * m) / 86400 for m in MFU]
        print(
            row(
                name,
                gpus,
                f"{micro:.0f}",
                f"{tok:,.0f}",
                f"{compute:.2f}",
                f"{comm:.2f}",
                f"{comm / compute:.2f}",
                *(f"{d:.1f}" for d in days),
            )
        )

    print("\n## Memory per GPU (5B, ZeRO-3, bf16 + fp32 AdamW)\n")
    d, h, blocks = spec.decoder.width, spec.decoder.mlp_hidden, spec.encoder.depth + spec.decoder.depth
    per_tok_block = 24 * d + 8 * h  # bytes: see docs/scaling.md for the tensors counted
    ckpt_tok = 2 * d * blocks + per_tok_block
    print(
        f"activations per token: {per_tok_block / 1e3:.1f} KB per block; "
        f"all {blocks} blocks {per_tok_block * blocks / 1e6:.2f} MB; "
        f"with checkpointing {ckpt_tok / 1e3:.0f} KB"
    )
    print(
        row(
            "GPUs",
            "params bf16",
            "grads bf16",
            "optimizer fp32 (master, m, v)",
            "states total",
            "act. @256 no ckpt",
            "act. @256 ckpt",
            "act. @1024 ckpt",
            "total @1024 ckpt",
        )
    )
    print(row(*["---"] * 9))
    for gpus, batch in ((8, 256), (128, 6656), (256, 6656)):
        micro = batch / gpus
        states = 16 * n / gpus / 1e9
        a256, a256c = (micro * tokens[256] * x / 1e9 for x in (per_tok_block * blocks, ckpt_tok))
        a1024c = micro * tokens[1024] * ckpt_tok / 1e9
        print(
            row(
                f"{gpus} (micro {micro:.0f})",
                f"{2 * n / gpus / 1e9:.2f} GB",
                f"{2 * n / gpus / 1e9:.2f} GB",
                f"{12 * n / gpus / 1e9:.2f} GB",
                f"{states:.1f} GB",
                f"{a256:.1f} GB",
                f"{a256c:.1f} GB",
                f"{a1024c:.1f} GB",
                f"{states + ZERO_BUFFERS_GB + a1024c:.1f} GB",
            )
        )
    print(
        f"one GPU, unsharded: states {16 * n / 1e9:.0f} GB; "
        f"host RAM per rank while building the model: {4 * n / 1e9:.0f} GB (fp32)"
    )
    print(f"checkpoint: {14 * n / 1e9:.0f} GB (fp32 master + m + v + bf16 params); export {4 * n / 1e9:.0f} GB (fp32)")

    print("\n## cache_latents\n")
    enc = spec.encoder
    enc_flops = (2 * n_enc + 4 * enc.depth * enc.width * 256) * tokens[256]
    gpu_rate = peak * MFU[1] / enc_flops
    row_bytes = cache_tokens * spec.channels * 2 + overhead
    print(
        f"encoder forward: {enc_flops / 1e9:.0f} GFLOP per image; "
        f"GPU-bound {gpu_rate:,.0f} img/s per GPU @{MFU[1]:.0%}; "
        f"one decode thread per actor: >= {cache_rate:.1f} img/s per actor (CPU-bound); row {row_bytes / 1024:.1f} KiB"
    )
    print(row("set", "images", "latents", "hours, 8 actors (CPU-bound)", "hours if GPU-bound, 8 GPUs"))
    print(row(*["---"] * 5))
    for name, count in (("ImageNet-22k", IMAGENET22K), ("all ingested", IMAGES)):
        print(
            row(
                name,
                f"{count:,}",
                f"{count * row_bytes / 1e12:.2f} TB",
                f"{count / (CACHE_ACTORS * cache_rate) / 3600:,.0f}",
                f"{count / (8 * gpu_rate) / 3600:.1f}",
            )
        )

    print("\n## Storage\n")
    from vitok_core.model.dit import build_dit

    with torch.device("meta"):
        flow_params = sum(p.numel() for p in build_dit(cfg.flow.size, spec.channels, 1000).parameters())
    source_mix = MIX_WEB * src_kib["web"] + (1 - MIX_WEB) * src_kib["highres"]
    storage(n, stored_mix, source_mix, row_bytes, cfg.train.keep_checkpoints, flow_params)


def storage(n: int, stored_kib: float, source_kib: float, latent_row: float, keep: int, flow_params: int) -> None:
    """Storage totals of the plan (decimal TB), from the per-item sizes computed above."""
    ckpt, export = 14 * n, 4 * n
    flow_ckpt = 14 * flow_params + GPUS_PER_NODE * 4 * flow_params  # ZeRO-2 states + the EMA in every rank's file
    items = [
        ("raw source (assumed: the benchmark mix's JPEG sizes)", IMAGES * source_kib * 1024),
        ("ingest output (data/ + rejects, rejects negligible)", IMAGES * stored_kib * 1024),
        ("ingest staging, while ingest runs (deleted at the end)", IMAGES * stored_kib * 1024),
        (f"train_ae: {keep} checkpoints + export", keep * ckpt + export),
        ("cache_latents: ImageNet-22k, no flip", IMAGENET22K * latent_row),
        (f"train_flow: {keep} checkpoints (DiT-L)", keep * flow_ckpt),
    ]
    print(row("item", "size"))
    print(row("---", "---"))
    for name, size in items:
        print(row(name, f"{size / 1e12:,.2f} TB"))
    kept = sum(size for name, size in items if "staging" not in name)
    print(row("total kept", f"{kept / 1e12:,.0f} TB (+ {items[2][1] / 1e12:,.0f} TB during ingest)"))
    print(row("if all 2B images were cached too", f"+ {IMAGES * latent_row / 1e12:,.0f} TB"))


if __name__ == "__main__":
    main()
