"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))


def machine_line(torch: bool = True) -> str:
    """Where a benchmark ran: the CPU (model and the extensions that decide the kernels: AMX, AVX-512 BF16/VNNI,
    AVX2), python, and torch with its threads (``torch=False`` for the scripts that do not load it)."""
    from headstart.service.cpu import cpu_info

    line = f"{cpu_info().summary()}; python {sys.version.split()[0]}"
    if torch:
        import torch as _torch

        line += f", torch {_torch.__version__} ({_torch.get_num_threads()} threads)"
    return line


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

    busy0, total0 = _cpu_times()
    time.sleep(seconds)
    busy1, total1 = _cpu_times()
    busy = (busy1 - busy0) / max(total1 - total0, 1)
    if busy > limit:
        print(f"WARNING: the CPU is {busy:.0%} busy with other work; timings are unreliable. Rerun when idle.")
    return busy


@contextlib.contextmanager
def running_server(model: str, workdir: Path, **env: str):
    """`bentoml serve` of the headstart service with ``model`` on a free loopback port, until the block ends
    (``service.devserver``, the helper the tests use). Yields (url, process, log path); exits with the server log if
    it does not become ready."""
    from headstart.service.devserver import ServerFailed, serving

    try:
        with serving(model, Path(workdir) / "server.log", timeout=90, **env) as running:
            yield running
    except ServerFailed as exc:
        sys.exit(str(exc))


def rss_mib(pid: int) -> float:
    """Resident memory of a process and its children (bentoml serve runs the service in child processes)."""
    import psutil

    proc = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [proc, *proc.children(recursive=True)]) / 2**20
