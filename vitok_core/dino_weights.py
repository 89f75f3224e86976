"""DINO backbone weights from the files users have, loaded strictly into timm's architecture.

The perceptual loss and the rFDD extractors run timm models (loss.dino_model, evaluate.dinov{2,3}_model). Their
weights files (loss.dino_weights, evaluate.dinov{2,3}_weights) come in one of three key layouts, recognised from
the keys alone:

- timm: a timm model's own state dict (`model.safetensors` of a `timm/...` hub repo, or `model.state_dict()`);
- meta_dinov2: Meta's DINOv2 release (`dinov2_vitl14_pretrain.pth`, `dinov2_vitl14_reg4_pretrain.pth`, ...):
  `mask_token`, `register_tokens`, `pos_embed` with the CLS position first, `blocks.N.mlp.w12` / `w3` (ViT-g's
  fused SwiGLU), and in training checkpoints chunked `blocks.C.N.` keys under `teacher.backbone.`;
- meta_dinov3: Meta's DINOv3 release (`dinov3_vitb16_pretrain_lvd1689m-73cec8be.pth`, ...): `storage_tokens`,
  `rope_embed.periods`, `mask_token`, `blocks.N.ls1.gamma`, `blocks.N.attn.qkv.bias` with `qkv.bias_mask` (the
  key bias masked to 0), `blocks.N.mlp.w1` / `w2` / `w3` (SwiGLU in ViT-S+ / H+ / 7B).

Where the key names come from: facebookresearch/dinov2 dinov2/models/vision_transformer.py and
facebookresearch/dinov3 dinov3/models/vision_transformer.py, dinov3/layers/block.py, dinov3/hub/backbones.py
(read; not run), and timm 1.0's own Meta converters (vision_transformer._convert_dinov2, eva.checkpoint_filter_fn),
against which tests/test_dino_weights.py checks this module. No real Meta checkpoint was opened: the tests build
Meta-named state dicts from timm models by the inverse of these rules.

A learned position table on another grid (DINOv2's 37 x 37 at 518 px, used at 224 px for rFDD) is resampled
to the model's grid: a Meta file as Meta's own model resamples it at that input size (meta_dinov2_positions), a
timm file as timm's loader does (bicubic, antialiased). The two differ for DINOv2 without registers (Meta: no
antialiasing, a 0.1 offset). Then the load is strict.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

LAYOUTS = ("timm", "meta_dinov2", "meta_dinov3")
_WRAPPERS = ("teacher", "model", "model_ema", "state_dict", "module")  # training checkpoints nest the weights
_DINOV2_SIZES = {384: "small", 768: "base", 1024: "large", 1536: "giant"}
# (width, SwiGLU) -> timm size name; Meta's ViT-L+ (1024, SwiGLU) has no timm architecture.
_DINOV3_SIZES = {
    (384, False): "small",
    (384, True): "small_plus",
    (768, False): "base",
    (1024, False): "large",
    (1280, True): "huge_plus",
    (4096, True): "7b",
}


class DinoWeightsError(RuntimeError):
    """A DINO weights file that cannot be loaded into the configured timm model; the message says what to change."""


# ------------------------------------------------------------------------------------------------
# Reading and recognising a file
# ------------------------------------------------------------------------------------------------
def read_checkpoint(path: str) -> dict[str, Tensor]:
    """The tensors of a .safetensors / .pth / .pt / .bin file, unwrapped from training-checkpoint nesting
    (`teacher`, `model`, `state_dict`, ...) and the `module.` / `backbone.` prefixes; heads are dropped."""
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        obj: object = load_file(path, device="cpu")
    else:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # a pickle that needs code to load: refuse rather than execute it
            raise DinoWeightsError(f"{path!r} is not a plain PyTorch state dict ({err})") from err
    while isinstance(obj, Mapping) and not any(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in _WRAPPERS if isinstance(obj.get(k), Mapping)), None)
        if inner is None:
            break
        obj = inner
    if not isinstance(obj, Mapping):
        raise DinoWeightsError(f"{path!r} holds a {type(obj).__name__}, not a state dict")
    state = {k: v for k, v in obj.items() if isinstance(v, Tensor)}
    if not state:
        raise DinoWeightsError(f"{path!r} holds no tensors")
    if all(k.startswith("module.") for k in state):  # saved from DistributedDataParallel
        state = {k[len("module.") :]: v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):  # DINO training: backbone + dino_head / ibot_head
        state = {k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")}
    return state


def detect_layout(keys: set[str] | Mapping[str, Tensor]) -> str:
    """timm | meta_dinov2 | meta_dinov3, from key names that only that layout has."""
    keys = set(keys)
    if any(k.startswith(("downsample_layers.", "stages.")) for k in keys):
        raise DinoWeightsError("a ConvNeXt checkpoint: the DINO loss and rFDD need a ViT (DINOv2 / DINOv3 ViT)")
    if any(k.startswith(("embeddings.", "encoder.layer.")) for k in keys):
        raise DinoWeightsError(
            "a Hugging Face transformers checkpoint (embeddings.*, encoder.layer.*), which is not supported: "
            "use Meta's original .pth or timm's model.safetensors (see docs/dino-weights.md)"
        )
    if "storage_tokens" in keys or "rope_embed.periods" in keys:
        return "meta_dinov3"
    if "mask_token" in keys or "register_tokens" in keys:  # timm's ViT has neither
        return "meta_dinov2"
    return "timm"


# ------------------------------------------------------------------------------------------------
# Meta -> timm
# ------------------------------------------------------------------------------------------------
def meta_dinov2_positions(pos: Tensor, grid: tuple[int, int], registers: bool) -> Tensor:
    """Meta's DinoVisionTransformer.interpolate_pos_encoding evaluated once for the model's fixed grid, so that
    the timm model computes what Meta's does at that input size. Meta's hub builds the released models without
    registers with interpolate_offset 0.1 and no antialiasing (scale factors (grid + 0.1) / M), those with
    registers with offset 0 and antialiasing (the target size) (dinov2/hub/backbones.py)."""
    side = math.isqrt(pos.shape[1] - 1)
    if (side, side) == tuple(grid) or side * side != pos.shape[1] - 1:
        return pos
    table = pos[:, 1:].float().reshape(1, side, side, -1).permute(0, 3, 1, 2)
    if registers:
        resized = F.interpolate(table, size=tuple(grid), mode="bicubic", antialias=True)
    else:
        factors = ((grid[0] + 0.1) / side, (grid[1] + 0.1) / side)
        resized = F.interpolate(table, scale_factor=factors, mode="bicubic", antialias=False)
    if tuple(resized.shape[-2:]) != tuple(grid):
        return pos  # the strict check reports the mismatch
    patches = resized.permute(0, 2, 3, 1).reshape(1, -1, pos.shape[-1]).to(pos.dtype)
    return torch.cat([pos[:, :1], patches], dim=1)


def convert_meta_dinov2(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Meta DINOv2 keys -> timm VisionTransformer (vit_*_patch14[_reg4]_dinov2) keys, positions on its grid."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "mask_token":  # masked-token pretraining only, never used at inference
            continue
        key = re.sub(r"^blocks\.\d+\.(\d+)\.", r"blocks.\1.", key)  # BlockChunk: blocks.{chunk}.{global index}.
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")  # ViT-g: same [x1; x2] packing
        out[key] = value
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if "pos_embed" in out and grid is not None:
        out["pos_embed"] = meta_dinov2_positions(out["pos_embed"], tuple(grid), "register_tokens" in out)
    if "register_tokens" in out:
        # Meta adds pos_embed[:, 0] to the CLS token and no position to the registers; timm's reg4 models
        # (no_embed_class) add positions to patches only, so the CLS position is folded into the CLS token.
        pos = out.pop("pos_embed")
        out["cls_token"] = out["cls_token"] + pos[:, :1]
        out["pos_embed"] = pos[:, 1:]
        out["reg_token"] = out.pop("register_tokens")
    return out


def _effective_qkv_bias(state: Mapping[str, Tensor], key: str) -> Tensor:
    """Meta's LinearKMaskedBias adds bias * bias_mask (the key third masked to 0); plain Linear adds bias."""
    bias = state[key]
    mask = state.get(f"{key}_mask")
    return bias if mask is None else bias * mask.to(bias.dtype)


def _split_qkv_bias(state: Mapping[str, Tensor], key: str, targets: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Meta's fused qkv bias -> timm Eva's q_bias / v_bias. A key bias adds q.b_k to every logit of a query, which
    softmax ignores, so dropping it is exact; timm's models without biases take only all-zero q / v biases."""
    q, _k, v = _effective_qkv_bias(state, key).chunk(3)
    prefix = key[: -len("qkv.bias")]
    if f"{prefix}q_bias" in targets:
        return {f"{prefix}q_bias": q, f"{prefix}v_bias": v}
    if bool(q.any()) or bool(v.any()):
        raise DinoWeightsError(f"{key} holds non-zero query / value biases, which this model has no place for")
    return {}


def _check_rope_periods(state: Mapping[str, Tensor], model: nn.Module) -> None:
    """Meta stores its RoPE periods; timm computes them. Different periods mean another RoPE base."""
    theirs = state.get("rope_embed.periods")
    ours = dict(model.named_buffers()).get("rope.periods")
    if theirs is None or ours is None:
        return
    if theirs.shape != ours.shape or not torch.allclose(theirs.float(), ours.float(), rtol=1e-5, atol=0):
        raise DinoWeightsError(
            f"rope_embed.periods {theirs.flatten()[:4].tolist()}... differ from the model's RoPE periods "
            f"{ours.flatten()[:4].tolist()}...: the file uses another RoPE base or head size"
        )


def convert_meta_dinov3(state: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Meta DINOv3 keys -> timm Eva (vit_*_patch16_dinov3[_qkvb]) keys."""
    if any(k.startswith("cls_norm.") for k in state):
        raise DinoWeightsError(
            "the checkpoint has a separate CLS / register norm (untie_cls_and_patch_norms), which timm's Eva lacks"
        )
    _check_rope_periods(state, model)
    targets = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key in ("mask_token", "rope_embed.periods") or key.endswith(".bias_mask"):
            continue  # pretraining-only token; periods checked above; masks applied in _split_qkv_bias
        if key.startswith("local_cls_norm."):  # used on local crops during training only (ViT-7B, ViT-L SAT)
            continue
        if key.endswith(".attn.qkv.bias"):
            out.update(_split_qkv_bias(state, key, targets))
            continue
        key = "reg_token" if key == "storage_tokens" else key
        key = re.sub(r"\.ls([12])\.gamma$", r".gamma_\1", key)
        key = key.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    return out


def fit_pos_embed(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """Resample a timm-layout position table on another square grid to the model's grid, as timm's loader does
    (bicubic, antialiased), so a timm file gives the same network here as through timm.create_model."""
    pos, target = state.get("pos_embed"), getattr(model, "pos_embed", None)
    if pos is None or target is None or pos.shape == target.shape:
        return state
    from timm.layers import resample_abs_pos_embed

    prefix = 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))
    side = math.isqrt(pos.shape[1] - prefix)
    if side * side != pos.shape[1] - prefix or pos.shape[-1] != target.shape[-1]:
        return state  # not a square table of this width: the strict check reports it
    resampled = resample_abs_pos_embed(
        pos, new_size=model.patch_embed.grid_size, old_size=(side, side), num_prefix_tokens=prefix, antialias=True
    )
    return {**state, "pos_embed": resampled}


# ------------------------------------------------------------------------------------------------
# What a Meta file holds, for errors that say what to configure
# ------------------------------------------------------------------------------------------------
def _depth(state: Mapping[str, Tensor]) -> int:
    indices = {int(m.group(1)) for k in state if (m := re.match(r"^blocks\.(?:\d+\.)?(\d+)\.norm1\.", k))}
    return len(indices)


def _has_nonzero_qv_bias(state: Mapping[str, Tensor]) -> bool:
    keys = [k for k in state if k.endswith(".attn.qkv.bias")]
    return any(bool(q.any()) or bool(v.any()) for q, _, v in (_effective_qkv_bias(state, k).chunk(3) for k in keys))


def suggest_timm_model(state: Mapping[str, Tensor], layout: str) -> tuple[str, str | None]:
    """(what the Meta file holds, the timm model that fits it or None when timm has none)."""
    import timm

    if layout not in ("meta_dinov2", "meta_dinov3") or "cls_token" not in state:
        return "", None
    width, depth = int(state["cls_token"].shape[-1]), _depth(state)
    patch = int(state["patch_embed.proj.weight"].shape[-1]) if "patch_embed.proj.weight" in state else 0
    if layout == "meta_dinov2":
        registers = int(state["register_tokens"].shape[1]) if "register_tokens" in state else 0
        what = f"DINOv2 ViT/{patch}, width {width}, {depth} blocks, {registers} registers"
        size = _DINOV2_SIZES.get(width)
        name = f"vit_{size}_patch{patch}{f'_reg{registers}' if registers else ''}_dinov2" if size else None
    else:
        swiglu = any(".mlp.w1." in k for k in state)
        registers = int(state["storage_tokens"].shape[1]) if "storage_tokens" in state else 0
        what = f"DINOv3 ViT/{patch}, width {width}, {depth} blocks, {registers} storage tokens"
        what += ", SwiGLU" if swiglu else ""
        size = _DINOV3_SIZES.get((width, swiglu))
        name = f"vit_{size}_patch{patch}_dinov3{'_qkvb' if _has_nonzero_qv_bias(state) else ''}" if size else None
    return what, name if name and name in timm.list_models(name) else None


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------
def convert(state: Mapping[str, Tensor], model: nn.Module) -> tuple[str, dict[str, Tensor]]:
    """(layout, state dict in the model's keys and shapes) of any supported layout."""
    layout = detect_layout(state)
    if layout == "meta_dinov2":
        converted = convert_meta_dinov2(state, model)
    elif layout == "meta_dinov3":
        converted = convert_meta_dinov3(state, model)
    else:
        converted = dict(state)
    return layout, fit_pos_embed(converted, model)


def _mismatch(converted: Mapping[str, Tensor], targets: Mapping[str, Tensor]) -> str:
    """Missing, unexpected and mis-shaped keys, a few of each; "" when the state dict fits."""
    missing = sorted(set(targets) - set(converted))
    unexpected = sorted(set(converted) - set(targets))
    shapes = sorted(
        f"{k} {tuple(converted[k].shape)} vs {tuple(targets[k].shape)}"
        for k in set(targets) & set(converted)
        if converted[k].shape != targets[k].shape
    )
    parts = [f"{label} {items[:4]}{' ...' if len(items) > 4 else ''}" for label, items in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatches", shapes)) if items]  # fmt: skip
    return "; ".join(parts)


def load_dino_weights(model: nn.Module, model_name: str, path: str, key: str) -> str:
    """Load the file at `path` (config key `key`) strictly into `model` (timm `model_name`); returns the layout.

    Errors name the config keys to change and, for a Meta file, the timm model that would fit it."""
    model_key = key.replace("_weights", "_model")
    where = f"{key}={path!r}"
    if not os.path.exists(path):
        raise DinoWeightsError(f"{where}: the DINO weights file does not exist")
    state = read_checkpoint(path)
    try:
        layout, converted = convert(state, model)
    except DinoWeightsError as err:
        raise DinoWeightsError(f"{where}: {err}{_advice(state, model_name, model_key)}") from None
    problem = _mismatch(converted, model.state_dict())
    if problem:
        raise DinoWeightsError(
            f"{where} ({layout} layout) does not fit {model_key}={model_name}: {problem}"
            f"{_advice(state, model_name, model_key)}"
        )
    model.load_state_dict(converted, strict=True)
    return layout


def _advice(state: Mapping[str, Tensor], model_name: str, model_key: str) -> str:
    """What to set instead, for a Meta file; why nothing fits, when timm lacks the architecture."""
    import timm

    try:
        layout = detect_layout(state)
    except DinoWeightsError:
        return ""
    what, name = suggest_timm_model(state, layout)
    if not what:
        return ""
    if name is None:
        return (
            f". The file holds a {what}: timm {timm.__version__} has no architecture for it, so it cannot be "
            "loaded (see docs/dino-weights.md for the supported checkpoints)"
        )
    if name == model_name:
        return f". The file holds a {what}"
    return f". The file holds a {what}: set {model_key}={name}"
