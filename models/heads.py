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
    """dropout → [Linear(hidden) → BatchNorm → activation → dropout] → Linear(num_classes)."""

    in_features: int
    num_classes: int
    hidden: int = 0
    dropout: float = 0.2
    activation: str = "relu"

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"Invalid activation {self.activation!r}. Only {sorted(ACTIVATIONS)} are supported.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if self.hidden < 0 or self.num_classes < 2 or self.in_features < 1:
            raise ValueError("hidden must be >= 0, num_classes >= 2 and in_features >= 1.")

    def to_dict(self) -> dict:
        return asdict(self)


class ClassifierHead(nn.Module):
    """Maps features (N, C) to logits (N, K); ``forward_map`` applies the same head to every cell of a map."""

    def __init__(self, cfg: HeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Dropout(cfg.dropout)]
        width = cfg.in_features
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
        return self.net(x)

    def forward_map(self, fmap: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) feature map → (N, K, H, W) per-cell logits (class activation map)."""
        n, c, h, w = fmap.shape
        cells = fmap.permute(0, 2, 3, 1).reshape(n * h * w, c)
        return self.net(cells).reshape(n, h, w, -1).permute(0, 3, 1, 2)


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
