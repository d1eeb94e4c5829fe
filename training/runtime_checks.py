"""Precision is verified, never assumed: each ONNX file of a bundle on each runtime and precision the service may
use, measured on the run's validation images against the same file on ONNX Runtime (itself verified against
PyTorch: 100% top-1 agreement for fp32; the int8 file passed its accuracy gate). The task's gate decides what may be
served; the result goes into the manifest (``runtimes``), which the service obeys."""

from __future__ import annotations

import logging
from functools import partial
from pathlib import Path

import numpy as np

from headstart.onnx_io import CheckImages
from headstart.service.inference import outputs_of_batches
from headstart.service.runtime import cpu_computes_bf16, open_session, openvino_available

log = logging.getLogger("headstart")


def runtime_checks(task, files: dict[str, Path], names: list[str], images: CheckImages, targets: np.ndarray) -> dict:
    """``{variant: {"onnxruntime" | "openvino" | "openvino-bf16": check}}``; each check from ``task.precision_gate``
    with the precision and whether it may be served. OpenVINO rows only where OpenVINO is installed, bf16 only on
    CPUs where OpenVINO would compute in bf16."""
    variants = [("openvino", "fp32"), ("openvino-bf16", "bf16")] if openvino_available() else []
    if variants and not cpu_computes_bf16():
        variants = variants[:1]
    result = {}
    for variant, path in files.items():
        reference = outputs_of_batches(partial(open_session(path, "onnxruntime", "cpu").run, names), images.batches())
        rows = {"onnxruntime": {"precision": variant, **task.precision_gate(reference, reference, targets)}}
        for key, precision in variants:
            got = outputs_of_batches(
                partial(open_session(path, "openvino", "cpu", precision=precision).run, names), images.batches()
            )
            rows[key] = {"precision": precision, **task.precision_gate(reference, got, targets)}
            agreement = next(k for k in rows[key] if k.endswith("_agreement"))  # top1_, label_set_: the task's
            log.info(
                "%s file on %s: %s %.2f%% with ONNX Runtime, %s",
                variant,
                key,
                agreement.replace("_", " "),
                100 * rows[key][agreement],
                "allowed" if rows[key]["allowed"] else "NOT allowed",
            )
        result[variant] = rows
    return result
