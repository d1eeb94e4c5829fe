"""ONNX files: the graph written from a torch model, the manifest embedded in it, static int8 quantization, and
ONNX Runtime (or torch) run over image files for the export's checks."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from headstart.service.ahead import load_batches
from headstart.service.bundle import METADATA_KEY
from headstart.service.contract import Manifest
from headstart.service.cpu import INT8_WEIGHT_BITS, INT8_WEIGHT_BITS_CHOICES
from headstart.service.errors import HeadstartError
from headstart.service.inference import outputs_of_batches
from headstart.service.preprocess import PreprocessSpec

log = logging.getLogger("headstart")


class ExportError(HeadstartError, RuntimeError):
    """The export failed a check; nothing was written."""


INPUT_NAME = "pixels"
#: The pixels an export's check runs through a model at once: 8 images of 224 px, 1 of 512 px (a detector's). The
#: activations, and the arena ONNX Runtime keeps for them, grow with the batch; the throughput on a CPU does not: at
#: 32 images of 512 px a detector's export peaked at 8 GB (benchmarks/RESULTS.md, "Export's memory").
CHECK_BATCH_PIXELS = 8 * 224 * 224
#: The same for the int8 calibration's batches: 4 images of 224 px, 1 of 512 px. The calibration's model keeps every
#: activation until its minimum and maximum are taken (at 16 images of 224 px it peaked 1.7 GB above the rest). The
#: ranges, the minimum and maximum over all the images, do not depend on the batches but for the last bit of an
#: activation a kernel may round differently (the hymenoptera MobileNetV2's int8 file: the same, every scale).
CALIBRATION_BATCH_PIXELS = 4 * 224 * 224


def batch_for(spec: PreprocessSpec, pixels: int) -> int:
    """How many of ``spec``'s inputs make ``pixels`` (at least one)."""
    return max(1, pixels // spec.input_size**2)


OUTPUT_NAMES = ("probabilities", "class_map")


def export_onnx(
    model: torch.nn.Module,
    path: Path,
    input_size: int,
    opset: int = 17,
    output_names=OUTPUT_NAMES,
    traced: bool = True,
) -> None:
    """Export ``model`` (pixels → probabilities, class map; or a detector's outputs) with a dynamic batch axis.

    ``traced``: through torch's TorchScript exporter, which traces the model: 0.3 s for the MobileNetV2 classifier
    here, against 7.4 s for the dynamo exporter (benchmarks/RESULTS.md, "Export"). A trace records one path through
    the code, so where the tracer warns that it may not hold for other inputs (a tensor's value turned into a Python
    number, a branch taken on one), or fails, the dynamo exporter writes the file instead. An int8 twin is quantized
    from the dynamo exporter's graph (``traced=False``): OpenVINO computes one quantized from the traced graph wrong
    (73.2% top-1 agreement with ONNX Runtime on the hymenoptera validation images, where the dynamo graph's gives
    100%). Where the dynamo exporter fails, the traced file is kept, even one the tracer was unsure of. Either file is
    then held against PyTorch and run on every runtime and precision the service may use before it is kept
    (training/exporter.py). ``opset``: the traced file's (the dynamo exporter writes 18).
    """
    model.eval()
    example = torch.rand(2, 3, input_size, input_size) * 255
    names = list(output_names)
    if traced:
        reason = traced_export(model, example, path, opset, names)
        if reason is None:
            return
        log.info("ONNX export through the dynamo exporter (%s)", reason)
    batch = torch.export.Dim("batch", min=1, max=4096)
    try:
        program = torch.onnx.export(
            model,
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=names,
            dynamic_shapes=({0: batch},),
            opset_version=18,
            optimize=True,
            verbose=False,
        )
    except Exception as exc:  # what one exporter cannot write the other may: the checks that follow judge the file
        if not traced:
            traced_export(model, example, path, opset, names)  # the file, where the trace can write one
        if not path.is_file():
            raise
        log.warning("the dynamo ONNX exporter failed (%s); the traced file is kept for the export's checks", exc)
        return
    program.save(str(path))


def traced_export(model: torch.nn.Module, example: torch.Tensor, path: Path, opset: int, names: list) -> str | None:
    """The TorchScript exporter's file at ``path`` (input :data:`INPUT_NAME`, outputs ``names``, a dynamic batch
    axis); None when written and sure, else why not to keep it: the tracer's doubt (the file is written) or the
    exporter's error (no file)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                model,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=names,
                dynamic_axes={INPUT_NAME: {0: "batch"}, **{name: {0: "batch"} for name in names}},
                opset_version=opset,
            )
        except Exception as exc:  # an operator the TorchScript exporter lacks
            path.unlink(missing_ok=True)
            return f"{type(exc).__name__}: {exc}"
    unsure = [str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)]
    return f"the trace may not hold for other inputs: {unsure[0]}" if unsure else None


def embed_manifest(path: Path, manifest: Manifest) -> None:
    import onnx

    model = onnx.load(str(path))
    del model.metadata_props[:]
    entry = model.metadata_props.add()
    entry.key = METADATA_KEY
    entry.value = json.dumps(manifest.embedded(), sort_keys=True)
    model.doc_string = f"headstart {manifest.task} model {manifest.name}:{manifest.version}"
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(path))


def max_abs_diff(a: np.ndarray, b: np.ndarray, rows: int = 16) -> float:
    """``max |a - b|`` over two models' outputs for the same images, ``rows`` images at a time: a detector's scores
    for 200 images of 512 px are 344 MB, and ``np.abs(a - b)`` would allocate twice that again."""
    if a.shape != b.shape:
        raise ValueError(f"outputs of different shapes: {a.shape} and {b.shape}")
    parts = [np.abs(a[i : i + rows] - b[i : i + rows]).max(initial=0.0) for i in range(0, len(a), rows)]
    return float(np.max(parts, initial=0.0))  # a NaN anywhere stays NaN, as np.abs(a - b).max() gives


@dataclass
class CheckImages:
    """The images an export checks on, decoded and preprocessed once for every check that reads them (the PyTorch
    reference, ONNX Runtime against it, the int8 file's quality, each runtime and precision the service may use):
    each had decoded them again (4 decodes of every validation image with --int8, a 6 MP HEIC 0.2 s each).
    ``pixels`` (N, 3, S, S) uint8, the model's input without its float32 cast: the preprocessing gives whole values
    in [0, 255] (:func:`service.preprocess.preprocess`), so a quarter of the memory holds them exactly (200 images
    of a 640 px detector: 246 MB, not 983); ``sizes`` each image's (width, height) as stored, after EXIF
    rotation."""

    paths: list[Path]
    pixels: np.ndarray
    sizes: list[tuple[int, int]]
    batch_size: int  # images a check runs at once: :data:`CHECK_BATCH_PIXELS`

    @classmethod
    def load(cls, paths: Sequence[Path], spec: PreprocessSpec) -> CheckImages:
        """``paths`` decoded and preprocessed as the service does (on threads ahead: :func:`load_batches`), as many
        at a time as a check runs."""
        pixels = np.empty((len(paths), 3, spec.input_size, spec.input_size), np.uint8)
        sizes: list[tuple[int, int]] = []
        batch_size, done = batch_for(spec, CHECK_BATCH_PIXELS), 0
        for batch in load_batches(paths, spec, batch_size, sizes):
            pixels[done : done + len(batch)] = batch
            if not np.array_equal(pixels[done : done + len(batch)], batch):  # the contract, not assumed
                raise ValueError("the preprocessing gave pixels that are not whole values in [0, 255]")
            done += len(batch)
        return cls(list(paths), pixels, sizes, batch_size)

    def __len__(self) -> int:
        return len(self.paths)

    def batches(self) -> Iterator[np.ndarray]:
        """The model's input, ``batch_size`` images at a time (:data:`CHECK_BATCH_PIXELS`): float32, one batch made
        at a time."""
        for start in range(0, len(self.pixels), self.batch_size):
            yield self.pixels[start : start + self.batch_size].astype(np.float32)


def ort_outputs(session, images: CheckImages) -> list[np.ndarray]:
    """Every output of an ONNX Runtime session on the images, concatenated."""
    return outputs_of_batches(lambda px: session.run(None, {INPUT_NAME: px}), images.batches())


class Calibration:
    """ONNX Runtime CalibrationDataReader over preprocessed training images."""

    def __init__(self, paths: list[Path], spec: PreprocessSpec) -> None:
        self.batches = load_batches(paths, spec, batch_for(spec, CALIBRATION_BATCH_PIXELS))

    def get_next(self):
        batch = next(self.batches, None)
        return None if batch is None else {INPUT_NAME: batch}

    def rewind(self):  # pragma: no cover - not used by the MinMax calibrator
        raise NotImplementedError


def nodes_only_for(model, outputs: tuple[str, ...]) -> list[str]:
    """The names of the nodes of an ONNX ``model`` that compute only ``outputs`` (none of the other outputs needs
    them): e.g. the novelty score's branch, which int8 would coarsen for no speed (one small matrix product)."""
    producer = {out: node for node in model.graph.node for out in node.output}

    def ancestors(names) -> set[str]:
        seen, stack = set(), list(names)
        while stack:
            node = producer.get(stack.pop())
            if node is not None and node.name not in seen:
                seen.add(node.name)
                stack.extend(node.input)
        return seen

    others = [o.name for o in model.graph.output if o.name not in outputs]
    return sorted(ancestors(outputs) - ancestors(others))


def quantize_int8(
    fp32_path: Path,
    int8_path: Path,
    calibration_paths: list[Path],
    spec,
    keep_fp32: tuple[str, ...] = (),
    weight_bits: int = INT8_WEIGHT_BITS,
) -> None:
    """Static QDQ int8: per-channel int8 weights in ``weight_bits`` (7: ``reduce_range``; 8 for CPUs with VNNI or
    AMX only: `headstart export --int8-weight-bits 8`), uint8 activations (the fast path on x86 VNNI/AMX). The
    nodes that compute only the outputs named in ``keep_fp32`` stay in fp32.

    Seven bits because the file is served on CPUs the export never saw: without VNNI (AVX2, AVX-512 without VNNI)
    both runtimes multiply uint8 activations by int8 weights with ``vpmaddubsw``, whose pairwise sums saturate at 16
    bits; weights within [-64, 64] cannot reach that (2 x 255 x 64 < 32767), so no CPU saturates on the file.
    Measured on an AVX2-only AMD EPYC (Zen 3; hymenoptera MobileNetV2, 153 validation images, against fp32): 8-bit
    weights 98.0% top-1 agreement on ONNX Runtime and 96.1% on OpenVINO, "none of these" score moved by up to 0.155;
    7-bit weights 99.3% on both, 0.024. Where nothing saturates (AVX-512 VNNI AMD EPYC) the seventh bit costs: 8-bit
    100% on both, 7-bit 99.3% (``benchmarks/int8_weights.py``)."""
    if weight_bits not in INT8_WEIGHT_BITS_CHOICES:
        raise ValueError(f"weight_bits must be 7 or 8 (ONNX Runtime's int8 weights), not {weight_bits!r}")
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    pre = int8_path.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32_path), str(pre), skip_symbolic_shape=True)
    excluded = nodes_only_for(onnx.load(str(pre)), keep_fp32) if keep_fp32 else []
    reader = Calibration(calibration_paths, spec)

    class Reader(CalibrationDataReader):
        def get_next(self):
            return reader.get_next()

    quantize_static(
        str(pre),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        per_channel=True,
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QInt8,
        nodes_to_exclude=excluded,
        reduce_range=weight_bits == 7,
    )
    pre.unlink(missing_ok=True)
