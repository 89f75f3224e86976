"""The DiT, the rectified-flow loss, the EMA and the samplers (pure PyTorch, fast)."""

from __future__ import annotations

import pytest
import torch

from vitok_core.flow import EMA, drop_labels, flow_loss, guided_velocity, logit_normal, sample
from vitok_core.latents import ChannelStats, from_bytes, grid_positions, to_bytes
from vitok_core.model.dit import build_dit


def positions(b: int, rows: int, cols: int) -> dict[str, torch.Tensor]:
    return {k: v[None].expand(b, *v.shape) for k, v in grid_positions(rows, cols).items()}


@pytest.mark.parametrize(("size", "millions"), [("L", 458.1), ("G", 1198.6)])
def test_dit_sizes_match_the_paper_scale(size, millions):
    with torch.device("meta"):
        model = build_dit(size, channels=64, num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) / 1e6 == pytest.approx(millions, abs=0.1)


def test_dit_starts_at_zero_and_handles_any_grid():
    torch.manual_seed(0)
    model = build_dit("tiny", channels=16, num_classes=4)
    for rows, cols in [(4, 4), (3, 7)]:
        x = torch.randn(2, rows * cols, 16)
        v = model(x, torch.rand(2), torch.tensor([0, 4]), positions(2, rows, cols))
        assert v.shape == x.shape and torch.all(v == 0)  # adaLN-Zero: the output layer starts at 0
    with pytest.raises(ValueError, match="this DiT takes 16"):
        model(torch.randn(1, 4, 8), torch.rand(1), torch.tensor([0]), positions(1, 2, 2))


def test_flow_loss_trains_and_label_dropout():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 3] * 50)
    dropped = drop_labels(labels, 4, 0.1, torch.Generator().manual_seed(0))
    assert 0.03 < (dropped == 4).float().mean() < 0.2 and torch.all((dropped == labels) | (dropped == 4))
    t = logit_normal(10000, torch.Generator().manual_seed(0))
    assert 0.45 < float(t.mean()) < 0.55 and float(t.min()) > 0 and float(t.max()) < 1

    model = build_dit("tiny", channels=8, num_classes=2)
    data = torch.randn(4, 9, 8)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    pos, labels = positions(4, 3, 3), torch.tensor([0, 1, 0, 1])
    losses = []
    for step in range(150):
        loss = flow_loss(model, data, labels, pos, torch.Generator().manual_seed(step))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-30:]) / 30 < 0.85 * sum(losses[:30]) / 30  # noisy by nature: t and noise are drawn


def test_ema_follows_slowly():
    model = torch.nn.Linear(3, 3)
    ema = EMA(model, decay=0.9)
    start = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)
    torch.testing.assert_close(ema.model.weight, start + 0.1)  # 0.9 * old + 0.1 * new
    assert not torch.equal(ema.model.weight, model.weight)


def test_sampler_is_deterministic_and_guidance_matters():
    torch.manual_seed(1)
    model = build_dit("tiny", channels=8, num_classes=3)
    for p in model.parameters():  # leave adaLN-Zero's all-zero start, so the class matters
        p.data.normal_(0, 0.05)
    pos, labels = positions(2, 3, 4), torch.tensor([0, 2])
    a = sample(model, labels, pos, 8, steps=6, seed=5)
    assert a.shape == (2, 12, 8)
    assert torch.equal(a, sample(model, labels, pos, 8, steps=6, seed=5))
    assert not torch.equal(a, sample(model, labels, pos, 8, steps=6, seed=6))
    guided = sample(model, labels, pos, 8, steps=6, seed=5, cfg_scale=3.0)
    assert not torch.allclose(a, guided)
    heun = sample(model, labels, pos, 8, steps=6, seed=5, method="heun")
    assert not torch.allclose(a, heun)
    rescaled = sample(model, labels, pos, 8, steps=6, seed=5, cfg_scale=3.0, rescale=0.7)
    assert not torch.allclose(guided, rescaled)


def test_guidance_only_inside_its_interval():
    model = build_dit("tiny", channels=8, num_classes=3)
    seen = []

    def spy(x, t, labels, pos):
        seen.append((round(float(t[0]), 4), x.shape[0]))
        return model(x, t, labels, pos)

    spy.null_class = model.null_class
    pos, labels = positions(2, 2, 2), torch.tensor([0, 1])
    x = torch.randn(2, 4, 8)
    for t in (0.05, 0.3, 0.7, 0.95):
        guided_velocity(spy, x, t, labels, pos, model.null_class, cfg_scale=2.0, interval=(0.1, 0.9))
    assert seen == [(0.05, 2), (0.3, 4), (0.7, 4), (0.95, 2)]  # the doubled (cond + uncond) batch only inside


def test_latent_bytes_and_channel_stats():
    z = torch.randn(12, 5)
    for dtype in ("bf16", "fp16"):
        back = from_bytes(to_bytes(z, dtype), 12, 5, dtype)
        torch.testing.assert_close(back, z, rtol=1e-2, atol=1e-2)
    blocks = [torch.randn(n, 5).numpy() * 3 + 1 for n in (7, 1, 30)]
    whole, merged = ChannelStats(5), ChannelStats(5)
    for block in blocks:
        part = ChannelStats(5)
        part.update(block)
        merged.merge(ChannelStats.from_json(part.to_json()))
    import numpy as np

    everything = np.concatenate(blocks).astype(np.float64)
    whole.update(everything)
    np.testing.assert_allclose(merged.mean, everything.mean(0), atol=1e-12)
    np.testing.assert_allclose(merged.std, everything.std(0), rtol=1e-12)
    assert merged.count == whole.count == 38
