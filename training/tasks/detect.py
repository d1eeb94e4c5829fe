"""Detection: a YOLO-format data set → a YOLO-style grid head on the frozen backbone's feature map.

What differs from the engine's job: every training image is augmented ``views`` times with box-aware transforms
(``training/detect_augment.py``: letterbox to the input size, scale/translate, flip, colour), the features are maps
(cached in float16) with the views' boxes cached beside them, the loss is YOLO's (``training/detect_loss.py``), and
validation mAP@0.5 every ``eval_every`` epochs selects the best epoch (``training/detect_eval.py``).
"""

from __future__ import annotations

import logging

import numpy as np
import torch

from models.heads import GridHead, GridHeadConfig
from models.wrapper import Detector, PixelNormalize
from service.preprocess import PreprocessSpec
from training.config import DetectConfig
from training.detect_augment import build_detection_augmentation, detection_views
from training.detect_data import scan_yolo_dataset
from training.detect_eval import (
    decode_head,
    ground_truth_in_pixels,
    mean_average_precision,
    predictions_in_pixels,
)
from training.detect_loss import anchor_shapes, build_targets, yolo_loss
from training.engine import FeatureLayout, Job
from training.evaluate import plot_detection_curves, plot_detections
from training.loop import Phase, Schedule, fit
from training.onnx_io import ExportError, ort_outputs, torch_outputs

log = logging.getLogger("headstart.detect")


def _unpack(meta: np.ndarray, views: int) -> tuple[tuple[int, int], list[np.ndarray]]:
    """The cached extras of one image: its (width, height) and per view its (M, 5) targets."""
    rows = meta[1:]
    return (int(meta[0, 1]), int(meta[0, 2])), [rows[rows[:, 0] == v][:, 1:] for v in range(views)]


def _val_sizes(job: Job) -> list[tuple[int, int]]:
    return [_unpack(meta["targets"], 1)[0] for meta in job.val.extras]


class DetectTask:
    name = "detect"
    config = DetectConfig
    headline = ("map50", "map50_95")
    manifest_metrics = ("map50", "map50_95", "num_images", "num_boxes")
    int8 = False  # not yet: int8 needs an accuracy gate on mAP

    def scan(self, cfg: DetectConfig):
        return scan_yolo_dataset(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)

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

    def layout(self, backbone, net, spec) -> FeatureLayout:
        with torch.no_grad():
            grid = list(net(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[2:])
        return FeatureLayout(shape=(backbone.num_features, *grid), pool=False, feature_map=grid, dtype=np.float16,
                             extras=("targets",))  # fmt: skip

    def make_views(self, job: Job, train: bool):
        pipeline, views = (job.pipeline, job.views) if train else (None, 1)

        def make(img, sample, seed):
            pixels, targets = detection_views(img, sample, pipeline, job.spec, views, seed)
            rows = [np.concatenate([np.full((len(t), 1), v, np.float32), t], 1) for v, t in enumerate(targets)]
            meta = np.concatenate([np.array([[-1, img.width, img.height, 0, 0, 0]], np.float32), *rows])
            return pixels, {"targets": meta}

        return make

    def head_config(self, cfg, num_features, labels) -> GridHeadConfig:
        return GridHeadConfig(num_features, len(labels), cfg.boxes_per_cell, cfg.hidden, cfg.dropout)

    def fit(self, job: Job, head_cfg: GridHeadConfig) -> GridHead:
        cfg, device, spec = job.cfg, job.device, job.spec
        channels, *grid = job.train.values.shape[2:]
        maps = torch.from_numpy(job.train.values.reshape(-1, channels, *grid)).to(device)
        train_targets = [t for meta in job.train.extras for t in _unpack(meta["targets"], job.views)[1]]
        anchors = anchor_shapes(train_targets, cfg.boxes_per_cell)
        *targets, dropped = build_targets(train_targets, tuple(grid), anchors)
        obj, tbox, tcls = (t.to(device) for t in targets)
        job.training.update(anchors=anchors.round(4).tolist(), boxes_dropped_cell_full=dropped)
        sizes = _val_sizes(job)
        truth = ground_truth_in_pixels(job.val.samples, sizes)
        val_maps = job.val.values[:, 0]
        head = GridHead(head_cfg).to(device)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step(idx: torch.Tensor, epoch: int) -> dict:
            idx = idx.to(device)
            loss, parts = yolo_loss(head(maps[idx].float()), obj[idx], tbox[idx], tcls[idx], cfg.lambda_coord,
                                    cfg.lambda_noobj)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"train_loss": loss.item() * len(idx), **{k: v * len(idx) for k, v in parts.items()}}

        def evaluate() -> dict:
            boxes, scores = decode_head(head, val_maps, spec.input_size, device=device)
            metrics = mean_average_precision(predictions_in_pixels(boxes, scores, sizes, spec), truth, job.labels)
            return {"val_map50": metrics["map50"], "val_map50_95": metrics["map50_95"]}

        def row(epoch: int, sums: dict, val: dict | None) -> dict:
            out = {"epoch": epoch, **{k: sums.get(k, 0.0) / len(maps) for k in ("train_loss", "coord", "objectness", "class")}}
            if val is not None:
                log.info("epoch %d: loss %.3f val mAP@0.5 %.4f mAP@0.5:0.95 %.4f", epoch, out["train_loss"],
                         val["val_map50"], val["val_map50_95"])  # fmt: skip
            return {**out, **(val or {})}

        phase = Phase(head, opt, len(maps), step, evaluate, row,
                      scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs))  # fmt: skip
        schedule = Schedule("head", cfg.epochs, cfg.batch_size, cfg.seed, monitor="val_map50", mode="max",
                            patience=cfg.patience if cfg.select == "best" else None, eval_every=cfg.eval_every,
                            select=cfg.select)  # fmt: skip
        result = fit(phase, schedule, job.checkpoint, cfg.progress)
        head.load_state_dict(result.best)
        job.history += result.history
        job.training["head"] = result.summary
        return head

    def evaluate(self, job: Job, head: GridHead) -> dict:
        val, spec = job.val.samples, job.spec
        boxes, scores = decode_head(head, job.val.values[:, 0], spec.input_size, device=job.device)
        sizes = _val_sizes(job)
        preds = predictions_in_pixels(boxes, scores, sizes, spec)
        truth = ground_truth_in_pixels(val, sizes)
        evaluation = mean_average_precision(preds, truth, job.labels)
        plot_detection_curves(job.history, job.run_dir / "training_curves.png")
        plot_detections([s.path for s in val], preds, truth, job.labels, job.run_dir / "val_predictions.png")
        return {**evaluation, "num_images": len(val), "num_boxes": int(sum(len(s.classes) for s in val))}

    def build_model(self, record, spec, features, head_state) -> Detector:
        head = GridHead(GridHeadConfig.from_dict(record.head))
        head.load_state_dict(head_state)
        return Detector(PixelNormalize(spec.mean, spec.std), features, head, spec.input_size)

    # ---------------------------------------------------------------- export

    def outputs(self, num_classes: int, fmap: list[int], head: dict) -> list[dict]:
        predictors = fmap[0] * fmap[1] * head["boxes_per_cell"]
        return [
            {"name": "probabilities", "shape": ["batch", num_classes],
             "what": "image-level class scores: each class's best predictor (objectness x class probability)"},
            {"name": "boxes", "shape": ["batch", predictors, 4],
             "what": f"x1 y1 x2 y2 in input pixels of every grid predictor ({fmap[0]}x{fmap[1]} cells x "
                     f"{head['boxes_per_cell']} boxes)"},
            {"name": "scores", "shape": ["batch", predictors, num_classes],
             "what": "objectness x class probability per predictor and class"},
        ]  # fmt: skip

    def verify(self, model, session, paths, targets, spec) -> tuple[dict, None]:
        """ONNX Runtime against PyTorch on the run's validation images: every output of every predictor."""
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
        return {"images": len(paths), "max_abs_diff": diffs, "top1_agreement": agreement}, None

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: np.ndarray) -> dict:
        """A runtime/precision may serve if its image-level top-1 agrees on >= 99% of the validation images and no
        box score moves by more than 0.05."""
        agreement = float((reference[0].argmax(1) == got[0].argmax(1)).mean())
        diffs = {n: float(np.abs(a - b).max()) for n, a, b in zip(("probabilities", "boxes", "scores"), reference,
                                                                 got, strict=True)}  # fmt: skip
        return {"images": len(reference[0]), "top1_agreement": agreement, "max_abs_diff": diffs,
                "allowed": agreement >= 0.99 and diffs["scores"] <= 0.05}  # fmt: skip
