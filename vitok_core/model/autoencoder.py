"""The ViTok-v2 autoencoder: a shallow ViT encoder and a deep ViT decoder over NaFlex patch tokens.

Plain nn.Module, free of distribution logic: DeepSpeed / ZeRO-3 wrapping lives in jobs/train_ae.py.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from vitok_core.model.layers import Block, Linear, attention_mask, dense_hint, rope_2d
from vitok_core.variants import TowerSpec, VariantSpec, parse_variant

# Parameter-name prefixes of the published encoder.safetensors / decoder.safetensors.
ENCODER_PREFIXES = ("patch_embed.", "encoder_blocks.", "to_code.")
DECODER_PREFIXES = ("decoder_embed.", "decoder_blocks.", "to_pixels.")
_POSITION_KEYS = ("patch_mask", "row_idx", "col_idx", "grid", "orig_size")


def _blocks(tower: TowerSpec, layer_scale_init: float) -> nn.ModuleList:
    return nn.ModuleList(
        Block(tower.width, tower.heads, tower.mlp_hidden, layer_scale_init) for _ in range(tower.depth)
    )


class Autoencoder(nn.Module):
    """encode: patch dict -> {z [B, N, c], positions}; decode: latent dict -> {patches [B, N, 3 p^2], positions}.

    Inputs are the dicts of `vitok_core.naflex` (`patchify` / `collate`): `patches`, `patch_mask`,
    `row_idx`, `col_idx` and, passed through untouched, `grid` and `orig_size`.
    """

    def __init__(
        self,
        spec: VariantSpec,
        *,
        layer_scale_init: float = 1e-4,
        activation_checkpointing: bool = False,
        local_window: int | None = None,
        rope_theta: float = 10000.0,
    ) -> None:
        super().__init__()
        self.spec = spec
        self.activation_checkpointing = activation_checkpointing
        self.local_window = local_window
        self.rope_theta = rope_theta
        enc, dec = spec.encoder, spec.decoder
        # Every submodule initialises itself in its constructor (ViT-style linears, norms at 1, LayerScale
        # at its init value), so building under DeepSpeed's zero.Init gives the same weights (layers.Linear).
        self.patch_embed = Linear(spec.pixels_per_token, enc.width)
        self.encoder_blocks = _blocks(enc, layer_scale_init)
        self.to_code = Linear(enc.width, spec.channels)
        self.decoder_embed = Linear(spec.channels, dec.width)
        self.decoder_blocks = _blocks(dec, layer_scale_init)
        self.to_pixels = Linear(dec.width, spec.pixels_per_token)

    # -- helpers ---------------------------------------------------------------------------------
    def _check_tokens(self, batch: Mapping[str, Tensor], key: str, dim: int) -> Tensor:
        if key not in batch:
            raise KeyError(f"input dict has no {key!r} (keys: {sorted(batch)})")
        x = batch[key]
        if x.ndim != 3 or x.shape[-1] != dim:
            raise ValueError(f"{key!r} must be [batch, tokens, {dim}] for {self.spec.name}, got {tuple(x.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ValueError(f"{key!r} is empty: shape {tuple(x.shape)}")
        for name in ("patch_mask", "row_idx", "col_idx"):
            if name not in batch:
                raise KeyError(f"input dict has no {name!r}; build inputs with vitok_core.naflex.collate")
            if tuple(batch[name].shape) != tuple(x.shape[:2]):
                raise ValueError(f"{name!r} shape {tuple(batch[name].shape)} != tokens {tuple(x.shape[:2])}")
        return x

    def _run_blocks(self, blocks: nn.ModuleList, x: Tensor, batch: Mapping[str, Tensor], head_dim: int) -> Tensor:
        row, col = batch["row_idx"], batch["col_idx"]
        rope = rope_2d(row, col, head_dim, self.rope_theta)
        mask = attention_mask(batch["patch_mask"], row, col, self.local_window, dense_hint(batch, x.shape[1]))
        for block in blocks:
            if self.activation_checkpointing and self.training:
                x = checkpoint(block, x, rope, mask, use_reentrant=False)
            else:
                x = block(x, rope, mask)
        return x

    @staticmethod
    def _positions(batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return {k: batch[k] for k in _POSITION_KEYS if k in batch}

    # -- API ---------------------------------------------------------------------------------------
    def encode(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Patch tokens -> deterministic latents z, LayerNorm'd per token (no affine, fp32)."""
        patches = self._check_tokens(batch, "patches", self.spec.pixels_per_token)
        x = self.patch_embed(patches)
        x = self._run_blocks(self.encoder_blocks, x, batch, self.spec.encoder.head_dim)
        code = self.to_code(x)
        z = F.layer_norm(code.float(), (self.spec.channels,), eps=1e-6).to(code.dtype)
        return {"z": z, **self._positions(batch)}

    def decode(self, latents: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Latents -> pixel patches in [-1, 1] (no final norm or tanh, as published)."""
        z = self._check_tokens(latents, "z", self.spec.channels)
        x = self.decoder_embed(z)
        x = self._run_blocks(self.decoder_blocks, x, latents, self.spec.decoder.head_dim)
        return {"patches": self.to_pixels(x), **self._positions(latents)}

    def forward(self, batch: Mapping[str, Tensor]) -> dict[str, Tensor]:
        return self.decode(self.encode(batch))


def build_autoencoder(variant: str | VariantSpec, **overrides: object) -> Autoencoder:
    """Build from a variant string (`"Ld4-Ld24/1x16x64"`); overrides go to `Autoencoder`.

    Wrap in `with torch.device("meta"):` to build any size (5B included) without memory.
    """
    spec = variant if isinstance(variant, VariantSpec) else parse_variant(variant)
    return Autoencoder(spec, **overrides)  # type: ignore[arg-type]


def count_parameters(model: nn.Module) -> dict[str, int]:
    """Parameter counts of the encoder and decoder parts, by published-layout prefix."""
    counts = {"encoder": 0, "decoder": 0}
    for name, param in model.named_parameters():
        part = "encoder" if name.startswith(ENCODER_PREFIXES) else "decoder"
        counts[part] += param.numel()
    counts["total"] = counts["encoder"] + counts["decoder"]
    return counts


def is_meta(model: nn.Module) -> bool:
    return any(p.device == torch.device("meta") for p in model.parameters())
