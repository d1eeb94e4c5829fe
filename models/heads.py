"""Heads trained on a frozen backbone's features: the classifier's head (on pooled features, and per cell for its
class map) and the single-scale YOLO-style grid detector (``--head grid``; the default multi-scale detector's head
is in ``models/pyramid.py``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

ACTIVATIONS = {"relu": nn.ReLU, "leaky_relu": nn.LeakyReLU}


@dataclass(frozen=True)
class HeadConfig:
    """[embedding →] dropout → [Linear(hidden) → BatchNorm → activation → dropout] → Linear(num_classes).

    ``normalize``: the head reads the features at unit length (:meth:`ClassifierHead.embed`), so that a label's
    logit is its weight vector's cosine with the image's vector, scaled, plus a bias (the multi-label task's
    prototype head); less a fixed ``center`` vector (the training views' mean), which changes no logit but keeps
    the layer's output small: in bf16 a large cosine term and a large bias cancelling each other would leave the
    logits a resolution of 1/16. ``prior_classes`` > 0: the backbone's own pretrained classifier (``prior_classes``
    outputs read from the first ``prior_features`` features, frozen) answers too, and the square roots of its
    probabilities at unit length, times ``prior_weight``, stand beside the features (the whole at unit length).
    Per cell (:meth:`ClassifierHead.forward_map`) the cells are divided by the norm of their image's mean vector
    and the prior is the image's, so that an image's logit stays the mean of its cells' logits, as for the linear
    head.
    """

    in_features: int
    num_classes: int
    hidden: int = 0
    dropout: float = 0.2
    activation: str = "relu"
    normalize: bool = False
    prior_classes: int = 0
    prior_features: int = 0
    prior_weight: float = 0.0

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {self.activation!r}. Only {sorted(ACTIVATIONS)} are supported.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.hidden < 0 or self.num_classes < 2 or self.in_features < 1:
            raise ValueError("hidden must be >= 0, num_classes >= 2 and in_features >= 1.")
        if self.prior_classes and not (
            self.normalize and not self.hidden and 0 < self.prior_features <= self.in_features
        ):
            raise ValueError("a head with a prior is one linear layer on normalised features, the prior's among them.")

    @property
    def width(self) -> int:
        """What the head's first layer reads: the features, and the prior's outputs beside them."""
        return self.in_features + self.prior_classes

    def to_dict(self) -> dict:
        return asdict(self)


def _unit(x: torch.Tensor) -> torch.Tensor:
    """Rows at unit L2 length (a zero row stays zero)."""
    return x * torch.rsqrt(x.pow(2).sum(dim=1, keepdim=True) + 1e-24)


class ClassifierHead(nn.Module):
    """Maps features (N, C) to logits (N, K); ``forward_map`` applies the same head to every cell of a map."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        width = cfg.width
        if cfg.prior_classes:  # the backbone's pretrained classifier, frozen (its weights come with the head's)
            self.prior = nn.Linear(cfg.prior_features, cfg.prior_classes).requires_grad_(False)
        if cfg.normalize:
            self.register_buffer("center", torch.zeros(width))
        if cfg.hidden:
            layers += [
                nn.Linear(width, cfg.hidden),
                nn.BatchNorm1d(cfg.hidden),
                ACTIVATIONS[cfg.activation](),
                nn.Dropout(cfg.dropout),
            ]
            width = cfg.hidden
        layers.append(nn.Linear(width, cfg.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._logits(x, None)

    def forward_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) feature map → (N, K, H, W) per-cell logits (class activation map)."""
        return self._cell_logits(fmap, None)

    def forward_with_map(self, pooled: torch.Tensor, fmap: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's logits from its ``pooled`` vector and the cells' from its map, the prior computed once."""
        prior = self._prior(pooled) if self.cfg.prior_classes else None
        return self._logits(pooled, prior), self._cell_logits(fmap, prior)

    def embed(self, x: torch.Tensor, prior: torch.Tensor | None = None) -> torch.Tensor:
        """(N, C) features → what the head's first layer reads: the features themselves, or (``normalize``) at unit
        length, with the prior's answer beside them (see :class:`HeadConfig`)."""
        if not self.cfg.normalize:
            return x
        if not self.cfg.prior_classes:
            return _unit(x)
        prior = self._prior(x) if prior is None else prior
        return torch.cat([_unit(x), prior], dim=1) / self._length

    def _prior(self, x: torch.Tensor) -> torch.Tensor:
        """``prior_weight`` times the square roots of the prior's probabilities, at unit length; the prior reads the
        features as they are (the mean part of mean+max vectors), as the backbone's classifier does."""
        return self.cfg.prior_weight * _unit(torch.softmax(self.prior(x[:, : self.cfg.prior_features]), dim=1).sqrt())

    @property
    def _length(self) -> float:
        return (1.0 + self.cfg.prior_weight**2) ** 0.5 if self.cfg.prior_classes else 1.0

    def _logits(self, x: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        return self.net(self.embed(x, prior) - self.center) if self.cfg.normalize else self.net(x)

    def _cell_logits(self, fmap: torch.Tensor, prior: torch.Tensor | None) -> torch.Tensor:
        n, c, h, w = fmap.shape
        if not self.cfg.normalize:
            cells = fmap.permute(0, 2, 3, 1).reshape(n * h * w, c)
            return self.net(cells).reshape(n, h, w, -1).permute(0, 3, 1, 2)
        # a cell's embedding is its vector over the norm of the cells' mean (and the image's prior beside it), less
        # the center: the layer is applied to the raw map (a 1x1 convolution) and the rest done on the K logits
        layer = self.net[-1]
        weight = layer.weight / self._length
        pooled = fmap.mean(dim=(2, 3))
        shift = layer.bias - layer.weight @ self.center
        if self.cfg.prior_classes:
            prior = self._prior(pooled) if prior is None else prior
            shift = shift + prior @ weight[:, c:].T
        raw = nn.functional.conv2d(fmap, weight[:, :c, None, None])
        scaled = raw * torch.rsqrt(pooled.pow(2).sum(dim=1) + 1e-24)[:, None, None, None]
        # (K,) or with a prior (N, K); not expanded to N: a dynamic expand kept OpenVINO from folding the stem's bias
        return scaled + shift.reshape(-1, shift.shape[-1], 1, 1)


@dataclass(frozen=True)
class GridHeadConfig:
    """A YOLO-style grid head: per feature cell, ``boxes_per_cell`` predictors of (x, y, w, h, objectness, classes).

    conv1x1(in → hidden) → BN → LeakyReLU → conv3x3(hidden → hidden) → BN → LeakyReLU → dropout →
    conv1x1(hidden → B · (5 + K)). The 3x3 layer lets each cell see its neighbours (objects span cells).
    """

    in_features: int
    num_classes: int
    boxes_per_cell: int = 2
    hidden: int = 256
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.num_classes < 1 or self.in_features < 1 or self.hidden < 1:
            raise ValueError("num_classes, in_features and hidden must be at least 1.")
        if not 1 <= self.boxes_per_cell <= 9:
            raise ValueError(f"boxes_per_cell must be between 1 and 9, got {self.boxes_per_cell}.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")

    def to_dict(self) -> dict:
        return {"kind": "grid", **asdict(self)}

    @classmethod
    def from_dict(cls, data: dict) -> GridHeadConfig:
        return cls(**{k: v for k, v in data.items() if k != "kind"})


class GridHead(nn.Module):
    """Feature map (N, C, S, S) → raw predictions (N, S, S, B, 5 + K): tx, ty, tw, th, objectness, class logits.

    Decoding (YOLOv1 parametrisation): the box centre is ``(col + sigmoid(tx)) / S`` of the input width (rows for
    y); width and height are ``sigmoid(tw)²`` and ``sigmoid(th)²`` of the input size (the network predicts their
    square roots, as YOLOv1 does, so errors on small boxes weigh more); objectness is ``sigmoid``; each predictor
    has its own class softmax (YOLOv2 style), so two objects of different classes can share a cell.
    """

    def __init__(self, cfg: GridHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        out = nn.Conv2d(cfg.hidden, cfg.boxes_per_cell * (5 + cfg.num_classes), 1)
        with torch.no_grad():  # objectness starts at a 1% prior: most predictors see background
            out.bias.view(cfg.boxes_per_cell, 5 + cfg.num_classes)[:, 4] = -4.6
        self.net = nn.Sequential(
            nn.Conv2d(cfg.in_features, cfg.hidden, 1, bias=False),
            nn.BatchNorm2d(cfg.hidden),
            nn.LeakyReLU(0.1),
            nn.Conv2d(cfg.hidden, cfg.hidden, 3, padding=1, bias=False),
            nn.BatchNorm2d(cfg.hidden),
            nn.LeakyReLU(0.1),
            nn.Dropout2d(cfg.dropout),
            out,
        )

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        n, _, s_h, s_w = fmap.shape
        out = self.net(fmap).reshape(n, self.cfg.boxes_per_cell, 5 + self.cfg.num_classes, s_h, s_w)
        return out.permute(0, 3, 4, 1, 2)

    @staticmethod
    def decode(raw: torch.Tensor, input_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw (N, S, S, B, 5 + K) → boxes (N, S·S·B, 4) x1 y1 x2 y2 in input pixels, scores (N, S·S·B, K)."""
        n, s_h, s_w, b, _ = raw.shape
        cols = torch.arange(s_w, dtype=raw.dtype, device=raw.device).view(1, 1, s_w, 1)
        rows = torch.arange(s_h, dtype=raw.dtype, device=raw.device).view(1, s_h, 1, 1)
        cx = (cols + torch.sigmoid(raw[..., 0])) / s_w * input_size
        cy = (rows + torch.sigmoid(raw[..., 1])) / s_h * input_size
        w = torch.sigmoid(raw[..., 2]) ** 2 * input_size
        h = torch.sigmoid(raw[..., 3]) ** 2 * input_size
        boxes = torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1).reshape(n, -1, 4)
        scores = torch.sigmoid(raw[..., 4:5]) * torch.softmax(raw[..., 5:], dim=-1)
        return boxes, scores.reshape(n, s_h * s_w * b, -1)
