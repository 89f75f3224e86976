"""Rectified flow on latent tokens: the training loss, EMA, and the samplers (method.md section 5).

Convention: x_t = t * x_data + (1 - t) * noise, so t = 0 is pure noise and t = 1 is data, and the model
predicts the velocity v = x_data - noise (dx_t/dt). Sampling integrates from t = 0 to t = 1.
"""

from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn

Positions = Mapping[str, Tensor]


def logit_normal(n: int, generator: torch.Generator | None = None, mean: float = 0.0, std: float = 1.0) -> Tensor:
    """t = sigmoid(N(mean, std)): most samples in the middle of the path, where the task is hardest."""
    return torch.sigmoid(mean + std * torch.randn(n, generator=generator))


def drop_labels(labels: Tensor, null_class: int, prob: float, generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by the null class with probability `prob` (trains the unconditional branch)."""
    drop = torch.rand(labels.shape, generator=generator) < prob
    return torch.where(drop.to(labels.device), torch.full_like(labels, null_class), labels)


def flow_loss(
    model: nn.Module,
    x: Tensor,
    labels: Tensor,
    positions: Positions,
    generator: torch.Generator | None = None,
    label_dropout: float = 0.1,
    null_class: int | None = None,
) -> Tensor:
    """Masked MSE between the predicted and the true velocity at logit-normal t. `null_class` defaults to
    `model.null_class` (give it when `model` is a wrapper, e.g. a DeepSpeed engine)."""
    b = x.shape[0]
    # t, the noise and the path are fp32 whatever the model's dtype (sampling integrates in fp32 too);
    # only the model's input x_t takes x's dtype.
    t = logit_normal(b, generator).to(x.device)
    noise = torch.randn(x.shape, generator=generator).to(x.device)
    data = x.float()
    x_t = t[:, None, None] * data + (1 - t[:, None, None]) * noise
    null = model.null_class if null_class is None else null_class
    labels = drop_labels(labels, null, label_dropout, generator)
    v = model(x_t.to(x.dtype), t, labels, positions)
    mask = positions.get("patch_mask")
    err = (v.float() - (data - noise)) ** 2
    if mask is None:
        return err.mean()
    mask = mask[..., None].float()
    return (err * mask).sum() / (mask.sum() * x.shape[-1])


class EMA:
    """Exponential moving average of a model's parameters, kept in fp32 whatever the model's dtype
    (buffers copied).

    At decay 0.9999 a step moves the average by 1e-4 of its gap to the weights: in bf16 (8 bits of
    mantissa) such increments round to nothing and the average stands still. Build it from the fp32
    weights (before a bf16 wrapper casts them); `update` may take bf16 weights: their rounding error
    (<= 2^-9 relative) is averaged over the window, below what a bf16 sampler resolves."""

    def __init__(self, model: nn.Module, decay: float) -> None:
        self.decay = decay
        self.model = copy.deepcopy(model).float().eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for ema, param in zip(self.model.parameters(), model.parameters(), strict=True):
            ema.lerp_(param.detach().float(), 1.0 - self.decay)
        for ema, buf in zip(self.model.buffers(), model.buffers(), strict=True):
            ema.copy_(buf)

    def state_dict(self) -> dict[str, Tensor]:
        return self.model.state_dict()

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        if any(v.is_floating_point() and v.dtype != torch.float32 for v in state.values()):
            raise ValueError("an EMA state must be fp32 (this one was saved in a lower precision)")
        self.model.load_state_dict(state)


def guided_velocity(
    model: Callable[..., Tensor],
    x: Tensor,
    t: float,
    labels: Tensor,
    positions: Positions,
    null_class: int,
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    rescale: float = 0.0,
) -> Tensor:
    """Classifier-free guidance, applied only while t lies in `interval`; `rescale` in [0, 1] mixes in the
    guided velocity rescaled to the conditional one's per-sample std (Lin et al. 2024)."""
    tt = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
    if cfg_scale == 1.0 or not (interval[0] <= t <= interval[1]):
        return model(x, tt, labels, positions)
    both = {k: torch.cat([v, v]) for k, v in positions.items()}
    null = torch.full_like(labels, null_class)
    cond, uncond = model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]), both).chunk(2)
    guided = uncond + cfg_scale * (cond - uncond)
    if rescale > 0:
        dims = tuple(range(1, x.ndim))
        ratio = cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True).clamp_min(1e-8)
        guided = rescale * guided * ratio + (1 - rescale) * guided
    return guided


@torch.no_grad()
def sample(
    model: nn.Module,
    labels: Tensor,
    positions: Positions,
    channels: int,
    steps: int = 50,
    method: str = "euler",
    cfg_scale: float = 1.0,
    interval: tuple[float, float] = (0.0, 1.0),
    rescale: float = 0.0,
    seed: int = 0,
) -> Tensor:
    """Integrate dx/dt = v from noise (t = 0) to data (t = 1) on a uniform grid of `steps` steps.

    The noise comes from a generator seeded with `seed`, so the same call gives the same samples."""
    if method not in ("euler", "heun"):
        raise ValueError(f"method must be 'euler' or 'heun', got {method!r}")
    b, n = positions["row_idx"].shape
    generator = torch.Generator().manual_seed(seed)
    device = positions["row_idx"].device
    x = torch.randn(b, n, channels, generator=generator).to(device)
    null = model.null_class

    def velocity(x: Tensor, t: float) -> Tensor:
        return guided_velocity(model, x, t, labels, positions, null, cfg_scale, interval, rescale)

    grid = torch.linspace(0.0, 1.0, steps + 1).tolist()
    for t0, t1 in itertools.pairwise(grid):
        v0 = velocity(x, t0)
        if method == "heun" and t1 < 1.0:
            x_euler = x + (t1 - t0) * v0
            x = x + (t1 - t0) * 0.5 * (v0 + velocity(x_euler, t1))
        else:
            x = x + (t1 - t0) * v0
    return x
