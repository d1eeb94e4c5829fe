"""Good and bad request images for the service tests (and the reliability corpus)."""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from .conftest import HYMENOPTERA, PHOTOS

BEE = HYMENOPTERA / "val" / "bees" / "72100438_73de9f17af.jpg"
ANT = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
GIF = next(HYMENOPTERA.rglob("*.gif"))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def photo(path=BEE) -> Image.Image:
    return Image.open(path).convert("RGB")


def good_variants() -> dict[str, tuple[bytes, str]]:
    """name → (bytes, content type): images in every mode the service must accept."""
    bee = photo()
    arr16 = (np.asarray(bee.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    frames = [bee.convert("P"), Image.new("RGB", bee.size, (0, 0, 255)).convert("P")]
    return {
        "jpeg": (BEE.read_bytes(), "image/jpeg"),
        "grayscale": (encode(bee.convert("L"), "PNG"), "image/png"),
        "rgba": (encode(bee.convert("RGBA"), "PNG"), "image/png"),
        "palette": (encode(bee.convert("P"), "PNG"), "image/png"),
        "cmyk": (encode(bee.convert("CMYK"), "JPEG"), "image/jpeg"),
        "16-bit": (encode(Image.fromarray(arr16), "PNG"), "image/png"),
        "animated-gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), "image/gif"),
        "real-gif": (GIF.read_bytes(), "image/gif"),
        "bmp": ((PHOTOS / "bird.bmp").read_bytes(), "image/bmp"),
        "webp": (encode(bee, "WEBP"), "image/webp"),
    }


def exif_rotated() -> tuple[bytes, Image.Image]:
    """A JPEG stored sideways with EXIF orientation 6, and the upright image it should be read as."""
    bee = photo()
    exif = Image.Exif()
    exif[0x0112] = 6  # display: rotate 90° clockwise
    stored = bee.transpose(Image.Transpose.ROTATE_90)  # stored counter-clockwise
    return encode(stored, "JPEG", exif=exif, quality=95), stored.transpose(Image.Transpose.ROTATE_270)


def bad_images() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes, content type, expected message fragment): each must be a 400."""
    jpeg = BEE.read_bytes()
    return {
        "empty": (b"", "image/jpeg", "empty"),
        "text-as-jpeg": (b"hello, I am not an image", "image/jpeg", "not an image format"),
        "truncated-jpeg": (jpeg[: len(jpeg) // 3], "image/jpeg", "truncated"),
        "png-header-only": (b"\x89PNG\r\n\x1a\n" + b"\0" * 40, "image/png", "image"),
        "decompression-bomb": (encode(Image.new("L", (20000, 20000)), "PNG"), "image/png", "too large"),
        "1x1": (encode(Image.new("RGB", (1, 1)), "PNG"), "image/png", "at least"),
    }
