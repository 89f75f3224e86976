"""Autoencoder: sizes, published layout, RoPE, padding invariance, checkpoint I/O, bad input."""

from __future__ import annotations

import pytest
import torch

from vitok_core.checkpoint import load_published, read_part, save_published
from vitok_core.model import VariantError, build_autoencoder, count_parameters, parse_variant
from vitok_core.model.autoencoder import is_meta
from vitok_core.model.layers import apply_rope, rope_2d
from vitok_core.naflex import collate, patchify

TINY = "Tid2-Tid4/1x16x16"


def published_layout(enc: tuple[int, int, int, int], dec: tuple[int, int, int, int], p: int, c: int) -> dict:
    """Key -> shape of the published encoder/decoder safetensors, written from method.md's table
    ((width, depth, head_dim, swiglu hidden) per tower), independently of the model code."""
    pix = 3 * p * p
    layout = {}

    def blocks(prefix: str, width: int, depth: int, head_dim: int, hidden: int) -> None:
        for i in range(depth):
            b = f"{prefix}.{i}"
            layout[f"{b}.norm1.weight"] = (width,)
            layout[f"{b}.attn.qkv_proj.weight"] = (3 * width, width)
            layout[f"{b}.attn.out_proj.weight"] = (width, width)
            layout[f"{b}.attn.norm_q.weight"] = (head_dim,)
            layout[f"{b}.attn.norm_k.weight"] = (head_dim,)
            layout[f"{b}.ffn.fc1.weight"] = (2 * hidden, width)
            layout[f"{b}.ffn.fc2.weight"] = (width, hidden)
            layout[f"{b}.layer_scale.gamma"] = (width,)

    layout["patch_embed.weight"], layout["patch_embed.bias"] = (enc[0], pix), (enc[0],)
    blocks("encoder_blocks", *enc)
    layout["to_code.weight"], layout["to_code.bias"] = (c, enc[0]), (c,)
    layout["decoder_embed.weight"], layout["decoder_embed.bias"] = (dec[0], c), (dec[0],)
    blocks("decoder_blocks", *dec)
    layout["to_pixels.weight"], layout["to_pixels.bias"] = (pix, dec[0]), (pix,)
    return layout


@pytest.mark.parametrize(
    ("variant", "enc_m", "dec_m", "layout"),
    [
        ("Ld4-Ld24/1x16x64", 51.3, 303.3, published_layout((1024, 4, 64, 2736), (1024, 24, 64, 2736), 16, 64)),
        ("Td4-T/1x16x64", 456.2, 4538.6, published_layout((3072, 4, 128, 8208), (3072, 40, 128, 8208), 16, 64)),
    ],
)
def test_published_sizes_and_layout_on_meta(variant, enc_m, dec_m, layout):
    with torch.device("meta"):
        model = build_autoencoder(variant)
    assert is_meta(model)
    counts = count_parameters(model)
    assert counts["encoder"] / 1e6 == pytest.approx(enc_m, rel=1e-3)
    assert counts["decoder"] / 1e6 == pytest.approx(dec_m, rel=1e-3)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == layout


def test_decoder_scaling_sizes():
    # The paper's decoder-scaling study: B ~88M ... T ~4.5B decoders.
    sizes = {}
    for key in "BLGT":
        with torch.device("meta"):
            sizes[key] = count_parameters(build_autoencoder(f"Ld4-{key}/1x16x64"))["decoder"] / 1e6
    assert sizes["B"] == pytest.approx(88, rel=0.05)
    assert sizes["T"] == pytest.approx(4538.6, rel=1e-3)
    assert sizes["B"] < sizes["L"] < sizes["G"] < sizes["T"]


def test_variant_parser():
    spec = parse_variant("Ld4-Ld24/1x16x64")
    assert (spec.encoder.width, spec.encoder.depth, spec.encoder.heads) == (1024, 4, 16)
    assert (spec.decoder.width, spec.decoder.depth) == (1024, 24)
    assert (spec.patch_size, spec.channels, spec.compression_ratio) == (16, 64, 12.0)
    spec = parse_variant("Td4-T/1x16x64")
    assert (spec.encoder.width, spec.encoder.depth, spec.decoder.depth, spec.decoder.head_dim) == (3072, 4, 40, 128)
    assert parse_variant("Tid2-Tid4/1x16x16").encoder.width == 192  # "Ti" is not "T" + junk
    assert parse_variant("Ld4-L/1x32x128").compression_ratio == 24.0


@pytest.mark.parametrize(
    "bad",
    ["", "Ld4-Ld24", "X-L/1x16x64", "Ld4-Ld24/2x16x64", "Ld0-L/1x16x64", "Ld4-Ld24/1x16", "ld4-Ld24/1x16x64", 42],
)
def test_variant_parser_rejects(bad):
    with pytest.raises(VariantError, match="variant"):
        parse_variant(bad)


def test_rope_scores_depend_only_on_relative_offsets():
    torch.manual_seed(0)
    head_dim = 64
    q, k = torch.randn(1, 1, 1, head_dim), torch.randn(1, 1, 1, head_dim)

    def score(qpos: tuple[int, int], kpos: tuple[int, int]) -> float:
        rq = rope_2d(torch.tensor([[qpos[0]]]), torch.tensor([[qpos[1]]]), head_dim)
        rk = rope_2d(torch.tensor([[kpos[0]]]), torch.tensor([[kpos[1]]]), head_dim)
        return float((apply_rope(q.double(), rq) * apply_rope(k.double(), rk)).sum())

    base = score((3, 5), (7, 2))
    for shift in [(1, 0), (0, 1), (10, -4), (-3, 20), (50, 50)]:
        moved = score((3 + shift[0], 5 + shift[1]), (7 + shift[0], 2 + shift[1]))
        assert moved == pytest.approx(base, rel=1e-5)  # angles are fp32
    # Rows and columns are distinct axes: transposing the offset changes the score.
    assert score((0, 0), (4, 1)) != pytest.approx(score((0, 0), (1, 4)), abs=1e-6)


def _image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.rand(3, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


@pytest.mark.parametrize("local_window", [None, 1])
def test_padding_does_not_change_valid_outputs(local_window):
    torch.manual_seed(0)
    model = build_autoencoder(TINY, layer_scale_init=0.5, local_window=local_window).eval()
    small, large = patchify(_image(40, 70, 1), 16), patchify(_image(100, 130, 2), 16)
    with torch.no_grad():
        alone = model(collate([small]))
        mixed_batch = collate([large, small])
        mixed = model(mixed_batch)
    n = small["patches"].shape[0]
    assert not mixed_batch["patch_mask"][1].all()  # the small image really is padded here
    assert torch.isfinite(mixed["patches"]).all()  # padded queries compute finite garbage, never NaN
    torch.testing.assert_close(mixed["patches"][1, :n], alone["patches"][0], rtol=1e-5, atol=1e-5)


def test_local_window_covering_the_grid_equals_full_attention():
    torch.manual_seed(0)
    full = build_autoencoder(TINY, layer_scale_init=0.5).eval()
    local = build_autoencoder(TINY, layer_scale_init=0.5, local_window=8).eval()
    local.load_state_dict(full.state_dict())
    narrow = build_autoencoder(TINY, layer_scale_init=0.5, local_window=1).eval()
    narrow.load_state_dict(full.state_dict())
    batch = collate([patchify(_image(64, 96, 3), 16)])  # 4x6 grid: radius 8 sees everything
    with torch.no_grad():
        torch.testing.assert_close(local(batch)["patches"], full(batch)["patches"], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(narrow(batch)["patches"], full(batch)["patches"], atol=1e-4)


def test_latents_are_per_token_standardised():
    model = build_autoencoder(TINY).eval()
    with torch.no_grad():
        z = model.encode(collate([patchify(_image(48, 80, 4), 16)]))["z"]
    assert z.shape == (1, 15, 16)
    torch.testing.assert_close(z.mean(-1), torch.zeros(1, 15), atol=1e-5, rtol=0)
    torch.testing.assert_close(z.var(-1, unbiased=False), torch.ones(1, 15), atol=1e-3, rtol=0)


def test_activation_checkpointing_gives_identical_gradients():
    torch.manual_seed(0)
    plain = build_autoencoder(TINY, layer_scale_init=0.5)
    ckpt = build_autoencoder(TINY, layer_scale_init=0.5, activation_checkpointing=True)
    ckpt.load_state_dict(plain.state_dict())
    batch = collate([patchify(_image(32, 48, 5), 16), patchify(_image(48, 32, 6), 16)])
    for model in (plain, ckpt):
        model.train()
        model(batch)["patches"].square().mean().backward()
    for (name, a), (_, b) in zip(plain.named_parameters(), ckpt.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-5, atol=1e-7, msg=name)


def test_safetensors_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    source = build_autoencoder(TINY)
    paths = save_published(source, str(tmp_path), metadata={"variant": TINY, "step": 7})
    assert set(paths) == {"encoder", "decoder"}
    assert set(read_part(str(tmp_path), "encoder")) == {
        k for k in source.state_dict() if k.startswith(("patch_embed", "encoder_blocks", "to_code"))
    }
    torch.manual_seed(1)
    target = build_autoencoder(TINY)
    load_published(target, str(tmp_path))
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    assert (tmp_path / "export.json").read_text().count(TINY) == 1


def test_load_published_is_strict(tmp_path):
    save_published(build_autoencoder(TINY), str(tmp_path))
    with pytest.raises(ValueError, match="shape"):
        load_published(build_autoencoder("Tid2-Tid4/1x16x32"), str(tmp_path))  # c 32 vs 16
    with pytest.raises(KeyError, match="missing"):
        load_published(build_autoencoder("Tid3-Tid4/1x16x16"), str(tmp_path))  # one more encoder block
    decoder_only = build_autoencoder(TINY)
    before = decoder_only.patch_embed.weight.clone()
    load_published(decoder_only, str(tmp_path), parts=["decoder"])
    assert torch.equal(decoder_only.patch_embed.weight, before)


def test_bad_model_inputs_raise_clear_errors():
    model = build_autoencoder(TINY)
    good = collate([patchify(_image(32, 32, 7), 16)])
    with pytest.raises(ValueError, match="patches"):
        model.encode({**good, "patches": good["patches"][..., :100]})
    with pytest.raises(ValueError, match="empty"):
        model.encode(
            {
                **good,
                "patches": good["patches"][:, :0],
                "patch_mask": good["patch_mask"][:, :0],
                "row_idx": good["row_idx"][:, :0],
                "col_idx": good["col_idx"][:, :0],
            }
        )
    with pytest.raises(KeyError, match="row_idx"):
        model.encode({k: v for k, v in good.items() if k != "row_idx"})
    with pytest.raises(ValueError, match="z"):
        model.decode({**good, "z": torch.zeros(1, 4, 8)})
