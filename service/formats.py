"""What a file's format costs to decode, judged before decoding: the checks :func:`service.preprocess.decode_image`
runs on the bytes (before Pillow parses them) and on the opened image (before its pixels are decoded).

Pillow parses some headers and decodes some formats in Python, one byte at a time (Netpbm headers and plain Netpbm,
scaled Netpbm, RLE BMP, PNG chunks), and the memory a decode takes depends on the format and the mode as much as on
the pixels. These bound both (issue 24: 33 KB that took 10 s, 2.5 KB that took 1 GB).
"""

from __future__ import annotations

import io
import re
import struct
from typing import BinaryIO

from PIL import Image

from .errors import ImageError
from .settings import SETTINGS

#: Netpbm (PPM/PGM/PBM) header: magic, width, height and (but for P4) maxval, separated by whitespace or comments,
#: within the first :data:`MAX_HEADER_BYTES`. Pillow reads this header one byte at a time in Python, so padding it
#: (or its comments) to a megabyte costs seconds; and it decodes the plain (ASCII, P1-P3) forms and any maxval but 255
#: (and 65535 for grey) in Python too, 4 to 17 s for a megabyte. Those forms are refused: re-saving as binary PPM or
#: PNG costs nothing.
_NETPBM = re.compile(rb"\AP([1-6])(?:(?:\s|#[^\r\n]*[\r\n])+(\d{1,9})){2,3}\s")
MAX_HEADER_BYTES = 1024
#: PNG: Pillow walks the chunks in Python and inflates every iCCP profile and compressed text chunk, so 1,900 ICC
#: profiles (1.9 MB) or tens of thousands of tiny chunks cost 4-9 s before a pixel. Camera and web PNGs have a dozen
#: ancillary chunks; the image data may be split into many IDAT chunks (one per 8 KB is common, so the count may grow
#: with the file's size).
MAX_PNG_ANCILLARY_CHUNKS = 256
MAX_PNG_ANCILLARY_BYTES = 4 << 20
MAX_PNG_CHUNKS_BASE = 4096
PNG_CHUNK_BYTES = 4096
#: Pillow's decoders written in Python (per-byte loops: seconds for kilobytes): never run.
PYTHON_DECODERS = {
    "bmp_rle": "RLE-compressed BMP",
    "ppm_plain": "plain (ASCII) Netpbm",
    "ppm": "Netpbm with a maxval other than 255",
}
#: Largest memory one image's decoding may take (HEADSTART_MAX_DECODE_BYTES), estimated before decoding from its
#: pixels and :data:`DECODE_BYTES_PER_PIXEL`: a 64 MP RGB photo takes 256 MB whatever its format, but a lossless
#: WebP or an RGBA PNG of the same size about 1 GB (the decoder's buffer, a copy, the conversion to RGB).
MAX_DECODE_BYTES = SETTINGS.max_decode_bytes
#: Peak memory of decoding to RGB per pixel decoded, by format and mode, measured (the lowest figure that bounds the
#: peak of 8000 x 8000 images of each kind: tests/test_preprocess.py checks it still does): Pillow holds RGB at 4
#: bytes a pixel.
DECODE_BYTES_PER_PIXEL = {"RGB": 4, "L": 5, "1": 5, "P": 5, "CMYK": 8, "YCbCr": 8, "I;16": 8, "I": 9, "F": 9}
DECODE_BYTES_WITH_ALPHA = 20  # RGBA, LA, PA, P with transparency: the alpha composite makes three RGBA copies
DECODE_BYTES_WEBP = 16  # libwebp's RGBA buffer, Pillow's copy of it, the image, the RGB conversion


def refuse_before_open(fp: BinaryIO) -> None:
    """The checks that must come before Pillow parses anything, because its parsing itself is the cost."""
    head = fp.read(MAX_HEADER_BYTES)
    fp.seek(0)
    if head[:1] == b"P" and head[1:2] in b"123456" and len(head) > 2 and head[2:3].isspace():
        match = _NETPBM.match(head)
        if match is None:
            raise ImageError(
                f"The Netpbm (PPM/PGM/PBM) header is malformed or longer than {MAX_HEADER_BYTES} bytes. "
                "Re-save the image as PNG or JPEG."
            )
        kind = int(match.group(1))
        if kind <= 3:
            raise ImageError(
                "Plain (ASCII) Netpbm images (P1-P3) are not taken: their decoding is slow. Re-save the image as "
                "binary PPM/PGM, PNG or JPEG."
            )
        values = [int(v) for v in re.findall(rb"(?:\s|#[^\r\n]*[\r\n])+(\d+)", match.group(0))]
        if kind != 4 and (len(values) != 3 or values[2] not in ((255, 65535) if kind == 5 else (255,))):
            raise ImageError(
                "Only 8-bit Netpbm images (maxval 255; 65535 for PGM) are taken. Re-save the image as PNG or JPEG."
            )
    elif head[:8] == b"\x89PNG\r\n\x1a\n":
        check_png_chunks(fp)


def check_png_chunks(fp: BinaryIO) -> None:
    """Walk a PNG's chunk headers (seeking over their data) and refuse what would make Pillow's parsing slow."""
    size = fp.seek(0, io.SEEK_END)
    position, chunks, ancillary, ancillary_bytes, profiles = 8, 0, 0, 0, 0
    limit = MAX_PNG_CHUNKS_BASE + size // PNG_CHUNK_BYTES
    try:
        while position + 8 <= size:
            fp.seek(position)
            length, kind = struct.unpack(">I4s", fp.read(8))
            chunks += 1
            if kind[:1].islower() and kind != b"fdAT":  # ancillary (fdAT: an APNG frame's image data)
                ancillary += 1
                ancillary_bytes += length
                profiles += kind == b"iCCP"
            if chunks > limit or ancillary > MAX_PNG_ANCILLARY_CHUNKS or ancillary_bytes > MAX_PNG_ANCILLARY_BYTES:
                raise ImageError(
                    f"The PNG has too many chunks or too much metadata (over {chunks} chunks, {ancillary} of them "
                    f"metadata, {ancillary_bytes} bytes; at most {MAX_PNG_ANCILLARY_CHUNKS} metadata chunks and "
                    f"{MAX_PNG_ANCILLARY_BYTES >> 20} MiB). Re-save it with any image program before sending."
                )
            if profiles > 1:
                raise ImageError("The PNG has more than one ICC profile (iCCP chunk). Re-save it before sending.")
            if kind == b"IEND":
                break
            position += 12 + length
    finally:
        fp.seek(0)


def decode_cost(img: Image.Image, pixels: int) -> int:
    """Bytes of memory decoding ``pixels`` of ``img`` (opened, not loaded) to RGB takes at its peak, estimated."""
    mode = img.mode
    if img.format == "WEBP":
        return pixels * DECODE_BYTES_WEBP
    if "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info):
        return pixels * DECODE_BYTES_WITH_ALPHA
    return pixels * DECODE_BYTES_PER_PIXEL.get("I;16" if mode.startswith("I;16") else mode, 9)
