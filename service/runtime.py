"""Inference runtimes for a bundle's ONNX files: OpenVINO on CPUs, ONNX Runtime on CUDA GPUs (and as a choice).

Measured on 2-core CPUs (benchmarks/RESULTS.md, "Runtimes" and "The same benchmarks on AMD EPYC"): OpenVINO runs
the very same ONNX files faster than ONNX Runtime (ResNet-50's fp32 file 5.2x on Intel with AMX, 2.0x on AMD EPYC),
because on CPUs with bf16 units it computes an fp32 model in bf16 unless told otherwise; in full fp32 the two are
level. So precision is a verified property, never an assumption: `headstart export` measures every runtime and
precision on the run's validation images and records in the manifest which ones may be served; the service uses
OpenVINO's reduced precision only where the manifest allows it, and full fp32 otherwise (and says so).

Torch-free. ``HEADSTART_RUNTIME=auto|openvino|onnxruntime``: ``auto`` is ONNX Runtime with CUDA where a GPU is asked
for or visible, else OpenVINO where it is installed, else ONNX Runtime. A runtime asked for by name that cannot be
used is an error at start, never a silent fallback.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .cpu import cpu_info
from .errors import HeadstartError

log = logging.getLogger(__name__)

RUNTIMES = ("auto", "openvino", "onnxruntime")
DEVICES = ("auto", "cpu", "cuda")
#: what a bundle is served in: auto (bf16 on OpenVINO only where the export verified it) or always fp32
PRECISIONS = ("auto", "fp32")
#: a bundle's files: model.onnx, model.int8.onnx (export --int8)
VARIANTS = ("fp32", "int8")
#: The pixels a CPU runs through a model at once: 16 images of 224 px, 3 of 512 px (a detector's); a larger batch
#: is run in even parts within it. On a CPU the throughput does not follow the batch past that, but the activations,
#: and the arena ONNX Runtime keeps for the largest batch it ran, do: `headstart predict` of a 512 px detector, 16
#: images a run, peaked at 0.92 GB on OpenVINO and 1.77 GB on ONNX Runtime, and at 0.44-0.47 GB so
#: (benchmarks/RESULTS.md, "Prediction's memory"). A GPU takes the batch whole.
RUN_PIXELS = 16 * 224 * 224


def in_even_parts(run: Callable[[np.ndarray], list[np.ndarray]], pixels: np.ndarray, step: int) -> list[np.ndarray]:
    """``run``'s outputs for ``pixels``, run in as few parts of at most ``step`` images as it takes, of even sizes
    (17 images at 16: 9 and 8, not 16 and 1), each output concatenated over the parts; whole where it fits. A
    bundle's :class:`Session` and a run directory's model (`headstart predict RUN_DIR`) split alike."""
    if step >= len(pixels):
        return run(pixels)
    parts = [run(part) for part in np.array_split(pixels, -(-len(pixels) // step))]
    return [np.concatenate(output) for output in zip(*parts, strict=True)]


class RuntimeUnavailable(HeadstartError, RuntimeError):
    """The runtime or device asked for cannot be used here; the message says what to install or choose."""


def openvino_available() -> bool:
    try:
        import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def onnxruntime_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def choose_runtime(runtime: str = "auto", device: str = "auto") -> tuple[str, str]:
    """(runtime, device) to use for ``runtime`` in auto | openvino | onnxruntime and ``device`` in auto | cpu | cuda."""
    if runtime not in RUNTIMES:
        raise RuntimeUnavailable(f"Invalid runtime {runtime!r}. Use one of {', '.join(RUNTIMES)}.")
    if device not in DEVICES:
        raise RuntimeUnavailable(f"Invalid device {device!r}. Use one of {', '.join(DEVICES)}.")
    cuda = "CUDAExecutionProvider" in onnxruntime_providers()
    if device == "cuda" and not cuda:
        raise RuntimeUnavailable(
            "A GPU was requested (device=cuda) but ONNX Runtime's CUDA provider is not available "
            f"(available: {onnxruntime_providers()}). Install onnxruntime-gpu with a matching CUDA, or use device=cpu."
        )
    gpu = device == "cuda" or (device == "auto" and cuda)
    if runtime == "openvino":
        if device == "cuda":
            raise RuntimeUnavailable("HEADSTART_RUNTIME=openvino serves on the CPU; for a GPU use onnxruntime.")
        if not openvino_available():
            raise RuntimeUnavailable(
                "HEADSTART_RUNTIME=openvino was asked for but the openvino package is not installed: "
                "pip install openvino, or set HEADSTART_RUNTIME=onnxruntime."
            )
        return "openvino", "cpu"
    if runtime == "auto" and not gpu and openvino_available():
        return "openvino", "cpu"
    return "onnxruntime", "cuda" if gpu else "cpu"


@dataclass
class Session:
    """One loaded ONNX file on one runtime: ``run(output names, pixels)`` → those outputs."""

    runtime: str  # "openvino" | "onnxruntime"
    device: str  # "cpu" | "cuda"
    precision: str  # what the runtime computes in: "fp32", "bf16" (OpenVINO's CPU default on bf16 units)
    handle: object
    providers: list[str] = field(default_factory=list)  # ONNX Runtime's providers in use
    output_names: list[str] = field(default_factory=list)
    input_name: str = "pixels"
    #: OpenVINO's requests for :meth:`start`: idle ones, and those started whose outputs nobody has taken yet
    _idle: list = field(default_factory=list, repr=False)
    _started: deque = field(default_factory=deque, repr=False)

    #: how many inputs :meth:`start` keeps in flight on OpenVINO
    IN_FLIGHT = 2

    def run(self, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        """The outputs ``names`` for ``pixels`` (N, 3, S, S): on a CPU in as few parts as keep each within
        :data:`RUN_PIXELS`, of even sizes (17 images of 224 px: 9 and 8, not 16 and 1), each output concatenated over
        the parts."""
        return in_even_parts(lambda part: self._run(names, part), pixels, self.images_per_run(pixels))

    def images_per_run(self, pixels: np.ndarray) -> int:
        """How many of ``pixels``' images one run takes: :meth:`images_at` their size, all of them on a GPU or for
        an input that is not a batch of images (the runtime says what is wrong with it)."""
        if pixels.ndim != 4:
            return len(pixels)
        return self.images_at(pixels.shape[2] * pixels.shape[3]) or len(pixels)

    def images_at(self, pixels_per_image: int) -> int | None:
        """How many images of ``pixels_per_image`` one run takes on a CPU: :data:`RUN_PIXELS`' worth, at least one;
        None on a GPU (a batch whole)."""
        if self.device != "cpu":
            return None
        return max(1, RUN_PIXELS // max(1, pixels_per_image))

    def _run(self, names: list[str], pixels: np.ndarray) -> list[np.ndarray]:
        if self.runtime == "onnxruntime":
            return self.handle.run(names, {self.input_name: pixels})
        request, compiled = self.handle
        results = request.infer({0: pixels})
        return [np.asarray(results[compiled.output(name)]) for name in names]

    def start(self, names: list[str], pixels: np.ndarray) -> Callable[[], list[np.ndarray]]:
        """Start computing ``names`` for ``pixels``; returns what waits for those outputs (copies, in the order of
        ``names``). On OpenVINO the model runs on its own threads while the caller goes on (prepares the next
        input): :attr:`IN_FLIGHT` requests in turn, a further start first waits for the oldest one's outputs and
        keeps them for its waiter. ONNX Runtime computes at once. One caller thread at a time."""
        if self.runtime != "openvino":
            outputs = self.run(names, pixels)
            return lambda: outputs
        compiled = self.handle[1]
        if not self._idle and len(self._started) >= self.IN_FLIGHT:
            self._collect(self._started[0])
        request = self._idle.pop() if self._idle else compiled.create_infer_request()
        job = _Started(request, [compiled.output(name) for name in names])
        try:
            request.start_async({0: np.ascontiguousarray(pixels, dtype=np.float32)})
        except BaseException:  # refused before it ran (e.g. the pixels' shape): the request stays usable
            self._idle.append(request)
            raise
        self._started.append(job)
        return lambda: self._collect(job)

    def _collect(self, job: _Started) -> list[np.ndarray]:
        if job.outputs is None:
            if job not in self._started:  # its wait raised before: the request is someone else's now
                raise RuntimeError("this input's inference failed; its error was raised when it was first awaited")
            try:
                job.request.wait()  # raises what the inference raised
                job.outputs = [np.array(job.request.get_tensor(port).data) for port in job.ports]
            finally:
                self._started.remove(job)
                self._idle.append(job.request)
        return job.outputs

    def describe(self) -> str:
        where = f"{self.device}, providers {self.providers}" if self.runtime == "onnxruntime" else self.device
        return f"{self.runtime} ({where}, {self.precision})"


@dataclass(eq=False)  # one input is not another's even when they share a request (a failed one's, reused)
class _Started:
    """One input :meth:`Session.start` gave OpenVINO: its request, the outputs asked for and, once taken, them."""

    request: object
    ports: list
    outputs: list[np.ndarray] | None = None


def cpu_computes_bf16() -> bool:
    """Whether this CPU computes in bf16 (AMX or AVX-512 BF16: :attr:`CpuInfo.has_bf16`), the one answer for every
    decision: the export's ``openvino-bf16`` check, the service's precision (``served_precision``), OpenVINO's
    precision hint and training's bf16 views. OpenVINO's CPU plugin reports bf16 (``OPTIMIZATION_CAPABILITIES``) on
    exactly these CPUs: tests/test_export.py checks that the two agree on the machine the suite runs on."""
    return cpu_info().has_bf16


def open_session(
    path: Path,
    runtime: str,
    device: str,
    *,
    precision: str = "fp32",
    threads: int | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
) -> Session:
    """Load ``path`` on ``runtime``/``device`` (from :func:`choose_runtime`). ``precision`` is OpenVINO's inference
    precision hint: ``fp32``, or ``bf16`` (its default on CPUs with bf16 units); ONNX Runtime computes as the file says.
    """
    if runtime == "openvino":
        return _open_openvino(path, precision, threads)
    return _open_onnxruntime(path, device, threads, spinning, memory_arena)


def _open_openvino(path: Path, precision: str, threads: int | None, pinning: bool = False) -> Session:
    """OpenVINO's CPU plugin with the latency hint (one stream: the service runs one request per worker at a time).
    Thread pinning is off: each worker process would pin its threads to the same first cores (measured, 2 workers x
    1 thread on 2 cores: 112 req/s pinned, 166 unpinned; benchmarks/RESULTS.md, "Runtimes")."""
    import openvino as ov

    core = ov.Core()
    bf16 = precision == "bf16" and cpu_computes_bf16()
    config = {
        "INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
        "PERFORMANCE_HINT": "LATENCY",
        "ENABLE_CPU_PINNING": pinning,
    }
    if threads:
        config["INFERENCE_NUM_THREADS"] = threads
    try:
        compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    except Exception as exc:  # OpenVINO raises its own exception types
        raise RuntimeUnavailable(f"OpenVINO cannot load {path}: {exc}") from exc
    names = [o.get_any_name() for o in compiled.outputs]
    return Session(
        "openvino", "cpu", "bf16" if bf16 else "fp32", (compiled.create_infer_request(), compiled), output_names=names
    )


def _open_onnxruntime(path: Path, device: str, threads: int | None, spinning: bool, memory_arena: bool) -> Session:
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        # idle ONNX Runtime threads otherwise busy-wait, taking CPU from HTTP handling between requests
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # The arena keeps the buffers of the largest batch it has run and reuses them (1.3x the throughput with varying
    # batch sizes: benchmarks/memory.py), so a server's memory rises to a plateau set by its largest batch.
    options.enable_cpu_mem_arena = memory_arena
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise RuntimeUnavailable(f"ONNX Runtime cannot load {path}: {exc}") from exc
    in_use = session.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in in_use:
        raise RuntimeUnavailable(f"device=cuda was requested but ONNX Runtime runs on {in_use}.")
    return Session(
        "onnxruntime",
        device,
        "fp32",
        session,
        providers=in_use,
        output_names=[o.name for o in session.get_outputs()],
        input_name=session.get_inputs()[0].name,
    )


def onnx_metadata(path: Path) -> dict[str, str]:
    """The ``metadata_props`` of an ONNX file, read from its protobuf without loading the model (any runtime).

    ModelProto field 14 is ``repeated StringStringEntryProto metadata_props`` (key = 1, value = 2); every other
    field is skipped by its wire type.
    """
    data = Path(path).read_bytes()
    out: dict[str, str] = {}
    for number, value in _fields(data):
        if number == 14 and isinstance(value, bytes):
            entry = dict(_fields(value))
            key, val = entry.get(1), entry.get(2)
            if isinstance(key, bytes) and isinstance(val, bytes):
                out[key.decode("utf-8")] = val.decode("utf-8")
    return out


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        if pos >= len(data) or shift > 63:
            raise ValueError("truncated or malformed protobuf varint")
        byte = data[pos]
        result |= (byte & 0x7F) << shift
        pos += 1
        if not byte & 0x80:
            return result, pos
        shift += 7


def _fields(data: bytes):
    """(field number, value) of each top-level field of a protobuf message; bytes for length-delimited fields."""
    pos = 0
    while pos < len(data):
        key, pos = _varint(data, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(data, pos)
        elif wire == 1:
            value, pos = data[pos : pos + 8], pos + 8
        elif wire == 2:
            length, pos = _varint(data, pos)
            if pos + length > len(data):
                raise ValueError("truncated protobuf field")
            value, pos = data[pos : pos + length], pos + length
        elif wire == 5:
            value, pos = data[pos : pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, value
