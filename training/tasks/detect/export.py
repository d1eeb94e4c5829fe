"""The detector's export side: its graph's outputs, and the checks its bundle must pass."""

from __future__ import annotations

import logging

import numpy as np

from headstart.onnx_io import CheckImages, ExportError, max_abs_diff, ort_outputs
from headstart.predict import torch_outputs
from headstart.tasks.base import TaskExport
from headstart.tasks.detect.data import labelled_samples
from headstart.tasks.detect.heads import recorded_head
from headstart.tasks.detect.metrics import (
    ground_truth_in_pixels,
    mean_average_precision,
    predictions_in_pixels,
)

log = logging.getLogger("headstart.detect")


class DetectExport(TaskExport):
    manifest_metrics = ("map50", "map50_95", "num_images", "num_boxes")
    int8 = True  # gated on validation AP50 (int8_quality)

    def outputs(self, run) -> list[dict]:
        head, feature_map, num_classes = run.record.head, list(run.record.backbone.feature_map), len(run.labels)
        predictors, where, score = recorded_head(head).predictors(head, feature_map)
        return [
            {
                "name": "probabilities",
                "shape": ["batch", num_classes],
                "what": f"image-level class scores: each class's best predictor ({score})",
            },
            {
                "name": "boxes",
                "shape": ["batch", predictors, 4],
                "what": f"x1 y1 x2 y2 in input pixels of every predictor ({where})",
            },
            {"name": "scores", "shape": ["batch", predictors, num_classes], "what": f"{score} per predictor and class"},
        ]

    def verify(self, model, session, images: CheckImages, targets) -> tuple[dict, list[np.ndarray]]:
        """ONNX Runtime against PyTorch on the run's validation images: every output of every predictor. Returns the
        record for the manifest and ONNX Runtime's outputs."""
        ref, got = torch_outputs(model, images), ort_outputs(session, images)
        names = ("probabilities", "boxes", "scores")
        diffs = {name: max_abs_diff(a, b) for name, a, b in zip(names, ref, got, strict=True)}
        agreement = float((ref[0].argmax(1) == got[0].argmax(1)).mean())
        log.info(
            "ONNX Runtime vs PyTorch on %d validation images: max |Δ| %s, top-1 agreement %.2f%%",
            len(images),
            {k: f"{v:.2e}" for k, v in diffs.items()},
            100 * agreement,
        )
        # boxes are in input pixels (0.05 px is invisible); scores and probabilities are probabilities; NaN fails
        if not (
            agreement == 1.0 and diffs["scores"] <= 1e-3 and diffs["probabilities"] <= 1e-3 and diffs["boxes"] <= 0.05
        ):
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch (max differences {diffs}, top-1 agreement {agreement:.2%}); "
                "the export is not trustworthy and was not written."
            )
        return {"images": len(images), "max_abs_diff": diffs, "top1_agreement": agreement}, got

    def int8_quality(self, run, reference: list[np.ndarray], session, images: CheckImages, targets) -> dict:
        """AP50 and AP50:95 of the int8 model against the fp32 one (``reference``: its outputs) on the validation
        images, with their labels read again from the data set."""
        truth_samples = labelled_samples(run.record.data["yaml"], images.paths, run.labels)
        sizes = images.sizes
        truth = ground_truth_in_pixels(truth_samples, sizes)
        got = ort_outputs(session, images)
        out: dict = {"metric": "map50", "images": len(images)}
        for name, outputs in (("fp32", reference), ("int8", got)):
            preds = predictions_in_pixels(outputs[1], outputs[2], sizes, run.spec)
            m = mean_average_precision(preds, truth, run.labels)
            out.update({f"map50_{name}": m["map50"], f"map50_95_{name}": m["map50_95"]})
        out["drop"] = out["map50_fp32"] - out["map50_int8"]
        out["max_abs_score_diff"] = max_abs_diff(got[2], reference[2])
        return out

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: np.ndarray) -> dict:
        """A runtime/precision may serve if its image-level top-1 agrees on >= 99% of the validation images and no
        box score moves by more than 0.05."""
        agreement = float((reference[0].argmax(1) == got[0].argmax(1)).mean())
        diffs = {
            n: max_abs_diff(a, b) for n, a, b in zip(("probabilities", "boxes", "scores"), reference, got, strict=True)
        }
        return {
            "images": len(reference[0]),
            "top1_agreement": agreement,
            "max_abs_diff": diffs,
            "allowed": agreement >= 0.99 and diffs["scores"] <= 0.05,
        }
