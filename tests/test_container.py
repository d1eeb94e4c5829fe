"""Containers: the CPU bento built into an image, run and checked from outside (.ci/container_check.py, with Debian's
podman), and the GPU bento's Dockerfile, which cannot be run here (no CUDA base image, no GPU), checked as written."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow  # these build bentos of the real hymenoptera classifier


def build_bento(tag: str, bentofile: str, tmp_path) -> tarfile.TarFile:
    env = {**os.environ, "HEADSTART_MODEL": tag}
    built = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "-f", bentofile, "-o", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stdout + built.stderr
    bento = built.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    archive = tmp_path / f"{bento.replace(':', '-')}.bento"
    subprocess.run([sys.executable, "-m", "bentoml", "export", bento, str(archive)], env=env, check=True, timeout=300)
    return tarfile.open(archive)


def read(tar: tarfile.TarFile, name: str) -> str:
    return tar.extractfile(name).read().decode()


def test_the_cpu_dockerfile_builds_on_python_slim_without_a_compiler(hymenoptera_bundle, tmp_path):
    with build_bento(hymenoptera_bundle.tag, "bentofile.yaml", tmp_path) as tar:
        dockerfile = read(tar, "./env/docker/Dockerfile")
        requirements = read(tar, "./env/python/requirements.txt")
    assert re.search(r"^FROM python:3\.11-slim\b", dockerfile, re.M)
    assert "apt-get" not in dockerfile and "build-essential" not in dockerfile and "git" not in dockerfile.split()
    assert "USER bentoml" in dockerfile and "HEADSTART_DEVICE=cpu" in dockerfile
    assert "openvino" in requirements and "torch" not in requirements


def test_the_gpu_bento_is_a_cuda_image_with_onnxruntime_gpu_and_no_torch_or_openvino(hymenoptera_bundle, tmp_path):
    with build_bento(hymenoptera_bundle.tag, "bentofile.gpu.yaml", tmp_path) as tar:
        dockerfile = read(tar, "./env/docker/Dockerfile")
        requirements = read(tar, "./env/python/requirements.txt")
    assert re.search(r"^FROM nvidia/cuda:\S+-runtime-\S+", dockerfile, re.M), dockerfile[:500]
    assert re.search(r"^ENV HEADSTART_DEVICE=\$HEADSTART_DEVICE", dockerfile, re.M)
    assert "ARG HEADSTART_DEVICE=cuda" in dockerfile  # the service then refuses to start unless CUDA is used
    packages = {re.split(r"[<>=\[ ]", line, maxsplit=1)[0] for line in requirements.splitlines() if line.strip()}
    assert "onnxruntime-gpu" in packages and not packages & {"torch", "torchvision", "openvino", "onnxruntime"}


def container_check_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "the container check runs rootful podman: run the tests as root"
    missing = [t for t in ("podman", "runc", "mmdebstrap") if shutil.which(t) is None]
    if missing:
        return f"{', '.join(missing)} not installed (Debian: apt-get install podman runc mmdebstrap; .ci/setup does)"
    return None


def test_the_cpu_image_runs_and_answers_as_the_checkout(hymenoptera_bundle, tmp_path):
    """The whole container check (.ci/container_check.py): base image, build, run, the answers of /classify and
    /localize on the shared photos equal to `bentoml serve` from the checkout's, /info, a non-root user, no torch,
    a clean stop on SIGTERM within 10 s, the font the labels are drawn in, and nothing left behind; the image under
    700 MB."""
    why = container_check_unavailable()
    if why:
        if os.environ.get("CI"):
            pytest.fail(f"CI must check the container: {why}")
        pytest.skip(why)
    report_path = tmp_path / "report.json"
    done = subprocess.run(
        [
            sys.executable,
            str(ROOT / ".ci" / "container_check.py"),
            "--model",
            hymenoptera_bundle.tag,
            "--json",
            str(report_path),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    report = json.loads(report_path.read_text())
    assert report["problems"] == [] and report["differences"] == []
    assert report["photos"] >= 9 and report["uid"] != 0 and not report["torch_installed"] and report["label_font"]
    assert report["exit_code"] == 0 and report["stop_seconds"] <= 10
    assert report["info"]["name"] == "ants-bees" and report["info"]["device"] == "cpu"
    assert report["image_mb"] < 700
