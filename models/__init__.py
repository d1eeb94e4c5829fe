"""Network definitions: backbone factory, heads, and the exportable wrapper. Imports torch, timm, torchvision."""

from models.backbone import Backbone, BackboneError, build_backbone
from models.heads import ClassifierHead, HeadConfig
from models.wrapper import Classifier, PixelNormalize

__all__ = [
    "Backbone",
    "BackboneError",
    "Classifier",
    "ClassifierHead",
    "HeadConfig",
    "PixelNormalize",
    "build_backbone",
]
