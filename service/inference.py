"""Running a model: classification through any model (a bundle, or a run directory), with its open-set answer
("none of these") where the model has a novelty score, one code path for `headstart predict`, batch prediction and
the HTTP service; and the one loop that runs a model batch by batch over image files."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from .ahead import load_batches
from .contract import Model
from .preprocess import PreprocessSpec, preprocess

#: pixels (N, 3, S, S) float32 in [0, 255] → the model's outputs for them
RunFn = Callable[[np.ndarray], Sequence[np.ndarray]]


#: the most classes an answer lists (more than a model's labels: all of them)
MAX_TOP_K = 1000
#: novelty is a cosine distance: 0 to 2
MAX_NOVELTY = 2.0


def check_answer_options(
    top_k: int = 5, novelty_threshold: float | None = None, label_threshold: float | None = None
) -> None:
    """ValueError naming the first answer option out of its range (the service answers it with a 400, `headstart
    predict` and the Python API say it before any image is read): ``top_k`` 1 to :data:`MAX_TOP_K`,
    ``novelty_threshold`` 0 to :data:`MAX_NOVELTY`, ``label_threshold`` 0 to 1; NaN is out of every range."""
    if not 1 <= top_k <= MAX_TOP_K:
        raise ValueError(f"top_k must be between 1 and {MAX_TOP_K}, got {top_k}.")
    if novelty_threshold is not None and not 0.0 <= novelty_threshold <= MAX_NOVELTY:
        raise ValueError(f"novelty_threshold must be between 0 and {MAX_NOVELTY:g}, got {novelty_threshold}.")
    if label_threshold is not None and not 0.0 <= label_threshold <= 1.0:
        raise ValueError(f"label_threshold must be between 0 and 1, got {label_threshold}.")


def outputs_of_batches(run: RunFn, batches: Iterable[np.ndarray]) -> list[np.ndarray]:
    """Every output of ``run`` over batches of model input, each output concatenated over the batches."""
    parts = [list(run(pixels)) for pixels in batches]
    return [np.concatenate(output) for output in zip(*parts, strict=True)]


def outputs_of_files(
    run: RunFn,
    paths: Sequence[str | Path],
    spec: PreprocessSpec,
    batch_size: int = 32,
    sizes: list | None = None,
    decode: Callable[[str | Path], Image.Image] | None = None,
) -> list[np.ndarray]:
    """Every output of ``run`` (a :class:`Model`'s ``run``, an ONNX session's, a torch model's) over image files,
    decoded and preprocessed as the service does, ``batch_size`` at a time; ``sizes`` and ``decode`` as
    :func:`load_batches`."""
    return outputs_of_batches(run, load_batches(paths, spec, batch_size, sizes, decode))


def scores_of_files(
    model: Model, paths: Sequence[str | Path], decode: Callable[[str | Path], Image.Image] | None = None
) -> tuple[np.ndarray, np.ndarray | None]:
    """A classifier's probabilities (N, K) on image files and, where it has a novelty score, each image's novelty
    (N,), else None: :func:`scores_and_novelty` over files (``decode`` as :func:`load_batches`)."""

    def run(pixels: np.ndarray) -> list[np.ndarray]:
        return [out for out in scores_and_novelty(model, pixels) if out is not None]

    outputs = outputs_of_files(run, paths, model.spec, decode=decode)
    return outputs[0], outputs[1] if len(outputs) > 1 else None


def top_k(probs: np.ndarray, labels: Sequence[str], k: int) -> list[dict]:
    """The ``k`` best classes of one probability vector as ``{"label", "index", "score"}``, best first."""
    order = np.argsort(-probs, kind="stable")[: max(1, min(k, len(labels)))]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in order]


def present_labels(
    model: Model, probs: np.ndarray, override: float | None = None, unknown: bool | None = None
) -> list[dict]:
    """What the model says the image holds (an answer's ``labels``): for a multi-label model, every label whose
    probability reaches its threshold (the label's own where the export chose one, else the global one;
    ``override``: one threshold for all), best first, possibly none; for a model whose labels exclude each other,
    its best class. None for an image that is "none of these" (``unknown``: unlike everything the model learned)."""
    thresholds, labels = model.thresholds, model.labels
    if unknown:
        return []
    if thresholds is None:
        best = int(np.argmax(probs))
        return [{"label": labels[best], "index": best, "score": float(probs[best])}]
    limits = np.array(
        [
            override if override is not None else thresholds["per_label"].get(name, thresholds["global"])
            for name in labels
        ]
    )
    present = [i for i in np.argsort(-probs, kind="stable") if probs[i] >= limits[i]]
    return [{"label": labels[i], "index": int(i), "score": float(probs[i])} for i in present]


def threshold_of(model: Model, override: float | None = None) -> float | None:
    """The novelty threshold in force: ``override`` (a request's, or the service's setting), else the model's own;
    None for a model without a novelty score."""
    if model.open_set is None:
        return None
    return float(model.open_set["threshold"] if override is None else override)


def open_set_answer(novelty: float | None, threshold: float | None) -> dict:
    """``novelty``, ``novelty_threshold`` and ``unknown`` (novelty above the threshold: none of the model's classes)
    of one image; all None for a model without a novelty score."""
    if novelty is None or threshold is None:
        return {"novelty": None, "novelty_threshold": None, "unknown": None}
    return {"novelty": float(novelty), "novelty_threshold": threshold, "unknown": bool(novelty > threshold)}


def gives_novelty(model: Model) -> bool:
    """Whether a run of ``model`` gives a novelty score to answer with: an open set and a ``novelty`` output."""
    return model.open_set is not None and "novelty" in model.output_names


def scores_and_novelty(model: Model, pixels: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Class probabilities (N, K) and, for a model with a novelty score, each image's novelty (N,)."""
    if not gives_novelty(model):
        return model.predict(pixels), None
    probs, novelty = model.run(pixels, [model.output_names[0], "novelty"])
    return probs, novelty


def classify_images(
    model: Model,
    images: Sequence[Image.Image],
    k: int = 5,
    threshold: float | None = None,
    label_threshold: float | None = None,
) -> list[dict]:
    """One answer per decoded RGB image: ``predictions`` (top-k, best first), the open-set answer
    (:func:`open_set_answer`; ``threshold`` overrides the model's) and ``labels``, what the image holds
    (:func:`present_labels`; ``label_threshold`` overrides a multi-label model's thresholds)."""
    return classify_arrays(model, [preprocess(img, model.spec) for img in images], k, threshold, label_threshold)


def classify_arrays(
    model: Model,
    arrays: Sequence[np.ndarray],
    k: int = 5,
    threshold: float | None = None,
    label_threshold: float | None = None,
) -> list[dict]:
    """As :func:`classify_images`, for preprocessed images (each 3 x S x S, from
    :func:`service.preprocess.preprocess`)."""
    if not len(arrays):
        return []
    probs, novelty = scores_and_novelty(model, np.stack(arrays))
    return classify_scores(model, probs, novelty, k, threshold, label_threshold)


def classify_scores(
    model: Model,
    probs: np.ndarray,
    novelty: np.ndarray | None,
    k: int = 5,
    threshold: float | None = None,
    label_threshold: float | None = None,
) -> list[dict]:
    """:func:`classify_arrays`' answers from the class probabilities (N, K) and novelty scores (N,) of a run that
    computed them (with more outputs: `headstart predict --heatmap` draws the class maps of the same run)."""
    limit = threshold_of(model, threshold)
    return [
        classified(model, p, open_set_answer(None if novelty is None else novelty[i], limit), k, label_threshold)
        for i, p in enumerate(probs)
    ]


def classified(model: Model, probs: np.ndarray, answer: dict, k: int = 5, label_threshold: float | None = None) -> dict:
    """One image's answer from its class probabilities and its open-set ``answer`` (:func:`open_set_answer`'s):
    what :func:`classify_images` gives, also from a run that computed more (:func:`service.localize.localize_images`'
    ``scores``)."""
    return {
        "predictions": top_k(probs, model.labels, k),
        **{key: answer[key] for key in ("novelty", "novelty_threshold", "unknown")},
        "labels": present_labels(model, probs, label_threshold, answer["unknown"]),
    }
