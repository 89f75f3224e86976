"""End to end on real photos: the tiny model overfits a handful of them, and the demo command runs."""

from __future__ import annotations

import pytest

from vitok_core.config import load_config
from vitok_core.demo import demo_photo_paths, load_demo_images, main, overfit


@pytest.mark.slow
def test_tiny_model_overfits_real_photos():
    images = load_demo_images()
    assert len(images) == 4 and len({tuple(i.shape) for i in images}) > 1  # real photos, mixed sizes
    result = overfit(load_config("tiny"), images, steps=200, budget=64, log_every=0)
    gain = sum(result.psnr_after) / len(images) - sum(result.psnr_before) / len(images)
    assert gain > 5.0, f"PSNR rose by only {gain:.2f} dB: {result.psnr_before} -> {result.psnr_after}"
    assert all(a > b for a, b in zip(result.psnr_after, result.psnr_before, strict=True))
    assert result.losses[-1] < 0.5 * result.losses[0]


def test_demo_command_prints_a_psnr_table(capsys):
    main(["--steps", "3", "train.seed=1"])
    out = capsys.readouterr().out
    for path in demo_photo_paths():
        assert path.name in out
    assert "PSNR before" in out and "mean" in out and "tokens/s" in out
