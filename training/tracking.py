"""Experiment tracking: a run's options, per-epoch losses and metrics, final metrics, plots and exported bundle in
TensorBoard and/or MLflow (``headstart train --log tensorboard,mlflow``, or ``HEADSTART_LOG``; off unless asked).

- TensorBoard (``pip install tensorboard``, the ``track`` extra): event files in ``RUN_DIR/tensorboard`` (``tensorboard
  --logdir runs/``): one scalar per history column and epoch, the final metrics at the last step, the options as
  text, the plots as images.
- MLflow (``pip install mlflow-skinny sqlalchemy alembic``, the ``track`` extra): ``MLFLOW_TRACKING_URI`` (a server,
  or a database), else ``sqlite:///mlflow.db`` in the working directory with artifacts beside it in ``mlartifacts/``
  (MLflow 3 no longer writes its ``./mlruns`` file store); experiment ``MLFLOW_EXPERIMENT_NAME``, else "headstart".
  The options as parameters, the history as step metrics, the final metrics, the plots and ``metrics.json`` as
  artifacts, the run directory as the tag ``headstart.run_dir``. The MLflow run's id is kept in
  ``RUN_DIR/mlflow.json``: ``--resume`` continues the same MLflow run, and ``headstart export`` adds the bundle to it.

A tracker that cannot be imported is refused before training starts, with the install command; a tracker failing
mid-run is logged as a warning and switched off: tracking never costs the run.
"""

from __future__ import annotations

import contextvars
import json
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

log = logging.getLogger("headstart")

TRACKERS = ("tensorboard", "mlflow")
INSTALL = {
    "tensorboard": "pip install tensorboard (or headstart[track])",
    "mlflow": "pip install mlflow-skinny sqlalchemy alembic (or headstart[track])",
}
MLFLOW_RUN = "mlflow.json"
_ACTIVE: contextvars.ContextVar[list | None] = contextvars.ContextVar("headstart_trackers", default=None)


def parse(spec: str | None) -> list[str]:
    """``--log`` (else ``HEADSTART_LOG``) as tracker names, each importable; a ValueError names what to do."""
    spec = spec if spec else os.environ.get("HEADSTART_LOG", "")
    names = [n.strip().lower() for n in spec.split(",") if n.strip()]
    for name in names:
        if name not in TRACKERS:
            raise ValueError(f"--log {name!r}: use {', '.join(TRACKERS)} or both, comma-separated.")
        try:
            __import__("torch.utils.tensorboard" if name == "tensorboard" else "mlflow")
            if name == "mlflow":
                __import__("sqlalchemy")
        except ImportError as exc:
            raise ValueError(f"--log {name} needs {INSTALL[name]} ({exc}).") from None
    return list(dict.fromkeys(names))


def _numbers(row: dict, prefix: str = "") -> dict[str, float]:
    """The numeric leaves of ``row`` (nested dicts joined with "/"), as floats."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out |= _numbers(value, f"{prefix}{key}/")
        elif isinstance(value, int | float) and not isinstance(value, bool) and value == value:  # not NaN
            out[f"{prefix}{key}"] = float(value)
    return out


class TensorBoard:
    def __init__(self, run_dir: Path, options: dict, task: str) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"))
        self.writer.add_text("options", "\n".join(f"    {k}: {v}" for k, v in sorted(options.items())))
        self.writer.add_text("task", task)
        self.step = 0

    def epoch(self, row: dict) -> None:
        self.step = int(row.get("epoch", self.step + 1))
        for key, value in _numbers({k: v for k, v in row.items() if k != "epoch"}).items():
            self.writer.add_scalar(key, value, self.step)

    def finish(self, run_dir: Path, metrics: dict) -> None:
        import numpy as np
        from PIL import Image

        for key, value in _numbers(metrics).items():
            self.writer.add_scalar(f"final/{key}", value, self.step)
        for plot in sorted(run_dir.glob("*.png")):
            with Image.open(plot) as img:
                self.writer.add_image(plot.stem, np.asarray(img.convert("RGB")), self.step, dataformats="HWC")
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def mlflow_uri() -> str:
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path('mlflow.db').resolve()}"


def artifacts_beside(uri: str) -> str | None:
    """For a local sqlite store (``sqlite:///PATH``), the folder ``mlartifacts`` beside its database file; else None
    (the tracking server chooses)."""
    if not uri.startswith("sqlite:///"):
        return None
    return str(Path(uri.removeprefix("sqlite:///")).resolve().parent / "mlartifacts")


class MLflow:
    def __init__(self, run_dir: Path, options: dict, task: str) -> None:
        import mlflow

        self.mlflow = mlflow
        record = run_dir / MLFLOW_RUN
        previous = json.loads(record.read_text()) if record.is_file() else None
        mlflow.set_tracking_uri(previous["tracking_uri"] if previous else mlflow_uri())
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME", "headstart")
        experiment = mlflow.get_experiment_by_name(name)
        if experiment is None:  # a local store keeps its artifacts beside the database, not in ./mlruns
            mlflow.create_experiment(name, artifact_location=artifacts_beside(mlflow.get_tracking_uri()))
        mlflow.set_experiment(name)
        if previous:  # --resume: the same MLflow run goes on
            self.run = mlflow.start_run(run_id=previous["run_id"])
        else:
            self.run = mlflow.start_run(run_name=run_dir.name)
        if previous is None:
            mlflow.log_params({k: str(v)[:500] for k, v in options.items()})
        mlflow.set_tags({"headstart.run_dir": str(run_dir.resolve()), "headstart.task": task})
        record.write_text(json.dumps({"tracking_uri": mlflow.get_tracking_uri(), "run_id": self.run.info.run_id}))

    def epoch(self, row: dict) -> None:
        step = int(row.get("epoch", 0))
        metrics = {k.replace("/", "."): v for k, v in _numbers({k: v for k, v in row.items() if k != "epoch"}).items()}
        self.mlflow.log_metrics(metrics, step=step)

    def finish(self, run_dir: Path, metrics: dict) -> None:
        self.mlflow.log_metrics({f"final.{k.replace('/', '.')}": v for k, v in _numbers(metrics).items()})
        for path in [*sorted(run_dir.glob("*.png")), run_dir / "metrics.json"]:
            if path.is_file():
                self.mlflow.log_artifact(str(path))

    def close(self) -> None:
        self.mlflow.end_run()


@contextmanager
def tracking(names: list[str], run_dir: Path, options: dict, task: str) -> Iterator[list]:
    """The trackers named, active for the block (:func:`log_epoch` and :func:`log_finish` reach them)."""
    trackers = []
    for name in names:
        trackers.append((TensorBoard if name == "tensorboard" else MLflow)(run_dir, options, task))
        log.info("logging to %s%s", name, f" ({mlflow_uri()})" if name == "mlflow" else f" ({run_dir / name})")
    token = _ACTIVE.set(trackers)
    try:
        yield trackers
    finally:
        _ACTIVE.reset(token)
        for tracker in trackers:
            _safely(tracker, "close")


def _safely(tracker, method: str, *args: Any) -> None:
    try:
        getattr(tracker, method)(*args)
    except Exception as exc:  # tracking never costs the run
        log.warning(
            "%s tracking failed in %s (%s: %s); the run goes on",
            type(tracker).__name__,
            method,
            type(exc).__name__,
            exc,
        )


def log_epoch(row: dict) -> None:
    """A history row (one epoch of one phase) to the active trackers, if any."""
    for tracker in _ACTIVE.get() or ():
        _safely(tracker, "epoch", row)


def log_finish(run_dir: Path, metrics: dict) -> None:
    for tracker in _ACTIVE.get() or ():
        _safely(tracker, "finish", run_dir, metrics)


def log_bundle(run_dir: Path, bundle_dir: Path) -> None:
    """Add an exported bundle to the MLflow run that trained ``run_dir`` (when it was tracked)."""
    record = Path(run_dir) / MLFLOW_RUN
    if not record.is_file():
        return
    try:
        from mlflow.tracking import MlflowClient

        info = json.loads(record.read_text())
        MlflowClient(info["tracking_uri"]).log_artifacts(info["run_id"], str(bundle_dir), artifact_path="bundle")
        log.info("bundle added to MLflow run %s", info["run_id"])
    except Exception as exc:
        log.warning("could not add the bundle to the MLflow run (%s: %s)", type(exc).__name__, exc)
