"""A DiT-style flow-matching transformer over ViTok-v2 latent tokens (method.md section 5).

The latents are already tokens, one per image patch, so there is no further patchify: a linear layer
lifts each c-channel token to the model width, 2D RoPE comes from the tokens' own (row, col) positions
(any aspect ratio), and adaLN-Zero blocks are conditioned on the timestep and the class. Class
`num_classes` is the null class used for label dropout and classifier-free guidance.

    model = build_dit("L", channels=64, num_classes=1000)
    velocity = model(x_t, t, labels, positions)     # positions: row_idx, col_idx, patch_mask [B, N]
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitok_core.model.layers import Attention, SwiGLU, attention_mask, dense_hint, rope_2d
from vitok_core.variants import TowerSpec

# Paper sizes (~450M "L", ~1.2B "G") with SwiGLU MLPs; "tiny" and "S" are ours, for CPUs and tests.
DIT_SIZES: dict[str, TowerSpec] = {
    "tiny": TowerSpec(width=128, depth=2, heads=2),
    "S": TowerSpec(width=384, depth=12, heads=6),
    "L": TowerSpec(width=1024, depth=24, heads=16),
    "G": TowerSpec(width=1536, depth=28, heads=24),
}


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal features of t in [0, 1] (scaled by 1000, as DiT does for integer timesteps)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = 1000.0 * t.float()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def _modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return x * (1 + scale[:, None]) + shift[:, None]


class DiTBlock(nn.Module):
    """Pre-norm attention + SwiGLU, each shifted, scaled and gated by the conditioning (adaLN-Zero)."""

    def __init__(self, spec: TowerSpec) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(spec.width, spec.heads)
        self.norm2 = nn.LayerNorm(spec.width, elementwise_affine=False, eps=1e-6)
        self.mlp = SwiGLU(spec.width, spec.mlp_hidden)
        self.modulation = nn.Linear(spec.width, 6 * spec.width)

    def forward(self, x: Tensor, cond: Tensor, rope: tuple[Tensor, Tensor], mask: Tensor | None) -> Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.modulation(F.silu(cond)).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(_modulate(self.norm1(x), shift1, scale1), rope, mask)
        return x + gate2[:, None] * self.mlp(_modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    def __init__(self, spec: TowerSpec, channels: int, num_classes: int, rope_theta: float = 10000.0) -> None:
        super().__init__()
        self.spec, self.channels, self.num_classes, self.rope_theta = spec, channels, num_classes, rope_theta
        width = spec.width
        self.in_proj = nn.Linear(channels, width)
        self.time_mlp = nn.Sequential(nn.Linear(256, width), nn.SiLU(), nn.Linear(width, width))
        self.class_embed = nn.Embedding(num_classes + 1, width)  # the last row is the null class
        self.blocks = nn.ModuleList(DiTBlock(spec) for _ in range(spec.depth))
        self.final_norm = nn.LayerNorm(width, elementwise_affine=False, eps=1e-6)
        self.final_modulation = nn.Linear(width, 2 * width)
        self.out_proj = nn.Linear(width, channels)
        self.reset_parameters()

    @property
    def null_class(self) -> int:
        return self.num_classes

    def reset_parameters(self) -> None:
        """Xavier linears, N(0, 0.02) embeddings, and zeros for every modulation and the output (adaLN-Zero):
        at initialisation each block is the identity and the prediction is 0."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        nn.init.normal_(self.class_embed.weight, std=0.02)
        for linear in (self.time_mlp[0], self.time_mlp[2]):
            nn.init.normal_(linear.weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.modulation.weight)
            nn.init.zeros_(block.modulation.bias)
        for linear in (self.final_modulation, self.out_proj):
            nn.init.zeros_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: Tensor, t: Tensor, labels: Tensor, positions: Mapping[str, Tensor]) -> Tensor:
        """Velocity for latent tokens x [B, N, c] at times t [B] with class labels [B] (null = num_classes)."""
        if x.shape[-1] != self.channels:
            raise ValueError(f"latent tokens have {x.shape[-1]} channels; this DiT takes {self.channels}")
        row, col = positions["row_idx"], positions["col_idx"]
        mask = positions.get("patch_mask")
        dense = True if mask is None else dense_hint(positions, x.shape[1])
        if mask is None:
            mask = torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
        rope = rope_2d(row, col, self.spec.head_dim, self.rope_theta)
        attn_mask = attention_mask(mask, row, col, dense=dense)
        # t stays fp32 up to the embedding (bf16 has ~3 significant digits of t); the embedding's output,
        # an activation, takes the model's dtype.
        cond = self.time_mlp(timestep_embedding(t.float(), 256).to(x.dtype)) + self.class_embed(labels)
        h = self.in_proj(x)
        for block in self.blocks:
            h = block(h, cond, rope, attn_mask)
        shift, scale = self.final_modulation(F.silu(cond)).chunk(2, dim=-1)
        return self.out_proj(_modulate(self.final_norm(h), shift, scale))


def build_dit(size: str, channels: int, num_classes: int) -> DiT:
    """`size` is a key of DIT_SIZES; wrap in `with torch.device("meta"):` to count parameters of any size."""
    if size not in DIT_SIZES:
        raise ValueError(f"unknown DiT size {size!r}; sizes: {sorted(DIT_SIZES)}")
    return DiT(DIT_SIZES[size], channels, num_classes)
