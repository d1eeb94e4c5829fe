"""`headstart export`: a self-describing, verified ONNX bundle (+ optional int8), imported into the BentoML store.

Nothing is reported as exported before it is verified: the ONNX checker passes, ONNX Runtime agrees with PyTorch on
real validation images (100% top-1 agreement for fp32), and for int8 the accuracy drop stays within the limit. The
bundle is written to a temporary directory and moved into place only then, so a failure leaves nothing half-written
and a previous bundle untouched.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
import secrets
import shutil
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import numpy as np
import torch

from headstart import runs, tracking
from headstart.extras import require
from headstart.loaded_run import LoadedRun, load_run
from headstart.onnx_io import (
    INPUT_NAME,
    CheckImages,
    ExportError,
    embed_manifest,
    export_onnx,
    quantize_int8,
)
from headstart.runtime_checks import runtime_checks
from headstart.service.bundle import MANIFEST, MODEL_FP32, MODEL_INT8, load_bundle, sha256_file
from headstart.service.contract import Manifest
from headstart.service.cpu import INT8_WEIGHT_BITS, INT8_WEIGHT_BITS_CHOICES
from headstart.service.runtime import openvino_available
from headstart.tasks import task_named
from headstart.tasks.base import TaskExport

log = logging.getLogger("headstart")

MAX_CHECK_IMAGES = 200
MAX_CALIBRATION_IMAGES = 128
#: outputs computed in fp32 in the int8 file too: the novelty score's one small matrix product gains no speed in int8
KEEP_FP32 = ("novelty",)


@dataclass
class ExportResult:
    bundle_dir: Path
    manifest: Manifest
    tag: str | None


def model_name(text: str) -> str:
    """A BentoML-safe model name: lower-case letters, digits, '-', '_' and '.'."""
    name = re.sub(r"[^a-z0-9_.-]+", "-", text.lower()).strip("-._")
    if not name:
        raise ExportError(f"Cannot make a model name from {text!r}; pass --name (letters, digits, '-', '_', '.').")
    return name


def _split_paths(run: LoadedRun, split: str, limit: int) -> tuple[list[Path], list]:
    """At most ``limit`` images of a split of the run (evenly spread), and the second column of splits.json for each
    (what the task's :meth:`training.tasks.base.Task.split_row` wrote: a class index, a box count, ...); each where
    the data set is now (:func:`data_moved`)."""
    items = json.loads((run.run_dir / runs.SPLITS).read_text()).get(split, [])
    if len(items) > limit:
        items = [items[i] for i in np.linspace(0, len(items) - 1, limit).round().astype(int)]
    moved = run.data_moved
    paths = [Path(p) if moved is None else _moved(Path(p), *moved) for p, *_ in items]
    missing = [p for p in paths if not p.is_file()]
    if missing:
        if moved is not None:
            raise ExportError(
                f"{len(missing)} {split} images of the run are not where --data puts them (e.g. {missing[0]}). Give "
                f"the folder the run was trained from ({moved[0]}), wherever it is now."
            )
        raise ExportError(
            f"{len(missing)} {split} images of the run are gone (e.g. {missing[0]}); export verifies on them. "
            "Restore the data set, give its new place (--data DIR), or retrain."
        )
    return paths, [row[1] if len(row) > 1 else None for row in items]


def data_moved(run: LoadedRun, data: str | os.PathLike) -> LoadedRun:
    """``run`` with its data set at ``data`` (`headstart export --data`: moved since training, or on another
    machine): each image it recorded is looked for at the same place relative to the folder it was trained from
    (that folder, or the one holding its data.yaml or labels CSV; ``data`` names the folder or that file), and the
    record's data.yaml and CSV with them (a detector's boxes are read beside its images)."""
    new = Path(data).resolve()
    if not new.exists():
        raise ExportError(f"--data {data} does not exist: give the data set's folder (or its data.yaml / labels CSV).")
    recorded = run.record.data
    named = Path(recorded.get("yaml") or recorded.get("source") or recorded["root"])  # a data.yaml, a CSV, a folder
    old = named.parent if named.suffix.lower() in (".yaml", ".yml", ".csv") else named
    anchors = (old, new.parent if new.is_file() else new)
    moved = {k: str(_moved(Path(v), *anchors)) if k in ("root", "yaml", "source") else v for k, v in recorded.items()}
    return dataclasses.replace(run, record=dataclasses.replace(run.record, data=moved), data_moved=anchors)


def _moved(path: Path, old: Path, new: Path) -> Path:
    """``path`` at the place under ``new`` that it had under ``old`` (``..`` allowed: a data.yaml's ``path: ..``)."""
    return Path(os.path.normpath(new / os.path.relpath(path, old)))


def _int8_model(
    run: LoadedRun,
    task: TaskExport,
    fp32: Path,
    path: Path,
    reference,
    images: CheckImages,
    val_targets,
    max_drop: float | None,
    weight_bits: int,
) -> dict:
    """Quantize to ``path`` (weights in ``weight_bits``), calibrated on training images; the task measures it on the
    validation images against the fp32 model (classifier: accuracy; detector: AP50). Losing more than ``max_drop``
    (None: no limit) removes the int8 file and returns None: the verified fp32 bundle is still written, and the log
    says why int8 was not kept."""
    import onnxruntime as ort

    from headstart.service.cpu import cpu_info  # at call time: tests stand in another CPU

    if weight_bits == 8 and cpu_info().int8_saturates:
        log.warning(
            "int8 weights in 8 bits saturate on this CPU (x86 without VNNI): the int8 checks here measure that, and "
            "the service warns where it serves the file on such a CPU. Serve it on CPUs with VNNI or AMX, or export "
            "with 7-bit weights (the default)."
        )
    train_paths, _ = _split_paths(run, "train", MAX_CALIBRATION_IMAGES)
    quantize_int8(fp32, path, train_paths, run.spec, keep_fp32=KEEP_FP32, weight_bits=weight_bits)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    quality = task.int8_quality(run, reference, session, images, val_targets)
    metric, drop = quality["metric"], quality["drop"]
    info = {
        "calibration_images": len(train_paths),
        **quality,
        "scheme": f"static QDQ, per-channel int8 weights in {weight_bits} bits, uint8 activations (MinMax calibration)",
        "weight_bits": weight_bits,
    }
    before, after = quality[f"{metric}_fp32"], quality[f"{metric}_int8"]
    log.info("int8: %s %.4f vs fp32 %.4f (drop %.2f points)", metric, after, before, 100 * drop)
    if max_drop is not None and drop > max_drop:
        changed = round(drop * len(images)) if metric == "accuracy" else None
        what = f"{changed} of {len(images)} validation images" if changed is not None else "the validation images"
        log.warning(
            "int8 not kept: it loses %.1f %s points on %s (%.4f -> %.4f), more than the %.0f-point limit; the fp32 "
            "bundle is written. Pass --force to keep int8 anyway.",
            100 * drop,
            metric,
            what,
            before,
            after,
            100 * max_drop,
        )
        path.unlink()
        return None
    return info


def _manifest(
    run: LoadedRun, name: str, version: str, verification: dict, int8_info: dict | None, runtimes: dict
) -> Manifest:
    """The bundle's manifest (less the file hashes, added once the files are final)."""
    import onnxruntime as ort

    task, fmap = task_named(run.task).export, list(run.record.backbone.feature_map)
    bb = run.record.backbone
    return Manifest(
        name=name,
        version=version,
        task=run.task,
        labels=tuple(run.labels),
        backbone={"name": bb.name, "weights": bb.weights, "weights_sha256": bb.weights_sha256, "feature_map": fmap},
        head=run.record.head,
        preprocess=run.spec,
        input={
            "name": INPUT_NAME,
            "shape": ["batch", 3, run.spec.input_size, run.spec.input_size],
            "dtype": "float32",
            "range": [0, 255],
            "color": "RGB",
        },
        outputs=tuple(task.outputs(run)),
        metrics={k: run.metrics[k] for k in task.manifest_metrics if k in run.metrics},
        verification=verification,
        int8=int8_info,
        runtimes=runtimes,
        open_set=None if getattr(run.model, "novelty", None) is None else run.model.novelty.config.to_dict(),
        thresholds=run.metrics.get("thresholds"),
        created=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        headstart={"version": _version(), "torch": str(torch.__version__), "onnxruntime": ort.__version__},
    )


def export_bundle(
    run_dir: str | Path,
    out: str | Path | None = None,
    *,
    int8: bool = False,
    force: bool = False,
    name: str | None = None,
    store: bool = True,
    weights: str | None = None,
    max_int8_drop: float = 0.01,
    int8_weight_bits: int = INT8_WEIGHT_BITS,
    data: str | os.PathLike | None = None,
) -> ExportResult:
    """Export, verify and (optionally) import a run into the BentoML model store. Returns the bundle.
    ``int8_weight_bits``: 7 (the default: no CPU saturates on the file) or 8 (closer to fp32, for CPUs with VNNI or
    AMX only). ``data``: where the run's data set is now, if it moved since training (the checks run on its
    validation images, int8 is calibrated on its training images)."""
    if int8_weight_bits not in INT8_WEIGHT_BITS_CHOICES:
        raise ExportError(f"--int8-weight-bits must be 7 or 8, not {int8_weight_bits!r}.")
    if int8_weight_bits != INT8_WEIGHT_BITS and not int8:
        raise ExportError("--int8-weight-bits is for the int8 model: add --int8.")
    if store:  # before the work: the bundle was written and verified, then thrown away for want of the store
        require("bentoml", otherwise="Or export with --no-store (store=False): the bundle alone, served by its folder.")
        from headstart.service.devserver import bentoml_home

        models = bentoml_home() / "models"
        why = runs.unwritable(models)
        if why:
            raise ExportError(
                f"The BentoML model store {models} cannot be written: {why}. Set BENTOML_HOME to a "
                "folder this user can write, or export with --no-store (store=False): the bundle alone, served by its "
                "folder."
            )
    run = load_run(run_dir, weights=weights)
    if data is not None:
        run = data_moved(run, data)
    task = task_named(run.task).export
    if int8 and not task.int8:
        raise ExportError(f"--int8 is not available for {run.task} models; export without --int8.")
    out = Path(out) if out else run.run_dir / "bundle"
    check_destination(out, run.run_dir, force)
    name = model_name(name or run.run_dir.resolve().name)
    version = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d%H%M%S") + secrets.token_hex(3)
    with runs.written_beside(out) as tmp:
        drop = None if force else max_int8_drop
        manifest = _write_bundle(tmp, run, task, name, version, int8, drop, int8_weight_bits)
        tag = import_to_store(tmp, manifest) if store else None
    log.info("exported %s -> %s%s", run.run_dir, out, f" and model store tag {tag}" if tag else "")
    tracking.log_bundle(run.run_dir, out)  # into the MLflow run that trained it, if it was tracked
    return ExportResult(out, manifest, tag)


def _write_bundle(
    tmp: Path,
    run: LoadedRun,
    task: TaskExport,
    name: str,
    version: str,
    int8: bool,
    max_int8_drop: float | None,
    int8_weight_bits: int,
) -> Manifest:
    """The bundle in ``tmp``, each check passed: the ONNX file (and its int8 twin) against PyTorch and on every
    runtime and precision the service may use, the manifest embedded and beside them, loaded by the serving code."""
    import onnxruntime as ort

    val_paths, column = _split_paths(run, "val", MAX_CHECK_IMAGES)
    val_targets = task.targets(run, column)
    fp32 = tmp / MODEL_FP32
    outputs = task.outputs(run)
    output_names = [o["name"] for o in outputs]
    export_onnx(run.model, fp32, run.spec.input_size, output_names=output_names, traced=not int8)
    session = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
    exported = sorted(o.name for o in session.get_outputs())
    if exported != sorted(output_names):
        raise ExportError(f"exported outputs {exported} are not {output_names}")
    images = CheckImages.load(val_paths, run.spec)  # decoded once for every check
    verification, reference = task.verify(run.model, session, images, val_targets)
    del session  # its arena of activations, before the next sessions open theirs
    int8_info = None
    if int8:
        int8_info = _int8_model(
            run, task, fp32, tmp / MODEL_INT8, reference, images, val_targets, max_int8_drop, int8_weight_bits
        )
    files = {"fp32": fp32, **({"int8": tmp / MODEL_INT8} if int8_info is not None else {})}
    runtimes = runtime_checks(task, files, output_names, images, val_targets)
    manifest = _manifest(run, name, version, verification, int8_info, runtimes)
    for path in files.values():
        embed_manifest(path, manifest)
    hashes = {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size} for p in files.values()}
    manifest = dataclasses.replace(manifest, files=hashes)
    runs.write_json(tmp / MANIFEST, manifest.to_dict())
    for runtime in ("onnxruntime", "openvino") if openvino_available() else ("onnxruntime",):
        load_bundle(tmp, device="cpu", runtime=runtime)  # it must load through the serving code to count
    return manifest


def is_bundle(path: Path) -> bool:
    """Whether ``path`` is a directory that headstart export wrote (of any schema version)."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and "schema_version" in manifest and "files" in manifest


def check_destination(out: Path, run_dir: Path, force: bool) -> None:
    """Refuse an --out that export would destroy: the run itself or a folder holding it (always), and anything but
    an earlier bundle or an empty directory (without --force)."""
    run = run_dir.resolve()
    if run.is_relative_to(out.resolve()):  # the run itself, or a folder holding it
        raise ExportError(
            f"--out {out} is the run directory or holds it; export replaces --out whole. Choose a new folder, "
            f"e.g. --out {run / 'bundle'}."
        )
    if force or not (out.exists() or out.is_symlink()):
        return
    if out.is_dir() and not out.is_symlink() and (is_bundle(out) or not any(out.iterdir())):
        return
    raise ExportError(
        f"--out {out} exists and is not a headstart bundle; export would replace it. Choose another folder, or "
        "pass --force to replace it."
    )


def import_to_store(bundle_dir: Path, manifest: Manifest) -> str:
    """Copy a verified bundle into the BentoML model store as NAME:VERSION with the manifest as metadata."""
    import bentoml

    metadata = {
        "headstart_schema_version": manifest.schema_version,
        "task": manifest.task,
        "labels": list(manifest.labels),
        "backbone": manifest.backbone["name"],
        "input_size": manifest.preprocess.input_size,
        **manifest.metrics,
        "files": {k: v["sha256"] for k, v in manifest.files.items()},
    }
    with bentoml.models.create(
        f"{manifest.name}:{manifest.version}",
        metadata=metadata,
        labels={"framework": "onnx", "task": manifest.task, "exported_by": "headstart"},
    ) as model:
        for f in (MANIFEST, *manifest.files):
            shutil.copy2(bundle_dir / f, Path(model.path) / f)
    return str(model.tag)


def _version() -> str:
    """headstart's version as installed (``pip install -e .`` or a wheel); "unknown" run from a bare checkout."""
    try:
        return metadata.version("headstart")
    except metadata.PackageNotFoundError:
        return "unknown"
