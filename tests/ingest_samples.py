"""Sample image files on disk for the tests of the image-ingest job (helpers, not tests).

The ingest job reads a folder of real-world files, so its tests need real-world files: several codecs
and extensions, many sizes and aspect ratios, some large enough to be downscaled for storage, exact
duplicates, and the broken or unusual files a crawl always contains. Everything here is generated from
random crops + resizes of the four public-domain photos that ship with scikit-image (found through
`vitok_core.demo`), so the pixels look like photos (codecs and PSNR behave as they do on real data)
while the files stay small, offline and deterministic for a given seed.

- `make_photo_folder`: a labelled `<class>/<name>.<ext>` tree (jpg/jpeg/png/webp) plus 3 exact duplicates.
- `make_malformed`: one file per edge case (truncated, empty, text, decompression bomb, CMYK, 16-bit,
  alpha, palette, animated, EXIF-rotated, too small, panorama) with the outcome the ingest should give.
- `reference_resize`: an independent reference of what the ingest stores for a file, to compare by PSNR.
"""

from __future__ import annotations

import functools
import io
import math
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

CLASSES = ("astronaut", "coffee", "chelsea", "rocket")
# Extension -> (share of the folder, Pillow format name).
FORMATS = {"jpg": (0.40, "JPEG"), "jpeg": (0.10, "JPEG"), "png": (0.25, "PNG"), "webp": (0.25, "WEBP")}
LARGE_SHARE = 0.08  # share of images upscaled to 0.75-1.9 MP (above a 0.5 MP storage cap)
N_DUPLICATES = 3
JPEG_QUALITY = 90
WEBP_QUALITY = 90
PNG_COMPRESS_LEVEL = 1  # fast; the files are test data, not archives
WEBP_METHOD = 2  # encoder effort 0-6 (default 4): 2 is ~2.5x faster at the same quality setting

_WHITE = (255, 255, 255)


@functools.cache
def _photos() -> dict[str, Image.Image]:
    """The demo photos by class name, as RGB. Imported lazily: vitok_core.demo pulls in torch."""
    from vitok_core.demo import demo_photo_paths

    photos = {}
    for path in demo_photo_paths():
        with Image.open(path) as img:
            photos[path.stem] = img.convert("RGB")
    assert tuple(photos) == CLASSES, f"unexpected demo photos {list(photos)}"
    return photos


def _save(image: Image.Image, path: Path, fmt: str, **kwargs) -> None:
    defaults = {"JPEG": {"quality": JPEG_QUALITY}, "WEBP": {"quality": WEBP_QUALITY, "method": WEBP_METHOD}}
    defaults["PNG"] = {"compress_level": PNG_COMPRESS_LEVEL}
    image.save(path, fmt, **{**defaults.get(fmt, {}), **kwargs})


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _random_crop(photo: Image.Image, size: tuple[int, int], rng: np.random.Generator) -> Image.Image:
    """A random crop of `photo` with the aspect ratio of `size` (40-100% of the largest such crop), resized."""
    width, height = size
    src_w, src_h = photo.size
    ratio = width / height
    max_w, max_h = (src_h * ratio, src_h) if src_w / src_h > ratio else (src_w, src_w / ratio)
    fraction = rng.uniform(0.4, 1.0)
    crop_w = max(8, min(src_w, round(max_w * fraction)))
    crop_h = max(8, min(src_h, round(max_h * fraction)))
    left = int(rng.integers(0, src_w - crop_w + 1))
    top = int(rng.integers(0, src_h - crop_h + 1))
    crop = photo.crop((left, top, left + crop_w, top + crop_h))
    if rng.random() < 0.5:
        crop = ImageOps.mirror(crop)
    return crop.resize(size, Image.Resampling.BILINEAR)


def _sample_size(rng: np.random.Generator, large: bool) -> tuple[int, int]:
    """(width, height), landscape or portrait.

    Normal: short side 96..700 (log-uniform, long side <= 1280), aspect 1..3 (half of them a common
    ratio: 1, 4/3, 3/2, 16/9, 2, 3). Large: long side 1000..1600, short side 750..1200 (0.75-1.9 MP).
    """
    if large:
        long_side = int(rng.integers(1000, 1601))
        short_side = min(math.ceil(long_side / rng.uniform(1.0, 4 / 3)), 1200)
    else:
        aspect = rng.choice([1.0, 4 / 3, 3 / 2, 16 / 9, 2.0, 3.0]) if rng.random() < 0.5 else rng.uniform(1.0, 3.0)
        # Log-uniform: as many small images as large ones per octave, which keeps the folder fast to write.
        short_side = round(math.exp(rng.uniform(math.log(96), math.log(min(700, 1280 / aspect)))))
        long_side = math.floor(short_side * aspect)  # floor keeps long / short <= 3
    return (long_side, short_side) if rng.random() < 0.5 else (short_side, long_side)


def _split(n: int, shares: list[float], rng: np.random.Generator) -> list[int]:
    """n labels 0..len(shares)-1 in the given proportions (largest remainder), shuffled."""
    counts = [math.floor(n * s) for s in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: n * shares[i] - counts[i], reverse=True)
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    labels = np.repeat(np.arange(len(shares)), counts)
    return [int(x) for x in rng.permutation(labels)]


def make_photo_folder(root: Path, n: int = 200, seed: int = 0) -> dict[str, str]:
    """Write n photo-like images under `root/<class>/<class>_<i>.<ext>`, plus 3 exact duplicates.

    Classes cycle through CLASSES (each image is a crop of that class's photo); extensions are
    jpg/jpeg/png/webp in 40/10/25/25 proportions; 8% of the images are large (0.75-1.9 MP, upscaled
    crops), the rest have short side 96..700 and aspect 1:1..3:1, landscape or portrait. Then 3 of the
    images are copied byte for byte under new names (numbered n, n+1, n+2), the first one into a different
    class folder. Returns {relative posix path: class (= folder name)} for all n + 3 files.
    """
    if n < N_DUPLICATES:
        raise ValueError(f"n must be >= {N_DUPLICATES} (the duplicates copy distinct images), got {n}")
    root = Path(root)
    rng = np.random.default_rng(seed)
    photos = _photos()
    extensions = list(FORMATS)
    ext_of = _split(n, [share for share, _ in FORMATS.values()], rng)
    n_large = round(n * LARGE_SHARE)
    large_of = _split(n, [1 - n_large / n, n_large / n], rng)
    written: dict[str, str] = {}
    for i in range(n):
        cls = CLASSES[i % len(CLASSES)]
        ext = extensions[ext_of[i]]
        size = _sample_size(rng, large=bool(large_of[i]))
        image = _random_crop(photos[cls], size, rng)
        rel = f"{cls}/{cls}_{i:04d}.{ext}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        _save(image, root / rel, FORMATS[ext][1])
        written[rel] = cls
    originals = list(written)
    for k, index in enumerate(sorted(rng.choice(n, size=N_DUPLICATES, replace=False))):
        source = originals[index]
        src_cls = written[source]
        cls = CLASSES[(CLASSES.index(src_cls) + 1) % len(CLASSES)] if k == 0 else src_cls
        rel = f"{cls}/{cls}_{n + k:04d}{Path(source).suffix}"
        (root / cls).mkdir(parents=True, exist_ok=True)
        shutil.copyfile(root / source, root / rel)
        written[rel] = cls
    return written


def _png_with_claimed_size(image: Image.Image, width: int, height: int) -> bytes:
    """A valid PNG of `image` whose IHDR then claims width x height (CRC recomputed, so the header parses)."""
    data = bytearray(_encode(image, "PNG"))
    # Signature (8 bytes), then the IHDR chunk: length (4), b"IHDR" (4), width (4), height (4), ... , CRC (4).
    assert data[12:16] == b"IHDR"
    length = struct.unpack(">I", data[8:12])[0]
    data[16:24] = struct.pack(">II", width, height)
    crc_at = 16 + length
    data[crc_at : crc_at + 4] = struct.pack(">I", zlib.crc32(bytes(data[12:crc_at])) & 0xFFFFFFFF)
    return bytes(data)


def make_malformed(root: Path) -> dict[str, str]:
    """Write one file per edge case into `root` (flat); return {file name: expected outcome}.

    The outcome is a reject reason of vitok_core.ingest (`REJECT_REASONS`) or "accepted". Every valid file
    has a short side >= 100 and aspect <= 3 unless the case is about breaking that rule.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1234)
    photos = _photos()

    def crop(cls: str, size: tuple[int, int]) -> Image.Image:
        return _random_crop(photos[cls], size, rng)

    expected: dict[str, str] = {}

    jpeg = _encode(photos["astronaut"], "JPEG", quality=JPEG_QUALITY)
    (root / "truncated.jpg").write_bytes(jpeg[: int(len(jpeg) * 0.4)])
    expected["truncated.jpg"] = "undecodable"

    (root / "empty.jpg").write_bytes(b"")
    expected["empty.jpg"] = "empty_file"

    (root / "text.jpg").write_text("Not a JPEG — just UTF-8 text with a .jpg name.\n", encoding="utf-8")
    expected["text.jpg"] = "undecodable"

    (root / "bomb.png").write_bytes(_png_with_claimed_size(crop("rocket", (64, 64)).convert("L"), 50_000, 50_000))
    expected["bomb.png"] = "too_many_pixels"

    _save(crop("coffee", (300, 200)).convert("CMYK"), root / "cmyk.jpg", "JPEG")
    expected["cmyk.jpg"] = "accepted"

    # 16-bit: the photo's luminance in the high byte plus a horizontal gradient in the low byte.
    gray = np.asarray(crop("chelsea", (240, 160)).convert("L"), dtype=np.uint16)
    gradient = np.linspace(0, 255, gray.shape[1]).round().astype(np.uint16)
    Image.fromarray(gray * 256 + gradient[None, :]).save(root / "gray16.png", "PNG")
    expected["gray16.png"] = "accepted"

    rgba = crop("astronaut", (200, 200)).convert("RGBA")
    alpha = np.full((200, 200), 255, dtype=np.uint8)
    alpha[:, :60] = 0  # fully transparent band
    alpha[120:, 60:] = 128  # half transparent corner
    rgba.putalpha(Image.fromarray(alpha))
    _save(rgba, root / "rgba.png", "PNG")
    expected["rgba.png"] = "accepted"

    crop("chelsea", (240, 160)).quantize(256).save(root / "palette.gif", "GIF")
    expected["palette.gif"] = "accepted"

    frames = [crop("rocket", (200, 150)).quantize(256) for _ in range(3)]
    frames[0].save(root / "animated.gif", "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    expected["animated.gif"] = "accepted"

    frames = [crop("coffee", (200, 150)) for _ in range(3)]
    frames[0].save(
        root / "animated.webp",
        "WEBP",
        save_all=True,
        append_images=frames[1:],
        duration=100,
        loop=0,
        quality=WEBP_QUALITY,
    )
    expected["animated.webp"] = "accepted"

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 CW to display -> 200 wide x 300 tall once applied
    _save(crop("astronaut", (300, 200)), root / "exif_rotated.jpg", "JPEG", exif=exif)
    expected["exif_rotated.jpg"] = "accepted"

    _save(crop("coffee", (20, 20)), root / "tiny.png", "PNG")
    expected["tiny.png"] = "too_small"

    _save(crop("rocket", (2000, 150)), root / "panorama.jpg", "JPEG")
    expected["panorama.jpg"] = "aspect_ratio"
    return expected


def _to_rgb(image: Image.Image) -> Image.Image:
    """8-bit RGB: alpha (and palette transparency) over white, 16-bit scaled by 255 / 65535."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        array = np.asarray(image).astype(np.float64) * (255.0 / 65535.0)
        return Image.fromarray(np.clip(np.round(array), 0, 255).astype(np.uint8)).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (*_WHITE, 255)), rgba).convert("RGB")
    return image.convert("RGB")


def reference_resize(path: Path, max_pixels: int) -> Image.Image:
    """What the ingest should store for `path` under a `max_pixels` storage cap (first frame, RGB).

    Opens the file, applies the EXIF orientation, converts to RGB (alpha over white, 16-bit scaled to 8),
    and if w * h > max_pixels resizes with BICUBIC to (floor(w * s), floor(h * s)), s = sqrt(max_pixels / (w * h)).
    """
    with Image.open(path) as img:
        img.load()
        rgb = _to_rgb(ImageOps.exif_transpose(img))
    width, height = rgb.size
    if width * height > max_pixels:
        scale = math.sqrt(max_pixels / (width * height))
        size = (max(1, math.floor(width * scale)), max(1, math.floor(height * scale)))
        rgb = rgb.resize(size, Image.Resampling.BICUBIC)
    return rgb


def make_training_folder(
    root: Path, n: int = 48, seed: int = 1, sizes: tuple = ((192, 128), (128, 192), (160, 160))
) -> None:
    """n photo-like JPEGs in a few sizes (so a few buckets, each with many images), labelled by folder."""
    rng = np.random.default_rng(seed)
    photos = _photos()
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        image = _random_crop(photos[label], sizes[i % len(sizes)], rng)
        (root / label).mkdir(parents=True, exist_ok=True)
        _save(image, root / label / f"{label}_{i:04d}.jpg", "JPEG")
