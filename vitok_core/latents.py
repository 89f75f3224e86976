"""Cached latents: how one image's latent tokens are stored, and exact per-channel statistics.

A row of the latent cache holds the tokens of one image (or of its horizontal flip) as raw bytes of a
[rows * cols, channels] tensor in bf16 or fp16, little-endian, in raster order of the token grid.

`ChannelStats` keeps (count, mean, M2) per channel in float64 and merges partial results with Chan et
al.'s parallel formula, so the statistics of the whole cache are exact (not estimated from a sample)
whatever the order in which the per-file results arrive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def to_bytes(z: Tensor, dtype: str) -> bytes:
    """[N, C] latents -> stored bytes (rounded to `dtype`)."""
    stored = z.detach().to(DTYPES[dtype]).contiguous().cpu()
    return stored.view(torch.int16).numpy().tobytes()


def from_bytes(data: bytes, tokens: int, channels: int, dtype: str) -> Tensor:
    """Stored bytes -> [N, C] float32."""
    raw = torch.frombuffer(bytearray(data), dtype=torch.int16)
    if raw.numel() != tokens * channels:
        raise ValueError(f"latent has {raw.numel()} values, expected {tokens} x {channels}")
    return raw.view(DTYPES[dtype]).reshape(tokens, channels).float()


def grid_positions(rows: int, cols: int) -> dict[str, Tensor]:
    """Raster-order (row, col) of a full token grid, with its validity mask (all True)."""
    r, c = torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij")
    n = rows * cols
    return {
        "row_idx": r.reshape(-1),
        "col_idx": c.reshape(-1),
        "patch_mask": torch.ones(n, dtype=torch.bool),
        "grid": torch.tensor([rows, cols]),
    }


@dataclass
class ChannelStats:
    """Streaming per-channel count / mean / sum of squared deviations, in float64."""

    channels: int
    count: int = 0
    mean: np.ndarray = field(default=None)  # type: ignore[assignment]
    m2: np.ndarray = field(default=None)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        if self.mean is None:
            self.mean = np.zeros(self.channels)
        if self.m2 is None:
            self.m2 = np.zeros(self.channels)

    def update(self, values: np.ndarray | Tensor) -> None:
        """Add a block of values [..., channels]."""
        block = np.asarray(values, dtype=np.float64).reshape(-1, self.channels)
        if len(block) == 0:
            return
        other = ChannelStats(self.channels, len(block), block.mean(0), ((block - block.mean(0)) ** 2).sum(0))
        self.merge(other)

    def merge(self, other: ChannelStats) -> None:
        if other.count == 0:
            return
        total = self.count + other.count
        delta = other.mean - self.mean
        self.mean = self.mean + delta * (other.count / total)
        self.m2 = self.m2 + other.m2 + delta**2 * (self.count * other.count / total)
        self.count = total

    @property
    def std(self) -> np.ndarray:
        """Population standard deviation (ddof = 0), as numpy's default."""
        return np.sqrt(self.m2 / max(self.count, 1))

    def to_json(self) -> dict[str, Any]:
        return {"channels": self.channels, "count": self.count, "mean": self.mean.tolist(), "m2": self.m2.tolist()}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ChannelStats:
        return cls(data["channels"], data["count"], np.array(data["mean"]), np.array(data["m2"]))
