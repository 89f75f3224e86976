"""Image-quality metrics, computed per image at its own (unpadded) size in [-1, 1]."""

from __future__ import annotations

import math

import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of one [3, h, w] image pair; the prediction is clipped to [-1, 1] first."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = torch.mean((pred.detach().float().clamp(-1, 1) - target.detach().float()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)
