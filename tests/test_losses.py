"""Losses: Charbonnier, tiles, SSIM, DINO perceptual (random-init timm backbone), the combined loss."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import save_file
from skimage.metrics import structural_similarity

from vitok_core.config import load_config
from vitok_core.demo import load_demo_images
from vitok_core.losses import (
    DinoPerceptualLoss,
    ReconstructionLoss,
    build_dino_backbone,
    charbonnier,
    crop_tiles,
    sample_tile_origins,
    ssim,
)
from vitok_core.model import build_autoencoder
from vitok_core.naflex import collate, patchify, unpatchify_canvas

DINO = "vit_small_patch16_dinov3"


@pytest.fixture(scope="module")
def random_dino() -> DinoPerceptualLoss:
    with pytest.warns(UserWarning, match="NOT a perceptual loss"):
        backbone = build_dino_backbone(DINO, "", pretrained=False)
    return DinoPerceptualLoss(backbone, input_size=64)


def test_charbonnier_known_values_and_mask():
    pred, target = torch.zeros(2, 3, 12), torch.zeros(2, 3, 12)
    mask = torch.ones(2, 3, dtype=torch.bool)
    eps = 1e-3
    assert charbonnier(pred, target, mask, eps).item() == pytest.approx(eps)  # identical: the eps floor
    pred[:] = 0.5
    assert charbonnier(pred, target, mask, eps).item() == pytest.approx(math.sqrt(0.25 + eps**2))
    # Padded tokens never count, whatever they hold; each image is averaged over its own valid tokens.
    mask[1, 2] = False
    pred[1, 2] = 1e6
    assert charbonnier(pred, target, mask, eps).item() == pytest.approx(math.sqrt(0.25 + eps**2))
    pred[0] = 0.0
    expected = (eps + math.sqrt(0.25 + eps**2)) / 2  # image 0 exact, image 1 off by 0.5: batch mean
    assert charbonnier(pred, target, mask, eps).item() == pytest.approx(expected)


def test_ssim_matches_scikit_image_on_a_real_photo():
    for photo in (load_demo_images()[1][:, :200, :300], load_demo_images()[1][:, :37, :91]):
        noise = torch.randn(photo.shape, generator=torch.Generator().manual_seed(0))
        noisy = (photo + 0.1 * noise).clamp(-1, 1)
        ours = ssim(photo[None], noisy[None]).item()
        reference = structural_similarity(
            photo.permute(1, 2, 0).numpy(),
            noisy.permute(1, 2, 0).numpy(),
            channel_axis=2,
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=2.0,
        )
        assert ours == pytest.approx(reference, abs=1e-4)  # same window, same border (valid positions only)
        assert ssim(photo[None], photo[None]).item() == pytest.approx(1.0, abs=1e-6)
    with pytest.raises(ValueError, match="smaller than"):
        ssim(torch.zeros(1, 3, 8, 64), torch.zeros(1, 3, 8, 64))


def test_tile_origins_stay_inside_the_original_extent():
    gen = torch.Generator().manual_seed(0)
    sizes = torch.tensor([[300, 500], [256, 256], [100, 700], [90, 60], [1000, 257]] * 40)
    tile = 256
    for _ in range(20):
        origins = sample_tile_origins(sizes, tile, gen)
        assert (origins >= 0).all()
        assert (origins + torch.minimum(sizes, torch.tensor(tile)) <= sizes).all()
    # The whole range of valid origins is reachable (uniform, not stuck at 0).
    origins = torch.stack([sample_tile_origins(torch.tensor([[300, 260]]), tile, gen)[0] for _ in range(400)])
    assert origins[:, 0].max() == 44 and origins[:, 0].min() == 0 and origins[:, 1].max() == 4


def test_crop_tiles_reads_only_the_original_extent():
    canvas = torch.arange(2 * 3 * 8 * 10, dtype=torch.float32).view(2, 3, 8, 10)
    sizes = torch.tensor([[8, 10], [5, 7]])  # image 1 is padded inside the canvas
    tiles = crop_tiles(canvas, sizes, torch.tensor([[2, 3], [0, 0]]), 6)
    assert torch.equal(tiles[0], canvas[0, :, 2:8, 3:9])
    assert torch.equal(tiles[1, :, :5, :6], canvas[1, :, :5, :6])
    assert (tiles[1, :, 5:, :] == -1).all() and (tiles[1, :, :, 6:] == -1).all()  # beyond h=5 / w=7: fill


def test_dino_loss_is_zero_for_identical_inputs_and_positive_otherwise(random_dino):
    x = torch.rand(2, 3, 64, 64) * 2 - 1
    assert random_dino(x, x).item() == pytest.approx(0.0, abs=1e-12)
    assert random_dino(x, x.flip(-1)).item() > 0
    assert len(random_dino.features(x)) == 12  # every block
    assert random_dino.features(x)[0].shape[1] == 1 + 4 + 16  # CLS + 4 registers + 4x4 patches


def test_dino_gradients_reach_the_decoder_not_the_backbone(random_dino):
    torch.manual_seed(0)
    model = build_autoencoder("Tid2-Tid4/1x16x16", layer_scale_init=0.1)
    batch = collate([patchify(torch.rand(3, 64, 80) * 2 - 1, 16), patchify(torch.rand(3, 48, 64) * 2 - 1, 16)])
    pred = unpatchify_canvas(model(batch)["patches"], batch, 16)
    target = unpatchify_canvas(batch["patches"], batch, 16)
    random_dino(pred, target).backward()
    decoder_grads = [p.grad for p in model.decoder_blocks.parameters()]
    assert all(g is not None for g in decoder_grads) and sum(g.abs().sum() for g in decoder_grads) > 0
    assert model.patch_embed.weight.grad.abs().sum() > 0  # and on into the encoder
    assert all(p.grad is None for p in random_dino.backbone.parameters())
    random_dino.train()
    assert not random_dino.backbone.training  # stays in eval mode whatever the trainer does


def test_dino_weights_load_from_a_local_file(tmp_path):
    torch.manual_seed(3)
    with pytest.warns(UserWarning):
        source = build_dino_backbone(DINO, "", pretrained=False)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = build_dino_backbone(DINO, str(path), pretrained=True)
    for key, value in source.state_dict().items():
        assert torch.equal(value, loaded.state_dict()[key]), key


def test_missing_dino_weights_file_names_the_setting(tmp_path):
    with pytest.raises(RuntimeError, match=r"loss\.dino_weights"):
        build_dino_backbone(DINO, str(tmp_path / "absent.safetensors"), pretrained=True)


def test_combined_loss_terms_and_weights(random_dino):
    cfg = load_config("tiny", ["loss.dino_weight=500", "loss.tile_size=64"]).loss
    loss_fn = ReconstructionLoss(cfg, patch_size=16, dino=random_dino)
    batch = collate([patchify(torch.rand(3, 70, 90) * 2 - 1, 16), patchify(torch.rand(3, 40, 40) * 2 - 1, 16)])
    same = loss_fn(batch["patches"], batch, torch.Generator().manual_seed(0))
    assert set(same) == {"loss", "charbonnier", "ssim", "dino"}
    assert same["charbonnier"].item() == pytest.approx(cfg.charbonnier_eps)
    assert same["ssim"].item() == pytest.approx(1.0, abs=1e-5)
    assert same["dino"].item() == pytest.approx(0.0, abs=1e-9)
    noisy = batch["patches"] + 0.2 * torch.randn(batch["patches"].shape, generator=torch.Generator().manual_seed(1))
    terms = loss_fn(noisy, batch, torch.Generator().manual_seed(0))
    expected = cfg.charbonnier_weight * terms["charbonnier"] + cfg.ssim_weight * (1 - terms["ssim"])
    expected = expected + cfg.dino_weight * terms["dino"]
    assert terms["loss"].item() == pytest.approx(expected.item(), rel=1e-6)
    assert terms["dino"].item() > 0 and terms["ssim"].item() < 1


def test_loss_without_tiles_when_ssim_and_dino_are_off():
    cfg = load_config("dec_B").loss
    loss_fn = ReconstructionLoss(cfg, patch_size=16)
    assert loss_fn.dino is None  # no backbone is built (nothing downloaded) when its weight is 0
    batch = collate([patchify(torch.rand(3, 32, 32) * 2 - 1, 16)])
    terms = loss_fn(batch["patches"] + 0.5, batch)
    assert set(terms) == {"loss", "charbonnier"}
    assert terms["loss"].item() == pytest.approx(math.sqrt(0.25 + 1e-6), rel=1e-5)
