"""Why a classifier answered what it did: its class activation map as a heatmap over the image (torch-free).

The ``class_map`` output of a classifier holds, per cell of the backbone's feature grid, the head's class
probabilities. For one class (the top one unless asked), the cell's log-probability of that class against the others
(as :mod:`service.localize` uses it for boxes) is scaled to [0, 1] over the grid, smoothed up to the image and laid
over it in colour: warm where the image looks most like that class. The model only saw the centre crop, so the rest
of the image is dimmed. The picture is at most :data:`MAX_SIDE` pixels on its longer side, whatever the upload's
size, with a caption naming the class and its score (and "none of these" where the model judges so).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .contract import Model
from .fonts import LTR, Label
from .inference import open_set_answer, threshold_of
from .localize import LocalizeError, geometry
from .preprocess import preprocess_batch, to_rgb

#: the longest side of the heatmap picture, in pixels
MAX_SIDE = 1024
#: how much of the colour goes over the image (the rest is the image)
OPACITY = 0.5
#: a perceptual colour scale from cool (low) to warm (high): the control points of matplotlib's "inferno"
_INFERNO = np.array(
    [
        (0, 0, 4),
        (40, 11, 84),
        (101, 21, 110),
        (159, 42, 99),
        (212, 72, 66),
        (245, 125, 21),
        (250, 193, 39),
        (252, 255, 164),
    ],
    dtype=np.float64,
)


@dataclass(frozen=True)
class Heatmap:
    image: Image.Image  # RGB, at most MAX_SIDE on its longer side
    index: int  # the class shown
    label: str
    score: float  # its image-level probability
    answer: dict  # the open-set answer (service.inference.open_set_answer)


def colour(values: np.ndarray) -> np.ndarray:
    """(H, W) values in [0, 1] → (H, W, 3) uint8 colours of the scale."""
    stops = np.linspace(0.0, 1.0, len(_INFERNO))
    return np.stack([np.interp(values, stops, _INFERNO[:, c]) for c in range(3)], axis=-1).round().astype(np.uint8)


def class_contrast(class_map: np.ndarray, index: int) -> np.ndarray:
    """(K, H, W) per-cell probabilities → the (H, W) log-probability of class ``index`` against the others' mean,
    scaled to [0, 1] (0 everywhere for a flat map)."""
    log_p = np.log(np.clip(class_map.astype(np.float64), 1e-30, None))
    contrast = log_p[index] - log_p.mean(axis=0)
    low, high = float(contrast.min()), float(contrast.max())
    return (contrast - low) / (high - low) if high - low > 1e-9 else np.zeros_like(contrast)


def require_class_map(model: Model) -> None:
    """Refuse, with :class:`LocalizeError`, a model that has no class activation map to draw a heatmap from."""
    if "class_map" not in model.output_names:
        raise LocalizeError(
            "This model has no class activation map (class_map output): heatmaps are for classifiers. A detector "
            "answers where with /localize (headstart predict --localize; localize=True in Python)."
        )


def heatmap(
    model: Model,
    img: Image.Image,
    index: int | None = None,
    threshold: float | None = None,
    outputs: dict[str, np.ndarray] | None = None,
) -> Heatmap:
    """The heatmap of class ``index`` (None: the top class) over the decoded image ``img``. ``outputs``: the image's
    outputs by name (without the batch axis) where a run over its batch computed them (`headstart predict
    --heatmap`: the answer and its heatmap from one run); else the model runs on the image."""
    require_class_map(model)
    rgb = to_rgb(img)
    if outputs is None:
        batch = model.run(preprocess_batch([rgb], model.spec))
        outputs = {name: output[0] for name, output in zip(model.output_names, batch, strict=True)}
    probs = outputs[model.output_names[0]]
    if index is None or index < 0:
        index = int(probs.argmax())
    if index >= len(model.labels):
        raise LocalizeError(f"index must be below {len(model.labels)} (the model's classes), got {index}.")
    limit = threshold_of(model, threshold)
    answer = open_set_answer(outputs["novelty"] if limit is not None else None, limit)
    scale = min(1.0, MAX_SIDE / max(rgb.size))
    canvas = rgb.resize((max(1, round(rgb.width * scale)), max(1, round(rgb.height * scale))), Image.BILINEAR)
    _overlay(canvas, class_contrast(outputs["class_map"], index), geometry(rgb.size, model.spec), scale, model)
    result = Heatmap(canvas, index, model.labels[index], float(probs[index]), answer)
    _caption(result)
    return result


def _overlay(canvas: Image.Image, values: np.ndarray, geom, scale: float, model: Model) -> None:
    """Lay the (H, W) ``values`` over the part of ``canvas`` the model saw (the crop), dimming the rest."""
    size = model.spec.input_size
    # the crop's corners in the canvas's pixels: input pixel = original * scale_x - offset_x
    x0, x1 = (np.array([0, size]) + geom.offset_x) / geom.scale_x * scale
    y0, y1 = (np.array([0, size]) + geom.offset_y) / geom.scale_y * scale
    box = tuple(round(float(v)) for v in (max(0, x0), max(0, y0), min(canvas.width, x1), min(canvas.height, y1)))
    pixels = np.asarray(canvas, dtype=np.float64) * 0.45  # outside the crop: dimmed
    width, height = box[2] - box[0], box[3] - box[1]
    if width > 0 and height > 0:
        heat = Image.fromarray(values.astype(np.float32), mode="F").resize((width, height), Image.BICUBIC)
        warm = colour(np.clip(np.asarray(heat), 0.0, 1.0))
        inside = np.asarray(canvas, dtype=np.float64)[box[1] : box[3], box[0] : box[2]]
        pixels[box[1] : box[3], box[0] : box[2]] = (1 - OPACITY) * inside + OPACITY * warm
    canvas.paste(Image.fromarray(pixels.round().astype(np.uint8), "RGB"))


def _caption(result: Heatmap) -> None:
    text = f"heatmap: {result.label}{LTR} {result.score:.2f}"
    if result.answer["unknown"]:
        text += f" | none of these (novelty {result.answer['novelty']:.2f})"
    draw = ImageDraw.Draw(result.image)
    label = Label(text, max(12, round(max(result.image.size) / 40)))
    left, top, right, bottom = label.bbox(draw, (0, 0))
    draw.rectangle((0, 0, right - left + 8, bottom - top + 8), fill=(0, 0, 0))
    label.draw(draw, (4 - left, 4 - top), fill=(255, 255, 255))
