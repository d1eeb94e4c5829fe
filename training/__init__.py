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
from typing import TYPE_CHECKING, Any

from headstart.service import usage_reports

# the libraries' usage reports and albumentations' check for a newer version of itself (a request to pypi.org at each
# import, a warning on every offline run) off unless the user turns them on: service/usage_reports.py
usage_reports.turn_off()

if TYPE_CHECKING:
    from headstart.api import Answer, Bundle, LoadedModel, Run, Server, evaluate, export, load, serve, train

__all__ = ["Answer", "Bundle", "LoadedModel", "Run", "Server", "evaluate", "export", "load", "serve", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module("headstart.api"), name)
    raise AttributeError(f"module 'headstart' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
