"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import os
import platform
import sys
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
