"""The multi-label heads on cached pooled features, one sigmoid per label.

``--classifier prototype`` (the default, :func:`fit_prototypes`): each label's weights are the mean direction of its
training views, no epochs. ``--classifier linear`` (:func:`fit_head`): a linear layer trained on the views, the epoch
kept by validation mAP, with the loss of ``--loss``: ``weighted``, binary cross-entropy with each label's positives
weighted by its negatives over positives in the training images (at most :data:`MAX_POS_WEIGHT`: a rare label still
counts); ``bce``, unweighted; ``asl``, the asymmetric loss of Ridnik et al. (2021), which down-weights easy negatives
(gamma- 4) and ignores negatives scored below a margin (0.05): the usual answer when most labels are absent from most
images.
"""

from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from headstart.loop import optimizer_step, train_head
from headstart.models import ClassifierHead, HeadConfig, lse_pool
from headstart.tasks.base import Job
from headstart.tasks.multilabel.data import multi_hot
from headstart.tasks.multilabel.metrics import mean_average_precision

log = logging.getLogger("headstart")

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
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    def step(idx: torch.Tensor, epoch: int) -> dict | None:
        if len(idx) < 2 and cfg.hidden:  # BatchNorm1d needs 2 samples
            return None
        idx = idx.to(device)
        loss = optimizer_step(opt, loss_fn(image_logits(head, x[idx], pooling), y[idx]))
        return {"loss": loss * len(idx), "seen": len(idx)}

    @torch.no_grad()
    def evaluate() -> dict:
        return validation_row(image_logits(head, val_x, pooling), val_y, loss_fn)

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


def validation_row(logits: torch.Tensor, val_y: np.ndarray, loss) -> dict:
    """What a head's history records of the validation images: ``loss(logits, targets)`` and mAP, macro and micro."""
    maps = mean_average_precision(torch.sigmoid(logits).cpu().numpy(), val_y)
    return {
        "val_loss": float(loss(logits, torch.from_numpy(val_y).to(logits.device))),
        "val_map": maps["map_macro"] or 0.0,
        "val_map_micro": maps["map_micro"] or 0.0,
    }


#: the ridge holding each label's bias towards the labels' mean bias (prototype head): a label with a single
#: training image is calibrated on its negatives only, and would otherwise never be predicted (coco128, clean
#: pooled features, 3 folds: 0.03 kept the micro mAP of a tuned logistic regression, 0.3 lost 0.03 of it)
BIAS_RIDGE = 0.03


def fit_prototypes(job: Job, head_cfg: HeadConfig) -> ClassifierHead:
    """The prototype head (``--classifier prototype``, imprinted weights): label l's weight vector is the mean
    direction of its training views' embeddings (:meth:`ClassifierHead.embed`: the view's pooled vector at unit
    length, and the backbone's ImageNet answer beside it), times a scale shared by every label; each label has its
    own bias. No epochs: the scale and the biases are a logistic regression (log loss; the biases held towards
    their mean, :data:`BIAS_RIDGE`) on the cosines of every training view with every label's direction, the view's
    image left out of its own labels' means, so that the scores it is calibrated on are those of an image the head
    has not learned from (a label's only training image has none). Ranking a label's images by their likeness to the
    mean of its few examples is what small data supports best: on coco128 it beats a tuned per-label logistic
    regression and the trained linear head (``benchmarks/multilabel.py``, README)."""
    device, train, val = job.device, job.train_features, job.val_features
    k = len(job.labels)
    train_y = multi_hot([s.labels for s in train.samples], k)
    val_y = multi_hot([s.labels for s in val.samples], k)
    job.training_report["loss"] = {"loss": "bce (calibration)", "train_positives": train_y.sum(0).astype(int).tolist()}
    head = ClassifierHead(head_cfg).to(device).eval()
    if head_cfg.prior_classes:
        head.prior.load_state_dict(job.backbone.classifier.state_dict())
    elif job.cfg.prior_weight > 0:
        log.info(
            "%s has no pretrained classifier of one linear layer on its pooled features: the prototype head reads "
            "the features alone (--prior-weight does nothing)",
            job.backbone.name,
        )
    n, v = train.values.shape[:2]
    with torch.no_grad():
        flat = torch.from_numpy(train.values.reshape(n * v, -1).astype(np.float32)).to(device)
        u = torch.cat([head.embed(chunk) for chunk in flat.split(4096)]).reshape(n, v, -1)
    y = torch.from_numpy(train_y).to(device)
    per_image = u.sum(1)  # (n, D): an image's views, summed
    sums = y.T @ per_image  # (k, D): each label's, summed (zero for a label without training images)
    cosines = _left_out_cosines(u, y.bool(), per_image, sums)
    scored = ~torch.isnan(cosines)
    x, t, m = (a.reshape(n * v, k) for a in (cosines.nan_to_num(0.0), y[:, None].expand(n, v, k), scored.float()))

    scale = torch.tensor(10.0, device=device, requires_grad=True)  # logits linear in (scale, bias): a convex fit
    bias = torch.zeros(k, device=device, requires_grad=True)
    opt = torch.optim.LBFGS([scale, bias], max_iter=500, line_search_fn="strong_wolfe")
    bce = nn.BCEWithLogitsLoss(reduction="none")

    def data_loss() -> torch.Tensor:  # the log loss over the scored (view, label) pairs
        return (bce(scale * x + bias, t) * m).sum() / len(x)

    def objective() -> torch.Tensor:
        opt.zero_grad()
        loss = data_loss() + BIAS_RIDGE * (bias - bias.mean()).pow(2).sum()
        loss.backward()
        return loss

    opt.step(objective)
    with torch.no_grad():
        train_loss = float(data_loss())  # L-BFGS's step returns its first loss
    fitted = float(scale.detach())
    if not fitted > 0:  # nothing tells the labels' images from the others: the cosines as they are
        fitted = 1.0
    with torch.no_grad():
        layer = head.net[-1]
        layer.weight.copy_(fitted * nn.functional.normalize(sums, dim=1))
        head.center.copy_(u.mean(dim=(0, 1)))  # logits alike, the layer's output small (see HeadConfig)
        layer.bias.copy_(bias + layer.weight @ head.center)
        logits = head(torch.from_numpy(val.values[:, 0].astype(np.float32)).to(device))
        val_row = validation_row(logits, val_y, lambda out, target: bce(out, target).sum(1).mean())
    job.history.append({"epoch": 0, "phase": "head", "train_loss": train_loss, **val_row})
    job.training_report["head"] = {
        "classifier": "prototype",
        "prior": bool(head_cfg.prior_classes),
        "scale": round(fitted, 4),
        "labels_without_training_images": int((train_y.sum(0) == 0).sum()),
    }
    return head


def _left_out_cosines(u: torch.Tensor, y: torch.Tensor, per_image: torch.Tensor, sums: torch.Tensor) -> torch.Tensor:
    """(n, v, k) cosines of every view ``u`` (n, v, C; unit length) with each label's summed views ``sums``
    (k, C), image i's own views ``per_image[i]`` taken out of the labels it holds (``y`` (n, k)); NaN where
    nothing is left (the label's only image) or a label has no views at all."""
    dots = torch.einsum("nvc,kc->nvk", u, sums)
    own = torch.einsum("nvc,nc->nv", u, per_image)[:, :, None]
    # |sums_l - per_image_i| for every pair, without an (n, k, C) tensor: in float64 against cancellation
    s64, p64 = sums.double(), per_image.double()
    left_sq = (s64.pow(2).sum(1)[None] - 2 * p64 @ s64.T + p64.pow(2).sum(1)[:, None]).clamp_min(0)
    left = left_sq.sqrt().float()
    norm = torch.where(y, left, sums.norm(dim=1)[None].expand_as(left))
    cosines = torch.where(y[:, None], dots - own, dots) / norm[:, None].clamp_min(1e-12)
    empty = norm <= 1e-6 * max(float(per_image.norm(dim=1).max()), 1.0)
    return cosines.masked_fill(empty[:, None], float("nan"))
