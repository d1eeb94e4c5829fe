"""A data audit of what the classifier learned from: likely label errors, near-duplicates and outliers.

Written after training into ``audit.json`` (every finding with its file) and ``audit.png`` (the top ones), from the
clean frozen features of the training and validation images:

- **label issues**: a training image whose given label both an out-of-fold classifier (5-fold logistic regression on
  the features: each image scored by a model that never saw it) and its nearest training neighbours disagree with.
  Scored by how little the two give the given label (their mean probability of it); the suggested label is what they
  give most.
- **near-duplicates**: pairs of images, within or across the splits, whose features are almost the same direction
  (cosine similarity at least :data:`DUPLICATE_SIMILARITY`; identical files score 1). Across train and val they leak
  the answer into validation; within a split they weigh one picture twice.
- **outliers**: training images far from the rest of their own class: the mean cosine distance to their nearest
  same-class neighbours, as a robust z-score within the class (median and MAD); at least :data:`OUTLIER_Z` is
  flagged. Often a wrong picture, a wrong crop, or a kind of image the class needs more of.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from headstart.plots import image_grid, save_figure

log = logging.getLogger("headstart")

#: cosine similarity of the frozen features from which two images count as near-duplicates (the closest distinct
#: photos of hymenoptera score 0.85; a resized, recompressed copy above 0.97)
DUPLICATE_SIMILARITY = 0.95
#: robust z-score of the distance to its own class from which a training image is an outlier
OUTLIER_Z = 3.5
#: neighbours the label vote and the outlier distance use
NEIGHBOURS = 10
#: findings of each kind kept in audit.json
MOST = 100


def _normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def out_of_fold_probabilities(x: np.ndarray, y: np.ndarray, classes: int, seed: int, folds: int = 5) -> np.ndarray:
    """(N, K) class probabilities of each image from an L2-regularised logistic regression fitted on the other
    folds (a fold per class-stratified fifth)."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), int)
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = np.arange(len(members)) % folds
    out = np.full((len(y), classes), 1.0 / classes)
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    with torch.random.fork_rng():  # seeded here, the caller's generator untouched
        for f in range(folds):
            held, fit = fold == f, fold != f
            if held.any() and len(np.unique(y[fit])) >= 2:
                torch.manual_seed(seed + f)
                out[held] = _logistic(xt[fit], torch.from_numpy(y[fit]), classes)(xt[held]).numpy()
    return out


def _logistic(x: torch.Tensor, y: torch.Tensor, classes: int):
    """An L2-regularised logistic regression fitted with L-BFGS; returns features → class probabilities."""
    linear = torch.nn.Linear(x.shape[1], classes)
    opt = torch.optim.LBFGS(linear.parameters(), lr=1.0, max_iter=100, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(linear(x), y) + 1e-3 * linear.weight.square().sum()
        loss.backward()
        return loss

    opt.step(closure)
    return lambda z: torch.softmax(linear(z), dim=1).detach()


def neighbour_votes(similarity: np.ndarray, y: np.ndarray, classes: int, k: int = NEIGHBOURS) -> np.ndarray:
    """(N, K): the share of each class among each training image's ``k`` nearest other training images,
    weighted by similarity."""
    sim = similarity.copy()
    np.fill_diagonal(sim, -np.inf)
    k = min(k, len(y) - 1)
    nearest = np.argpartition(-sim, k - 1, axis=1)[:, :k]
    weights = np.clip(np.take_along_axis(sim, nearest, axis=1), 1e-6, None)
    votes = np.zeros((len(y), classes))
    np.add.at(votes, (np.repeat(np.arange(len(y)), k), y[nearest].ravel()), weights.ravel())
    return votes / votes.sum(axis=1, keepdims=True)


def label_issues(x: np.ndarray, y: np.ndarray, labels: list[str], paths: list[str], seed: int) -> list[dict]:
    """Training images whose label the out-of-fold classifier and the neighbours both dispute, worst first."""
    k = len(labels)
    similarity = x @ x.T
    p = (out_of_fold_probabilities(x, y, k, seed) + neighbour_votes(similarity, y, k)) / 2
    suggested = p.argmax(axis=1)
    found = np.flatnonzero(suggested != y)
    found = found[np.argsort(p[found, y[found]], kind="stable")]
    sim = similarity.copy()
    np.fill_diagonal(sim, -np.inf)
    return [
        {
            "path": paths[i],
            "given": labels[y[i]],
            "suggested": labels[suggested[i]],
            "score": round(float(1 - p[i, y[i]]), 4),
            "neighbours": [paths[j] for j in np.argsort(-sim[i])[:3]],
        }
        for i in found[:MOST]
    ]


def near_duplicates(x: np.ndarray, splits: list[str], paths: list[str], sha: list[str]) -> list[dict]:
    """Pairs of images (any splits) at least :data:`DUPLICATE_SIMILARITY` alike, or identical files; most alike
    first, pairs across train and val before the others."""
    similarity = x @ x.T
    same_file = np.asarray(sha)[:, None] == np.asarray(sha)[None, :]
    i, j = np.nonzero(np.triu((similarity >= DUPLICATE_SIMILARITY) | same_file, k=1))
    pairs = [
        {
            "paths": [paths[a], paths[b]],
            "splits": f"{splits[a]}-{splits[b]}" if splits[a] <= splits[b] else f"{splits[b]}-{splits[a]}",
            "similarity": round(float(min(similarity[a, b], 1.0)), 4),
            "identical_files": bool(same_file[a, b]),
        }
        for a, b in zip(i, j, strict=True)
    ]
    pairs.sort(key=lambda p: (p["splits"] != "train-val", -p["similarity"]))
    return pairs[:MOST]


def outliers(x: np.ndarray, y: np.ndarray, labels: list[str], paths: list[str]) -> list[dict]:
    """Training images furthest from their own class (robust z-score of the mean distance to their nearest
    same-class neighbours), furthest first; ``outlier`` where the score reaches :data:`OUTLIER_Z`."""
    found = []
    for c, name in enumerate(labels):
        members = np.flatnonzero(y == c)
        if len(members) < 4:
            continue
        sim = x[members] @ x[members].T
        np.fill_diagonal(sim, -np.inf)
        k = min(NEIGHBOURS, len(members) - 1)
        distance = 1 - np.sort(sim, axis=1)[:, -k:].mean(axis=1)
        median = np.median(distance)
        spread = 1.4826 * np.median(np.abs(distance - median)) or 1e-6
        for m, d in zip(members, distance, strict=True):
            z = (d - median) / spread
            found.append({"path": paths[m], "label": name, "distance": round(float(d), 4), "z": round(float(z), 2)})
    found.sort(key=lambda f: -f["z"])
    for f in found:
        f["outlier"] = f["z"] >= OUTLIER_Z
    return found[: min(MOST, max(10, sum(f["outlier"] for f in found)))]


def audit_data(train, val, labels: list[str], seed: int) -> dict:
    """The audit of a classifier's data from each split's ``(features (N, C), targets, paths, sha256s)``."""
    xt, yt, pt, st = train
    xv, yv, pv, sv = val
    xt, xv = _normalise(xt), _normalise(xv)
    issues = label_issues(xt, yt, labels, pt, seed)
    dupes = near_duplicates(np.concatenate([xt, xv]), ["train"] * len(pt) + ["val"] * len(pv), pt + pv, st + sv)
    far = outliers(xt, yt, labels, pt)
    return {
        "summary": {
            "train_images": len(pt),
            "val_images": len(pv),
            "label_issues": len(issues),
            "near_duplicates": len(dupes),
            "near_duplicates_across_train_val": sum(p["splits"] == "train-val" for p in dupes),
            "outliers": sum(f["outlier"] for f in far),
        },
        "label_issues": issues,
        "near_duplicates": dupes,
        "outliers": far,
        "how": {
            "label_issues": "5-fold logistic regression and the 10 nearest training images, averaged; score = 1 - "
            "their probability of the given label",
            "near_duplicates": f"cosine similarity of frozen features >= {DUPLICATE_SIMILARITY}, or identical files",
            "outliers": f"robust z-score (median, MAD) of the distance to the nearest same-class images; "
            f"outlier >= {OUTLIER_Z}",
        },
    }


def plot_audit(report: dict, spec, path: Path, per_row: int = 6) -> None:
    """audit.png: the top label issues, near-duplicate pairs and outliers, each image with its file name."""
    from headstart.service.preprocess import decode_for, resize_and_crop

    issues = [(f["path"], f"{f['given']} → {f['suggested']} ({f['score']:.2f})") for f in report["label_issues"]]
    pairs = [(p, f"{d['splits']} {d['similarity']:.3f}") for d in report["near_duplicates"] for p in d["paths"]]
    far = [(f["path"], f"{f['label']} z {f['z']:.1f}") for f in report["outliers"] if f["outlier"]]
    rows = [("label issue", issues[:per_row]), ("near-duplicate", pairs[:per_row]), ("outlier", far[:per_row])]
    fig, axes = image_grid(3, per_row, (2.6, 3.2), title_lines=2, fontsize=7)
    for r, (kind, items) in enumerate(rows):
        for c in range(per_row):
            ax = axes[r, c]
            if c < len(items):
                file, caption = items[c]
                try:
                    ax.imshow(resize_and_crop(decode_for(Path(file), spec), spec))
                except Exception as exc:  # a file gone since training: say so in its cell
                    ax.text(0.5, 0.5, f"unreadable: {type(exc).__name__}", ha="center", va="center", fontsize=7)
                ax.set_title(f"{kind}: {caption}\n{Path(file).name[:28]}", fontsize=7)
            elif c == 0:
                ax.text(0.5, 0.5, f"no {kind}s", ha="center", va="center")
    save_figure(fig, path, dpi=80)
