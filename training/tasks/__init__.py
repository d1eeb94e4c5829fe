"""The tasks headstart trains, one folder each, and their registry.

A task is a folder ``training/tasks/NAME/``: ``config.py`` (its options, torch-free: the command line is built from
them), ``task.py`` (``TASK``, a :class:`training.tasks.base.Task` with its ``export`` side) and whatever else it
needs (data scan, augmentation, fitting, losses, metrics and plots, export checks). To add one, write the folder and
add its config to :data:`CONFIGS`; the engine, the command line, export and serving ask this registry (and the
bundle's manifest), never a task's name.

Torch-free: a task's ``task.py`` is imported on first use (:func:`task_named`), so `headstart --help` and the
torch-free commands stay quick.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from headstart.config import RunConfig
from headstart.tasks.classify.config import ClassifyConfig
from headstart.tasks.detect.config import DetectConfig
from headstart.tasks.multilabel.config import MultiLabelConfig

#: every task's config by task name: one line per task
CONFIGS: dict[str, type[RunConfig]] = {
    config.task: config for config in (ClassifyConfig, DetectConfig, MultiLabelConfig)
}
#: the task of a data set that no task claims (:meth:`training.config.RunConfig.claims`)
DEFAULT_TASK = "classify"

__all__ = [
    "CONFIGS",
    "DEFAULT_TASK",
    "ClassifyConfig",
    "DetectConfig",
    "MultiLabelConfig",
    "config_for_data",
    "task_named",
    "train",
]


def task_named(name: str):
    """The task (``TASK`` of ``training/tasks/NAME/task.py``) registered as ``name``."""
    if name not in CONFIGS:
        raise ValueError(f"Unknown task {name!r}; headstart knows {', '.join(CONFIGS)}.")
    return importlib.import_module(f"{__name__}.{name}.task").TASK


def config_for_data(data_dir: str | Path, task: str | None = None) -> type[RunConfig]:
    """The config of the task ``data_dir`` is for: ``task`` where given (``--task``: a YOLO data set can train a
    detector or a multi-label classifier), else the one task that claims it, else :data:`DEFAULT_TASK`."""
    if task is not None:
        if task not in CONFIGS:
            raise ValueError(f"Unknown task {task!r}; headstart knows {', '.join(CONFIGS)}.")
        return CONFIGS[task]
    claimed = [config for config in CONFIGS.values() if config.claims(str(data_dir))]
    if len(claimed) > 1:
        raise ValueError(
            f"{data_dir} could be data for {' or '.join(c.task for c in claimed)}: "
            f"{'; '.join(c.data_kind for c in claimed)}. "
            f"Say which with --task {' or --task '.join(c.task for c in claimed)}."
        )
    return claimed[0] if claimed else CONFIGS[DEFAULT_TASK]


def train(cfg: RunConfig, report=None) -> Path:
    """Train ``cfg`` (a task's config) with the engine; returns the run directory. ``report`` (the task's scanned
    data set) replaces the scan, e.g. to fix the split."""
    from headstart.engine import train as run_engine

    return run_engine(task_named(cfg.task), cfg, report)
