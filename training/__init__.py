"""headstart: give image classifiers a head start (installed from this folder, training/, as the ``headstart``
package; service/ is ``headstart.service`` and models/ ``headstart.models``: pyproject.toml).

The Python API mirrors the command line (:mod:`headstart.api`)::

    import headstart

    run = headstart.train("data/ants-bees", out="runs/ants-bees")
    bundle = run.export()
    answers = headstart.load(bundle.tag).predict("photo.jpg")

Importing ``headstart`` imports nothing heavy: torch comes with training, a runtime with a model, on first use.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING, Any

# albumentations (the training augmentations) asks pypi.org for a newer version of itself each time it is imported
# (a 2 s timeout), and prints a warning on every offline run (`Error fetching version info ... name resolution`).
# headstart pins it (pyproject.toml); set NO_ALBUMENTATIONS_UPDATE=0 to have the check.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

if TYPE_CHECKING:
    from headstart.api import Answer, Bundle, LoadedModel, Run, Server, evaluate, export, load, serve, train

__all__ = ["Answer", "Bundle", "LoadedModel", "Run", "Server", "evaluate", "export", "load", "serve", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("headstart.api"), name)
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
