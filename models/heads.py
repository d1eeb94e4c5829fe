"""Classification heads trained on top of a frozen backbone's pooled features."""

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
            raise ValueError(
                f"Invalid activation {self.activation!r}. Only {sorted(ACTIVATIONS)} are supported."
            )
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
