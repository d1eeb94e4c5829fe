"""Multi-scale detection: the frozen backbone's stride-8/16/32 maps, a light FPN+PAN neck and a YOLO-style dense head.

Every cell of every level predicts one box (anchor-free, as YOLOv8 and FCOS do): ``softplus`` distances from the
cell centre to the box's left, top, right and bottom edges, in units of the level's stride, and one sigmoid score
per class (trained towards the IoU of its box with the object, so a score ranks boxes by quality; no separate
objectness). ``training/pyramid_loss.py`` assigns objects to cells and defines the loss.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from headstart.models.backbone import BackboneError, BatchNormFrozen

STRIDES = (8, 16, 32)


class Pyramid(nn.Module):
    """A frozen backbone's feature maps at ``strides``: the last map at each stride, input → [(N, C_i, H_i, W_i)].

    Works for backbones whose body is a sequence of stages (torchvision's MobileNets/EfficientNets/ConvNeXts via
    ``.features``, ResNets) and for timm models with ``forward_intermediates``.
    """

    def __init__(self, features: BatchNormFrozen, strides: tuple[int, ...] = STRIDES, probe_size: int = 256) -> None:
        super().__init__()
        self.features = features
        self.strides = tuple(strides)
        body = features.body
        self.timm_indices: list[int] | None = None
        probe = torch.zeros(1, 3, probe_size, probe_size)
        if isinstance(body, nn.Sequential):
            picks: dict[int, int] = {}
            x = probe
            with torch.no_grad():
                for i, stage in enumerate(body):
                    x = stage(x)
                    picks[probe_size // x.shape[-1]] = i
            self.take = [picks.get(s, -1) for s in self.strides]
        elif hasattr(body, "forward_intermediates") and hasattr(body, "feature_info"):
            reductions = [int(info["reduction"]) for info in body.feature_info]
            self.timm_indices = [max((i for i, r in enumerate(reductions) if r == s), default=-1) for s in strides]
            self.take = self.timm_indices
        else:
            raise BackboneError(
                "This backbone does not expose its intermediate stages; the multi-scale detector "
                "needs a torchvision model with .features, a ResNet, or a timm model with "
                "forward_intermediates. Use --head grid for a single-scale detector."
            )
        if -1 in self.take:
            missing = [s for s, t in zip(self.strides, self.take, strict=True) if t == -1]
            raise BackboneError(
                f"The backbone has no feature map at stride {missing} (of {list(self.strides)}). "
                "Use --head grid for a single-scale detector."
            )
        with torch.no_grad():
            self.channels = tuple(int(m.shape[1]) for m in self.forward(probe))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        body = self.features.body
        if self.timm_indices is not None:
            return list(body.forward_intermediates(x, indices=self.timm_indices, intermediates_only=True))
        out = []
        last = max(self.take)
        for i, stage in enumerate(body):
            x = stage(x)
            if i in self.take:
                out.append(x)
            if i == last:
                break
        return out

    def train(self, mode: bool = True) -> Pyramid:
        super().train(mode)
        self.features.train(mode)  # BatchNormFrozen keeps BatchNorm in eval
        return self


class FlatPyramid(nn.Module):
    """The pyramid's maps flattened and concatenated per image (N, ΣC·H·W): one array per view in the feature cache."""

    def __init__(self, pyramid: Pyramid) -> None:
        super().__init__()
        self.pyramid = pyramid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([m.flatten(1) for m in self.pyramid(x)], 1)


@dataclass(frozen=True)
class PyramidHeadConfig:
    """Neck and head of the multi-scale detector (see the module docstring)."""

    in_channels: tuple[int, ...]
    num_classes: int
    input_size: int = 512
    strides: tuple[int, ...] = STRIDES
    width: int = 64
    dropout: float = 0.1

    def __post_init__(self) -> None:
        if len(self.in_channels) != len(self.strides) or self.num_classes < 1 or self.width < 8:
            raise ValueError("in_channels must match strides; num_classes >= 1; width >= 8.")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}.")
        if any(self.input_size % s for s in self.strides):
            raise ValueError(f"input_size {self.input_size} must be a multiple of every stride {self.strides}.")

    @property
    def sizes(self) -> list[tuple[int, int]]:
        """Each level's grid (rows, columns)."""
        return [(self.input_size // s, self.input_size // s) for s in self.strides]

    @property
    def num_predictors(self) -> int:
        return sum(h * w for h, w in self.sizes)

    def to_dict(self) -> dict:
        d = asdict(self)
        return {"kind": "pyramid", **d, "in_channels": list(d["in_channels"]), "strides": list(d["strides"])}

    @classmethod
    def from_dict(cls, data: dict) -> PyramidHeadConfig:
        d = {k: v for k, v in data.items() if k != "kind"}
        return cls(**{**d, "in_channels": tuple(d["in_channels"]), "strides": tuple(d["strides"])})


def _conv(c_in: int, c_out: int, k: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class PyramidHead(nn.Module):
    """Maps [(N, C_i, H_i, W_i)] (or the same flattened and concatenated, as cached) → per level raw predictions
    (N, H_i·W_i, 4 + K).

    Neck: 1x1 laterals to ``width`` channels, a top-down path (upsample + add, 3x3 conv) and a bottom-up path
    (stride-2 3x3 conv + add, 3x3 conv), as PAN does. Head, shared by every level: two 3x3 convs, then 1x1 convs
    to 4 box distances and K class logits.
    """

    def __init__(self, cfg: PyramidHeadConfig) -> None:
        super().__init__()
        self.cfg = cfg
        w, n = cfg.width, len(cfg.strides)
        self.lateral = nn.ModuleList(_conv(c, w, 1) for c in cfg.in_channels)
        self.top_down = nn.ModuleList(_conv(w, w) for _ in range(n - 1))
        self.down = nn.ModuleList(_conv(w, w, 3, 2) for _ in range(n - 1))
        self.bottom_up = nn.ModuleList(_conv(w, w) for _ in range(n - 1))
        self.stem = nn.Sequential(_conv(w, w), _conv(w, w), nn.Dropout2d(cfg.dropout))
        self.box = nn.Conv2d(w, 4, 1)
        self.cls = nn.Conv2d(w, cfg.num_classes, 1)
        with torch.no_grad():  # scores start at a 1% prior: nearly every cell is background
            self.cls.bias.fill_(-4.6)
            self.box.bias.fill_(1.0)  # softplus(1) · stride ≈ a box of 2.6 strides around the cell

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(N, ΣC·H·W) as :class:`FlatPyramid` caches it → the level maps."""
        sizes = [c * h * w for c, (h, w) in zip(self.cfg.in_channels, self.cfg.sizes, strict=True)]
        parts = torch.split(flat, sizes, dim=1)
        return [
            p.reshape(len(flat), c, h, w)
            for p, c, (h, w) in zip(parts, self.cfg.in_channels, self.cfg.sizes, strict=True)
        ]

    def forward(self, maps: list[torch.Tensor] | torch.Tensor) -> list[torch.Tensor]:
        if isinstance(maps, torch.Tensor):
            maps = self.split(maps)
        # bf16 maps come from training under autocast, which would cast float32 ones to bf16 anyway
        x = [lat(m if m.dtype == torch.bfloat16 else m.float()) for lat, m in zip(self.lateral, maps, strict=True)]
        for i in range(len(x) - 2, -1, -1):  # top-down: coarse semantics into fine maps
            x[i] = self.top_down[i](x[i] + F.interpolate(x[i + 1], size=x[i].shape[-2:], mode="nearest"))
        for i in range(1, len(x)):  # bottom-up: fine localisation into coarse maps
            x[i] = self.bottom_up[i - 1](x[i] + self.down[i - 1](x[i - 1]))
        out = []
        for level in x:
            h = self.stem(level)
            raw = torch.cat([self.box(h), self.cls(h)], 1)
            out.append(raw.flatten(2).transpose(1, 2))
        return out

    def points(self, device=None, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        """Cell centres (P, 2) in input pixels and their strides (P,), level after level, row-major."""
        centres, strides = [], []
        for (h, w), s in zip(self.cfg.sizes, self.cfg.strides, strict=True):
            ys, xs = torch.meshgrid(
                torch.arange(h, device=device, dtype=dtype), torch.arange(w, device=device, dtype=dtype), indexing="ij"
            )
            centres.append(torch.stack([(xs.reshape(-1) + 0.5) * s, (ys.reshape(-1) + 0.5) * s], 1))
            strides.append(torch.full((h * w,), float(s), device=device, dtype=dtype))
        return torch.cat(centres), torch.cat(strides)

    def decode(
        self, raw: list[torch.Tensor], input_size: int | None = None, logits: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw per level → boxes (N, P, 4) x1 y1 x2 y2 in input pixels (clipped to the input), scores (N, P, K)
        (class logits with ``logits``)."""
        size = self.cfg.input_size
        if input_size is not None and input_size != size:
            raise ValueError(f"This head was trained at input size {size}, not {input_size}.")
        flat = torch.cat(raw, 1)  # in the head's dtype (bf16 under autocast), then float32 split, not sliced
        distances, scores = (part.float() for part in flat.split([4, flat.shape[-1] - 4], -1))
        centres, strides = self.points(flat.device)
        dist = F.softplus(distances) * strides[None, :, None]
        boxes = torch.cat([centres - dist[..., :2], centres + dist[..., 2:]], -1).clamp(0, size)
        return boxes, scores if logits else torch.sigmoid(scores)
