"""Targets and loss of the grid head (YOLOv1, with the usual later refinements).

Each ground-truth box is assigned to the cell holding its centre and, within the cell, to the free predictor whose
anchor shape (from the training boxes) fits it best; ``lambda_coord`` (5) × squared error on (x, y, √w, √h) of
assigned predictors, binary cross-entropy on objectness (weighted ``lambda_noobj`` = 0.5 for unassigned predictors),
cross-entropy on the class of assigned predictors.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def anchor_shapes(targets: list[np.ndarray], boxes_per_cell: int) -> np.ndarray:
    """One typical (w, h) per predictor: training boxes sorted by aspect ratio, split evenly, median of each."""
    wh = np.concatenate([t[:, 3:5] for t in targets if len(t)])
    order = np.argsort(wh[:, 1] / np.maximum(wh[:, 0], 1e-6))
    return np.stack([np.median(wh[part], axis=0) for part in np.array_split(order, boxes_per_cell)])


def _shape_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    inter = np.minimum(wh[0], anchors[:, 0]) * np.minimum(wh[1], anchors[:, 1])
    return inter / (wh[0] * wh[1] + anchors[:, 0] * anchors[:, 1] - inter)


def build_targets(
    targets: list[np.ndarray], grid: tuple[int, int], anchors: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per view: objectness mask (N, H, W, B), box targets (x, y offsets in the cell, √w, √h), class targets.

    Returns the number of boxes dropped because every predictor of their cell was taken.
    """
    s_h, s_w = grid
    b = len(anchors)
    obj = np.zeros((len(targets), s_h, s_w, b), bool)
    tbox = np.zeros((len(targets), s_h, s_w, b, 4), np.float32)
    tcls = np.zeros((len(targets), s_h, s_w, b), np.int64)
    dropped = 0
    for n, t in enumerate(targets):
        for cls, cx, cy, w, h in t[np.argsort(-(t[:, 3] * t[:, 4]))] if len(t) else []:
            col, row = min(int(cx * s_w), s_w - 1), min(int(cy * s_h), s_h - 1)
            for k in np.argsort(-_shape_iou(np.array([w, h]), anchors)):
                if not obj[n, row, col, k]:
                    obj[n, row, col, k] = True
                    tbox[n, row, col, k] = (cx * s_w - col, cy * s_h - row, np.sqrt(w), np.sqrt(h))
                    tcls[n, row, col, k] = int(cls)
                    break
            else:
                dropped += 1
    return torch.from_numpy(obj), torch.from_numpy(tbox), torch.from_numpy(tcls), dropped


def yolo_loss(
    raw: torch.Tensor,
    obj: torch.Tensor,
    tbox: torch.Tensor,
    tcls: torch.Tensor,
    lambda_coord: float = 5.0,
    lambda_noobj: float = 0.5,
) -> tuple[torch.Tensor, dict]:
    """Raw grid predictions (N, H, W, B, 5 + K) against targets from :func:`build_targets`; mean over images."""
    n = raw.shape[0]
    pred = torch.sigmoid(raw[..., :4])
    coord = ((pred - tbox) ** 2).sum(-1)[obj].sum()
    bce = F.binary_cross_entropy_with_logits(raw[..., 4], obj.float(), reduction="none")
    objectness = bce[obj].sum() + lambda_noobj * bce[~obj].sum()
    classes = F.cross_entropy(raw[obj][:, 5:], tcls[obj], reduction="sum") if obj.any() else raw.sum() * 0
    total = (lambda_coord * coord + objectness + classes) / n
    return total, {
        "coord": coord.item() / n,
        "objectness": objectness.item() / n,
        "class": classes.item() / n,
    }
