"""Multi-label metrics: average precision per label, mAP (macro over the labels present, and micro), thresholds
chosen on validation, precision / recall / F1 per label at them, sample-F1; the plots and per-image predictions.

Thresholds: one global threshold (the one that maximises micro-F1 over the validation images), and a threshold of a
label's own only where that label has at least ``min_positives`` validation positives. With a handful of positives a
per-label threshold fits those few images (any threshold between the scores of two neighbouring positives gives the
same validation F1, and the one picked is chance), so the rarer labels share the global one.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart.plots import image_grid, pyplot, save_figure
from headstart.service.preprocess import PreprocessSpec, decode_for, resize_and_crop

CANDIDATES = np.round(np.arange(0.02, 0.99, 0.01), 2)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float | None:
    """Step-wise average precision (the mean of the precision at each positive, ranked by score); None without a
    positive."""
    positives = int(truth.sum())
    if positives == 0:
        return None
    order = np.argsort(-scores, kind="stable")
    hits = truth[order] > 0
    precision = np.cumsum(hits) / np.arange(1, len(hits) + 1)
    return float(precision[hits].sum() / positives)


def mean_average_precision(probs: np.ndarray, truth: np.ndarray) -> dict:
    """``map_macro`` (the mean AP over the labels with a positive), ``map_micro`` (AP of every image-label pair
    pooled) and ``ap`` per label index (None without a positive)."""
    per_label = [average_precision(probs[:, k], truth[:, k]) for k in range(truth.shape[1])]
    present = [ap for ap in per_label if ap is not None]
    micro = average_precision(probs.ravel(), truth.ravel())
    return {"map_macro": float(np.mean(present)) if present else None, "map_micro": micro, "ap": per_label}


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    return np.where(2 * tp + fp + fn > 0, 2 * tp / np.maximum(2 * tp + fp + fn, 1), 0.0)


def choose_thresholds(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], min_positives: int) -> dict:
    """The global threshold (best micro-F1 on these images) and per-label thresholds for the labels with at least
    ``min_positives`` positives here (best F1 of that label); ties go to the threshold nearest 0.5."""
    pred = probs[None] >= CANDIDATES[:, None, None]  # (T, N, K)
    tp = (pred & (truth[None] > 0)).sum(axis=1)
    fp = (pred & (truth[None] == 0)).sum(axis=1)
    fn = ((~pred) & (truth[None] > 0)).sum(axis=1)
    tie = np.abs(CANDIDATES - 0.5) * 1e-9
    micro = _f1(tp.sum(1), fp.sum(1), fn.sum(1)) - tie
    global_t = float(CANDIDATES[int(np.argmax(micro))])
    per_label = {}
    for k, label in enumerate(labels):
        if truth[:, k].sum() >= min_positives:
            per_label[label] = float(CANDIDATES[int(np.argmax(_f1(tp[:, k], fp[:, k], fn[:, k]) - tie))])
    return {
        "global": global_t,
        "per_label": per_label,
        "min_label_positives": min_positives,
        "chosen_on": f"{len(probs)} validation images",
    }


def threshold_vector(thresholds: dict, labels: Sequence[str]) -> np.ndarray:
    """Each label's threshold in force: its own, else the global one."""
    return np.array([thresholds["per_label"].get(label, thresholds["global"]) for label in labels], np.float32)


def at_thresholds(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], thresholds: dict) -> dict:
    """Precision, recall and F1 per label at the thresholds in force; micro and macro F1; sample-F1 (the F1 of each
    image's predicted label set against its true one, averaged; an image with neither counts 1)."""
    pred = probs >= threshold_vector(thresholds, labels)
    positive = truth > 0
    tp, fp, fn = (pred & positive).sum(0), (pred & ~positive).sum(0), (~pred & positive).sum(0)
    precision = np.where(tp + fp > 0, tp / np.maximum(tp + fp, 1), 0.0)
    recall = np.where(tp + fn > 0, tp / np.maximum(tp + fn, 1), 0.0)
    f1 = _f1(tp, fp, fn)
    itp, ifp, ifn = (pred & positive).sum(1), (pred & ~positive).sum(1), (~pred & positive).sum(1)
    sample = np.where(itp + ifp + ifn > 0, 2 * itp / np.maximum(2 * itp + ifp + ifn, 1), 1.0)
    has = positive.sum(0) > 0
    return {
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1[has].mean()) if has.any() else None,
        "sample_f1": float(sample.mean()),
        "exact_match": float((pred == positive).all(1).mean()),
        "per_label": {
            label: {
                "positives": int(positive[:, k].sum()),
                "precision": float(precision[k]),
                "recall": float(recall[k]),
                "f1": float(f1[k]),
            }
            for k, label in enumerate(labels)
        },
    }


def evaluation(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], thresholds: dict) -> dict:
    """Every figure of one set of images: mAP, the thresholds' figures, per-label AP."""
    maps = mean_average_precision(probs, truth)
    scores = at_thresholds(probs, truth, labels, thresholds)
    for k, label in enumerate(labels):
        scores["per_label"][label]["ap"] = maps["ap"][k]
    return {
        "num_images": len(probs),
        "map_macro": maps["map_macro"],
        "map_micro": maps["map_micro"],
        **{k: v for k, v in scores.items()},
        "thresholds": thresholds,
    }


def plot_precision_recall(probs: np.ndarray, truth: np.ndarray, labels: Sequence[str], path: Path) -> None:
    """Micro-averaged precision-recall curve, and those of the (at most 8) labels with the most positives."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 5))

    def curve(scores: np.ndarray, t: np.ndarray, **style) -> None:
        order = np.argsort(-scores, kind="stable")
        hits = t[order] > 0
        if not hits.any():
            return
        ax.plot(np.cumsum(hits) / hits.sum(), np.cumsum(hits) / np.arange(1, len(hits) + 1), **style)

    curve(probs.ravel(), truth.ravel(), color="black", linewidth=2, label="micro")
    for k in np.argsort(-truth.sum(0))[:8]:
        if truth[:, k].sum():
            curve(probs[:, k], truth[:, k], linewidth=1, label=f"{labels[k]} ({int(truth[:, k].sum())})")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    save_figure(fig, path, dpi=100, tight=True)


def worst_images(probs: np.ndarray, truth: np.ndarray, limit: int = 12) -> np.ndarray:
    """The images whose scores are furthest from their labels (the sum of |truth - score|), worst first."""
    return np.argsort(-np.abs(truth - probs).sum(1), kind="stable")[:limit]


def plot_worst(
    paths: Sequence[Path],
    probs: np.ndarray,
    truth: np.ndarray,
    labels: Sequence[str],
    thresholds: dict,
    spec: PreprocessSpec,
    path: Path,
) -> None:
    """The worst images with their file names, true labels and predicted labels (those at or above threshold)."""
    worst = worst_images(probs, truth)
    limits = threshold_vector(thresholds, labels)
    cols = max(1, min(4, len(worst)))
    rows = max(1, int(np.ceil(len(worst) / cols)))
    fig, axes = image_grid(rows, cols, (3.2, 3.6), title_lines=3, fontsize=7)
    for ax, i in zip(axes.ravel(), worst, strict=False):
        ax.imshow(resize_and_crop(decode_for(paths[i], spec), spec))
        true = ", ".join(labels[k] for k in np.flatnonzero(truth[i])) or "(none)"
        pred = ", ".join(labels[k] for k in np.flatnonzero(probs[i] >= limits)) or "(none)"
        ax.set_title(f"{Path(paths[i]).name[:30]}\ntrue: {true[:40]}\npred: {pred[:40]}", fontsize=7, color="darkred")
    save_figure(fig, path, dpi=80)


def write_predictions(
    path: Path,
    paths: Sequence[Path],
    probs: np.ndarray,
    truth: np.ndarray | None,
    labels: Sequence[str],
    thresholds,
    novelty: np.ndarray | None = None,
    novelty_threshold: float | None = None,
) -> None:
    """One row per image: its file, true labels (when known), predicted labels (at the thresholds) and every label's
    score; with a novelty score, the image's ``novelty`` and ``unknown`` ("none of these": served with no labels)."""
    limits = threshold_vector(thresholds, labels)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["image", "labels", "predicted", "scores", *(["novelty", "unknown"] if novelty is not None else [])]
        )
        for i, image in enumerate(paths):
            true = "" if truth is None else " ".join(labels[k] for k in np.flatnonzero(truth[i]))
            pred = " ".join(labels[k] for k in np.flatnonzero(probs[i] >= limits))
            scores = json.dumps({label: round(float(p), 4) for label, p in zip(labels, probs[i], strict=True)})
            extra = [] if novelty is None else [round(float(novelty[i]), 4), bool(novelty[i] > novelty_threshold)]
            writer.writerow([str(image), true, pred, scores, *extra])
