"""Step-indexed schedules: learning rate (linear warm-up, cosine decay) and the NaFlex token budget."""

from __future__ import annotations

import math
from collections.abc import Sequence


def lr_at_step(step: int, total_steps: int, peak_lr: float, warmup_steps: int, min_lr: float = 0.0) -> float:
    """Linear warm-up to `peak_lr` (step s gets peak * (s + 1) / warmup, so no step has lr 0), then cosine
    to `min_lr` at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))


def budget_boundaries(total_steps: int, switch_fractions: Sequence[float]) -> list[int]:
    """First step of each budget after the first: round(fraction * total_steps)."""
    return [round(f * total_steps) for f in switch_fractions]


def budget_at_step(step: int, total_steps: int, budgets: Sequence[int], switch_fractions: Sequence[float]) -> int:
    """Token budget in force at `step` (paper: 256 for the first 90% of steps, 1024 after).

    `budgets[i + 1]` starts at step round(switch_fractions[i] * total_steps), so the switch is exact.
    """
    if len(switch_fractions) != len(budgets) - 1:
        raise ValueError(
            f"{len(budgets)} budgets need {len(budgets) - 1} switch fractions, got {len(switch_fractions)}"
        )
    index = sum(step >= boundary for boundary in budget_boundaries(total_steps, switch_fractions))
    return budgets[index]
