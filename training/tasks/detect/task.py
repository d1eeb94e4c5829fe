"""The detection task: what differs from the engine's job.

Every training image is augmented ``views`` times with box-aware transforms (``augment.py``: letterbox to the input
size, scale/translate, flip, colour, mosaic), the features are the frozen backbone's maps (the pyramid detector
reads strides 8, 16 and 32; the grid head the last map), cached in float16 with the views' boxes beside them, each
head has its targets and loss (``pyramid_loss.py``, ``grid_loss.py``), and validation mAP@0.5 every ``eval_every``
epochs selects the best epoch (``fit.py``, ``metrics.py``).
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np
from torch import nn

from headstart.data import verified_images
from headstart.features import DecodedImages
from headstart.models.wrapper import Detector, PixelNormalize
from headstart.service.preprocess import PreprocessSpec, decode_for
from headstart.tasks.base import FeatureLayout, Job, Task
from headstart.tasks.detect.config import DetectConfig
from headstart.tasks.detect.data import keep_classes, scan_yolo_dataset, scan_yolo_eval_split
from headstart.tasks.detect.export import DetectExport
from headstart.tasks.detect.heads import HEADS, recorded_head
from headstart.tasks.detect.metrics import (
    decode_head,
    evaluate_detector,
    ground_truth_in_pixels,
    mean_average_precision,
    plot_detection_curves,
    plot_detections,
    predictions_in_pixels,
)

log = logging.getLogger("headstart.detect")


class DetectTask(Task):
    name = "detect"
    export = DetectExport()

    def scan(self, cfg: DetectConfig, report=None, decoded=None):
        report = report or scan_yolo_dataset(
            cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed, verified=verified_images(cfg), decoded=decoded
        )
        names = cfg.class_names()
        return keep_classes(report, names) if names and names != report.labels else report

    def data_record(self, cfg, report) -> dict:
        return {"root": str(report.root), "yaml": str(report.yaml_path), "split": report.split_source}

    def split_row(self, sample) -> list:
        return [len(sample.classes)]

    def input_spec(self, cfg, preprocess) -> PreprocessSpec:
        base = preprocess
        return PreprocessSpec(
            input_size=cfg.input_size,
            resize=cfg.input_size,
            interpolation=base.interpolation,
            mean=base.mean,
            std=base.std,
            fit="pad",
        )

    def augmentation(self, preset, spec):
        # albumentations and OpenCV only where a run trains: loading one does not need them
        from headstart.tasks.detect.augment import build_detection_augmentation

        return build_detection_augmentation(preset, spec)

    def view_recipe(self, cfg, report) -> dict:
        """Mosaic views hold other training images: their identities are part of what the cached views depend on."""
        if not HEADS[cfg.head].mosaic or not cfg.mosaic or cfg.augment == "none":
            return {}
        pool = hashlib.sha256("\n".join(s.identity for s in report.splits["train"]).encode()).hexdigest()
        return {"mosaic": cfg.mosaic, "mosaic_pool": pool}

    def feature_net(self, cfg, backbone) -> nn.Module:
        return HEADS[cfg.head].feature_net(backbone)

    def layout(self, cfg, backbone, net, spec) -> FeatureLayout:
        return HEADS[cfg.head].layout(backbone, net, spec)

    def make_views(self, job: Job, train: bool):
        from headstart.augment import shrink_for_augmentation
        from headstart.tasks.detect.augment import detection_views

        pipeline, views = (job.pipeline, job.views) if train else (None, 1)
        share = job.cfg.mosaic if train and HEADS[job.cfg.head].mosaic else 0.0
        pool = job.report.splits["train"]

        def partners(rng: np.random.Generator) -> list:
            picks = [pool[int(i)] for i in rng.integers(0, len(pool), 3)]
            return [
                (shrink_for_augmentation(decode_for(s.path, job.spec), job.spec), s.classes, s.boxes) for s in picks
            ]

        def make(img, sample, seed):
            pixels, targets = detection_views(img, sample, pipeline, job.spec, views, seed, share, partners)
            rows = [np.concatenate([np.full((len(t), 1), v, np.float32), t], 1) for v, t in enumerate(targets)]
            meta = np.concatenate([np.array([[-1, img.width, img.height, 0, 0, 0]], np.float32), *rows])
            return pixels, {"targets": meta}

        return make

    def head_config(self, cfg, layout: FeatureLayout, labels, backbone):
        return HEADS[cfg.head].config(cfg, layout, labels)

    def fit(self, job: Job, head_cfg) -> nn.Module:
        return HEADS[job.cfg.head].fit(job, head_cfg)

    def evaluate(self, job: Job, head: nn.Module) -> dict:
        from headstart.tasks.detect.fit import val_sizes

        val, spec = job.val_features, job.spec
        boxes, scores = decode_head(head, val.values[:, 0], spec.input_size, device=job.device)
        sizes = val_sizes(job)
        preds = predictions_in_pixels(boxes, scores, sizes, spec)
        truth = ground_truth_in_pixels(val.samples, sizes)
        evaluation = mean_average_precision(preds, truth, job.labels)
        plot_detection_curves(job.history, job.run_dir / "training_curves.png")
        plot_detections([s.path for s in val.samples], preds, truth, job.labels, job.run_dir / "val_predictions.png")
        return {
            **evaluation,
            "num_images": len(val.samples),
            "num_boxes": int(sum(len(s.classes) for s in val.samples)),
        }

    def build_model(self, record, spec, features, head_state, run_dir) -> Detector:
        head, features = recorded_head(record.head).rebuild(record.head, features)
        head.load_state_dict(head_state)
        return Detector(PixelNormalize(spec.mean, spec.std), features, head, spec.input_size)

    def evaluate_model(self, model, data_dir: str, out: Path, other: str | None = None) -> dict:
        """mAP of a detector (a run's or a bundle's) on a YOLO-format data set's 'test' split, else 'val', else
        'train'."""
        from headstart.runs import write_json

        if other:
            raise ValueError("--other measures a classifier's novelty score; a detector has none. Leave it out.")

        decoded = DecodedImages(model.spec)  # each image decoded once: by the check, for the model
        report = scan_yolo_eval_split(data_dir, decoded=decoded)
        (split,) = report.splits
        log.info("%s", report.format())
        log.info("evaluating on the %s", report.split_source)
        if report.labels != model.labels:
            raise ValueError(f"{report.yaml_path} names other classes than the model was trained on; cannot evaluate.")
        samples = report.splits[split]
        metrics, preds, truth = evaluate_detector(model, samples, decode=decoded.take)
        del decoded
        plot_detections([s.path for s in samples], preds, truth, model.labels, out / "predictions.png")
        write_json(out / "metrics.json", {"split": str(Path(data_dir).resolve()), **metrics, "data": report.to_dict()})
        return {"split": split, **{k: metrics[k] for k in ("num_images", "num_boxes", "map50", "map50_95")}}

    def cross_validate(self, cfg: DetectConfig, folds: int) -> tuple[dict, Path]:
        """`headstart crossval`: k-fold cross-validation (``crossval.py``); the summary and the file it is in."""
        from headstart.crossval import SUMMARY
        from headstart.tasks.detect.crossval import cross_validate

        return cross_validate(cfg, folds), Path(cfg.out) / SUMMARY


TASK = DetectTask()
