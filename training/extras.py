"""Which of headstart's extras installs a library, and the error that says so when a command needs one that is missing.

``pip install headstart`` installs the serving code alone (``service/`` never imports torch); training, export,
evaluation and predicting with a run directory need the ``train`` extra, `headstart serve` the ``serve`` extra,
`headstart predict-batch` the ``scale`` extra, ``--log`` the ``track`` extra and HEIC photos the ``heif`` extra
(pyproject.toml). Without them a command ended in a traceback ending ``No module named 'torch'``, or, for `headstart
serve`, printed "serving ..." before its child process failed; now it says which extra to install, in one line.
Torch-free: imported by the command line before anything heavy.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
from collections.abc import Callable
from typing import Any, TypeVar

#: extra → {distribution (as pyproject.toml names it): the module it installs}; tests/test_packaging.py checks that
#: this lists every distribution of those extras in pyproject.toml
EXTRAS: dict[str, dict[str, str]] = {
    "train": {
        "torch": "torch",
        "torchvision": "torchvision",
        "timm": "timm",
        "albumentations": "albumentations",
        "safetensors": "safetensors",
        "matplotlib": "matplotlib",
        "tqdm": "tqdm",
        "onnx": "onnx",
        "ml_dtypes": "ml_dtypes",
        "onnxscript": "onnxscript",
        "torchmetrics": "torchmetrics",
        "pycocotools": "pycocotools",
    },
    "serve": {"bentoml": "bentoml", "python-multipart": "python_multipart"},
    "scale": {"ray": "ray"},
    "track": {
        "tensorboard": "tensorboard",
        "mlflow-skinny": "mlflow",
        "sqlalchemy": "sqlalchemy",
        "alembic": "alembic",
    },
    "heif": {"pillow-heif": "pillow_heif"},
}

#: extra → what needs it, for the message
USES = {
    "train": "training, export, evaluation and predicting with a run directory",
    "serve": "serving (headstart serve) and the BentoML model store",
    "scale": "batch prediction on Ray (headstart predict-batch)",
    "track": "experiment tracking (--log tensorboard,mlflow)",
    "heif": "HEIC photos",
}

_EXTRA_OF = {module: extra for extra, modules in EXTRAS.items() for module in modules.values()}

F = TypeVar("F", bound=Callable[..., Any])


class MissingExtra(ModuleNotFoundError):
    """A library that one of headstart's extras installs is not installed; the message says which extra."""


def message(module: str) -> str:
    """What to say where ``module`` (a top-level module an extra installs) is missing."""
    extra = _EXTRA_OF[module]
    return (
        f"{module} is not installed in this Python ({sys.executable}). headstart's {extra!r} extra installs it, "
        f'for {USES[extra]}: pip install "headstart[{extra}]" (in a checkout of headstart: pip install -e '
        f'".[{extra}]"; bash .ci/setup installs every extra).'
    )


def missing_extra(exc: ModuleNotFoundError) -> MissingExtra | None:
    """The :class:`MissingExtra` that explains ``exc``, or None where it is not an extra's library that is missing
    (another module, or a library that is installed but fails to import one of its own parts: a broken install is
    not called missing)."""
    if isinstance(exc, MissingExtra):
        return exc
    top = (exc.name or "").partition(".")[0]
    if top not in _EXTRA_OF or _installed(top):
        return None
    missing = MissingExtra(message(top), name=top)
    missing.__cause__ = exc
    return missing


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a module whose import failed half-way, or that sys.modules blocks
        return False


def require(*modules: str, otherwise: str = "") -> None:
    """Raise :class:`MissingExtra` for the first of ``modules`` (each installed by an extra) that is not installed,
    before any work that would need it; ``otherwise``: what the user can do instead, added to the message."""
    for module in modules:
        if not _installed(module):
            raise MissingExtra(f"{message(module)} {otherwise}".strip(), name=module)


def explained(fn: F) -> F:
    """``fn`` raising :class:`MissingExtra` (a ModuleNotFoundError saying which extra to install) where a library
    of an extra is missing; any other error unchanged."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ModuleNotFoundError as exc:
            missing = missing_extra(exc)
            if missing is None or missing is exc:
                raise
            raise missing from exc

    return wrapper  # type: ignore[return-value]
