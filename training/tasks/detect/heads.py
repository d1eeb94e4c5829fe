"""The detector's two heads (``--head``), each in one place: what it reads from the backbone, its config, how it is
fitted and rebuilt, and what its exported outputs hold. The task asks :data:`HEADS` instead of comparing names.

- ``pyramid`` (default): the frozen backbone at strides 8, 16 and 32 through a light FPN + PAN neck into one dense
  anchor-free head (``models/pyramid.py``), trained on mosaic views among others (``pyramid_loss.py``).
- ``grid``: the first detector, a YOLO-style grid head on the backbone's last (stride-32) map (``models/heads.py``,
  ``grid_loss.py``).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from headstart.models import Backbone
from headstart.models.heads import GridHead, GridHeadConfig
from headstart.models.pyramid import STRIDES, FlatPyramid, Pyramid, PyramidHead, PyramidHeadConfig
from headstart.service.preprocess import PreprocessSpec
from headstart.tasks.base import FeatureLayout, Job


def _output(net: nn.Module, spec: PreprocessSpec) -> torch.Tensor:
    """What ``net`` makes of one input: its shape is what is cached per view."""
    with torch.no_grad():
        return net(torch.zeros(1, 3, spec.input_size, spec.input_size))


class DetectionHead:
    """What differs between the detector's heads."""

    name = ""
    #: whether training views may be mosaics (``--mosaic``)
    mosaic = False

    def feature_net(self, backbone: Backbone) -> nn.Module:
        """What the cached features are (after pixel normalisation)."""
        return backbone.features

    def layout(self, backbone: Backbone, net: nn.Module, spec: PreprocessSpec) -> FeatureLayout:
        """The backbone's last map, in float16, with the views' boxes cached beside it."""
        grid = list(_output(net, spec).shape[2:])
        return FeatureLayout(
            shape=(backbone.num_features, *grid),
            pool=False,
            feature_map=grid,
            dtype=np.float16,
            extras=("targets",),
            channels=(backbone.num_features,),
        )

    def config(self, cfg, layout: FeatureLayout, labels: list[str]):
        raise NotImplementedError

    def fit(self, job: Job, head_cfg) -> nn.Module:
        raise NotImplementedError

    def rebuild(self, head: dict, features: nn.Module) -> tuple[nn.Module, nn.Module]:
        """(the head, the backbone features it reads) of a run's record ``head``, before its weights are loaded."""
        raise NotImplementedError

    def predictors(self, head: dict, feature_map: list[int]) -> tuple[int, str, str]:
        """(how many predictors the exported graph has, where they are, what their score means)."""
        raise NotImplementedError


class PyramidDetectionHead(DetectionHead):
    name = "pyramid"
    mosaic = True

    def feature_net(self, backbone: Backbone) -> nn.Module:
        return FlatPyramid(Pyramid(backbone.features))  # the three levels flattened into one cached vector

    def layout(self, backbone, net, spec) -> FeatureLayout:
        """The three levels flattened, in float16; the record keeps the stride-32 grid as the feature map."""
        return FeatureLayout(
            shape=(_output(net, spec).shape[1],),
            pool=False,
            feature_map=[spec.input_size // 32] * 2,
            dtype=np.float16,
            extras=("targets",),
            channels=net[-1].pyramid.channels,
        )

    def config(self, cfg, layout, labels) -> PyramidHeadConfig:
        return PyramidHeadConfig(layout.channels, len(labels), cfg.input_size, STRIDES, cfg.width, cfg.dropout)

    def fit(self, job, head_cfg) -> PyramidHead:
        from headstart.tasks.detect.fit import fit_pyramid

        return fit_pyramid(job, head_cfg)

    def rebuild(self, head, features):
        cfg = PyramidHeadConfig.from_dict(head)
        return PyramidHead(cfg), Pyramid(features, cfg.strides)

    def predictors(self, head, feature_map):
        cfg = PyramidHeadConfig.from_dict(head)
        where = " + ".join(f"{h}x{w} cells at stride {s}" for (h, w), s in zip(cfg.sizes, cfg.strides, strict=True))
        return cfg.num_predictors, where, "class score (trained towards the box's IoU with its object)"


class GridDetectionHead(DetectionHead):
    name = "grid"

    def config(self, cfg, layout, labels) -> GridHeadConfig:
        return GridHeadConfig(layout.channels[0], len(labels), cfg.boxes_per_cell, cfg.hidden, cfg.dropout)

    def fit(self, job, head_cfg) -> GridHead:
        from headstart.tasks.detect.fit import fit_grid

        return fit_grid(job, head_cfg)

    def rebuild(self, head, features):
        return GridHead(GridHeadConfig.from_dict(head)), features

    def predictors(self, head, feature_map):
        rows, cols = feature_map
        where = f"{rows}x{cols} cells x {head['boxes_per_cell']} boxes"
        return rows * cols * head["boxes_per_cell"], where, "objectness x class probability"


HEADS: dict[str, DetectionHead] = {h.name: h for h in (PyramidDetectionHead(), GridDetectionHead())}


def recorded_head(head: dict) -> DetectionHead:
    """The head a run's record (or a manifest) describes; records written before the pyramid are grid heads."""
    return HEADS[head.get("kind", "grid")]
