"""Helpers shared by the benchmark scripts."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))
MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet.pth"


def train_args(data: str | Path, out: str | Path, cache: str | Path) -> list[str]:
    """`headstart train`'s arguments as the README's main jobs give them (the shared MobileNetV2)."""
    args = ["train", str(data), "--out", str(out), "--cache-dir", str(cache)]
    return [*args, "--backbone", "torchvision:mobilenet_v2", "--weights", str(MOBILENET), "--no-progress"]


def run_headstart(args: list[str], where: dict | None = None, tree: bool = False) -> tuple[float, float, bytes]:
    """`headstart ARGS` in a new process (``where``: :func:`code_of`'s, the code of another commit): wall seconds,
    peak resident MB and its stdout. The peak is that process's own (``os.wait4``'s ``ru_maxrss``), not the largest
    of every child so far; with ``tree``, the largest sum of the resident memory of the process and all its
    descendants (Ray's raylet and workers for `predict-batch`), read every 0.1 s (psutil). A failure raises with
    the end of its stderr."""
    with tempfile.TemporaryFile() as stdout, tempfile.TemporaryFile() as stderr:
        started = time.perf_counter()
        child = subprocess.Popen(
            [sys.executable, "-m", "headstart", *args], **(where or {}), stdout=stdout, stderr=stderr
        )
        together = _tree_peak(child) if tree else 0
        _, status, usage = os.wait4(child.pid, 0)
        seconds = time.perf_counter() - started
        stdout.seek(0), stderr.seek(0)
        if os.waitstatus_to_exitcode(status):
            raise RuntimeError(f"headstart {args[0]} failed: {stderr.read().decode(errors='replace')[-3000:]}")
        return seconds, max(usage.ru_maxrss * 1024, together) / 2**20, stdout.read()


def _tree_peak(child: subprocess.Popen) -> int:
    """The largest sum of resident bytes of ``child`` and its descendants, polled until it exits (not reaped)."""
    import psutil

    peak, root = 0, psutil.Process(child.pid)
    while True:
        try:
            if root.status() == psutil.STATUS_ZOMBIE:
                return peak
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return peak
        total = 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):  # gone meanwhile
                total += proc.memory_info().rss
        peak = max(peak, total)
        time.sleep(0.1)


def train_hymenoptera(out: str | Path, **options) -> Path:
    """The run of the README's main job (the hymenoptera photos, the shared ImageNet MobileNetV2, the defaults)
    trained into ``out``; ``options`` as :class:`headstart.tasks.ClassifyConfig` takes them (e.g. ``cache_dir``)."""
    from headstart.tasks import ClassifyConfig, train

    cfg = ClassifyConfig(
        data_dir=str(SHARED / "data" / "hymenoptera"),
        out=str(out),
        backbone="torchvision:mobilenet_v2",
        weights=str(MOBILENET),
        progress=False,
        **options,
    )
    return Path(train(cfg))


def code_of(rev: str, tmp: Path) -> dict:
    """``subprocess`` arguments (``env``, ``cwd``) under which a Python process imports ``headstart`` as commit
    ``rev`` has it (a benchmark's baseline in the same run): the commit's files (``git archive``), its root the
    current folder, laid out as the installed package (``training/`` is ``headstart``, ``service/`` and ``models/``
    its subpackages) in a folder first on ``PYTHONPATH``. A git worktree alone is not enough: the editable install
    maps ``headstart`` to this checkout whatever the current folder, so a worktree's process runs today's code.
    Checked: a process so started must load the commit's files."""
    src, pkg = tmp / f"code-{rev}", tmp / f"package-{rev}"
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", rev], capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(src, filter="data")
    pkg.mkdir()
    (pkg / "headstart").symlink_to(src / "training", target_is_directory=True)
    for sub in ("service", "models"):
        (src / "training" / sub).symlink_to(src / sub, target_is_directory=True)
    paths = [str(pkg), os.environ.get("PYTHONPATH", "")]
    where = {"env": {**os.environ, "PYTHONPATH": os.pathsep.join(paths).rstrip(os.pathsep)}, "cwd": str(src)}
    probe = "import headstart, headstart.service, headstart.models as m; print(headstart.__file__, m.__file__)"
    loaded = subprocess.run([sys.executable, "-c", probe], **where, capture_output=True, text=True)
    if loaded.returncode:
        raise RuntimeError(f"the code of {rev} does not import: {loaded.stderr[-2000:]}")
    if any(not f.startswith(str(pkg)) for f in loaded.stdout.split()):
        raise RuntimeError(f"the code of {rev} is not what a process loads: {loaded.stdout.strip()}")
    return where


def codes(baseline: str | None, tmp: Path) -> dict[str, dict | None]:
    """The codes a benchmark compares, by name: "today" (this checkout, ``None``) and, given ``baseline``, that
    commit's (:func:`code_of`'s subprocess arguments)."""
    return {"today": None, **({baseline: code_of(baseline, Path(tmp))} if baseline else {})}


def alternate_headstart(
    rounds: int, who: dict[str, dict | None], args_of: Callable[[str, int], list[str]], tree: bool = False
) -> dict[str, list[tuple[float, float, bytes]]]:
    """`headstart ARGS` with each code of ``who`` (:func:`codes`) in turn, ``rounds`` times (``args_of(name,
    round)``: ARGS): each code's runs, :func:`run_headstart`'s (wall seconds, peak MB, stdout; ``tree``: its
    peak of all the processes together), a line printed each."""
    runs: dict[str, list[tuple[float, float, bytes]]] = {name: [] for name in who}
    for r in range(rounds):
        for name, where in who.items():
            seconds, peak, stdout = run_headstart(args_of(name, r), where, tree)
            runs[name].append((seconds, peak, stdout))
            print(f"round {r + 1}, {name}: {seconds:.1f} s, peak {peak:.0f} MB", flush=True)
    return runs


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
