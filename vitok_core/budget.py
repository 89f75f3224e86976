"""Token-budget arithmetic of NaFlex (method.md section 2), free of torch so that ingest workers can
bucket images without loading it. `vitok_core.naflex` re-exports both functions."""

from __future__ import annotations

import math


def check_size(height: int, width: int, patch_size: int, max_tokens: int) -> None:
    if patch_size < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size}")
    if max_tokens < 1:
        raise ValueError(f"token budget must be >= 1 token, got max_tokens={max_tokens}")
    if height < 1 or width < 1:
        raise ValueError(f"image has zero size: height={height}, width={width}")


def fit_to_token_budget(height: int, width: int, patch_size: int, max_tokens: int) -> tuple[int, int]:
    """Size (h', w') an image gets under a budget of `max_tokens` p x p patches; never up-scales.

    If ceil(h/p) * ceil(w/p) <= T the size is kept (it is padded later). Otherwise
    s = sqrt(T / (hp * wp)), hp' = floor(hp * s + 1e-5), wp' = floor(wp * s + 1e-5) and the size is
    (min(hp' p, h), min(wp' p, w)). For aspect ratios so extreme that a side would get 0 patches, that
    side gets 1 patch and the other floor(T / 1) patches at most (our rule; the reference would crash).
    """
    check_size(height, width, patch_size, max_tokens)
    hp, wp = math.ceil(height / patch_size), math.ceil(width / patch_size)
    if hp * wp <= max_tokens:
        return height, width
    scale = math.sqrt(max_tokens / (hp * wp))
    new_hp = math.floor(hp * scale + 1e-5)
    new_wp = math.floor(wp * scale + 1e-5)
    if new_hp < 1:
        new_hp, new_wp = 1, min(wp, max_tokens)
    elif new_wp < 1:
        new_hp, new_wp = min(hp, max_tokens), 1
    return min(new_hp * patch_size, height), min(new_wp * patch_size, width)


def bucket_of(height: int, width: int, patch_size: int, max_tokens: int) -> tuple[int, int]:
    """The aspect-ratio bucket of an image: its patch grid (rows, cols) under the budget."""
    h, w = fit_to_token_budget(height, width, patch_size, max_tokens)
    return math.ceil(h / patch_size), math.ceil(w / patch_size)
