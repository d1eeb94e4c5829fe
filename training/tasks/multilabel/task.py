"""The multi-label task: what differs from the engine's job.

Pooled features as a classifier's (``--pooling``: or mean+max vectors, or every cell scored and log-sum-exp
pooled), one sigmoid per label; the head (``fit.py``) by default each label's prototype, the mean direction of its
training views beside the backbone's own ImageNet answer (``--classifier prototype``, ``--prior-weight``), or a
linear layer trained with ``--loss``, the epoch kept by validation mAP (``--classifier linear``); thresholds
chosen on the validation images (one global, and a label's own only where it has enough validation positives:
``metrics.py``); mAP, F1 per label, sample-F1, a precision-recall plot, the worst images and per-image predictions.
"None of these" as the classifier has it (``training/open_set.py``): the clean training images' pooled vectors are
the novelty score's bank, its threshold keeps ``--kept-rate`` of the validation images; an image above it is unlike
everything the model learned and is said to hold none of the labels. The views are the classifier's (asked through
the registry). A YOLO data set given with ``--task multilabel`` is
read by the detect task's scan (through the registry) as the classes present per image.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart.features import DecodedImages
from headstart.models import ClassifierHead, HeadConfig, MeanMaxPool, MultiLabelClassifier, PixelNormalize
from headstart.open_set import OPEN_SET, build_open_set, load_open_set, novelty_of, save_open_set
from headstart.runs import write_json
from headstart.service.inference import scores_of_files
from headstart.tasks import task_named
from headstart.tasks.base import FeatureLayout, Job, Task
from headstart.tasks.multilabel.config import MultiLabelConfig
from headstart.tasks.multilabel.data import multi_hot, scan_data
from headstart.tasks.multilabel.export import MultiLabelExport
from headstart.tasks.multilabel.fit import image_logits
from headstart.tasks.multilabel.metrics import (
    choose_thresholds,
    evaluation,
    plot_precision_recall,
    plot_worst,
    write_predictions,
)

log = logging.getLogger("headstart")

PREDICTIONS = "predictions.csv"


class MultiLabelTask(Task):
    name = "multilabel"
    export = MultiLabelExport()
    clean_train = True  # the novelty bank compares the training images as they are

    def scan(self, cfg: MultiLabelConfig, report=None, decoded=None):
        return report or scan_data(cfg.data_dir, cfg.val_fraction, cfg.seed, run=cfg, decoded=decoded)

    def data_record(self, cfg, report) -> dict:
        return {"root": str(report.root), "source": str(report.source), "split": report.split_source}

    def split_row(self, sample) -> list:
        return [list(sample.labels)]

    def feature_net(self, cfg, backbone):
        return nn.Sequential(backbone.features, MeanMaxPool()) if cfg.pooling == "meanmax" else backbone.features

    def layout(self, cfg, backbone, net, spec) -> FeatureLayout:
        if cfg.pooling == "lse":  # the whole last map of every view, for the head to score cell by cell
            c, fmap = backbone.num_features, backbone.extra["feature_map"]
            return FeatureLayout(shape=(c, *fmap), pool=False, feature_map=fmap, dtype=np.float16, channels=(c,))
        if cfg.pooling != "meanmax":
            return super().layout(cfg, backbone, net, spec)
        width = 2 * backbone.num_features
        return FeatureLayout(shape=(width,), pool=False, feature_map=backbone.extra["feature_map"], channels=(width,))

    def feature_key(self, cfg) -> str:
        return f"pooling={cfg.pooling}"  # mean or mean+max vectors: the cache keeps them apart

    def augmentation(self, preset, spec):
        return task_named("classify").augmentation(preset, spec)

    def make_views(self, job: Job, train: bool):
        return task_named("classify").make_views(job, train)

    def head_config(self, cfg, layout: FeatureLayout, labels, backbone) -> HeadConfig:
        if cfg.classifier == "prototype":  # no training of the weights: nothing to drop out
            prior = backbone.classifier if cfg.prior_weight > 0 else None
            return HeadConfig(
                layout.channels[0],
                len(labels),
                dropout=0.0,
                normalize=True,
                prior_classes=0 if prior is None else prior.out_features,
                prior_features=0 if prior is None else prior.in_features,
                prior_weight=0.0 if prior is None else cfg.prior_weight,
            )
        return HeadConfig(layout.channels[0], len(labels), cfg.hidden, cfg.dropout)

    def fit(self, job: Job, head_cfg: HeadConfig) -> ClassifierHead:
        """The head (``fit.py``), then the novelty score, kept in ``open_set.safetensors``."""
        from headstart.tasks.multilabel.fit import fit_head, fit_prototypes

        head = (fit_prototypes if job.cfg.classifier == "prototype" else fit_head)(job, head_cfg)
        k, train, val = len(job.labels), job.train_clean_features, job.val_features
        train_y = multi_hot([s.labels for s in train.samples], k)
        val_y = multi_hot([s.labels for s in val.samples], k)
        train_x, val_x = pooled_vectors(train.values[:, 0]), pooled_vectors(val.values[:, 0])
        novelty = build_open_set(train_x, bank_groups(train_y), val_x, val_y, job.labels, job.cfg)
        if novelty is not None:
            save_open_set(job.run_dir, novelty)
        else:
            (job.run_dir / OPEN_SET).unlink(missing_ok=True)
        job.scratch.update(novelty=novelty, val_pooled=val_x)
        return head

    def evaluate(self, job: Job, head: ClassifierHead) -> dict:
        val = job.val_features
        with torch.no_grad():
            x = torch.from_numpy(val.values[:, 0].astype(np.float32)).to(job.device)
            probs = torch.sigmoid(image_logits(head, x, job.cfg.pooling)).cpu().numpy()
        truth = multi_hot([s.labels for s in val.samples], len(job.labels))
        thresholds = choose_thresholds(probs, truth, job.labels, job.cfg.min_label_positives)
        log.info(
            "thresholds: %.2f for every label%s (chosen on %d validation images)",
            thresholds["global"],
            f"; their own for {', '.join(thresholds['per_label'])}" if thresholds["per_label"] else "",
            len(probs),
        )
        novelty = job.scratch["novelty"]
        scores = None if novelty is None else novelty_of(novelty, job.scratch["val_pooled"])
        limit = None if novelty is None else novelty.config.threshold
        paths = [s.path for s in val.samples]
        metrics = _write_evaluation(
            job.run_dir, paths, probs, truth, job.labels, thresholds, job.spec, job.history, (scores, limit)
        )
        if novelty is not None:
            metrics["open_set"] = {**novelty.config.to_dict(), "val_kept": float((scores <= limit).mean())}
        return metrics

    def cross_validate(self, cfg: MultiLabelConfig, folds: int) -> tuple[dict, Path]:
        """`headstart crossval`: k-fold cross-validation (``crossval.py``); the summary and the file it is in."""
        from headstart.crossval import SUMMARY
        from headstart.tasks.multilabel.crossval import cross_validate

        return cross_validate(cfg, folds), Path(cfg.out) / SUMMARY

    def build_model(self, record, spec, features, head_state, run_dir) -> MultiLabelClassifier:
        head = ClassifierHead(HeadConfig(**record.head))
        head.load_state_dict(head_state)
        pooling = record.options.get("pooling", "mean")
        novelty = load_open_set(Path(run_dir))
        return MultiLabelClassifier(PixelNormalize(spec.mean, spec.std), features, head, pooling, novelty)

    def evaluate_model(self, model, data_dir: str, out: Path, other: str | None = None) -> dict:
        """mAP, F1 and the plots of a multi-label model (a run's or a bundle's) on another labelled CSV or YOLO data
        set (its test images, else val, else all), at the model's own thresholds."""
        if other:
            raise ValueError("--other measures a single-label classifier's novelty score; leave it out.")
        decoded = DecodedImages(model.spec)  # each image decoded once: by the check, for the model
        report = scan_data(data_dir, 0.0, 0, labels=list(model.labels), decoded=decoded)
        log.info("%s", report.format())
        if report.split_source.startswith("random"):  # no split of its own: every image is an evaluation image
            split, samples = "all", [s for items in report.splits.values() for s in items]
        else:
            split = next(s for s in ("test", "val", "train") if report.splits.get(s))
            samples = report.splits[split]
        paths = [s.path for s in samples]
        decoded.only(paths)
        probs, scores = scores_of_files(model, paths, decoded.take)
        del decoded
        truth = multi_hot([s.labels for s in samples], len(model.labels))
        limit = None if scores is None else model.open_set["threshold"]
        metrics = _write_evaluation(
            out, paths, probs, truth, list(model.labels), model.thresholds, model.spec, novelty=(scores, limit)
        )
        if scores is not None:
            metrics["open_set"] = {"threshold": limit, "kept": float((scores <= limit).mean())}
        write_json(out / "metrics.json", {"split": str(Path(data_dir).resolve()), **metrics, "data": report.to_dict()})
        return {
            "split": split,
            **{k: metrics[k] for k in ("num_images", "map_macro", "map_micro", "micro_f1", "sample_f1")},
        }


def pooled_vectors(values: np.ndarray) -> np.ndarray:
    """The vectors the novelty score reads, as the model pools them (``MultiLabelClassifier.pool``): the cached
    pooled vectors, or with ``--pooling lse`` the mean over the cached maps' cells."""
    values = values.astype(np.float32)
    return values.mean(axis=(2, 3)) if values.ndim == 4 else values


def bank_groups(truth: np.ndarray) -> np.ndarray:
    """A group per training image for the bank's subsampling: its rarest label (the number of labels: none)."""
    counts = truth.sum(0)
    rarity = np.where(truth > 0, counts[None, :], np.inf)
    return np.where(truth.any(1), rarity.argmin(1), truth.shape[1])


def _write_evaluation(out: Path, paths, probs, truth, labels, thresholds, spec, history=None, novelty=(None, None)):
    """The metrics, the plots and predictions.csv (``novelty``: each image's score and the threshold, or Nones)."""
    metrics = evaluation(probs, truth, labels, thresholds)
    plot_precision_recall(probs, truth, labels, out / "precision_recall.png")
    plot_worst(paths, probs, truth, labels, thresholds, spec, out / "worst_predictions.png")
    write_predictions(out / PREDICTIONS, paths, probs, truth, labels, thresholds, *novelty)
    if history is not None:
        _plot_curves(history, out / "training_curves.png")
    return metrics


def _plot_curves(history: list[dict], path: Path) -> None:
    from headstart.plots import pyplot, save_figure

    plt = pyplot()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    a.plot(epochs, [h["train_loss"] for h in history], label="train")
    a.plot(epochs, [h.get("val_loss", np.nan) for h in history], label="val")
    a.set_xlabel("epoch")
    a.set_ylabel("loss")
    a.legend()
    b.plot(epochs, [h.get("val_map", np.nan) for h in history], label="val mAP (macro)")
    b.plot(epochs, [h.get("val_map_micro", np.nan) for h in history], label="val mAP (micro)")
    b.set_xlabel("epoch")
    b.legend()
    save_figure(fig, path, dpi=100, tight=True)


TASK = MultiLabelTask()
