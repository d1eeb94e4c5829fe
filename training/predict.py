"""A trained run's PyTorch model on image files, through the serving preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from headstart.models import Classifier
from headstart.onnx_io import batch_for
from headstart.service.inference import outputs_of_batches, outputs_of_files
from headstart.service.preprocess import PreprocessSpec
from headstart.service.runtime import in_even_parts

if TYPE_CHECKING:
    from headstart.onnx_io import CheckImages

#: pixels per forward pass of a torch model on CPU, 8 images of 224 px (1 of 512 px, a detector's): the MobileNetV2
#: classifier computes 79.5 images/s at 8 and 31.4 at 32 (2-core AMD EPYC: at 32 its activations outgrow the
#: caches), the same bits (benchmarks/RESULTS.md, "Export")
CPU_BATCH_PIXELS = 8 * 224 * 224


@torch.inference_mode()
def predict_paths(
    model: Classifier, paths: Sequence[Path], spec: PreprocessSpec, batch_size: int | None = None
) -> np.ndarray:
    """Class probabilities (N, K) in fp32 for image files, preprocessed exactly as the service does."""
    model.eval()
    device = next(model.parameters()).device
    if not paths:
        return np.zeros((0, model.head.cfg.num_classes), np.float32)

    def probabilities(pixels: np.ndarray) -> list[np.ndarray]:
        return [torch.softmax(model.logits(torch.from_numpy(pixels).to(device)), dim=1).cpu().numpy()]

    return outputs_of_files(probabilities, paths, spec, batch_size or batch_for(spec, CPU_BATCH_PIXELS))[0]


@torch.inference_mode()
def torch_outputs(model: torch.nn.Module, images: CheckImages) -> list[np.ndarray]:
    """Every output of a torch model on an export's check images (preprocessed as the service does),
    concatenated."""
    model.eval()
    return outputs_of_batches(lambda px: [o.numpy() for o in model(torch.from_numpy(px))], images.batches())


class RunModel:
    """A trained run (:class:`training.loaded_run.LoadedRun`) as a :class:`service.contract.Model`, so
    `headstart predict` answers for a run directory through the service's own code paths."""

    def __init__(self, run) -> None:
        from headstart.tasks import task_named

        self.model = run.model.eval()
        self.spec = run.spec
        self.labels = run.labels
        self.task = run.task
        self.feature_map = list(run.record.backbone.feature_map)
        outputs = task_named(run.task).export.outputs(run)
        self.output_names = [o["name"] for o in outputs]
        novelty = getattr(run.model, "novelty", None)
        self.open_set = None if novelty is None else novelty.config.to_dict()
        self.thresholds = run.metrics.get("thresholds")  # a multi-label run's

    @torch.inference_mode()
    def run(self, pixels: np.ndarray, names: Sequence[str] | None = None) -> list[np.ndarray]:
        """The outputs ``names`` (default all), :data:`CPU_BATCH_PIXELS` at a time in even parts, as a bundle's
        session splits a batch (:func:`service.runtime.in_even_parts`)."""

        def forward(part: np.ndarray) -> list[np.ndarray]:
            return [output.numpy() for output in self.model(torch.from_numpy(part))]

        outputs = in_even_parts(forward, pixels, batch_for(self.spec, CPU_BATCH_PIXELS))
        named = dict(zip(self.output_names, outputs, strict=True))
        return [named[name] for name in names or self.output_names]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(pixels)[0]
