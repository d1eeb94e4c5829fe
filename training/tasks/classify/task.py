"""The classification task: what differs from the engine's job.

Pooled feature vectors, cross-entropy with optional class weights and label smoothing, the best epoch by validation
loss, optional fine-tuning of the last backbone stages (``fit.py``), and accuracy, F1, calibration, confusion matrix
and worst predictions as metrics (``metrics.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from models import Classifier, ClassifierHead, HeadConfig, PixelNormalize
from training.data import DatasetError
from training.predict import predict_paths
from training.tasks.base import FeatureLayout, Job, Task
from training.tasks.classify.config import ClassifyConfig
from training.tasks.classify.data import scan_eval_folder, scan_image_folder
from training.tasks.classify.export import ClassifyExport
from training.tasks.classify.metrics import plot_training_curves, write_evaluation

log = logging.getLogger("headstart")


class ClassifyTask(Task):
    name = "classify"
    headline = ("accuracy", "macro_f1", "calibration_error")
    export = ClassifyExport()

    def scan(self, cfg: ClassifyConfig, report=None):
        report = report or scan_image_folder(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if not report.splits.get("val"):
            raise DatasetError(
                f"{report.root} has no validation images. Add a val/ folder next to train/, or put the class "
                "folders directly in the data folder to get an automatic split (--val-fraction)."
            )
        return report

    def data_record(self, cfg, report) -> dict:
        return {"root": str(Path(cfg.data_dir).resolve()), "split": report.split_source}

    def split_row(self, sample) -> list:
        return [sample.label]

    def augmentation(self, preset, spec):
        # albumentations and OpenCV only where a run trains: loading one does not need them
        from training.tasks.classify.augment import build_augmentation

        return build_augmentation(preset, spec)

    def make_views(self, job: Job, train: bool):
        from training.tasks.classify.augment import augmented_views

        pipeline, views = (job.pipeline, job.views) if train else (None, 1)
        return lambda img, sample, seed: (augmented_views(img, pipeline, job.spec, views, seed), {})

    def head_config(self, cfg, layout: FeatureLayout, labels) -> HeadConfig:
        return HeadConfig(layout.channels[0], len(labels), cfg.hidden, cfg.dropout, cfg.activation)

    def fit(self, job: Job, head_cfg: HeadConfig) -> ClassifierHead:
        from training.tasks.classify.fit import fit_head

        return fit_head(job, head_cfg)

    def evaluate(self, job: Job, head: ClassifierHead) -> dict:
        val, spec = job.val_features, job.spec
        if job.cfg.unfreeze:
            model = Classifier(PixelNormalize(spec.mean, spec.std), job.backbone.features, head).eval()
            probs = predict_paths(model, [s.path for s in val.samples], spec)
        else:
            with torch.no_grad():
                probs = torch.softmax(head(torch.from_numpy(val.values[:, 0]).to(job.device)), dim=1).cpu().numpy()
        targets = np.array([s.label for s in val.samples])
        metrics = write_evaluation(job.run_dir, probs, targets, job.labels, [s.path for s in val.samples], spec)
        plot_training_curves(job.history, job.run_dir / "training_curves.png")
        return metrics

    def build_model(self, record, spec, features, head_state) -> Classifier:
        head = ClassifierHead(HeadConfig(**record.head))
        head.load_state_dict(head_state)
        return Classifier(PixelNormalize(spec.mean, spec.std), features, head)

    def evaluate_run(self, run, data_dir: str, out: Path) -> dict:
        """Accuracy, F1, calibration, confusion matrix and worst predictions on a labelled folder (class
        subfolders named after the run's labels)."""
        from training.runs import write_json

        report = scan_eval_folder(data_dir, run.labels)
        log.info("%s", report.format())
        samples = report.splits["eval"]
        paths = [s.path for s in samples]
        probs = predict_paths(run.model, paths, run.spec)
        metrics = write_evaluation(out, probs, np.array([s.label for s in samples]), run.labels, paths, run.spec)
        write_json(out / "metrics.json", {"split": str(Path(data_dir).resolve()), **metrics, "data": report.to_dict()})
        return {k: metrics[k] for k in ("num_images", "accuracy", "macro_f1", "calibration_error")}


TASK = ClassifyTask()
