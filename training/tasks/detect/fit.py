"""Fitting the detection heads on cached features: the single-scale grid head and the multi-scale pyramid head.

Both run the engine's epoch loop (``training/loop.py``) with validation mAP@0.5 selecting the epoch; they differ in
their targets and loss (``grid_loss.py``, ``pyramid_loss.py``).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable

import numpy as np
import torch
from torch import nn

from headstart.loop import optimizer_step, train_head
from headstart.models.heads import GridHead, GridHeadConfig
from headstart.models.pyramid import PyramidHead, PyramidHeadConfig
from headstart.tasks.base import Job
from headstart.tasks.detect.grid_loss import anchor_shapes, build_targets, yolo_loss
from headstart.tasks.detect.metrics import (
    decode_head,
    ground_truth_in_pixels,
    mean_average_precision,
    predictions_in_pixels,
)
from headstart.tasks.detect.pyramid_loss import assign, pyramid_loss

log = logging.getLogger("headstart.detect")


def unpack_targets(meta: np.ndarray, views: int) -> tuple[tuple[int, int], list[np.ndarray]]:
    """The cached extras of one image: its (width, height) and per view its (M, 5) targets."""
    rows = meta[1:]
    return (int(meta[0, 1]), int(meta[0, 2])), [rows[rows[:, 0] == v][:, 1:] for v in range(views)]


def val_sizes(job: Job) -> list[tuple[int, int]]:
    return [unpack_targets(meta["targets"], 1)[0] for meta in job.val_features.extras]


def _train_targets(job: Job) -> list[np.ndarray]:
    return [t for meta in job.train_features.extras for t in unpack_targets(meta["targets"], job.views)[1]]


def _fit_epochs(
    job: Job, head: nn.Module, opt: torch.optim.Optimizer, num_samples: int, step: Callable, losses: tuple[str, ...]
) -> nn.Module:
    """The epoch loop for a detection head: cosine schedule, validation mAP every ``eval_every`` epochs selects
    the epoch (or the last one), early stopping."""
    cfg, spec = job.cfg, job.spec
    sizes = val_sizes(job)
    truth = ground_truth_in_pixels(job.val_features.samples, sizes)
    val_maps = job.val_features.values[:, 0]

    def evaluate() -> dict:
        boxes, scores = decode_head(head, val_maps, spec.input_size, device=job.device)
        metrics = mean_average_precision(predictions_in_pixels(boxes, scores, sizes, spec), truth, job.labels)
        return {"val_map50": metrics["map50"], "val_map50_95": metrics["map50_95"]}

    def row(epoch: int, sums: dict, val: dict | None) -> dict:
        out = {"epoch": epoch, **{k: sums.get(k, 0.0) / num_samples for k in ("train_loss", *losses)}}
        if val is not None:
            log.info(
                "epoch %d: loss %.3f val mAP@0.5 %.4f mAP@0.5:0.95 %.4f",
                epoch,
                out["train_loss"],
                val["val_map50"],
                val["val_map50_95"],
            )
        return {**out, **(val or {})}

    selection = dict(
        monitor="val_map50",
        mode="max",
        patience=cfg.patience if cfg.select == "best" else None,
        eval_every=cfg.eval_every,
        select=cfg.select,
    )
    train_head(job, head, opt, num_samples, step, evaluate, row, **selection)
    return head


def fit_grid(job: Job, head_cfg: GridHeadConfig) -> GridHead:
    cfg, device = job.cfg, job.device
    channels, *grid = job.train_features.values.shape[2:]
    maps = torch.from_numpy(job.train_features.values.reshape(-1, channels, *grid)).to(device)
    targets = _train_targets(job)
    anchors = anchor_shapes(targets, cfg.boxes_per_cell)
    *built, dropped = build_targets(targets, tuple(grid), anchors)
    obj, tbox, tcls = (t.to(device) for t in built)
    job.training_report.update(anchors=anchors.round(4).tolist(), boxes_dropped_cell_full=dropped)
    head = GridHead(head_cfg).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor, epoch: int) -> dict:
        idx = idx.to(device)
        loss, parts = yolo_loss(
            head(maps[idx].float()), obj[idx], tbox[idx], tcls[idx], cfg.lambda_coord, cfg.lambda_noobj
        )
        return {"train_loss": optimizer_step(opt, loss) * len(idx), **{k: v * len(idx) for k, v in parts.items()}}

    return _fit_epochs(job, head, opt, len(maps), step, ("coord", "objectness", "class"))


def fit_pyramid(job: Job, head_cfg: PyramidHeadConfig) -> PyramidHead:
    """The multi-scale head; with bf16 units the head trains under bf16 autocast (weights and optimizer stay
    fp32), as the feature extraction does."""
    cfg, device = job.cfg, job.device
    values = job.train_features.values
    flat = torch.from_numpy(values.reshape(-1, values.shape[-1])).to(device)
    assigned = [assign(t, head_cfg.input_size, head_cfg.strides) for t in _train_targets(job)]
    tcls = torch.from_numpy(np.stack([a[0] for a in assigned])).to(device)
    tbox = torch.from_numpy(np.stack([a[1] for a in assigned])).to(device)
    per_level = np.split((tcls >= 0).sum(0).cpu().numpy(), np.cumsum([h * w for h, w in head_cfg.sizes])[:-1])
    job.training_report["assigned_cells_per_level"] = {
        f"stride_{s}": int(p.sum()) for s, p in zip(head_cfg.strides, per_level, strict=True)
    }
    # channels-last: oneDNN trains these convolutions 1.4-2.4x faster so (benchmarks/pyramid_step.py); undone at the end
    head = PyramidHead(head_cfg).to(device, memory_format=torch.channels_last)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    # the cached float16 maps go straight to what the first convolutions take (bf16 under autocast): one copy
    dtype = torch.bfloat16 if job.bf16 else torch.float32

    def step(idx: torch.Tensor, epoch: int) -> dict:
        idx = idx.to(device)
        with torch.autocast(device.type, dtype=torch.bfloat16) if job.bf16 else contextlib.nullcontext():
            raw = head([m.to(dtype, memory_format=torch.channels_last) for m in head.split(flat[idx])])
        boxes, logits = head.decode(raw, logits=True)
        loss, parts = pyramid_loss(boxes, logits, tcls[idx], tbox[idx])
        return {"train_loss": optimizer_step(opt, loss) * len(idx), **{k: v * len(idx) for k, v in parts.items()}}

    return _fit_epochs(job, head, opt, len(flat), step, ("class", "box")).to(memory_format=torch.contiguous_format)
