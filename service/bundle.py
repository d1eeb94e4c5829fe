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
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .contract import ContractError, Manifest
from .cpu import CpuInfo, cpu_info
from .devserver import bentoml_home
from .errors import HeadstartError
from .preprocess import PreprocessSpec
from .runtime import (
    PRECISIONS,
    RuntimeUnavailable,
    Session,
    choose_runtime,
    onnx_metadata,
    onnxruntime_providers,
    open_session,
)

log = logging.getLogger(__name__)

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
    return onnxruntime_providers()


@dataclass
class Bundle:
    """A verified bundle loaded on a runtime (OpenVINO or ONNX Runtime); a :class:`service.contract.Model`."""

    path: Path
    manifest: Manifest
    session: Session
    variant: str  # "fp32" or "int8": which file
    precision_note: str = ""  # why the runtime computes in the precision it does

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
    def output_names(self) -> list[str]:
        return self.manifest.output_names

    @property
    def open_set(self) -> dict | None:
        return self.manifest.open_set

    @property
    def thresholds(self) -> dict | None:
        return self.manifest.thresholds

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def runtime(self) -> str:
        return self.session.runtime

    @property
    def precision(self) -> str:
        return self.session.precision

    @property
    def providers(self) -> list[str]:
        return self.session.providers if self.session.runtime == "onnxruntime" else ["OpenVINO CPU"]

    @property
    def images_per_run(self) -> int | None:
        """How many of its input images the model runs at once on a CPU (16 of 224 px, 3 of 512 px); None on a GPU,
        which takes a batch whole (:meth:`Session.images_at <headstart.service.runtime.Session.images_at>`)."""
        return self.session.images_at(self.spec.input_size**2)

    def run(self, pixels: np.ndarray, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """pixels (N, 3, S, S) float32 in [0, 255] → the outputs ``names`` (default every output, in the manifest's
        order)."""
        return self.session.run(list(names or self.output_names), pixels)

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.session.run(self.output_names[:1], pixels)[0]


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


#: Files a bundle directory may hold besides those its manifest lists: the manifest, and BentoML's model.yaml in the
#: model store. Anything else is refused: an ONNX file can load external data from beside it, so a file no hash
#: covers could change the answers while every listed file still verifies.
UNLISTED_ALLOWED = (MANIFEST, "model.yaml")


def verify_files(bundle_dir: Path, manifest: Manifest) -> None:
    files = manifest.files
    if MODEL_FP32 not in files:
        raise BundleError(f"{bundle_dir / MANIFEST} lists no {MODEL_FP32}; re-export the bundle.")
    extra = sorted(p.name for p in bundle_dir.iterdir() if p.name not in files and p.name not in UNLISTED_ALLOWED)
    if extra:
        shown = ", ".join(repr(name) for name in extra[:5]) + (f" and {len(extra) - 5} more" if len(extra) > 5 else "")
        raise BundleError(
            f"{bundle_dir} holds files its manifest does not list ({shown}). A model file can read data from beside "
            "it, so a bundle serves nothing unlisted: remove them, or re-export the bundle into an empty directory."
        )
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
        raise BundleError(f"{text!r} is not a directory, and bentoml is not installed to look it up as a tag.") from exc
    try:
        return Path(bentoml.models.get(text).path)
    except NotFound as exc:
        raise BundleError(
            f"No model {text!r} in the BentoML model store ({os.environ.get('BENTOML_HOME', '~/bentoml')}). "
            "List models with: bentoml models list"
        ) from exc
    except OSError as exc:  # BentoML makes its home's folders first: a missing or read-only home
        raise BundleError(
            f"{text!r} is looked up in BentoML's model store, and BentoML cannot use its home ({bentoml_home()}): "
            f"{exc.strerror or exc}. Set BENTOML_HOME to the folder that holds the store, or give the bundle's folder."
        ) from exc


def verify_bundle(ref: str | Path) -> tuple[Path, Manifest]:
    """Resolve a bundle directory or tag and check its files against the manifest; returns (directory, manifest)."""
    bundle_dir = resolve_bundle_path(ref)
    manifest = read_manifest(bundle_dir)
    verify_files(bundle_dir, manifest)
    return bundle_dir, manifest


def served_precision(
    manifest: Manifest, variant: str, runtime: str, precision: str = "auto", cpu: CpuInfo | None = None
) -> tuple[str, str]:
    """(precision, why) a bundle's file is served in. OpenVINO's bf16 only where the export measured it on the
    run's validation images and it passed (``manifest.runtimes``) and this CPU (``cpu``, default this machine's) has
    bf16 units; ``precision="fp32"`` forces full precision."""
    if runtime != "openvino":
        return "fp32", "ONNX Runtime computes as the file says"
    if precision == "fp32":
        return "fp32", "fp32 asked for (HEADSTART_PRECISION=fp32)"
    cpu = cpu or cpu_info()
    if not cpu.has_bf16:
        return "fp32", f"this CPU ({cpu.kind}) has no bf16 units (AMX or AVX-512 BF16); serving fp32"
    check = ((manifest.runtimes or {}).get(variant) or {}).get("openvino-bf16")
    if check is None:
        return "fp32", "bf16 was not measured for this bundle at export (re-export to measure it); serving fp32"
    # the task's agreement figure: top-1 (a classifier, a detector) or the same label sets (a multi-label model)
    key = next((k for k in ("top1_agreement", "decision_agreement", "label_set_agreement") if k in check), None)
    agreement = f"{key.removesuffix('_agreement').replace('_', ' ')} agreement {check[key]:.2%}" if key else "checked"
    if not check.get("allowed"):
        diffs = check.get("max_abs_diff")
        if isinstance(diffs, dict) and "scores" in diffs:
            lost = f"box scores moved by up to {diffs['scores']:.3f}"
        elif "map_drop" in check:
            lost = f"{check['map_drop'] * 100:.1f} mAP points lost"
        else:
            lost = f"{check.get('accuracy_drop', 0) * 100:.1f} accuracy points lost"
        return "fp32", f"bf16 failed the export's check ({agreement}, {lost}); serving fp32"
    return "bf16", f"bf16 passed the export's check ({agreement})"


def int8_note(manifest: Manifest, cpu: CpuInfo | None = None) -> str:
    """A warning where this CPU's int8 kernels saturate on the bundle's int8 file: one of 8-bit weights
    (``manifest.int8["weight_bits"]``: exported before they were held to 7 bits, or with --int8-weight-bits 8),
    served on an x86 CPU without VNNI; else ""."""
    cpu = cpu or cpu_info()
    if (manifest.int8 or {}).get("weight_bits", 8) <= 7 or not cpu.int8_saturates:
        return ""
    return (
        f"this CPU ({cpu.kind}, no VNNI) saturates int8 sums on this file's 8-bit weights: its answers drift "
        "further from the fp32 model's than on CPUs with VNNI; re-export with --int8 (7-bit weights, the default) "
        "or serve fp32"
    )


def variant_file(bundle_dir: Path, manifest: Manifest, variant: str) -> str:
    """The bundle's file for ``variant``, or a BundleError saying what to do."""
    filename = {"fp32": MODEL_FP32, "int8": MODEL_INT8}.get(variant)
    if filename is None:
        raise BundleError(f"Invalid variant {variant!r}. Use fp32 or int8.")
    if filename not in manifest.files:
        raise BundleError(
            f"{bundle_dir} has no int8 model (HEADSTART_VARIANT=int8); export with --int8, or serve the fp32 variant."
        )
    return filename


def load_bundle(
    ref: str | Path,
    *,
    variant: str = "fp32",
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    threads: int | None = None,
    spinning: bool = True,
    memory_arena: bool = True,
) -> Bundle:
    """Load and verify a bundle (directory or store tag) on a runtime (:func:`service.runtime.choose_runtime`).

    ``memory_arena=False`` turns off ONNX Runtime's CPU memory arena (see :mod:`service.runtime`).
    """
    bundle_dir, manifest = verify_bundle(ref)
    filename = variant_file(bundle_dir, manifest, variant)
    if precision not in PRECISIONS:
        raise BundleError(f"Invalid precision {precision!r}. Use auto (what the export verified) or fp32.")
    _check_embedded_manifest(bundle_dir, filename)
    try:
        runtime, device = choose_runtime(runtime, device)
        served, why = served_precision(manifest, variant, runtime, precision)
        if variant == "int8" and (saturates := int8_note(manifest)):
            log.warning("%s:%s: %s", manifest.name, manifest.version, saturates)
            why = f"{why}; {saturates}"
        session = open_session(
            bundle_dir / filename,
            runtime,
            device,
            precision=served,
            threads=threads,
            spinning=spinning,
            memory_arena=memory_arena,
        )
    except RuntimeUnavailable as exc:
        raise BundleError(str(exc)) from exc
    _check_outputs(bundle_dir / filename, manifest, session)
    log.info(
        "loaded %s:%s (%s) from %s on %s: %s",
        manifest.name,
        manifest.version,
        variant,
        bundle_dir,
        session.describe(),
        why,
    )
    return Bundle(bundle_dir, manifest, session, variant, why)


def _check_embedded_manifest(bundle_dir: Path, filename: str) -> None:
    """The manifest embedded in the ONNX file is the one beside it (less its file hashes)."""
    embedded = onnx_metadata(bundle_dir / filename).get(METADATA_KEY)
    if embedded is None:
        raise BundleError(f"{bundle_dir / filename} carries no embedded manifest; re-export the bundle.")
    if json.loads(embedded) != embedded_view(read_manifest_dict(bundle_dir)):
        raise BundleError(
            f"The manifest embedded in {bundle_dir / filename} differs from {bundle_dir / MANIFEST}; "
            "the bundle was edited by hand. Re-export it."
        )


def _check_outputs(path: Path, manifest: Manifest, session: Session) -> None:
    """The loaded file has the outputs its manifest names, the first with one score per label."""
    missing = [n for n in manifest.output_names if n not in session.output_names]
    if missing:
        raise BundleError(f"{path} lacks the outputs {missing} its manifest names. Re-export it.")
    if manifest.open_set is not None and "novelty" not in manifest.output_names:
        raise BundleError(f"{path}: the manifest has a novelty threshold, the model no novelty output. Re-export it.")
    size = manifest.preprocess.input_size
    probs = session.run(manifest.output_names[:1], np.zeros((1, 3, size, size), np.float32))[0]
    if probs.shape[-1] != len(manifest.labels):
        raise BundleError(
            f"{path} outputs {probs.shape[-1]} classes but the manifest has {len(manifest.labels)} labels. "
            "Re-export the bundle."
        )
