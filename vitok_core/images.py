"""Image decoding and conversion rules shared by every stage.

The rule for non-RGB inputs (documented once, used everywhere):
- EXIF orientation is applied, then
- palette images with transparency and every mode with alpha are composited over white;
- grayscale is replicated to three channels; CMYK / YCbCr / LAB go through Pillow's conversion;
- 16-bit and 32-bit integer images are scaled to 8 bits (value * 255 / max of the type), floats in
  [0, 1] likewise; the result is always 8-bit RGB.
"""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    from torch import Tensor

_WHITE = (255, 255, 255)


def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow image to 8-bit RGB by the module's rule (alpha over white, 16-bit scaled)."""
    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
        mode = image.mode
        if mode == "RGB":
            return image
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_scale_to_uint8(np.asarray(image))).convert("RGB")
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_WHITE, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _scale_to_uint8(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint8:
        return array
    if array.dtype == np.bool_:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer):
        # Pillow reports 16-bit PNGs as mode "I" (int32) with values in [0, 65535].
        top = 65535 if array.dtype.itemsize <= 4 and array.max(initial=0) <= 65535 else np.iinfo(array.dtype).max
        return np.clip(np.round(array.astype(np.float64) * (255.0 / top)), 0, 255).astype(np.uint8)
    if np.issubdtype(array.dtype, np.floating):
        if array.size and (np.nanmin(array) < 0.0 or np.nanmax(array) > 1.0):
            raise ValueError("float images must hold values in [0, 1]")
        return np.round(np.nan_to_num(array) * 255.0).astype(np.uint8)
    raise ValueError(f"unsupported image dtype {array.dtype}")


def decode_image(data: bytes) -> Image.Image:
    """Decode encoded bytes (JPEG/PNG/WebP/...) to an oriented 8-bit RGB image; raises on corrupt data."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        oriented = ImageOps.exif_transpose(img)
    return to_rgb(oriented)


def to_tensor(image: Image.Image | np.ndarray) -> Tensor:
    """Pillow image or HxW / HxWxC array (C in 1, 3, 4; uint8, uint16 or float in [0, 1]) -> [3, H, W] in [-1, 1]."""
    if isinstance(image, Image.Image):
        array = np.asarray(to_rgb(image))
    elif isinstance(image, np.ndarray):
        array = image
        if array.ndim == 3 and array.shape[-1] == 1:
            array = array[..., 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
            raise ValueError(f"expected an HxW or HxWxC image with C in (1, 3, 4), got shape {array.shape}")
        mode = "L" if array.ndim == 2 else ("RGB" if array.shape[-1] == 3 else "RGBA")
        array = np.asarray(to_rgb(Image.fromarray(_scale_to_uint8(array), mode=mode)))
    else:
        raise TypeError(f"expected a PIL image or numpy array, got {type(image).__name__}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image has zero size: {array.shape[:2]}")
    import torch  # here, not at the top: ingest workers use this module without loading torch

    tensor = torch.from_numpy(np.array(array, copy=True)).permute(2, 0, 1).float()
    return tensor / 127.5 - 1.0


def to_uint8(image: Tensor) -> np.ndarray:
    """[3, H, W] in [-1, 1] -> HxWx3 uint8 (clipped), for saving and metrics."""
    import torch

    array = ((image.detach().float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
    return array.permute(1, 2, 0).cpu().numpy()
