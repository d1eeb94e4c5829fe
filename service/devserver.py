"""Start `bentoml serve` of the headstart service: ``headstart serve`` (in this process, :func:`serve`) and the tests
and benchmarks (in a child process, :func:`serving`) start it the same way."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path


class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message ends with its log."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def command(host: str, port: int) -> list[str]:
    """The `bentoml serve` command line of the service, bound to ``host``:``port``."""
    service = "headstart.service.service:Headstart"  # the installed package: a service/ in the working dir is not ours
    return [sys.executable, "-m", "bentoml", "serve", service, "--host", host, "--port", str(port)]


def serve(model: str, host: str = "127.0.0.1", port: int = 3000, **env: str) -> None:
    """Become `bentoml serve` of ``model`` (its checks at start end it with one line when something is wrong)."""
    os.execve(sys.executable, command(host, port), {**os.environ, "HEADSTART_MODEL": model, **env})


def start(model: str, port: int, log: Path, host: str = "127.0.0.1", **env: str) -> subprocess.Popen:
    """`bentoml serve headstart.service.service:Headstart` on ``host``:``port`` with ``HEADSTART_MODEL=model`` and the
    extra environment ``env``; output goes to ``log``. Returns at once (see :func:`serving` to wait for ready)."""
    return subprocess.Popen(
        command(host, port),
        env={**os.environ, "HEADSTART_MODEL": model, **env},
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )


def wait_ready(proc: subprocess.Popen, url: str, log: Path, timeout: float = 90) -> None:
    import httpx

    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise ServerFailed(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise ServerFailed(f"server not ready after {timeout}s:\n{log.read_text()[-3000:]}")


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


@contextlib.contextmanager
def serving(model: str, log: Path, timeout: float = 90, **env: str) -> Iterator[tuple[str, subprocess.Popen, Path]]:
    """A ready server of ``model`` (bundle directory or store tag) on a free port, stopped when the block ends;
    yields (url, process, log)."""
    port = free_port()
    proc = start(model, port, log, **env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout)
        yield url, proc, log
    finally:
        stop(proc)
