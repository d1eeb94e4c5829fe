"""Box-aware augmentation for detection: every view ends letterboxed to the input size, its boxes moved with it."""

from __future__ import annotations

from collections.abc import Callable

import cv2
import numpy as np
from PIL import Image

from headstart.augment import CV2_INTERPOLATION, A, check_preset
from headstart.service.localize import geometry
from headstart.service.preprocess import PAD_VALUE, PreprocessSpec, preprocess
from headstart.tasks.detect.data import DetSample


def build_detection_augmentation(preset: str, spec: PreprocessSpec) -> A.Compose | None:
    """Box-aware training pipeline ending in a letterboxed ``input_size`` square; ``None`` for "none"."""
    check_preset(preset)
    if preset == "none":
        return None
    size = spec.input_size
    interp = CV2_INTERPOLATION[spec.interpolation]
    transforms = [
        A.LongestMaxSize(max_size=size, interpolation=interp),
        A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE),
    ]
    if preset == "light":
        transforms += [A.HorizontalFlip(p=0.5), A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.5)]
    else:
        transforms += [
            A.Affine(
                scale=(0.7, 1.3),
                translate_percent=(-0.15, 0.15),
                interpolation=interp,
                border_mode=cv2.BORDER_CONSTANT,
                fill=PAD_VALUE,
                p=0.8,
            ),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.2),
        ]
    return A.Compose(
        transforms,
        bbox_params=A.BboxParams(
            format="yolo", label_fields=["classes"], min_visibility=0.3, clip=True, filter_invalid_bboxes=True
        ),
    )


def letterbox_targets(sample: DetSample, size: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """A sample's boxes mapped like the service's letterbox: (M, 5) class, cx, cy, w, h normalised to the input."""
    geom = geometry(size, spec)
    w, h = size
    cx, cy, bw, bh = sample.boxes.T
    x1 = ((cx - bw / 2) * w * geom.scale_x - geom.offset_x) / spec.input_size
    x2 = ((cx + bw / 2) * w * geom.scale_x - geom.offset_x) / spec.input_size
    y1 = ((cy - bh / 2) * h * geom.scale_y - geom.offset_y) / spec.input_size
    y2 = ((cy + bh / 2) * h * geom.scale_y - geom.offset_y) / spec.input_size
    return np.stack([sample.classes.astype(np.float32), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)


#: (image (H, W, 3) uint8, classes (M,), boxes (M, 4) YOLO cx cy w h normalised)
Labelled = tuple[np.ndarray, np.ndarray, np.ndarray]


def mosaic(images: list[Labelled], size: int, rng: np.random.Generator, min_visible: float = 0.3) -> Labelled:
    """Four labelled images around a random centre of a ``size`` square (YOLOv4/v5's mosaic): each scaled to a
    random 35-75% of the square's side, cut where it leaves the square; boxes cut with it, and dropped when less
    than ``min_visible`` of them remains or they end smaller than 2 pixels. Objects come out smaller and in new
    company, which is what 128 images lack."""
    canvas = np.full((size, size, 3), PAD_VALUE, np.uint8)
    xc, yc = (int(v) for v in rng.uniform(0.3 * size, 0.7 * size, 2))
    all_cls, all_boxes = [], []
    for k, (arr, classes, boxes) in enumerate(images[:4]):
        h0, w0 = arr.shape[:2]
        scale = rng.uniform(0.35, 0.75) * size / max(h0, w0)
        w, h = max(1, round(w0 * scale)), max(1, round(h0 * scale))
        x0 = xc - w if k in (0, 2) else xc  # where the scaled image's top-left corner lands
        y0 = yc - h if k in (0, 1) else yc
        cx1, cy1, cx2, cy2 = max(x0, 0), max(y0, 0), min(x0 + w, size), min(y0 + h, size)
        if cx2 <= cx1 or cy2 <= cy1:
            continue
        small = cv2.resize(arr, (w, h), interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR)
        canvas[cy1:cy2, cx1:cx2] = small[cy1 - y0 : cy2 - y0, cx1 - x0 : cx2 - x0]
        if not len(classes):
            continue
        px = np.stack(
            [
                (boxes[:, 0] - boxes[:, 2] / 2) * w + x0,
                (boxes[:, 1] - boxes[:, 3] / 2) * h + y0,
                (boxes[:, 0] + boxes[:, 2] / 2) * w + x0,
                (boxes[:, 1] + boxes[:, 3] / 2) * h + y0,
            ],
            1,
        )
        cut = np.stack(
            [px[:, 0].clip(cx1, cx2), px[:, 1].clip(cy1, cy2), px[:, 2].clip(cx1, cx2), px[:, 3].clip(cy1, cy2)], 1
        )
        area = (px[:, 2] - px[:, 0]) * (px[:, 3] - px[:, 1])
        kept = (cut[:, 2] - cut[:, 0]) * (cut[:, 3] - cut[:, 1])
        ok = (
            (kept >= min_visible * np.maximum(area, 1e-9)) & (cut[:, 2] - cut[:, 0] >= 2) & (cut[:, 3] - cut[:, 1] >= 2)
        )
        all_cls.append(classes[ok])
        all_boxes.append(cut[ok])
    cls = np.concatenate(all_cls) if all_cls else np.zeros(0, np.int64)
    px = np.concatenate(all_boxes) if all_boxes else np.zeros((0, 4))
    yolo = (
        np.stack([(px[:, 0] + px[:, 2]) / 2, (px[:, 1] + px[:, 3]) / 2, px[:, 2] - px[:, 0], px[:, 3] - px[:, 1]], 1)
        / size
    )
    return canvas, cls.astype(np.int64), yolo.astype(np.float32).reshape(-1, 4)


def detection_views(
    img: Image.Image,
    sample: DetSample,
    pipeline: A.Compose | None,
    spec: PreprocessSpec,
    views: int,
    seed: int,
    mosaic_share: float = 0.0,
    partners: Callable[[np.random.Generator], list[Labelled]] | None = None,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``views`` augmented versions of an image: pixels (V, 3, S, S) and per view (M, 5) targets. With
    ``mosaic_share``, that share of the views (on average) are a :func:`mosaic` of the image and three
    ``partners``, then go through the same pipeline."""
    if pipeline is None:
        targets = letterbox_targets(sample, img.size, spec)
        return np.repeat(preprocess(img, spec)[None], views, axis=0), [targets] * views
    pipeline.set_random_seed(seed)
    rng = np.random.default_rng(seed)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    out = np.empty((views, 3, spec.input_size, spec.input_size), np.float32)
    targets = []
    for v in range(views):
        image, classes, boxes = arr, sample.classes, sample.boxes
        if mosaic_share > 0 and partners is not None and rng.random() < mosaic_share:
            image, classes, boxes = mosaic([(arr, classes, boxes), *partners(rng)], spec.input_size, rng)
        res = pipeline(image=image, bboxes=boxes, classes=classes)
        out[v] = res["image"].transpose(2, 0, 1)
        boxes = np.asarray(res["bboxes"], np.float32).reshape(-1, 4)
        targets.append(np.concatenate([np.asarray(res["classes"], np.float32).reshape(-1, 1), boxes], 1))
    return out, targets
