"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))


def machine_line() -> str:
    import torch

    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), python {sys.version.split()[0]}"
    )


def _cpu_times() -> tuple[int, int]:
    with open("/proc/stat") as fh:
        values = [int(v) for v in fh.readline().split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return sum(values) - idle, sum(values)


def check_idle(limit: float = 0.15, seconds: float = 1.0) -> float:
    """Busy fraction of all cores over ``seconds`` while this process sleeps; warns above ``limit``.

    With 2 cores, OpenMP busy-waiting makes torch collapse whenever another process runs, so a benchmark taken on a
    busy machine is flagged rather than trusted.
    """
    import time

    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    busy = (busy1 - busy0) / max(total1 - total0, 1)
    if busy > limit:
        print(
            f"WARNING: the CPU is {busy:.0%} busy with other work; timings are unreliable. Rerun when idle."
        )
    return busy


@contextlib.contextmanager
def running_server(model: str, workdir: Path, **env: str):
    """`bentoml serve` of the headstart service with ``model`` on a free loopback port, until the block ends.

    Yields (url, process, log path); exits with the server log if it does not become ready.
    """
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = Path(workdir) / "server.log"
    cmd = [sys.executable, "-m", "bentoml", "serve", "service.service:Headstart", "--host", "127.0.0.1", "--port",
           str(port)]  # fmt: skip
    proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ, "HEADSTART_MODEL": model, **env},
                            stdout=log.open("w"), stderr=subprocess.STDOUT)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        for _ in range(180):
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if proc.poll() is not None:
                break
            time.sleep(0.5)
        else:
            sys.exit(f"server did not start:\n{log.read_text()[-2000:]}")
        if proc.poll() is not None:
            sys.exit(f"server exited:\n{log.read_text()[-2000:]}")
        yield url, proc, log
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (bentoml serve runs the service in child processes)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
