"""Localization: where in the image, from one model run (torch-free, shared by the service and `headstart`).

Two decoders turn a model's outputs into boxes in original-image pixels; the outputs a model has (its manifest's
output names) say which:

- ``cam``: any classifier bundle. Its ``class_map`` output holds per-cell class probabilities on the backbone's
  feature grid (class activation mapping). For every class whose image-level probability reaches ``conf``, the
  class's per-cell log-probability against the others (the centred per-cell logits) is upsampled, normalised to
  [0, 1] between its lowest and highest value, and thresholded at ``region``; each connected region becomes a box
  scored by the class probability times the region's (normalised) peak.
- ``trained``: a detector bundle, one with ``boxes`` and ``scores`` outputs: every predictor's box in input pixels
  (the pyramid detector's cells at strides 8, 16 and 32, or the grid head's cells), and its score per class.

Both then map boxes back through the preprocessing (resize and centre crop, or letterbox) to the original image,
after EXIF rotation, clip them to the image, and keep the best per class with non-maximum suppression.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .contract import Model
from .errors import HeadstartError
from .fonts import LTR, Label
from .inference import open_set_answer, threshold_of
from .preprocess import PreprocessSpec, original_size, preprocess_batch, resized_size, to_rgb

#: Upsampling of the CAM grid before thresholding: 4 sub-cells per feature cell and axis.
CAM_UPSAMPLE = 4
#: Most candidate boxes that go into NMS (the best-scoring ones): a detector at conf=0 has S·S·B·K candidates.
MAX_CANDIDATES = 2000


class LocalizeError(HeadstartError, ValueError):
    """A localization parameter is out of range; the message names it and the valid range."""


#: Most boxes one image's answer may hold (``max_detections``).
MAX_DETECTIONS = 1000


@dataclass(frozen=True)
class LocalizeParams:
    """How boxes are kept: lowest ``conf``idence, NMS ``iou``, at most ``max_detections``, and the CAM ``region``
    threshold; ``boxes_if_unknown``: class activation boxes even for an image judged "none of these" (by default it
    gets none: a box round a horse labelled "ants" answers a question nobody asked). The defaults are every entry
    point's (HTTP, `headstart predict --localize`, `predict-batch`, /ui)."""

    conf: float = 0.25
    iou: float = 0.45
    max_detections: int = 100
    region: float = 0.6
    boxes_if_unknown: bool = False

    def __post_init__(self) -> None:
        for name in ("conf", "iou", "region"):
            value = getattr(self, name)
            if not (isinstance(value, int | float) and 0.0 <= value <= 1.0) or value != value:
                raise LocalizeError(f"{name} must be a number between 0 and 1, got {value!r}.")
        if not 1 <= self.max_detections <= MAX_DETECTIONS:
            raise LocalizeError(f"max_detections must be between 1 and {MAX_DETECTIONS}, got {self.max_detections}.")


#: the default parameters (:class:`LocalizeParams`)
DEFAULTS = LocalizeParams()


@dataclass(frozen=True)
class Geometry:
    """input pixel = original pixel * scale - offset, per axis; ``size`` is the original (width, height)."""

    scale_x: float
    scale_y: float
    offset_x: float
    offset_y: float
    size: tuple[int, int]

    def to_original(self, boxes: np.ndarray) -> np.ndarray:
        """(M, 4) x1 y1 x2 y2 in input pixels → original pixels, clipped to the image."""
        out = np.empty(boxes.shape, dtype=np.float64)
        out[:, [0, 2]] = ((boxes[:, [0, 2]] + self.offset_x) / self.scale_x).clip(0, self.size[0])
        out[:, [1, 3]] = ((boxes[:, [1, 3]] + self.offset_y) / self.scale_y).clip(0, self.size[1])
        return out


def geometry(size: tuple[int, int], spec: PreprocessSpec, original: tuple[int, int] | None = None) -> Geometry:
    """How :func:`service.preprocess.preprocess` placed an image decoded at ``size`` in the model input, mapping
    back to the ``original`` size it has as stored (default: ``size``; a JPEG decoded at a reduced scale is
    smaller, :func:`service.preprocess.original_size`)."""
    new_w, new_h = resized_size(size, spec)
    width, height = original or size
    if spec.fit == "pad":  # letterbox: centred, padded
        offset_x, offset_y = -((spec.input_size - new_w) // 2), -((spec.input_size - new_h) // 2)
    else:  # centre crop
        offset_x, offset_y = (new_w - spec.input_size) // 2, (new_h - spec.input_size) // 2
    return Geometry(new_w / width, new_h / height, offset_x, offset_y, (width, height))


def geometry_of(img: Image.Image, spec: PreprocessSpec) -> Geometry:
    """:func:`geometry` of a decoded image, mapping to its size as stored (boxes come back in those pixels)."""
    return geometry(img.size, spec, original_size(img))


def box_iou(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """IoU of one x1 y1 x2 y2 box with each of (M, 4) boxes."""
    x1 = np.maximum(box[0], boxes[:, 0])
    y1 = np.maximum(box[1], boxes[:, 1])
    x2 = np.minimum(box[2], boxes[:, 2])
    y2 = np.minimum(box[3], boxes[:, 3])
    inter = np.clip(x2 - x1, 0, None) * np.clip(y2 - y1, 0, None)
    area = (box[2] - box[0]) * (box[3] - box[1])
    areas = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
    return inter / np.maximum(area + areas - inter, 1e-9)


def nms(boxes: np.ndarray, scores: np.ndarray, classes: np.ndarray, iou: float, limit: int | None = None) -> np.ndarray:
    """Indices kept by per-class non-maximum suppression, best score first (ties: the lower index first); at most
    ``limit``, the same first ``limit`` as without it.

    Greedy, in score order: a candidate not suppressed is kept and suppresses the later ones of its class that
    overlap it by more than ``iou``. A candidate's fate depends only on the boxes kept before it, so with a
    ``limit`` the candidates are taken best first a few times ``limit`` at a time (a partition, not a sort of them
    all: an untrained detector has 400,000 candidates at conf 0.001), each group first held against the boxes kept
    so far. Each kept box is compared with the rest of its own class only."""
    if limit is None:
        return np.asarray(_greedy(np.argsort(-scores, kind="stable"), boxes, classes, iou, None), dtype=np.int64)
    keep: list[int] = []
    remaining = np.arange(len(scores))
    group = 8 * limit
    while len(remaining) and len(keep) < limit:
        if len(remaining) > group:
            left = scores[remaining]
            cut = np.partition(left, len(left) - group)[len(left) - group]  # the group-th best score
            taken = left >= cut  # ties with it too: every later candidate scores less
            best, remaining = remaining[taken], remaining[~taken]
        else:
            best, remaining = remaining, remaining[:0]
        best = best[np.argsort(-scores[best], kind="stable")]
        alive, best_classes = np.ones(len(best), bool), classes[best]
        for k in keep:
            same = alive & (best_classes == classes[k])
            if same.any():
                alive[same] = box_iou(boxes[k], boxes[best[same]]) <= iou
        keep += _greedy(best[alive], boxes, classes, iou, limit - len(keep))
    return np.asarray(keep, dtype=np.int64)


def _greedy(order: np.ndarray, boxes: np.ndarray, classes: np.ndarray, iou: float, limit: int | None) -> list[int]:
    """:func:`nms` over the candidates ``order`` (best first): each kept box compared with the rest of its own class
    only (each class's candidates held together, in ``order``'s order); with 80 classes, about 80 times fewer
    comparisons than with every remaining candidate."""
    grouping = np.argsort(classes[order], kind="stable")
    by_class = order[grouping]
    sorted_classes = classes[by_class]
    class_end = np.searchsorted(sorted_classes, sorted_classes, side="right")  # where each one's class ends
    place = np.empty(len(order), np.int64)
    place[grouping] = np.arange(len(order))  # order[j] is by_class[place[j]]
    keep: list[int] = []
    suppressed = np.zeros(len(order), bool)  # by place in by_class
    for at, i in zip(place, order, strict=True):
        if suppressed[at]:
            continue
        keep.append(int(i))
        if limit is not None and len(keep) >= limit:
            break
        end = class_end[at]
        if end > at + 1:
            suppressed[at + 1 : end] |= box_iou(boxes[i], boxes[by_class[at + 1 : end]]) > iou
    return keep


def _upsample(grid: np.ndarray, factor: int) -> np.ndarray:
    """Bilinear upsampling of an (H, W) map by ``factor``, sample points at sub-cell centres."""
    h, w = grid.shape
    ys = (np.arange(h * factor) + 0.5) / factor - 0.5
    xs = (np.arange(w * factor) + 0.5) / factor - 0.5
    rows = np.stack([np.interp(xs, np.arange(w), grid[r]) for r in range(h)])
    return np.stack([np.interp(ys, np.arange(h), rows[:, c]) for c in range(w * factor)], axis=1)


def _regions(values: np.ndarray, threshold: float) -> list[tuple[int, int, int, int, float]]:
    """8-connected regions of ``values >= threshold`` as (row0, row1, col0, col1, peak), inclusive bounds.

    Runs of each row are joined to the overlapping (or diagonally touching) runs of the row above with union-find:
    a few hundred Python steps for a 28 x 28 map, where a cell-by-cell flood fill took milliseconds.
    """
    mask = values >= threshold
    runs: list[tuple[int, int, int]] = []  # (row, start, end exclusive)
    row_runs: list[list[int]] = []
    for r in range(mask.shape[0]):
        edges = np.flatnonzero(np.diff(np.concatenate(([0], mask[r].view(np.int8), [0]))))
        row_runs.append(list(range(len(runs), len(runs) + len(edges) // 2)))
        runs += [(r, int(a), int(b)) for a, b in zip(edges[::2], edges[1::2], strict=True)]
    parent = list(range(len(runs)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for r in range(1, mask.shape[0]):
        for i in row_runs[r]:
            for j in row_runs[r - 1]:
                if runs[j][1] <= runs[i][2] and runs[i][1] <= runs[j][2]:  # overlap, diagonal contact included
                    parent[find(i)] = find(j)
    regions: dict[int, list[float]] = {}
    for i, (r, a, b) in enumerate(runs):
        peak = float(values[r, a:b].max())
        box = regions.setdefault(find(i), [r, r, a, b - 1, peak])
        box[0], box[1] = min(box[0], r), max(box[1], r)
        box[2], box[3], box[4] = min(box[2], a), max(box[3], b - 1), max(box[4], peak)
    return [(int(r0), int(r1), int(c0), int(c1), peak) for r0, r1, c0, c1, peak in regions.values()]


def cam_boxes(
    probs: np.ndarray, class_map: np.ndarray, input_size: int, params: LocalizeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Class activation maps of one image → (boxes in input pixels, scores, classes), before NMS."""
    boxes, scores, classes = [], [], []
    # per-cell softmax saturates near an object; centred log-probabilities are the per-cell logits minus their mean
    # (the log-sum-exp cancels), the contrast between classes that class activation mapping looks at
    log_p = np.log(np.clip(class_map.astype(np.float64), 1e-30, None))
    contrast = log_p - log_p.mean(axis=0, keepdims=True)
    for k in np.nonzero(probs >= params.conf)[0]:
        grid = _upsample(contrast[k], CAM_UPSAMPLE)
        low, peak = float(grid.min()), float(grid.max())
        if peak - low < 1e-6:  # a flat map says nothing about where
            continue
        norm = (grid - low) / (peak - low)
        step = input_size / grid.shape[1], input_size / grid.shape[0]
        for r0, r1, c0, c1, peak in _regions(norm, params.region):
            boxes.append([c0 * step[0], r0 * step[1], (c1 + 1) * step[0], (r1 + 1) * step[1]])
            scores.append(float(probs[k]) * peak)
            classes.append(int(k))
    return (
        np.asarray(boxes, np.float64).reshape(-1, 4),
        np.asarray(scores, np.float64),
        np.asarray(classes, np.int64),
    )


def trained_boxes(
    boxes: np.ndarray, scores: np.ndarray, params: LocalizeParams
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A detector's (M, 4) boxes and (M, K) class scores of one image → candidates above ``conf``, before NMS."""
    cells, classes = np.nonzero(scores >= params.conf)
    return (
        boxes[cells].astype(np.float64),
        scores[cells, classes].astype(np.float64),
        classes.astype(np.int64),
    )


def method_of(output_names: Sequence[str]) -> str:
    """How a model's outputs say where things are: ``trained`` boxes (a detector's ``boxes`` and ``scores``), or
    ``cam`` (a classifier's ``class_map``)."""
    if "boxes" in output_names and "scores" in output_names:
        return "trained"
    if "class_map" in output_names:
        return "cam"
    raise LocalizeError(
        f"This model has no outputs to localize with ({', '.join(output_names)}): it needs boxes and "
        "scores, or a class_map. Re-export it with this headstart."
    )


def detections_of(
    outputs: dict[str, np.ndarray],
    method: str,
    geom: Geometry,
    labels: Sequence[str],
    input_size: int,
    params: LocalizeParams,
) -> list[dict]:
    """One image's model outputs (by name) → detections in original pixels, best first, after NMS."""
    if method == "trained":
        boxes, scores, classes = trained_boxes(outputs["boxes"], outputs["scores"], params)
    else:
        boxes, scores, classes = cam_boxes(outputs["probabilities"], outputs["class_map"], input_size, params)
    if len(boxes) == 0:
        return []
    if len(scores) > MAX_CANDIDATES:
        top = np.argpartition(-scores, MAX_CANDIDATES)[:MAX_CANDIDATES]
        boxes, scores, classes = boxes[top], scores[top], classes[top]
    boxes = geom.to_original(boxes)
    valid = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    boxes, scores, classes = boxes[valid], scores[valid], classes[valid]
    keep = nms(boxes, scores, classes, params.iou, params.max_detections)
    return [
        {
            "label": labels[classes[i]],
            "index": int(classes[i]),
            "confidence": float(scores[i]),
            "box": dict(zip(("x1", "y1", "x2", "y2"), (round(float(v), 2) for v in boxes[i]), strict=True)),
        }
        for i in keep
    ]


def localize_images(
    model: Model, images: Sequence[Image.Image], params: LocalizeParams | None = None, threshold: float | None = None
) -> list[dict]:
    """Decoded images → one ``{"detections", "grid", "image_size", "method", "scores", "outputs"}`` per image, with the
    open-set answer (``novelty``, ``novelty_threshold``, ``unknown``: :func:`service.inference.open_set_answer`;
    ``threshold`` overrides the model's). ``outputs``: the image's outputs by name (`headstart predict --localize
    --heatmap` draws its heatmap from them; not for JSON).

    ``scores`` are the image-level class scores of the same run (what `classify` answers), so a client needs one
    request for both what and where. The outputs the model has decide how (:func:`method_of`). An image judged
    "none of these" gets no class activation boxes unless ``params.boxes_if_unknown``.
    """
    params = params or LocalizeParams()
    if not images:
        return []
    method = method_of(model.output_names)
    spec = model.spec
    outputs = model.run(preprocess_batch(images, spec))
    limit = threshold_of(model, threshold)
    results = []
    for n, img in enumerate(images):
        per_image = {name: out[n] for name, out in zip(model.output_names, outputs, strict=True)}
        answer = open_set_answer(per_image.get("novelty") if limit is not None else None, limit)
        hidden = bool(answer["unknown"]) and method == "cam" and not params.boxes_if_unknown
        detections = (
            []
            if hidden
            else detections_of(per_image, method, geometry_of(img, spec), model.labels, spec.input_size, params)
        )
        results.append(
            {
                "detections": detections,
                "grid": model.feature_map,
                "image_size": list(original_size(img)),
                "method": method,
                "scores": per_image[model.output_names[0]],  # the image-level class probabilities come first
                "outputs": per_image,
                **answer,
            }
        )
    return results


PALETTE = [
    (230, 25, 75),
    (60, 180, 75),
    (0, 130, 200),
    (245, 130, 48),
    (145, 30, 180),
    (70, 240, 240),
    (240, 50, 230),
    (210, 245, 60),
    (0, 128, 128),
    (170, 110, 40),
]


#: Longest side of a drawn image (/localize_image): a 24 KB 1-bit 8000 x 8000 PNG came back as a 27 MB JPEG; at
#: 2048 pixels the answer is at most about 1-2 MB whatever was sent.
MAX_DRAWN_SIDE = 2048


def draw_detections(img: Image.Image, detections: Sequence[dict]) -> Image.Image:
    """A copy of the image (RGB, at the scale it was decoded at, at most :data:`MAX_DRAWN_SIDE` on its longer side)
    with each detection's box (in the image's pixels as stored: :func:`service.preprocess.original_size`) and
    ``label confidence`` drawn on it."""
    canvas = to_rgb(img)
    if max(canvas.size) > MAX_DRAWN_SIDE:
        scale = MAX_DRAWN_SIDE / max(canvas.size)
        canvas = canvas.resize(
            (max(1, round(canvas.width * scale)), max(1, round(canvas.height * scale))), Image.BILINEAR
        )
    else:
        canvas = canvas.copy()
    sx, sy = (canvas.size[i] / original_size(img)[i] for i in (0, 1))
    detections = [{**d, "box": {k: v * (sx if k[0] == "x" else sy) for k, v in d["box"].items()}} for d in detections]
    draw = ImageDraw.Draw(canvas)
    width = max(2, round(max(canvas.size) / 300))
    size = max(12, round(max(canvas.size) / 40))
    for det in reversed(detections):  # best drawn last, on top
        color = PALETTE[det["index"] % len(PALETTE)]
        b = det["box"]
        draw.rectangle((b["x1"], b["y1"], b["x2"], b["y2"]), outline=color, width=width)
        text = Label(f"{det['label']}{LTR} {det['confidence']:.2f}", size)
        left, top, right, bottom = text.bbox(draw, (b["x1"], b["y1"]))
        y = b["y1"] - (bottom - top) - 2 * width if b["y1"] - (bottom - top) - 2 * width >= 0 else b["y1"]
        x = max(0, min(b["x1"], canvas.width - (right - left) - 2 * width))  # a box at the right edge: label inside
        draw.rectangle((x, y, x + (right - left) + 2 * width, y + (bottom - top) + 2 * width), fill=color)
        text.draw(draw, (x + width - (left - b["x1"]), y + width - (top - b["y1"])), fill=(255, 255, 255))
    return canvas
