"""The evaluation protocol, free of Ray: reference images per setting, reconstructions by an autoencoder or
the bicubic baseline, per-image scores, and the streaming accumulation of a whole run's results.

Settings (method.md section 6):
- center_crop S: the short side is resized to S (bicubic, antialiased; up or down) and the centre S x S
  square is kept (the ADM / ImageNet-256 protocol);
- native S: the aspect ratio is kept and the image is resized down (never up) to fit a token budget of the
  autoencoder's patch size (default (S / p)^2 tokens, i.e. about S x S pixels); sizes need not be
  multiples of p (the model pads, scores use the unpadded image).
- longest_side S: the aspect ratio is kept and the longest side is resized down (never up) to S with PIL's
  Lanczos filter on the 8-bit image: the authors' protocol for native-resolution numbers
  (Na-VAE/vitok-release scripts/eval_vae.py: `resize_longest_side(S)|to_tensor|normalize|patchify(p, (S/p)^2)`,
  vitok/pp/ops.py). Their patchify's token cap (S/p)^2 is applied after it, as a no-op whenever S is a
  multiple of p. A 3000 x 2000 (w x h) photo is scored at 1024 x 683 here and at 1248 x 832 in native 1024p
  mode (p 16): numbers of the two modes are not comparable.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitok_core.config import EVAL_MODES
from vitok_core.images import to_tensor, to_uint8
from vitok_core.metrics import FeatureStats, frechet_distance_of, psnr, ssim_image
from vitok_core.naflex import collate, patchify, resize_to_budget, to_device, unpatchify


def setting_budget(setting: Mapping[str, Any], patch_size: int) -> int:
    """The setting's token budget (native) or token cap (longest_side): `budget`, else (size / p)^2."""
    return int(setting["budget"]) or (int(setting["size"]) // patch_size) ** 2


def describe_setting(setting: Mapping[str, Any], patch_size: int) -> str:
    """One line saying how a setting makes its reference images (metrics.json and report.md carry it)."""
    size, mode, budget = int(setting["size"]), setting["mode"], setting_budget(setting, patch_size)
    if mode == "center_crop":
        return f"short side resized to {size}px (bicubic, antialiased, up or down), centre {size}x{size} crop"
    if mode == "native":
        return f"aspect ratio kept, resized down (bicubic, antialiased, never up) to fit {budget} p{patch_size} tokens"
    if mode == "longest_side":
        return (
            f"aspect ratio kept, longest side resized down (never up) to {size}px with PIL Lanczos on 8-bit pixels "
            f"(the authors' eval_vae.py), then capped at {budget} p{patch_size} tokens"
        )
    raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {EVAL_MODES}")


def _bicubic(image: Tensor, size: tuple[int, int]) -> Tensor:
    if tuple(image.shape[-2:]) == size:
        return image
    out = F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)
    return out[0].clamp(-1.0, 1.0)


def center_crop(image: Tensor, size: int) -> Tensor:
    """[3, h, w] -> [3, size, size]: short side to `size`, then the centre square."""
    h, w = image.shape[-2:]
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    resized = _bicubic(image, (new_h, new_w))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return resized[:, top : top + size, left : left + size]


def resize_longest_side(image: Tensor, size: int) -> Tensor:
    """[3, h, w] -> longest side `size`, aspect ratio kept, never up-scaled: the authors' resize_longest_side
    (round(h * scale), round(w * scale); PIL Lanczos on the 8-bit RGB image, which their loader decodes to).

    The uint8 round trip is exact for our images (every decoder yields 8-bit RGB, see vitok_core.images)."""
    h, w = image.shape[-2:]
    if max(h, w) <= size:
        return image
    scale = size / max(h, w)
    new_h, new_w = max(1, round(h * scale)), max(1, round(w * scale))
    resized = Image.fromarray(to_uint8(image)).resize((new_w, new_h), Image.Resampling.LANCZOS)
    return to_tensor(resized)


def reference_image(image: Tensor, setting: Mapping[str, Any], patch_size: int) -> Tensor:
    """The image a setting scores against (and the autoencoder encodes), [3, h, w] in [-1, 1]."""
    mode = setting["mode"]
    if mode == "center_crop":
        return center_crop(image, int(setting["size"]))
    if mode == "native":
        return resize_to_budget(image, patch_size, setting_budget(setting, patch_size))
    if mode == "longest_side":
        resized = resize_longest_side(image, int(setting["size"]))
        return resize_to_budget(resized, patch_size, setting_budget(setting, patch_size))
    raise ValueError(f"unknown evaluation mode {mode!r}; expected one of {EVAL_MODES}")


def compression_ratio(patch_size: int, channels: int) -> float:
    """Pixel values per latent value: 3 p^2 / c (f16x64 -> 12)."""
    return 3 * patch_size**2 / channels


def bicubic_down_up(image: Tensor, ratio: float) -> Tensor:
    """The classical baseline at the same compression: bicubic down by sqrt(ratio) per side (3 channels kept,
    so ratio times fewer values, unquantised like a latent), then bicubic back up to the original size."""
    h, w = image.shape[-2:]
    factor = math.sqrt(ratio)
    small = _bicubic(image, (max(1, round(h / factor)), max(1, round(w / factor))))
    return _bicubic(small, (h, w))


@torch.no_grad()
def reconstruct(model: nn.Module, images: Sequence[Tensor], batch_size: int, device: str = "cpu") -> list[Tensor]:
    """Encode + decode each [3, h, w] image at its own size (no resize: every image is patchified whole),
    batching images of one grid together; returns [3, h, w] reconstructions clipped to [-1, 1]."""
    p = model.spec.patch_size
    samples = [patchify(image, p) for image in images]
    by_grid: dict[tuple[int, int], list[int]] = defaultdict(list)
    for i, sample in enumerate(samples):
        by_grid[tuple(sample["grid"].tolist())].append(i)
    out: list[Any] = [None] * len(images)
    for members in by_grid.values():
        for first in range(0, len(members), batch_size):
            chunk = members[first : first + batch_size]
            batch = to_device(collate([samples[i] for i in chunk]), device)
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
                patches = model(batch)["patches"].float()
            for i, image in zip(chunk, unpatchify(patches, batch, p), strict=True):
                out[i] = image.clamp(-1.0, 1.0).cpu()
    return out


def scores(reconstructions: Sequence[Tensor], references: Sequence[Tensor]) -> dict[str, list[float]]:
    """Per-image PSNR (dB) and SSIM at each image's own size, data range [-1, 1]."""
    pairs = list(zip(reconstructions, references, strict=True))
    return {"psnr": [psnr(r, t) for r, t in pairs], "ssim": [ssim_image(r, t) for r, t in pairs]}


# --------------------------------------------------------------------------------------------------
# A whole run's results, merged from task results in a fixed order
# --------------------------------------------------------------------------------------------------
class Accumulator:
    """Feature statistics per (setting, model, extractor) and per-image scores per (setting, model).

    `model` "reference" holds the reference images' features; generation sets are (set, "samples")."""

    def __init__(self) -> None:
        self.stats: dict[tuple[str, str, str], FeatureStats] = {}
        self.scores: dict[tuple[str, str], dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))

    def add_features(self, setting: str, model: str, extractor: str, features: np.ndarray) -> None:
        key = (setting, model, extractor)
        if key not in self.stats:
            self.stats[key] = FeatureStats(features.shape[1])
        self.stats[key].update(features)

    def add_scores(self, setting: str, model: str, values: Mapping[str, Sequence[float]]) -> None:
        for name, series in values.items():
            self.scores[(setting, model)][name].extend(float(v) for v in series)

    def mean_score(self, setting: str, model: str, name: str) -> float | None:
        values = self.scores.get((setting, model), {}).get(name)
        return float(np.mean(values)) if values else None

    def distance(self, a: tuple[str, str], b: tuple[str, str], extractor: str) -> float | None:
        """Frechet distance between the feature distributions of (setting, model) a and b; None when
        either side is missing or has fewer than 2 samples."""
        sa, sb = self.stats.get((*a, extractor)), self.stats.get((*b, extractor))
        if sa is None or sb is None or sa.count < 2 or sb.count < 2:
            return None
        return frechet_distance_of(sa, sb)
