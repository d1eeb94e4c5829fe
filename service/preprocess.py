"""Image decoding and preprocessing shared by training, evaluation, export checks and serving.

The contract: a model takes float32 RGB pixels in [0, 255], NCHW, of ``spec.input_size`` squared; normalisation by
mean/std happens inside the model (and the exported ONNX graph). ``preprocess`` is the only function that turns a
decoded image into that tensor, so training's evaluation and the service cannot drift apart.
"""

from __future__ import annotations

import contextlib
import io
import math
import threading
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import ImageError
from .formats import (
    MAX_DECODE_BYTES,
    PYTHON_DECODERS,
    allowed_formats,
    decode_cost,
    is_progressive_jpeg,
    refuse_before_open,
    unread_format,
)
from .settings import SETTINGS

#: Largest image (in pixels) that is decoded. Larger images are refused rather than risking memory exhaustion
#: (decompression bombs). 64 MP covers every camera photo (HEADSTART_MAX_IMAGE_PIXELS: service/settings.py).
MAX_IMAGE_PIXELS = SETTINGS.max_image_pixels
#: Smallest side accepted; smaller images carry no usable content for a 224 px model.
MIN_IMAGE_SIDE = 2

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


FITS = ("crop", "pad")
#: Letterbox padding colour (the grey YOLO detectors use).
PAD_VALUE = (114, 114, 114)


@dataclass(frozen=True)
class PreprocessSpec:
    """How an image becomes model input.

    ``fit="crop"`` (classifiers): resize the shorter side to ``resize``, centre-crop ``input_size``.
    ``fit="pad"`` (detectors, which must see the whole image): resize the longer side to ``input_size`` and pad the
    rest evenly with grey (letterbox); ``resize`` is not used.

    ``mean``/``std`` are applied inside the model to pixels scaled to [0, 1]; they are recorded here so the
    manifest describes the whole pipeline.
    """

    input_size: int = 224
    resize: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    color: str = "RGB"
    pixel_range: tuple[float, float] = field(default=(0.0, 255.0))
    layout: str = "NCHW"
    fit: str = "crop"

    def __post_init__(self) -> None:
        if self.fit not in FITS:
            raise ValueError(f"Invalid fit {self.fit!r}. Use one of {FITS}.")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"Invalid interpolation {self.interpolation!r}. Use one of {sorted(INTERPOLATIONS)}.")
        if self.resize < self.input_size:
            raise ValueError(f"resize ({self.resize}) must be at least input_size ({self.input_size}).")
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError("mean and std need three values each (R, G, B).")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> PreprocessSpec:
        known = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        for key in ("mean", "std", "pixel_range"):
            if key in known:
                known[key] = tuple(float(v) for v in known[key])
        return cls(**known)


#: Longest side over shortest side accepted. A few hundred bytes of PNG can declare a 2 x 30,000,000 image, within
#: the pixel limit but useless to a square model; panoramas and long screenshots stay well below 100.
MAX_ASPECT_RATIO = SETTINGS.max_aspect_ratio  # HEADSTART_MAX_ASPECT_RATIO
#: Progressive JPEG decoding costs about scans x pixels: 500 repeated scans (33 KB) made one 2048 x 2048 image cost
#: 1.3 s of CPU here (benchmarks/RESULTS.md, "Hostile input"). Camera and web JPEGs have 1 to about 12 scans; the
#: budget (about 1.3 s on this CPU) still admits a 64 MP image with 30 scans.
MAX_JPEG_SCANS = 100
MAX_JPEG_SCAN_PIXELS = 2_000_000_000
_CHUNK = 1 << 20
EXIF_ORIENTATION = 0x0112
#: JPEGs are decoded at the smallest DCT scale (1, 1/2, 1/4 or 1/8: libjpeg scales while it decodes) whose shorter
#: side is still this many times the spec's ``resize``: an 8 MP photo for a 256 px resize decodes at 1/4 (816 x 612)
#: instead of whole, about 3x faster, and the resize that follows starts from twice the pixels it keeps. Training
#: augmentation shrinks photos to the same twice anyway. The other formats have no reduced decoding in Pillow (nor
#: libheif, libavif): they are reduced once decoded (``Image.reduce``) to :data:`REDUCED_MARGIN` times as much.
DECODE_MARGIN = 2
#: A large image of another format keeps this many times the ``min_side`` a JPEG keeps (:func:`decode_image`): a box
#: is a blunter filter than libjpeg's scaling (at 1x, 2 of 153 enlarged photos changed answer; at 2x, none).
REDUCED_MARGIN = 2


def _open(source: bytes | str | Path) -> BinaryIO:
    """A file object for ``source``, after the checks that need no decoder."""
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("The image is empty (0 bytes). Send the file's contents.")
        return io.BytesIO(source)
    path = Path(source)
    if not path.is_file():
        raise ImageError(f"{path} does not exist or is not a file.")
    if path.stat().st_size == 0:
        raise ImageError("The image is empty (0 bytes). Send the file's contents.")
    return path.open("rb")


def count_jpeg_scans(fp: BinaryIO) -> int:
    """Start-of-scan markers in a JPEG stream: an upper bound on its scans (an EXIF thumbnail adds its own)."""
    count, tail = 0, b""
    fp.seek(0)
    while chunk := fp.read(_CHUNK):
        block = tail + chunk
        count += block.count(b"\xff\xda")  # in entropy-coded data 0xFF is always followed by 0x00 or RSTn
        tail = block[-1:]
    fp.seek(0)
    return count


def _check_work(img: Image.Image, fp: BinaryIO, max_pixels: int) -> None:
    """Refuse, before decoding, an image whose decoding would cost more memory or time than allowed."""
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"The image is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed. "
            "Downscale it before sending."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(f"The image is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} pixels.")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise ImageError(
            f"The image is {width}x{height}, more than {MAX_ASPECT_RATIO:g} times longer than wide. "
            "Crop it to the part that matters before sending."
        )
    for tile in img.tile:
        if tile[0] in PYTHON_DECODERS:
            raise ImageError(
                f"{PYTHON_DECODERS[tile[0]]} images are not taken: their decoding is slow. Re-save the image as PNG "
                "or JPEG."
            )
    if img.format in ("JPEG", "MPO"):
        scans = count_jpeg_scans(fp)
        if scans > MAX_JPEG_SCANS or scans * width * height > MAX_JPEG_SCAN_PIXELS:
            raise ImageError(
                f"The JPEG has {scans} scans for {width}x{height} pixels: more decoding work than allowed (at most "
                f"{MAX_JPEG_SCANS} scans and {MAX_JPEG_SCAN_PIXELS:.0e} pixel-scans). Re-save it as a JPEG with any "
                "image program before sending."
            )


_quiet_lock = threading.Lock()
_quiet_decodes = 0
_quiet_saved: warnings.catch_warnings | None = None


@contextlib.contextmanager
def _warnings_quiet() -> Iterator[None]:
    """Warnings ignored while any thread decodes (PIL warns instead of raising for a damaged TIFF or EXIF block, and
    between MAX_IMAGE_PIXELS and twice that, which is checked here: a damaged file decodes or raises, never logs).

    ``warnings.catch_warnings`` saves the process's filters on entry and puts them back on exit, so two threads each
    with their own, overlapping, left "ignore every warning" in place for good (a thread's entry saved the other's
    filter) or decoded with none. One is held here, entered by the first decoding thread and left by the last.
    """
    global _quiet_decodes, _quiet_saved
    with _quiet_lock:
        if _quiet_decodes == 0:
            _quiet_saved = warnings.catch_warnings()
            _quiet_saved.__enter__()
            warnings.simplefilter("ignore")
        _quiet_decodes += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_decodes -= 1
            if _quiet_decodes == 0:
                saved, _quiet_saved = _quiet_saved, None
                saved.__exit__(None, None, None)


def decode_image(
    source: bytes | str | Path,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    min_side: int | None = None,
    max_bytes: int = MAX_DECODE_BYTES,
) -> Image.Image:
    """Decode an image into RGB with EXIF orientation applied.

    The format is identified by the bytes, from :func:`service.formats.allowed_formats` (HEIC and AVIF included
    where installed: their own rotation applied too); the work is bounded before decoding (pixels, aspect ratio,
    JPEG scans, the memory it takes by format and mode, PNG chunks, Netpbm headers, no decoder written in Python).
    Palette, grayscale, RGBA (composited on white), CMYK and 16-bit images are converted; animated images give their
    first frame. With ``min_side`` a JPEG is decoded at the smallest DCT scale whose shorter side is at least
    ``min_side`` (:func:`decode_for` says how much a model needs), and any other image, decoded whole, is reduced by
    the largest whole factor that keeps twice that (box averages: ``Image.reduce``; a box is a blunter filter than
    libjpeg's scaling, hence the wider margin); the image's size before that reduction, after EXIF rotation, is
    :func:`original_size`. Raises :class:`ImageError`, and nothing else, for any input that cannot be used: empty,
    another format, corrupt, truncated, too large or degenerate.
    """
    fp = _open(source)
    try:
        with _warnings_quiet():  # safe with several threads decoding at once
            refuse_before_open(fp)
            img = Image.open(fp, formats=allowed_formats())
            _check_work(img, fp, max_pixels)
            if getattr(img, "is_animated", False):
                img.seek(0)
            full, jpeg = img.size, img.format in ("JPEG", "MPO")
            if min_side is not None and jpeg and min(full) >= 2 * min_side:
                scale = min_side / min(full)
                img.draft(img.mode, (max(1, math.ceil(full[0] * scale)), max(1, math.ceil(full[1] * scale))))
            cost = decode_cost(img, img.size[0] * img.size[1], full)
            if cost > max_bytes:
                progressive = is_progressive_jpeg(img)  # libjpeg holds all its coefficients, whatever the scale
                raise ImageError(
                    f"Decoding this {full[0]}x{full[1]} {'progressive JPEG' if progressive else img.format} "
                    f"({img.mode}) image would take about {cost >> 20} MiB, more than the {max_bytes >> 20} MiB "
                    "allowed. "
                    + (
                        "Save it again as a baseline (not progressive) JPEG, or downscale it."
                        if progressive
                        else "Downscale it, or send it as JPEG or as PNG without transparency."
                    )
                )
            img.load()
            quarter_turn = quarter_turned(img)
            ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
            img = to_rgb(img)
            keep = None if min_side is None or jpeg else REDUCED_MARGIN * min_side  # no reduced decoding: reduced
            if keep is not None and min(img.size) >= 2 * keep:  # now (box averages), to REDUCED_MARGIN x the JPEG's
                img = img.reduce(min(img.size) // keep)
            img.info["original_size"] = full[::-1] if quarter_turn else full
            return img
    except ImageError:
        raise
    except UnidentifiedImageError as exc:
        fp.seek(0)
        raise ImageError(unread_format(fp.read(64))) from exc
    except Image.DecompressionBombError as exc:
        raise ImageError(f"The image is too large to decode safely ({exc}).") from exc
    except MemoryError as exc:
        raise ImageError("The image is too large to decode in the memory available. Downscale it.") from exc
    except Exception as exc:  # decoders raise OSError, SyntaxError, ValueError, struct.error, IndexError, ...
        raise ImageError(
            f"The image is corrupt or truncated and cannot be decoded ({type(exc).__name__}: {exc})."
        ) from exc
    finally:
        fp.close()


def decode_for(source: bytes | str | Path, spec: PreprocessSpec) -> Image.Image:
    """Decode an image for a model with ``spec``: a JPEG at the smallest DCT scale that still leaves
    :data:`DECODE_MARGIN` times the pixels its preprocessing keeps, a large image of any other format reduced to
    twice that after its decoding (what is held after decoding, and the resize that follows, bounded by the
    output). Training, evaluation, the export's checks, serving and batch prediction all decode this way, so a
    model is trained on exactly what it is served."""
    return decode_image(source, min_side=decode_side(spec))


def decode_side(spec: PreprocessSpec) -> int:
    """The shorter side :func:`decode_for` keeps at least for ``spec``: all of the spec its decoding depends on (two
    specs with the same decode an image alike)."""
    return DECODE_MARGIN * spec.resize


def quarter_turned(img: Image.Image) -> bool:
    """Whether the image's EXIF orientation turns it a quarter (5 to 8): upright, its width and height swap."""
    return img.getexif().get(EXIF_ORIENTATION, 1) in (5, 6, 7, 8)


def original_size(img: Image.Image) -> tuple[int, int]:
    """The (width, height) of the image as stored, after EXIF rotation, whatever scale it was decoded at."""
    return tuple(img.info.get("original_size", img.size))


def _to_uint8(img: Image.Image) -> np.ndarray:
    """Single-channel 16-bit, 32-bit or float pixels to 8 bits, a band of rows at a time (bounded temporaries)."""
    arr = np.asarray(img)
    out = np.empty(arr.shape, np.uint8)
    rows = max(1, _CHUNK // max(1, arr.shape[1]))
    if img.mode.startswith("I;16"):
        for y in range(0, arr.shape[0], rows):  # round(x * 255 / 65535), exactly: x / 257 never ends in .5
            out[y : y + rows] = (arr[y : y + rows].astype(np.uint32) + 128) // 257
        return out
    lo, hi = float(arr.min()), float(arr.max())
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    for y in range(0, arr.shape[0], rows):
        out[y : y + rows] = np.clip((arr[y : y + rows].astype(np.float64) - lo) * scale, 0, 255).round()
    return out


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        return Image.fromarray(_to_uint8(img), mode="L").convert("RGB")
    if mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "RGBa", "La", "PA"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def resized_size(size: tuple[int, int], spec: PreprocessSpec) -> tuple[int, int]:
    """The (width, height) an image of ``size`` is resized to before the crop or the padding."""
    width, height = size
    if spec.fit == "pad":
        scale = spec.input_size / max(width, height)
        return max(1, min(spec.input_size, round(width * scale))), max(1, min(spec.input_size, round(height * scale)))
    scale = spec.resize / min(width, height)
    return max(spec.input_size, round(width * scale)), max(spec.input_size, round(height * scale))


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The model's ``input_size`` square: centre crop after resizing the shorter side, or letterbox (``fit``).

    The crop is taken in the source's coordinates and only that box is resampled, so the memory used is bounded by
    the output size, whatever the image's shape (resizing a 2 x 20,000 image whole before cropping would allocate
    256 x 2,560,000 pixels).
    """
    new_w, new_h = resized_size(img.size, spec)
    resample = INTERPOLATIONS[spec.interpolation]
    size = spec.input_size
    if spec.fit == "pad":
        canvas = Image.new("RGB", (size, size), PAD_VALUE)
        canvas.paste(img.resize((new_w, new_h), resample), ((size - new_w) // 2, (size - new_h) // 2))
        return canvas
    sx, sy = img.width / new_w, img.height / new_h
    left, top = (new_w - size) // 2, (new_h - size) // 2
    box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    return img.resize((size, size), resample, box=box)


def preprocess(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """RGB image → float32 array (3, input_size, input_size) of pixels in [0, 255]."""
    arr = np.asarray(resize_and_crop(to_rgb(img), spec), dtype=np.float32)
    return np.ascontiguousarray(arr.transpose(2, 0, 1))


def preprocess_batch(images: Sequence[Image.Image], spec: PreprocessSpec) -> np.ndarray:
    """Decoded images → float32 (N, 3, S, S), the model's input."""
    return (
        np.stack([preprocess(img, spec) for img in images])
        if len(images)
        else np.zeros((0, 3, spec.input_size, spec.input_size), np.float32)
    )
