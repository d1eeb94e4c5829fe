"""Start `bentoml serve` of the headstart service: ``headstart serve`` (in this process, :func:`serve`) and the tests
and benchmarks (in a child process, :func:`serving`) start it the same way."""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from .errors import HeadstartError


class ServerFailed(RuntimeError):
    """The server exited or did not become ready; the message ends with its log."""


class PortUnavailable(HeadstartError):
    """The server could not listen where it was asked to; the message says why and what to do."""


def check_port(host: str, port: int) -> None:
    """Refuse at once an address the server could not listen on: bentoml would end in a traceback of its own
    (``OSError: [Errno 98] Address already in use``), and a caller waiting for ``/readyz`` could be answered by the
    other server on that port. Bound as the server binds (``SO_REUSEADDR``: a port a stopped server left in
    TIME_WAIT is free), and let go at once."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise PortUnavailable(
                    f"Port {port} on {host} is in use by another process (another headstart serve?): stop it, or "
                    "serve on another port (--port, port=)."
                ) from None
            if exc.errno == errno.EACCES:
                raise PortUnavailable(
                    f"Listening on port {port} is not allowed to this user (ports below 1024 need root): use a "
                    "port of 1024 or more (--port, port=)."
                ) from None
            if isinstance(exc, socket.gaierror):
                raise PortUnavailable(
                    f"--host {host} is not a name this machine can resolve ({exc.strerror}): give an address, "
                    "127.0.0.1 (this machine only) or 0.0.0.0 (every interface)."
                ) from None
            if exc.errno == errno.EADDRNOTAVAIL:
                raise PortUnavailable(
                    f"--host {host} is not an address of this machine: use 127.0.0.1 (this machine only), 0.0.0.0 "
                    "(every interface) or one of its own addresses."
                ) from None
            raise PortUnavailable(f"Cannot listen on {host}:{port}: {exc.strerror or exc}.") from None


def bentoml_home() -> Path:
    """BentoML's home (its model store is ``models/`` in it), where BentoML puts it: ``$BENTOML_HOME``, else
    ``~/bentoml``; found without starting BentoML."""
    home = os.environ.get("BENTOML_HOME", os.path.join(os.path.expanduser("~"), "bentoml"))
    return Path(os.path.expandvars(home))


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
