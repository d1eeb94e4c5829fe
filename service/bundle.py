"""The exported bundle: ``model.onnx`` (+ ``model.int8.onnx``) and ``manifest.json``, loaded for ONNX Runtime.

Torch-free. A bundle is refused unless every file matches the manifest's sha256, the manifest embedded in the ONNX
file equals the one beside it, and the label count matches the model's output shape.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.contract import MANIFEST_SCHEMA_VERSION, ContractError, Manifest
from service.errors import HeadstartError
from service.preprocess import PreprocessSpec

log = logging.getLogger(__name__)

SCHEMA_VERSION = MANIFEST_SCHEMA_VERSION
MANIFEST = "manifest.json"
MODEL_FP32 = "model.onnx"
MODEL_INT8 = "model.int8.onnx"
METADATA_KEY = "headstart_manifest"
EXTERNAL_ONLY = Manifest.EXTERNAL_ONLY
_TAG = re.compile(r"^[a-z0-9][a-z0-9_.-]*(:[a-z0-9][a-z0-9_.-]*)?$")


class BundleError(HeadstartError, RuntimeError):
    """A bundle is missing, tampered with or inconsistent; the message says which file and what to do."""


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_view(manifest: dict) -> dict:
    """The part of a manifest that is embedded in the ONNX file's metadata."""
    return {k: v for k, v in manifest.items() if k not in EXTERNAL_ONLY}


def available_providers() -> list[str]:
    import onnxruntime as ort

    return ort.get_available_providers()


def choose_providers(device: str = "auto") -> list[str]:
    """ONNX Runtime providers for ``device`` in auto | cpu | cuda. ``cuda`` fails loudly when it cannot be used."""
    available = available_providers()
    if device not in ("auto", "cpu", "cuda"):
        raise BundleError(f"Invalid device {device!r}. Use auto, cpu or cuda.")
    if device == "cuda":
        if "CUDAExecutionProvider" not in available:
            raise BundleError(
                "A GPU was requested (device=cuda) but ONNX Runtime's CUDA provider is not available "
                f"(available: {available}). Install onnxruntime-gpu with a matching CUDA, or use device=cpu."
            )
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    if device == "auto" and "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


@dataclass
class Bundle:
    """A verified bundle with an ONNX Runtime session; a :class:`service.contract.Model`."""

    path: Path
    manifest: Manifest
    session: object
    variant: str  # "fp32" or "int8"
    providers: list[str] = field(default_factory=list)

    @property
    def task(self) -> str:
        return self.manifest.task

    @property
    def labels(self) -> list[str]:
        return list(self.manifest.labels)

    @property
    def spec(self) -> PreprocessSpec:
        return self.manifest.preprocess

    @property
    def feature_map(self) -> list[int]:
        return self.manifest.feature_map

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        """pixels (N, 3, S, S) float32 in [0, 255] → every output, in the manifest's order."""
        return self.session.run(self.manifest.output_names, {self.manifest.input_name: pixels})

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(self.manifest.output_names[:1], {self.manifest.input_name: pixels})[0]


def read_manifest_dict(bundle_dir: Path) -> dict:
    """manifest.json as written (the embedded copy in each ONNX file must equal it, less ``files``)."""
    path = bundle_dir / MANIFEST
    if not path.is_file():
        raise BundleError(
            f"{bundle_dir} is not a headstart bundle: {MANIFEST} is missing. Create one with headstart export."
        )
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{path} is not valid JSON ({exc}); re-export the bundle.") from exc


def read_manifest(bundle_dir: Path) -> Manifest:
    try:
        return Manifest.from_dict(read_manifest_dict(bundle_dir), source=str(bundle_dir / MANIFEST))
    except ContractError as exc:
        raise BundleError(str(exc)) from exc


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    files = manifest.files
    if MODEL_FP32 not in files:
        raise BundleError(f"{bundle_dir / MANIFEST} lists no {MODEL_FP32}; re-export the bundle.")
    for name, expected in files.items():
        path = bundle_dir / name
        if Path(name).name != name:
            raise BundleError(f"{bundle_dir / MANIFEST} names a file outside the bundle: {name!r}.")
        if not path.is_file():
            raise BundleError(f"{path} is missing from the bundle; re-export it.")
        actual = sha256_file(path)
        if actual != expected["sha256"]:
            raise BundleError(
                f"{path} does not match its manifest (sha256 {actual[:12]}... != {expected['sha256'][:12]}...): "
                "the file was modified or corrupted. Re-export the bundle; do not serve it."
            )


def resolve_bundle_path(ref: str | Path) -> Path:
    """A bundle directory, or a BentoML model-store tag (``name`` or ``name:version``) → its directory."""
    path = Path(ref)
    try:
        if path.is_dir():
            return path
    except OSError as exc:  # e.g. a name too long for the file system
        raise BundleError(f"{str(ref)[:80]!r}... is not a usable path: {exc.strerror}.") from exc
    text = str(ref)
    if not _TAG.match(text):
        raise BundleError(
            f"{text!r} is neither a bundle directory nor a valid model tag (name[:version], lower-case letters, "
            "digits, '-', '_' and '.')."
        )
    try:
        import bentoml
        from bentoml.exceptions import NotFound
    except ImportError as exc:
        raise BundleError(
            f"{text!r} is not a directory, and bentoml is not installed to look it up as a tag."
        ) from exc
    try:
        return Path(bentoml.models.get(text).path)
    except NotFound as exc:
        raise BundleError(
            f"No model {text!r} in the BentoML model store ({os.environ.get('BENTOML_HOME', '~/bentoml')}). "
            "List models with: bentoml models list"
        ) from exc


def verify_bundle(ref: str | Path) -> tuple[Path, Manifest]:
    """Resolve a bundle directory or tag and check its files against the manifest; returns (directory, manifest)."""
    bundle_dir = resolve_bundle_path(ref)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return bundle_dir, manifest


def load_bundle(
    ref: str | Path,
    *,
    variant: str = "fp32",
    device: str = "auto",
    threads: int | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
) -> Bundle:
    """Load and verify a bundle (directory or store tag) into an ONNX Runtime session.

    ``memory_arena=False`` turns off ONNX Runtime's CPU memory arena. The arena keeps the buffers of the largest
    batch it has run and reuses them (1.3x the throughput with varying batch sizes: benchmarks/memory.py), so a server's memory
    rises to a plateau set by its largest batch; without it, memory stays at its start-up level.
    """
    import onnxruntime as ort

    bundle_dir, manifest = verify_bundle(ref)
    filename = {"fp32": MODEL_FP32, "int8": MODEL_INT8}.get(variant)
    if filename is None:
        raise BundleError(f"Invalid variant {variant!r}. Use fp32 or int8.")
    if filename not in manifest.files:
        raise BundleError(f"{bundle_dir} has no int8 model; export with --int8 or use the fp32 variant.")
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    if not spinning:
        # idle ONNX Runtime threads otherwise busy-wait, taking CPU from HTTP handling between requests
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.enable_cpu_mem_arena = memory_arena
    providers = choose_providers(device)
    try:
        session = ort.InferenceSession(str(bundle_dir / filename), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BundleError(f"ONNX Runtime cannot load {bundle_dir / filename}: {exc}") from exc
    in_use = session.get_providers()
    if device == "cuda" and "CUDAExecutionProvider" not in in_use:
        raise BundleError(f"device=cuda was requested but ONNX Runtime runs on {in_use}.")
    embedded = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if embedded is None:
        raise BundleError(f"{bundle_dir / filename} carries no embedded manifest; re-export the bundle.")
    if json.loads(embedded) != embedded_view(read_manifest_dict(bundle_dir)):
        raise BundleError(
            f"The manifest embedded in {bundle_dir / filename} differs from {bundle_dir / MANIFEST}; "
            "the bundle was edited by hand. Re-export it."
        )
    outputs = session.get_outputs()
    num_classes = outputs[0].shape[-1]
    if isinstance(num_classes, int) and num_classes != len(manifest.labels):
        raise BundleError(
            f"{bundle_dir / filename} outputs {num_classes} classes but the manifest has "
            f"{len(manifest.labels)} labels. Re-export the bundle."
        )
    log.info("loaded %s:%s (%s) from %s on %s", manifest.name, manifest.version, variant, bundle_dir, in_use)
    return Bundle(bundle_dir, manifest, session, variant, in_use)
