"""Box-aware augmentation for detection: every view ends letterboxed to the input size, its boxes moved with it."""

from __future__ import annotations

import albumentations as A
import cv2
import numpy as np
from PIL import Image

from service.localize import geometry
from service.preprocess import PAD_VALUE, PreprocessSpec, preprocess
from training.augment import CV2_INTERPOLATION, PRESETS
from training.detect_data import DetSample


def build_detection_augmentation(preset: str, spec: PreprocessSpec) -> A.Compose | None:
    """Box-aware training pipeline ending in a letterboxed ``input_size`` square; ``None`` for "none"."""
    if preset not in PRESETS:
        raise ValueError(f"Invalid augmentation preset {preset!r}. Only {', '.join(PRESETS)} are supported.")
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


def detection_views(
    img: Image.Image,
    sample: DetSample,
    pipeline: A.Compose | None,
    spec: PreprocessSpec,
    views: int,
    seed: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``views`` augmented versions of an image: pixels (V, 3, S, S) and per view (M, 5) targets."""
    if pipeline is None:
        targets = letterbox_targets(sample, img.size, spec)
        return np.repeat(preprocess(img, spec)[None], views, axis=0), [targets] * views
    pipeline.set_random_seed(seed)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    out = np.empty((views, 3, spec.input_size, spec.input_size), np.float32)
    targets = []
    for v in range(views):
        res = pipeline(image=arr, bboxes=sample.boxes, classes=sample.classes)
        out[v] = res["image"].transpose(2, 0, 1)
        boxes = np.asarray(res["bboxes"], np.float32).reshape(-1, 4)
        targets.append(np.concatenate([np.asarray(res["classes"], np.float32).reshape(-1, 1), boxes], 1))
    return out, targets
