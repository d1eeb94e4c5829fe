"""Training the multi-label head on cached pooled features: one sigmoid per label, the epoch kept by validation mAP.

Losses (``--loss``): ``weighted``, binary cross-entropy with each label's positives weighted by its negatives over
positives in the training images (at most :data:`MAX_POS_WEIGHT`: a rare label still counts); ``bce``, unweighted;
``asl``, the asymmetric loss of Ridnik et al. (2021), which down-weights easy negatives (gamma- 4) and ignores
negatives scored below a margin (0.05): the usual answer when most labels are absent from most images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headstart.loop import optimizer_step, train_head
from headstart.models import ClassifierHead, HeadConfig, lse_pool
from headstart.tasks.base import Job
from headstart.tasks.multilabel.data import multi_hot
from headstart.tasks.multilabel.metrics import mean_average_precision

MAX_POS_WEIGHT = 20.0


def asymmetric_loss(
    logits: torch.Tensor, y: torch.Tensor, gamma_neg: float = 4.0, gamma_pos: float = 0.0, clip: float = 0.05
) -> torch.Tensor:
    """Asymmetric loss (Ridnik et al., ICCV 2021), summed over labels, averaged over images."""
    p = torch.sigmoid(logits)
    p_neg = (p - clip).clamp(min=0)  # probability shifting: easy negatives below the margin cost nothing
    pos = y * torch.log(p.clamp(min=1e-8)) * (1 - p) ** gamma_pos
    neg = (1 - y) * torch.log((1 - p_neg).clamp(min=1e-8)) * p_neg**gamma_neg
    return -(pos + neg).sum(1).mean()


def loss_function(kind: str, train_y: np.ndarray, device: torch.device) -> tuple[callable, dict]:
    """The loss and what the run reports of it (per-label positive weights for ``weighted``)."""
    positives = train_y.sum(0)
    info = {"loss": kind, "train_positives": positives.astype(int).tolist()}
    if kind == "asl":
        return asymmetric_loss, info
    if kind == "bce":
        bce = nn.BCEWithLogitsLoss(reduction="none")
        return (lambda logits, y: bce(logits, y).sum(1).mean()), info
    weight = np.clip((len(train_y) - positives) / np.maximum(positives, 1), 1.0, MAX_POS_WEIGHT)
    info["pos_weight"] = [round(float(w), 3) for w in weight]
    bce = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(weight, dtype=torch.float32, device=device), reduction="none")
    return (lambda logits, y: bce(logits, y).sum(1).mean()), info


def image_logits(head: ClassifierHead, x: torch.Tensor, pooling: str) -> torch.Tensor:
    """The head's logits per image: from pooled vectors (N, C), or with ``lse`` from maps (N, C, H, W), every cell
    scored and the scores log-sum-exp pooled."""
    return lse_pool(head.forward_map(x)) if pooling == "lse" else head(x)


def fit_head(job: Job, head_cfg: HeadConfig) -> ClassifierHead:
    """The head on the cached views, the epoch with the best validation mAP (macro) kept."""
    cfg, device, train, val = job.cfg, job.device, job.train_features, job.val_features
    k = len(job.labels)
    train_y = multi_hot([s.labels for s in train.samples], k)
    val_y = multi_hot([s.labels for s in val.samples], k)
    loss_fn, job.training_report["loss"] = loss_function(cfg.loss, train_y, device)
    head = ClassifierHead(head_cfg).to(device)
    pooling = cfg.pooling
    x = torch.from_numpy(train.values.reshape(-1, *train.values.shape[2:]).astype(np.float32)).to(device)
    y = torch.from_numpy(np.repeat(train_y, job.views, axis=0)).to(device)
    val_x = torch.from_numpy(val.values[:, 0].astype(np.float32)).to(device)
    val_t = torch.from_numpy(val_y).to(device)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor, epoch: int) -> dict | None:
        if len(idx) < 2 and cfg.hidden:  # BatchNorm1d needs 2 samples
            return None
        idx = idx.to(device)
        loss = optimizer_step(opt, loss_fn(image_logits(head, x[idx], pooling), y[idx]))
        return {"loss": loss * len(idx), "seen": len(idx)}

    @torch.no_grad()
    def evaluate() -> dict:
        logits = image_logits(head, val_x, pooling)
        probs = torch.sigmoid(logits).cpu().numpy()
        maps = mean_average_precision(probs, val_y)
        return {
            "val_loss": float(loss_fn(logits, val_t)),
            "val_map": maps["map_macro"] or 0.0,
            "val_map_micro": maps["map_micro"] or 0.0,
        }

    def row(epoch: int, sums: dict, val_row: dict | None) -> dict:
        return {
            "epoch": epoch,
            "phase": "head",
            "train_loss": sums.get("loss", 0.0) / max(sums.get("seen", 0), 1),
            **(val_row or {}),
        }

    selection = dict(monitor="val_map", mode="max", min_delta=1e-4, patience=cfg.patience)
    train_head(job, head, opt, len(y), step, evaluate, row, **selection)
    return head
