"""Overfit a ViTok-v2 model on a few real photos and print PSNR before and after.

    python -m vitok_core.demo [--config tiny] [--steps 300] [--budget 64] [key=value ...]

The photos are the public-domain ones that ship inside the scikit-image wheel (a dependency), so this
runs offline. It is the smoke test a new user runs first: a few hundred CPU steps must lift PSNR
clearly, or something in the model / NaFlex / loss path is broken.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vitok_core.config import load_config
from vitok_core.images import decode_image, to_tensor
from vitok_core.losses import ReconstructionLoss
from vitok_core.metrics import psnr
from vitok_core.model import build_autoencoder, parse_variant
from vitok_core.naflex import collate, preprocess, unpatchify
from vitok_core.optim import parameter_groups
from vitok_core.schedules import lr_at_step

log = logging.getLogger("vitok.demo")

DEMO_PHOTOS = ("astronaut.png", "coffee.png", "chelsea.png", "rocket.jpg")


def demo_photo_paths() -> list[Path]:
    """Real photos from the installed scikit-image wheel (found without importing it)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("scikit-image is not installed; the demo photos ship in its wheel")
    data = Path(next(iter(spec.submodule_search_locations))) / "data"
    paths = [data / name for name in DEMO_PHOTOS]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"demo photos missing from scikit-image: {missing}")
    return paths


DEMO_ASPECTS = (1.0, 4 / 3, 3 / 2, 16 / 9, 3 / 4, 2 / 3)


def crop_box(
    width: int, height: int, aspect: float, rng: np.random.Generator, scale: tuple[float, float], min_side: int = 96
) -> tuple[int, int, int, int]:
    """(left, top, box width, box height): a box of `aspect` (w/h), its sides a `scale` fraction (uniform)
    of the largest such box inside the photo, at a uniform position; its short side at least `min_side`
    where the photo allows (ingest rejects images under 64 px)."""
    box_w, box_h = (height * aspect, height) if width / height > aspect else (width, width / aspect)
    fraction = min(1.0, max(rng.uniform(*scale), min_side / min(box_w, box_h)))
    box_w, box_h = max(1, round(box_w * fraction)), max(1, round(box_h * fraction))
    return int(rng.integers(0, width - box_w + 1)), int(rng.integers(0, height - box_h + 1)), box_w, box_h


def write_demo_folder(root: Path, per_photo: int = 12, seed: int = 0) -> list[Path]:
    """The pipeline's embedded demo data set: `per_photo` deterministic crops of each demo photo (random
    box of a common aspect ratio, 50-100% of the largest, short side 160-320 px) as JPEGs under
    `root/<photo name>/`, so that the photo name is the class. Written once; an existing complete folder
    is kept as it is (its files, and so the ingest key, stay the same)."""
    from PIL import Image

    done = root / "_COMPLETE"
    if done.is_file():
        return sorted(root.glob("*/*.jpg"))
    rng = np.random.default_rng(seed)
    paths = []
    for photo_path in demo_photo_paths():
        with Image.open(photo_path) as img:
            photo = img.convert("RGB")
        (root / photo_path.stem).mkdir(parents=True, exist_ok=True)
        for i in range(per_photo):
            aspect = DEMO_ASPECTS[i % len(DEMO_ASPECTS)]
            left, top, box_w, box_h = crop_box(photo.width, photo.height, aspect, rng, (0.5, 1.0), min_side=0)
            short = int(rng.integers(160, 321))
            size = (round(short * aspect), short) if aspect >= 1 else (short, round(short / aspect))
            crop = photo.crop((left, top, left + box_w, top + box_h)).resize(size, Image.Resampling.LANCZOS)
            paths.append(root / photo_path.stem / f"{photo_path.stem}_{i:03d}.jpg")
            crop.save(paths[-1], "JPEG", quality=92)
    done.write_text("")
    return paths


def load_demo_images() -> list[torch.Tensor]:
    return [to_tensor(decode_image(p.read_bytes())) for p in demo_photo_paths()]


@dataclass
class OverfitResult:
    psnr_before: list[float]
    psnr_after: list[float]
    losses: list[float]
    seconds: float
    tokens: int


@torch.no_grad()
def reconstruction_psnr(model: torch.nn.Module, batch: dict, patch_size: int) -> list[float]:
    model.eval()
    recon = unpatchify(model(batch)["patches"], batch, patch_size)
    target = unpatchify(batch["patches"], batch, patch_size)
    return [psnr(r, t) for r, t in zip(recon, target, strict=True)]


def overfit(cfg, images: list[torch.Tensor], steps: int, budget: int, log_every: int = 50) -> OverfitResult:
    """Train a fresh model from `cfg` on one fixed batch of `images` at `budget` tokens (no augmentation)."""
    torch.manual_seed(cfg.train.seed)
    spec = parse_variant(cfg.model.variant)
    model = build_autoencoder(spec, layer_scale_init=cfg.model.layer_scale_init)
    loss_fn = ReconstructionLoss(cfg.loss, spec.patch_size)
    batch = collate([preprocess(img, spec.patch_size, budget) for img in images])
    optimizer = torch.optim.AdamW(
        parameter_groups(model, cfg.optim.weight_decay), lr=cfg.optim.lr, betas=tuple(cfg.optim.betas)
    )
    generator = torch.Generator().manual_seed(cfg.train.seed)
    before = reconstruction_psnr(model, batch, spec.patch_size)
    losses, start = [], time.perf_counter()
    for step in range(steps):
        model.train()
        for group in optimizer.param_groups:
            group["lr"] = lr_at_step(
                step, steps, cfg.optim.lr, min(cfg.optim.warmup_steps, steps // 10), cfg.optim.min_lr
            )
        terms = loss_fn(model(batch)["patches"], batch, generator)
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        if cfg.optim.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        losses.append(terms["loss"].item())
        if log_every and (step % log_every == 0 or step == steps - 1):
            log.info(
                "step %d/%d loss %.4f %s",
                step + 1,
                steps,
                losses[-1],
                " ".join(f"{k} {v.item():.4f}" for k, v in terms.items() if k != "loss"),
            )
    seconds = time.perf_counter() - start
    after = reconstruction_psnr(model, batch, spec.patch_size)
    tokens = int(batch["patch_mask"].sum()) * steps
    return OverfitResult(before, after, losses, seconds, tokens)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="tiny", help="preset name or YAML path")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--budget", type=int, default=None, help="token budget (default: the config's first)")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    cfg = load_config(args.config, args.overrides)
    budget = args.budget or cfg.data.budgets[0]
    paths = demo_photo_paths()
    print(f"vitok demo: {cfg.model.variant} on {len(paths)} real photos at {budget} tokens, {args.steps} steps")
    result = overfit(cfg, load_demo_images(), args.steps, budget)
    print(f"\n{'photo':<16}{'PSNR before':>12}{'PSNR after':>12}")
    for path, b, a in zip(paths, result.psnr_before, result.psnr_after, strict=True):
        print(f"{path.name:<16}{b:>12.2f}{a:>12.2f}")
    mean_b = sum(result.psnr_before) / len(paths)
    mean_a = sum(result.psnr_after) / len(paths)
    print(f"{'mean':<16}{mean_b:>12.2f}{mean_a:>12.2f}")
    print(f"\n{args.steps} steps in {result.seconds:.1f}s ({result.tokens / result.seconds:.0f} tokens/s, fwd+bwd)")


if __name__ == "__main__":
    main()
