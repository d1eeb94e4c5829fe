"""A classifier's "none of these": a bank of training features, and a threshold calibrated on validation images.

Once the head is trained, the clean (unaugmented, fp32) pooled features of the training images become the bank of
the model's :class:`models.novelty.Novelty` score (at most ``--bank-size`` of them, subsampled per class in
proportion beyond), and the threshold is set so that ``--kept-rate`` of the validation images score at or below it:
images the bank does not hold and the head was not fitted on, each labelled with the model's classes. An image
scoring above it is unlike everything the model learned. Bank and record go to ``open_set.safetensors`` in the run
directory; the model rebuilt from the run (and so the exported graph) computes the score. Used by the tasks whose
answers are classes: classify (one class per image) and multilabel (any number).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import torch

from headstart import runs
from headstart.models import Novelty, NoveltyConfig, feature_bank

log = logging.getLogger("headstart")

#: the run file holding the bank (float16, normalised rows) and the :class:`NoveltyConfig` as metadata
OPEN_SET = "open_set.safetensors"
#: fewer validation images than this make the threshold a rough estimate: the run says so
FEW_CALIBRATION_IMAGES = 20
#: the most a runtime or precision may move an image's novelty for it to be served (bf16 on OpenVINO moved it
#: 0.005 on hymenoptera)
NOVELTY_TOLERANCE = 0.02


def choose_bank(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Indices of at most ``size`` training images, every class (``labels``: one group per image) in proportion to its
    count (at least one each), drawn with ``seed``; all of them when they fit."""
    if len(labels) <= size:
        return np.arange(len(labels))
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    quota = np.maximum(1, np.floor(size * counts / counts.sum()).astype(int))
    chosen = [
        rng.choice(np.flatnonzero(labels == c), min(q, n), replace=False)
        for c, q, n in zip(classes, quota, counts, strict=True)
    ]
    return np.sort(np.concatenate(chosen))


@torch.inference_mode()
def novelty_of(novelty: Novelty, features: np.ndarray, batch: int = 1024) -> np.ndarray:
    """The score of pooled features (N, C), computed by the model's own module."""
    novelty.eval()
    parts = [novelty(torch.from_numpy(features[i : i + batch])).numpy() for i in range(0, len(features), batch)]
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)


def calibrate(scores: np.ndarray, targets: np.ndarray, labels: list[str], kept_rate: float) -> tuple[float, dict]:
    """The threshold that keeps ``kept_rate`` of the validation ``scores`` (the ones at or below it), and what it
    keeps per class (``targets``: each image's class index, or a multi-hot matrix (N, K) of the labels it holds). It
    lies halfway between the last image kept and the next one, so no validation image sits on it and a runtime's last
    bits cannot flip one."""
    member = targets.astype(bool) if targets.ndim == 2 else targets[:, None] == np.arange(len(labels))
    ordered = np.sort(scores)
    last = min(len(ordered) - 1, int(np.ceil(kept_rate * len(ordered) - 1e-9)) - 1)  # 0.95 * 20 is 19.000000000000004
    above = ordered[last + 1] if last + 1 < len(ordered) else ordered[last] + 0.01
    threshold = float((ordered[last] + above) / 2)
    kept = scores <= threshold
    calibration = {
        "images": len(scores),
        "kept": round(float(kept.mean()), 4),
        "per_class_kept": {
            name: round(float(kept[member[:, c]].mean()), 4) for c, name in enumerate(labels) if member[:, c].any()
        },
        "quantiles": {q: round(float(np.quantile(scores, float(q))), 4) for q in ("0.05", "0.5", "0.95")},
    }
    if len(scores) < FEW_CALIBRATION_IMAGES:
        log.warning(
            "the novelty threshold rests on %d validation images: a rough estimate of the %.0f%% kept rate; add "
            "validation images for a firmer one",
            len(scores),
            100 * kept_rate,
        )
    return threshold, calibration


def build_open_set(
    train: np.ndarray,
    train_targets: np.ndarray,
    val: np.ndarray,
    val_targets: np.ndarray,
    labels: list[str],
    cfg,
) -> Novelty | None:
    """The novelty score of a trained classifier from the clean pooled features of its training and validation
    images; ``None`` with ``--bank-size 0``. ``train_targets``: a group per training image for the bank's
    subsampling; ``val_targets``: as :func:`calibrate` takes them."""
    if cfg.bank_size == 0:
        return None
    rows = choose_bank(train_targets, cfg.bank_size, cfg.seed)
    bank = feature_bank(torch.from_numpy(np.ascontiguousarray(train[rows])))
    draft = Novelty(bank, NoveltyConfig(k=cfg.novelty_k, threshold=1.0, kept_rate=cfg.kept_rate))
    threshold, calibration = calibrate(novelty_of(draft, val), val_targets, labels, cfg.kept_rate)
    calibration |= {"bank_vectors": len(rows), "bank_bytes": int(bank.numel() * bank.element_size())}
    config = NoveltyConfig(k=draft.k, threshold=threshold, kept_rate=cfg.kept_rate, calibration=calibration)
    log.info(
        "none of these: novelty above %.4f (keeps %.1f%% of %d validation images; bank of %d training images, %.1f MB)",
        threshold,
        100 * calibration["kept"],
        len(val),
        len(rows),
        calibration["bank_bytes"] / 1e6,
    )
    return Novelty(bank, config)


def save_open_set(run_dir: Path, novelty: Novelty) -> None:
    runs.save_safetensors(
        run_dir / OPEN_SET, {"bank": novelty.bank}, metadata={"open_set": json.dumps(novelty.config.to_dict())}
    )


def load_open_set(run_dir: Path) -> Novelty | None:
    """The run's novelty score; ``None`` for a run without one (trained before it existed, or ``--bank-size 0``)."""
    path = run_dir / OPEN_SET
    if not path.is_file():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        config = NoveltyConfig.from_dict(json.loads(fh.metadata()["open_set"]))
        bank = fh.get_tensor("bank")
    return Novelty(bank, config)
