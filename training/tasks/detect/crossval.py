"""K-fold cross-validation of a detector (``training/crossval.py``): every image scored once by a model that never
saw it, with the service's own preprocessing, decoding and NMS. Each fold's row has AP50, AP50:95 and AP for small /
medium / large objects (COCO's areas), the held-out boxes and the kept epoch.
"""

from __future__ import annotations

from headstart import crossval
from headstart.data import verified_images
from headstart.tasks.detect.config import DetectConfig
from headstart.tasks.detect.data import DetectionReport, keep_classes, scan_yolo_dataset

METRICS = ("map50", "map50_95", "map_small", "map_medium", "map_large")


def cross_validate(cfg: DetectConfig, folds: int = 4, report: DetectionReport | None = None) -> dict:
    """Train and score ``folds`` detectors into ``cfg.out``/fold-N; returns (and writes) the summary."""
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.tasks.detect.metrics import evaluate_detector

    cfg.validate()
    report = report or scan_yolo_dataset(
        cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, verified=verified_images(cfg)
    )
    if cfg.class_names():
        report = keep_classes(report, cfg.class_names())

    def score(run_dir, test) -> dict:
        run = load_run(run_dir)
        metrics, _, _ = evaluate_detector(RunModel(run), test)
        best = run.metrics["training"]["head"]["best_epoch"]
        return {"test_boxes": metrics["num_boxes"], **{m: metrics[m] for m in METRICS}, "best_epoch": best}

    return crossval.cross_validate(cfg, report, folds, score, METRICS, labels_key="classes")
