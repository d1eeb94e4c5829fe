"""What every task's augmentation shares: the presets, OpenCV's interpolations, the recipe stored with each run
(and part of the feature-cache key), and the downscaling of large photos before random crops. Each task builds its
own pipelines (``training/tasks/NAME/augment.py``)."""

from __future__ import annotations

import json
import sys
from types import ModuleType

import cv2
import numpy as np
from PIL import Image

from headstart.config import AUGMENT_PRESETS as PRESETS
from headstart.service.preprocess import PreprocessSpec


def _import_albumentations() -> ModuleType:
    """albumentations, imported without huggingface_hub where nothing has imported that yet: albumentations imports
    it (and with it httpx, httpcore and trio) only to push pipelines to the Hugging Face Hub and pull them from it,
    which headstart never does, and its import falls back when it is missing (``core/hub_mixin.py``: ``except
    ImportError``). Importing albumentations after torch: 0.93 -> 0.53 s (2-core AMD EPYC, median of 3); a training
    run's imports (``headstart.engine`` and the classifier's augmentation, a new process each, 7 alternated): 2.30 ->
    2.11 s. A later import of huggingface_hub (timm's weights) is not affected."""
    if "albumentations" in sys.modules or "huggingface_hub" in sys.modules:
        import albumentations

        return albumentations
    sys.modules["huggingface_hub"] = None  # type: ignore[assignment]  # `import huggingface_hub` raises ImportError
    try:
        import albumentations
    finally:
        if "huggingface_hub" in sys.modules and sys.modules["huggingface_hub"] is None:
            del sys.modules["huggingface_hub"]
    return albumentations


#: albumentations, as every task's augmentation imports it (``from headstart.augment import A``)
A = _import_albumentations()

CV2_INTERPOLATION = {
    "nearest": cv2.INTER_NEAREST,
    "bilinear": cv2.INTER_LINEAR,
    "bicubic": cv2.INTER_CUBIC,
    "lanczos": cv2.INTER_LANCZOS4,
}


def check_preset(preset: str) -> None:
    if preset not in PRESETS:
        raise ValueError(f"Invalid augmentation preset {preset!r}. Only {', '.join(PRESETS)} are supported.")


def recipe(task: str, preset: str, pipeline: A.Compose | None, spec: PreprocessSpec) -> dict:
    """A JSON-able description of the augmentation, stored with the run and part of the feature-cache key."""
    return {
        "task": task,
        "preset": preset,
        "albumentations_version": A.__version__,
        "pipeline": A.to_dict(pipeline) if pipeline is not None else None,
        "eval_preprocess": spec.to_dict(),
    }


def recipe_key(rec: dict) -> str:
    return json.dumps(rec, sort_keys=True, default=str)


def shrink_for_augmentation(img: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Downscale very large photos before random crops (cost scales with pixels; crops end at input_size anyway)."""
    limit = 2 * spec.resize
    if min(img.size) > limit:
        scale = limit / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)
