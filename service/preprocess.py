"""Image decoding and preprocessing shared by training, evaluation, export checks and serving.

The contract: a model takes float32 RGB pixels in [0, 255], NCHW, of ``spec.input_size`` squared; normalisation by
mean/std happens inside the model (and the exported ONNX graph). ``preprocess`` is the only function that turns a
decoded image into that tensor, so training's evaluation and the service cannot drift apart.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

#: Largest image (in pixels) that is decoded. Larger images are refused rather than risking memory exhaustion
#: (decompression bombs). 64 MP covers every camera photo; override with HEADSTART_MAX_IMAGE_PIXELS.
MAX_IMAGE_PIXELS = int(os.environ.get("HEADSTART_MAX_IMAGE_PIXELS", 64_000_000))
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


class ImageError(ValueError):
    """The bytes given cannot be used as an image. The message says why and what to do."""


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
            raise ValueError(
                f"Invalid interpolation {self.interpolation!r}. Use one of {sorted(INTERPOLATIONS)}."
            )
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


def _open(source: bytes | str | Path) -> Image.Image:
    if isinstance(source, bytes | bytearray | memoryview):
        if len(source) == 0:
            raise ImageError("The image is empty (0 bytes). Send the file's contents.")
        fp = io.BytesIO(source)
    else:
        fp = Path(source)
        if not fp.is_file():
            raise ImageError(f"{fp} does not exist or is not a file.")
        if fp.stat().st_size == 0:
            raise ImageError("The image is empty (0 bytes). Send the file's contents.")
    try:
        with warnings.catch_warnings():
            # PIL warns (instead of raising) between MAX_IMAGE_PIXELS and twice that; we check ourselves below.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(fp)
    except Image.DecompressionBombError as exc:
        raise ImageError(f"The image is too large to decode safely ({exc}).") from exc
    except UnidentifiedImageError as exc:
        raise ImageError(
            "The data is not an image format that can be read (JPEG, PNG, GIF, BMP, TIFF, WebP are)."
        ) from exc
    except OSError as exc:
        raise ImageError(f"The image is corrupt or truncated and cannot be opened: {exc}.") from exc
    return img


def decode_image(source: bytes | str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """Decode an image fully into RGB with EXIF orientation applied.

    Palette, grayscale, RGBA (composited on white), CMYK and 16-bit images are converted; animated images give their
    first frame. Raises :class:`ImageError` for empty, unreadable, truncated, too large or degenerate images.
    """
    img = _open(source)
    width, height = img.size
    if width * height > max_pixels:
        raise ImageError(
            f"The image is {width}x{height} = {width * height} pixels, more than the {max_pixels} allowed. "
            "Downscale it before sending."
        )
    if min(width, height) < MIN_IMAGE_SIDE:
        raise ImageError(
            f"The image is {width}x{height}; each side must be at least {MIN_IMAGE_SIDE} pixels."
        )
    try:
        if getattr(img, "is_animated", False):
            img.seek(0)
        img.load()
        ImageOps.exif_transpose(img, in_place=True)  # no copy when there is nothing to rotate
        return to_rgb(img)
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageError(f"The image is corrupt or truncated and cannot be decoded: {exc}.") from exc


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB."""
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        if mode.startswith("I;16"):
            lo, hi = 0.0, 65535.0
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale, 0, 255).round().astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
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
        return max(1, min(spec.input_size, round(width * scale))), max(
            1, min(spec.input_size, round(height * scale))
        )
    scale = spec.resize / min(width, height)
    return max(spec.input_size, round(width * scale)), max(spec.input_size, round(height * scale))


def resize_and_crop(img: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """The model's ``input_size`` square: centre crop after resizing the shorter side, or letterbox (``fit``)."""
    new_w, new_h = resized_size(img.size, spec)
    img = img.resize((new_w, new_h), INTERPOLATIONS[spec.interpolation])
    if spec.fit == "pad":
        canvas = Image.new("RGB", (spec.input_size, spec.input_size), PAD_VALUE)
        canvas.paste(img, ((spec.input_size - new_w) // 2, (spec.input_size - new_h) // 2))
        return canvas
    left = (new_w - spec.input_size) // 2
    top = (new_h - spec.input_size) // 2
    return img.crop((left, top, left + spec.input_size, top + spec.input_size))


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


def load_batches(paths: Sequence[str | Path], spec: PreprocessSpec, batch_size: int) -> Iterator[np.ndarray]:
    """Image files → model input, ``batch_size`` images at a time (decoded with :func:`decode_image`)."""
    for start in range(0, len(paths), batch_size):
        yield preprocess_batch([decode_image(p) for p in paths[start : start + batch_size]], spec)
