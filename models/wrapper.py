"""The whole trained model as one module, RGB pixels in [0, 255] in: the classifier (class probabilities, a spatial
class map and, where the run has a feature bank, each image's novelty) and the detector (class scores, boxes and
their scores)."""

from __future__ import annotations

import torch
from torch import nn

from headstart.models.heads import ClassifierHead
from headstart.models.novelty import Novelty


class PixelNormalize(nn.Module):
    """x in [0, 255] → (x / 255 - mean) / std, folded into one multiply-add so the exported graph stays tiny."""

    def __init__(self, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("scale", 1.0 / (255.0 * std_t), persistent=False)
        self.register_buffer("shift", -mean_t / std_t, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.shift


class Classifier(nn.Module):
    """normalise → backbone feature map → global average pool → head.

    ``forward`` returns ``(probabilities (N, K), class_map (N, K, H, W))``, and ``novelty (N,)`` third where the
    model has a :class:`models.novelty.Novelty` score: the class map holds per-cell probabilities from the same head
    (class activation mapping), used by the localization endpoint; novelty says how unlike the training images an
    image is (a score above its threshold: "none of these").
    """

    def __init__(
        self, normalize: PixelNormalize, features: nn.Module, head: ClassifierHead, novelty: Novelty | None = None
    ) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head
        self.novelty = novelty

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(pixels))

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        """The pooled features (N, C) the head and the novelty score read."""
        return self.feature_map(pixels).mean(dim=(2, 3))

    def logits(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.head(self.pooled(pixels))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fmap = self.feature_map(pixels)
        pooled = fmap.mean(dim=(2, 3))
        probs = torch.softmax(self.head(pooled), dim=1)
        class_map = torch.softmax(self.head.forward_map(fmap), dim=1)
        if self.novelty is None:
            return probs, class_map
        return probs, class_map, self.novelty(pooled)


class MeanMaxPool(nn.Module):
    """(N, C, H, W) → (N, 2C): each channel's mean over the cells, then its maximum (a small object shows in one
    cell's maximum where the mean dilutes it)."""

    def forward(self, fmap: torch.Tensor) -> torch.Tensor:
        return torch.cat([fmap.mean(dim=(2, 3)), fmap.amax(dim=(2, 3))], dim=1)


#: the sharpness of log-sum-exp pooling: 0 would be the mean of the cells' logits, infinity their maximum
LSE_SHARPNESS = 4.0


def lse_pool(cell_logits: torch.Tensor, r: float = LSE_SHARPNESS) -> torch.Tensor:
    """(N, K, H, W) per-cell logits → (N, K): log(mean(exp(r·z))) / r over the cells (Pinheiro and Collobert's
    log-sum-exp pooling): near the maximum where one cell stands out (a small object), near the mean otherwise."""
    n, k = cell_logits.shape[:2]
    z = cell_logits.reshape(n, k, -1)
    return (torch.logsumexp(r * z, dim=2) - torch.log(torch.tensor(float(z.shape[2])))) / r


class MultiLabelClassifier(Classifier):
    """A :class:`Classifier` whose labels are independent: ``forward`` returns ``(probabilities (N, K), class_map
    (N, K, H, W))`` with a sigmoid per label (an image may hold several labels, or none), the class map the same
    head's per-cell sigmoid (class activation mapping per label). ``pooling`` "meanmax": the head reads each
    channel's mean and maximum over the cells (:class:`MeanMaxPool`); per cell, the cell's own features stand for
    both. ``pooling`` "lse": the head scores every cell and the image's logit is their :func:`lse_pool`. With a
    :class:`models.novelty.Novelty` score, ``novelty (N,)`` comes third, read from :meth:`pool`'s vectors."""

    def __init__(self, normalize, features, head, pooling: str = "mean", novelty: Novelty | None = None) -> None:
        super().__init__(normalize, features, head, novelty)
        self.pooling = pooling

    def pooled(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.pool(self.feature_map(pixels))

    def pool(self, fmap: torch.Tensor) -> torch.Tensor:
        return MeanMaxPool()(fmap) if self.pooling == "meanmax" else fmap.mean(dim=(2, 3))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, ...]:
        fmap = self.feature_map(pixels)
        cells = torch.cat([fmap, fmap], dim=1) if self.pooling == "meanmax" else fmap
        pooled = self.pool(fmap)
        if self.pooling == "lse":
            cell_logits = self.head.forward_map(cells)
            logits = lse_pool(cell_logits)
        else:
            logits, cell_logits = self.head.forward_with_map(pooled, cells)
        if self.novelty is None:
            return torch.sigmoid(logits), torch.sigmoid(cell_logits)
        return torch.sigmoid(logits), torch.sigmoid(cell_logits), self.novelty(pooled)


class Detector(nn.Module):
    """normalise → backbone features → detection head → decoded boxes.

    ``features`` and ``head`` are the multi-scale :class:`models.pyramid.Pyramid` and
    :class:`models.pyramid.PyramidHead` (the default), or the backbone's last map and a
    :class:`models.heads.GridHead`; either head's ``decode`` gives boxes and scores. ``forward`` returns
    ``(probabilities (N, K), boxes (N, M, 4), scores (N, M, K))`` for M predictors (the pyramid's cells at every
    stride, or S·S·B grid predictors): boxes are x1 y1 x2 y2 in input pixels, scores the class scores of each
    predictor, and ``probabilities`` the image-level score of each class (its best predictor), which is what
    `classify` answers for a detector.
    """

    def __init__(self, normalize: PixelNormalize, features: nn.Module, head: nn.Module, input_size: int) -> None:
        super().__init__()
        self.normalize = normalize
        self.features = features
        self.head = head
        self.input_size = input_size

    def feature_map(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.features(self.normalize(pixels))

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        boxes, scores = self.head.decode(self.head(self.feature_map(pixels)), self.input_size)
        return scores.amax(dim=1), boxes, scores
