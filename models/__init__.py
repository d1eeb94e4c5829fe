"""Network definitions: backbone factory, heads, the novelty score and the exportable wrapper (torch, timm)."""

from headstart.models.backbone import Backbone, BackboneError, build_backbone
from headstart.models.heads import ClassifierHead, HeadConfig
from headstart.models.novelty import Novelty, NoveltyConfig, feature_bank
from headstart.models.wrapper import Classifier, MeanMaxPool, MultiLabelClassifier, PixelNormalize, lse_pool

__all__ = [
    "Backbone",
    "BackboneError",
    "Classifier",
    "ClassifierHead",
    "HeadConfig",
    "MeanMaxPool",
    "MultiLabelClassifier",
    "Novelty",
    "NoveltyConfig",
    "PixelNormalize",
    "build_backbone",
    "feature_bank",
    "lse_pool",
]
