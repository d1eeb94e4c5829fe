"""How unlike the training images an image is: the open-set score computed inside the exported graph.

:class:`Novelty` holds a bank of the training images' frozen features, L2-normalised and stored in float16, and
scores an image by the mean cosine distance from its pooled features to their ``k`` nearest bank entries (0: the
same direction as a training image, 1: orthogonal to all of them). It is part of the model, so ONNX Runtime,
OpenVINO, the int8 file and batch prediction all compute the score with no code of their own, and no torch.

Why this score (``benchmarks/open_set.py``, hymenoptera against photos of other things, the same frozen features):
it separated the two better than the softmax's top probability, the energy score and the Mahalanobis distance.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class NoveltyConfig:
    """The score and its decision: ``k`` nearest bank entries; an image whose score exceeds ``threshold`` is
    "none of these". ``threshold`` was set to keep ``kept_rate`` of the validation images, each of the model's own
    classes (``calibration`` says on how many)."""

    k: int
    threshold: float
    kept_rate: float
    score: str = "knn-cosine"
    calibration: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> NoveltyConfig:
        return cls(**{k: data[k] for k in ("k", "threshold", "kept_rate", "score", "calibration") if k in data})


def normalise(features: torch.Tensor) -> torch.Tensor:
    """Each row scaled to unit length (a zero row stays zero)."""
    return features / features.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def feature_bank(features: torch.Tensor) -> torch.Tensor:
    """Training features (M, C) as a bank: each row normalised, in float16 (what :class:`Novelty` holds)."""
    return normalise(features.float()).half()


class Novelty(nn.Module):
    """Pooled features (N, C) → novelty (N,): 1 - the mean cosine similarity to the ``config.k`` nearest rows of
    ``bank`` (a :func:`feature_bank`). ``config`` travels with the module: the score's record and its threshold."""

    def __init__(self, bank: torch.Tensor, config: NoveltyConfig) -> None:
        super().__init__()
        if bank.ndim != 2 or len(bank) < 1:
            raise ValueError(f"the feature bank must be (M, C) with M >= 1, got {tuple(bank.shape)}")
        self.config = config
        self.k = max(1, min(int(config.k), len(bank)))
        # held transposed, (C, M): the exported graph multiplies by it with no transpose at run time
        self.register_buffer("bank_t", bank.half().T.contiguous())

    @property
    def bank(self) -> torch.Tensor:
        """The bank as (M, C) float16 rows."""
        return self.bank_t.T

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        similarity = normalise(pooled.float()) @ self.bank_t.float()
        return 1.0 - similarity.topk(self.k, dim=1).values.mean(dim=1)
