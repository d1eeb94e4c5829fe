"""The classifier's augmentation presets (albumentations): every view ends at the model's input square."""

from __future__ import annotations

import numpy as np
from PIL import Image

from headstart.augment import CV2_INTERPOLATION, A, check_preset, shrink_for_augmentation
from headstart.service.preprocess import PreprocessSpec, preprocess


def build_augmentation(preset: str, spec: PreprocessSpec) -> A.Compose | None:
    """The training-time pipeline for ``preset``; ``None`` for "none" (training images get the eval preprocessing).

    Each pipeline ends at ``spec.input_size`` squared, RGB uint8, so its output feeds the model exactly like
    :func:`service.preprocess.preprocess`.
    """
    check_preset(preset)
    if preset == "none":
        return None
    size = (spec.input_size, spec.input_size)
    interp = CV2_INTERPOLATION[spec.interpolation]
    if preset == "light":
        transforms = [
            A.RandomResizedCrop(size=size, scale=(0.5, 1.0), interpolation=interp),
            A.HorizontalFlip(p=0.5),
        ]
    else:
        transforms = [
            A.RandomResizedCrop(size=size, scale=(0.25, 1.0), interpolation=interp),
            A.HorizontalFlip(p=0.5),
            A.Affine(
                scale=(0.9, 1.1),
                translate_percent=(-0.05, 0.05),
                rotate=(-15, 15),
                shear=(-5, 5),
                interpolation=interp,
                p=0.5,
            ),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 7)), A.GaussNoise(std_range=(0.02, 0.08))], p=0.3),
            A.CoarseDropout(
                num_holes_range=(1, 3),
                hole_height_range=(0.05, 0.2),
                hole_width_range=(0.05, 0.2),
                fill=0,
                p=0.3,
            ),
        ]
    return A.Compose(transforms)


def augmented_views(
    img: Image.Image, pipeline: A.Compose | None, spec: PreprocessSpec, views: int, seed: int
) -> np.ndarray:
    """``views`` augmented versions of one image as float32 (views, 3, S, S) in [0, 255], reproducible by seed."""
    if pipeline is None:
        return np.repeat(preprocess(img, spec)[None], views, axis=0)
    pipeline.set_random_seed(seed)
    arr = shrink_for_augmentation(img, spec)
    out = np.empty((views, 3, spec.input_size, spec.input_size), np.float32)
    for v in range(views):
        out[v] = pipeline(image=arr)["image"].transpose(2, 0, 1)
    return out
