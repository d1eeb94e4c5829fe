"""The multi-label classifier's export side: sigmoid probabilities (and the per-cell class map) in the graph, and
the checks its bundle must pass: the same label sets at the run's thresholds on every runtime and precision."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from headstart.onnx_io import CheckImages, ExportError, max_abs_diff, ort_outputs
from headstart.open_set import NOVELTY_TOLERANCE
from headstart.predict import torch_outputs
from headstart.tasks.base import TaskExport
from headstart.tasks.multilabel.data import multi_hot
from headstart.tasks.multilabel.metrics import mean_average_precision, threshold_vector

log = logging.getLogger("headstart")


@dataclass(frozen=True)
class Expected:
    """Each validation image's labels (multi-hot) and the thresholds in force per label."""

    truth: np.ndarray
    limits: np.ndarray


def _sets(probs: np.ndarray, limits: np.ndarray) -> np.ndarray:
    return probs >= limits


def _set_agreement(a: np.ndarray, b: np.ndarray, limits: np.ndarray) -> float:
    """The share of images given exactly the same label set by both."""
    return float((_sets(a, limits) == _sets(b, limits)).all(1).mean())


def _decision_agreement(a: np.ndarray, b: np.ndarray, limits: np.ndarray) -> float:
    """The share of image-label decisions (present or not) both make alike. With many labels a single score next to
    its threshold changes an image's set: the per-image figure falls with the number of labels, this one does not."""
    return float((_sets(a, limits) == _sets(b, limits)).mean())


def _novelty_output(run) -> list[dict]:
    novelty = getattr(run.model, "novelty", None)
    if novelty is None:
        return []
    what = (
        f"1 - mean cosine similarity to the {novelty.k} nearest of {len(novelty.bank)} training images' pooled "
        f"features; above {novelty.config.threshold:.4f}: none of the labels"
    )
    return [{"name": "novelty", "shape": ["batch"], "what": what}]


def _novelty_diff(a: list[np.ndarray], b: list[np.ndarray]) -> dict:
    """How far the novelty moved between two runs of the model (nothing for a model without one)."""
    return {"novelty_max_abs_diff": max_abs_diff(a[2], b[2])} if len(a) > 2 and len(b) > 2 else {}


def _map(probs: np.ndarray, truth: np.ndarray) -> float:
    return mean_average_precision(probs, truth)["map_macro"] or 0.0


class MultiLabelExport(TaskExport):
    manifest_metrics = ("map_macro", "map_micro", "micro_f1", "sample_f1", "num_images")
    int8 = True  # kept only if validation mAP drops at most 1 point

    def outputs(self, run) -> list[dict]:
        k, feature_map = len(run.labels), list(run.record.backbone.feature_map)
        return [
            {"name": "probabilities", "shape": ["batch", k], "what": "each label's probability (sigmoid, independent)"},
            {
                "name": "class_map",
                "shape": ["batch", k, *feature_map],
                "what": "per-cell label probabilities (class activation map) on the feature grid",
            },
            *_novelty_output(run),
        ]

    def targets(self, run, column: list) -> Expected:
        return Expected(multi_hot(column, len(run.labels)), threshold_vector(run.metrics["thresholds"], run.labels))

    def verify(self, model, session, images: CheckImages, targets: Expected) -> tuple[dict, list[np.ndarray]]:
        """ONNX Runtime against PyTorch on the validation images: every image the same label set at the thresholds,
        |Δp| at most 1e-3."""
        torch_out, onnx_out = torch_outputs(model, images), ort_outputs(session, images)
        max_diff = max_abs_diff(torch_out[0], onnx_out[0])
        agreement = _set_agreement(torch_out[0], onnx_out[0], targets.limits)
        record = {
            "images": len(images),
            "max_abs_prob_diff": max_diff,
            "label_set_agreement": agreement,
            **_novelty_diff(torch_out, onnx_out),
        }
        log.info(
            "ONNX Runtime vs PyTorch on %d validation images: max |Δp| %.2e, the same label sets on %.2f%%",
            len(images),
            max_diff,
            100 * agreement,
        )
        if not (agreement == 1.0 and max_diff <= 1e-3 and record.get("novelty_max_abs_diff", 0.0) <= 1e-3):  # NaN fails
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch ({record}); the export is not trustworthy and was not written."
            )
        record["onnx_map_macro"] = _map(onnx_out[0], targets.truth)
        return record, onnx_out

    def int8_quality(self, run, reference: list[np.ndarray], session, images: CheckImages, targets: Expected) -> dict:
        got = ort_outputs(session, images)
        fp32, int8 = _map(reference[0], targets.truth), _map(got[0], targets.truth)
        return {
            "metric": "map_macro",
            "map_macro_fp32": fp32,
            "map_macro_int8": int8,
            "drop": fp32 - int8,
            "decision_agreement": _decision_agreement(reference[0], got[0], targets.limits),
            "label_set_agreement": _set_agreement(reference[0], got[0], targets.limits),
            "max_abs_prob_diff": max_abs_diff(got[0], reference[0]),
            **_novelty_diff(reference, got),
        }

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: Expected) -> dict:
        """A runtime/precision may serve if it makes >= 99% of the image-label decisions of the reference at the
        thresholds, loses at most 1 point of mAP and moves no novelty by more than :data:`NOVELTY_TOLERANCE` (how
        many images keep their exact label set is reported: with 80 labels, bf16 moved one score across its
        threshold on a third of coco128's validation images, at no loss of mAP)."""
        agreement = _decision_agreement(reference[0], got[0], targets.limits)
        drop = _map(reference[0], targets.truth) - _map(got[0], targets.truth)
        gate = {
            "images": len(got[0]),
            "decision_agreement": agreement,
            "label_set_agreement": _set_agreement(reference[0], got[0], targets.limits),
            "map_drop": drop,
            "max_abs_prob_diff": max_abs_diff(reference[0], got[0]),
            **_novelty_diff(reference, got),
        }
        novelty_ok = gate.get("novelty_max_abs_diff", 0.0) <= NOVELTY_TOLERANCE
        return gate | {"allowed": agreement >= 0.99 and drop <= 0.01 and novelty_ok}
