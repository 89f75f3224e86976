"""Per-image ingest rules (no Ray): every malformed case, storage size, keep-or-re-encode."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.ingest_samples import make_malformed, reference_resize
from vitok_core.images import decode_image
from vitok_core.ingest import REJECT_REASONS, IngestRules, content_id, process_image, storage_size
from vitok_core.naflex import bucket_of

RULES = IngestRules(store_max_pixels=500_000, budgets=(256, 1024))


@pytest.fixture(scope="module")
def malformed(tmp_path_factory):
    root = tmp_path_factory.mktemp("malformed")
    return root, make_malformed(root)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def test_each_malformed_case_gets_its_outcome(malformed):
    root, expected = malformed
    assert len(expected) >= 13
    for name, want in expected.items():
        outcome = process_image((root / name).read_bytes(), RULES)
        got = "accepted" if outcome.accepted else outcome.reason
        assert got == want, f"{name}: {got} ({outcome.detail})"
        if not outcome.accepted:
            assert outcome.reason in REJECT_REASONS and outcome.detail and outcome.data == b""
            continue
        stored = decode_image(outcome.data)  # what a loader will see
        assert stored.size == (outcome.width, outcome.height)
        assert stored.mode == "RGB"
        reference = reference_resize(root / name, RULES.store_max_pixels)
        assert stored.size == reference.size
        assert _psnr(np.asarray(stored), np.asarray(reference)) > 30, name
        assert outcome.buckets == {t: bucket_of(outcome.height, outcome.width, 16, t) for t in (256, 1024)}


def test_exif_rotation_and_animation_details(malformed):
    root, _ = malformed
    rotated = process_image((root / "exif_rotated.jpg").read_bytes(), RULES)
    assert (rotated.orig_width, rotated.orig_height) == (200, 300)  # stored upright
    animated = process_image((root / "animated.gif").read_bytes(), RULES)
    assert "first of 3 frames" in animated.detail


def test_bomb_is_rejected_from_the_header_alone(malformed):
    root, _ = malformed
    outcome = process_image((root / "bomb.png").read_bytes(), RULES)
    assert outcome.reason == "too_many_pixels" and (outcome.orig_width, outcome.orig_height) == (50000, 50000)
    assert Image.MAX_IMAGE_PIXELS is not None  # Pillow's global guard is restored afterwards


def _jpeg(width: int, height: int) -> bytes:
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def test_small_jpeg_is_kept_byte_for_byte_and_large_one_is_downscaled():
    small = _jpeg(400, 300)
    kept = process_image(small, RULES)
    assert kept.accepted and kept.data == small and kept.format == "jpeg" and kept.id == content_id(small)
    large = _jpeg(1600, 1000)
    shrunk = process_image(large, RULES)
    assert shrunk.data != large and shrunk.width * shrunk.height <= RULES.store_max_pixels
    assert (shrunk.width, shrunk.height) == storage_size(1600, 1000, RULES.store_max_pixels) == (894, 559)
    assert (shrunk.orig_width, shrunk.orig_height) == (1600, 1000)


def test_png_is_re_encoded_unless_kept_explicitly():
    buffer = io.BytesIO()
    Image.new("RGB", (300, 200), (10, 200, 30)).save(buffer, "PNG")
    data = buffer.getvalue()
    assert process_image(data, RULES).format == "jpeg"
    webp_rules = IngestRules(store_format="webp", keep_formats=())
    assert process_image(data, webp_rules).format == "webp"
    keep_png = IngestRules(keep_formats=("jpeg", "webp", "png"))
    assert process_image(data, keep_png).data == data


def test_storage_size_never_upscales_and_respects_the_cap():
    assert storage_size(640, 480, 1_000_000) == (640, 480)
    for w, h in [(4000, 3000), (1000, 250), (257, 4001), (5000, 5000)]:
        sw, sh = storage_size(w, h, 262_144)
        assert sw * sh <= 262_144 and abs(sw / sh - w / h) < 0.02
