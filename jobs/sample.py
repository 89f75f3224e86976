"""Sample images from a trained flow model (train_flow export) and decode them with the autoencoder.

    python -m jobs.sample --config tiny flow.cache=runs/cache_latents/<key> [flow.sample.per_class=8 ...]

Reads {train_flow run}/export (the EMA weights), draws `per_class` latent grids of rows x cols tokens per
class with the configured sampler (Euler or Heun, classifier-free guidance inside cfg_interval, optional
rescale; the same seed gives the same images), undoes the cache's standardisation, decodes with the
autoencoder's decoder (flow.sample.decoder, default: the directory whose encoder made the cache) and
writes {out}/{class}/NNNN.png, {out}/samples.npz (images uint8 [N, H, W, 3], labels, classes) and
{out}/manifest.json. Sampling and decoding run on CUDA when the process has a GPU. With flow.use_gpu
they run in a Ray task that holds one (a Ray job's driver has none on a cluster); otherwise in-process.
"""

from __future__ import annotations

import io
import logging
import time
from typing import Any

import fsspec
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load as load_bytes

from jobs.common import init_ray, parse_config, setup_logging
from vitok_core.artifacts import join, read_json, stage_key, write_json
from vitok_core.checkpoint import load_part_model
from vitok_core.config import VitokConfig, to_dict
from vitok_core.flow import sample
from vitok_core.images import to_uint8
from vitok_core.latents import grid_positions
from vitok_core.model.dit import build_dit
from vitok_core.naflex import to_device, unpatchify

log = logging.getLogger("vitok.sample")


def load_flow(export: str) -> tuple[torch.nn.Module, dict[str, Any]]:
    """The EMA DiT of a train_flow export and its export.json."""
    info = read_json(join(export, "export.json"))
    model = build_dit(info["size"], info["channels"], info["num_classes"])
    with fsspec.open(join(export, "dit_ema.safetensors"), "rb") as f:
        model.load_state_dict(load_bytes(f.read()), strict=True)
    return model.eval(), info


@torch.no_grad()
def decode_latents(decoder: torch.nn.Module, z: torch.Tensor, rows: int, cols: int) -> list[torch.Tensor]:
    """Standard-scale latents [B, rows * cols, c] -> images [3, rows p, cols p] in [-1, 1]."""
    p = decoder.spec.patch_size
    positions = {k: v[None].expand(z.shape[0], *v.shape) for k, v in grid_positions(rows, cols).items()}
    positions["orig_size"] = torch.tensor([[rows * p, cols * p]] * z.shape[0])
    positions = to_device(positions, z.device)
    patches = decoder.decode({"z": z, **positions})["patches"]
    return unpatchify(patches, positions, p)


def sample_settings(cfg: VitokConfig) -> dict[str, Any]:
    return {k: v for k, v in to_dict(cfg.flow.sample).items() if k != "out"}


def output_uri(cfg: VitokConfig, flow_out: str) -> str:
    """flow.sample.out, else {flow run}/samples/{hash of the sampling settings}."""
    key = stage_key("sample", sample_settings(cfg), [flow_out], "sample-1")
    return cfg.flow.sample.out or join(flow_out, "samples", key)


def planned_output(cfg: VitokConfig) -> str:
    from jobs.train_flow import planned_output as flow_output

    return output_uri(cfg, flow_output(cfg))


@torch.no_grad()
def generate(export: str, decoder_uri: str, labels: list[int], s: dict[str, Any]) -> list[np.ndarray]:
    """Sample latents for `labels` with the flow export's EMA model and decode them: one uint8 [H, W, 3]
    image per label, on CUDA when this process has a GPU. `s` is the flow.sample section. The noise is
    drawn on the CPU from (seed, batch), so a device gives the same samples up to float rounding."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = load_flow(export)
    model.to(device)
    decoder = load_part_model(decoder_uri, "decoder", device=str(device))
    mean = torch.tensor(info["latent_mean"], device=device)
    std = torch.tensor(info["latent_std"], device=device)
    grid = grid_positions(s["rows"], s["cols"])
    images: list[np.ndarray] = []
    for b, first in enumerate(range(0, len(labels), s["batch_size"])):
        batch_labels = torch.tensor(labels[first : first + s["batch_size"]], device=device)
        n = len(batch_labels)
        positions = to_device({k: v[None].expand(n, *v.shape) for k, v in grid.items()}, device)
        z = sample(
            model,
            batch_labels,
            positions,
            info["channels"],
            steps=s["steps"],
            method=s["method"],
            cfg_scale=s["cfg_scale"],
            interval=tuple(s["cfg_interval"]),
            rescale=s["cfg_rescale"],
            seed=s["seed"] * 1_000_003 + b,
        )
        for image in decode_latents(decoder, z * std + mean, s["rows"], s["cols"]):
            images.append(np.asarray(to_uint8(image.cpu())))
    return images


def generate_in_task(args: tuple[str, str, list[int], dict[str, Any]], gpus: int, cpus: float) -> list[np.ndarray]:
    """`generate` in a Ray task holding `gpus` GPUs and `cpus` CPUs (joining or starting Ray as the jobs do)."""
    import ray

    init_ray()
    return ray.get(ray.remote(generate).options(num_gpus=gpus, num_cpus=cpus).remote(*args))


def run(cfg: VitokConfig) -> dict[str, Any]:
    from jobs.train_flow import cache_uri, open_cache
    from jobs.train_flow import output_uri as flow_output_uri

    s = cfg.flow.sample
    cache = cache_uri(cfg)
    opened = open_cache(cache)
    flow_out = flow_output_uri(cfg, opened["manifest"]["key"])
    info = read_json(join(flow_out, "export", "export.json"))
    classes = list(s.classes) or list(info["classes"])
    unknown = sorted(set(classes) - set(info["classes"]))
    if unknown:
        raise ValueError(f"flow.sample.classes: {unknown} are not classes of the model ({info['classes']})")
    settings = sample_settings(cfg)
    out = output_uri(cfg, flow_out)
    labels = [info["classes"].index(c) for c in classes for _ in range(s.per_class)]
    start = time.time()
    args = (join(flow_out, "export"), s.decoder or opened["manifest"]["encoder"], labels, to_dict(s))
    gpu = cfg.flow.use_gpu  # the driver of a Ray job holds no GPU on a cluster: a task that holds one samples
    images = generate_in_task(args, gpus=1, cpus=cfg.flow.cpus_per_worker) if gpu else generate(*args)
    fs, root = fsspec.core.url_to_fs(out)
    for i, (image, label) in enumerate(zip(images, labels, strict=True)):
        name = info["classes"][label]
        fs.makedirs(f"{root}/{name}", exist_ok=True)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "PNG")
        with fs.open(f"{root}/{name}/{i:04d}.png", "wb") as f:
            f.write(buffer.getvalue())
    buffer = io.BytesIO()
    np.savez(buffer, images=np.stack(images), labels=np.array(labels), classes=np.array(info["classes"]))
    with fs.open(f"{root}/samples.npz", "wb") as f:
        f.write(buffer.getvalue())
    manifest = {
        "stage": "sample",
        "output": out,
        "flow": flow_out,
        "settings": settings,
        "images": len(images),
        "shape": list(images[0].shape),
        "wall_s": time.time() - start,
    }
    write_json(join(out, "manifest.json"), manifest)
    log.info("sample: %d images of %s to %s", len(images), images[0].shape, out)
    return manifest


def main(argv: list[str] | None = None) -> None:
    setup_logging()
    cfg = parse_config(__doc__.splitlines()[0], argv)
    manifest = run(cfg)
    print(f"samples: {manifest['output']} ({manifest['images']} images of {manifest['shape']})")


if __name__ == "__main__":
    main()
