"""The run directory: what training writes, and how evaluate/predict/export load it back."""

from __future__ import annotations

import io
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from models import Classifier, ClassifierHead, HeadConfig, PixelNormalize, build_backbone
from models.backbone import BackboneError
from service.errors import HeadstartError
from service.preprocess import PreprocessSpec

CONFIG = "config.yaml"
LABELS = "labels.json"
PREPROCESS = "preprocess.json"
AUGMENTATION = "augmentation.json"
DATA_REPORT = "data_report.json"
SPLITS = "splits.json"
HEAD = "head.safetensors"
BACKBONE_TAIL = "backbone.safetensors"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
METRICS = "metrics.json"
DONE = "DONE"
REQUIRED = (CONFIG, LABELS, PREPROCESS, HEAD, METRICS, DONE)


class RunError(HeadstartError, RuntimeError):
    """A run directory is missing, incomplete or inconsistent."""


def umask() -> int:
    """The process's umask (read by setting and restoring it: the only way POSIX offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(
            fd, 0o666 & ~umask()
        )  # mkstemp creates 0600; give the mode open() would, as the user's umask says
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def finish_run(run_dir: Path, metrics: dict) -> None:
    """Write metrics.json, then the DONE marker last: a run directory without DONE never counts as trained."""
    write_json(run_dir / METRICS, metrics)
    atomic_write_bytes(run_dir / DONE, b"ok\n")


def write_yaml(path: Path, data) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def save_torch(path: Path, obj) -> None:
    """torch.save atomically (checkpoints hold only tensors and plain values: loadable with weights_only=True)."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_safetensors(
    path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None
) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


@dataclass
class LoadedRun:
    run_dir: Path
    config: dict
    labels: list[str]
    spec: PreprocessSpec
    model: torch.nn.Module  # Classifier, or Detector for task: detect
    metrics: dict


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunError(
            f"Run directory {run_dir} does not exist. Train one with: headstart train DATA_DIR --out {run_dir}"
        )
    missing = [f for f in REQUIRED if not (run_dir / f).is_file()]
    if missing:
        raise RunError(
            f"Run directory {run_dir} is incomplete (missing {', '.join(missing)}): training did not finish. "
            f"Finish it with: headstart train DATA_DIR --out {run_dir} --resume"
        )


def load_run(run_dir: str | Path, weights: str | Path | None = None) -> LoadedRun:
    """Rebuild the trained classifier from a run directory (backbone weights are checked by content hash)."""
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    config = yaml.safe_load((run_dir / CONFIG).read_text())
    labels = json.loads((run_dir / LABELS).read_text())
    spec = PreprocessSpec.from_dict(json.loads((run_dir / PREPROCESS).read_text()))
    bb = config["backbone"]
    weights = weights or bb.get("weights_path")
    try:
        backbone = build_backbone(bb["name"], pretrained=bb["pretrained"], weights=weights)
    except BackboneError as exc:
        raise RunError(f"Cannot rebuild the backbone of {run_dir}: {exc}") from exc
    random_init = not bb["pretrained"] and not weights
    if not random_init and bb.get("weights_sha256") and backbone.weights_sha256 != bb["weights_sha256"]:
        raise RunError(
            f"The backbone weights differ from the ones this run was trained with (sha256 "
            f"{backbone.weights_sha256[:12]} != {bb['weights_sha256'][:12]}). Pass the original file with --weights."
        )
    tail_path = run_dir / BACKBONE_TAIL
    if random_init and not tail_path.is_file():
        raise RunError(f"{run_dir} was trained from random backbone weights but {BACKBONE_TAIL} is missing.")
    if tail_path.is_file():
        tail = load_safetensors(tail_path)
        result = backbone.features.load_state_dict(tail, strict=random_init)
        if result.unexpected_keys:
            raise RunError(f"{tail_path} has keys the backbone lacks: {result.unexpected_keys[:3]}")
    if config.get("task") == "detect":
        from training.detect import build_detector

        model = build_detector(config, spec, backbone.features, load_safetensors(run_dir / HEAD))
    else:
        head = ClassifierHead(HeadConfig(**config["head"]))
        head.load_state_dict(load_safetensors(run_dir / HEAD))
        model = Classifier(PixelNormalize(spec.mean, spec.std), backbone.features, head).eval()
    metrics = json.loads((run_dir / METRICS).read_text())
    return LoadedRun(run_dir, config, labels, spec, model, metrics)
