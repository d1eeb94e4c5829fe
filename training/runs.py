"""The run directory: its files, written atomically, and its record (config.yaml) through the contract."""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import yaml

from headstart.service.contract import ContractError, RunRecord
from headstart.service.errors import HeadstartError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

CONFIG = "config.yaml"
LABELS = "labels.json"
PREPROCESS = "preprocess.json"
AUGMENTATION = "augmentation.json"
DATA_REPORT = "data_report.json"
SPLITS = "splits.json"
HEAD = "head.safetensors"
BACKBONE_TAIL = "backbone.safetensors"
CHECKPOINT = "checkpoint.pt"
HISTORY = "history.json"
METRICS = "metrics.json"
DONE = "DONE"
REQUIRED = (CONFIG, LABELS, PREPROCESS, HEAD, METRICS, DONE)


class RunError(HeadstartError, RuntimeError):
    """A run directory is missing, incomplete or inconsistent."""


def umask() -> int:
    """The process's umask (read by setting and restoring it: the only way POSIX offers)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def written_beside(out: Path) -> Iterator[Path]:
    """A new folder beside ``out`` to write a whole output into (a bundle, a converted data set): on success it
    becomes ``out`` (an existing ``out`` swapped out only after the move succeeded: :func:`replace_dir`), on failure
    it is removed; ``out`` is never left half written. Its mode is the one mkdir would give (mkdtemp's is 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        tmp.chmod(0o777 & ~umask())
        yield tmp
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_dir(new: Path, target: Path) -> None:
    """Move ``new`` to ``target``; an existing ``target`` is swapped out only after the move succeeded."""
    if target.exists():
        old = target.with_name(f".{target.name}.old-{secrets.token_hex(3)}")
        target.rename(old)
        try:
            new.rename(target)
        except BaseException:
            old.rename(target)
            raise
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink()
    else:
        new.rename(target)


def unwritable(folder: Path) -> str | None:
    """Why ``folder`` (made if missing) cannot take a file, or None when it can: tried with a small write, as a
    home folder that is missing or read-only (a container's) stops a command only when it first writes there."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}-{secrets.token_hex(4)}.tmp"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def stand_in(kind: str) -> Path | None:
    """A folder of this user's in the temporary folder (``headstart-KIND-UID``, the same from run to run), made, for
    a library whose own folder cannot be written; None where it cannot be written either."""
    user = os.getuid() if hasattr(os, "getuid") else os.environ.get("USERNAME", "user")
    folder = Path(tempfile.gettempdir()) / f"headstart-{kind}-{user}"
    return None if unwritable(folder) else folder


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~umask())  # mkstemp creates 0600; give the mode open() would, as the user's umask says
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, data) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=False, default=str) + "\n").encode())


def finish_run(run_dir: Path, metrics: dict) -> None:
    """Write metrics.json, then the DONE marker last: a run directory without DONE never counts as trained."""
    write_json(run_dir / METRICS, metrics)
    atomic_write_bytes(run_dir / DONE, b"ok\n")


def write_yaml(path: Path, data) -> None:
    atomic_write_bytes(path, yaml.safe_dump(data, sort_keys=False).encode())


def save_torch(path: Path, obj) -> None:
    """torch.save atomically (checkpoints hold only tensors and plain values: loadable with weights_only=True)."""
    import torch  # here: reading a run's record (`headstart compare`, the data scan) needs no torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def save_safetensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, metadata=metadata)
    atomic_write_bytes(path, data)


def load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def _keep_exported_bundle(run_dir: Path) -> None:
    """Before --overwrite empties a run directory: move the bundle `headstart export` wrote inside it (RUN/bundle)
    beside the run, as RUN.bundle-TIMESTAMP, and say so: an exported, verified model is not thrown away unasked."""
    bundle = run_dir / "bundle"
    if not (bundle / "manifest.json").is_file():
        return
    kept = run_dir.parent / f"{run_dir.name}.bundle-{time.strftime('%Y%m%d-%H%M%S')}"
    bundle.rename(kept)
    log.warning("--overwrite: the bundle exported from the old run was moved to %s (delete it if not needed)", kept)


def prepare_run_dir(run_dir: Path, result_options: dict, *, resume: bool, overwrite: bool) -> None:
    """Create the run directory; an existing non-empty one only with ``overwrite`` (emptied) or ``resume`` (the
    options that determine the result must equal the interrupted run's)."""
    if run_dir.exists() and any(run_dir.iterdir()):
        if overwrite:
            _keep_exported_bundle(run_dir)
            shutil.rmtree(run_dir)
        elif resume:
            if (run_dir / CONFIG).exists():
                old = read_record(run_dir).options
                changed = {k: (old.get(k), v) for k, v in result_options.items() if old.get(k) != v}
                if changed:
                    raise RunError(
                        f"--resume with different options than the interrupted run: {changed} (old, new). "
                        "Use the same options, or --overwrite to start again."
                    )
        else:
            raise RunError(
                f"Run directory {run_dir} already exists. Use --resume to continue it or --overwrite to replace it."
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def write_record(run_dir: Path, record: RunRecord) -> None:
    write_yaml(run_dir / CONFIG, record.to_dict())


def read_record(run_dir: Path) -> RunRecord:
    """The run's config.yaml through the contract (refused, naming the version, if written by another schema)."""
    path = run_dir / CONFIG
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RunError(f"Cannot read {path}: {exc}. Retrain the run.") from exc
    try:
        return RunRecord.from_dict(data, source=str(path))
    except ContractError as exc:
        raise RunError(str(exc)) from exc


def check_run_dir(run_dir: Path) -> None:
    if not run_dir.is_dir():
        raise RunError(
            f"Run directory {run_dir} does not exist. Train one with: headstart train DATA_DIR --out {run_dir}"
        )
    missing = [f for f in REQUIRED if not (run_dir / f).is_file()]
    if missing:
        raise RunError(
            f"Run directory {run_dir} is incomplete (missing {', '.join(missing)}): training did not finish. "
            f"Finish it with: headstart train DATA_DIR --out {run_dir} --resume"
        )
