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
        **phone_formats(bee),
    }


def phone_formats(img: Image.Image, **kw) -> dict[str, tuple[bytes, str]]:
    """``img`` as AVIF and as HEIC (the format iPhones save in), each where this installation reads it (the dev
    extras install pillow-heif, which :func:`allowed_formats` registers)."""
    from headstart.service.formats import allowed_formats

    formats = allowed_formats()
    out = {}
    if "AVIF" in formats:
        out["avif"] = (encode(img, "AVIF", quality=90, **kw), "image/avif")
    if "HEIF" in formats:
        out["heic"] = (encode(img, "HEIF", quality=90, **kw), "image/heic")
    return out


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


def png_chunk(kind: bytes, data: bytes) -> bytes:
    import struct
    import zlib

    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def progressive_jpeg_with_repeated_scans(side: int = 2048, repeats: int = 500) -> bytes:
    """A valid progressive JPEG whose last scan is repeated: each repeat costs a pass over every pixel (33 KB for
    2048 x 2048 x 500 took 1.3 s to decode here)."""
    data = encode(Image.new("RGB", (side, side), (120, 30, 200)), "JPEG", progressive=True, quality=50)
    last_scan = data.rindex(b"\xff\xda")
    return data[:-2] + data[last_scan:-2] * repeats + data[-2:]


def hostile_images() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes, content type, expected message fragment): inputs that crashed, inflated or stalled a worker
    before the decode step bounded its work; each must be a 400 answered at once."""
    ihdr_short = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", b"\0\0\0\x10\0")  # Pillow: ValueError
    return {
        "png-truncated-ihdr": (ihdr_short, "image/png", "corrupt"),
        "ppm-bad-header": (b"P6\n3e 2\n255\n" + b"\0" * 18, "image/x-portable-pixmap", "malformed"),
        "aspect-2x30000": (encode(Image.new("L", (2, 30000)), "PNG"), "image/png", "times longer"),
        "jpeg-500-scans": (progressive_jpeg_with_repeated_scans(), "image/jpeg", "scans"),
        "ico": (encode(photo().resize((64, 64)), "ICO"), "image/x-icon", "not an image format"),
        "tga": (encode(photo().resize((64, 64)), "TGA"), "image/x-tga", "not an image format"),
        "sgi": (encode(photo().resize((64, 64)), "SGI"), "image/sgi", "not an image format"),
        "pcx": (encode(photo().resize((64, 64)), "PCX"), "image/x-pcx", "not an image format"),
        "eps": (encode(photo().resize((64, 64)), "EPS"), "application/postscript", "not an image format"),
    }


def rle8_bmp(side: int = 8000) -> bytes:
    """A valid RLE8-compressed 8000 x 8000 BMP of 33 KB (delta commands; Pillow decodes RLE in Python)."""
    import struct

    rows = b"\x00\x02\xff\xff" * side + b"\x00\x01"
    palette = b"".join(bytes((i, i, i, 0)) for i in range(256))
    info = struct.pack("<IiiHHIIiiII", 40, side, side, 1, 8, 1, len(rows), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(rows), 0, 0, offset) + info + palette + rows


def work_bombs() -> dict[str, tuple[bytes, str, str]]:
    """name → (bytes, content type, expected message fragment): small files inside the allowed formats whose
    decoding costs seconds of Python or a gigabyte (issue 24); each must be a 400 answered at once."""
    iccp = png_chunk(b"iCCP", b"icc\0\0" + __import__("zlib").compress(b"\0" * 4000))
    png = encode(Image.new("RGB", (64, 64)), "PNG")
    jpeg = encode(Image.new("RGB", (64, 64)), "JPEG")
    after_app0 = 4 + int.from_bytes(jpeg[4:6], "big")  # SOI, then the JFIF segment: its length counts its 2 bytes
    gif = encode(Image.new("P", (64, 64)), "GIF")
    first_block = 13 + (3 << ((gif[10] & 7) + 1) if gif[10] & 0x80 else 0)  # after the header and its palette
    return {
        "bmp-rle8": (rle8_bmp(), "image/bmp", "RLE"),
        "pgm-plain-300k-comment-lines": (
            b"P2\n64 64\n255\n" + b"#\n" * 300_000 + b"1 " * 4096,
            "image/x-portable-graymap",
            "Plain",
        ),
        "ppm-maxval-1000": (
            b"P6\n1000 1000\n1000\n" + b"\0\1" * (3 * 1000 * 1000),
            "image/x-portable-pixmap",
            "maxval",
        ),
        "ppm-padded-header": (
            b"P6" + b" " * (1 << 20) + b"64 64 255\n" + b"\0" * (64 * 64 * 3),
            "image/x-portable-pixmap",
            "header",
        ),
        "png-1900-icc-profiles": (png[:33] + iccp * 1900 + png[33:], "image/png", "ICC profile"),
        "png-60000-tiny-chunks": (png[:33] + png_chunk(b"tEXt", b"k\0v") * 60000 + png[33:], "image/png", "chunks"),
        "jpeg-4mb-of-fill-bytes": (jpeg[:2] + b"\xff" * (4 << 20) + jpeg[2:], "image/jpeg", "fill bytes"),
        "jpeg-4mb-between-segments": (
            jpeg[:after_app0] + b"A" * (4 << 20) + jpeg[after_app0:],
            "image/jpeg",
            "stray",
        ),
        "jpeg-1m-empty-comments": (jpeg[:2] + b"\xff\xfe\x00\x02" * 1_000_000 + jpeg[2:], "image/jpeg", "segments"),
        "gif-200k-empty-comments": (
            gif[:first_block] + b"\x21\xfe\x01x\x00" * 200_000 + gif[first_block:],
            "image/gif",
            "extension blocks",
        ),
        "gif-1mb-between-blocks": (gif[:first_block] + b"A" * (1 << 20) + gif[first_block:], "image/gif", "stray"),
        "webp-lossless-64mp": (encode(Image.new("RGB", (8000, 8000)), "WEBP", lossless=True), "image/webp", "MiB"),
        "png-rgba-64mp": (encode(Image.new("RGBA", (8000, 8000)), "PNG"), "image/png", "MiB"),
    }


def largest_uploads() -> tuple[list[bytes], list[bytes]]:
    """(accepted, refused): the largest images accepted in the costliest formats to decode (64 MP RGB PNG, 32 MP
    lossless WebP, 25 MP RGBA PNG) and the ones refused for the memory their decoding takes (64 MP lossless WebP and
    RGBA PNG)."""
    accepted = [
        encode(Image.new("RGB", (8000, 8000), (20, 90, 160)), "PNG", compress_level=1),
        encode(Image.new("RGB", (8000, 4000), (20, 90, 160)), "WEBP", lossless=True),
        encode(Image.new("RGBA", (5000, 5000), (20, 90, 160, 128)), "PNG", compress_level=1),
    ]
    bombs = work_bombs()
    return accepted, [bombs["webp-lossless-64mp"][0], bombs["png-rgba-64mp"][0]]


def large_16bit_png(side: int = 8000) -> bytes:
    """64 MP of 16-bit grey (a gradient, about 1 MB of PNG): the largest image accepted, in the mode whose
    conversion used 24 bytes per pixel of float64 temporaries."""
    ramp = (np.arange(side, dtype=np.uint32) * 65535 // (side - 1)).astype(np.uint16)
    return encode(Image.fromarray(np.broadcast_to(ramp, (side, side)).copy()), "PNG", compress_level=1)


def seed_images(seed: int = 0) -> list[tuple[str, bytes]]:
    """Small valid images in every format the decoder takes: the seeds of :func:`mutants` (HEIC also as a grid of
    tiles, as iPhones write it)."""
    base = Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8))
    return [
        ("jpeg", encode(base, "JPEG")),
        ("progressive", encode(base, "JPEG", progressive=True)),
        ("png", encode(base, "PNG")),
        ("gif", encode(base, "GIF")),
        ("bmp", encode(base, "BMP")),
        ("tiff", encode(base, "TIFF")),
        ("tiff-lzw", encode(base, "TIFF", compression="tiff_lzw")),
        ("webp", encode(base, "WEBP")),
        ("mpo", encode(base, "MPO", save_all=True, append_images=[base])),
        ("ppm", encode(base, "PPM")),
        *((name, data) for name, (data, _) in phone_formats(base).items()),  # AVIF, HEIC: where readable
        *((f"{name}-tiled", data) for name, (data, _) in phone_formats(base, tile_size=16).items() if name == "heic"),
    ]


def mutants(seed: int, count: int) -> list[tuple[str, bytes]]:
    """``count`` of :func:`seed_images` with 1 to 4 random byte changes, insertions, deletions or truncations
    each; the same list for the same seed."""
    import random

    rng = random.Random(seed)
    seeds = seed_images(seed)
    out = []
    for i in range(count):
        name, data = seeds[i % len(seeds)]
        d = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            op, pos = rng.random(), rng.randrange(len(d))
            if op < 0.5:
                d[pos] = rng.randrange(256)
            elif op < 0.7:
                d[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
            elif op < 0.85:
                del d[pos : pos + rng.randint(1, 8)]
            elif op < 0.95:
                d[pos] ^= 1 << rng.randrange(8)
            else:
                del d[pos:]
            if not d:
                d = bytearray(data[:1])
        out.append((f"{name}-{i}", bytes(d)))
    return out
