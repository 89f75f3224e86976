"""Tests for vitok_core.images: decoding and the conversion rule for non-RGB inputs."""

import io

import numpy as np
import pytest
import torch
from PIL import Image

from vitok_core.images import decode_image, to_rgb, to_tensor, to_uint8


def level(value):
    """8-bit value -> the [-1, 1] float to_tensor produces."""
    return value / 127.5 - 1.0


def encode(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def assert_rgb_tensor(tensor, height, width):
    assert isinstance(tensor, torch.Tensor)
    assert tensor.shape == (3, height, width)
    assert tensor.dtype == torch.float32
    assert tensor.min() >= -1.0 and tensor.max() <= 1.0


# --------------------------------------------------------------------------------------------------
# Pillow modes
# --------------------------------------------------------------------------------------------------


def test_rgb_is_kept():
    image = Image.new("RGB", (4, 3), (10, 20, 30))
    assert to_rgb(image).mode == "RGB"
    tensor = to_tensor(image)
    assert_rgb_tensor(tensor, 3, 4)
    for ch, value in enumerate((10, 20, 30)):
        assert torch.allclose(tensor[ch], torch.full((3, 4), level(value)), atol=1e-6)


def test_grayscale_replicated_to_three_channels():
    array = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    image = Image.fromarray(array)
    assert image.mode == "L"
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.array_equal(np.asarray(rgb), np.repeat(array[..., None], 3, axis=-1))
    tensor = to_tensor(image)
    assert_rgb_tensor(tensor, 3, 4)
    expected = torch.from_numpy(array).float() / 127.5 - 1.0
    for ch in range(3):
        assert torch.equal(tensor[ch], expected)


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_zero_becomes_white(mode):
    colour = (10, 200, 30, 0) if mode == "RGBA" else (77, 0)
    image = Image.new(mode, (5, 2), colour)
    assert np.array_equal(np.asarray(to_rgb(image)), np.full((2, 5, 3), 255, np.uint8))
    tensor = to_tensor(image)
    assert_rgb_tensor(tensor, 2, 5)
    assert torch.equal(tensor, torch.ones(3, 2, 5))


def test_alpha_opaque_keeps_colour_and_half_alpha_blends_with_white():
    image = Image.new("RGBA", (3, 1), (10, 200, 30, 255))
    image.putpixel((1, 0), (0, 0, 0, 128))
    rgb = np.asarray(to_rgb(image))
    assert rgb[0, 0].tolist() == [10, 200, 30]
    assert rgb[0, 2].tolist() == [10, 200, 30]
    # Black at ~50% alpha over white is mid grey.
    assert all(abs(int(v) - 127) <= 1 for v in rgb[0, 1])
    tensor = to_tensor(image)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([level(10), level(200), level(30)]), atol=1e-6)


def palette_image(transparent_index=None):
    image = Image.new("P", (3, 1))
    image.putpalette([255, 0, 0, 0, 0, 255, 0, 255, 0])
    for x in range(3):
        image.putpixel((x, 0), x)
    if transparent_index is None:
        return image
    # Round trip through PNG so the transparency comes from a real tRNS chunk.
    decoded = Image.open(io.BytesIO(encode(image, "PNG", transparency=transparent_index)))
    assert decoded.mode == "P" and "transparency" in decoded.info
    return decoded


def test_palette_without_transparency():
    rgb = to_rgb(palette_image())
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]
    tensor = to_tensor(palette_image())
    assert torch.equal(tensor[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))


def test_palette_with_transparency_becomes_white():
    image = palette_image(transparent_index=1)
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0].tolist() == [[255, 0, 0], [255, 255, 255], [0, 255, 0]]
    tensor = to_tensor(image)
    assert torch.equal(tensor[:, 0, 1], torch.ones(3))
    assert torch.equal(tensor[:, 0, 2], torch.tensor([-1.0, 1.0, -1.0]))


def test_palette_png_decoded():
    image = palette_image(transparent_index=0)
    decoded = decode_image(encode(image, "PNG", transparency=0))
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0].tolist() == [[255, 255, 255], [0, 0, 255], [0, 255, 0]]


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 0), (255, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))],
)
def test_cmyk_converted_to_rgb(cmyk, rgb):
    image = Image.new("CMYK", (2, 2), cmyk)
    converted = to_rgb(image)
    assert converted.mode == "RGB"
    assert np.array_equal(np.asarray(converted), np.broadcast_to(np.array(rgb, np.uint8), (2, 2, 3)))
    tensor = to_tensor(image)
    assert_rgb_tensor(tensor, 2, 2)
    assert torch.allclose(tensor[:, 0, 0], torch.tensor([level(v) for v in rgb]), atol=1e-6)


def test_cmyk_jpeg_decoded_to_rgb():
    data = encode(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), "JPEG", quality=95)
    decoded = decode_image(data)
    assert decoded.mode == "RGB" and decoded.size == (8, 8)
    r, g, b = np.asarray(decoded).reshape(-1, 3).mean(0)
    assert r > 200 and g < 50 and b < 50


SIXTEEN_BIT = np.array([[0, 65535, 32896, 257]], dtype=np.uint16)
SIXTEEN_BIT_AS_8 = [0, 255, 128, 1]


def test_pil_16bit_scaled_to_8bit():
    image = Image.fromarray(SIXTEEN_BIT)
    assert image.mode == "I;16"
    rgb = to_rgb(image)
    assert rgb.mode == "RGB"
    assert np.asarray(rgb)[0, :, 0].tolist() == SIXTEEN_BIT_AS_8
    tensor = to_tensor(image)
    assert_rgb_tensor(tensor, 1, 4)
    assert tensor[:, 0, 0].tolist() == [-1.0, -1.0, -1.0]
    assert tensor[:, 0, 1].tolist() == [1.0, 1.0, 1.0]


def test_pil_mode_i_16bit_values_scaled():
    image = Image.fromarray(SIXTEEN_BIT.astype(np.int32))
    assert image.mode == "I"
    assert np.asarray(to_rgb(image))[0, :, 0].tolist() == SIXTEEN_BIT_AS_8


def test_16bit_png_decoded_and_scaled():
    decoded = decode_image(encode(Image.fromarray(SIXTEEN_BIT), "PNG"))
    assert decoded.mode == "RGB"
    assert np.asarray(decoded)[0, :, 0].tolist() == SIXTEEN_BIT_AS_8


@pytest.mark.parametrize("shape", [(1, 4), (1, 4, 1), (1, 4, 3)])
def test_numpy_uint16_scaled_to_8bit(shape):
    array = SIXTEEN_BIT.reshape(1, 4, 1) if len(shape) == 3 else SIXTEEN_BIT
    array = np.broadcast_to(array, shape).copy()
    tensor = to_tensor(array)
    assert_rgb_tensor(tensor, 1, 4)
    expected = torch.tensor([level(v) for v in SIXTEEN_BIT_AS_8])
    for ch in range(3):
        assert torch.allclose(tensor[ch, 0], expected, atol=1e-6)
    assert tensor[0, 0, 0] == -1.0 and tensor[0, 0, 1] == 1.0


# --------------------------------------------------------------------------------------------------
# numpy inputs
# --------------------------------------------------------------------------------------------------


def test_numpy_uint8_hw():
    array = np.random.default_rng(0).integers(0, 256, (5, 7), dtype=np.uint8)
    tensor = to_tensor(array)
    assert_rgb_tensor(tensor, 5, 7)
    expected = torch.from_numpy(array).float() / 127.5 - 1.0
    for ch in range(3):
        assert torch.equal(tensor[ch], expected)
    assert torch.equal(to_tensor(array[..., None]), tensor)


def test_numpy_uint8_hwc():
    array = np.random.default_rng(1).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    tensor = to_tensor(array)
    assert_rgb_tensor(tensor, 5, 7)
    assert torch.equal(tensor, torch.from_numpy(array).permute(2, 0, 1).float() / 127.5 - 1.0)


def test_numpy_uint8_hw4():
    rgb = np.random.default_rng(2).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    alpha = np.full((5, 7, 1), 255, np.uint8)
    alpha[0, 0] = 0
    tensor = to_tensor(np.concatenate([rgb, alpha], axis=-1))
    assert_rgb_tensor(tensor, 5, 7)
    expected = torch.from_numpy(rgb).permute(2, 0, 1).float() / 127.5 - 1.0
    expected[:, 0, 0] = 1.0
    assert torch.equal(tensor, expected)


def test_numpy_float_in_unit_range():
    array = np.array([[0.0, 1.0, 0.5]], dtype=np.float32)
    tensor = to_tensor(array)
    assert_rgb_tensor(tensor, 1, 3)
    assert tensor[0, 0].tolist() == pytest.approx([-1.0, 1.0, level(128)], abs=1e-6)


@pytest.mark.parametrize("bad", [1.5, -0.1, 255.0])
def test_numpy_float_outside_unit_range_raises(bad):
    array = np.zeros((4, 4, 3), dtype=np.float32)
    array[1, 2, 0] = bad
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        to_tensor(array)


@pytest.mark.parametrize("shape", [(4, 4, 2), (4, 4, 5), (4,), (2, 4, 4, 3)])
def test_numpy_wrong_shape_raises(shape):
    with pytest.raises(ValueError, match="shape"):
        to_tensor(np.zeros(shape, dtype=np.uint8))


def test_unsupported_input_type_raises():
    with pytest.raises(TypeError):
        to_tensor(torch.zeros(3, 4, 4))


# --------------------------------------------------------------------------------------------------
# decode_image
# --------------------------------------------------------------------------------------------------


def two_colour_jpeg(orientation=None):
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    if orientation is None:
        return encode(image, "JPEG", quality=95)
    exif = image.getexif()
    exif[274] = orientation
    return encode(image, "JPEG", quality=95, exif=exif)


def test_decode_jpeg_without_exif():
    decoded = decode_image(two_colour_jpeg())
    assert decoded.mode == "RGB"
    assert decoded.size == (40, 20)


def test_decode_applies_exif_orientation():
    data = two_colour_jpeg(orientation=6)
    with Image.open(io.BytesIO(data)) as raw:
        assert raw.size == (40, 20)
        assert raw.getexif()[274] == 6
    decoded = decode_image(data)
    assert decoded.mode == "RGB"
    assert decoded.size == (20, 40)  # transposed: now 20 wide, 40 high
    # Orientation 6 = rotate 90 degrees clockwise to display: the left (red) half goes to the top.
    array = np.asarray(decoded).astype(float)
    top, bottom = array[:20].reshape(-1, 3).mean(0), array[20:].reshape(-1, 3).mean(0)
    assert top[0] > 200 and top[2] < 60
    assert bottom[2] > 200 and bottom[0] < 60


@pytest.mark.parametrize(
    "data",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"this is not an image at all", id="garbage"),
        pytest.param(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, id="png-header-only"),
    ],
)
def test_decode_corrupt_bytes_raises(data):
    with pytest.raises(OSError):
        decode_image(data)


def test_decode_truncated_jpeg_raises():
    data = two_colour_jpeg()
    with pytest.raises(OSError):
        decode_image(data[: len(data) // 2])


# --------------------------------------------------------------------------------------------------
# to_uint8
# --------------------------------------------------------------------------------------------------


def test_to_uint8_round_trip_exact():
    array = np.random.default_rng(3).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    array[0, 0] = 0
    array[0, 1] = 255
    out = to_uint8(to_tensor(array))
    assert out.dtype == np.uint8
    assert out.shape == (17, 23, 3)
    assert np.array_equal(out, array)
    # Every 8-bit level survives the round trip.
    levels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(to_uint8(to_tensor(levels))[..., 0], levels)


def test_to_uint8_clips_out_of_range():
    tensor = torch.tensor([-3.0, -1.0, 0.0, 1.0, 3.0]).reshape(1, 1, 5).expand(3, 1, 5)
    out = to_uint8(tensor)
    assert out[0, :, 0].tolist() == [0, 0, 128, 255, 255]


@pytest.mark.parametrize(
    "image",
    [
        pytest.param(np.zeros((0, 10), np.uint8), id="numpy-hw"),
        pytest.param(np.zeros((4, 0, 3), np.uint8), id="numpy-hwc"),
        pytest.param(Image.new("RGB", (0, 5)), id="pil"),
    ],
)
def test_zero_size_image_raises(image):
    with pytest.raises(ValueError, match="zero size"):
        to_tensor(image)
