"""The training engine: the job every task runs, written once.

``train(cfg)`` validates the options, prepares the run directory, scans the data, builds and freezes the backbone,
records the run (``config.yaml`` and the other run files), extracts and caches the frozen features of every
augmented view, lets the task fit its head (``training/loop.py``: seeded batches, early stopping, best state,
resume), lets it evaluate and plot, saves the weights and finishes the run (``DONE`` last).

A task (``training/tasks/``) supplies only what differs: its config, data scanning, input preprocessing and
augmentation, views and their targets, the head and its loss, its metrics and plots, and how to rebuild its model.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from torch import nn

from models import Backbone, PixelNormalize, build_backbone
from service.contract import BackboneRecord, RunRecord
from service.preprocess import PreprocessSpec
from training import runs
from training.augment import recipe, recipe_key
from training.config import RunConfig
from training.features import (
    FeatureCache,
    ViewsFn,
    cache_namespace,
    default_cache_dir,
    extract_features,
    features_fn,
    resolve_device,
    use_bf16,
)

log = logging.getLogger("headstart")


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
    feature_map: list[int]
    dtype: Any = np.float32
    extras: tuple[str, ...] = ()
    channels: tuple[int, ...] = ()  # the channels of each feature map the head reads


@dataclass
class Job:
    """Everything a task needs while it trains, in one place."""

    cfg: Any
    run_dir: Path
    report: Any
    backbone: Backbone
    spec: PreprocessSpec
    net: nn.Module  # normalisation + frozen backbone features
    pipeline: Any
    views: int
    device: torch.device
    bf16: bool
    started: float
    train: Features | None = None
    val: Features | None = None
    cache: FeatureCache | None = None
    history: list[dict] = field(default_factory=list)
    training: dict = field(default_factory=dict)  # what the task reports under metrics.json's "training"

    @property
    def labels(self) -> list[str]:
        return self.report.labels

    @property
    def checkpoint(self) -> Path:
        return self.run_dir / runs.CHECKPOINT


class Task(Protocol):
    """What a task supplies to the engine (see ``training/tasks/classify.py`` for the smallest complete one)."""

    name: str
    config: type[RunConfig]
    headline: tuple[str, ...]  # the metrics the end-of-run log line shows

    def scan(self, cfg, report=None) -> Any:
        """The checked data set (``report``, when given, is a scan already made; the task may restrict it):
        ``labels``, ``splits`` (``train`` and ``val``: samples with ``path``, ``sha256`` and ``identity``),
        ``split_source``, ``format()`` and ``to_dict()``."""

    def data_record(self, cfg, report) -> dict: ...

    def split_row(self, sample) -> list: ...

    def input_spec(self, cfg, backbone: Backbone) -> PreprocessSpec: ...

    def augmentation(self, preset: str, spec: PreprocessSpec) -> Any: ...

    def layout(self, backbone: Backbone, net: nn.Module, spec: PreprocessSpec) -> FeatureLayout: ...

    def make_views(self, job: Job, train: bool) -> ViewsFn: ...

    def feature_net(self, cfg, backbone: Backbone) -> nn.Module:
        """What the cached features are: the frozen backbone module (after pixel normalisation)."""

    def view_recipe(self, cfg, report) -> dict:
        """What the training views depend on besides the image and the augmentation pipeline ({} for nothing)."""

    def head_config(self, cfg, layout: FeatureLayout, labels: list[str]) -> Any: ...

    def fit(self, job: Job, head_cfg) -> nn.Module:
        """Train the head on ``job.train``/``job.val``; extend ``job.history`` and ``job.training``."""

    def evaluate(self, job: Job, head: nn.Module) -> dict:
        """Metrics on the validation split; write the task's plots and reports into ``job.run_dir``."""

    def build_model(self, record: RunRecord, spec: PreprocessSpec, features: nn.Module, head_state: dict) -> nn.Module:
        """The whole trained model (pixels in [0, 255] → outputs) from a run's record and weights."""

    # export (training/export.py, training/runtime_checks.py)
    manifest_metrics: tuple[str, ...]  # the metrics.json keys the manifest carries
    int8: bool  # whether `headstart export --int8` is offered

    def outputs(self, num_classes: int, fmap: list[int], head: dict) -> list[dict]:
        """The exported graph's outputs (name, shape, what), first the image-level class probabilities."""

    def verify(self, model: nn.Module, session, paths, targets, spec) -> tuple[dict, Any]:
        """ONNX Runtime against PyTorch on validation images; raises ExportError when they disagree."""

    def int8_quality(self, run, reference, session, paths, targets) -> dict:
        """The int8 file (an ONNX Runtime ``session``) against the fp32 one (``reference``, from ``verify``) on the
        validation images: ``metric``, ``<metric>_fp32``, ``<metric>_int8`` and ``drop``."""

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets) -> dict:
        """How a runtime/precision compares with the reference, and whether it may be served ("allowed")."""


def backbone_record(backbone: Backbone, pretrained: bool, weights: str | None, feature_map: list[int]) -> BackboneRecord:
    return BackboneRecord(name=backbone.name, pretrained=pretrained,
                          weights_path=str(Path(weights).resolve()) if weights else None, weights=backbone.weights,
                          weights_sha256=backbone.weights_sha256, num_features=backbone.num_features,
                          feature_map=tuple(feature_map), stages=tuple(n for n, _ in backbone.stages))  # fmt: skip


def train(task: Task, cfg: RunConfig, report=None) -> Path:
    """Run the whole training job of ``task``; returns the run directory. ``report`` overrides the data scan."""
    cfg.validate()
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    runs.prepare_run_dir(run_dir, cfg.result_options(), resume=cfg.resume, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    report = task.scan(cfg, report)
    log.info("%s", report.format())

    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    backbone.freeze(0)
    spec = task.input_spec(cfg, backbone)
    net = nn.Sequential(PixelNormalize(spec.mean, spec.std), task.feature_net(cfg, backbone)).eval()
    pipeline = task.augmentation(cfg.augment, spec)
    job = Job(cfg, run_dir, report, backbone, spec, net, pipeline, 1 if pipeline is None else cfg.views, device,
              use_bf16(cfg.precision, device), started)  # fmt: skip
    layout = task.layout(backbone, net, spec)
    head_cfg = task.head_config(cfg, layout, report.labels)
    aug = {**recipe(task.name, cfg.augment, pipeline, spec), **task.view_recipe(cfg, report)}
    _write_run_files(task, job, layout, head_cfg, aug)

    t_features = time.perf_counter()
    _extract(task, job, layout, recipe_key(aug))
    feature_seconds = time.perf_counter() - t_features

    t_head = time.perf_counter()
    head = task.fit(job, head_cfg)
    head.eval()
    head_seconds = time.perf_counter() - t_head

    evaluation = task.evaluate(job, head)
    runs.save_safetensors(run_dir / runs.HEAD, head.state_dict(), metadata={"labels": json.dumps(job.labels)})
    if not cfg.pretrained and not cfg.weights:  # random weights cannot be rebuilt later: keep them with the run
        runs.save_safetensors(run_dir / runs.BACKBONE_TAIL, backbone.features.state_dict())
    runs.write_json(run_dir / runs.HISTORY, job.history)
    seconds = {"features": round(feature_seconds, 2), "head": round(head_seconds, 2),
               "total": round(time.perf_counter() - started, 2)}  # fmt: skip
    metrics = {"split": "val", "task": task.name, **evaluation, "training": {
        **job.training, "views": job.views, "train_images": len(report.splits["train"]),
        "val_images": len(report.splits["val"]), "device": device.type,
        "feature_cache_recomputed_corrupt": job.cache.recomputed_corrupt, "seconds": seconds,
    }}  # fmt: skip
    runs.finish_run(run_dir, metrics)
    job.checkpoint.unlink(missing_ok=True)
    summary = ", ".join(f"{k} {evaluation[k]:.4f}" for k in task.headline if k in evaluation)
    log.info("done in %.1fs: val %s (%d images) -> %s", time.perf_counter() - started, summary,
             len(report.splits["val"]), run_dir)  # fmt: skip
    return run_dir


def _write_run_files(task: Task, job: Job, layout: FeatureLayout, head_cfg, aug: dict) -> None:
    cfg, report, run_dir = job.cfg, job.report, job.run_dir
    record = RunRecord(
        task=task.name, options=cfg.options(),
        backbone=backbone_record(job.backbone, cfg.pretrained, cfg.weights, layout.feature_map),
        head=head_cfg.to_dict(), data=task.data_record(cfg, report),
        features={"views": job.views, "train_precision": "bf16" if job.bf16 else "fp32", "val_precision": "fp32"},
        versions={"torch": str(torch.__version__)},
    )  # fmt: skip
    runs.write_record(run_dir, record)
    runs.write_json(run_dir / runs.LABELS, report.labels)
    runs.write_json(run_dir / runs.PREPROCESS, job.spec.to_dict())
    runs.write_json(run_dir / runs.AUGMENTATION, json.loads(json.dumps(aug, default=str)))
    runs.write_json(run_dir / runs.DATA_REPORT, report.to_dict())
    runs.write_json(run_dir / runs.SPLITS, {
        split: [[str(s.path.resolve()), *task.split_row(s)] for s in items] for split, items in report.splits.items()
    })  # fmt: skip


def feature_bytes(layout: FeatureLayout, train_images: int, views: int, val_images: int) -> int:
    """What the cached features of a run take in memory (and in the cache on disk)."""
    return (train_images * views + val_images) * int(np.prod(layout.shape)) * np.dtype(layout.dtype).itemsize


def fitting_views(layout: FeatureLayout, train_images: int, val_images: int, max_gb: float) -> int:
    """The most views per training image whose features stay within ``max_gb`` GiB (0 when not even one does)."""
    per_map = feature_bytes(layout, 1, 1, 0)
    return max(0, int((max_gb * 2**30 // per_map - val_images) // max(train_images, 1)))


def _extract(task: Task, job: Job, layout: FeatureLayout, aug_key: str) -> None:
    """Features of every training view (augmented, bf16 where it pays) and of the clean validation images (fp32)."""
    cfg, b = job.cfg, job.backbone
    n_train, n_val = len(job.report.splits["train"]), len(job.report.splits["val"])
    need = feature_bytes(layout, n_train, job.views, n_val)
    if need > cfg.max_feature_gb * 2**30:
        fits = fitting_views(layout, n_train, n_val, cfg.max_feature_gb)
        lower = (f"Lower --views ({job.views}; at most {fits} fit) or --input-size" if fits else
                 "Not even 1 view per image fits: lower --input-size")  # fmt: skip
        raise ValueError(f"The features of this run would take {need / 2**30:.1f} GiB in memory (and as much in the "
                         f"feature cache), over --max-feature-gb {cfg.max_feature_gb}. {lower}, or raise "
                         "--max-feature-gb if the machine has the memory.")  # fmt: skip
    job.training["feature_gib"] = round(need / 2**30, 6)
    log.info("features: %.2f GiB in memory (%s), as much in the cache", need / 2**30, np.dtype(layout.dtype).name)
    job.cache = FeatureCache(None if cfg.no_cache else (cfg.cache_dir or default_cache_dir()))
    ns = dict(task=task.name, backbone=b.name, weights=b.weights_sha256, spec=job.spec.to_dict())
    common = dict(shape=layout.shape, dtype=layout.dtype, extras=layout.extras, cache=job.cache, seed=cfg.seed,
                  batch_size=cfg.extract_batch_size, progress=cfg.progress)  # fmt: skip
    for split, train in (("train", True), ("val", False)):
        bf16 = job.bf16 and train
        samples = job.report.splits[split]
        values, extras = extract_features(
            features_fn(job.net, bf16, pool=layout.pool, device=job.device), samples, task.make_views(job, train),
            views=job.views if train else 1, desc=f"{split} features",
            namespace=cache_namespace(**ns, recipe=aug_key if train else "eval", bf16=bf16), **common,
        )  # fmt: skip
        setattr(job, split, Features(samples, values, extras))
