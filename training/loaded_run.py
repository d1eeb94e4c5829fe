"""A finished run directory back as a model: the backbone rebuilt and verified by content hash, the head loaded."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from headstart import runs
from headstart.models import build_backbone
from headstart.models.backbone import BackboneError
from headstart.runs import RunError
from headstart.service.contract import RunRecord
from headstart.service.preprocess import PreprocessSpec
from headstart.tasks import task_named


@dataclass
class LoadedRun:
    run_dir: Path
    record: RunRecord
    labels: list[str]
    spec: PreprocessSpec
    model: torch.nn.Module  # the task's whole model: Classifier, or Detector
    metrics: dict
    #: (the folder the data set was trained from, where it is now) when it moved (`headstart export --data`)
    data_moved: tuple[Path, Path] | None = None

    @property
    def task(self) -> str:
        return self.record.task


def load_run(run_dir: str | Path, weights: str | Path | None = None) -> LoadedRun:
    """Rebuild the trained model of a run directory (``weights``: the backbone file, if it moved since training)."""
    run_dir = Path(run_dir)
    runs.check_run_dir(run_dir)
    record = runs.read_record(run_dir)
    try:
        task = task_named(record.task)
    except ValueError as exc:
        raise RunError(f"{run_dir} was trained by another headstart: {exc}") from exc
    labels = json.loads((run_dir / runs.LABELS).read_text())
    spec = PreprocessSpec.from_dict(json.loads((run_dir / runs.PREPROCESS).read_text()))
    bb = record.backbone
    weights = weights or bb.weights_path
    try:
        backbone = build_backbone(bb.name, pretrained=bb.pretrained, weights=weights)
    except BackboneError as exc:
        raise RunError(f"Cannot rebuild the backbone of {run_dir}: {exc}") from exc
    random_init = not bb.pretrained and not weights
    if not random_init and bb.weights_sha256 and backbone.weights_sha256 != bb.weights_sha256:
        raise RunError(
            f"The backbone weights differ from the ones this run was trained with (sha256 "
            f"{backbone.weights_sha256[:12]} != {bb.weights_sha256[:12]}). Pass the original file with --weights."
        )
    tail_path = run_dir / runs.BACKBONE_TAIL
    if random_init and not tail_path.is_file():
        raise RunError(f"{run_dir} was trained from random backbone weights but {runs.BACKBONE_TAIL} is missing.")
    if tail_path.is_file():
        result = backbone.features.load_state_dict(runs.load_safetensors(tail_path), strict=random_init)
        if result.unexpected_keys:
            raise RunError(f"{tail_path} has keys the backbone lacks: {result.unexpected_keys[:3]}")
    head_state = runs.load_safetensors(run_dir / runs.HEAD)
    model = task.build_model(record, spec, backbone.features, head_state, run_dir).eval()
    metrics = json.loads((run_dir / runs.METRICS).read_text())
    return LoadedRun(run_dir, record, labels, spec, model, metrics)
