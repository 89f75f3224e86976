"""Reconstruction losses of ViTok-v2 (method.md section 3): Charbonnier + SSIM + DINOv3 perceptual, no GAN.

    L = w_c * Charbonnier(tokens) + w_s * (1 - SSIM(tiles)) + w_d * DINO(tiles)

SSIM and DINO see the same random tile of prediction and target, cut inside each image's original
extent and padded with -1 when the image is smaller than the tile.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitok_core.naflex import unpatchify_canvas

if TYPE_CHECKING:
    from vitok_core.config import LossConfig

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def charbonnier(pred: Tensor, target: Tensor, patch_mask: Tensor, eps: float = 1e-3) -> Tensor:
    """sqrt((x_hat - x)^2 + eps^2): mean over a token's pixels, masked mean over tokens, mean over batch."""
    per_token = torch.sqrt((pred.float() - target.float()).pow(2) + eps * eps).mean(-1)
    mask = patch_mask.to(per_token.dtype)
    per_image = (per_token * mask).sum(-1) / mask.sum(-1).clamp_min(1.0)
    return per_image.mean()


def sample_tile_origins(orig_size: Tensor, tile_size: int, generator: torch.Generator | None = None) -> Tensor:
    """One (top, left) per image, uniform over positions that keep the tile inside the original extent.

    Images smaller than the tile along a side get origin 0 on that side (the tile is padded instead).
    """
    slack = (orig_size.long() - tile_size).clamp_min(0)
    u = torch.rand(slack.shape, generator=generator)
    return (u * (slack + 1).float()).floor().long().clamp_max(slack)


def crop_tiles(canvas: Tensor, orig_size: Tensor, origins: Tensor, tile_size: int, fill: float = -1.0) -> Tensor:
    """Cut [B, 3, tile, tile] from [B, 3, H, W] at `origins`, never reading beyond an image's original
    (h, w): what lies outside is `fill`. Differentiable with respect to `canvas`."""
    tiles = []
    for image, (h, w), (top, left) in zip(canvas, orig_size.tolist(), origins.tolist(), strict=True):
        bottom, right = min(top + tile_size, h), min(left + tile_size, w)
        region = image[:, top:bottom, left:right]
        pad = (0, tile_size - (right - left), 0, tile_size - (bottom - top))
        tiles.append(F.pad(region, pad, value=fill))
    return torch.stack(tiles)


def _gaussian_window(size: int, sigma: float) -> Tensor:
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    window = torch.exp(-(coords**2) / (2 * sigma**2))
    return window / window.sum()


def ssim(
    pred: Tensor,
    target: Tensor,
    data_range: float = 2.0,
    kernel_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> Tensor:
    """Per-image SSIM of [B, C, H, W] images in [-1, 1] (Wang et al. 2004: Gaussian window 11, sigma 1.5,
    k1 0.01, k2 0.03, data range 2), averaged over the positions where the window fits inside the image.

    Written here rather than taken from torchmetrics: importing torchmetrics' image functions pulls in
    torchvision and torch._dynamo, about 5 s at the start of every training worker."""
    x, y = pred.float(), target.float()
    channels = x.shape[1]
    if min(x.shape[-2:]) < kernel_size:
        raise ValueError(f"ssim: images of {tuple(x.shape[-2:])} are smaller than the {kernel_size}px window")
    g = _gaussian_window(kernel_size, sigma).to(x.device)
    rows, cols = g.view(1, 1, -1, 1).expand(channels, 1, -1, 1), g.view(1, 1, 1, -1).expand(channels, 1, 1, -1)

    def blur(t: Tensor) -> Tensor:  # separable Gaussian filter per channel, valid positions only
        return F.conv2d(F.conv2d(t, cols, groups=channels), rows, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(1)


def load_dino(model_name: str, weights: str, key: str, **kwargs: object) -> nn.Module:
    """A pretrained timm DINO backbone (no classifier): weights from a local file (timm's layout or Meta's
    original DINOv2 / DINOv3 checkpoint, see vitok_core.dino_weights) or a timm / Hugging Face hub name;
    `kwargs` go to timm.create_model (e.g. img_size). Errors name the config `key` to change."""
    import timm  # heavy import, only for runs that use DINO

    from vitok_core.dino_weights import load_dino_weights

    # "hf-hub:org/name" holds a slash but names a hub repository, not a file.
    hub = weights.startswith("hf-hub:")
    looks_local = not hub and (os.sep in weights or weights.endswith((".safetensors", ".pth", ".pt", ".bin")))
    if looks_local or os.path.exists(weights):  # a missing file is reported by load_dino_weights
        model = timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)
        load_dino_weights(model, model_name, weights, key)
        return model
    try:
        name = weights if weights.startswith(model_name) or weights.startswith("hf-hub:") else f"{model_name}.{weights}"
        return timm.create_model(name, pretrained=True, num_classes=0, **kwargs)
    except Exception as err:  # network, gated repo, wrong file: say which setting to change
        raise RuntimeError(
            f"{key}={weights!r}: could not load DINO weights for {model_name}: {err}. Set {key} to a local checkpoint"
        ) from err


def random_dino(model_name: str, **kwargs: object) -> nn.Module:
    """The architecture with random weights (tests, offline smoke runs): NOT a perceptual network."""
    import timm

    return timm.create_model(model_name, pretrained=False, num_classes=0, **kwargs)


def build_dino_backbone(model_name: str, weights: str, pretrained: bool) -> nn.Module:
    """The perceptual loss's DINOv3 (loss.dino_*); `pretrained=False` builds it with random weights."""
    if not pretrained:
        warnings.warn(
            f"DINO perceptual loss uses a randomly initialised {model_name} (loss.dino_pretrained=false): "
            "it is NOT a perceptual loss and its numbers are not comparable to the paper's",
            stacklevel=2,
        )
        return random_dino(model_name)
    try:
        return load_dino(model_name, weights, "loss.dino_weights")
    except RuntimeError as err:
        raise RuntimeError(f"{err}, or loss.dino_pretrained=false for a run without a perceptual loss") from err


class DinoPerceptualLoss(nn.Module):
    """Mean over blocks of the MSE between L2-normalised token features of prediction and target.

    Features are every block's output before the final norm, all tokens (CLS, registers, patches). The
    backbone is frozen and kept in eval mode; gradients reach the prediction only.
    """

    def __init__(self, backbone: nn.Module, input_size: int = 224) -> None:
        super().__init__()
        self.backbone = backbone.eval().requires_grad_(False)
        self.input_size = input_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> DinoPerceptualLoss:
        super().train(mode)
        self.backbone.eval()  # frozen statistics and no dropout, whatever the trainer does
        return self

    def features(self, images: Tensor) -> list[Tensor]:
        """[-1, 1] images -> per-block [B, tokens, C] L2-normalised features."""
        x = (images.float() + 1.0) / 2.0
        if x.shape[-1] > self.input_size or x.shape[-2] > self.input_size:
            x = F.interpolate(
                x, size=(self.input_size, self.input_size), mode="bicubic", antialias=True, align_corners=False
            )
        x = (x - self.mean) / self.std
        captured: list[Tensor] = []
        hooks = [blk.register_forward_hook(lambda _m, _i, out: captured.append(out)) for blk in self.backbone.blocks]
        try:
            self.backbone.forward_features(x)
        finally:
            for hook in hooks:
                hook.remove()
        return [F.normalize(f.float(), dim=-1) for f in captured]

    def forward(self, pred: Tensor, target: Tensor) -> Tensor:
        with torch.no_grad():
            target_feats = self.features(target)
        pred_feats = self.features(pred)
        per_layer = [F.mse_loss(p, t) for p, t in zip(pred_feats, target_feats, strict=True)]
        return torch.stack(per_layer).mean()


class ReconstructionLoss(nn.Module):
    """The combined ViTok-v2 loss; returns every term for logging plus `loss`, the weighted total."""

    def __init__(self, cfg: LossConfig, patch_size: int, dino: DinoPerceptualLoss | None = None) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_size = patch_size
        if dino is None and cfg.dino_weight > 0:
            backbone = build_dino_backbone(cfg.dino_model, cfg.dino_weights, cfg.dino_pretrained)
            dino = DinoPerceptualLoss(backbone, cfg.dino_input_size)
        self.dino = dino if cfg.dino_weight > 0 else None

    def forward(
        self, pred_patches: Tensor, batch: Mapping[str, Tensor], generator: torch.Generator | None = None
    ) -> dict[str, Tensor]:
        cfg = self.cfg
        terms = {"charbonnier": charbonnier(pred_patches, batch["patches"], batch["patch_mask"], cfg.charbonnier_eps)}
        total = cfg.charbonnier_weight * terms["charbonnier"]
        if cfg.ssim_weight > 0 or self.dino is not None:
            orig = batch["orig_size"]
            origins = sample_tile_origins(orig, cfg.tile_size, generator)
            pred_tiles = crop_tiles(
                unpatchify_canvas(pred_patches, batch, self.patch_size), orig, origins, cfg.tile_size
            )
            with torch.no_grad():
                target_canvas = unpatchify_canvas(batch["patches"], batch, self.patch_size)
            target_tiles = crop_tiles(target_canvas, orig, origins, cfg.tile_size)
            if cfg.ssim_weight > 0:
                terms["ssim"] = ssim(pred_tiles, target_tiles).mean()
                total = total + cfg.ssim_weight * (1.0 - terms["ssim"])
            if self.dino is not None:
                terms["dino"] = self.dino(pred_tiles, target_tiles)
                total = total + cfg.dino_weight * terms["dino"]
        return {"loss": total, **terms}
