"""K-fold cross-validation of a multi-label classifier (``training/crossval.py``): every image scored once by a model
that never saw it, at its own thresholds (chosen on the other folds' validation part). Each fold's row has mAP (macro
and micro), micro-F1 and sample-F1.
"""

from __future__ import annotations

from headstart import crossval
from headstart.tasks.multilabel.config import MultiLabelConfig

METRICS = ("map_macro", "map_micro", "micro_f1", "sample_f1")


def cross_validate(cfg: MultiLabelConfig, folds: int = 4) -> dict:
    """Train and score ``folds`` models into ``cfg.out``/fold-N; returns (and writes) the summary."""
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.inference import scores_of_files
    from headstart.tasks.multilabel.data import multi_hot, scan_data
    from headstart.tasks.multilabel.metrics import evaluation

    cfg.validate()
    report = scan_data(cfg.data_dir, cfg.val_fraction, cfg.seed, run=cfg)

    def score(run_dir, test) -> dict:
        model = RunModel(load_run(run_dir))
        probs, _ = scores_of_files(model, [s.path for s in test])
        truth = multi_hot([s.labels for s in test], len(report.labels))
        metrics = evaluation(probs, truth, report.labels, model.thresholds)
        return {m: metrics[m] for m in METRICS}

    return crossval.cross_validate(cfg, report, folds, score, METRICS, picks="the epoch and the thresholds")
