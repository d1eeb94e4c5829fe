"""Running a model: classification through any model (a bundle, or a run directory), one code path for
`headstart predict` and the HTTP service; and the one loop that runs a model batch by batch over image files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from service.contract import Model
from service.preprocess import PreprocessSpec, load_batches, preprocess

#: pixels (N, 3, S, S) float32 in [0, 255] → the model's outputs for them
RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]


def outputs_of_batches(run: RunFn, batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Every output of ``run`` over batches of model input, each output concatenated over the batches."""
    parts = [list(run(pixels)) for pixels in batches]
    return [np.concatenate(output) for output in zip(*parts, strict=True)]


def outputs_of_files(
    run: RunFn, paths: Sequence[str | Path], spec: PreprocessSpec, batch_size: int = 32, sizes: list | None = None
) -> list[np.ndarray]:
    """Every output of ``run`` (a :class:`Model`'s ``run``, an ONNX session's, a torch model's) over image files,
    decoded and preprocessed as the service does, ``batch_size`` at a time; ``sizes`` as :func:`load_batches`."""
    return outputs_of_batches(run, load_batches(paths, spec, batch_size, sizes))


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
