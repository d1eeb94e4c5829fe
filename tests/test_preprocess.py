"""Image decoding and preprocessing: the contract shared by training and serving (no torch needed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from service.preprocess import ImageError, PreprocessSpec, decode_image, preprocess

from .conftest import HYMENOPTERA, PHOTOS


def encode(img: Image.Image, fmt: str = "PNG", **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def gradient(w: int = 64, h: int = 48) -> Image.Image:
    arr = np.zeros((h, w, 3), np.uint8)
    arr[..., 0] = np.linspace(0, 255, w, dtype=np.uint8)[None]
    arr[..., 1] = np.linspace(0, 255, h, dtype=np.uint8)[:, None]
    return Image.fromarray(arr)


@pytest.mark.parametrize(
    "make",
    [
        lambda: gradient().convert("L"),
        lambda: gradient().convert("P"),
        lambda: gradient().convert("RGBA"),
        lambda: gradient().convert("LA"),
        lambda: gradient().convert("CMYK"),
        lambda: Image.fromarray((np.arange(64 * 48).reshape(48, 64) * 20).astype(np.uint16)),
    ],
    ids=["L", "P", "RGBA", "LA", "CMYK", "I;16"],
)
def test_every_mode_becomes_rgb(make):
    img = make()
    fmt = "JPEG" if img.mode == "CMYK" else ("TIFF" if img.mode == "I;16" else "PNG")
    out = decode_image(encode(img, fmt))
    assert out.mode == "RGB"
    assert out.size == (64, 48)


def test_16bit_uses_full_range():
    arr = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    out = np.asarray(decode_image(encode(Image.fromarray(arr), "PNG")))
    assert out.min() == 0 and out.max() == 255


def test_transparent_pixels_become_white():
    img = Image.new("RGBA", (8, 8), (255, 0, 0, 0))
    assert np.asarray(decode_image(encode(img)))[0, 0].tolist() == [255, 255, 255]


def test_exif_orientation_is_applied():
    img = gradient(64, 32)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW on display
    out = decode_image(encode(img, "JPEG", exif=exif))
    assert out.size == (32, 64)


def test_animated_gif_gives_first_frame():
    frames = [Image.new("RGB", (16, 16), c) for c in ((255, 0, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    assert Image.open(io.BytesIO(data)).n_frames == 2
    r, g, b = np.asarray(decode_image(data))[8, 8]
    assert r > 200 and b < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty"),
        (b"hello, this is not an image", "not an image"),
        (encode(gradient(), "JPEG")[:300], "truncated"),
        (encode(Image.new("RGB", (1, 1))), "at least"),
    ],
    ids=["empty", "text", "truncated-jpeg", "1x1"],
)
def test_bad_images_raise_image_error(data, message):
    with pytest.raises(ImageError, match=message):
        decode_image(data)


def test_decompression_bomb_is_refused_before_decoding():
    # a 20000 x 20000 PNG compresses to a few hundred kilobytes but would need 1.2 GB decoded
    data = encode(Image.new("L", (20000, 20000)), "PNG")
    assert len(data) < 2_000_000
    with pytest.raises(ImageError, match="too large"):
        decode_image(data, max_pixels=50_000_000)


def test_preprocess_shape_range_and_centre_crop():
    spec = PreprocessSpec(input_size=32, resize=40)
    out = preprocess(gradient(80, 40), spec)
    assert out.shape == (3, 32, 32) and out.dtype == np.float32
    assert out.min() >= 0 and out.max() <= 255
    # the crop is centred: the red gradient is symmetric about the middle column
    assert abs(out[0, 16, :].mean() - 127.5) < 10


def test_real_photos_decode(tmp_path):
    for path in [*PHOTOS.glob("*.bmp"), *PHOTOS.glob("*.jpg"), *HYMENOPTERA.rglob("*.gif")]:
        img = decode_image(path)
        assert img.mode == "RGB" and min(img.size) > 10


def test_spec_round_trip_and_validation():
    spec = PreprocessSpec(input_size=224, resize=256, interpolation="bicubic")
    assert PreprocessSpec.from_dict(spec.to_dict()) == spec
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(interpolation="cubic-ish")
    with pytest.raises(ValueError, match="resize"):
        PreprocessSpec(input_size=224, resize=200)
