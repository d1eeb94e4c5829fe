"""The tasks the engine trains. A task is one small module: its config and what differs from the others."""

from __future__ import annotations

from pathlib import Path

from training.tasks.classify import ClassifyConfig, ClassifyTask
from training.tasks.detect import DetectConfig, DetectTask

TASKS = {"classify": ClassifyTask(), "detect": DetectTask()}

__all__ = ["TASKS", "ClassifyConfig", "ClassifyTask", "DetectConfig", "DetectTask", "task_for_data", "task_named"]


def task_named(name: str):
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; headstart knows {', '.join(TASKS)}.")
    return TASKS[name]


def task_for_data(data_dir: str | Path):
    """The task a data set asks for: detection for a YOLO-format data set (a data.yaml), else classification."""
    from training.detect_data import find_data_yaml

    return TASKS["detect"] if find_data_yaml(data_dir) is not None else TASKS["classify"]


def train(cfg, report=None) -> Path:
    """Train ``cfg`` (a task's config) with the engine; returns the run directory."""
    from training.engine import train as run_engine

    return run_engine(task_named(cfg.task), cfg, report)
