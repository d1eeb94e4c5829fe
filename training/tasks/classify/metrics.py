"""Metrics and plots of a classifier's predictions: one implementation for training and `headstart evaluate`."""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from headstart.plots import image_grid, pyplot, save_figure
from headstart.service.preprocess import PreprocessSpec, decode_for, resize_and_crop


def expected_calibration_error(probs: np.ndarray, targets: np.ndarray, bins: int = 15) -> float:
    """ECE with equal-width confidence bins (Guo et al. 2017)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == targets
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def compute_metrics(probs: np.ndarray, targets: np.ndarray, labels: Sequence[str]) -> dict:
    """accuracy, top-k, per-class precision/recall/F1, macro F1, log loss, calibration error, confusion matrix."""
    probs = np.asarray(probs, dtype=np.float64)
    targets = np.asarray(targets, dtype=np.int64)
    k = len(labels)
    n = len(targets)
    if n == 0:
        raise ValueError("No images to evaluate.")
    pred = probs.argmax(axis=1)
    cm = np.zeros((k, k), dtype=np.int64)
    np.add.at(cm, (targets, pred), 1)
    per_class = {}
    f1s = []
    for c, name in enumerate(labels):
        tp = cm[c, c]
        support = int(cm[c].sum())
        predicted = int(cm[:, c].sum())
        precision = tp / predicted if predicted else 0.0
        recall = tp / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        per_class[name] = {
            "precision": float(precision),
            "recall": float(recall),
            "f1": float(f1),
            "support": support,
        }
        if support:
            f1s.append(f1)
    ranks = np.argsort(-probs, axis=1)
    metrics = {
        "num_images": n,
        "accuracy": float((pred == targets).mean()),
        "macro_f1": float(np.mean(f1s)) if f1s else 0.0,
        "log_loss": float(-np.log(np.clip(probs[np.arange(n), targets], 1e-12, 1.0)).mean()),
        "calibration_error": expected_calibration_error(probs, targets),
        "per_class": per_class,
        "confusion_matrix": cm.tolist(),
    }
    for top in sorted({min(5, k), 3} - {1}):
        if top < k:
            metrics[f"top{top}_accuracy"] = float((ranks[:, :top] == targets[:, None]).any(axis=1).mean())
    return metrics


#: classes a confusion matrix plot shows at most: beyond, the most confused ones and a row and column for the rest
#: (300 classes drawn whole took 137 s and 8.3 GB for a 17.6 MB picture nobody can read; the counts of every class
#: are in metrics.json)
MOST_CLASSES_PLOTTED = 30


def confused_classes(cm: np.ndarray, most: int = MOST_CLASSES_PLOTTED) -> np.ndarray:
    """The indices (ascending) of the ``most`` classes with the most mistakes, as the true class or the predicted one
    (ties: the larger class first, then the first); all of them when there are at most ``most``."""
    n = len(cm)
    if n <= most:
        return np.arange(n)
    wrong = cm.sum(0) + cm.sum(1) - 2 * np.diag(cm)
    order = np.lexsort((np.arange(n), -cm.sum(1), -wrong))
    return np.sort(order[:most])


def plot_confusion_matrix(cm: Sequence[Sequence[int]], labels: Sequence[str], path: Path, title: str = "") -> None:
    """The confusion matrix with its counts; of many classes, the :data:`MOST_CLASSES_PLOTTED` most confused and
    "(N other classes)" for the rest, so that the picture stays readable and bounded."""
    plt = pyplot()
    cm = np.asarray(cm)
    shown = confused_classes(cm)
    names = [labels[i] for i in shown]
    if len(shown) < len(cm):
        rest = np.setdiff1d(np.arange(len(cm)), shown)
        cm = np.block(
            [
                [cm[np.ix_(shown, shown)], cm[np.ix_(shown, rest)].sum(1, keepdims=True)],
                [cm[np.ix_(rest, shown)].sum(0, keepdims=True), cm[np.ix_(rest, rest)].sum().reshape(1, 1)],
            ]
        )
        names.append(f"({len(rest)} other classes)")
        title = f"{title or 'confusion matrix'}: the {len(shown)} most confused of {len(labels)} classes"
    size = max(4.0, 0.5 * len(names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    # the colours scaled to the classes shown: the other classes among themselves would outweigh them all
    scale = cm[: len(shown), : len(shown)]
    ax.imshow(cm, cmap="Blues", vmin=0, vmax=max(1, scale.max()) if scale.size else 1)
    ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title or "confusion matrix")
    thresh = max(1, scale.max()) / 2 if scale.size else 0
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", color="white" if v > thresh else "black")
    save_figure(fig, path, dpi=100, tight=True)


def plot_training_curves(history: list[dict], path: Path, kept_epoch: int | None = None) -> None:
    """Loss and accuracy per epoch (train and val), the start of fine-tuning (grey dashes) and the epoch whose
    weights were kept (green dots; early stopping keeps the best, not the last)."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key, ax in (("loss", ax1), ("accuracy", ax2)):
        for split in ("train", "val"):
            values = [h.get(f"{split}_{key}") for h in history]
            if any(v is not None for v in values):
                ax.plot(epochs, values, label=split)
        ax.set_xlabel("epoch")
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    phases = [h["epoch"] for h in history if h.get("phase") == "finetune"]
    for ax in (ax1, ax2):
        if phases:
            ax.axvline(phases[0] - 0.5, color="gray", linestyle="--", label="fine-tuning starts")
        if kept_epoch is not None:
            ax.axvline(kept_epoch, color="green", linestyle=":", label=f"kept (epoch {kept_epoch})")
        ax.legend()
    save_figure(fig, path, dpi=100, tight=True)


def plot_worst_predictions(
    paths: Sequence[Path],
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    spec: PreprocessSpec,
    path: Path,
    max_images: int = 16,
) -> int:
    """Grid of the misclassified images with the most confident wrong predictions. Returns how many were drawn."""
    pred = probs.argmax(axis=1)
    wrong = np.flatnonzero(pred != targets)
    wrong = wrong[np.argsort(-probs[wrong, pred[wrong]])][:max_images]
    cols = max(1, min(4, len(wrong)))
    rows = max(1, int(np.ceil(len(wrong) / cols)))
    fig, axes = image_grid(rows, cols, (3, 3.3), title_lines=2, fontsize=8)
    for ax, i in zip(axes.ravel(), wrong, strict=False):
        ax.imshow(resize_and_crop(decode_for(paths[i], spec), spec))
        ax.set_title(
            f"{Path(paths[i]).name[:32]}\ntrue {labels[targets[i]]}, pred {labels[pred[i]]} {probs[i, pred[i]]:.2f}",
            fontsize=8,
            color="darkred",
        )
    if not len(wrong):
        axes[0, 0].text(0.5, 0.5, "no misclassified images", ha="center", va="center")
    save_figure(fig, path, dpi=80)
    return len(wrong)


def write_evaluation(
    out_dir: Path,
    probs: np.ndarray,
    targets: np.ndarray,
    labels: Sequence[str],
    paths: Sequence[Path],
    spec: PreprocessSpec,
    prefix: str = "",
) -> dict:
    """metrics + confusion matrix PNG + worst-predictions PNG into ``out_dir``; returns the metrics."""
    metrics = compute_metrics(probs, targets, labels)
    plot_confusion_matrix(metrics["confusion_matrix"], labels, out_dir / f"{prefix}confusion_matrix.png")
    plot_worst_predictions(paths, probs, targets, labels, spec, out_dir / f"{prefix}worst_predictions.png")
    return metrics


def auroc(inside: np.ndarray, outside: np.ndarray) -> float:
    """The chance that an image of ``outside`` scores higher than one of ``inside`` (ties count half)."""
    scores = np.concatenate([inside, outside])
    order = scores.argsort(kind="stable")
    ranks = np.empty(len(scores))
    ranks[order] = np.arange(1, len(scores) + 1)
    for value in np.unique(scores):  # average ranks over ties
        tied = scores == value
        ranks[tied] = ranks[tied].mean()
    n_in, n_out = len(inside), len(outside)
    return float((ranks[n_in:].sum() - n_out * (n_out + 1) / 2) / (n_in * n_out))


def open_set_metrics(own: np.ndarray, threshold: float, other: np.ndarray | None = None) -> dict:
    """How the novelty threshold treats the model's own images (``kept``: the share judged one of its classes) and,
    given images of other things, how well the score separates them (AUROC) and how many it lets through."""
    out = {"threshold": threshold, "images": len(own), "kept": float((own <= threshold).mean())}
    if other is not None and len(other):
        out |= {
            "other_images": len(other),
            "let_through": float((other <= threshold).mean()),
            "auroc": auroc(own, other),
        }
    return out


PREDICTION_COLUMNS = ("path", "label", "predicted", "score", "novelty", "unknown")


def write_predictions(
    path: Path,
    paths: Sequence[Path],
    probs: np.ndarray,
    targets: np.ndarray | None,
    labels: Sequence[str],
    novelty: np.ndarray | None = None,
    threshold: float | None = None,
) -> None:
    """predictions.csv: one row per image (path, given label, predicted label and its score, novelty and whether it
    is "none of these"); the label is empty for images without one, the novelty columns for a model without."""
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(PREDICTION_COLUMNS)
        for i, file in enumerate(paths):
            k = int(probs[i].argmax())
            score = "" if novelty is None else f"{float(novelty[i]):.6f}"
            unknown = "" if novelty is None or threshold is None else str(bool(novelty[i] > threshold)).lower()
            label = "" if targets is None or targets[i] < 0 else labels[targets[i]]
            writer.writerow([str(file), label, labels[k], f"{float(probs[i, k]):.6f}", score, unknown])
