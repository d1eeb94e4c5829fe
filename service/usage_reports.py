"""The usage reports of the libraries headstart runs on: off in headstart's processes unless the user turned one on.

Measured with the versions pyproject.toml installs (a process that loads a bundle, ``HOME`` empty, no CI variable):

- ONNX Runtime (1.32: telemetry on Linux and macOS too) writes a device id and a queue of events into
  ``~/.cache/Microsoft/DeveloperTools/.onnxruntime`` and uploads them to Microsoft: the executable's path, the OS, the
  CPU model, the container type, the process's name, the execution providers. Off: ``ORT_DISABLE_TELEMETRY=1``,
  read once, when ONNX Runtime starts.
- OpenVINO imports its model converter (``openvino.tools.ovc``) with itself, and the converter sends Intel a usage
  event through Google Analytics (a process forked for it; on a machine without internet access it waits out its
  timeout) and writes ``~/intel/openvino_ga_cid`` and ``~/intel/stats``, unless ``~/intel/openvino_telemetry`` says
  ``0``. headstart never converts a model (OpenVINO reads the ONNX files), so its processes load OpenVINO without the
  converter, unless that file says ``1`` (the user said yes to Intel's question).
- BentoML sends usage events to t.bentoml.com. Off: ``BENTOML_DO_NOT_TRACK=True``.
- MLflow (``--log mlflow``) sends usage events to mlflow.org. Off: ``MLFLOW_DISABLE_TELEMETRY=true``.
- albumentations asks pypi.org for a newer version of itself at every import (a 2 s timeout, and a warning on every
  offline run). Off: ``NO_ALBUMENTATIONS_UPDATE=1``.

Ray sends nothing from the local instance ``predict-batch`` starts (its own rule for ``ray.init()``); a cluster that
``--ray-address`` joins keeps its owner's setting. A variable the user set is left as it is: setting one to the
library's "on" value turns its reports back on.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The libraries' own switches, as headstart sets them where the user has not.
OFF = {
    "ORT_DISABLE_TELEMETRY": "1",
    "BENTOML_DO_NOT_TRACK": "True",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "NO_ALBUMENTATIONS_UPDATE": "1",
}

#: What OpenVINO imports with itself and headstart never uses: the model converter, which sends the usage event.
OPENVINO_CONVERTER = "openvino.tools.ovc"


def turn_off(openvino_converter: bool = False) -> None:
    """Set :data:`OFF`'s switches the user has not set. With ``openvino_converter``, for a process headstart owns (its
    command, the service, a batch actor): OpenVINO, when it is imported, comes without its converter, unless the user
    opted in to Intel's reports (:func:`openvino_opted_in`); a process that imported OpenVINO already keeps it as it
    is. Call it before the libraries are imported: ONNX Runtime reads its switch once."""
    for name, value in OFF.items():
        os.environ.setdefault(name, value)
    if openvino_converter and "openvino" not in sys.modules and not openvino_opted_in():
        # an entry of None makes the import fail with ImportError, which openvino/__init__.py passes over
        sys.modules.setdefault(OPENVINO_CONVERTER, None)  # type: ignore[arg-type]


def openvino_opted_in(home: Path | None = None) -> bool:
    """Whether OpenVINO's consent file (``~/intel/openvino_telemetry``, where its opt-in/opt-out script writes) says
    yes."""
    try:
        return ((home or Path.home()) / "intel" / "openvino_telemetry").read_text(errors="replace").strip() == "1"
    except (OSError, RuntimeError):  # no such file; no home directory
        return False
