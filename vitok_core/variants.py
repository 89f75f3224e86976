"""ViTok-v2 variant strings: `"{enc}-{dec}/{t}x{p}x{c}"`, e.g. `Ld4-Ld24/1x16x64` (350M), `Td4-T/1x16x64` (5B).

A tower is a size key (width/depth/heads from `SIZES`) with an optional `d<N>` depth override; the
encoder takes its preset's width. `t` is the temporal patch size (1 for images), `p` the spatial patch
size and `c` the latent channels per token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# key: (width, depth, heads). B/L/G/T are the paper's sizes; Ti/S are ours, for CPU tests and demos.
SIZES: dict[str, tuple[int, int, int]] = {
    "Ti": (192, 12, 3),
    "S": (384, 12, 6),
    "B": (768, 12, 12),
    "L": (1024, 24, 16),
    "G": (1728, 32, 24),
    "T": (3072, 40, 24),
}

# Longest keys first so that "Ti" is not read as "T" followed by junk.
_SIZE_ALT = "|".join(sorted(SIZES, key=len, reverse=True))
_TOWER = rf"(?:{_SIZE_ALT})(?:d\d+)?"
_VARIANT_RE = re.compile(rf"^(?P<enc>{_TOWER})-(?P<dec>{_TOWER})/(?P<t>\d+)x(?P<p>\d+)x(?P<c>\d+)$")
_TOWER_RE = re.compile(rf"^(?P<key>{_SIZE_ALT})(?:d(?P<depth>\d+))?$")


class VariantError(ValueError):
    """A variant string that does not parse or describes an impossible model."""


def swiglu_hidden(width: int) -> int:
    """SwiGLU hidden size of the reference: int(d * 2.67) rounded up to a multiple of 16 (+8 then floor)."""
    return ((int(width * 2.67) + 8) // 16) * 16


@dataclass(frozen=True)
class TowerSpec:
    """One transformer stack (encoder or decoder)."""

    width: int
    depth: int
    heads: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads

    @property
    def mlp_hidden(self) -> int:
        return swiglu_hidden(self.width)


@dataclass(frozen=True)
class VariantSpec:
    """A parsed variant string."""

    name: str
    encoder: TowerSpec
    decoder: TowerSpec
    patch_size: int
    channels: int
    temporal_patch: int = 1

    @property
    def pixels_per_token(self) -> int:
        return 3 * self.patch_size * self.patch_size

    @property
    def compression_ratio(self) -> float:
        """r = 3 p^2 / c (f16x64 -> 12)."""
        return self.pixels_per_token / self.channels


def _parse_tower(text: str, variant: str) -> TowerSpec:
    m = _TOWER_RE.match(text)
    assert m is not None  # guaranteed by _VARIANT_RE
    width, depth, heads = SIZES[m["key"]]
    if m["depth"] is not None:
        depth = int(m["depth"])
    if depth < 1:
        raise VariantError(f"variant {variant!r}: tower {text!r} has depth {depth}; need >= 1")
    return TowerSpec(width=width, depth=depth, heads=heads)


def parse_variant(variant: str) -> VariantSpec:
    """Parse `"{enc}-{dec}/{t}x{p}x{c}"`; raises VariantError naming the string when it does not parse."""
    if not isinstance(variant, str):
        raise VariantError(f"variant must be a string like 'Ld4-Ld24/1x16x64', got {variant!r}")
    m = _VARIANT_RE.match(variant.strip())
    if m is None:
        raise VariantError(
            f"variant {variant!r} does not parse: expected '{{enc}}-{{dec}}/1x{{p}}x{{c}}' where enc/dec are "
            f"one of {sorted(SIZES)} with an optional d<depth>, e.g. 'Ld4-Ld24/1x16x64' or 'Td4-T/1x16x64'"
        )
    t, p, c = int(m["t"]), int(m["p"]), int(m["c"])
    if t != 1:
        raise VariantError(f"variant {variant!r}: temporal patch {t} is for video; images need 1")
    if p < 1 or c < 1:
        raise VariantError(f"variant {variant!r}: patch size and channels must be >= 1 (got p={p}, c={c})")
    spec = VariantSpec(
        name=variant.strip(),
        encoder=_parse_tower(m["enc"], variant),
        decoder=_parse_tower(m["dec"], variant),
        patch_size=p,
        channels=c,
        temporal_patch=t,
    )
    for tower in (spec.encoder, spec.decoder):
        if tower.width % tower.heads or tower.head_dim % 4:
            raise VariantError(f"variant {variant!r}: 2D RoPE needs head_dim % 4 == 0, got {tower}")
    return spec
