"""K-fold cross-validation, written once for every task that offers it: each image is scored once by a model that
never saw it.

A small data set flatters whoever evaluates on what they trained on (coco128's own data.yaml validates on its
training images). Here the images (all splits pooled, ordered by content hash, then shuffled with the seed) are cut
into ``k`` folds; for each fold a model trains on the other folds (of which ``val_fraction`` picks the epoch, and
whatever else the task chooses on validation images, never the held-out fold) and the task scores it on the held-out
fold. The summary has each fold's figures, their mean and spread (sample standard deviation), and the training time.
A task supplies the scan, the scoring of one fold and the names of its figures (``training/tasks/NAME/crossval.py``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from headstart import runs

log = logging.getLogger("headstart")

SUMMARY = "crossval.json"


def make_folds(samples: Sequence[Any], k: int, seed: int) -> list[list[Any]]:
    """``k`` disjoint folds covering ``samples`` (each with ``sha256`` and ``path``), the same for the same images and
    seed whatever their order."""
    if not 2 <= k <= len(samples):
        raise ValueError(f"--folds must be between 2 and the number of images ({len(samples)}), got {k}.")
    ordered = sorted(samples, key=lambda s: (s.sha256, str(s.path)))
    random.Random(seed).shuffle(ordered)
    return [ordered[i::k] for i in range(k)]


def fold_report(report, folds: list[list[Any]], i: int, val_fraction: float, seed: int, picks: str = "the epoch"):
    """(the data report of fold ``i``: training and validation images from the other folds, its test images). The
    validation part picks ``picks``."""
    rest = [s for j, fold in enumerate(folds) if j != i for s in fold]
    random.Random(seed + 1000 + i).shuffle(rest)
    n_val = max(1, round(len(rest) * val_fraction))
    split = f"fold {i + 1}/{len(folds)}: {len(rest) - n_val} to train, {n_val} to pick {picks} (other folds)"
    fold = dataclasses.replace(report, splits={"train": rest[n_val:], "val": rest[:n_val]}, split_source=split)
    return fold, folds[i]


def summarise(rows: list[dict], metrics: Sequence[str]) -> dict:
    """Mean and sample standard deviation over folds of every metric and the training time (a missing figure, None
    or COCO's -1 for "no such objects", left out)."""
    out = {}
    for m in (*metrics, "train_seconds"):
        values = [r[m] for r in rows if r.get(m) is not None and r[m] >= 0]
        out[m] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out


def cross_validate(
    cfg,
    report,
    folds: int,
    score: Callable[[Path, list], dict],
    metrics: Sequence[str],
    labels_key: str = "labels",
    picks: str = "the epoch",
) -> dict:
    """Train ``folds`` models of ``cfg``'s task on ``report``'s images into ``cfg.out``/fold-N, each scored by
    ``score(run_dir, test_samples)`` (the fold's row: ``metrics`` and anything else to report); returns (and writes)
    the summary."""
    from headstart.tasks import train

    out = Path(cfg.out)
    pooled = [s for items in report.splits.values() for s in items]
    parts = make_folds(pooled, folds, cfg.seed)
    rows = []
    for i in range(folds):
        fold, test = fold_report(report, parts, i, cfg.val_fraction, cfg.seed, picks)
        started = time.perf_counter()
        run_dir = train(dataclasses.replace(cfg, out=str(out / f"fold-{i + 1}")), fold)  # the engine scans it
        seconds = time.perf_counter() - started
        row = score(run_dir, test)
        rows.append({"fold": i + 1, "test_images": len(test), **row, "train_seconds": round(seconds, 1)})
        figures = ", ".join(f"{m} {row[m]:.4f}" for m in metrics[:2] if row.get(m) is not None)
        log.info("fold %d/%d: test %s (%d images)", i + 1, folds, figures, len(test))
    summary = {
        "folds": folds,
        "seed": cfg.seed,
        labels_key: report.labels,
        "images": len(pooled),
        "options": cfg.result_options(),
        "per_fold": rows,
        **summarise(rows, metrics),
    }
    runs.write_json(out / SUMMARY, json.loads(json.dumps(summary, default=str)))
    return summary
