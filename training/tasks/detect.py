"""Detection: a YOLO-format data set → a YOLO-style grid head on the frozen backbone's feature map.

What differs from the engine's job: every training image is augmented ``views`` times with box-aware transforms
(``training/detect_augment.py``: letterbox to the input size, scale/translate, flip, colour), the features are maps
(cached in float16) with the views' boxes cached beside them, the loss is YOLO's (``training/detect_loss.py``), and
validation mAP@0.5 every ``eval_every`` epochs selects the best epoch (``training/detect_eval.py``).
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import torch
from torch import nn

from models.heads import GridHead, GridHeadConfig
from models.pyramid import STRIDES, FlatPyramid, Pyramid, PyramidHead, PyramidHeadConfig
from models.wrapper import Detector, PixelNormalize
from service.preprocess import PreprocessSpec, decode_image
from training.augment import shrink_for_augmentation
from training.config import DetectConfig
from training.detect_augment import build_detection_augmentation, detection_views
from training.detect_data import keep_classes, labelled_samples, scan_yolo_dataset
from training.detect_eval import (
    decode_head,
    ground_truth_in_pixels,
    mean_average_precision,
    predictions_in_pixels,
)
from training.detect_fit import fit_grid, fit_pyramid, val_sizes
from training.engine import FeatureLayout, Job
from training.evaluate import plot_detection_curves, plot_detections
from training.onnx_io import ExportError, ort_outputs, torch_outputs

log = logging.getLogger("headstart.detect")


class DetectTask:
    name = "detect"
    config = DetectConfig
    headline = ("map50", "map50_95")
    manifest_metrics = ("map50", "map50_95", "num_images", "num_boxes")
    int8 = True  # gated on validation AP50 (int8_quality)

    def scan(self, cfg: DetectConfig, report=None):
        report = report or scan_yolo_dataset(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
        names = cfg.class_names()
        return keep_classes(report, names) if names and names != report.labels else report

    def data_record(self, cfg, report) -> dict:
        return {"root": str(report.root), "yaml": str(report.yaml_path), "split": report.split_source}

    def split_row(self, sample) -> list:
        return [len(sample.classes)]

    def input_spec(self, cfg, backbone) -> PreprocessSpec:
        base = backbone.preprocess
        return PreprocessSpec(input_size=cfg.input_size, resize=cfg.input_size, interpolation=base.interpolation,
                              mean=base.mean, std=base.std, fit="pad")  # fmt: skip

    def augmentation(self, preset, spec):
        return build_detection_augmentation(preset, spec)

    def view_recipe(self, cfg, report) -> dict:
        """Mosaic views hold other training images: their identities are part of what the cached views depend on."""
        if cfg.head != "pyramid" or not cfg.mosaic or cfg.augment == "none":
            return {}
        pool = hashlib.sha256("\n".join(s.identity for s in report.splits["train"]).encode()).hexdigest()
        return {"mosaic": cfg.mosaic, "mosaic_pool": pool}

    def feature_net(self, cfg, backbone) -> nn.Module:
        return FlatPyramid(Pyramid(backbone.features)) if cfg.head == "pyramid" else backbone.features

    def layout(self, backbone, net, spec) -> FeatureLayout:
        with torch.no_grad():
            out = net(torch.zeros(1, 3, spec.input_size, spec.input_size))
        if out.ndim == 2:  # a flattened pyramid; the record keeps the stride-32 grid
            grid = [spec.input_size // 32] * 2
            return FeatureLayout(shape=(out.shape[1],), pool=False, feature_map=grid, dtype=np.float16,
                                 extras=("targets",), channels=net[-1].pyramid.channels)  # fmt: skip
        grid = list(out.shape[2:])
        return FeatureLayout(shape=(backbone.num_features, *grid), pool=False, feature_map=grid, dtype=np.float16,
                             extras=("targets",), channels=(backbone.num_features,))  # fmt: skip

    def make_views(self, job: Job, train: bool):
        pipeline, views = (job.pipeline, job.views) if train else (None, 1)
        share = job.cfg.mosaic if train and job.cfg.head == "pyramid" else 0.0
        pool = job.report.splits["train"]

        def partners(rng: np.random.Generator) -> list:
            picks = [pool[int(i)] for i in rng.integers(0, len(pool), 3)]
            return [(shrink_for_augmentation(decode_image(s.path).convert("RGB"), job.spec), s.classes, s.boxes)
                    for s in picks]  # fmt: skip

        def make(img, sample, seed):
            pixels, targets = detection_views(img, sample, pipeline, job.spec, views, seed, share, partners)
            rows = [np.concatenate([np.full((len(t), 1), v, np.float32), t], 1) for v, t in enumerate(targets)]
            meta = np.concatenate([np.array([[-1, img.width, img.height, 0, 0, 0]], np.float32), *rows])
            return pixels, {"targets": meta}

        return make

    def head_config(self, cfg, layout: FeatureLayout, labels) -> GridHeadConfig | PyramidHeadConfig:
        if cfg.head == "pyramid":
            return PyramidHeadConfig(layout.channels, len(labels), cfg.input_size, STRIDES, cfg.width, cfg.dropout)
        return GridHeadConfig(layout.channels[0], len(labels), cfg.boxes_per_cell, cfg.hidden, cfg.dropout)

    def fit(self, job: Job, head_cfg) -> nn.Module:
        return fit_pyramid(job, head_cfg) if isinstance(head_cfg, PyramidHeadConfig) else fit_grid(job, head_cfg)

    def evaluate(self, job: Job, head: GridHead) -> dict:
        val, spec = job.val.samples, job.spec
        boxes, scores = decode_head(head, job.val.values[:, 0], spec.input_size, device=job.device)
        sizes = val_sizes(job)
        preds = predictions_in_pixels(boxes, scores, sizes, spec)
        truth = ground_truth_in_pixels(val, sizes)
        evaluation = mean_average_precision(preds, truth, job.labels)
        plot_detection_curves(job.history, job.run_dir / "training_curves.png")
        plot_detections([s.path for s in val], preds, truth, job.labels, job.run_dir / "val_predictions.png")
        return {**evaluation, "num_images": len(val), "num_boxes": int(sum(len(s.classes) for s in val))}

    def build_model(self, record, spec, features, head_state) -> Detector:
        if record.head.get("kind") == "pyramid":
            cfg = PyramidHeadConfig.from_dict(record.head)
            head, features = PyramidHead(cfg), Pyramid(features, cfg.strides)
        else:
            head = GridHead(GridHeadConfig.from_dict(record.head))
        head.load_state_dict(head_state)
        return Detector(PixelNormalize(spec.mean, spec.std), features, head, spec.input_size)

    # ---------------------------------------------------------------- export

    def outputs(self, num_classes: int, fmap: list[int], head: dict) -> list[dict]:
        if head.get("kind") == "pyramid":
            cfg = PyramidHeadConfig.from_dict(head)
            predictors = cfg.num_predictors
            where = " + ".join(f"{h}x{w} cells at stride {s}" for (h, w), s in zip(cfg.sizes, cfg.strides,
                                                                                   strict=True))  # fmt: skip
            score = "class score (trained towards the box's IoU with its object)"
        else:
            predictors = fmap[0] * fmap[1] * head["boxes_per_cell"]
            where = f"{fmap[0]}x{fmap[1]} cells x {head['boxes_per_cell']} boxes"
            score = "objectness x class probability"
        return [
            {"name": "probabilities", "shape": ["batch", num_classes],
             "what": f"image-level class scores: each class's best predictor ({score})"},
            {"name": "boxes", "shape": ["batch", predictors, 4],
             "what": f"x1 y1 x2 y2 in input pixels of every predictor ({where})"},
            {"name": "scores", "shape": ["batch", predictors, num_classes], "what": f"{score} per predictor and class"},
        ]  # fmt: skip

    def verify(self, model, session, paths, targets, spec) -> tuple[dict, list[np.ndarray]]:
        """ONNX Runtime against PyTorch on the run's validation images: every output of every predictor. Returns the
        record for the manifest and ONNX Runtime's outputs."""
        ref, got = torch_outputs(model, paths, spec), ort_outputs(session, paths, spec)
        names = ("probabilities", "boxes", "scores")
        diffs = {name: float(np.abs(a - b).max()) for name, a, b in zip(names, ref, got, strict=True)}
        agreement = float((ref[0].argmax(1) == got[0].argmax(1)).mean())
        log.info("ONNX Runtime vs PyTorch on %d validation images: max |Δ| %s, top-1 agreement %.2f%%", len(paths),
                 {k: f"{v:.2e}" for k, v in diffs.items()}, 100 * agreement)  # fmt: skip
        # boxes are in input pixels (0.05 px is invisible); scores and probabilities are probabilities
        if agreement < 1.0 or diffs["scores"] > 1e-3 or diffs["probabilities"] > 1e-3 or diffs["boxes"] > 0.05:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch (max differences {diffs}, top-1 agreement {agreement:.2%}); "
                "the export is not trustworthy and was not written."
            )
        return {"images": len(paths), "max_abs_diff": diffs, "top1_agreement": agreement}, got

    def int8_quality(self, run, reference: list[np.ndarray], session, paths, targets) -> dict:
        """AP50 and AP50:95 of the int8 model against the fp32 one (``reference``: its outputs) on the validation
        images, with their labels read again from the data set."""
        truth_samples = labelled_samples(run.record.data["yaml"], paths, run.labels)
        sizes = [decode_image(p).size for p in paths]
        truth = ground_truth_in_pixels(truth_samples, sizes)
        got = ort_outputs(session, paths, run.spec)
        out: dict = {"metric": "map50", "images": len(paths)}
        for name, outputs in (("fp32", reference), ("int8", got)):
            preds = predictions_in_pixels(outputs[1], outputs[2], sizes, run.spec)
            m = mean_average_precision(preds, truth, run.labels)
            out.update({f"map50_{name}": m["map50"], f"map50_95_{name}": m["map50_95"]})
        out["drop"] = out["map50_fp32"] - out["map50_int8"]
        out["max_abs_score_diff"] = float(np.abs(got[2] - reference[2]).max())
        return out

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: np.ndarray) -> dict:
        """A runtime/precision may serve if its image-level top-1 agrees on >= 99% of the validation images and no
        box score moves by more than 0.05."""
        agreement = float((reference[0].argmax(1) == got[0].argmax(1)).mean())
        diffs = {n: float(np.abs(a - b).max()) for n, a, b in zip(("probabilities", "boxes", "scores"), reference,
                                                                 got, strict=True)}  # fmt: skip
        return {"images": len(reference[0]), "top1_agreement": agreement, "max_abs_diff": diffs,
                "allowed": agreement >= 0.99 and diffs["scores"] <= 0.05}  # fmt: skip
