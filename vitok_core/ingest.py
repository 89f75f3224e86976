"""Per-image ingest rules: read the header, filter, decode, convert, downscale for storage, re-encode.

Pure Python + Pillow (no Ray): `jobs/ingest.py` maps `process_image` over the source with Ray Data.
Each image is either accepted (with the bytes to store) or rejected with one reason from
`REJECT_REASONS`; nothing raises for bad input.
"""

from __future__ import annotations

import hashlib
import io
import math
import warnings
from dataclasses import dataclass, field

from PIL import Image, ImageOps

from vitok_core.budget import bucket_of
from vitok_core.images import to_rgb

REJECT_REASONS = {
    "empty_file": "the source has zero bytes",
    "undecodable": "not an image Pillow can read, or truncated / corrupt data",
    "too_many_pixels": "the header claims more than max_pixels (decompression-bomb guard, checked before decoding)",
    "too_small": "short side below min_side",
    "aspect_ratio": "long side / short side above max_aspect",
    "duplicate": "same content hash as another source; the one with the smallest source URI is kept",
    "unreadable_source": "the source could not be read (I/O error, corrupt tar member or Parquet row)",
}

# EXIF orientations 5-8 swap width and height.
_TRANSPOSED = {5, 6, 7, 8}
_KEEPABLE = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp"}
_SAVE_FORMAT = {"jpeg": "JPEG", "webp": "WEBP"}


@dataclass(frozen=True)
class IngestRules:
    """The filter and storage settings of one ingest run (from the ingest config)."""

    min_side: int = 64
    max_aspect: float = 4.0
    max_pixels: int = 100_000_000
    store_max_pixels: int = 1_048_576
    store_format: str = "jpeg"
    store_quality: int = 95
    keep_formats: tuple[str, ...] = ("jpeg", "webp")
    patch_size: int = 16
    budgets: tuple[int, ...] = (256, 1024)


@dataclass
class Outcome:
    """What became of one source image. `data` holds the bytes to store when accepted."""

    id: str
    accepted: bool
    reason: str = ""
    detail: str = ""
    orig_width: int = 0
    orig_height: int = 0
    width: int = 0
    height: int = 0
    format: str = ""
    data: bytes = b""
    buckets: dict[int, tuple[int, int]] = field(default_factory=dict)


def content_id(data: bytes) -> str:
    """The image id: SHA-256 of the source bytes (exact-duplicate key)."""
    return hashlib.sha256(data).hexdigest()


def storage_size(width: int, height: int, max_pixels: int) -> tuple[int, int]:
    """Largest size with the same aspect ratio and at most `max_pixels` pixels; never up-scales."""
    if width * height <= max_pixels:
        return width, height
    scale = math.sqrt(max_pixels / (width * height))
    return max(1, math.floor(width * scale)), max(1, math.floor(height * scale))


def _reject(image_id: str, reason: str, detail: str = "", width: int = 0, height: int = 0) -> Outcome:
    return Outcome(image_id, False, reason, detail or REJECT_REASONS[reason], orig_width=width, orig_height=height)


def process_image(data: bytes, rules: IngestRules) -> Outcome:
    """Header -> filters -> decode -> orient + convert to RGB -> downscale -> keep or re-encode."""
    # Our max_pixels rule replaces Pillow's global bomb check, which would otherwise decide at open time.
    guard, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _process(data, rules)
    finally:
        Image.MAX_IMAGE_PIXELS = guard


def _process(data: bytes, rules: IngestRules) -> Outcome:
    image_id = content_id(data)
    if not data:
        return _reject(image_id, "empty_file")
    try:
        img = Image.open(io.BytesIO(data))
    except Exception as err:  # Pillow raises many types for junk: all mean the same here
        return _reject(image_id, "undecodable", f"header: {type(err).__name__}: {err}")
    # Size rules first, on the header alone: rotation does not change area, short side or aspect, and
    # reading EXIF can decode the whole image (Pillow does so for PNG).
    width, height = img.size
    if width * height > rules.max_pixels:
        return _reject(image_id, "too_many_pixels", f"{width}x{height} > {rules.max_pixels} pixels", width, height)
    if min(width, height) < rules.min_side:
        return _reject(image_id, "too_small", f"short side {min(width, height)} < {rules.min_side}", width, height)
    if max(width, height) / min(width, height) > rules.max_aspect:
        aspect = max(width, height) / min(width, height)
        return _reject(image_id, "aspect_ratio", f"aspect {aspect:.2f} > {rules.max_aspect}", width, height)
    try:
        orientation = img.getexif().get(0x0112, 1)
    except Exception as err:
        return _reject(image_id, "undecodable", f"exif: {type(err).__name__}: {err}", width, height)
    if orientation in _TRANSPOSED:
        width, height = height, width

    store_w, store_h = storage_size(width, height, rules.store_max_pixels)
    frames = getattr(img, "n_frames", 1)
    # Known from the header: a JPEG/WebP that needs no rotation, conversion or downscale is stored as is.
    keep = (
        _KEEPABLE.get(img.format or "") in rules.keep_formats
        and img.mode == "RGB"
        and orientation == 1
        and frames == 1
        and (store_w, store_h) == (width, height)
    )
    try:
        if img.format == "JPEG" and (keep or (store_w, store_h) != (width, height)):
            # DCT-domain downscale (1/2, 1/4, 1/8) while decoding, never below the target size. A kept JPEG
            # is decoded only to prove it is whole: 1/8 scale still reads every coded byte (truncation and
            # corrupt data still raise) at about half the cost of a full decode.
            target = (max(1, width // 8), max(1, height // 8)) if keep else (store_w, store_h)
            img.draft("RGB", target[::-1] if orientation in _TRANSPOSED else target)
        img.load()
        if not keep:
            rgb = to_rgb(ImageOps.exif_transpose(img) if orientation != 1 else img)
            if rgb.size != (store_w, store_h):
                # reducing_gap: a box pre-shrink by an integer factor, then bicubic; visually the same as a
                # plain bicubic (Pillow's docs) and several times faster for large reductions (PNG, WebP).
                rgb = rgb.resize((store_w, store_h), Image.Resampling.BICUBIC, reducing_gap=3.0)
    except Exception as err:
        return _reject(image_id, "undecodable", f"decode: {type(err).__name__}: {err}", width, height)

    if keep:
        stored, fmt = data, _KEEPABLE[img.format]
    else:
        buffer = io.BytesIO()
        rgb.save(buffer, format=_SAVE_FORMAT[rules.store_format], quality=rules.store_quality)
        stored, fmt = buffer.getvalue(), rules.store_format
    detail = f"animated: first of {frames} frames" if frames > 1 else ""
    return Outcome(
        id=image_id,
        accepted=True,
        detail=detail,
        orig_width=width,
        orig_height=height,
        width=store_w,
        height=store_h,
        format=fmt,
        data=stored,
        buckets={t: bucket_of(store_h, store_w, rules.patch_size, t) for t in rules.budgets},
    )
