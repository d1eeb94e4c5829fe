"""The classification task: what differs from the engine's job.

Pooled feature vectors, cross-entropy with optional class weights and label smoothing, the best epoch by validation
loss, optional fine-tuning of the last backbone stages (``fit.py``); then "none of these": a bank of the training
images' clean features and a novelty threshold calibrated on the validation images (``open_set.py``); accuracy, F1,
calibration, confusion matrix, worst predictions and per-image predictions as metrics (``metrics.py``); and an audit
of the data (``audit.py``: likely label errors, near-duplicates, outliers).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from headstart.data import DatasetError, verified_images
from headstart.features import DecodedImages
from headstart.models import Classifier, ClassifierHead, HeadConfig, PixelNormalize
from headstart.open_set import OPEN_SET, build_open_set, load_open_set, novelty_of, save_open_set
from headstart.runs import write_json
from headstart.service.inference import outputs_of_files, scores_of_files
from headstart.tasks.base import FeatureLayout, Job, Task
from headstart.tasks.classify.config import ClassifyConfig
from headstart.tasks.classify.data import scan_eval_folder, scan_image_folder, scan_other_images
from headstart.tasks.classify.export import ClassifyExport
from headstart.tasks.classify.metrics import (
    open_set_metrics,
    plot_training_curves,
    write_evaluation,
    write_predictions,
)

log = logging.getLogger("headstart")

AUDIT, AUDIT_PLOT, PREDICTIONS = "audit.json", "audit.png", "predictions.csv"


class ClassifyTask(Task):
    name = "classify"
    export = ClassifyExport()
    clean_train = True  # the novelty bank and the data audit compare the training images as they are

    def scan(self, cfg: ClassifyConfig, report=None, decoded=None):
        report = report or scan_image_folder(
            cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, verified=verified_images(cfg), decoded=decoded
        )
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
        from headstart.tasks.classify.augment import build_augmentation

        return build_augmentation(preset, spec)

    def make_views(self, job: Job, train: bool):
        from headstart.tasks.classify.augment import augmented_views

        pipeline, views = (job.pipeline, job.views) if train else (None, 1)
        return lambda img, sample, seed: (augmented_views(img, pipeline, job.spec, views, seed), {})

    def head_config(self, cfg, layout: FeatureLayout, labels, backbone) -> HeadConfig:
        return HeadConfig(layout.channels[0], len(labels), cfg.hidden, cfg.dropout, cfg.activation)

    def fit(self, job: Job, head_cfg: HeadConfig) -> ClassifierHead:
        """The head (``fit.py``), then the novelty score of the finished model, kept in ``open_set.safetensors``."""
        from headstart.tasks.classify.fit import fit_head

        head = fit_head(job, head_cfg)
        train, val = _final_features(job, head)
        novelty = build_open_set(
            train, _targets(job.train_features), val, _targets(job.val_features), job.labels, job.cfg
        )
        if novelty is not None:
            save_open_set(job.run_dir, novelty)
        else:
            (job.run_dir / OPEN_SET).unlink(missing_ok=True)
        job.scratch.update(train_pooled=train, val_pooled=val, novelty=novelty)
        return head

    def evaluate(self, job: Job, head: ClassifierHead) -> dict:
        val, spec, novelty = job.val_features, job.spec, job.scratch["novelty"]
        with torch.no_grad():
            probs = torch.softmax(head(torch.from_numpy(job.scratch["val_pooled"]).to(job.device)), dim=1).cpu().numpy()
        targets, paths = _targets(val), [s.path for s in val.samples]
        metrics = write_evaluation(job.run_dir, probs, targets, job.labels, paths, spec)
        scores = None if novelty is None else novelty_of(novelty, job.scratch["val_pooled"])
        threshold = None if novelty is None else novelty.config.threshold
        write_predictions(job.run_dir / PREDICTIONS, paths, probs, targets, job.labels, scores, threshold)
        if novelty is not None:
            metrics["open_set"] = {**novelty.config.to_dict(), **open_set_metrics(scores, threshold)}
        if job.cfg.audit:
            metrics["audit"] = _audit(job)
        plot_training_curves(job.history, job.run_dir / "training_curves.png", kept_epoch(job))
        return metrics

    def build_model(self, record, spec, features, head_state, run_dir) -> Classifier:
        head = ClassifierHead(HeadConfig(**record.head))
        head.load_state_dict(head_state)
        return Classifier(PixelNormalize(spec.mean, spec.std), features, head, load_open_set(Path(run_dir)))

    def evaluate_model(self, model, data_dir: str, out: Path, other: str | None = None) -> dict:
        """Accuracy, F1, calibration, confusion matrix, worst predictions and predictions.csv of a classifier (a
        run's or a bundle's) on a labelled folder (class subfolders named after its labels); with ``other`` (a
        folder of images of other things) also how well the novelty score tells them apart."""
        decoded = DecodedImages(model.spec)  # each image decoded once: by the check, for the model
        report = scan_eval_folder(data_dir, model.labels, decoded=decoded)
        log.info("%s", report.format())
        samples = report.splits["eval"]
        paths, targets = [s.path for s in samples], _targets_of(samples)
        probs, scores = scores_of_files(model, paths, decoded.take)
        del decoded
        metrics = write_evaluation(out, probs, targets, model.labels, paths, model.spec)
        threshold = None if scores is None else model.open_set["threshold"]
        write_predictions(out / PREDICTIONS, paths, probs, targets, model.labels, scores, threshold)
        if scores is not None:
            others = _other_novelty(model, other, out, threshold) if other else None
            metrics["open_set"] = open_set_metrics(scores, threshold, others)
        elif other:
            log.warning(
                "the model has no novelty score (trained before it existed, or --bank-size 0): --other is unused"
            )
        write_json(out / "metrics.json", {"split": str(Path(data_dir).resolve()), **metrics, "data": report.to_dict()})
        summary = {k: metrics[k] for k in ("num_images", "accuracy", "macro_f1", "calibration_error")}
        return summary | {f"novelty_{k}": v for k, v in metrics.get("open_set", {}).items() if k != "threshold"}


def _targets(features) -> np.ndarray:
    return _targets_of(features.samples)


def _targets_of(samples) -> np.ndarray:
    return np.array([s.label for s in samples], dtype=np.int64)


def _final_features(job: Job, head: ClassifierHead) -> tuple[np.ndarray, np.ndarray]:
    """The clean pooled features (train, val) of the finished model: the cached ones, or with ``--unfreeze`` those
    of the fine-tuned backbone."""
    if not job.cfg.unfreeze:
        return job.train_clean_features.values[:, 0], job.val_features.values[:, 0]
    spec = job.spec
    model = Classifier(PixelNormalize(spec.mean, spec.std), job.backbone.features, head).to(job.device).eval()

    @torch.inference_mode()
    def pooled(pixels: np.ndarray) -> list[np.ndarray]:
        return [model.pooled(torch.from_numpy(pixels).to(job.device)).cpu().numpy()]

    return tuple(
        outputs_of_files(pooled, [s.path for s in f.samples], spec)[0] for f in (job.train_features, job.val_features)
    )


def _audit(job: Job) -> dict:
    from headstart.tasks.classify.audit import audit_data, plot_audit

    def split(features, pooled) -> tuple:
        samples = features.samples
        return pooled, _targets(features), [str(s.path) for s in samples], [s.sha256 for s in samples]

    train = split(job.train_features, job.scratch["train_pooled"])
    val = split(job.val_features, job.scratch["val_pooled"])
    report = audit_data(train, val, job.labels, job.cfg.seed)
    write_json(job.run_dir / AUDIT, report)
    plot_audit(report, job.spec, job.run_dir / AUDIT_PLOT)
    found = report["summary"]
    log.info(
        "data audit (%s): %d likely label errors, %d near-duplicate pairs (%d across train and val), %d outliers",
        AUDIT,
        found["label_issues"],
        found["near_duplicates"],
        found["near_duplicates_across_train_val"],
        found["outliers"],
    )
    return found


def _other_novelty(model, other: str, out: Path, threshold: float) -> np.ndarray:
    """The novelty of every image in the folder ``other``, written to ``other_predictions.csv``."""
    decoded = DecodedImages(model.spec)
    report = scan_other_images(other, decoded=decoded)
    paths = [s.path for s in report.splits["other"]]
    log.info(
        "%s: %d images of other things, %d files that are not images ignored", other, len(paths), len(report.ignored)
    )
    for path, reason in report.corrupt:
        log.warning("skipped %s: %s", path, reason)
    probs, scores = scores_of_files(model, paths, decoded.take)
    write_predictions(out / "other_predictions.csv", paths, probs, None, model.labels, scores, threshold)
    return scores


TASK = ClassifyTask()


def kept_epoch(job) -> int | None:
    """The epoch (as numbered in the history) whose weights the run kept: fine-tuning's best where it ran, else the
    head's."""
    report = job.training_report
    if report.get("finetune"):
        return sum(h.get("phase") == "head" for h in job.history) + report["finetune"]["best_epoch"]
    return (report.get("head") or {}).get("best_epoch")
