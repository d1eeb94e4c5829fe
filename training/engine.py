"""The training engine: the job every task runs, written once.

``train(cfg)`` validates the options, prepares the run directory, scans the data, builds and freezes the backbone,
records the run (``config.yaml`` and the other run files), extracts and caches the frozen features of every
augmented view, lets the task fit its head (``training/loop.py``: seeded batches, early stopping, best state,
resume), lets it evaluate and plot, saves the weights and finishes the run (``DONE`` last).

A task (``training/tasks/NAME/``, a :class:`training.tasks.base.Task`) supplies only what differs: its data
scanning, input preprocessing and augmentation, views and their targets, the head and its loss, its metrics and
plots, and how to rebuild its model.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from headstart import runs, tracking
from headstart.augment import recipe, recipe_key
from headstart.config import RunConfig
from headstart.extractor import Extractor, OpenVINORefused, resolve_device, use_bf16
from headstart.features import DecodedImages, FeatureCache, cache_namespace, cache_root, extract_features
from headstart.models import Backbone, PixelNormalize, build_backbone
from headstart.models.backbone import backbone_preprocess
from headstart.service.contract import BackboneRecord, RunRecord
from headstart.service.preprocess import DECODE_MARGIN, REDUCED_MARGIN
from headstart.tasks.base import FeatureLayout, Features, Job, Task

log = logging.getLogger("headstart")


def backbone_record(
    backbone: Backbone, pretrained: bool, weights: str | None, feature_map: list[int]
) -> BackboneRecord:
    return BackboneRecord(
        name=backbone.name,
        pretrained=pretrained,
        weights_path=str(Path(weights).resolve()) if weights else None,
        weights=backbone.weights,
        weights_sha256=backbone.weights_sha256,
        num_features=backbone.num_features,
        feature_map=tuple(feature_map),
        stages=tuple(n for n, _ in backbone.stages),
    )


def train(task: Task, cfg: RunConfig, report=None) -> Path:
    """Run the whole training job of ``task``; returns the run directory. ``report`` overrides the data scan."""
    cfg.validate()
    started = time.perf_counter()
    run_dir = Path(cfg.out)
    runs.prepare_run_dir(run_dir, cfg.result_options(), resume=cfg.resume, overwrite=cfg.overwrite)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    decoded = _check_decoding(task, cfg)
    report = task.scan(cfg, report, decoded=decoded)
    log.info("%s", report.format())
    log.debug("data check and split: %.1fs since the start", time.perf_counter() - started)

    t_backbone = time.perf_counter()
    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    log.debug("backbone %s built in %.1fs", backbone.name, time.perf_counter() - t_backbone)
    backbone.freeze(0)
    spec = task.input_spec(cfg, backbone.preprocess)
    net = nn.Sequential(PixelNormalize(spec.mean, spec.std), task.feature_net(cfg, backbone)).eval()
    pipeline = task.augmentation(cfg.augment, spec)
    views = 1 if pipeline is None else cfg.views
    job = Job(
        cfg, run_dir, report, backbone, spec, net, pipeline, views, device, use_bf16(cfg.precision, device), started
    )
    job.decoded = _kept_for(decoded, spec, report)
    layout = task.layout(cfg, backbone, net, spec)
    head_cfg = task.head_config(cfg, layout, report.labels, backbone)
    aug = {**recipe(task.name, cfg.augment, pipeline, spec), **task.view_recipe(cfg, report)}
    _write_run_files(task, job, layout, head_cfg, aug)

    with tracking.tracking(tracking.parse(cfg.log), run_dir, cfg.options(), task.name):
        t_features = time.perf_counter()
        _extract(task, job, layout, recipe_key(aug))
        job.decoded = None  # what no pass took (features in the cache) is let go
        t_head = time.perf_counter()
        log.debug(
            "features of %d training images x %d views and %d validation images in %.1fs (%s)",
            len(report.splits["train"]),
            views,
            len(report.splits["val"]),
            t_head - t_features,
            job.training_report.get("extractor", "torch"),
        )
        head = task.fit(job, head_cfg)
        head.eval()
        seconds = {"features": t_head - t_features, "head": time.perf_counter() - t_head}
        summary = job.training_report.get("head") or {}
        log.debug("head in %.1fs: %s", seconds["head"], ", ".join(f"{k} {_brief(v)}" for k, v in summary.items()))
        t_evaluate = time.perf_counter()
        evaluation = task.evaluate(job, head)
        log.debug("evaluation, plots and audit in %.1fs", time.perf_counter() - t_evaluate)
        _finish(task, job, head, evaluation, seconds)
    return run_dir


def _brief(value) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _check_decoding(task: Task, cfg: RunConfig) -> DecodedImages | None:
    """Where the data check keeps the images it decodes for the feature extraction (a first run then decodes each
    image once, not twice): decoded at the model's scale as the backbone's preprocessing will ask, read before the
    backbone is built (the data check runs first, so that a bad data set fails before any download). None where
    that preprocessing cannot be read so: the check then decodes at its cheapest."""
    preprocess = backbone_preprocess(cfg.backbone, cfg.weights)
    return None if preprocess is None else DecodedImages(task.input_spec(cfg, preprocess))


def _kept_for(decoded: DecodedImages | None, spec, report) -> DecodedImages | None:
    """The images the data check kept, where they are those ``spec`` decodes (else none: each is decoded again),
    but for the files no pass reads."""
    if decoded is None:
        return None
    if not decoded.serves(spec):
        log.debug("the data check decoded for another preprocessing than the backbone's: decoding again")
        return None
    decoded.only(s.path for split in ("train", "val") for s in report.splits.get(split, ()))
    return decoded


def _finish(task: Task, job: Job, head: nn.Module, evaluation: dict, seconds: dict) -> None:
    """The weights, the history and the metrics (with what the task reported of its training), ``DONE`` last."""
    cfg, run_dir, report = job.cfg, job.run_dir, job.report
    runs.save_safetensors(run_dir / runs.HEAD, head.state_dict(), metadata={"labels": json.dumps(job.labels)})
    if not cfg.pretrained and not cfg.weights:  # random weights cannot be rebuilt later: keep them with the run
        runs.save_safetensors(run_dir / runs.BACKBONE_TAIL, job.backbone.features.state_dict())
    runs.write_json(run_dir / runs.HISTORY, job.history)
    seconds = {**seconds, "total": time.perf_counter() - job.started}
    training = {
        **job.training_report,
        "views": job.views,
        "train_images": len(report.splits["train"]),
        "val_images": len(report.splits["val"]),
        "device": job.device.type,
        "feature_cache_recomputed_corrupt": job.cache.recomputed_corrupt,
        "seconds": {k: round(v, 2) for k, v in seconds.items()},
    }
    runs.finish_run(run_dir, {"split": "val", "task": task.name, **evaluation, "training": training})
    tracking.log_finish(run_dir, {**evaluation, "training": training})
    job.checkpoint.unlink(missing_ok=True)
    summary = ", ".join(f"{k} {evaluation[k]:.4f}" for k in cfg.headline if k in evaluation)
    log.info("done in %.1fs: val %s (%d images) -> %s", seconds["total"], summary, len(report.splits["val"]), run_dir)


def _write_run_files(task: Task, job: Job, layout: FeatureLayout, head_cfg, aug: dict) -> None:
    cfg, report, run_dir = job.cfg, job.report, job.run_dir
    record = RunRecord(
        task=task.name,
        options=cfg.options(),
        backbone=backbone_record(job.backbone, cfg.pretrained, cfg.weights, layout.feature_map),
        head=head_cfg.to_dict(),
        data=task.data_record(cfg, report),
        features={"views": job.views, "train_precision": "bf16" if job.bf16 else "fp32", "val_precision": "fp32"},
        versions={"torch": str(torch.__version__)},
    )
    runs.write_record(run_dir, record)
    runs.write_json(run_dir / runs.LABELS, report.labels)
    runs.write_json(run_dir / runs.PREPROCESS, job.spec.to_dict())
    runs.write_json(run_dir / runs.AUGMENTATION, json.loads(json.dumps(aug, default=str)))
    runs.write_json(run_dir / runs.DATA_REPORT, report.to_dict())
    runs.write_json(
        run_dir / runs.SPLITS,
        {split: [[str(s.path.resolve()), *task.split_row(s)] for s in items] for split, items in report.splits.items()},
    )


def feature_bytes(layout: FeatureLayout, train_images: int, views: int, val_images: int) -> int:
    """What the cached features of a run take in memory (and in the cache on disk)."""
    return (train_images * views + val_images) * int(np.prod(layout.shape)) * np.dtype(layout.dtype).itemsize


def fitting_views(layout: FeatureLayout, train_images: int, val_images: int, max_gb: float) -> int:
    """The most views per training image whose features stay within ``max_gb`` GiB (0 when not even one does)."""
    per_map = feature_bytes(layout, 1, 1, 0)
    return max(0, int((max_gb * 2**30 // per_map - val_images) // max(train_images, 1)))


def _extract(task: Task, job: Job, layout: FeatureLayout, aug_key: str) -> None:
    """Features of every training view (augmented, bf16 where it pays) and of the clean validation images (fp32);
    and of the clean training images where the task asks (:attr:`Task.clean_train`)."""
    cfg, b = job.cfg, job.backbone
    n_train, n_val = len(job.report.splits["train"]), len(job.report.splits["val"])
    n_clean = n_val + (n_train if task.clean_train else 0)  # images with one clean view each
    need = feature_bytes(layout, n_train, job.views, n_clean)
    if need > cfg.max_feature_gb * 2**30:
        fits = fitting_views(layout, n_train, n_clean, cfg.max_feature_gb)
        lower = (
            f"Lower --views ({job.views}; at most {fits} fit) or --input-size"
            if fits
            else "Not even 1 view per image fits: lower --input-size"
        )
        raise ValueError(
            f"The features of this run would take {need / 2**30:.1f} GiB in memory (and as much in the "
            f"feature cache), over --max-feature-gb {cfg.max_feature_gb}. {lower}, or raise "
            "--max-feature-gb if the machine has the memory."
        )
    job.training_report["feature_gib"] = round(need / 2**30, 6)
    job.cache = FeatureCache(cache_root(cfg))
    log.info(
        "features: %.2f GiB in memory (%s), %s",
        need / 2**30,
        np.dtype(layout.dtype).name,
        "as much in the cache" if job.cache.root is not None else "not cached",
    )
    # the decoding is part of what features depend on: a JPEG is decoded at a scale set by the spec (DECODE_MARGIN),
    # a large image of another format reduced after decoding to REDUCED_MARGIN times as much
    decoding = f"dct-scaled x{DECODE_MARGIN}, others reduced x{DECODE_MARGIN * REDUCED_MARGIN}"
    ns = dict(task=task.name, backbone=b.name, weights=b.weights_sha256, spec=job.spec.to_dict(), decoding=decoding)
    if task.feature_key(cfg):  # what the task's feature net computes, where its options change it (every split)
        ns["features"] = task.feature_key(cfg)
    common = dict(
        spec=job.spec,
        shape=layout.shape,
        dtype=layout.dtype,
        extras=layout.extras,
        cache=job.cache,
        seed=cfg.seed,
        batch_size=cfg.extract_batch_size,
        progress=cfg.progress,
    )
    passes = [("train", "train", True), ("val", "val", False)]
    if task.clean_train:  # the training images once more, as the validation images are: clean, fp32; each decoded
        passes.insert(1, ("train_clean", "train", False))  # once for both passes (DecodedImages)
    extractor = Extractor(
        job.net,
        input_size=job.spec.input_size,
        pool=layout.pool,
        device=job.device,
        extractor=cfg.extractor,
        lazy=True,  # compiled at the first feature the cache lacks
    )
    try:
        _extract_passes(task, job, passes, extractor, ns, aug_key, common)
    except OpenVINORefused as refused:  # at the first feature missing: start again, torch's features under its name
        extractor.use_torch(refused)
        _extract_passes(task, job, passes, extractor, ns, aug_key, common)
    job.training_report["extractor"] = extractor.runtime


def _extract_passes(
    task: Task, job: Job, passes: list, extractor: Extractor, ns: dict, aug_key: str, common: dict
) -> None:
    decoded = job.decoded if job.decoded is not None else DecodedImages(job.spec)  # the data check's: a first run
    if extractor.runtime != "torch":  # OpenVINO's features differ from torch's in their last bits (bf16: more)
        ns = {**ns, "runtime": extractor.runtime}
    for name, split, train in passes:
        bf16 = job.bf16 and train
        samples = job.report.splits[split]
        values, extras = extract_features(
            extractor.fn(bf16),
            samples,
            task.make_views(job, train),
            views=job.views if train else 1,
            desc=f"{name.replace('_', ' ')} features",
            decoded=decoded,
            keep_decoded=train and task.clean_train,
            namespace=cache_namespace(**ns, recipe=aug_key if train else "eval", bf16=bf16),
            **common,
        )
        setattr(job, f"{name}_features", Features(samples, values, extras))
