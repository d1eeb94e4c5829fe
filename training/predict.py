"""A trained run's PyTorch model on image files, through the serving preprocessing."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from models import Classifier
from service.preprocess import PreprocessSpec, load_batches


@torch.inference_mode()
def predict_paths(
    model: Classifier, paths: Sequence[Path], spec: PreprocessSpec, batch_size: int = 32
) -> np.ndarray:
    """Class probabilities (N, K) in fp32 for image files, preprocessed exactly as the service does."""
    model.eval()
    device = next(model.parameters()).device
    out = []
    for pixels in load_batches(paths, spec, batch_size):
        out.append(torch.softmax(model.logits(torch.from_numpy(pixels).to(device)), dim=1).cpu().numpy())
    k = model.head.cfg.num_classes
    return np.concatenate(out) if out else np.zeros((0, k), np.float32)


class RunModel:
    """A trained run (:class:`training.load.LoadedRun`) as a :class:`service.contract.Model`, so `headstart predict`
    answers for a run directory through the service's own code paths."""

    def __init__(self, run) -> None:
        self.model = run.model.eval()
        self.spec = run.spec
        self.labels = run.labels
        self.task = run.task
        self.feature_map = list(run.record.backbone.feature_map)

    @torch.inference_mode()
    def run(self, pixels: np.ndarray) -> list[np.ndarray]:
        return [out.numpy() for out in self.model(torch.from_numpy(pixels))]

    def predict(self, pixels: np.ndarray) -> np.ndarray:
        return self.run(pixels)[0]
