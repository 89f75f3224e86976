"""Transformer building blocks of the ViTok-v2 autoencoder: RMSNorm, 2D RoPE, attention, SwiGLU, Block.

Parameter names follow the published checkpoint layout (method.md section 1), so do not rename them.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Rope = tuple[Tensor, Tensor]


class Linear(nn.Linear):
    """nn.Linear initialised ViT-style (trunc-normal std 0.02, zero bias) in its own constructor.

    Initialising inside the constructor matters under DeepSpeed's `zero.Init`, which partitions each
    module's parameters as soon as its constructor returns: a model-wide init pass afterwards would see
    empty shards. Every rank draws the same values from the same seed, so the shards form one model."""

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class RMSNorm(nn.Module):
    """RMSNorm computed in fp32 (bf16 sums of squares lose too much at width 3072)."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        out = F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps)
        return out.to(x.dtype)


def rope_2d(row: Tensor, col: Tensor, head_dim: int, theta: float = 10000.0) -> Rope:
    """cos/sin tables [B, N, head_dim/2] for integer (row, col) positions.

    The first head_dim/4 rotated pairs take the row, the last head_dim/4 the column, with
    inv_freq = 1 / theta^(arange(0, head_dim/2, 2) / (head_dim/2)) on each axis.
    """
    if head_dim % 4:
        raise ValueError(f"2D RoPE needs head_dim % 4 == 0, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / theta ** (torch.arange(0, half, 2, device=row.device, dtype=torch.float32) / half)
    angles = torch.cat([row.float()[..., None] * inv_freq, col.float()[..., None] * inv_freq], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, rope: Rope) -> Tensor:
    """Rotate interleaved pairs (x[..., 0::2], x[..., 1::2]) of x [B, H, N, D] by the [B, N, D/2] tables.

    The rotation is computed in fp32 (or x's dtype if wider): bf16 tables (8 bits of mantissa) would blur the
    angles of distant positions, which is what RoPE encodes."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    cos, sin = (t[:, None].to(dtype) for t in rope)
    x_even, x_odd = x[..., 0::2].to(dtype), x[..., 1::2].to(dtype)
    rotated = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)
    return rotated.flatten(-2).to(x.dtype)


def dense_hint(positions: Mapping[str, Tensor], tokens: int) -> bool | None:
    """Whether every token of the batch is valid, known without reading the device: from the host-side
    `grid` (rows x cols of each sample == the token count), or from `patch_mask` when it is on the CPU.
    None when only a device tensor could tell (reading it would stall the GPU queue)."""
    grid = positions.get("grid")
    if grid is not None and grid.device.type == "cpu":
        grid = grid.reshape(-1, 2)
        return bool((grid[:, 0] * grid[:, 1] == tokens).all())
    mask = positions.get("patch_mask")
    if mask is not None and mask.device.type == "cpu":
        return bool(mask.bool().all())
    return None


def attention_mask(
    patch_mask: Tensor, row: Tensor, col: Tensor, local_window: int | None = None, dense: bool | None = None
) -> Tensor | None:
    """Boolean SDPA mask (True = attend) that masks padded tokens on the key side only.

    `dense` (see `dense_hint`): True gives no mask at all, so SDPA may use its fastest (flash) kernel;
    None (unknown) keeps the mask rather than reading the device to find out.

    Masking queries too would leave fully masked rows, whose softmax is NaN (and NaN * 0 is still NaN).
    With `local_window` w, a query also only sees keys with |d_row| <= w and |d_col| <= w (inference
    option for very large images; the models are trained with full attention).
    """
    keys = patch_mask.bool()
    if local_window is None:
        return None if dense else keys[:, None, None, :]
    near = ((row[:, :, None] - row[:, None, :]).abs() <= local_window) & (
        (col[:, :, None] - col[:, None, :]).abs() <= local_window
    )
    # A padded query may sit far from every valid key; let it see itself so no row is empty.
    eye = torch.eye(near.shape[-1], dtype=torch.bool, device=near.device)
    return ((near & keys[:, None, :]) | eye)[:, None]


class Attention(nn.Module):
    """Multi-head self-attention with QK RMSNorm and 2D RoPE, on PyTorch SDPA."""

    def __init__(self, dim: int, heads: int, eps: float = 1e-6) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv_proj = Linear(dim, 3 * dim, bias=False)
        self.norm_q = RMSNorm(self.head_dim, eps)
        self.norm_k = RMSNorm(self.head_dim, eps)
        self.out_proj = Linear(dim, dim, bias=False)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
        b, n, d = x.shape
        # The fused projection is laid out [q | k | v], each [heads, head_dim], as in the published weights.
        q, k, v = self.qkv_proj(x).view(b, n, 3, self.heads, self.head_dim).unbind(2)
        q, k = self.norm_q(q), self.norm_k(k)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """fc2(silu(gate) * value) with fc1's output split [value | gate]."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = Linear(dim, 2 * hidden, bias=False)
        self.fc2 = Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        value, gate = self.fc1(x).chunk(2, dim=-1)
        return self.fc2(F.silu(gate) * value)


class LayerScale(nn.Module):
    def __init__(self, dim: int, init: float) -> None:
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), float(init)))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Parallel block: x + gamma * (Attention(h) + SwiGLU(h)) with h = RMSNorm(x)."""

    def __init__(self, dim: int, heads: int, mlp_hidden: int, layer_scale_init: float = 1e-4) -> None:
        super().__init__()
        self.norm1 = RMSNorm(dim)
        self.attn = Attention(dim, heads)
        self.ffn = SwiGLU(dim, mlp_hidden)
        self.layer_scale = LayerScale(dim, layer_scale_init)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None) -> Tensor:
        h = self.norm1(x)
        return x + self.layer_scale(self.attn(h, rope, mask) + self.ffn(h))
