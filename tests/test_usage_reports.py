"""headstart's processes (the command, `bentoml serve` of the service) write and send no usage reports of the libraries
they run on, unless the user turns one on (service/usage_reports.py)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from headstart.service import usage_reports

from .conftest import serving, synthetic_image
from .images import BEE

#: What the libraries read as "this is a CI job" (and then report nothing by themselves), and their own switches:
#: left out of the processes started here, so that what they do is headstart's doing.
CI_VARIABLES = ("CI", "GITHUB_ACTIONS", "GITLAB_CI", "CIRCLECI", "TF_BUILD", "JENKINS_URL", "TRAVIS")
LIBRARIES_OWN = (*CI_VARIABLES, *usage_reports.OFF)
#: Where ONNX Runtime (its device id, its queue of events) and OpenVINO (its client id, its count) write in a home.
REPORT_DIRS = (".cache/Microsoft", "intel")


def reports(home: Path) -> list[str]:
    return sorted(str(p.relative_to(home)) for d in REPORT_DIRS for p in (home / d).rglob("*") if p.is_file())


def clean_env(home: Path, **env: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in LIBRARIES_OWN and k != "XDG_CACHE_HOME"}
    # should a report still go, it fails here at once and never leaves the machine
    return {**out, "HOME": str(home), "https_proxy": "http://127.0.0.1:9", "HTTPS_PROXY": "http://127.0.0.1:9", **env}


def test_the_command_writes_and_sends_no_usage_reports_unless_the_user_turns_them_on(tiny_bundle, tmp_path):
    image = tmp_path / "one.png"
    synthetic_image(0, np.random.default_rng(0)).save(image)

    def predict(home: Path, runtime: str, **env: str) -> list[str]:
        home.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "headstart", "predict", str(tiny_bundle.bundle_dir), str(image)]
        done = subprocess.run(
            [*cmd, "--runtime", runtime], env=clean_env(home, **env), capture_output=True, text=True, timeout=120
        )
        assert done.returncode == 0, done.stderr
        return reports(home)

    for runtime in ("openvino", "onnxruntime"):
        assert predict(tmp_path / f"home-{runtime}", runtime) == [], runtime
    # the user's own switches win: ONNX Runtime's variable set to 0, and a yes in OpenVINO's consent file
    home = tmp_path / "home-on"
    (home / "intel").mkdir(parents=True)
    (home / "intel" / "openvino_telemetry").write_text("1\n")
    written = predict(home, "openvino", ORT_DISABLE_TELEMETRY="0")
    assert ".cache/Microsoft/DeveloperTools/.onnxruntime/deviceid" in written, written
    assert "intel/openvino_ga_cid" in written, written


@pytest.mark.slow
def test_the_service_writes_and_sends_no_usage_reports(tiny_bundle, tmp_path, monkeypatch):
    import httpx

    home = tmp_path / "home"
    home.mkdir()
    for name, value in clean_env(home).items():
        monkeypatch.setenv(name, value)
    for name in set(os.environ) - set(clean_env(home)):
        monkeypatch.delenv(name)
    with serving(str(tiny_bundle.bundle_dir), tmp_path / "server.log") as (url, _, _):
        answer = httpx.post(f"{url}/classify", files={"image": ("bee.jpg", BEE.read_bytes(), "image/jpeg")}, timeout=60)
        assert answer.status_code == 200, answer.text
    assert reports(home) == []


def test_the_switches_the_user_set_are_kept(monkeypatch, tmp_path):
    for name in usage_reports.OFF:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("BENTOML_DO_NOT_TRACK", "False")
    usage_reports.turn_off()
    assert os.environ["BENTOML_DO_NOT_TRACK"] == "False"
    assert all(os.environ[name] == value for name, value in usage_reports.OFF.items() if name != "BENTOML_DO_NOT_TRACK")
    consent = tmp_path / "intel" / "openvino_telemetry"
    assert not usage_reports.openvino_opted_in(tmp_path)  # no file: OpenVINO's own default would report
    consent.parent.mkdir()
    for text, yes in (("1\n", True), ("0", False), ("", False), ("yes", False)):
        consent.write_text(text)
        assert usage_reports.openvino_opted_in(tmp_path) == yes, text
