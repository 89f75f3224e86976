"""Meta's original DINOv2 / DINOv3 checkpoints load into the timm backbones of the perceptual loss and rFDD
through the config keys users set (loss.dino_weights, evaluate.dinov{2,3}_weights), as timm's own files do.

No real Meta checkpoint is available offline. Each test writes a randomly initialised timm model in Meta's key
layout, by the inverse of vitok_core.dino_weights' rules; those rules follow Meta's model code
(facebookresearch/dinov2 and dinov3: vision_transformer.py, layers/block.py, hub/backbones.py), and the
conversion is checked against timm's own Meta converters, which were written against the real files.
"""

from __future__ import annotations

import math
import re

import pytest
import timm
import torch
from safetensors.torch import save_file

from vitok_core.config import load_config
from vitok_core.dino_weights import DinoWeightsError, convert, detect_layout, load_dino_weights, suggest_timm_model
from vitok_core.features import build_extractor
from vitok_core.losses import ReconstructionLoss

DINOV2 = [m for m in timm.list_models("*_dinov2")]
DINOV3 = [m for m in timm.list_models("*_dinov3*") if "7b" not in m and "tiny" not in m]  # 7B: too big to build here


def build(name: str, seed: int, **kwargs: object) -> torch.nn.Module:
    """A timm DINO with every tensor random (LayerScale and biases too, so a lost or misplaced key shows)."""
    if "dinov2" in name:
        kwargs.setdefault("img_size", 28)
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for value in model.state_dict().values():
            value.copy_(torch.randn(value.shape, generator=gen) * 0.1)
    return model


def to_meta_dinov2(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """timm -> Meta DINOv2 keys (the inverse of convert_meta_dinov2)."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    width = sd["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, width)}
    if "reg_token" in sd:  # Meta: CLS carries pos_embed[:, 0]; registers carry no position
        cls_position = torch.randn(1, 1, width, generator=gen)
        out["register_tokens"] = sd.pop("reg_token")
        out["cls_token"] = sd.pop("cls_token") - cls_position
        out["pos_embed"] = torch.cat([cls_position, sd.pop("pos_embed")], dim=1)
    swiglu = type(model.blocks[0].mlp).__name__ == "GluMlp"  # ViT-g: Meta's SwiGLUFFNFused w12 / w3
    for key, value in sd.items():
        if swiglu:
            key = key.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[key] = value
    return out


SWIGLU_NAMES = ((".mlp.fc1_g.", ".mlp.w1."), (".mlp.fc1_x.", ".mlp.w2."), (".mlp.fc2.", ".mlp.w3."))


def to_meta_dinov3(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """timm -> Meta DINOv3 keys (the inverse of convert_meta_dinov3): fused qkv bias with its key-masking
    bias_mask (the masked key third holds junk, as it may in a real file), storage tokens, ls1 / ls2, w1 / w2 / w3."""
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    width = sd["cls_token"].shape[-1]
    out = {"mask_token": torch.zeros(1, width), "rope_embed.periods": model.rope.periods.clone()}
    swiglu = any(".mlp.fc1_g." in k for k in sd)
    for key, value in sd.items():
        if key.endswith((".attn.q_bias", ".attn.v_bias")):
            continue
        key = "storage_tokens" if key == "reg_token" else re.sub(r"\.gamma_([12])$", r".ls\1.gamma", key)
        if swiglu:  # Meta's SwiGLUFFN: w3(silu(w1 x) * w2 x)
            for timm_name, meta_name in SWIGLU_NAMES:
                key = key.replace(timm_name, meta_name)
        out[key] = value
    for i in range(len(model.blocks)):
        prefix = f"blocks.{i}.attn."
        zeros = torch.zeros(width)
        q, v = sd.get(f"{prefix}q_bias", zeros), sd.get(f"{prefix}v_bias", zeros)
        out[f"{prefix}qkv.bias"] = torch.cat([q, torch.randn(width, generator=gen), v])
        out[f"{prefix}qkv.bias_mask"] = torch.cat([torch.ones(width), zeros, torch.ones(width)])
    return out


def to_meta(model: torch.nn.Module, name: str, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return to_meta_dinov2(model, gen) if "dinov2" in name else to_meta_dinov3(model, gen)


def timm_filter(meta: dict[str, torch.Tensor], model: torch.nn.Module, name: str) -> dict[str, torch.Tensor]:
    """timm's own Meta converter (the one its hub weights were made with), for an independent check."""
    from timm.models import eva, vision_transformer

    if "dinov2" in name:
        return vision_transformer.checkpoint_filter_fn(dict(meta), model)
    return eva.checkpoint_filter_fn(dict(meta), model)


def save(state: dict[str, torch.Tensor], path) -> str:
    state = {k: v.contiguous().clone() for k, v in state.items()}
    if str(path).endswith(".safetensors"):
        save_file(state, str(path))
    else:
        torch.save(state, str(path))
    return str(path)


def assert_same_state(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert sorted(got) == sorted(want)
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=1e-6, atol=1e-6, msg=key)


# ------------------------------------------------------------------------------------------------
# Key mapping, every architecture timm has (one block each)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", DINOV2 + DINOV3)
def test_meta_layout_converts_to_the_timm_state_dict(name):
    model = build(name, seed=1, depth=1)
    meta = to_meta(model, name)
    layout = "meta_dinov2" if "dinov2" in name else "meta_dinov3"
    assert detect_layout(meta) == layout and detect_layout(model.state_dict()) == "timm"
    got_layout, converted = convert(meta, model)
    assert got_layout == layout
    assert_same_state(converted, model.state_dict())
    # timm's own converter agrees (it keeps no key bias and, for bias-free models, drops the zero q / v biases).
    assert_same_state(timm_filter(meta, model, name), converted)
    # The advice for a mismatching file names this very model (q / v biases are random in the _qkvb models).
    what, suggested = suggest_timm_model(meta, layout)
    assert suggested == name and "1 blocks" in what


def test_training_checkpoint_nesting_and_chunked_blocks(tmp_path):
    """DINOv2 training checkpoints: {"teacher": {"backbone.blocks.{chunk}.{i}.*", "dino_head.*"}, ...}."""
    name = "vit_small_patch14_dinov2"
    model = build(name, seed=2, depth=4)
    meta = to_meta(model, name)
    chunked = {re.sub(r"^blocks\.(\d+)\.", lambda m: f"blocks.{int(m[1]) // 2}.{m[1]}.", k): v for k, v in meta.items()}
    nested = {f"backbone.{k}": v for k, v in chunked.items()} | {"dino_head.last_layer.weight": torch.ones(3, 2)}
    path = tmp_path / "teacher_checkpoint.pth"
    torch.save({"teacher": nested, "iteration": 12}, path)
    target = build(name, seed=3, depth=4)
    assert load_dino_weights(target, name, str(path), "evaluate.dinov2_weights") == "meta_dinov2"
    assert_same_state(target.state_dict(), model.state_dict())


# ------------------------------------------------------------------------------------------------
# Through the config keys: same forward as the original network
# ------------------------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_meta_dinov3_file_in_loss_dino_weights(tmp_path, suffix):
    name = "vit_small_patch16_dinov3"  # loss.dino_model's default: no q / v biases (Meta's are zero)
    source = build(name, seed=4)
    path = save(to_meta(source, name), tmp_path / f"dinov3_vits16_pretrain_lvd1689m-08c60483{suffix}")
    cfg = load_config("tiny", ["loss.dino_weight=500", f"loss.dino_weights={path}", f"loss.dino_model={name}"])
    backbone = ReconstructionLoss(cfg.loss, patch_size=16).dino.backbone
    x = torch.randn(2, 3, 64, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(backbone.forward_features(x), source.forward_features(x), rtol=0, atol=0)


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_meta_dinov2_file_in_evaluate_dinov2_weights(tmp_path, suffix):
    name = "vit_small_patch14_reg4_dinov2"
    source = build(name, seed=5, img_size=56)
    path = save(to_meta(source, name), tmp_path / f"dinov2_vits14_reg4_pretrain{suffix}")
    overrides = [f"evaluate.dinov2_model={name}", f"evaluate.dinov2_weights={path}", "evaluate.dinov2_size=56"]
    extractor = build_extractor("dinov2", load_config("tiny", overrides).evaluate)
    assert not extractor.random_init and extractor.weights == path
    x = torch.randn(2, 3, 56, 56, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(extractor.net.forward_features(x), source.forward_features(x))


def meta_interpolate_pos_encoding(pos, grid, offset, antialias):
    """Meta's DinoVisionTransformer.interpolate_pos_encoding (dinov2/models/vision_transformer.py), square grid."""
    side = int(math.sqrt(pos.shape[1] - 1))
    table = pos[:, 1:].reshape(1, side, side, -1).permute(0, 3, 1, 2)
    size = {"scale_factor": ((grid + offset) / side,) * 2} if offset else {"size": (grid, grid)}
    table = torch.nn.functional.interpolate(table, mode="bicubic", antialias=antialias, **size)
    return torch.cat([pos[:, :1], table.permute(0, 2, 3, 1).reshape(1, grid * grid, -1)], dim=1)


@pytest.mark.parametrize("name", ["vit_small_patch14_dinov2", "vit_small_patch14_reg4_dinov2"])
def test_meta_dinov2_position_table_is_resampled_as_meta_does(tmp_path, name):
    """Meta's DINOv2 files hold a 37 x 37 table (518 px); rFDD runs at 224 px. The table is resampled as Meta's
    model resamples it at 224 (the hub's settings: without registers offset 0.1 and no antialiasing, with
    registers the size and antialiasing), so the network is the one dgm-eval loads from Meta's hub."""
    meta = to_meta(build(name, seed=6, depth=1, img_size=518), name)
    path = save(meta, tmp_path / "dinov2_pretrain.pth")
    ours = timm.create_model(name, pretrained=False, num_classes=0, depth=1, img_size=224)
    load_dino_weights(ours, name, path, "evaluate.dinov2_weights")
    registers = "reg4" in name
    want = meta_interpolate_pos_encoding(meta["pos_embed"], 16, 0.0 if registers else 0.1, antialias=registers)
    if registers:  # timm folds the CLS position into the token and keeps patch positions only
        want = want[:, 1:]
    torch.testing.assert_close(ours.pos_embed, want, rtol=0, atol=0)
    # timm's own loader resamples alike for the register models only (size + antialias).
    theirs = timm.create_model(
        name, pretrained=True, num_classes=0, depth=1, img_size=224, pretrained_cfg_overlay={"file": path}
    )
    assert torch.allclose(ours.pos_embed, theirs.pos_embed) == registers


# ------------------------------------------------------------------------------------------------
# Errors that say what to change
# ------------------------------------------------------------------------------------------------
def test_wrong_model_for_the_file_names_the_model_to_set(tmp_path):
    path = save(to_meta(build("vit_small_patch14_reg4_dinov2", 7, depth=1), "dinov2"), tmp_path / "reg.pth")
    target = timm.create_model("vit_small_patch14_dinov2", pretrained=False, num_classes=0, depth=1, img_size=28)
    with pytest.raises(DinoWeightsError, match=r"set evaluate\.dinov2_model=vit_small_patch14_reg4_dinov2") as err:
        load_dino_weights(target, "vit_small_patch14_dinov2", path, "evaluate.dinov2_weights")
    assert "evaluate.dinov2_weights=" in str(err.value) and "unexpected ['reg_token']" in str(err.value)


def test_nonzero_qv_biases_need_the_qkvb_model(tmp_path):
    meta = to_meta(build("vit_small_patch16_dinov3_qkvb", 8, depth=1), "dinov3")  # random q / v biases
    path = save(meta, tmp_path / "dinov3.safetensors")
    target = timm.create_model("vit_small_patch16_dinov3", pretrained=False, num_classes=0, depth=1)
    with pytest.raises(DinoWeightsError, match=r"non-zero query / value biases.*set loss\.dino_model=.*_qkvb"):
        load_dino_weights(target, "vit_small_patch16_dinov3", path, "loss.dino_weights")


def test_unmappable_checkpoints_say_why(tmp_path):
    name = "vit_small_patch16_dinov3"
    target = timm.create_model(name, pretrained=False, num_classes=0, depth=1)
    meta = to_meta(build(name, 9, depth=1), name)

    def fails(state, match, key="loss.dino_weights"):
        path = save(state, tmp_path / "x.pth")
        with pytest.raises(DinoWeightsError, match=match):
            load_dino_weights(target, name, path, key)

    # Meta's ViT-L+/16 (width 1024, SwiGLU): timm has no such architecture.
    large_plus = {"cls_token": torch.zeros(1, 1, 1024), "storage_tokens": torch.zeros(1, 4, 1024)}
    large_plus |= {"blocks.0.norm1.weight": torch.zeros(1024), "blocks.0.mlp.w1.weight": torch.zeros(2, 2)}
    fails(large_plus, r"DINOv3 .*width 1024.*SwiGLU: timm [\d.]+ has no architecture for it, so it cannot be loaded")
    fails(meta | {"cls_norm.weight": torch.ones(384)}, "separate CLS / register norm")
    fails(meta | {"rope_embed.periods": meta["rope_embed.periods"] * 2}, "another RoPE base")
    fails({"stages.0.0.dwconv.weight": torch.zeros(1)}, "ConvNeXt")
    fails({"embeddings.cls_token": torch.zeros(1)}, "Hugging Face transformers")
    with pytest.raises(DinoWeightsError, match=r"loss\.dino_weights=.*does not exist"):
        load_dino_weights(target, name, str(tmp_path / "absent.pth"), "loss.dino_weights")


def test_a_hub_repository_name_is_not_taken_for_a_missing_file(monkeypatch):
    """`hf-hub:org/name` holds a slash: it must go to the hub (offline here: an error naming the key), not
    be reported as a missing local file."""
    import huggingface_hub.constants

    from vitok_core.losses import load_dino

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read at import: set it here too
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(RuntimeError, match=r"loss\.dino_weights='hf-hub:org/name': could not load") as caught:
        load_dino("vit_small_patch16_dinov3", "hf-hub:org/name", "loss.dino_weights")
    assert "does not exist" not in str(caught.value)
