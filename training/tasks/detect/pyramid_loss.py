"""Targets and loss of the multi-scale detector (``models/pyramid.py``).

Assignment (static, computed once per cached view): an object is handled by the level whose range fits its size
(half its longer side at most 4 strides of 8 on stride 8, up to 4 strides of 16 on stride 16, the rest on stride 32:
FCOS's size ranges, halved for 3 levels at 256-640 px instead of 5 at 800) and, on that level, by the cells whose
centre lies inside the box and within ``radius`` strides of the box centre ("centre sampling"); an object too small
to hold a cell centre gets the cell under its centre. A cell claimed by two objects goes to the smaller one. Static
assignment suits 128 images: no early, noisy predictions decide what the head is taught, and the targets are
computed once, from the boxes cached with each view.

Loss: classification with the quality focal loss (GFL): the target of an assigned cell's class is the IoU of its
predicted box with the object (0 elsewhere), weighted by |σ - target|², so the scores that rank detections for NMS
and AP are trained to rank by box quality; boxes with GIoU loss. Both sums are divided by the number of assigned
cells.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def level_points(input_size: int, strides: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cell centres (P, 2) in input pixels, their strides (P,) and level index (P,), as the head orders them."""
    centres, stride, level = [], [], []
    for i, s in enumerate(strides):
        n = input_size // s
        ys, xs = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        centres.append(np.stack([(xs.ravel() + 0.5) * s, (ys.ravel() + 0.5) * s], 1))
        stride.append(np.full(n * n, s, np.float32))
        level.append(np.full(n * n, i, np.int64))
    return np.concatenate(centres).astype(np.float32), np.concatenate(stride), np.concatenate(level)


def assign(
    targets: np.ndarray, input_size: int, strides: tuple[int, ...], radius: float = 2.5
) -> tuple[np.ndarray, np.ndarray]:
    """One view's (M, 5) class, cx, cy, w, h (normalised) → per cell class (P,) int16 (-1: background) and the
    assigned box (P, 4) x1 y1 x2 y2 in input pixels (float16)."""
    centres, stride, level = level_points(input_size, strides)
    p = len(centres)
    cls_out = np.full(p, -1, np.int16)
    box_out = np.zeros((p, 4), np.float16)
    if not len(targets):
        return cls_out, box_out
    cls = targets[:, 0].astype(np.int64)
    cx, cy, w, h = (targets[:, k] * input_size for k in range(1, 5))
    boxes = np.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], 1)
    # (P, M): distances from each cell centre to each box's edges
    left, top = centres[:, :1] - boxes[None, :, 0], centres[:, 1:] - boxes[None, :, 1]
    right, bottom = boxes[None, :, 2] - centres[:, :1], boxes[None, :, 3] - centres[:, 1:]
    ltrb = np.stack([left, top, right, bottom], -1)
    inside = ltrb.min(-1) > 0
    near = (np.abs(centres[:, :1] - cx[None]) < radius * stride[:, None]) & (
        np.abs(centres[:, 1:] - cy[None]) < radius * stride[:, None]
    )
    # the level of each object: FCOS's ranges on the largest distance from its centre to its edges
    reach = np.maximum(w, h) / 2
    obj_level = np.searchsorted(np.array([4.0 * s for s in strides[:-1]]), reach, side="left")
    on_level = level[:, None] == obj_level[None]
    ok = inside & near & on_level
    # an object that holds no cell centre on its level gets the cell under its centre there
    for j in np.flatnonzero(~ok.any(0)):
        s = strides[obj_level[j]]
        n = input_size // s
        col, row = min(max(int(cx[j] // s), 0), n - 1), min(max(int(cy[j] // s), 0), n - 1)
        start = sum((input_size // t) ** 2 for t in strides[: obj_level[j]])
        ok[start + row * n + col, j] = True
    area = np.where(ok, (w * h)[None], np.inf)
    best = area.argmin(1)
    has = np.isfinite(area.min(1))
    cls_out[has] = cls[best[has]]
    box_out[has] = boxes[best[has]]
    return cls_out, box_out


def box_iou_giou(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Element-wise IoU and generalised IoU of (M, 4) x1 y1 x2 y2 boxes."""
    lt, rb = torch.maximum(a[:, :2], b[:, :2]), torch.minimum(a[:, 2:], b[:, 2:])
    inter = (rb - lt).clamp(min=0).prod(1)
    area_a = (a[:, 2:] - a[:, :2]).clamp(min=0).prod(1)
    area_b = (b[:, 2:] - b[:, :2]).clamp(min=0).prod(1)
    union = area_a + area_b - inter + 1e-7
    iou = inter / union
    hull = (torch.maximum(a[:, 2:], b[:, 2:]) - torch.minimum(a[:, :2], b[:, :2])).clamp(min=0).prod(1) + 1e-7
    return iou, iou - (hull - union) / hull


class _QualityFocalSum(torch.autograd.Function):
    """Σ over every (cell, class) of BCE(x, t)·(σ(x) - t)², t = 0 except at the given (row, class) entries, where it
    is their quality; the gradient is computed with the sum and kept.

    Written out instead of ``binary_cross_entropy_with_logits(x, t) * (sigmoid(x) - t) ** 2`` on the whole (N, P, K)
    logits: at 512 px a batch of 32 has 13.8 million of them, and autograd's way (a dense target, a dozen full-size
    temporaries forward and back, ATen's unvectorised softplus) took 385 ms of a 1.0 s training step on two cores. Here
    the background's part, softplus(x)·σ(x)², with derivative σ³ + 2·softplus(x)·σ²(1 - σ), is computed a block of
    rows at a time (its temporaries stay in cache, one output buffer) and the entries with a target are corrected
    afterwards: 58 ms. The same function within float32 rounding (tests/test_pyramid.py)."""

    @staticmethod
    def forward(ctx, logits, rows, cols, quality, scale):
        x = logits.flatten(0, -2)
        grad = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        total = x.new_zeros(())
        block = 4096 if x.device.type == "cpu" else len(x)
        for a in range(0, len(x), block):
            xb, g = x[a : a + block], grad[a : a + block]
            s = torch.sigmoid(xb)
            # softplus(x) = max(x, 0) + log(1 + e^-|x|), vectorised, unlike ATen's softplus (20x slower here); its
            # error, 1 + e^-|x| rounded to float32 (6e-8 at most), counts only for very negative x, where σ² < e^2x
            sp = torch.abs(xb).neg_().exp_().add_(1).log_().add_(torch.relu(xb))
            torch.mul(s, s, out=g)
            total += torch.mul(sp, g).sum()
            g.mul_(sp.mul_(torch.rsub(s, 1)).mul_(2).add_(s).mul_(scale))
        xp = x[rows, cols]
        s, sp = torch.sigmoid(xp), F.softplus(xp)
        d, bce = s - quality, sp - quality * xp
        total += (bce * d * d - sp * s * s).sum()
        grad[rows, cols] = d * (d * d + 2 * bce * s * (1 - s)) * scale
        ctx.save_for_backward(grad.view(logits.shape))
        return total * scale

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (grad if bool(grad_output == 1) else grad * grad_output), None, None, None, None


def quality_focal_loss(
    logits: torch.Tensor, pos: torch.Tensor, classes: torch.Tensor, quality: torch.Tensor, scale: float
) -> torch.Tensor:
    """``scale`` x Σ BCE(x, t)·(σ(x) - t)² over logits (N, P, K), t = ``quality`` at the cells ``pos`` (N, P) for
    their ``classes``, 0 elsewhere (GFL's quality focal loss, β 2)."""
    rows = pos.reshape(-1).nonzero().squeeze(1)
    return _QualityFocalSum.apply(logits, rows, classes.long(), quality.to(logits.dtype), scale)


def pyramid_loss(
    boxes: torch.Tensor,
    logits: torch.Tensor,
    tcls: torch.Tensor,
    tbox: torch.Tensor,
    box_weight: float = 2.0,
    quality_target: bool = True,
) -> tuple[torch.Tensor, dict]:
    """Decoded boxes (N, P, 4), class logits (N, P, K) against :func:`assign`'s targets (N, P), (N, P, 4).
    ``quality_target=False`` trains an assigned cell's class towards 1 instead of its IoU (a plain focal loss, γ 2):
    the ablation ``benchmarks/localize_eval.py --ablate`` measures."""
    pos = tcls >= 0
    npos = max(int(pos.sum()), 1)
    iou, giou = box_iou_giou(boxes[pos], tbox[pos].float())
    box = (1 - giou).sum() / npos
    target = iou.detach().clamp(min=0) if quality_target else torch.ones_like(iou)
    quality = quality_focal_loss(logits, pos, tcls[pos], target, 1.0 / npos)
    total = quality + box_weight * box
    return total, {"class": quality.item(), "box": box.item()}
