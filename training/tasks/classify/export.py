"""The classifier's export side: its graph's outputs, and the checks its bundle must pass."""

from __future__ import annotations

import logging

import numpy as np

from training.onnx_io import ExportError, ort_probs
from training.predict import predict_paths
from training.tasks.base import TaskExport

log = logging.getLogger("headstart")


class ClassifyExport(TaskExport):
    manifest_metrics = ("accuracy", "macro_f1", "calibration_error", "num_images")
    int8 = True  # a static int8 model, kept only if it loses at most 1 accuracy point

    def outputs(self, num_classes: int, feature_map: list[int], head: dict) -> list[dict]:
        return [
            {"name": "probabilities", "shape": ["batch", num_classes], "what": "class probabilities"},
            {
                "name": "class_map",
                "shape": ["batch", num_classes, *feature_map],
                "what": "per-cell class probabilities (class activation map) on the feature grid",
            },
        ]

    def targets(self, run, column: list) -> np.ndarray:
        """The class index of each image."""
        return np.asarray(column, dtype=np.int64)

    def verify(self, model, session, paths, targets, spec) -> tuple[dict, np.ndarray]:
        """ONNX Runtime against PyTorch on the run's validation images: 100% top-1 agreement, |Δp| at most 1e-3.
        Returns the record for the manifest and ONNX Runtime's probabilities."""
        torch_probs = predict_paths(model, paths, spec)
        onnx_probs = ort_probs(session, paths, spec)
        max_diff = float(np.abs(torch_probs - onnx_probs).max())
        agreement = float((torch_probs.argmax(1) == onnx_probs.argmax(1)).mean())
        log.info(
            "ONNX Runtime vs PyTorch on %d validation images: max |Δp| %.2e, top-1 agreement %.2f%%",
            len(paths),
            max_diff,
            100 * agreement,
        )
        if agreement < 1.0 or max_diff > 1e-3:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch (top-1 agreement {agreement:.2%}, max |Δp| {max_diff:.2e}); "
                "the export is not trustworthy and was not written."
            )
        accuracy = float((onnx_probs.argmax(1) == targets).mean())
        return {
            "images": len(paths),
            "max_abs_prob_diff": max_diff,
            "top1_agreement": agreement,
            "onnx_accuracy": accuracy,
        }, onnx_probs

    def int8_quality(self, run, reference: np.ndarray, session, paths, targets) -> dict:
        """The int8 model against the fp32 one (``reference``: its probabilities) on the validation images."""
        q_probs = ort_probs(session, paths, run.spec)
        fp32, int8 = float((reference.argmax(1) == targets).mean()), float((q_probs.argmax(1) == targets).mean())
        return {
            "metric": "accuracy",
            "accuracy_fp32": fp32,
            "accuracy_int8": int8,
            "drop": fp32 - int8,
            "top1_agreement": float((q_probs.argmax(1) == reference.argmax(1)).mean()),
            "max_abs_prob_diff": float(np.abs(q_probs - reference).max()),
        }

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: np.ndarray) -> dict:
        """A runtime/precision may serve if it agrees with the reference on >= 99% of the validation images and
        loses at most 1 accuracy point."""
        ref, probs = reference[0], got[0]
        agreement = float((ref.argmax(1) == probs.argmax(1)).mean())
        accuracy, ref_accuracy = float((probs.argmax(1) == targets).mean()), float((ref.argmax(1) == targets).mean())
        drop = ref_accuracy - accuracy
        return {
            "images": len(ref),
            "top1_agreement": agreement,
            "accuracy": accuracy,
            "accuracy_drop": drop,
            "max_abs_prob_diff": float(np.abs(ref - probs).max()),
            "allowed": agreement >= 0.99 and drop <= 0.01,
        }
