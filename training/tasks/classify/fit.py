"""Training the classifier's head on cached features, and optionally fine-tuning the last backbone stages with it.

Both run the engine's epoch loop (``training/loop.py``) with the validation loss selecting the epoch.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from headstart import runs
from headstart.loop import Phase, Schedule, fit, optimizer_step, train_head
from headstart.models import Classifier, ClassifierHead, HeadConfig, PixelNormalize
from headstart.predict import predict_paths
from headstart.service.preprocess import decode_for
from headstart.tasks.base import Job
from headstart.tasks.classify.augment import augmented_views, build_augmentation

log = logging.getLogger("headstart")


def class_weights(train_labels: np.ndarray, num_classes: int, mode: str) -> tuple[torch.Tensor | None, dict]:
    """Inverse-frequency weights when asked for (``on``), or (``auto``) when the largest class is 1.5x the smallest."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    imbalance = float(counts.max() / max(counts.min(), 1))
    use = mode == "on" or (mode == "auto" and imbalance > 1.5)
    info = {"counts": counts.astype(int).tolist(), "imbalance_ratio": round(imbalance, 3), "weighted_loss": use}
    if not use:
        return None, info
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    info["weights"] = [round(float(w), 4) for w in weights]
    log.info("classes are unbalanced (ratio %.2f): using class-weighted loss %s", imbalance, info["weights"])
    return torch.tensor(weights, dtype=torch.float32), info


def fit_head(job: Job, head_cfg: HeadConfig) -> ClassifierHead:
    """Cross-entropy (class-weighted where asked, label smoothing) on the cached views; the best epoch by validation
    loss; then fine-tuning with ``--unfreeze``."""
    cfg, device, train, val = job.cfg, job.device, job.train_features, job.val_features
    train_y = np.array([s.label for s in train.samples])
    weights, job.training_report["class_weights"] = class_weights(train_y, len(job.labels), cfg.class_weights)
    weights = None if weights is None else weights.to(device)
    head = ClassifierHead(head_cfg).to(device)
    x = torch.from_numpy(train.values.reshape(-1, head_cfg.in_features)).to(device)
    y = torch.from_numpy(np.repeat(train_y, job.views)).to(device)
    val_x = torch.from_numpy(val.values[:, 0]).to(device)
    val_y = torch.tensor([s.label for s in val.samples]).to(device)
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor, epoch: int) -> dict | None:
        if len(idx) < 2 and cfg.hidden:  # BatchNorm1d needs 2 samples
            return None
        idx = idx.to(device)
        logits = head(x[idx])
        loss = optimizer_step(opt, loss_fn(logits, y[idx]))
        return {"loss": loss * len(idx), "correct": int((logits.argmax(1) == y[idx]).sum()), "seen": len(idx)}

    @torch.no_grad()
    def evaluate() -> dict:
        logits = head(val_x)
        return {
            "val_loss": float(nn.functional.cross_entropy(logits, val_y)),
            "val_accuracy": float((logits.argmax(1) == val_y).float().mean()),
        }

    def row(epoch: int, sums: dict, val: dict | None) -> dict:
        seen = max(sums.get("seen", 0), 1)
        return {
            "epoch": epoch,
            "phase": "head",
            "train_loss": sums.get("loss", 0.0) / seen,
            "train_accuracy": sums.get("correct", 0) / seen,
            **(val or {}),
        }

    train_head(job, head, opt, len(y), step, evaluate, row, monitor="val_loss", min_delta=1e-4, patience=cfg.patience)
    job.training_report["finetune"] = finetune(job, head, weights) if cfg.unfreeze else None
    return head


def finetune(job: Job, head: ClassifierHead, weights: torch.Tensor | None) -> dict:
    """Fine-tune the last ``--unfreeze`` backbone stages with the head, augmenting on the fly."""
    cfg, spec, device = job.cfg, job.spec, job.device
    unfrozen = job.backbone.freeze(cfg.unfreeze)
    model = Classifier(PixelNormalize(spec.mean, spec.std), job.backbone.features, head).to(device)
    tail = [p for p in job.backbone.features.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": tail, "lr": cfg.finetune_lr}, {"params": head.parameters(), "lr": cfg.finetune_lr * 10}],
        weight_decay=cfg.weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    train, val = job.train_features.samples, job.val_features.samples
    pipeline = job.pipeline or build_augmentation("light", spec)
    targets = torch.tensor([s.label for s in train]).to(device)
    val_targets = np.array([s.label for s in val])

    def step(idx: torch.Tensor, epoch: int) -> dict:
        idx = idx.tolist()
        pixels = np.concatenate(
            [
                augmented_views(
                    decode_for(train[i].path, spec), pipeline, spec, 1, cfg.seed * 100003 + epoch * 7919 + i
                )
                for i in idx
            ]
        )
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16):
            logits = model.logits(torch.from_numpy(pixels).to(device))
        loss = optimizer_step(opt, loss_fn(logits.float(), targets[idx]))
        return {"loss": loss * len(idx), "seen": len(idx)}

    def evaluate() -> dict:
        probs = predict_paths(model, [s.path for s in val], spec)
        return {
            "val_loss": float(-np.log(np.clip(probs[np.arange(len(val)), val_targets], 1e-12, 1)).mean()),
            "val_accuracy": float((probs.argmax(1) == val_targets).mean()),
        }

    offset = len(job.history)

    def row(epoch: int, sums: dict, val: dict | None) -> dict:
        return {
            "epoch": offset + epoch,
            "phase": "finetune",
            "train_loss": sums.get("loss", 0.0) / max(sums.get("seen", 0), 1),
            **(val or {}),
        }

    phase = Phase(
        model,
        opt,
        len(train),
        step,
        evaluate,
        row,
        keep=lambda: {k: v for k, v in model.state_dict().items() if k in trainable},
        restore=lambda state: model.load_state_dict(state, strict=False),
    )
    schedule = Schedule(
        "finetune", cfg.finetune_epochs, min(32, cfg.batch_size), cfg.seed + 1, monitor="val_loss", mode="min"
    )
    result = fit(phase, schedule, job.checkpoint, cfg.progress)
    model.load_state_dict(result.best, strict=False)
    model.eval()
    job.history += result.history
    runs.save_safetensors(job.run_dir / runs.BACKBONE_TAIL, job.backbone.stage_state_dict(unfrozen))
    return {"unfrozen_stages": unfrozen, **result.summary}
