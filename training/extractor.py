"""What computes a run's frozen features: the device and precision a run trains with, torch's traced backbone
(:func:`features_fn`) and OpenVINO's compiled one (:class:`Extractor`), each ``pixels (N, 3, S, S) float32 →
features``; OpenVINO's also starts a batch and lets the caller go on (``start``), which
:func:`headstart.features.extract_features` uses to decode and augment the next images meanwhile.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from headstart.service.runtime import cpu_computes_bf16

log = logging.getLogger(__name__)


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` → the device training runs on; ``cuda`` without a usable GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"Invalid --device {device!r}. Use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no usable GPU (torch.cuda.is_available() is "
            "False). Install a CUDA build of torch, or use --device cpu."
        )
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether augmented training views are extracted in bf16: asked for, or ``auto`` where bf16 units exist."""
    if precision != "auto":
        return precision == "bf16"
    # on CPUs: native bf16 units (AMX tiles or AVX-512 BF16), where bf16 convolutions run several times faster than
    # fp32 (benchmarks/feature_extraction.py)
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_computes_bf16()


def features_fn(
    model: torch.nn.Module, bf16: bool, pool: bool = True, device: torch.device | str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (N, 3, S, S) float32 → pooled features (N, C) float32 (``pool=False``: feature maps (N, C, H, W)).

    The frozen backbone is traced and frozen with TorchScript (conv/BatchNorm folding, oneDNN fusion) in
    channels_last; with ``bf16`` its weights are cast to bfloat16. ``benchmarks/feature_extraction.py`` measures the
    variants (MobileNetV2, batch 8, 2 cores: eager fp32 55 img/s, traced fp32 131, traced bf16 193). If tracing
    fails (an unusual model), the eager model is used. On ``device`` cuda the model runs there; results come back
    to the CPU.
    """
    import copy
    import warnings

    device = torch.device(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    net = copy.deepcopy(model).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    run_net: Callable = net
    example = torch.zeros(2, 3, 64, 64, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
            if not bf16 and device.type == "cpu":
                traced = torch.jit.optimize_for_inference(traced)
            traced(example)
            run_net = traced
    except Exception as exc:
        log.debug("TorchScript tracing failed (%s); using the eager backbone", exc)

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = run_net(x).float()
        return (out.mean(dim=(2, 3)) if pool else out.contiguous()).cpu().numpy()

    return run


class Extractor:
    """What computes a run's frozen features: ``runtime`` "openvino" or "torch", and :meth:`fn` per precision.

    ``extractor`` auto | openvino | torch; ``auto`` is OpenVINO on a CPU where it is installed, else torch. OpenVINO
    runs the net written once to ONNX (TorchScript exporter, batch axis dynamic, ``input_size`` square) and compiled
    per precision: bf16 (on CPUs with bf16 units) for the augmented training views, full fp32 for the clean images.
    Measured on the 2-core AMD EPYC, MobileNetV2 batch 8: 472 img/s in bf16 against torch's traced bf16 282, 232 in
    fp32 against 158; its fp32 features within 4.8e-6 of torch's eager fp32 (``benchmarks/feature_extraction.py``,
    tests/test_train.py). A net OpenVINO cannot take (an unusual model) is computed by torch and the log says why; on
    a GPU torch always computes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        input_size: int,
        pool: bool = True,
        device: torch.device | str = "cpu",
        extractor: str = "auto",
        lazy: bool = False,
    ) -> None:
        from headstart.service.runtime import openvino_available

        self.model, self.pool, self.device, self.input_size = model, pool, torch.device(device), input_size
        self.choice = extractor
        self._fns: dict[bool, Callable[[np.ndarray], np.ndarray]] = {}
        if extractor == "openvino" and self.device.type != "cpu":
            raise ValueError("--extractor openvino runs on the CPU; with --device cuda use --extractor torch or auto.")
        if extractor == "openvino" and not openvino_available():
            raise ValueError("--extractor openvino needs the openvino package: pip install openvino, or use torch.")
        self.runtime = "torch"
        if extractor != "torch" and self.device.type == "cpu" and openvino_available():
            self.runtime = "openvino"
            if not lazy:
                try:
                    self._compile()  # both precisions here, so that a refusal falls back before any feature
                except OpenVINORefused as exc:
                    self.use_torch(exc)

    def _compile(self) -> None:
        """Both precisions compiled by OpenVINO (once); :class:`OpenVINORefused` where it cannot take the net, or
        ``ValueError`` where ``--extractor openvino`` asked for it by name."""
        if self._fns:
            return
        try:
            self._fns = _openvino_fns(self.model, self.input_size, self.pool)
        except Exception as exc:  # the exporter or OpenVINO refuses some nets
            if self.choice == "openvino":
                raise ValueError(
                    f"OpenVINO cannot compute this backbone's features ({exc}); use --extractor torch."
                ) from exc
            raise OpenVINORefused(exc) from exc

    def use_torch(self, refused: OpenVINORefused) -> None:
        """From now on torch computes the features (OpenVINO refused the net)."""
        log.warning("OpenVINO cannot compute this backbone's features (%s); torch computes them", refused.reason)
        self.runtime, self._fns = "torch", {}

    def fn(self, bf16: bool) -> Callable[[np.ndarray], np.ndarray]:
        """pixels (N, 3, S, S) float32 → features, as :func:`features_fn` returns them; built once per precision.
        Built ``lazy``, OpenVINO compiles the net when the first features are computed (a run whose features are
        all cached never compiles it: 0.6 s of a warm hymenoptera run); should it refuse the net then, the call
        raises :class:`OpenVINORefused` and the caller starts again with :meth:`use_torch` (its features so far,
        cached under OpenVINO's name, are not torch's)."""
        if self.runtime == "openvino":
            return _Compiled(self, bf16)
        if bf16 not in self._fns:
            self._fns[bf16] = features_fn(self.model, bf16, pool=self.pool, device=self.device)
        return self._fns[bf16]


class OpenVINORefused(Exception):
    """OpenVINO (or the ONNX exporter before it) cannot take the net; ``reason`` says why."""

    def __init__(self, reason: Exception) -> None:
        super().__init__(f"OpenVINO cannot compute this backbone's features ({reason})")
        self.reason = reason


class _Compiled:
    """An :class:`Extractor`'s OpenVINO features for one precision, compiled at the first call or start."""

    def __init__(self, extractor: Extractor, bf16: bool) -> None:
        self.extractor, self.bf16 = extractor, bf16

    def _features(self) -> _OpenVINOFeatures:
        self.extractor._compile()
        return self.extractor._fns[self.bf16]

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        return self._features()(pixels)

    def start(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        return self._features().start(pixels)


class _Pooled(torch.nn.Module):
    """A feature net whose maps are averaged over space, as :func:`features_fn` pools them."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def _openvino_fns(model: torch.nn.Module, input_size: int, pool: bool) -> dict[bool, Callable]:
    """{bf16: pixels → features} computed by OpenVINO: the frozen net written to ONNX in a temporary folder (the
    TorchScript exporter: 0.9 s, against several for the dynamo one) and opened there once per precision by the
    service's own loader (``service/runtime.py``: bf16 only on CPUs with bf16 units)."""
    import copy
    import tempfile

    from headstart.onnx_io import traced_export
    from headstart.service.runtime import open_session

    net = copy.deepcopy(model).eval().float()
    net = _Pooled(net) if pool else net
    with tempfile.TemporaryDirectory(prefix="headstart-features-") as tmp:
        path = Path(tmp) / "features.onnx"
        reason = traced_export(net, torch.zeros(1, 3, input_size, input_size), path, 17, ["features"])
        if not path.is_file():  # the exporter failed; a trace the tracer doubts is used, as it was before
            raise RuntimeError(reason)
        threads = torch.get_num_threads()
        sessions = {
            bf16: open_session(path, "openvino", "cpu", precision="bf16" if bf16 else "fp32", threads=threads)
            for bf16 in (False, True)
        }  # compiled: the file may go

    return {bf16: _OpenVINOFeatures(session) for bf16, session in sessions.items()}


class _OpenVINOFeatures:
    """pixels → features on an OpenVINO session; :meth:`start` lets the caller prepare the next pixels meanwhile."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run(["features"], np.ascontiguousarray(pixels, dtype=np.float32))[0]
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its output buffer

    def start(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        wait = self.session.start(["features"], pixels)
        return lambda: wait()[0]
