"""Tests for vitok_core.naflex (budget rule, patchify / unpatchify, collate, augmentation) and the schedules."""

import itertools
import math
import random

import pytest
import torch
import torch.nn.functional as F

from vitok_core.naflex import (
    bucket_of,
    collate,
    fit_to_token_budget,
    patchify,
    preprocess,
    random_augment,
    resize_to_budget,
    unpatchify,
    unpatchify_canvas,
)
from vitok_core.schedules import budget_at_step, lr_at_step

P = 16


def tokens_of(height, width, patch_size=P):
    return math.ceil(height / patch_size) * math.ceil(width / patch_size)


def rand_image(height, width, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(3, height, width, generator=gen) * 2 - 1


# --------------------------------------------------------------------------------------------------
# fit_to_token_budget / bucket_of
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "budget", "expected", "expected_tokens"),
    [
        (375, 500, 256, (208, 288), 234),
        (375, 500, 1024, (375, 500), 768),
        (1080, 1920, 256, (192, 336), 252),
        (1080, 1920, 1024, (384, 672), 1008),
    ],
)
def test_fit_to_token_budget_worked_examples(height, width, budget, expected, expected_tokens):
    size = fit_to_token_budget(height, width, P, budget)
    assert size == expected
    assert tokens_of(*size) == expected_tokens


@pytest.mark.parametrize(
    ("height", "width", "budget"),
    [(1, 1, 1), (5, 7, 1), (16, 16, 1), (100, 60, 256), (256, 256, 256), (15, 4000, 256), (512, 512, 1024)],
)
def test_fit_to_token_budget_never_upscales_small_images(height, width, budget):
    assert tokens_of(height, width) <= budget
    assert fit_to_token_budget(height, width, P, budget) == (height, width)


@pytest.mark.parametrize(
    ("height", "width", "expected"),
    [(16, 100000, (16, 4096)), (100000, 16, (4096, 16)), (1, 100000, (1, 4096)), (100000, 1, (4096, 1))],
)
def test_fit_to_token_budget_extreme_aspect_ratio(height, width, expected):
    size = fit_to_token_budget(height, width, P, 256)
    assert size == expected
    assert tokens_of(*size) <= 256


def test_fit_to_token_budget_random_sweep():
    rng = random.Random(1234)
    fixed = [(16, 100000), (100000, 16), (1, 100000), (100000, 1), (99999, 99999), (17, 17), (1, 1)]
    cases = []
    for _ in range(1500):
        # Log-uniform sides give many extreme aspect ratios.
        h = max(1, round(math.exp(rng.uniform(0, math.log(100000)))))
        w = max(1, round(math.exp(rng.uniform(0, math.log(100000)))))
        cases.append((h, w))
    cases += fixed
    for h, w in cases:
        for patch_size in (1, 8, 14, 16, 32):
            for budget in (1, 2, 3, 16, 64, 256, 1000, 1024, 4096):
                new_h, new_w = fit_to_token_budget(h, w, patch_size, budget)
                assert 1 <= new_h <= h and 1 <= new_w <= w, (h, w, patch_size, budget, new_h, new_w)
                assert tokens_of(new_h, new_w, patch_size) <= budget, (h, w, patch_size, budget, new_h, new_w)
                if tokens_of(h, w, patch_size) <= budget:
                    assert (new_h, new_w) == (h, w)
                # Portrait / landscape symmetry.
                assert fit_to_token_budget(w, h, patch_size, budget) == (new_w, new_h)


@pytest.mark.parametrize(("height", "width"), [(375, 500), (1080, 1920), (16, 100000), (37, 53), (5, 7), (4000, 3)])
@pytest.mark.parametrize("budget", [1, 64, 256, 1024])
def test_bucket_of_matches_fit(height, width, budget):
    new_h, new_w = fit_to_token_budget(height, width, P, budget)
    rows, cols = bucket_of(height, width, P, budget)
    assert (rows, cols) == (math.ceil(new_h / P), math.ceil(new_w / P))
    assert rows * cols <= budget
    # The grid of the preprocessed image is the bucket.
    sample = preprocess(
        rand_image(height, width) if height * width < 10**6 else torch.zeros(3, height, width), P, budget
    )
    assert tuple(sample["grid"].tolist()) == (rows, cols)
    assert sample["patches"].shape[0] == rows * cols


def test_bucket_of_examples():
    assert bucket_of(375, 500, P, 256) == (13, 18)
    assert bucket_of(1080, 1920, P, 1024) == (24, 42)


# --------------------------------------------------------------------------------------------------
# patchify / unpatchify
# --------------------------------------------------------------------------------------------------

SIZES = [(64, 64), (64, 1000), (1000, 64), (37, 53), (5, 7), (16, 16), (17, 1)]


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_patchify_fields(height, width):
    image = rand_image(height, width)
    sample = patchify(image, P)
    rows, cols = math.ceil(height / P), math.ceil(width / P)
    assert sample["patches"].shape == (rows * cols, 3 * P * P)
    assert sample["patch_mask"].dtype == torch.bool and bool(sample["patch_mask"].all())
    assert sample["patch_mask"].shape == (rows * cols,)
    assert sample["grid"].tolist() == [rows, cols]
    assert sample["orig_size"].tolist() == [height, width]
    expected_r = [r for r in range(rows) for _ in range(cols)]
    expected_c = [c for _ in range(rows) for c in range(cols)]
    assert sample["row_idx"].tolist() == expected_r
    assert sample["col_idx"].tolist() == expected_c


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_patchify_matches_unfold_of_zero_padded_image(height, width):
    image = rand_image(height, width)
    sample = patchify(image, P)
    rows, cols = math.ceil(height / P), math.ceil(width / P)
    padded = torch.zeros(3, rows * P, cols * P)
    padded[:, :height, :width] = image
    expected = F.unfold(padded[None], kernel_size=P, stride=P)[0].T
    assert torch.equal(sample["patches"], expected)


def test_patch_vector_order_is_channel_major():
    # element index = channel * p * p + y * p + x, patches in row-major grid order.
    p = 4
    image = torch.arange(3 * 8 * 12, dtype=torch.float32).reshape(3, 8, 12)
    sample = patchify(image, p)
    for n, (r, c) in enumerate(zip(sample["row_idx"].tolist(), sample["col_idx"].tolist(), strict=True)):
        for ch in range(3):
            for y in range(p):
                for x in range(p):
                    assert sample["patches"][n, ch * p * p + y * p + x] == image[ch, r * p + y, c * p + x]


def test_patchify_pads_with_zero():
    image = torch.full((3, 5, 7), 0.75)
    sample = patchify(image, P)
    patch = sample["patches"][0].reshape(3, P, P)
    assert torch.equal(patch[:, :5, :7], image)
    assert torch.count_nonzero(patch[:, 5:, :]) == 0
    assert torch.count_nonzero(patch[:, :, 7:]) == 0
    # -1 (black) images are still padded with 0, not with the image value.
    sample = patchify(torch.full((3, 20, 20), -1.0), P)
    assert (sample["patches"] == 0).sum() == 3 * (32 * 32 - 20 * 20)


@pytest.mark.parametrize(("height", "width"), SIZES)
def test_patchify_unpatchify_round_trip_single(height, width):
    image = rand_image(height, width, seed=height * 1000 + width)
    sample = patchify(image, P)
    (out,) = unpatchify(sample["patches"], sample, P)
    assert out.shape == image.shape
    assert torch.equal(out, image)


@pytest.mark.parametrize(
    ("sizes", "max_tokens"),
    [
        pytest.param(SIZES, None, id="all-sizes"),
        # Without the tall image the canvas stays small, so the extra-padding variant is cheap.
        pytest.param([s for s in SIZES if s != (1000, 64)], 300, id="max-tokens"),
    ],
)
def test_patchify_unpatchify_round_trip_batch_of_mixed_sizes(sizes, max_tokens):
    images = [rand_image(h, w, seed=i) for i, (h, w) in enumerate(sizes)]
    batch = collate([patchify(im, P) for im in images], max_tokens=max_tokens)
    outs = unpatchify(batch["patches"], batch, P)
    assert len(outs) == len(images)
    for out, image in zip(outs, images, strict=True):
        assert out.shape == image.shape
        assert torch.equal(out, image)


def test_unpatchify_canvas_layout_uses_each_sample_grid():
    wide = rand_image(16, 160, seed=1)  # grid 1 x 10
    tall = rand_image(160, 16, seed=2)  # grid 10 x 1
    batch = collate([patchify(wide, P), patchify(tall, P)])
    canvas = unpatchify_canvas(batch["patches"], batch, P)
    assert canvas.shape == (2, 3, 160, 160)
    assert torch.equal(canvas[0, :, :16, :], wide)
    assert torch.count_nonzero(canvas[0, :, 16:, :]) == 0
    assert torch.equal(canvas[1, :, :, :16], tall)
    assert torch.count_nonzero(canvas[1, :, :, 16:]) == 0


@pytest.mark.parametrize("garbage", [float("nan"), 1e30, -1e30, float("inf")])
def test_unpatchify_canvas_ignores_padded_tokens(garbage):
    images = [rand_image(h, w, seed=i) for i, (h, w) in enumerate([(64, 1000), (37, 53), (5, 7)])]
    batch = collate([patchify(im, P) for im in images], max_tokens=300)
    assert not bool(batch["patch_mask"].all())
    clean = unpatchify_canvas(batch["patches"], batch, P)
    dirty_patches = batch["patches"].clone()
    dirty_patches[~batch["patch_mask"]] = garbage
    dirty = unpatchify_canvas(dirty_patches, batch, P)
    assert torch.isfinite(dirty).all()
    assert torch.equal(dirty, clean)
    for out, image in zip(unpatchify(dirty_patches, batch, P), images, strict=True):
        assert torch.equal(out, image)


# --------------------------------------------------------------------------------------------------
# collate
# --------------------------------------------------------------------------------------------------


def test_collate_pads_with_masked_tokens():
    samples = [patchify(rand_image(h, w), P) for h, w in [(64, 64), (37, 53), (5, 7)]]
    lengths = [s["patches"].shape[0] for s in samples]
    assert lengths == [16, 12, 1]
    batch = collate(samples)
    assert batch["patches"].shape == (3, 16, 3 * P * P)
    for i, n in enumerate(lengths):
        assert batch["patch_mask"][i, :n].all()
        assert not batch["patch_mask"][i, n:].any()
        assert torch.count_nonzero(batch["patches"][i, n:]) == 0
        assert torch.count_nonzero(batch["row_idx"][i, n:]) == 0
        assert torch.count_nonzero(batch["col_idx"][i, n:]) == 0
        assert torch.equal(batch["patches"][i, :n], samples[i]["patches"])
        assert torch.equal(batch["row_idx"][i, :n], samples[i]["row_idx"])
        assert torch.equal(batch["col_idx"][i, :n], samples[i]["col_idx"])
    assert batch["grid"].tolist() == [[4, 4], [3, 4], [1, 1]]
    assert batch["orig_size"].tolist() == [[64, 64], [37, 53], [5, 7]]


def test_collate_max_tokens_pads_further():
    samples = [patchify(rand_image(h, w), P) for h, w in [(64, 64), (5, 7)]]
    batch = collate(samples, max_tokens=40)
    for key in ("patches", "patch_mask", "row_idx", "col_idx"):
        assert batch[key].shape[:2] == (2, 40)
    assert batch["patch_mask"].sum(1).tolist() == [16, 1]


def test_collate_same_bucket_needs_no_padding():
    samples = [preprocess(rand_image(h, w), P, 256) for h, w in [(375, 500), (376, 501), (750, 1000)]]
    assert len({tuple(s["grid"].tolist()) for s in samples}) == 1
    batch = collate(samples)
    assert bool(batch["patch_mask"].all())


def test_collate_sample_longer_than_max_tokens_raises():
    samples = [patchify(rand_image(64, 64), P), patchify(rand_image(5, 7), P)]
    with pytest.raises(ValueError, match="max_tokens"):
        collate(samples, max_tokens=15)


def test_collate_empty_raises():
    with pytest.raises(ValueError, match="empty"):
        collate([])


# --------------------------------------------------------------------------------------------------
# resize_to_budget / preprocess
# --------------------------------------------------------------------------------------------------


def step_edge(height, width):
    """-1 left, +1 right: bicubic ringing overshoots [-1, 1] next to the edge by about 0.02."""
    image = torch.full((3, height, width), -1.0)
    image[..., width // 2 :] = 1.0
    return image


def float_bicubic(image, size):
    """The reference preprocessing's resize: torch bicubic, antialiased, on the float image, nothing else."""
    return F.interpolate(image[None].float(), size=size, mode="bicubic", antialias=True, align_corners=False)[0]


@pytest.mark.parametrize(("height", "width", "budget"), [(375, 500, 256), (1080, 1920, 256), (100, 3000, 64)])
def test_resize_to_budget_size_and_no_clamp(height, width, budget):
    # Bicubic ringing at a sharp edge overshoots [-1, 1]; the overshoot is kept, as the reference keeps it.
    image = step_edge(height, width)
    out = resize_to_budget(image, P, budget)
    size = fit_to_token_budget(height, width, P, budget)
    assert tuple(out.shape) == (3, *size)
    assert out.dtype == image.dtype
    assert torch.equal(out, float_bicubic(image, size))
    assert out.abs().max() > 1.0


def test_model_input_is_the_float_bicubic_resize_without_clamp():
    """What the encoder sees (preprocess, as cache_latents / evaluate / the loader build it) equals a float
    bicubic antialiased resize of the float image: no clamp, no uint8 round trip, from a tensor or a photo."""
    from PIL import Image

    from vitok_core.demo import load_demo_images
    from vitok_core.images import to_tensor, to_uint8

    photo = Image.fromarray(to_uint8(load_demo_images()[0]))
    image = to_tensor(photo)
    size = fit_to_token_budget(*image.shape[-2:], P, 64)
    assert size != tuple(image.shape[-2:])  # the budget resize really runs
    want = patchify(float_bicubic(image, size), P)["patches"]
    for given in (image, photo):
        assert torch.equal(preprocess(given, P, 64)["patches"], want)
    overshoot = step_edge(96, 160)
    got = preprocess(overshoot, P, 16)["patches"]
    assert torch.equal(got, patchify(float_bicubic(overshoot, (48, 80)), P)["patches"]) and got.abs().max() > 1.0


def test_resize_to_budget_keeps_image_inside_budget():
    image = rand_image(375, 500)
    out = resize_to_budget(image, P, 1024)
    assert torch.equal(out, image)
    small = rand_image(5, 7)
    assert torch.equal(resize_to_budget(small, P, 1), small)


def test_resize_to_budget_constant_image_stays_constant():
    image = torch.full((3, 1080, 1920), 0.25)
    out = resize_to_budget(image, P, 256)
    assert out.shape == (3, 192, 336)
    assert torch.allclose(out, torch.full_like(out, 0.25), atol=1e-5)


# --------------------------------------------------------------------------------------------------
# random_augment
# --------------------------------------------------------------------------------------------------


def test_random_augment_is_deterministic_for_a_seed():
    image = rand_image(90, 120)
    outs_a = [random_augment(image, torch.Generator().manual_seed(s), rrc_prob=0.5) for s in range(12)]
    outs_b = [random_augment(image, torch.Generator().manual_seed(s), rrc_prob=0.5) for s in range(12)]
    for a, b in zip(outs_a, outs_b, strict=True):
        assert torch.equal(a, b)
    # Across seeds the augmentation actually varies (both the crop and the flip branches are taken).
    assert len({tuple(o.shape) for o in outs_a}) == 2
    assert any(not torch.equal(a, b) for a, b in itertools.pairwise(outs_a))


@pytest.mark.parametrize(("height", "width"), [(90, 120), (300, 40), (40, 300), (10, 10)])
@pytest.mark.parametrize("rrc_size", [32, 64])
def test_random_augment_rrc_output_size(height, width, rrc_size):
    image = rand_image(height, width)
    for seed in range(5):
        out = random_augment(image, torch.Generator().manual_seed(seed), rrc_prob=1.0, rrc_size=rrc_size)
        assert out.shape == (3, rrc_size, rrc_size)
        assert out.min() >= -1.0 and out.max() <= 1.0


def test_random_augment_flip_only():
    image = rand_image(37, 53)
    for seed in range(5):
        out = random_augment(image, torch.Generator().manual_seed(seed), rrc_prob=0.0, flip_prob=1.0)
        assert torch.equal(out, image.flip(-1))


def test_random_augment_identity():
    image = rand_image(37, 53)
    for seed in range(5):
        out = random_augment(image, torch.Generator().manual_seed(seed), rrc_prob=0.0, flip_prob=0.0)
        assert torch.equal(out, image)


# --------------------------------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------------------------------

BAD_IMAGES = [
    pytest.param(torch.zeros(3, 0, 10), "zero size", id="zero-height"),
    pytest.param(torch.zeros(3, 10, 0), "zero size", id="zero-width"),
    pytest.param(torch.zeros(1, 10, 10), r"\[3, H, W\]", id="one-channel"),
    pytest.param(torch.zeros(4, 10, 10), r"\[3, H, W\]", id="four-channel"),
    pytest.param(torch.zeros(10, 10), r"\[3, H, W\]", id="2d"),
    pytest.param(torch.zeros(3, 10, 10, dtype=torch.uint8), "floating point", id="uint8"),
    pytest.param(torch.zeros(3, 10, 10, dtype=torch.int64), "floating point", id="int64"),
]

IMAGE_FUNCTIONS = {
    "patchify": lambda im: patchify(im, P),
    "resize_to_budget": lambda im: resize_to_budget(im, P, 256),
    "preprocess": lambda im: preprocess(im, P, 256),
    "random_augment": lambda im: random_augment(im, torch.Generator().manual_seed(0)),
}


@pytest.mark.parametrize(("image", "match"), BAD_IMAGES)
@pytest.mark.parametrize("name", sorted(IMAGE_FUNCTIONS))
def test_bad_image_tensor_raises(name, image, match):
    with pytest.raises(ValueError, match=match):
        IMAGE_FUNCTIONS[name](image)


@pytest.mark.parametrize(("height", "width"), [(0, 10), (10, 0), (0, 0), (-5, 10)])
def test_fit_zero_size_raises(height, width):
    with pytest.raises(ValueError, match="zero size"):
        fit_to_token_budget(height, width, P, 256)


@pytest.mark.parametrize("patch_size", [0, -1])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda ps: fit_to_token_budget(64, 64, ps, 256), id="fit_to_token_budget"),
        pytest.param(lambda ps: bucket_of(64, 64, ps, 256), id="bucket_of"),
        pytest.param(lambda ps: resize_to_budget(rand_image(64, 64), ps, 256), id="resize_to_budget"),
        pytest.param(lambda ps: preprocess(rand_image(64, 64), ps, 256), id="preprocess"),
        pytest.param(lambda ps: patchify(rand_image(64, 64), ps), id="patchify"),
    ],
)
def test_bad_patch_size_raises(call, patch_size):
    with pytest.raises(ValueError, match="patch_size"):
        call(patch_size)


@pytest.mark.parametrize("budget", [0, -1])
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda t: fit_to_token_budget(64, 64, P, t), id="fit_to_token_budget"),
        pytest.param(lambda t: bucket_of(64, 64, P, t), id="bucket_of"),
        pytest.param(lambda t: resize_to_budget(rand_image(64, 64), P, t), id="resize_to_budget"),
        pytest.param(lambda t: preprocess(rand_image(64, 64), P, t), id="preprocess"),
    ],
)
def test_bad_token_budget_raises(call, budget):
    with pytest.raises(ValueError, match="token budget"):
        call(budget)


# --------------------------------------------------------------------------------------------------
# schedules
# --------------------------------------------------------------------------------------------------


def test_budget_at_step_exact_switch():
    budgets = [budget_at_step(step, 100, [256, 1024], [0.9]) for step in range(100)]
    assert budgets == [256] * 90 + [1024] * 10


def test_budget_at_step_three_stages():
    budgets = [budget_at_step(step, 10, [64, 256, 1024], [0.5, 0.8]) for step in range(10)]
    assert budgets == [64] * 5 + [256] * 3 + [1024] * 2


def test_budget_at_step_single_budget():
    assert {budget_at_step(step, 50, [256], []) for step in range(50)} == {256}


@pytest.mark.parametrize(("budgets", "fractions"), [([256, 1024], []), ([256, 1024], [0.5, 0.9]), ([256], [0.9])])
def test_budget_at_step_mismatched_lengths_raise(budgets, fractions):
    with pytest.raises(ValueError, match="switch fractions"):
        budget_at_step(0, 100, budgets, fractions)


def test_lr_warmup_is_linear_and_reaches_peak():
    peak, warmup, total = 3e-4, 10, 100
    lrs = [lr_at_step(step, total, peak, warmup) for step in range(warmup)]
    diffs = [b - a for a, b in itertools.pairwise(lrs)]
    assert all(d > 0 for d in diffs)
    assert all(math.isclose(d, peak / warmup, rel_tol=1e-9) for d in diffs)
    assert math.isclose(lrs[-1], peak, rel_tol=1e-12)
    assert math.isclose(lr_at_step(warmup, total, peak, warmup), peak, rel_tol=1e-12)
    assert 0 < lrs[0] <= peak / warmup + 1e-15


@pytest.mark.parametrize("min_lr", [0.0, 1e-5])
def test_lr_cosine_decays_monotonically_to_min_lr(min_lr):
    peak, warmup, total = 3e-4, 10, 100
    lrs = [lr_at_step(step, total, peak, warmup, min_lr) for step in range(warmup, total + 1)]
    assert all(b < a for a, b in itertools.pairwise(lrs))
    assert math.isclose(lrs[-1], min_lr, abs_tol=1e-15)
    assert all(lr >= min_lr for lr in lrs)
    # Half way through the decay the cosine is at the mid point.
    mid = lr_at_step(warmup + (total - warmup) // 2, total, peak, warmup, min_lr)
    assert math.isclose(mid, (peak + min_lr) / 2, rel_tol=1e-9)
    # Past the end it stays at min_lr.
    assert math.isclose(lr_at_step(total + 50, total, peak, warmup, min_lr), min_lr, abs_tol=1e-15)


def test_lr_without_warmup_starts_at_peak():
    assert lr_at_step(0, 100, 1e-3, 0) == pytest.approx(1e-3)
