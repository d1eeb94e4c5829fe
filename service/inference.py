"""Classification through a model (a bundle, or a run directory): one code path for `headstart predict` and the HTTP service."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from PIL import Image

from service.contract import Model
from service.preprocess import preprocess


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    """The ``k`` best classes of one probability vector as ``{"label", "index", "score"}``, best first."""
    order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(labels)))]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in order]


def classify_images(model: Model, images: Sequence[Image.Image], k: int = 5) -> list[list[dict]]:
    """Top-k predictions for decoded RGB images, one list per image."""
    return classify_arrays(model, [preprocess(img, model.spec) for img in images], k)


def classify_arrays(model: Model, arrays: Sequence[np.ndarray], k: int = 5) -> list[list[dict]]:
    """Top-k predictions for preprocessed images (each 3 x S x S, from :func:`service.preprocess.preprocess`)."""
    if not len(arrays):
        return []
    probs = model.predict(np.stack(arrays))
    return [top_k(p, model.labels, k) for p in probs]
