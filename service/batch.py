"""Batch prediction over many images on Ray Data: `headstart predict-batch MODEL SOURCE --out DEST`.

The images are listed once (a folder tree, a glob, a folder URI of pyarrow's file systems, or a .txt/.csv/.parquet
list of paths, URIs or http(s) URLs), cut into parts of
``part_size`` images in a fixed order, and predicted by a pool of Ray actors that each load the verified bundle once
and run the service's own decoding, preprocessing and runtime (:mod:`service.inference`, :mod:`service.localize`;
torch-free). Each finished part is written atomically as ``DEST/part-NNNNN.parquet``; rerunning the same command after
a crash or a kill skips the parts already written, so the final output is the same as an uninterrupted run's. A file
that cannot be read or decoded is a row with an ``error``, never a failed job.

Embedded by default (a local Ray instance sized to this machine); ``--ray-address`` / ``RAY_ADDRESS`` joins a cluster,
whose nodes must all reach the bundle at the same path (a shared file system) or hold the same BentoML model store.
On 2 cores an actor pool that takes every CPU starves Ray's read tasks and the job hangs: the local default leaves a
CPU free.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from pathlib import Path

import numpy as np

from .errors import HeadstartError
from .files import (
    LIST_COLUMNS,
    MAX_FILE_BYTES,
    WEB,
    FileProblem,
    image_paths,
    is_url,
    listed_images,
    read_image,
    shown,
    table_images,
    too_large_message,
    utf8_name,
)
from .inference import check_answer_options
from .localize import DEFAULTS

log = logging.getLogger("headstart")

JOB = "_job.json"


class BatchError(HeadstartError, ValueError):
    """The batch job cannot run as asked; the message says what to change."""


# ---------------------------------------------------------------- the list of images


def list_sources(source: str) -> list[str]:
    """Every image ``source`` names, in a fixed order: a folder (recursively, by image suffix), a glob, a folder URI
    (``s3://bucket/photos/``), or a list file (.txt: one path or URI per line; .csv and .parquet: a ``path`` column,
    or one of :data:`LIST_COLUMNS`' other names, else the first)."""
    found = image_paths(source)
    if found is not None:
        return found
    if is_url(source) and not os.path.exists(source):
        return _remote_sources(source)
    path = Path(source)
    if not path.is_file():
        raise BatchError(f"{source} is neither a folder, a glob, nor a .txt/.csv/.parquet list of images.")
    suffix = path.suffix.lower()
    if suffix == ".txt":
        return listed_images(path)  # a name that is not UTF-8: an error row
    if suffix == ".csv":
        try:
            return table_images(path)
        except (ValueError, OSError) as exc:
            raise BatchError(f"{source} cannot be read as a list of images: {exc}") from exc
    if suffix == ".parquet":
        import pyarrow
        import pyarrow.parquet

        try:
            table = pyarrow.parquet.read_table(path)
        except (pyarrow.ArrowException, OSError) as exc:
            raise BatchError(
                f"{source} cannot be read as a list of images ({exc}). A .parquet list has one image per row, in a "
                f"column named {', '.join(LIST_COLUMNS[:3])}, ... (else the first column)."
            ) from exc
        named = {name.strip().lower(): name for name in table.column_names}
        column = next((named[c] for c in LIST_COLUMNS if c in named), table.column_names[0])
        return [str(v) for v in table.column(column).to_pylist() if v]
    raise BatchError(f"{source}: a list of images must be .txt, .csv or .parquet (with a 'path' column).")


def _remote_sources(uri: str) -> list[str]:
    """The images under a folder URI of one of pyarrow's file systems (``s3://bucket/photos/``; recursively, by
    image suffix, sorted), or the one file it names. An http(s) URL names one image: more go into a list file."""
    from urllib.parse import quote, urlsplit, urlunsplit

    from pyarrow import fs

    from .formats import IMAGE_SUFFIXES

    if uri.lower().startswith(WEB):
        return [uri]
    try:
        filesystem, root = _open_uri(uri)
        info = filesystem.get_file_info(root)
        if info.type == fs.FileType.Directory:
            found = filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    except Exception as exc:  # pyarrow.ArrowInvalid, OSError: a scheme it cannot open, no credentials, no bucket
        raise BatchError(
            f"{uri} cannot be listed: {exc}. Folders are read on the file systems pyarrow opens (s3://, gs://, "
            "hdfs://, abfs://, file://) where credentials allow; or give a .txt/.csv/.parquet list of the images."
        ) from None
    if info.type == fs.FileType.File:
        return [uri]
    if info.type != fs.FileType.Directory:
        raise BatchError(f"{uri}: no such file or folder.")
    scheme, netloc, path, query, _ = urlsplit(uri)
    base = path.rstrip("/")
    names = sorted(
        f.path[len(root.rstrip("/")) :].lstrip("/")
        for f in found
        if f.type == fs.FileType.File and Path(f.path).suffix.lower() in IMAGE_SUFFIXES
    )
    return [urlunsplit((scheme, netloc, f"{base}/{quote(name)}", query, "")) for name in names]


def _open_uri(uri: str):
    """pyarrow's file system and path for ``uri``; a path written unescaped (``s3://b/my photo.jpg``) is escaped
    (pyarrow takes URIs only as RFC 3986 writes them)."""
    from urllib.parse import quote, urlsplit, urlunsplit

    from pyarrow import fs

    try:
        return fs.FileSystem.from_uri(uri)
    except Exception:  # pyarrow.ArrowInvalid
        scheme, netloc, path, query, fragment = urlsplit(uri)
        escaped = urlunsplit((scheme, netloc, quote(path, safe="/%"), query, fragment))
        if escaped == uri:
            raise
        return fs.FileSystem.from_uri(escaped)


def read_bytes(uri: str) -> bytes:
    """A local path, an http(s) URL, or any URI pyarrow's file systems open (s3://, gs://, hdfs://, file://) where
    credentials allow; each within HEADSTART_MAX_FILE_BYTES, else :class:`FileProblem`."""
    if not is_url(uri) or uri.lower().startswith(WEB):
        return read_image(uri)  # a regular file or a URL's body within the size limit (service/files.py)
    from pyarrow import fs

    try:
        filesystem, path = _open_uri(uri)
    except Exception as exc:  # pyarrow.ArrowInvalid: a scheme it has no file system for
        raise FileProblem(
            f"{exc}: headstart reads files, http(s) URLs and the URIs of pyarrow's file systems (s3://, gs://, "
            "hdfs://, abfs://, file://)."
        ) from None
    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise FileProblem("The file does not exist.")
    if info.type != fs.FileType.File:
        raise FileProblem("The path is a folder, not a file.")
    if info.size is not None and info.size > MAX_FILE_BYTES:
        raise FileProblem(too_large_message(info.size, MAX_FILE_BYTES), too_large=True)
    with filesystem.open_input_stream(path) as stream:
        data = stream.read(MAX_FILE_BYTES + 1)
    if len(data) > MAX_FILE_BYTES:
        raise FileProblem(too_large_message(len(data), MAX_FILE_BYTES), too_large=True)
    return data


# ---------------------------------------------------------------- the actors


class Predictor:
    """One Ray actor: loads the bundle once, answers batches of paths with one row each (an ``error`` where the
    file cannot be read or decoded)."""

    def __init__(self, model: str, options: dict) -> None:
        import ray

        from . import usage_reports
        from .bundle import load_bundle

        usage_reports.turn_off(openvino_converter=True)  # a Ray worker of a cluster joined keeps its own environment

        self.options = options
        self.not_utf8 = set(options.get("not_utf8", ()))
        self.node = ray.get_runtime_context().get_node_id()  # where this actor runs (reported in the summary)
        self.bundle = load_bundle(
            model,
            variant=options["variant"],
            device=options["device"],
            runtime=options["runtime"],
            precision=options["precision"],
            threads=options["threads"],
        )

    @classmethod
    def bound(cls, model: str, options: dict) -> type[Predictor]:
        """This class with its constructor's arguments bound, for Ray Data to start with none of ours in the object
        store (where an actor's restart could lose them). Ray Data still passes each actor a reference of its own,
        and Ray logs one error-level line about it per job (ray-project/ray#57733: the README says so)."""
        return type(cls.__name__, (cls,), {"__init__": lambda self: cls.__init__(self, model, options)})

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        """One row per path of ``batch``. The images are answered as they are decoded, as many at a time as the
        model runs at once (:attr:`Bundle.images_per_run`: 16 of 224 px, 3 of a detector's 512 px; a GPU's batch
        whole), so an actor holds that many images' pixels whatever ``--batch-size`` asks: a 512 px detector's
        actor held all 32 (656 MB; 785 MB at 64 a call), now 483 MB (474 at 64; benchmarks/RESULTS.md,
        "Prediction's memory")."""
        from .ahead import in_order, reading_threads
        from .preprocess import decode_for

        def decoded(path):
            if str(path) in self.not_utf8:
                raise FileProblem(f"The file name {str(path)!r} is not UTF-8 (shown escaped); rename the file.")
            return decode_for(read_bytes(str(path)), self.bundle.spec)

        rows, images, good = [], [], []
        at_once = self.bundle.images_per_run or len(batch["path"])
        # decoded on as many threads as the actor has CPUs (PIL releases the GIL): one, in turn, by default here
        # URLs on more threads: reading them waits on their servers (service/ahead.py)
        ahead = in_order(decoded, batch["path"], threads=reading_threads(list(batch["path"]), self.options["threads"]))
        for path, part, index, image in zip(batch["path"], batch["part"], batch["index"], ahead, strict=True):
            # "" rather than None inside Ray: every block then has the same column types
            row = {
                "path": str(path),
                "part": int(part),
                "index": int(index),
                "labels": [],
                "scores": [],
                "present": [],  # a multi-label model's labels at or above their thresholds
                "multilabel": int(self.bundle.thresholds is not None),
                "boxes": "",
                "error": "",
                "novelty": float("nan"),  # NaN and -1: no novelty score (a detector, an older bundle) or no image
                "unknown": -1,
            }
            try:
                images.append(image.result())
                good.append(row)
            except Exception as exc:  # unreadable or not an image: the row says so, the job goes on
                row["error"] = f"{type(exc).__name__}: {exc}"
            rows.append(row)
            if len(images) == at_once:
                self._answer(good, images)
                images, good = [], []
        if images:
            self._answer(good, images)
        name, version, node = self.bundle.name, self.bundle.version, self.node
        return {key: [r[key] for r in rows] for key in rows[0]} | {
            "model": [name] * len(rows),
            "version": [version] * len(rows),
            "node": [node] * len(rows),
        }

    def _answer(self, rows: list[dict], images: list) -> None:
        """The answers of ``images`` into their ``rows``."""
        from .inference import classified, classify_arrays
        from .localize import LocalizeParams, localize_images
        from .preprocess import preprocess

        k, threshold = self.options["top_k"], self.options["novelty_threshold"]
        if self.options["localize"]:  # the run that gives the boxes gives the class scores
            located = localize_images(self.bundle, images, LocalizeParams(conf=self.options["conf"]), threshold)
            answers = [classified(self.bundle, result["scores"], result, k) for result in located]
            for row, result in zip(rows, located, strict=True):
                row["boxes"] = json.dumps(result["detections"])
        else:
            answers = classify_arrays(self.bundle, [preprocess(img, self.bundle.spec) for img in images], k, threshold)
        for row, answer in zip(rows, answers, strict=True):
            row.update(_answer_columns(answer))


def _answer_columns(answer: dict) -> dict:
    """The columns of one answered image (:func:`service.inference.classified`'s answer): its top-k labels and
    scores, a multi-label model's labels present, novelty and "none of these"."""
    predictions = answer["predictions"]
    return {
        "labels": [p["label"] for p in predictions],
        "scores": [p["score"] for p in predictions],
        "present": [p["label"] for p in answer.get("labels") or []],
        "novelty": float("nan") if answer["novelty"] is None else answer["novelty"],
        "unknown": -1 if answer["unknown"] is None else int(answer["unknown"]),
    }


# ---------------------------------------------------------------- the job


def _schema():
    import pyarrow as pa

    return pa.schema(
        [
            ("path", pa.string()),
            ("labels", pa.list_(pa.string())),
            ("scores", pa.list_(pa.float64())),
            ("present", pa.list_(pa.string())),
            ("novelty", pa.float64()),
            ("unknown", pa.bool_()),
            ("boxes", pa.string()),
            ("error", pa.string()),
            ("model", pa.string()),
            ("version", pa.string()),
        ]
    )


def _write_part(out: Path, part: int, rows: list[dict]) -> None:
    """One finished part as parquet (rows in the listing's order), written to a temporary name and renamed."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    SCHEMA = _schema()

    rows = sorted(rows, key=lambda r: r["index"])
    table = pa.Table.from_pylist(
        [
            {
                "path": str(r["path"]),
                "labels": [str(x) for x in r["labels"]],
                "scores": [float(x) for x in r["scores"]],
                "present": [str(x) for x in r["present"]] if int(r["multilabel"]) and not r["error"] else None,
                "novelty": None if r["novelty"] != r["novelty"] else float(r["novelty"]),
                "unknown": None if int(r["unknown"]) < 0 else bool(r["unknown"]),
                "boxes": str(r["boxes"]) or None,
                "error": str(r["error"]) or None,
                "model": str(r["model"]),
                "version": str(r["version"]),
            }
            for r in rows
        ],
        schema=SCHEMA,
    )
    tmp = out / f".part-{part:05d}.parquet.tmp"
    pq.write_table(table, tmp)
    os.replace(tmp, out / f"part-{part:05d}.parquet")


def _check_job(out: Path, job: dict) -> None:
    """A DEST holds one job: rerunning it resumes; another job (other images, model or options) is refused."""
    path = out / JOB
    if path.is_file():
        old = json.loads(path.read_text())
        if old != job:
            changed = sorted(k for k in set(old) | set(job) if old.get(k) != job.get(k))
            raise BatchError(
                f"{out} holds the output of another job (different {', '.join(changed)}). Use a new "
                "--out, or the same command to resume that job."
            )
    else:
        out.mkdir(parents=True, exist_ok=True)
        tmp = out / f".{JOB}.tmp"
        tmp.write_text(json.dumps(job, indent=1))
        os.replace(tmp, path)


def _init_ray(address: str | None, num_cpus: int | None):
    """Ray, started or joined. Its INFO and WARNING lines (a local instance started, the execution plan, deprecations
    inside Ray Data) are shown only when headstart logs at DEBUG (``headstart --verbose``); errors always."""
    import logging

    import ray
    import ray.data  # configures its own loggers on import: set the level after

    level = logging.INFO if logging.getLogger("headstart").isEnabledFor(logging.DEBUG) else logging.ERROR
    for name in ("ray", "ray.data"):
        logging.getLogger(name).setLevel(level)
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=False, logging_level=level)
        else:
            ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, logging_level=level)
    return ray


def predict_batch(
    model: str,
    source: str,
    out: str | Path,
    *,
    top_k: int = 5,
    localize: bool = False,
    conf: float = DEFAULTS.conf,
    novelty_threshold: float | None = None,
    variant: str = "fp32",
    runtime: str = "auto",
    precision: str = "auto",
    batch_size: int = 32,
    actors: int | None = None,
    cpus_per_actor: float | None = None,
    gpus_per_actor: float = 0.0,
    ray_address: str | None = None,
    part_size: int = 1000,
    progress: bool = True,
) -> dict:
    """Predict every image of ``source`` into parquet parts under ``out``; returns the summary."""
    from .bundle import verify_bundle

    if min(top_k, batch_size, part_size) < 1 or (actors is not None and actors < 1):
        raise BatchError("--top-k, --batch-size, --part-size and --actors must be at least 1.")
    try:
        check_answer_options(top_k, novelty_threshold)  # a typo would have made every row "none of these"
    except ValueError as exc:
        raise BatchError(str(exc)) from None
    started = time.perf_counter()
    out = Path(out)
    bundle_dir, manifest = verify_bundle(model)
    paths = list_sources(source)
    if not paths:
        raise BatchError(f"{source} names no images.")
    # names that are not UTF-8 cannot go into a string column: shown escaped, each row an error (rename the file)
    not_utf8 = sorted(shown(p) for p in paths if not utf8_name(p))
    paths = [shown(p) for p in paths]
    options = {
        "top_k": top_k,
        "localize": localize,
        "conf": conf,
        "novelty_threshold": novelty_threshold,
        "variant": variant,
        "runtime": runtime,
        "precision": precision,
        "device": "cuda" if gpus_per_actor else "cpu",
        "not_utf8": not_utf8,
    }
    job = {
        "images": len(paths),
        "images_sha256": hashlib.sha256("\n".join(paths).encode()).hexdigest(),
        "model": f"{manifest.name}:{manifest.version}",
        "part_size": part_size,
        **{k: options[k] for k in ("top_k", "localize", "conf", "variant", "runtime", "precision")},
        **({"novelty_threshold": novelty_threshold} if novelty_threshold is not None else {}),
    }
    _check_job(out, job)
    parts = [paths[i : i + part_size] for i in range(0, len(paths), part_size)]
    pending = [k for k in range(len(parts)) if not (out / f"part-{k:05d}.parquet").is_file()]
    summary = {"images": len(paths), "parts": len(parts), "parts_skipped": len(parts) - len(pending)}
    if pending:
        summary.update(
            _predict_on_ray(
                str(bundle_dir),
                parts,
                pending,
                out,
                options,
                batch_size,
                actors,
                cpus_per_actor,
                gpus_per_actor,
                ray_address,
                progress,
            )
        )
    summary["errors"] = sum(_count_errors(out / f"part-{k:05d}.parquet") for k in range(len(parts)))
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def pool_size(total_cpus: int, actors: int | None, cpus_per_actor: float | None) -> tuple[int, float]:
    """(actors, CPUs each). Ray's read tasks need a CPU the pool does not hold (else the job hangs), so by default
    one actor per CPU shares all CPUs but one (2 cores: 2 actors x 0.5 CPU, each with one inference thread: 1.65x
    the throughput of 1 actor x 1 CPU, benchmarks/RESULTS.md)."""
    spare = max(total_cpus - 1, 0.5)
    if actors is None and cpus_per_actor is None:
        actors = max(1, total_cpus)
    if actors is None:
        actors = max(1, int(spare // cpus_per_actor))
    if cpus_per_actor is None:
        cpus_per_actor = spare / actors
    return actors, cpus_per_actor


def _predict_on_ray(
    model: str,
    parts: list[list[str]],
    pending: list[int],
    out: Path,
    options: dict,
    batch_size: int,
    actors: int | None,
    cpus_per_actor: float | None,
    gpus_per_actor: float,
    ray_address: str | None,
    progress: bool,
) -> dict:
    from .cpu import usable_cpus

    local_cpus = usable_cpus()
    ray = _init_ray(ray_address, None if ray_address or os.environ.get("RAY_ADDRESS") else local_cpus)
    ray.data.DataContext.get_current().enable_progress_bars = progress
    actors, cpus_per_actor = pool_size(int(ray.cluster_resources().get("CPU", local_cpus)), actors, cpus_per_actor)
    options = {**options, "threads": max(1, int(cpus_per_actor))}
    items = [{"path": p, "part": k, "index": i} for k in pending for i, p in enumerate(parts[k])]
    started = time.perf_counter()
    # at least one block per actor (an actor without one would idle, and Ray Data warns), at most 200
    blocks = max(1, min(len(items), max(actors, min(len(items) // batch_size, 200))))
    ds = ray.data.from_items(items, override_num_blocks=blocks)
    ds = ds.map_batches(
        Predictor.bound(model, options),
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors),
        num_cpus=cpus_per_actor,
        num_gpus=gpus_per_actor or None,
        batch_format="numpy",
    )
    received: dict[int, list[dict]] = {k: [] for k in pending}
    done, nodes = 0, set()
    for batch in ds.iter_rows():
        k = int(batch["part"])
        nodes.add(str(batch["node"]))
        received[k].append(dict(batch))
        if len(received[k]) == len(parts[k]):
            _write_part(out, k, received.pop(k))
            done += len(parts[k])
    seconds = time.perf_counter() - started
    return {
        "predicted": done,
        "actors": actors,
        "cpus_per_actor": round(cpus_per_actor, 3),
        "nodes": sorted(nodes),
        "images_per_second": round(done / seconds, 1) if seconds else 0.0,
    }


def _count_errors(path: Path) -> int:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    column = pq.read_table(path, columns=["error"]).column("error")
    return int(pc.sum(pc.is_valid(column)).as_py() or 0)
