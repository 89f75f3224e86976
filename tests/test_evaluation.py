"""The evaluation protocol (settings, bicubic baseline, reconstruction, accumulation) and the feature
extractors' definitions, at tiny size and without Ray."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from vitok_core.config import load_config
from vitok_core.demo import load_demo_images
from vitok_core.evaluation import (
    Accumulator,
    bicubic_down_up,
    center_crop,
    compression_ratio,
    describe_setting,
    reconstruct,
    reference_image,
    resize_longest_side,
    scores,
    setting_budget,
)
from vitok_core.features import DinoExtractor, InceptionExtractor, build_extractor, state_dict_sha256
from vitok_core.images import to_uint8
from vitok_core.losses import IMAGENET_MEAN, IMAGENET_STD, random_dino
from vitok_core.metrics import psnr
from vitok_core.model import build_autoencoder
from vitok_core.naflex import collate, patchify, unpatchify

SMALL_DINO = "vit_small_patch14_dinov2"


def test_center_crop_and_native_settings():
    photo = load_demo_images()[0][:, :300, :200]  # portrait 300 x 200
    crop = center_crop(photo, 128)
    assert crop.shape == (3, 128, 128)
    up = center_crop(photo[:, :60, :90], 128)  # ADM style: small images are resized up
    assert up.shape == (3, 128, 128)
    native = {"name": "n", "size": 160, "mode": "native", "budget": 0}
    assert setting_budget(native, 16) == 100
    ref = reference_image(photo, native, 16)
    h, w = ref.shape[-2:]
    assert (h // 16) * (w // 16) <= 100 and abs(h / w - 1.5) < 0.1  # aspect kept, budget respected
    small = photo[:, :50, :70]
    assert torch.equal(reference_image(small, native, 16), small)  # never up-scaled
    with pytest.raises(ValueError, match="mode"):
        reference_image(photo, {**native, "mode": "zoom"}, 16)


def test_longest_side_setting_is_the_authors_resize():
    """The authors' eval_vae.py: resize_longest_side(S) on the decoded PIL image (torchvision's PIL path,
    Lanczos), to_tensor, normalise to [-1, 1]; their patchify's (S/p)^2 cap does not bind when p divides S."""
    import torchvision.transforms.functional as TF
    from PIL import Image

    photo = load_demo_images()[0][:, :300, :200]  # portrait 300 x 200, 8-bit values
    setting = {"name": "l", "size": 160, "mode": "longest_side", "budget": 0}
    ref = reference_image(photo, setting, 16)
    assert ref.shape == (3, 160, 107)  # round(200 * 160 / 300) = 107: not a multiple of 16, the model pads
    theirs = TF.resize(Image.fromarray(to_uint8(photo)), [160, 107], TF.InterpolationMode.LANCZOS, antialias=True)
    want = TF.normalize(TF.to_tensor(theirs), [0.5] * 3, [0.5] * 3)
    torch.testing.assert_close(ref, want, rtol=0, atol=1e-6)
    small = photo[:, :120, :90]
    assert torch.equal(reference_image(small, setting, 16), small)  # never up-scaled
    landscape = photo.transpose(1, 2)  # 200 x 300: the width is the longest side
    assert resize_longest_side(landscape, 160).shape == (3, 107, 160)
    # A size that p does not divide: the token cap (100 // 16)^2 = 36 binds after the resize, as in patchify.
    square = reference_image(photo[:, :200, :200], {**setting, "size": 100}, 16)
    assert square.shape == (3, 96, 96)
    assert "Lanczos" in describe_setting(setting, 16) and "never up" in describe_setting(setting, 16)
    assert "fit 100 p16 tokens" in describe_setting({**setting, "mode": "native"}, 16)
    with pytest.raises(ValueError, match="longest_side"):
        describe_setting({**setting, "mode": "zoom"}, 16)


def test_bicubic_baseline_at_the_autoencoder_compression():
    assert compression_ratio(16, 64) == 12 and compression_ratio(16, 16) == 48
    photo = load_demo_images()[1][:, :97, :131]  # odd size: the output keeps it
    mild, hard = bicubic_down_up(photo, 4.0), bicubic_down_up(photo, 48.0)
    assert mild.shape == hard.shape == photo.shape
    assert psnr(mild, photo) > psnr(hard, photo) + 2  # more compression, more loss
    flat = torch.full((3, 40, 56), 0.25)
    torch.testing.assert_close(bicubic_down_up(flat, 12.0), flat)


def test_reconstruct_equals_the_model_on_each_image():
    torch.manual_seed(0)
    model = build_autoencoder("Tid2-Tid4/1x16x16").eval()
    photos = load_demo_images()
    images = [photos[0][:, :64, :80], photos[1][:, :48, :48], photos[2][:, :64, :80]]  # two grids
    out = reconstruct(model, images, batch_size=2)
    for image, recon in zip(images, out, strict=True):
        batch = collate([patchify(image, 16)])
        with torch.no_grad():
            want = unpatchify(model(batch)["patches"], batch, 16)[0].clamp(-1, 1)
        assert recon.shape == image.shape
        torch.testing.assert_close(recon, want, rtol=1e-4, atol=1e-4)
    values = scores(out, images)
    assert len(values["psnr"]) == 3 and values["psnr"][0] == pytest.approx(psnr(out[0], images[0]))


def test_accumulator_merges_in_any_block_split():
    rng = np.random.default_rng(0)
    ref, rec = rng.normal(size=(40, 8)), rng.normal(loc=0.5, size=(40, 8))
    one, many = Accumulator(), Accumulator()
    one.add_features("s", "reference", "x", ref)
    one.add_features("s", "ae", "x", rec)
    for i in range(0, 40, 7):
        many.add_features("s", "reference", "x", ref[i : i + 7])
        many.add_features("s", "ae", "x", rec[i : i + 7])
    a, b = one.distance(("s", "reference"), ("s", "ae"), "x"), many.distance(("s", "reference"), ("s", "ae"), "x")
    assert a == pytest.approx(b, rel=1e-9) and a > 0.1
    assert one.distance(("s", "reference"), ("s", "missing"), "x") is None
    many.add_scores("s", "ae", {"psnr": [10.0, 20.0], "ssim": [0.5, 0.7]})
    assert many.mean_score("s", "ae", "psnr") == 15.0 and many.mean_score("s", "bicubic", "psnr") is None


def test_inception_extractor_is_the_fid_network():
    extractor = InceptionExtractor()
    photos = [to_uint8(p[:, :150, :210]) for p in load_demo_images()[:2]]
    feats = extractor(photos)
    assert feats.shape == (2, 2048) and torch.isfinite(feats).all() and (feats >= 0).all()  # pool3 after ReLU
    assert extractor.describe()["weights_sha256"] == InceptionExtractor().describe()["weights_sha256"]
    assert not extractor.random_init and extractor.resolution == 299


def test_dino_extractor_definitions_weights_and_fallback(tmp_path):
    photos = [to_uint8(p[:, :120, :90]) for p in load_demo_images()[:3]]
    random_a = DinoExtractor("dinov2", SMALL_DINO, "", 56, allow_random_init=False)
    random_b = DinoExtractor("dinov2", SMALL_DINO, "", 56, allow_random_init=False)
    assert random_a.random_init and random_a.describe()["weights_sha256"] == random_b.describe()["weights_sha256"]
    torch.testing.assert_close(random_a(photos), random_b(photos))  # every actor builds the same network
    assert random_a(photos).shape == (3, 384)

    # A local weights file is loaded (not random) and its hash names those weights.
    torch.manual_seed(5)
    source = random_dino(SMALL_DINO, img_size=56)
    path = tmp_path / "dino.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    loaded = DinoExtractor("dinov2", SMALL_DINO, str(path), 56, allow_random_init=False)
    assert not loaded.random_init and loaded.describe()["weights_sha256"] == state_dict_sha256(source)
    source.eval()
    x = torch.stack([torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in photos])
    x = torch.nn.functional.interpolate(x, size=(56, 56), mode="bicubic", antialias=True).clamp(0, 1)
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    with torch.no_grad():
        want = source.forward_features(x)[:, 0]  # the CLS token after the final norm
    torch.testing.assert_close(loaded(photos), want, rtol=1e-4, atol=1e-4)

    # Weights that cannot be loaded: an error naming the key, or random init when allowed (flagged).
    with pytest.raises(RuntimeError, match=r"evaluate\.dinov2_weights"):
        DinoExtractor("dinov2", SMALL_DINO, str(tmp_path / "absent.pth"), 56, allow_random_init=False)
    with pytest.warns(UserWarning, match="random-init"):
        fallback = DinoExtractor("dinov2", SMALL_DINO, str(tmp_path / "absent.pth"), 56, allow_random_init=True)
    assert fallback.random_init

    cfg = load_config("tiny", ["evaluate.dinov3_model=vit_small_patch16_dinov3", "evaluate.dinov3_weights=''"])
    dinov3 = build_extractor("dinov3", cfg.evaluate)
    assert dinov3.resolution == 512 and "CLS" in dinov3.definition and dinov3.random_init
