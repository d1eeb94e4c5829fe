"""What a task is to the engine, to export and to the command line: two base classes with defaults.

:class:`Task` is the training side: what the engine (``training/engine.py``) asks of a task while it trains, and how
a finished run becomes a model again. :class:`TaskExport` is the export side (``training/exporter.py``): the outputs of
the exported graph and the checks a bundle must pass. A task overrides only what differs from the defaults; the
methods without a default raise ``NotImplementedError`` naming what is missing.

:class:`Job`, :class:`Features` and :class:`FeatureLayout` are what the engine hands a task while it trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn

from headstart import runs
from headstart.config import RunConfig
from headstart.features import DecodedImages, FeatureCache, ViewsFn
from headstart.models import Backbone
from headstart.service.contract import RunRecord
from headstart.service.preprocess import PreprocessSpec

if TYPE_CHECKING:
    from headstart.onnx_io import CheckImages


@dataclass
class Features:
    """One split's cached features: (N, views, *shape) and per image the extras its views came with."""

    samples: list
    values: np.ndarray
    extras: list[dict[str, np.ndarray]]


@dataclass(frozen=True)
class FeatureLayout:
    """What a task extracts per view: pooled vectors or maps, their shape and dtype, and the extras it caches."""

    shape: tuple[int, ...]
    pool: bool
    #: the grid recorded as the backbone's ``feature_map`` (run record, manifest): the cells a classifier's class map
    #: has; for a multi-scale detector, the stride-32 grid of its input
    feature_map: list[int]
    dtype: Any = np.float32
    extras: tuple[str, ...] = ()
    channels: tuple[int, ...] = ()  # the channels of each feature map the head reads


@dataclass
class Job:
    """Everything a task needs while it trains, in one place."""

    cfg: Any  # the task's config (a RunConfig)
    run_dir: Path
    report: Any  # the scanned data set (the task's scan)
    backbone: Backbone
    spec: PreprocessSpec
    net: nn.Module  # normalisation + frozen backbone features
    pipeline: Any  # the training augmentation (None: no augmentation)
    views: int
    device: torch.device
    bf16: bool
    started: float
    train_features: Features | None = None
    val_features: Features | None = None
    #: the training images clean (one unaugmented fp32 view each), where the task asks (:attr:`Task.clean_train`)
    train_clean_features: Features | None = None
    cache: FeatureCache | None = None
    history: list[dict] = field(default_factory=list)
    #: what the task reports under metrics.json's "training" (class weights, epochs run, ...)
    training_report: dict = field(default_factory=dict)
    #: what a task's fit leaves for its evaluate (e.g. features of the finished model)
    scratch: dict = field(default_factory=dict)
    #: the images the data check decoded, kept for the feature extraction (:class:`headstart.features.DecodedImages`)
    decoded: DecodedImages | None = None

    @property
    def labels(self) -> list[str]:
        return self.report.labels

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / runs.CHECKPOINT


class TaskExport:
    """The export side of a task: the exported graph's outputs and the checks a bundle must pass."""

    #: the metrics.json keys the manifest carries
    manifest_metrics: tuple[str, ...] = ()
    #: whether `headstart export --int8` is offered (its quality is then gated by :meth:`int8_quality`)
    int8 = False

    def outputs(self, run) -> list[dict]:
        """The outputs (name, shape, what) of a loaded run's model (:class:`training.loaded_run.LoadedRun`), in the
        order it returns them, first the image-level class probabilities: the exported graph's outputs."""
        raise NotImplementedError(f"{type(self).__name__} must say what its exported graph outputs")

    def targets(self, run, column: list) -> Any:
        """What the checks compare with, from the second column of the run's splits.json (:meth:`Task.split_row`)
        for the images checked. Default: nothing (the checks compare runtimes with each other only)."""
        return None

    def verify(self, model: nn.Module, session, images: CheckImages, targets) -> tuple[dict, Any]:
        """ONNX Runtime against PyTorch on the validation images (decoded once for every check): (the record for
        the manifest, ONNX Runtime's outputs as the reference of the later checks); raises ``ExportError`` when
        they disagree."""
        raise NotImplementedError(f"{type(self).__name__} must verify its exported graph")

    def int8_quality(self, run, reference, session, images: CheckImages, targets) -> dict:
        """The int8 file (an ONNX Runtime ``session``) against the fp32 one (``reference``, from :meth:`verify`) on
        the validation images: ``metric``, ``<metric>_fp32``, ``<metric>_int8`` and ``drop``."""
        raise NotImplementedError(f"{type(self).__name__} offers --int8 but does not measure it")

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets) -> dict:
        """How a runtime/precision compares with the reference, and whether it may be served (``allowed``)."""
        raise NotImplementedError(f"{type(self).__name__} must say which runtimes and precisions may serve it")


class Task:
    """The training side of a task. ``name`` is its registry name; ``export`` its :class:`TaskExport`."""

    name: str = ""
    export: TaskExport = TaskExport()
    #: whether the engine also extracts the training images clean, as it does the validation images
    #: (``job.train_clean_features``): for what compares images as they are, e.g. a classifier's novelty bank
    clean_train: bool = False

    # ---------------------------------------------------------------- the data

    def scan(self, cfg: RunConfig, report=None, decoded: DecodedImages | None = None) -> Any:
        """The checked data set (``report``, when given, is a scan already made; the task may restrict it):
        ``labels``, ``splits`` (``train`` and ``val``: samples with ``path``, ``sha256`` and ``identity``),
        ``split_source``, ``format()`` and ``to_dict()``. The images the check decodes go to ``decoded`` while it has
        room (:func:`headstart.data.check_file`), for the feature extraction to take."""
        raise NotImplementedError(f"{type(self).__name__} must scan its data")

    def data_record(self, cfg: RunConfig, report) -> dict:
        """The run record's ``data``: where the data set is and how it was split."""
        return {"root": str(report.root), "split": report.split_source}

    def split_row(self, sample) -> list:
        """What splits.json keeps beside each image's path (e.g. the class index): what export reads back for its
        checks through :meth:`TaskExport.targets`."""
        return []

    # ---------------------------------------------------------------- the input and its views

    def input_spec(self, cfg: RunConfig, preprocess: PreprocessSpec) -> PreprocessSpec:
        """How an image becomes model input, given the backbone's own ``preprocess``: that, by default."""
        return preprocess

    def augmentation(self, preset: str, spec: PreprocessSpec) -> Any:
        """The training augmentation for ``preset`` (``None``: the views are the eval preprocessing)."""
        return None

    def view_recipe(self, cfg: RunConfig, report) -> dict:
        """What the training views depend on besides the image and the augmentation pipeline (cache key)."""
        return {}

    def feature_net(self, cfg: RunConfig, backbone: Backbone) -> nn.Module:
        """What the cached features are: the frozen backbone module (after pixel normalisation)."""
        return backbone.features

    def feature_key(self, cfg: RunConfig) -> str:
        """What the features depend on among the task's options (e.g. how they are pooled), for the feature cache's
        key of every split, the clean ones included ("" where only the backbone and the views decide them)."""
        return ""

    def layout(self, cfg: RunConfig, backbone: Backbone, net: nn.Module, spec: PreprocessSpec) -> FeatureLayout:
        """Pooled feature vectors of the backbone's last map."""
        return FeatureLayout(
            shape=(backbone.num_features,),
            pool=True,
            feature_map=backbone.extra["feature_map"],
            channels=(backbone.num_features,),
        )

    def make_views(self, job: Job, train: bool) -> ViewsFn:
        """``(image, sample, seed) -> (views as float32 (V, 3, S, S) pixels, extras)`` for one split."""
        raise NotImplementedError(f"{type(self).__name__} must make its views")

    # ---------------------------------------------------------------- the head

    def head_config(self, cfg: RunConfig, layout: FeatureLayout, labels: list[str], backbone: Backbone) -> Any:
        """The head's config (a dataclass with ``to_dict``, recorded in the run)."""
        raise NotImplementedError(f"{type(self).__name__} must configure its head")

    def fit(self, job: Job, head_cfg) -> nn.Module:
        """Train the head on ``job.train_features``/``job.val_features``; extend ``job.history`` and
        ``job.training_report``."""
        raise NotImplementedError(f"{type(self).__name__} must fit its head")

    def evaluate(self, job: Job, head: nn.Module) -> dict:
        """Metrics on the validation split; write the task's plots and reports into ``job.run_dir``."""
        raise NotImplementedError(f"{type(self).__name__} must evaluate its head")

    # ---------------------------------------------------------------- a finished run

    def build_model(
        self, record: RunRecord, spec: PreprocessSpec, features: nn.Module, head_state: dict, run_dir: Path
    ) -> nn.Module:
        """The whole trained model (pixels in [0, 255] → outputs) from a run's record and weights (and any other
        file of its own the task wrote into ``run_dir``)."""
        raise NotImplementedError(f"{type(self).__name__} must rebuild its model")

    def evaluate_model(self, model, data_dir: str, out: Path, other: str | None = None) -> dict:
        """`headstart evaluate MODEL DATA [--other FOLDER]`: metrics and plots of a model (a
        :class:`service.contract.Model`: a run's in PyTorch, or a bundle's on its runtime) on another labelled data
        set into ``out`` (``other``: images of things the model never learned, where the task can tell them apart);
        returns the summary the command prints."""
        raise NotImplementedError(f"headstart evaluate does not evaluate {self.name} runs yet")
