"""The Python API: the command line's verbs as functions, with the same names, options and defaults.

.. code-block:: python

    import headstart

    run = headstart.train("data/ants-bees", out="runs/ants-bees", backbone="mobilenet_v2", weights="mnv2.pth")
    print(run.metrics["accuracy"])
    bundle = run.export(int8=True)                # verified ONNX bundle, imported into the BentoML model store
    model = headstart.load(bundle.tag)            # a tag, a bundle directory, or a run directory (PyTorch)
    for answer in model.predict(["photo.jpg", "more/"]):
        print(answer.image, answer.label, answer.score, answer.unknown)
    headstart.evaluate(bundle.tag, "data/test", out="eval")
    with headstart.serve(bundle.tag, port=3000, wait=False) as server:  # `headstart serve` in a child process
        print(server.url)

What the command line prints goes through :mod:`logging` (logger ``headstart``): a library user sees the summary
lines once logging is configured at INFO (``logging.basicConfig(level=logging.INFO)``). Mistakes in the data or the
options raise :class:`ValueError` or a :class:`headstart.service.errors.HeadstartError` with the message the command
line prints.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from headstart.extras import explained, require
from headstart.predicting import Answer, ImageInput, LoadedModel
from headstart.service.contract import Manifest, Model
from headstart.service.cpu import INT8_WEIGHT_BITS

log = logging.getLogger("headstart")

__all__ = [  # Answer, ImageInput and LoadedModel live in headstart/predicting.py
    "Answer",
    "Bundle",
    "ImageInput",
    "LoadedModel",
    "Run",
    "Server",
    "evaluate",
    "export",
    "load",
    "serve",
    "train",
]


@dataclass
class Bundle:
    """An exported, verified bundle (`headstart export`): its directory, its model-store tag (None with
    ``store=False``) and its manifest (what it holds, the verification figures, int8's outcome)."""

    dir: Path
    tag: str | None
    manifest: Manifest = field(repr=False)

    def load(self, **options: Any) -> LoadedModel:
        """The bundle on its runtime (options as :func:`load`)."""
        return load(self.dir, **options)


@dataclass
class Run:
    """A finished training run (`headstart train`'s run directory): its ``metrics`` (``metrics.json``), options
    (``config``), class ``labels`` and ``task``; :meth:`export`, :meth:`evaluate` and :meth:`load` as the verbs."""

    dir: Path
    metrics: dict = field(repr=False)
    config: dict = field(repr=False)
    labels: list[str] = field(repr=False)

    @classmethod
    @explained
    def open(cls, run_dir: str | os.PathLike) -> Run:
        """A finished run directory (refused with a message when it is not one)."""
        import yaml

        from headstart.runs import CONFIG, LABELS, METRICS, check_run_dir

        run_dir = Path(run_dir)
        check_run_dir(run_dir)
        metrics_file = run_dir / METRICS
        if not metrics_file.is_file():
            raise ValueError(f"{run_dir} has no {METRICS}: the training did not finish (train with --resume).")
        return cls(
            run_dir,
            json.loads(metrics_file.read_text()),
            yaml.safe_load((run_dir / CONFIG).read_text()),
            json.loads((run_dir / LABELS).read_text()),
        )

    @property
    def task(self) -> str:
        return self.config.get("task", "classify")

    def export(
        self,
        out: str | os.PathLike | None = None,
        *,
        int8: bool = False,
        force: bool = False,
        name: str | None = None,
        store: bool = True,
        weights: str | os.PathLike | None = None,
        int8_weight_bits: int = INT8_WEIGHT_BITS,
        data: str | os.PathLike | None = None,
    ) -> Bundle:
        """`headstart export RUN`: a verified bundle in ``out`` (default RUN/bundle). ``int8_weight_bits`` 8: int8
        weights closer to fp32, for CPUs with VNNI or AMX only (`headstart export --help`). ``data``: the data set's
        folder (or data.yaml, labels CSV), if it moved since training: export checks on its validation images."""
        return export(
            self.dir,
            out,
            int8=int8,
            force=force,
            name=name,
            store=store,
            weights=weights,
            int8_weight_bits=int8_weight_bits,
            data=data,
        )

    def evaluate(
        self, data: str | os.PathLike, out: str | os.PathLike | None = None, *, other: str | None = None
    ) -> dict:
        """`headstart evaluate RUN DATA`: the summary (metrics and plots in ``out``, default RUN/eval)."""
        return evaluate(self.dir, data, out, other=other)

    def load(self, **options: Any) -> LoadedModel:
        """The run's PyTorch model (options as :func:`load`)."""
        return load(self.dir, **options)


@explained
def train(data: str | os.PathLike, out: str | os.PathLike, task: str | None = None, **options: Any) -> Run:
    """`headstart train DATA --out OUT`: the options are the command line's, with underscores
    (``backbone="mobilenet_v2"``, ``epochs=30``, ``resume=True``...; `headstart train --help` lists them and their
    defaults). The task comes from the data (class subfolders: a classifier; a YOLO data set: a detector; a labels
    CSV: a multi-label classifier), or from ``task`` where the data alone cannot say (``task="multilabel"`` on a
    YOLO data set: the classes present in each image); an option of another task is refused with a message."""
    from headstart.tasks import CONFIGS, config_for_data
    from headstart.tasks import train as train_task

    config = config_for_data(data, task)
    fields = set(config.__dataclass_fields__) - {"data_dir", "out"}
    unknown = sorted(set(options) - fields)
    if unknown:
        others = {f for c in CONFIGS.values() for f in c.__dataclass_fields__}
        if set(unknown) <= others:
            raise ValueError(f"{', '.join(unknown)} does not apply to {data}: it is {config.data_kind}.")
        raise TypeError(f"train() has no option {', '.join(unknown)}; the options are: {', '.join(sorted(fields))}")
    options = {k: os.fspath(v) if isinstance(v, os.PathLike) else v for k, v in options.items()}  # paths as text
    return Run.open(train_task(config(data_dir=os.fspath(data), out=os.fspath(out), **options)))


@explained
def export(
    run: str | os.PathLike | Run,
    out: str | os.PathLike | None = None,
    *,
    int8: bool = False,
    force: bool = False,
    name: str | None = None,
    store: bool = True,
    weights: str | os.PathLike | None = None,
    int8_weight_bits: int = INT8_WEIGHT_BITS,
    data: str | os.PathLike | None = None,
) -> Bundle:
    """`headstart export RUN`: see :meth:`Run.export`."""
    from headstart.exporter import export_bundle

    run_dir = run.dir if isinstance(run, Run) else Path(run)
    result = export_bundle(
        run_dir,
        out,
        int8=int8,
        force=force,
        name=name,
        store=store,
        weights=weights,
        int8_weight_bits=int8_weight_bits,
        data=data,
    )
    return Bundle(Path(result.bundle_dir), result.tag, result.manifest)


@explained
def resolve_model(
    ref: str | os.PathLike,
    *,
    variant: str = "fp32",
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    weights: str | os.PathLike | None = None,
) -> Model:
    """What every verb that takes a MODEL takes: a run directory (its PyTorch model; ``weights``: the backbone
    file, if it moved), a bundle directory, or a model-store tag NAME[:VERSION] (on a runtime chosen as the service
    chooses it)."""
    text = os.fspath(ref)
    path = Path(text)
    if not path.exists() and ("/" in text or "\\" in text):
        from headstart.service.bundle import BundleError

        raise BundleError(
            f"{text} does not exist. Give a run directory (headstart train --out), a bundle directory "
            "(headstart export --out) or a model-store tag NAME[:VERSION]."
        )
    if (path / "config.yaml").is_file():
        from headstart.loaded_run import load_run
        from headstart.predict import RunModel

        return RunModel(load_run(path, weights=weights))
    from headstart.service.bundle import load_bundle

    return load_bundle(text, variant=variant, device=device, runtime=runtime, precision=precision)


def load(
    model: str | os.PathLike,
    *,
    variant: str = "fp32",
    device: str = "auto",
    runtime: str = "auto",
    precision: str = "auto",
    weights: str | os.PathLike | None = None,
) -> LoadedModel:
    """A model to predict with (see :func:`resolve_model` for what ``model`` may be)."""
    found = resolve_model(model, variant=variant, device=device, runtime=runtime, precision=precision, weights=weights)
    return LoadedModel(found, os.fspath(model))


def default_eval_dir(model: str | os.PathLike) -> Path:
    """Where `headstart evaluate MODEL` writes without ``--out``: RUN/eval for a run directory, BUNDLE-eval beside a
    bundle directory (a bundle holds only what its manifest lists: it would refuse to load with more)."""
    path = Path(model)
    if (path / "config.yaml").is_file():
        return path / "eval"
    if path.is_dir():
        return path.parent / f"{path.name}-eval"
    raise ValueError(f"{os.fspath(model)} is a model-store tag: say where the evaluation goes with --out (out=).")


@explained
def evaluate(
    model: str | os.PathLike | Run | Bundle,
    data: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    other: str | os.PathLike | None = None,
    weights: str | os.PathLike | None = None,
    **options: Any,
) -> dict:
    """`headstart evaluate MODEL DATA`: metrics and plots of a run (PyTorch), a bundle or a tag (on its runtime,
    ``options`` as :func:`load`) on a labelled data set of its task, written to ``out`` (:func:`default_eval_dir`);
    returns the summary. ``other``: images of things the model never learned (classifiers: the novelty score)."""
    from headstart.tasks import task_named

    require("torch")  # every task's metrics: before a bundle is loaded for nothing
    ref = model.dir if isinstance(model, Run | Bundle) else model
    found = resolve_model(ref, weights=weights, **options)
    target = Path(out) if out else default_eval_dir(ref)
    target.mkdir(parents=True, exist_ok=True)
    summary = task_named(found.task).evaluate_model(found, os.fspath(data), target, other=other and os.fspath(other))
    return {**summary, "out": str(target)}


@dataclass
class Server:
    """A `headstart serve` in a child process (:func:`serve` with ``wait=False``): ``url``, :meth:`stop`; a context
    manager that stops it."""

    url: str
    process: Any
    log: Path

    def stop(self) -> None:
        from headstart.service.devserver import stop

        stop(self.process)

    def __enter__(self) -> Server:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


@explained
def serve_settings(
    model: str | os.PathLike,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    workers: int | None = None,
    threads: int | None = None,
    variant: str | None = None,
    device: str | None = None,
    runtime: str | None = None,
    precision: str | None = None,
) -> tuple[str, dict[str, str]]:
    """Check what `headstart serve` is asked to serve, at once (a wrong tag, a missing variant, an unusable
    runtime, a port in use: one error), and return the model to serve and its HEADSTART_* settings. An option not
    given leaves the environment's HEADSTART_* variable in force, else the default."""
    from headstart.service.bundle import variant_file, verify_bundle
    from headstart.service.devserver import check_port
    from headstart.service.runtime import choose_runtime

    require("bentoml", "python_multipart")  # before the model's checks: without them nothing can serve it
    model = os.fspath(model)
    if (Path(model) / "bundle" / "manifest.json").is_file():  # a run directory: its exported bundle
        model = str(Path(model) / "bundle")
    elif (Path(model) / "config.yaml").is_file():
        raise ValueError(
            f"{model} is a run directory with no exported bundle in it ({Path(model) / 'bundle'}): the service serves "
            f"bundles. Export it first (headstart export {model}), or serve a bundle exported elsewhere by its folder "
            "or model-store tag."
        )
    chosen = {"VARIANT": variant, "DEVICE": device, "RUNTIME": runtime, "PRECISION": precision}
    defaults = {"VARIANT": "fp32", "DEVICE": "auto", "RUNTIME": "auto", "PRECISION": "auto"}
    settings = {k: v or os.environ.get(f"HEADSTART_{k}") or defaults[k] for k, v in chosen.items()}
    home = _bentoml_home_for(model)  # before the model is looked up: a tag is looked up in BentoML's store
    variant_file(*verify_bundle(model), settings["VARIANT"])
    choose_runtime(settings["RUNTIME"], settings["DEVICE"])
    if port < 1 or (workers is not None and workers < 1) or (threads is not None and threads < 1):
        raise ValueError("--port, --workers and --threads must be at least 1.")
    if port > 65535:
        raise ValueError(f"--port {port}: a port is at most 65535.")
    check_port(host, port)
    settings |= {k: v for k, v in (("WORKERS", workers), ("THREADS", threads)) if v is not None}
    served = str(Path(model).resolve()) if Path(model).is_dir() else model
    return served, {f"HEADSTART_{k}": str(v) for k, v in settings.items()} | home


def _bentoml_home_for(model: str) -> dict[str, str]:
    """BENTOML_HOME for serving ``model`` where BentoML's own cannot be written (a missing or read-only home: BentoML
    makes its folders at start and stopped with NotADirectoryError): a bundle served by its folder reads no model
    store, so a folder of this user's in the temporary folder serves; {} where BentoML's home is usable."""
    from headstart.runs import stand_in, unwritable
    from headstart.service.devserver import bentoml_home

    own = bentoml_home()
    why = unwritable(own)
    if not why:
        return {}
    if not Path(model).is_dir():
        raise ValueError(
            f"{model} is looked up in BentoML's model store, and BentoML's home {own} cannot be written "
            f"({why}): set BENTOML_HOME to the folder that holds the store, or serve the bundle by its folder."
        )
    home = stand_in("bentoml")
    if home is None:
        raise ValueError(
            f"BentoML's home {own} cannot be written ({why}): set BENTOML_HOME to a folder this user can write."
        )
    log.warning(
        "BentoML's home %s cannot be written (%s): serving with BENTOML_HOME=%s (a bundle served by its folder needs "
        "no model store; set BENTOML_HOME to choose)",
        own,
        why,
        home,
    )
    return {"BENTOML_HOME": str(home)}


@explained
def serve(
    model: str | os.PathLike | Run | Bundle,
    *,
    host: str = "127.0.0.1",
    port: int = 3000,
    wait: bool = True,
    log: str | os.PathLike | None = None,
    **options: Any,
) -> Server:
    """`headstart serve MODEL` in a child process: with ``wait`` (the default) until it ends (Ctrl-C stops it),
    else once it answers ``/readyz``, returning the :class:`Server`. ``options``: ``workers``, ``threads``,
    ``variant``, ``device``, ``runtime``, ``precision`` (as the command line's). ``log``: the server's output file
    (default: a temporary file)."""
    import tempfile

    from headstart.service.devserver import start, stop, wait_ready

    ref = model.dir if isinstance(model, Run | Bundle) else model
    served, env = serve_settings(ref, host=host, port=port, **options)
    log_path = Path(log) if log else Path(tempfile.mkstemp(prefix="headstart-serve-", suffix=".log")[1])
    process = start(served, port, log_path, host=host, **env)
    server = Server(f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}", process, log_path)
    try:
        wait_ready(process, server.url, log_path)
        if wait:
            process.wait()
    except BaseException:
        stop(process)
        raise
    return server
