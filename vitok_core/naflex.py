"""NaFlex: native-aspect-ratio token budgets, patchify / unpatchify, batching and buckets.

An image of size (h, w) is resized (down only) so that its p x p patch grid fits a token budget T,
padded with 0 (mid-grey in [-1, 1]) to a multiple of p, and cut into tokens. Every sample carries its
own grid and original size, so unpatchify never assumes a canvas width (method.md section 2).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor

from vitok_core.budget import bucket_of, check_size, fit_to_token_budget
from vitok_core.images import to_tensor

__all__ = [
    "bucket_of",
    "collate",
    "fit_to_token_budget",
    "patchify",
    "preprocess",
    "random_augment",
    "resize_to_budget",
    "unpatchify",
    "unpatchify_canvas",
]

PatchDict = dict[str, Tensor]


def _as_image_tensor(image: Tensor | Image.Image | np.ndarray) -> Tensor:
    if not isinstance(image, Tensor):
        return to_tensor(image)
    if image.ndim != 3 or image.shape[0] != 3:
        raise ValueError(
            f"image tensor must be [3, H, W] RGB in [-1, 1], got shape {tuple(image.shape)}; "
            "convert gray / RGBA / 16-bit images with vitok_core.images.to_tensor"
        )
    if not image.is_floating_point():
        raise ValueError(f"image tensor must be floating point in [-1, 1], got {image.dtype}")
    if image.shape[1] == 0 or image.shape[2] == 0:
        raise ValueError(f"image has zero size: {tuple(image.shape)}")
    return image


def resize_to_budget(image: Tensor | Image.Image | np.ndarray, patch_size: int, max_tokens: int) -> Tensor:
    """Bicubic, antialiased down-resize to the budget size; returns [3, h, w].

    Not clamped: bicubic ringing can overshoot [-1, 1] by a few hundredths near sharp edges, and the
    reference preprocessing (Na-VAE/vitok-release `patchify`) feeds those values to the encoder as they are.
    Clamping here changed z by up to 0.03 against the reference for the same photo."""
    image = _as_image_tensor(image)
    h, w = image.shape[-2:]
    new_h, new_w = fit_to_token_budget(h, w, patch_size, max_tokens)
    if (new_h, new_w) == (h, w):
        return image
    out = F.interpolate(image[None].float(), size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    return out[0].to(image.dtype)


def patchify(image: Tensor, patch_size: int) -> PatchDict:
    """[3, h, w] -> tokens of one image, padded with 0 to a multiple of p.

    Returns `patches [N, 3 p^2]` (channel-major, as `F.unfold`), `patch_mask [N]` (all True),
    `row_idx [N]`, `col_idx [N]`, `grid [2]` (rows, cols) and `orig_size [2]` (h, w).
    """
    image = _as_image_tensor(image)
    h, w = image.shape[-2:]
    check_size(h, w, patch_size, max_tokens=1)
    rows, cols = math.ceil(h / patch_size), math.ceil(w / patch_size)
    padded = F.pad(image, (0, cols * patch_size - w, 0, rows * patch_size - h), value=0.0)
    patches = F.unfold(padded[None], kernel_size=patch_size, stride=patch_size)[0].T.contiguous()
    grid_r, grid_c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    return {
        "patches": patches,
        "patch_mask": torch.ones(rows * cols, dtype=torch.bool),
        "row_idx": grid_r.reshape(-1),
        "col_idx": grid_c.reshape(-1),
        "grid": torch.tensor([rows, cols]),
        "orig_size": torch.tensor([h, w]),
    }


def preprocess(image: Tensor | Image.Image | np.ndarray, patch_size: int, max_tokens: int) -> PatchDict:
    """Any supported image -> budget resize -> patchify (deterministic; no augmentation)."""
    return patchify(resize_to_budget(image, patch_size, max_tokens), patch_size)


def collate(samples: Sequence[Mapping[str, Tensor]], max_tokens: int | None = None) -> PatchDict:
    """Stack per-image token dicts into a batch padded to the longest sample (or to `max_tokens`).

    Padded tokens have `patch_mask` False, zero patches and position (0, 0). A batch drawn from one
    aspect-ratio bucket needs no padding at all.
    """
    if not samples:
        raise ValueError("cannot collate an empty list of samples")
    lengths = [s["patches"].shape[0] for s in samples]
    width = max(lengths) if max_tokens is None else max_tokens
    if max(lengths) > width:
        raise ValueError(f"a sample has {max(lengths)} tokens, more than max_tokens={width}")
    dim = samples[0]["patches"].shape[1]
    batch = {
        "patches": samples[0]["patches"].new_zeros(len(samples), width, dim),
        "patch_mask": torch.zeros(len(samples), width, dtype=torch.bool),
        "row_idx": torch.zeros(len(samples), width, dtype=torch.long),
        "col_idx": torch.zeros(len(samples), width, dtype=torch.long),
    }
    for i, (sample, n) in enumerate(zip(samples, lengths, strict=True)):
        for key in batch:
            batch[key][i, :n] = sample[key]
    batch["grid"] = torch.stack([s["grid"] for s in samples])
    batch["orig_size"] = torch.stack([s["orig_size"] for s in samples])
    return batch


# Shape metadata that Python code reads (canvas size, tile origins, whether a batch is padded): kept on the
# host, so reading it never waits for the accelerator.
HOST_KEYS = ("grid", "orig_size")


def to_device(batch: Mapping[str, Tensor], device: torch.device | str, dtype: torch.dtype | None = None) -> PatchDict:
    """Move a batch's token tensors to `device` (the pixels / latents cast to `dtype` when given); the
    HOST_KEYS stay where they are. The copies are asynchronous when the batch is in pinned memory (the
    training loaders pin their batches on GPU: `BucketLoader(pin_memory=True)`)."""
    out = {}
    for key, value in batch.items():
        if key in HOST_KEYS:
            out[key] = value
            continue
        value = value.to(device, non_blocking=True)
        if dtype is not None and value.is_floating_point():
            value = value.to(dtype)
        out[key] = value
    return out


def _batched(x: Tensor, ndim: int) -> Tensor:
    return x[None] if x.ndim == ndim - 1 else x


def unpatchify_canvas(patches: Tensor, positions: Mapping[str, Tensor], patch_size: int) -> Tensor:
    """Tokens [B, N, 3 p^2] -> images [B, 3, R p, C p] placed by each token's own (row, col).

    R, C are the largest grid in the batch; pixels outside a sample's grid are 0. Padded tokens are
    dropped, so garbage predicted at padding never reaches the canvas.
    """
    patches = _batched(patches, 3)
    row = _batched(positions["row_idx"], 2)
    col = _batched(positions["col_idx"], 2)
    mask = _batched(positions["patch_mask"], 2).bool()
    grid = _batched(positions["grid"], 2)
    b, n, dim = patches.shape
    rows, cols = int(grid[:, 0].max()), int(grid[:, 1].max())
    slots = rows * cols
    # Index by each token's own position; padded tokens go to one spare slot that is thrown away.
    index = torch.where(mask, row * cols + col, torch.full_like(row, slots))
    flat = patches.new_zeros(b, slots + 1, dim).scatter(1, index[..., None].expand(b, n, dim), patches)
    canvas = F.fold(
        flat[:, :slots].transpose(1, 2),
        output_size=(rows * patch_size, cols * patch_size),
        kernel_size=patch_size,
        stride=patch_size,
    )
    return canvas


def unpatchify(patches: Tensor, positions: Mapping[str, Tensor], patch_size: int) -> list[Tensor]:
    """Tokens -> one [3, h, w] image per sample, cropped to its original (pre-padding) size."""
    canvas = unpatchify_canvas(patches, positions, patch_size)
    sizes = _batched(positions["orig_size"], 2)
    return [canvas[i, :, : int(h), : int(w)] for i, (h, w) in enumerate(sizes.tolist())]


def random_augment(
    image: Tensor,
    generator: torch.Generator,
    rrc_prob: float = 0.25,
    rrc_size: int = 256,
    rrc_scale: tuple[float, float] = (0.8, 1.0),
    rrc_ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_prob: float = 0.5,
) -> Tensor:
    """Reference training augmentation: with p=rrc_prob a random-resized-crop to rrc_size^2, else native;
    then a horizontal flip with p=flip_prob. The budget resize comes after."""
    image = _as_image_tensor(image)

    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=generator))

    if float(torch.rand((), generator=generator)) < rrc_prob:
        top, left, h, w = _rrc_box(image.shape[1], image.shape[2], rrc_scale, rrc_ratio, uniform)
        crop = image[:, top : top + h, left : left + w][None].float()
        image = F.interpolate(crop, size=(rrc_size, rrc_size), mode="bicubic", antialias=True, align_corners=False)
        image = image[0].clamp_(-1.0, 1.0)
    if float(torch.rand((), generator=generator)) < flip_prob:
        image = image.flip(-1)
    return image


def _rrc_box(height, width, scale, ratio, uniform) -> tuple[int, int, int, int]:
    """Inception-style crop box: area fraction in `scale`, log-uniform aspect in `ratio`; 10 tries, then
    the largest centre crop whose aspect lies in `ratio`."""
    area = height * width
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target = area * uniform(*scale)
        aspect = math.exp(uniform(log_lo, log_hi))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(uniform(0, height - h + 1 - 1e-9))
            left = int(uniform(0, width - w + 1 - 1e-9))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif in_ratio > ratio[1]:
        h, w = height, round(height * ratio[1])
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w
