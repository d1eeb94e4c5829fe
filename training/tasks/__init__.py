"""The tasks the engine trains. A task is one small module: its config and what differs from the others."""

from __future__ import annotations

from pathlib import Path

from training.config import ClassifyConfig, DetectConfig
from training.engine import train as run_engine
from training.tasks.classify import ClassifyTask
from training.tasks.detect import DetectTask

TASKS = {"classify": ClassifyTask(), "detect": DetectTask()}

__all__ = ["TASKS", "ClassifyConfig", "ClassifyTask", "DetectConfig", "DetectTask", "task_named", "train"]


def task_named(name: str):
    if name not in TASKS:
        raise ValueError(f"Unknown task {name!r}; headstart knows {', '.join(TASKS)}.")
    return TASKS[name]


def train(cfg, report=None) -> Path:
    """Train ``cfg`` (a task's config from training/config.py) with the engine; returns the run directory.
    ``report`` (the task's scanned data set) replaces the scan, e.g. to fix the split."""
    return run_engine(task_named(cfg.task), cfg, report)
