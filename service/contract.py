"""The contract the project rests on, torch-free and at the bottom of the house.

- :class:`RunRecord`: a run directory's ``config.yaml``, what training wrote and everything needs to rebuild the model.
- :class:`Manifest`: a bundle's ``manifest.json`` (also embedded in each ONNX file), what serving needs.
- :class:`Model`: what predicting needs from a model, whether a bundle (ONNX) or a run directory (PyTorch), so the
  CLI, evaluation, export checks and the service share one code path.

Both records carry a schema version and are written and read through these classes only: a file of another version
is refused with a message naming both versions.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from .errors import HeadstartError
from .preprocess import PreprocessSpec

RUN_SCHEMA_VERSION = 1
MANIFEST_SCHEMA_VERSION = 1


class ContractError(HeadstartError, ValueError):
    """A run record or manifest is of another schema version, or lacks what this version requires."""


def plain(value: Any) -> Any:
    """JSON's view of a value: tuples become lists, so records compare equal however they were built."""
    return json.loads(json.dumps(value, default=str))


def _require(data: Any, keys: tuple[str, ...], what: str, source: str) -> dict:
    if not isinstance(data, dict):
        raise ContractError(f"{source}: {what} is not a mapping; it was not written by headstart.")
    missing = [k for k in keys if k not in data]
    if missing:
        raise ContractError(f"{source}: {what} lacks {', '.join(missing)}; it was not written by this headstart.")
    return data


def _check_version(found: Any, expected: int, what: str, source: str, remedy: str) -> None:
    if found != expected:
        raise ContractError(
            f"{source} is a {what} of schema version {found!r}; this headstart reads version {expected}. {remedy}"
        )


# ---------------------------------------------------------------- the run record (config.yaml)


@dataclass(frozen=True)
class BackboneRecord:
    """The frozen backbone as a run records it: enough to rebuild it and verify its weights by content hash."""

    name: str
    pretrained: bool
    weights_path: str | None
    weights: str | None
    weights_sha256: str | None
    num_features: int
    feature_map: tuple[int, ...]
    stages: tuple[str, ...]

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "pretrained": self.pretrained,
            "weights_path": self.weights_path,
            "weights": self.weights,
            "weights_sha256": self.weights_sha256,
            "num_features": self.num_features,
            "feature_map": list(self.feature_map),
            "stages": list(self.stages),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "backbone") -> BackboneRecord:
        keys = ("name", "pretrained", "weights_path", "weights", "weights_sha256", "num_features", "feature_map")
        _require(data, keys, "the backbone record", source)
        return cls(**{k: data[k] for k in keys}, stages=tuple(data.get("stages", ())))


@dataclass(frozen=True)
class RunRecord:
    """``config.yaml`` of a run directory: the task, every option, the backbone, the head and the data it saw."""

    task: str
    options: dict
    backbone: BackboneRecord
    head: dict
    data: dict
    features: dict
    versions: dict
    schema_version: int = RUN_SCHEMA_VERSION

    def to_dict(self) -> dict:
        return {
            "headstart_run": self.schema_version,
            "task": self.task,
            "options": dict(self.options),
            "backbone": self.backbone.to_dict(),
            "head": dict(self.head),
            "data": dict(self.data),
            "features": dict(self.features),
            "versions": dict(self.versions),
        }

    @classmethod
    def from_dict(cls, data: Any, source: str = "config.yaml") -> RunRecord:
        _require(data, ("headstart_run",), "the run record", source)
        _check_version(
            data["headstart_run"],
            RUN_SCHEMA_VERSION,
            "run record",
            source,
            "Retrain with this version, or use the headstart that trained it.",
        )
        _require(data, ("options", "backbone", "head"), "the run record", source)
        task = data.get("task", "classify")  # records written before there were tasks are classifiers
        if not isinstance(task, str) or not task:
            raise ContractError(f"{source}: the task must be a name, got {task!r}.")
        return cls(
            task=task,
            options=data["options"],
            backbone=BackboneRecord.from_dict(data["backbone"], source),
            head=data["head"],
            data=data.get("data", {}),
            features=data.get("features", {}),
            versions=data.get("versions", {}),
            schema_version=data["headstart_run"],
        )


# ---------------------------------------------------------------- the bundle manifest (manifest.json)


@dataclass(frozen=True)
class Manifest:
    """``manifest.json`` of a bundle. ``files`` (name → sha256 and size) is the one field not embedded in the ONNX
    files, since a file cannot contain its own hash."""

    name: str
    version: str
    task: str
    labels: tuple[str, ...]
    backbone: dict  # name, weights, weights_sha256, feature_map
    head: dict
    preprocess: PreprocessSpec
    input: dict  # name, shape, dtype, range, color
    outputs: tuple[dict, ...]  # name, shape, what; in the order the ONNX graph returns them
    metrics: dict
    verification: dict
    int8: dict | None
    created: str
    headstart: dict  # versions of headstart, torch and onnxruntime that exported it
    files: dict = field(default_factory=dict)
    #: per file ("fp32", "int8"), per runtime and precision ("onnxruntime", "openvino", "openvino-bf16"): how it
    #: compared on the run's validation images, and whether it may be served ("allowed"). None: not measured.
    runtimes: dict | None = None
    #: "none of these": the novelty score's threshold, the kept rate it was set at, k, and its calibration (the
    #: ``novelty`` output computes the score). None: a model without one (exported before it existed, a detector).
    open_set: dict | None = None
    #: a multi-label model's decision: ``global`` threshold, ``per_label`` thresholds (labels with enough
    #: validation positives), how they were chosen. None: a model whose labels exclude each other.
    thresholds: dict | None = None
    schema_version: int = MANIFEST_SCHEMA_VERSION

    EXTERNAL_ONLY = ("files",)

    @property
    def feature_map(self) -> list[int]:
        return list(self.backbone["feature_map"])

    @property
    def input_name(self) -> str:
        return self.input["name"]

    @property
    def output_names(self) -> list[str]:
        return [o["name"] for o in self.outputs]

    def to_dict(self) -> dict:
        return plain(
            {
                "schema_version": self.schema_version,
                "name": self.name,
                "version": self.version,
                "task": self.task,
                "labels": list(self.labels),
                "backbone": self.backbone,
                "head": self.head,
                "preprocess": self.preprocess.to_dict(),
                "input": self.input,
                "outputs": list(self.outputs),
                "metrics": self.metrics,
                "verification": self.verification,
                "int8": self.int8,
                "created": self.created,
                "headstart": self.headstart,
                **({"runtimes": self.runtimes} if self.runtimes is not None else {}),
                **({"open_set": self.open_set} if self.open_set is not None else {}),
                **({"thresholds": self.thresholds} if self.thresholds is not None else {}),
                "files": self.files,
            }
        )

    def embedded(self) -> dict:
        """The part embedded in the ONNX files' metadata."""
        return {k: v for k, v in self.to_dict().items() if k not in self.EXTERNAL_ONLY}

    @classmethod
    def from_dict(cls, data: Any, source: str = "manifest.json") -> Manifest:
        _require(data, ("schema_version",), "the manifest", source)
        _check_version(
            data["schema_version"],
            MANIFEST_SCHEMA_VERSION,
            "bundle manifest",
            source,
            "Re-export the bundle with this version: headstart export RUN_DIR.",
        )
        keys = (
            "name",
            "version",
            "task",
            "labels",
            "backbone",
            "head",
            "preprocess",
            "input",
            "outputs",
            "metrics",
            "verification",
            "created",
            "headstart",
        )
        _require(data, keys, "the manifest", source)
        # the task is what trained the model; serving goes by its outputs (service/localize.py), whatever the task
        try:
            preprocess = PreprocessSpec.from_dict(data["preprocess"])
        except (TypeError, ValueError) as exc:
            raise ContractError(f"{source}: invalid preprocess section: {exc}") from exc
        return cls(
            **{k: data[k] for k in keys if k not in ("labels", "outputs", "preprocess")},
            labels=tuple(data["labels"]),
            outputs=tuple(data["outputs"]),
            preprocess=preprocess,
            int8=data.get("int8"),
            files=data.get("files") or {},
            runtimes=data.get("runtimes"),
            open_set=data.get("open_set"),
            thresholds=data.get("thresholds"),
            schema_version=data["schema_version"],
        )


# ---------------------------------------------------------------- what predicting needs from a model


@runtime_checkable
class Model(Protocol):
    """A trained model as prediction sees it: a bundle (:class:`service.bundle.Bundle`, ONNX Runtime) or a run
    directory (:class:`training.predict.RunModel`, PyTorch). Pixels are float32 (N, 3, S, S) in [0, 255]."""

    @property
    def task(self) -> str: ...

    @property
    def labels(self) -> list[str]: ...

    @property
    def spec(self) -> PreprocessSpec: ...

    @property
    def feature_map(self) -> list[int]: ...

    @property
    def output_names(self) -> list[str]:
        """The names of what :meth:`run` returns, in its order (a bundle's manifest ``outputs``)."""
        ...

    @property
    def open_set(self) -> dict | None:
        """How the model says "none of these" (``threshold``, ``kept_rate``, ...; its ``novelty`` output gives the
        score), or None for a model without a novelty score."""
        ...

    @property
    def thresholds(self) -> dict | None:
        """A multi-label model's thresholds (``global``, ``per_label``): every label at or above its threshold is
        in the answer. None for a model whose labels exclude each other."""
        ...

    def run(self, pixels: np.ndarray, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """The outputs ``names`` (default every output, in :attr:`output_names` order): a classifier's
        probabilities (N, K), class map (N, K, H, W) and, where it has one, novelty (N,); a detector's probabilities
        (N, K), boxes (N, M, 4), scores (N, M, K)."""
        ...

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        """The first output only: class probabilities (N, K)."""
        ...
