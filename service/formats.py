"""What a file's format costs to decode, judged before decoding: the checks :func:`service.preprocess.decode_image`
runs on the bytes (before Pillow parses them) and on the opened image (before its pixels are decoded).

Pillow parses some headers and decodes some formats in Python, one byte at a time (Netpbm headers and plain Netpbm,
scaled Netpbm, RLE BMP, PNG chunks), and the memory a decode takes depends on the format and the mode as much as on
the pixels. These bound both (issue 24: 33 KB that took 10 s, 2.5 KB that took 1 GB).
"""

from __future__ import annotations

import io
import math
import os
import re
import struct
import threading
from collections.abc import Iterator
from typing import BinaryIO

from PIL import Image

from .errors import ImageError
from .settings import SETTINGS

#: Formats decoded, identified by their bytes (never by file name or declared content type). Pillow reads about 40
#: formats, some through legacy or external decoders (EPS runs Ghostscript); only these are let through. JPEG includes
#: MPO, the multi-picture JPEG many phone cameras write; PPM includes PGM, Netpbm formats some data sets use. AVIF
#: where this Pillow reads it (its wheels have since 11.3); HEIF (HEIC: the format iPhones and many other phones save
#: photos in) where the pillow-heif package is installed (:func:`allowed_formats`).
BASE_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "TIFF", "WEBP", "PPM")
#: The file names those formats go by: what a folder scan (training data, `predict-batch`) takes for an image. A file
#: is still judged by its bytes; the suffix only decides whether a file that is not an image is worth reporting (a
#: HEIC photo is, also where it cannot be read).
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".mpo", ".png", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm"})
IMAGE_SUFFIXES |= {".jfif", ".jpe", ".jfi"}  # JPEG too: what browsers on Windows save web images as
IMAGE_SUFFIXES |= {".avif", ".heic", ".heif"}
#: ISO base media files (``ftyp`` box) by brand: AVIF (AV1 pictures) and HEIF (HEVC pictures, iPhones' HEIC).
AVIF_BRANDS = frozenset({b"avif", b"avis"})
HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"})
HEIF_INSTALL = "pip install pillow-heif (headstart's heif extra; its wheels hold GPL-2 code, hence not a default)"

_formats_lock = threading.Lock()
_formats: tuple[str, ...] | None = None


def allowed_formats() -> tuple[str, ...]:
    """:data:`BASE_FORMATS`, then AVIF where Pillow reads it, then HEIF where pillow-heif is installed (registered
    with Pillow here, once: without the embedded thumbnails, depth and auxiliary images, which a model does not use).
    AVIF comes before HEIF: both accept the generic ``mif1`` brand, and Pillow passes an AVIF over to the next."""
    global _formats
    if _formats is not None:
        return _formats
    with _formats_lock:
        if _formats is None:
            Image.init()  # registers every plugin: Image.open(formats=...) fails on one that is not loaded yet
            found = [*BASE_FORMATS]
            if "AVIF" in Image.OPEN:
                found.append("AVIF")
            try:
                import pillow_heif
            except ImportError:
                pass
            else:
                pillow_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)
                found.append("HEIF")
            _formats = tuple(found)
        return _formats


#: pictures in forms headstart does not read, by how their names end: (what one is, what several are, how to make
#: images of them)
CONVERSIONS = {
    (".cr2", ".cr3", ".crw", ".nef", ".nrw", ".arw", ".srf", ".sr2", ".dng", ".orf", ".rw2", ".raf", ".pef", ".srw",
     ".x3f", ".3fr", ".iiq", ".erf", ".kdc", ".mrw", ".rwl"):
        ("a camera RAW photo", "camera RAW photos", "export them as JPEG first (darktable, RawTherapee or Lightroom)"),
    (".dcm", ".dicom"): ("DICOM", "DICOM", "convert them to PNG first (pydicom, or dcmj2pnm from dcmtk)"),
    (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd"): ("a 3-D volume", "3-D volumes", "save their slices as PNG first"),
    (".mp4", ".mov", ".avi", ".mkv", ".webm", ".m4v", ".wmv", ".mpg", ".mpeg"):
        ("a video", "videos", "extract frames first (ffmpeg -i VIDEO -vf fps=1 frames/%05d.jpg)"),
    (".svg", ".svgz", ".eps", ".ai"): ("a vector drawing", "vector drawings", "render them as PNG first"),
    (".pdf",): ("a PDF", "PDFs", "render their pages as PNG first (pdftoppm -png FILE.pdf FILE)"),
}  # fmt: skip


def converted(path: str | os.PathLike) -> tuple[str, str, str] | None:
    """(what ``path`` is, what several are, how to make images of them) where its name says it is a picture in a
    form headstart does not read (a camera's RAW, DICOM, a video...); None otherwise."""
    name = os.path.basename(os.fspath(path)).lower()
    return next((kind for suffixes, kind in CONVERSIONS.items() if name.endswith(suffixes)), None)


def conversion_suffix(name: str) -> str:
    """The ending of ``name`` that says it is a picture in another form (``.cr2``), which an upload's renamed copy
    keeps (:func:`headstart.service.multipart.canonical_multipart`); '' for any other name."""
    lower = name.lower()
    return next((suffix for suffixes in CONVERSIONS for suffix in suffixes if lower.endswith(suffix)), "")


def conversion_hint(path: str | os.PathLike) -> str:
    """What to do, for an unreadable file whose name says it is a picture in another form (:func:`converted`), as a
    sentence to add to the error; '' otherwise. An upload's saved copy keeps the name's ending."""
    kind = converted(path)
    return "" if kind is None else f" Its name says it is {kind[0]}: {kind[2]}."


def unread_format(head: bytes) -> str:
    """Why bytes no allowed format took are not read, and what to do: HEIC and AVIF, where this installation lacks
    their decoders, are named with the fix; anything else is not an image format that can be read."""
    formats = allowed_formats()
    brands = isobmff_brands(head)
    if brands & HEIF_BRANDS and not brands & AVIF_BRANDS and "HEIF" not in formats:
        return (
            "The image is HEIC/HEIF (the format iPhones save photos in), which this installation cannot read: "
            f"{HEIF_INSTALL}, or convert it to JPEG (on an iPhone: Settings > Camera > Formats > Most Compatible)."
        )
    if brands & AVIF_BRANDS and "AVIF" not in formats:
        return (
            "The image is AVIF, which this installation's Pillow cannot read: pip install -U 'pillow>=11.3', or "
            "convert it to JPEG or PNG."
        )
    names = ", ".join({"WEBP": "WebP", "PPM": "PPM/PGM", "HEIF": "HEIC/HEIF"}.get(f, f) for f in formats)
    return f"The data is not an image format that can be read ({names} are)."


def isobmff_brands(head: bytes) -> frozenset[bytes]:
    """The major and compatible brands of an ISO base media file's leading ``ftyp`` box; empty for anything else."""
    if len(head) < 16 or head[4:8] != b"ftyp":
        return frozenset()
    size = min(struct.unpack(">I", head[:4])[0], len(head))
    return frozenset([head[8:12]] + [head[i : i + 4] for i in range(16, size - 3, 4)])


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
#: AVIF and HEIF (with and without alpha), measured as the others on 16 MP images (peaks of 9.3, 23.8, 7.8 and 20.6
#: bytes a pixel; 9.4 for HEIF at 4 MP: libavif's or libheif's planes, the RGB(A) image, the alpha composite)
DECODE_BYTES_AVIF, DECODE_BYTES_AVIF_ALPHA = 10, 25
DECODE_BYTES_HEIF, DECODE_BYTES_HEIF_ALPHA = 10, 22


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
    elif head[:3] == b"\xff\xd8\xff":
        check_jpeg_markers(fp)
    elif head[:6] in (b"GIF87a", b"GIF89a"):
        check_gif_blocks(fp)
    elif (brands := isobmff_brands(head)) & HEIF_BRANDS and not brands & AVIF_BRANDS:
        check_heif_main_item(fp)


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


#: JPEG: Pillow reads what comes before the first scan in Python, a marker at a time and any byte between markers one
#: at a time: 4 MB of 0xFF fill bytes took 1.5 s, a million empty comments 0.9 s (a 32 MB upload: 7-12 s of a worker
#: holding the GIL). Cameras write 10-30 segments there (EXIF, an ICC profile in up to a few dozen parts, XMP, tables)
#: and no bytes between them.
MAX_JPEG_SEGMENTS = 1024
MAX_JPEG_STRAY_BYTES = 4096
#: The markers Pillow's parser knows (``PIL.JpegImagePlugin.MARKER``: 0xFFC0-0xFFFE), and those it reads no length
#: for (restarts, SOI, EOI, and the JPG extensions it does not parse); tests/test_preprocess.py checks both still are.
JPEG_MARKERS = (0xFFC0, 0xFFFE)
JPEG_MARKERS_WITHOUT_LENGTH = frozenset({0xFFC8, *range(0xFFD0, 0xFFDA), *range(0xFFF0, 0xFFFE)})


def check_jpeg_markers(fp: BinaryIO) -> None:
    """Walk a JPEG's markers up to its first scan as Pillow's parser walks them (``JpegImageFile._open``: each
    segment read by its length, fill bytes and bytes between markers one at a time) and refuse the file whose walk
    would be slow. Where the walk cannot go on (a marker Pillow does not know), Pillow stops too, with an error."""
    segments = stray = 0
    try:
        fp.seek(3)  # after SOI and the 0xFF of the first marker, as Pillow starts
        s = b"\xff"
        while s:
            if s[0] != 0xFF:  # a byte between markers
                stray += 1
                s = fp.read(1)
            elif not (second := fp.read(1)):
                break
            elif JPEG_MARKERS[0] <= (code := 0xFF00 | second[0]) <= JPEG_MARKERS[1]:
                segments += 1
                if code == 0xFFDA:  # the first scan: libjpeg reads the rest
                    break
                if code not in JPEG_MARKERS_WITHOUT_LENGTH:  # a segment: its length counts its two bytes
                    length = fp.read(2)
                    if len(length) < 2:
                        break
                    fp.seek(max(0, struct.unpack(">H", length)[0] - 2), io.SEEK_CUR)
                s = fp.read(1)
            elif code == 0xFFFF:  # a fill byte
                stray += 1
                s = b"\xff"
            elif code == 0xFF00:
                stray += 1
                s = fp.read(1)
            else:
                break
            if segments > MAX_JPEG_SEGMENTS or stray > MAX_JPEG_STRAY_BYTES:
                what = (
                    f"more than {MAX_JPEG_SEGMENTS} segments"
                    if segments > MAX_JPEG_SEGMENTS
                    else f"more than {MAX_JPEG_STRAY_BYTES} stray or fill bytes between its markers"
                )
                raise ImageError(
                    f"The JPEG has {what} before its image data (cameras write a few dozen at most; reading them is "
                    "slow). Re-save it with any image program before sending."
                )
    finally:
        fp.seek(0)


#: GIF: Pillow reads every block and sub-block up to the second frame (it looks for one: ``is_animated``) in Python,
#: one call each: 3.8 MB of empty comment blocks took 0.4 s. Encoders write 255-byte sub-blocks and a few blocks
#: around the first frame (a graphic control, a loop count, a comment, XMP).
MAX_GIF_BLOCKS = 256
MAX_GIF_STRAY_BYTES = 4096
GIF_SUB_BLOCKS_BASE = 4096
GIF_SUB_BLOCK_BYTES = 128  # at least this much of the file per sub-block, on average


def check_gif_blocks(fp: BinaryIO) -> None:
    """Walk a GIF's blocks as Pillow walks them to open it and to tell whether it is animated (to the second image
    descriptor) and refuse the file whose walk would be slow: more than :data:`MAX_GIF_BLOCKS` extension blocks,
    sub-blocks smaller than :data:`GIF_SUB_BLOCK_BYTES` on average, or stray bytes between blocks. A file this walk
    cannot follow is left to Pillow to refuse."""
    try:
        data = fp.read()
    finally:
        fp.seek(0)
    size = len(data)
    limit = GIF_SUB_BLOCKS_BASE + size // GIF_SUB_BLOCK_BYTES
    blocks = sub_blocks = stray = images = 0
    at = 13 + (3 << ((data[10] & 7) + 1) if size > 10 and data[10] & 0x80 else 0)  # header, screen, its palette
    while at < size and images < 2:
        kind = data[at]
        if kind == 0x3B:  # the trailer
            break
        if kind == 0x21:  # an extension: its label, then sub-blocks
            blocks += 1
            at += 2
        elif kind == 0x2C:  # an image: its descriptor and palette, the LZW code size, then sub-blocks
            images += 1
            if images == 2 or at + 10 > size:
                break
            flags = data[at + 9]
            at += 10 + (3 << ((flags & 7) + 1) if flags & 0x80 else 0) + 1
        else:
            stray += 1
            at += 1
            if stray > MAX_GIF_STRAY_BYTES:
                raise ImageError(
                    f"The GIF has more than {MAX_GIF_STRAY_BYTES} stray bytes between its blocks (reading them is "
                    "slow). Re-save it with any image program before sending."
                )
            continue
        while at < size and data[at]:  # sub-blocks: a length byte, then that many bytes; 0 ends them
            sub_blocks += 1
            at += 1 + data[at]
            if sub_blocks > limit:
                break
        at += 1
        if blocks > MAX_GIF_BLOCKS or sub_blocks > limit:
            raise ImageError(
                f"The GIF has more than {MAX_GIF_BLOCKS} extension blocks or sub-blocks of under "
                f"{GIF_SUB_BLOCK_BYTES} bytes on average before its second frame (reading them is slow). Re-save it "
                "with any image program before sending."
            )


#: What a HEIF's main image may be: one HEVC picture, a grid of them (the tiles iPhones store photos in) or a tone
#: map (HDR photos: a picture and its gain map), whose decoding costs about the pixels it shows. Derived images that
#: stack or repeat others (``iovl`` overlays, ``iden`` chains) can make a small file decode one large picture many
#: times over; cameras do not write them.
HEIF_MAIN_ITEMS = frozenset({b"hvc1", b"grid", b"tmap"})
#: The ``meta`` box (the item list, their properties, the tiles' places) of a camera's HEIF takes a few KiB.
MAX_HEIF_META_BYTES = 1 << 20


def check_heif_main_item(fp: BinaryIO) -> None:
    """Refuse a HEIF whose main image (``pitm`` in the top ``meta`` box) is not in :data:`HEIF_MAIN_ITEMS`, or whose
    ``meta`` box is over :data:`MAX_HEIF_META_BYTES`. A file this walk cannot follow is left to libheif to refuse."""
    try:
        meta = next((body for kind, body in _boxes(fp, 0, fp.seek(0, io.SEEK_END)) if kind == b"meta"), None)
        if meta is None:
            return
        start, end = meta
        if end - start > MAX_HEIF_META_BYTES:
            raise ImageError(
                f"The HEIF's metadata (meta box) takes {end - start} bytes, more than the "
                f"{MAX_HEIF_META_BYTES >> 10} KiB a photo's does. Convert it to JPEG before sending."
            )
        fp.seek(start)
        data = fp.read(end - start)
    finally:
        fp.seek(0)
    primary, types = None, {}
    for kind, (a, b) in _boxes(io.BytesIO(data), 4, len(data)):  # meta is a full box: version and flags first
        if kind == b"pitm" and b - a >= 6:
            width = 2 if data[a] == 0 else 4  # of the item's number: version 0 or 1
            if b - a >= 4 + width:
                primary = int.from_bytes(data[a + 4 : a + 4 + width], "big")
        elif kind == b"iinf" and b - a >= 6:
            first = a + (6 if data[a] == 0 else 8)
            for entry, (c, d) in _boxes(io.BytesIO(data), first, b):
                if entry != b"infe" or d - c < 12 or data[c] < 2:  # versions 2 and 3 name the item's type
                    continue
                width = 2 if data[c] == 2 else 4  # of the item's number
                if d - c >= 10 + width:
                    item = int.from_bytes(data[c + 4 : c + 4 + width], "big")
                    types[item] = data[c + 6 + width : c + 10 + width]
    kind = types.get(primary)
    if kind is not None and kind not in HEIF_MAIN_ITEMS:
        raise ImageError(
            f"The HEIF's main image is of type {kind.decode('latin-1')!r}, not a picture or a grid of tiles as "
            "cameras write: it is not taken. Convert it to JPEG before sending."
        )


def _boxes(fp: BinaryIO, start: int, end: int, limit: int = 4096) -> Iterator[tuple[bytes, tuple[int, int]]]:
    """(type, (body start, body end)) of the ISO base media boxes from ``start`` to ``end``, headers only read (at
    most ``limit`` boxes: a walk of tiny boxes stops there)."""
    position = start
    for _ in range(limit):
        if position + 8 > end:
            return
        fp.seek(position)
        size, kind = struct.unpack(">I4s", fp.read(8))
        header = 8
        if size == 1:  # a 64-bit size follows
            if position + 16 > end:
                return
            size, header = struct.unpack(">Q", fp.read(8))[0], 16
        elif size == 0:
            size = end - position
        if size < header or position + size > end:
            return
        yield kind, (position + header, position + size)
        position += size


def decode_cost(img: Image.Image, pixels: int, stored_size: tuple[int, int] | None = None) -> int:
    """Bytes of memory decoding ``pixels`` of ``img`` (opened, not loaded) to RGB takes at its peak, estimated.
    ``stored_size``: the image's size in the file, where a JPEG is decoded at a reduced scale (``img.size`` is then
    the reduced one): a progressive JPEG holds every coefficient of the stored image whatever the scale."""
    cost = _pixels_cost(img, pixels)
    if img.format in ("JPEG", "MPO"):
        cost += progressive_jpeg_coefficients(img, stored_size or img.size) + JPEG_DECODER_BYTES
    return cost


def progressive_jpeg_coefficients(img: Image.Image, stored_size: tuple[int, int]) -> int:
    """Bytes of the coefficient buffer libjpeg fills before the first pixel of a progressive JPEG (``img`` opened,
    not loaded; 0 for any other image): 64 coefficients of 2 bytes per 8 x 8 block of each component, every scan read
    into it, at the stored size whatever the scale decoded (a 64 MP progressive JPEG: 192 MB with 4:2:0 chroma, 384
    MB with 4:4:4, 512 MB in CMYK; its baseline twin decoded at 1/8 scale took 12 MiB in all)."""
    if not is_progressive_jpeg(img):
        return 0
    layers = getattr(img, "layer", None) or []
    if not layers:
        return 0
    width, height = stored_size
    h_max, v_max = max(h for _, h, _, _ in layers), max(v for _, _, v, _ in layers)
    blocks = 0
    for _, h, v, _ in layers:  # blocks per component, rounded up to whole MCUs as libjpeg allocates them
        across = math.ceil(math.ceil(math.ceil(width * h / h_max) / 8) / h) * h
        down = math.ceil(math.ceil(math.ceil(height * v / v_max) / 8) / v) * v
        blocks += across * down
    return blocks * JPEG_BLOCK_BYTES


#: One 8 x 8 block of 16-bit DCT coefficients.
JPEG_BLOCK_BYTES = 64 * 2
#: What a JPEG's decoding takes beyond its pixels and coefficients, whatever its size (libjpeg's and Pillow's
#: buffers): 7-10 MiB measured on 16 and 64 MP JPEGs, baseline and progressive, whole and at reduced scales.
JPEG_DECODER_BYTES = 12 << 20


def is_progressive_jpeg(img: Image.Image) -> bool:
    return img.format in ("JPEG", "MPO") and bool(img.info.get("progressive") or img.info.get("progression"))


def _pixels_cost(img: Image.Image, pixels: int) -> int:
    mode = img.mode
    alpha = "A" in mode or "a" in mode or (mode == "P" and "transparency" in img.info)
    if img.format == "WEBP":
        return pixels * DECODE_BYTES_WEBP
    if img.format == "AVIF":
        return pixels * (DECODE_BYTES_AVIF_ALPHA if alpha else DECODE_BYTES_AVIF)
    if img.format == "HEIF":
        return pixels * (DECODE_BYTES_HEIF_ALPHA if alpha else DECODE_BYTES_HEIF)
    if alpha:
        return pixels * DECODE_BYTES_WITH_ALPHA
    return pixels * DECODE_BYTES_PER_PIXEL.get("I;16" if mode.startswith("I;16") else mode, 9)
