"""The classifier's export side: its graph's outputs, and the checks its bundle must pass."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from headstart.onnx_io import CheckImages, ExportError, max_abs_diff, ort_outputs
from headstart.open_set import NOVELTY_TOLERANCE
from headstart.predict import torch_outputs
from headstart.tasks.base import TaskExport

log = logging.getLogger("headstart")

#: the most the int8 file may move an image's novelty against the fp32 one (0.017 on hymenoptera's validation
#: images, 0.022 on photos of other things); beyond it the export warns (int8 is gated on accuracy)
INT8_NOVELTY_TOLERANCE = 0.05


@dataclass(frozen=True)
class Expected:
    """What the checks compare with: each validation image's class, and the novelty threshold (None: the run has
    no novelty score) at which "none of these" is decided."""

    labels: np.ndarray
    novelty_threshold: float | None


def _novelty(outputs: list[np.ndarray]) -> np.ndarray | None:
    return outputs[2] if len(outputs) > 2 else None


def _novelty_agreement(reference: np.ndarray, got: np.ndarray, threshold: float) -> dict:
    return {
        "novelty_max_abs_diff": max_abs_diff(reference, got),
        "unknown_agreement": float(((reference > threshold) == (got > threshold)).mean()),
    }


class ClassifyExport(TaskExport):
    manifest_metrics = ("accuracy", "macro_f1", "calibration_error", "num_images")
    int8 = True  # a static int8 model, kept only if it loses at most 1 accuracy point

    def outputs(self, run) -> list[dict]:
        num_classes, feature_map = len(run.labels), list(run.record.backbone.feature_map)
        outputs = [
            {"name": "probabilities", "shape": ["batch", num_classes], "what": "class probabilities"},
            {
                "name": "class_map",
                "shape": ["batch", num_classes, *feature_map],
                "what": "per-cell class probabilities (class activation map) on the feature grid",
            },
        ]
        novelty = getattr(run.model, "novelty", None)
        if novelty is not None:
            outputs.append(
                {
                    "name": "novelty",
                    "shape": ["batch"],
                    "what": f"1 - mean cosine similarity to the {novelty.k} nearest of {len(novelty.bank)} training "
                    f"images' features; above {novelty.config.threshold:.4f}: none of the classes",
                }
            )
        return outputs

    def targets(self, run, column: list) -> Expected:
        """The class index of each image, and the run's novelty threshold."""
        novelty = getattr(run.model, "novelty", None)
        return Expected(np.asarray(column, dtype=np.int64), None if novelty is None else novelty.config.threshold)

    def verify(self, model, session, images: CheckImages, targets: Expected) -> tuple[dict, list[np.ndarray]]:
        """ONNX Runtime against PyTorch on the run's validation images: 100% top-1 agreement, |Δp| at most 1e-3, and
        the novelty within 1e-3. Returns the record for the manifest and ONNX Runtime's outputs."""
        torch_out, onnx_out = torch_outputs(model, images), ort_outputs(session, images)
        max_diff = max_abs_diff(torch_out[0], onnx_out[0])
        agreement = float((torch_out[0].argmax(1) == onnx_out[0].argmax(1)).mean())
        record = {"images": len(images), "max_abs_prob_diff": max_diff, "top1_agreement": agreement}
        if targets.novelty_threshold is not None:
            record |= _novelty_agreement(_novelty(torch_out), _novelty(onnx_out), targets.novelty_threshold)
        log.info(
            "ONNX Runtime vs PyTorch on %d validation images: max |Δp| %.2e, top-1 agreement %.2f%%%s",
            len(images),
            max_diff,
            100 * agreement,
            f", max |Δ novelty| {record['novelty_max_abs_diff']:.2e}" if "novelty_max_abs_diff" in record else "",
        )
        if not (agreement == 1.0 and max_diff <= 1e-3 and record.get("novelty_max_abs_diff", 0.0) <= 1e-3):  # NaN fails
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch ({record}); the export is not trustworthy and was not written."
            )
        record["onnx_accuracy"] = float((onnx_out[0].argmax(1) == targets.labels).mean())
        return record, onnx_out

    def int8_quality(self, run, reference: list[np.ndarray], session, images: CheckImages, targets: Expected) -> dict:
        """The int8 model against the fp32 one (``reference``: its outputs) on the validation images: accuracy (the
        gate), and how far the novelty moved and how often "none of these" changed (reported)."""
        got = ort_outputs(session, images)
        ref_probs, q_probs, truth = reference[0], got[0], targets.labels
        fp32, int8 = float((ref_probs.argmax(1) == truth).mean()), float((q_probs.argmax(1) == truth).mean())
        quality = {
            "metric": "accuracy",
            "accuracy_fp32": fp32,
            "accuracy_int8": int8,
            "drop": fp32 - int8,
            "top1_agreement": float((q_probs.argmax(1) == ref_probs.argmax(1)).mean()),
            "max_abs_prob_diff": max_abs_diff(q_probs, ref_probs),
        }
        if targets.novelty_threshold is not None:
            quality |= _novelty_agreement(_novelty(reference), _novelty(got), targets.novelty_threshold)
            quality["kept_rate_int8"] = float((_novelty(got) <= targets.novelty_threshold).mean())
            quality["novelty_within_tolerance"] = quality["novelty_max_abs_diff"] <= INT8_NOVELTY_TOLERANCE
            if not quality["novelty_within_tolerance"]:
                log.warning(
                    "int8 moves the novelty score by up to %.3f (more than %.2f): its 'none of these' answers differ "
                    "from fp32's on %.1f%% of the validation images",
                    quality["novelty_max_abs_diff"],
                    INT8_NOVELTY_TOLERANCE,
                    100 * (1 - quality["unknown_agreement"]),
                )
        return quality

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: Expected) -> dict:
        """A runtime/precision may serve if it agrees with the reference on >= 99% of the validation images, loses at
        most 1 accuracy point, and (with a novelty score) moves no novelty by more than :data:`NOVELTY_TOLERANCE`
        and changes "none of these" on at most 1% of the images."""
        ref, probs = reference[0], got[0]
        agreement = float((ref.argmax(1) == probs.argmax(1)).mean())
        accuracy = float((probs.argmax(1) == targets.labels).mean())
        drop = float((ref.argmax(1) == targets.labels).mean()) - accuracy
        gate = {
            "images": len(ref),
            "top1_agreement": agreement,
            "accuracy": accuracy,
            "accuracy_drop": drop,
            "max_abs_prob_diff": max_abs_diff(ref, probs),
        }
        allowed = agreement >= 0.99 and drop <= 0.01
        if targets.novelty_threshold is not None and _novelty(reference) is not None:
            gate |= _novelty_agreement(_novelty(reference), _novelty(got), targets.novelty_threshold)
            allowed = (
                allowed and gate["novelty_max_abs_diff"] <= NOVELTY_TOLERANCE and gate["unknown_agreement"] >= 0.99
            )
        return gate | {"allowed": allowed}
