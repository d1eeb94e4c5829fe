"""K-fold cross-validation of a multi-label classifier: every image scored once by a model that never saw it.

The images (all splits pooled, ordered by content hash, shuffled with the seed) are cut into ``k`` folds; per fold
a model trains on the others (``val_fraction`` of them picks the epoch and the thresholds, never the held-out fold)
and is scored on the held-out fold at its own thresholds. The summary has each fold's mAP (macro and micro),
micro-F1 and sample-F1, their mean and spread (sample standard deviation), and the training time.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import statistics
import time
from functools import partial
from pathlib import Path

from headstart import runs
from headstart.tasks.multilabel.config import MultiLabelConfig

log = logging.getLogger("headstart")

METRICS = ("map_macro", "map_micro", "micro_f1", "sample_f1")
SUMMARY = "crossval.json"


def cross_validate(cfg: MultiLabelConfig, folds: int = 4) -> dict:
    """Train and score ``folds`` models into ``cfg.out``/fold-N; returns (and writes) the summary."""
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.inference import outputs_of_files
    from headstart.tasks import train
    from headstart.tasks.multilabel.data import multi_hot, scan_data
    from headstart.tasks.multilabel.metrics import evaluation

    cfg.validate()
    out = Path(cfg.out)
    report = scan_data(cfg.data_dir, cfg.val_fraction, cfg.seed)
    pooled = sorted((s for items in report.splits.values() for s in items), key=lambda s: (s.sha256, str(s.path)))
    if not 2 <= folds <= len(pooled):
        raise ValueError(f"--folds must be between 2 and the number of images ({len(pooled)}), got {folds}.")
    random.Random(cfg.seed).shuffle(pooled)
    parts = [pooled[i::folds] for i in range(folds)]
    rows = []
    for i in range(folds):
        rest = [s for j, part in enumerate(parts) if j != i for s in part]
        random.Random(cfg.seed + 1000 + i).shuffle(rest)
        n_val = max(1, round(len(rest) * cfg.val_fraction))
        split = f"fold {i + 1}/{folds}: {len(rest) - n_val} to train, {n_val} to pick the epoch and thresholds"
        fold = dataclasses.replace(report, splits={"train": rest[n_val:], "val": rest[:n_val]}, split_source=split)
        started = time.perf_counter()
        run_dir = train(dataclasses.replace(cfg, out=str(out / f"fold-{i + 1}")), fold)
        seconds = time.perf_counter() - started
        model = RunModel(load_run(run_dir))
        test = parts[i]
        first = partial(model.run, names=[model.output_names[0]])
        probs = outputs_of_files(first, [s.path for s in test], model.spec)
        truth = multi_hot([s.labels for s in test], len(report.labels))
        metrics = evaluation(probs[0], truth, report.labels, model.thresholds)
        rows.append(
            {
                "fold": i + 1,
                "test_images": len(test),
                **{m: metrics[m] for m in METRICS},
                "train_seconds": round(seconds, 1),
            }
        )
        log.info("fold %d/%d: test mAP %.4f (%d images)", i + 1, folds, metrics["map_macro"] or 0.0, len(test))
    summary = {
        "folds": folds,
        "seed": cfg.seed,
        "labels": report.labels,
        "images": len(pooled),
        "options": cfg.result_options(),
        "per_fold": rows,
        **{
            m: {
                "mean": statistics.fmean(v) if (v := [r[m] for r in rows if r[m] is not None]) else None,
                "std": statistics.stdev(v) if len(v) > 1 else 0.0,
            }
            for m in (*METRICS, "train_seconds")
        },
    }
    runs.write_json(out / SUMMARY, json.loads(json.dumps(summary, default=str)))
    return summary
