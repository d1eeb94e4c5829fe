"""K-fold cross-validation of a detector: every image is scored once by a model that never saw it.

A small data set flatters whoever evaluates on what they trained on (coco128's own data.yaml validates on its
training images). Here the images (all splits pooled, ordered by content hash, then shuffled with the seed) are cut
into ``k`` folds; for each fold a detector trains on the other folds (of which ``val_fraction`` picks the epoch, never
the held-out fold) and is scored on the held-out fold with the service's own preprocessing, decoding and NMS. The
summary has each fold's AP50, AP50:95 and AP for small / medium / large objects (COCO's areas), their mean and
spread (sample standard deviation), and the training time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import time
from pathlib import Path

from headstart import runs
from headstart.tasks.detect.config import DetectConfig
from headstart.tasks.detect.data import DetectionReport, DetSample, keep_classes, scan_yolo_dataset

log = logging.getLogger("headstart")

METRICS = ("map50", "map50_95", "map_small", "map_medium", "map_large")
SUMMARY = "crossval.json"


def make_folds(samples: list[DetSample], k: int, seed: int) -> list[list[DetSample]]:
    """``k`` disjoint folds covering ``samples``, the same for the same images and seed whatever their order."""
    if not 2 <= k <= len(samples):
        raise ValueError(f"--folds must be between 2 and the number of images ({len(samples)}), got {k}.")
    ordered = sorted(samples, key=lambda s: (s.sha256, str(s.path)))
    random.Random(seed).shuffle(ordered)
    return [ordered[i::k] for i in range(k)]


def fold_report(
    report: DetectionReport, folds: list[list[DetSample]], i: int, val_fraction: float, seed: int
) -> tuple[DetectionReport, list[DetSample]]:
    """The training data of fold ``i`` (train and epoch-selection images from the other folds) and its test images."""
    rest = [s for j, fold in enumerate(folds) if j != i for s in fold]
    random.Random(seed + 1000 + i).shuffle(rest)
    n_val = max(1, round(len(rest) * val_fraction))
    split = f"fold {i + 1}/{len(folds)}: {len(rest) - n_val} to train, {n_val} to pick the epoch (other folds)"
    fold = dataclasses.replace(report, splits={"train": rest[n_val:], "val": rest[:n_val]}, split_source=split)
    return fold, folds[i]


def cross_validate(cfg: DetectConfig, folds: int = 4, report: DetectionReport | None = None) -> dict:
    """Train and score ``folds`` detectors into ``cfg.out``/fold-N; returns (and writes) the summary."""
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.tasks import train
    from headstart.tasks.detect.metrics import evaluate_detector

    cfg.validate()
    out = Path(cfg.out)
    report = report or scan_yolo_dataset(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    if cfg.class_names():
        report = keep_classes(report, cfg.class_names())
    pooled = [s for items in report.splits.values() for s in items]
    parts = make_folds(pooled, folds, cfg.seed)
    rows = []
    for i in range(folds):
        fold, test = fold_report(report, parts, i, cfg.val_fraction, cfg.seed)
        started = time.perf_counter()
        run_dir = train(dataclasses.replace(cfg, out=str(out / f"fold-{i + 1}")), fold)  # the engine scans it
        seconds = time.perf_counter() - started
        run = load_run(run_dir)
        metrics, _, _ = evaluate_detector(RunModel(run), test)
        rows.append(
            {
                "fold": i + 1,
                "test_images": len(test),
                "test_boxes": metrics["num_boxes"],
                **{m: metrics[m] for m in METRICS},
                "train_seconds": round(seconds, 1),
                "best_epoch": run.metrics["training"]["head"]["best_epoch"],
            }
        )
        log.info(
            "fold %d/%d: test AP50 %.4f AP50:95 %.4f (%d images, %d boxes)",
            i + 1,
            folds,
            metrics["map50"],
            metrics["map50_95"],
            len(test),
            metrics["num_boxes"],
        )
    summary = {
        "folds": folds,
        "seed": cfg.seed,
        "classes": report.labels,
        "images": len(pooled),
        "options": cfg.result_options(),
        "per_fold": rows,
        **summarise(rows),
    }
    runs.write_json(out / SUMMARY, json.loads(json.dumps(summary, default=str)))
    return summary


def summarise(rows: list[dict]) -> dict:
    """Mean and sample standard deviation over folds of every metric (COCO's -1, "no such objects", left out)."""
    out = {}
    for m in (*METRICS, "train_seconds"):
        values = [r[m] for r in rows if r[m] is not None and r[m] >= 0]
        out[m] = {
            "mean": statistics.fmean(values) if values else None,
            "std": statistics.stdev(values) if len(values) > 1 else 0.0,
        }
    return out
