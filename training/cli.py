"""The `headstart` command: train, crossval, evaluate, predict, predict-batch, export, serve, convert, compare,
cache."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import sys
from collections import Counter
from pathlib import Path

from headstart.config import add_options

log = logging.getLogger("headstart")


def _add_json(p) -> None:
    p.add_argument("--json", action="store_true", help="print machine-readable JSON instead of the human summary")


def _print(args, data: dict, line: str) -> None:
    """A verb's result on stdout: one human summary ``line``, or ``data`` as JSON with --json."""
    print(json.dumps(data) if args.json else line)


def _figures(summary: dict) -> str:
    """The numbers of a summary as ``name value`` pairs (4 decimals for fractions)."""
    shown = [
        f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}"
        for k, v in summary.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    ]
    return ", ".join(shown)


def _answer_line(image: str, answer: dict, multilabel: bool = False) -> str:
    """One image's answer for a person: the best classes, or "none of these" with the novelty that says so."""
    if "error" in answer:
        return f"{image}: error: {answer['error']}"
    best = ", ".join(f"{p['label']} {p['score']:.3f}" for p in answer["predictions"][:3])
    if multilabel:  # the labels at or above their thresholds
        present = ", ".join(f"{p['label']} {p['score']:.3f}" for p in answer["labels"])
        best = present or f"no label (best: {best})"
    if answer.get("unknown"):
        text = f"none of these (novelty {answer['novelty']:.3f} > {answer['novelty_threshold']:.3f}; nearest {best})"
    else:
        text = best
    if answer.get("detections") is not None:
        text += f"; {len(answer['detections'])} boxes"
    if answer.get("heatmap"):
        text += f"; heatmap {answer['heatmap']}"
    if answer.get("sorted"):
        text += f"; -> {', '.join(answer['sorted'])}"
    return f"{image}: {text}"


def _task_options(crossval: bool = False) -> dict[str, dict]:
    """The options of every task's config (with ``crossval``, of the tasks `headstart crossval` offers)."""
    from headstart.config import command_line_options
    from headstart.tasks import CONFIGS

    return command_line_options(c for c in CONFIGS.values() if c.crossval or not crossval)


def _add_train(sub) -> None:
    """`headstart train`'s options, generated from the task configs (training/config.py, training/tasks/)."""
    p = sub.add_parser(
        "train",
        help="train a new head on a frozen pretrained backbone",
        description="Train a head on a frozen pretrained backbone: a classifier from an image folder "
        "(one subfolder per class, optionally inside train/ val/ test/) or an image,label CSV, a detector from a "
        "YOLO-format data set (a folder with data.yaml, or the yaml itself), or a multi-label classifier from a "
        "labels CSV (image,labels; or a folder holding labels.csv; or a YOLO data set with --task multilabel).",
    )
    p.add_argument(
        "data_dir",
        help="image folder: one subfolder per class, optionally inside train/ and val/; a YOLO data set; or a labels "
        "CSV (image,label: a classifier; image,labels or 0/1 columns: multi-label)",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    _add_task(p)
    _add_json(p)
    add_options(p, _task_options())


def _add_task(p) -> None:
    from headstart.tasks import CONFIGS

    p.add_argument(
        "--task",
        choices=list(CONFIGS),
        help="what to train where the data alone cannot say (a YOLO data set: detect, or multilabel for the classes "
        "present in each image); default: from the data",
    )


def _add_crossval(sub) -> None:
    p = sub.add_parser(
        "crossval",
        help="k-fold cross-validation (detectors, multi-label): each image scored by a model that never saw it",
        description="Cut a data set into --folds folds; per fold, train on the other folds (part of them picks the "
        "epoch) and score the held-out fold. Writes OUT/fold-N (runs) and OUT/crossval.json (per fold, mean and "
        "spread: a detector's AP50, AP50:95 and AP small/medium/large; a multi-label model's mAP, micro-F1 and "
        "sample-F1).",
    )
    p.add_argument("data_dir", help="a YOLO data set (a folder with data.yaml, or the yaml itself), or a labels CSV")
    p.add_argument("--out", required=True, help="folder for the fold runs and crossval.json")
    p.add_argument("--folds", type=int, default=4, help="number of folds (default 4)")
    _add_task(p)
    _add_json(p)
    add_options(p, _task_options(crossval=True))


def _config_for(args, options: dict[str, dict]):
    """The task config ``args.data_dir`` is for, with the options given; an option of another task is refused."""
    from headstart.tasks import config_for_data

    config = config_for_data(args.data_dir, getattr(args, "task", None))
    given = {k: v for k, v in vars(args).items() if k not in ("command", "verbose", "folds", "json", "task")}
    foreign = [k for k in given if k not in config.__dataclass_fields__]
    if foreign:
        flag = options[foreign[0]]["field"].metadata["flag"] or "--" + foreign[0].replace("_", "-")
        raise ValueError(f"{flag} does not apply to {args.data_dir}: it is {config.data_kind}.")
    return config(**given)


def _cmd_train(args) -> int:
    from headstart.api import Run
    from headstart.tasks import train

    run = Run.open(train(_config_for(args, _task_options())))
    headline = {k: v for k, v in run.metrics.items() if isinstance(v, int | float) and not isinstance(v, bool)}
    _print(args, {"run": str(run.dir), "task": run.task, **headline}, f"{run.dir}: {_figures(headline)}")
    return 0


def _cmd_crossval(args) -> int:
    from headstart.tasks import CONFIGS, config_for_data, task_named

    config = config_for_data(args.data_dir, args.task)
    if not config.crossval:
        offered = ", ".join(f"{c.task} ({c.data_kind})" for c in CONFIGS.values() if c.crossval)
        raise ValueError(f"{args.data_dir} is {config.data_kind}: crossval is offered for {offered}.")
    cfg = _config_for(args, _task_options(crossval=True))
    summary, path = task_named(cfg.task).cross_validate(cfg, folds=args.folds)
    if args.json:
        print(json.dumps({"out": str(path), **summary}))
        return 0
    for metric, value in summary.items():
        if isinstance(value, dict) and "mean" in value and metric != "train_seconds":
            mean, std = value["mean"], value["std"]
            print(f"{metric:<11} " + ("n/a" if mean is None else f"{mean:.4f} ± {std:.4f}"))
    print(f"per fold and options: {path}")
    return 0


def _cmd_evaluate(args) -> int:
    from headstart.api import evaluate

    options = {k: getattr(args, k) for k in ("variant", "device", "runtime", "precision")}
    summary = evaluate(args.model, args.data_dir, args.out, other=args.other, weights=args.weights, **options)
    _print(args, summary, f"{_figures(summary)} -> {summary['out']}")
    return 0


def _cmd_predict(args) -> int:
    """Predict with a run directory (PyTorch), or a bundle directory / model-store tag (on its runtime)."""
    from headstart.api import resolve_model

    options = {k: getattr(args, k) for k in ("variant", "device", "runtime", "precision", "weights")}
    args.images = _with_stdin(args.images)  # read before the model loads: an empty pipe is said at once
    return _predict_files(resolve_model(args.model, **options), args)


def _predict_files(model, args) -> int:
    """One line per image (a person's, or JSON with --json): its answer (and boxes, heatmap file), as
    ``headstart.load(...).answers`` gives it; a file that cannot be read is a line with an ``error`` and exit
    status 1."""
    from headstart.predicting import LoadedModel

    answers = LoadedModel(model, args.model).answers(
        args.images,
        top_k=args.top_k,
        localize=args.localize,
        conf=args.conf,
        novelty_threshold=args.novelty_threshold,
        label_threshold=args.label_threshold,
        heatmaps=args.heatmap,
        sort_into=args.sort_into,
        copy=args.copy,
    )
    status, count, multilabel, folders = 0, 0, model.thresholds is not None, Counter()
    for answer in answers:
        line = _predicted(answer)
        status, count = 1 if answer.error else status, count + 1
        folders.update(Path(f).parent.name for f in answer.sorted or ())
        print(json.dumps(line) if args.json else _answer_line(line["image"], line, multilabel), flush=True)
    if not count:
        raise ValueError(f"{' '.join(args.images)} names no images (folders are searched for image file names).")
    if args.sort_into:
        how = "copies" if args.copy else "links to the files (--copy copies them)"
        each = ", ".join(f"{name} {n}" for name, n in sorted(folders.items()))
        print(f"sorted into {args.sort_into} as {how}: {each or 'nothing'}", file=sys.stderr)
    return status


def _with_stdin(images: list[str]) -> list[str | bytes]:
    """``images`` with ``-`` read from standard input: an image's bytes (``curl -s URL | headstart predict MODEL -``)
    or, where it is text, a list of images, a path or URL per line as in a .txt list (``find photos -name '*.jpg' |
    headstart predict MODEL -``), or paths ended by NUL bytes (``find ... -print0``)."""
    from headstart.service.files import MAX_FILE_BYTES, too_large_message

    if "-" not in images:
        return images
    if images.count("-") > 1:
        raise ValueError("'-' (standard input) can be given once.")
    if sys.stdin is None or sys.stdin.isatty():
        raise ValueError(
            "'-' reads standard input, and nothing is piped into it: cat photo.jpg | headstart predict MODEL -, or "
            "find photos -name '*.jpg' | headstart predict MODEL -"
        )
    chunks, size, text = [], 0, True
    while chunk := sys.stdin.buffer.read(1 << 20):
        text = text and b"\0" not in chunk  # every image format holds NUL bytes in its headers; a list never does
        size += len(chunk)
        if size > MAX_FILE_BYTES and not text:
            raise ValueError(f"Standard input: {too_large_message(size, MAX_FILE_BYTES)}")
        chunks.append(chunk)
    data = b"".join(chunks)
    if not data.strip():
        raise ValueError(
            "Standard input ('-') is empty: pipe an image, or a list of images (a path per line), into it."
        )
    where = images.index("-")
    first = data.split(b"\0", 1)[0]
    if not text and 0 < len(first) < 4096 and os.path.lexists(first):  # find -print0: names ended by NUL bytes
        read = [os.fsdecode(name) for name in data.split(b"\0") if name.strip()]
        return [*images[:where], *read, *images[where + 1 :]]
    if not text:
        return [*images[:where], data, *images[where + 1 :]]
    lines = data.decode("utf-8", "surrogateescape").splitlines()  # a name that is not UTF-8: its error line says so
    read = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    if not read:
        raise ValueError("Standard input ('-') lists no images: its lines are comments only.")
    return [*images[:where], *read, *images[where + 1 :]]


def _predicted(answer) -> dict:
    """`headstart predict`'s line of one answer: the image (``-``: standard input's), and the answer's fields (the
    optional ones where set; an error alone)."""
    image = "-" if answer.image is None else answer.image
    if answer.error:
        return {"image": image, "error": answer.error}
    optional = ("detections", "method", "image_size", "heatmap", "sorted")
    fields = answer.model_dump(exclude={"image", "error"})
    return {"image": image, **{k: v for k, v in fields.items() if k not in optional or v is not None}}


def _cmd_export(args) -> int:
    from headstart.exporter import export_bundle

    result = export_bundle(
        args.run_dir,
        args.out,
        int8=args.int8,
        force=args.force,
        name=args.name,
        store=args.store,
        weights=args.weights,
        int8_weight_bits=args.int8_weight_bits,
        data=args.data,
    )
    m = result.manifest
    data = {"bundle": str(result.bundle_dir), "tag": result.tag, "verification": m.verification, "int8": m.int8}
    kept = f"; int8 kept ({(m.int8 or {}).get('weight_bits')}-bit weights)"
    int8 = "" if not args.int8 else kept if m.int8 else "; int8 not kept (the log above says why)"
    line = f"{result.bundle_dir}{f' (model store: {result.tag})' if result.tag else ''}: verified"
    _print(args, data, f"{line}, {_figures(m.verification)}{int8}")
    return 0


def _add_bundle_options(p, device: bool) -> None:
    """How a bundle is run: which file, runtime and precision (and device), chosen as the service chooses them."""
    from headstart.service.runtime import DEVICES, PRECISIONS, RUNTIMES, VARIANTS

    p.add_argument("--variant", default="fp32", choices=VARIANTS, help="bundle model to use")
    if device:
        p.add_argument("--device", default="auto", choices=DEVICES, help="bundle inference device")
    p.add_argument(
        "--runtime",
        default="auto",
        choices=RUNTIMES,
        help="bundle runtime, chosen as the service does (auto: ONNX Runtime on a GPU, else OpenVINO)",
    )
    p.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 on OpenVINO only where the export verified it; fp32: always full precision",
    )


def _add_evaluate(sub) -> None:
    p = sub.add_parser(
        "evaluate",
        help="metrics and plots of a model on a labelled data set",
        description="Metrics and plots of a model on a labelled data set of its task: a run directory (its PyTorch "
        "model), a bundle directory or a model-store tag (on the runtime the service would use, as predict runs it).",
    )
    p.add_argument("model", help="run directory, bundle directory, or model-store tag NAME[:VERSION]")
    p.add_argument(
        "data_dir", help="labelled data of the model's task: class subfolders or an image,label CSV, a YOLO data set"
    )
    p.add_argument("--out", help="output folder (default RUN/eval, or BUNDLE-eval beside a bundle; needed for a tag)")
    p.add_argument("--weights", help="backbone weights file, if it moved since training (run directories)")
    _add_json(p)
    _add_bundle_options(p, device=True)
    p.add_argument(
        "--other",
        help="a folder of images of things the model never learned (classifiers): how well the novelty score tells "
        "them from the labelled images (AUROC) and how many it lets through as one of the classes",
    )


def _add_novelty_threshold(p) -> None:
    p.add_argument(
        "--novelty-threshold",
        type=float,
        help="novelty above which an image is 'none of these' (default: the model's calibrated threshold)",
    )


def _add_predict(sub) -> None:
    from headstart.service.localize import DEFAULTS

    p = sub.add_parser("predict", help="the answer for each image: one line a person reads, or JSON (--json)")
    p.add_argument("model", help="run directory, bundle directory, or model-store tag NAME[:VERSION]")
    p.add_argument(
        "images",
        nargs="+",
        help="image files, folders (searched recursively), quoted globs, http(s) URLs, .txt/.csv lists of them, or "
        "- for standard input (an image's bytes, or a list of images, one per line)",
    )
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", action="store_true", help="one JSON line per image (the HTTP answer's fields)")
    p.add_argument(
        "--label-threshold",
        type=float,
        help="a multi-label model: one threshold for every label (default: those chosen on validation)",
    )
    p.add_argument("--localize", action="store_true", help="also print boxes (CAM for classifiers)")
    p.add_argument("--conf", type=float, default=DEFAULTS.conf, help="lowest box confidence with --localize")
    p.add_argument("--weights", help="backbone weights file, if it moved since training (run directories)")
    p.add_argument(
        "--heatmap",
        metavar="DIR",
        help="also write each image's class activation heatmap (the top class) as DIR/NAME.heatmap.jpg",
    )
    p.add_argument(
        "--sort-into",
        metavar="DIR",
        help="also sort the images into a folder per class: DIR/CLASS/ (DIR/none-of-these/; a multi-label model: "
        "the folder of each label, DIR/no-label/), as links to the files (a class-folder data set to look "
        "through, put right and train on)",
    )
    p.add_argument("--copy", action="store_true", help="with --sort-into: copy the images instead of linking them")
    _add_novelty_threshold(p)
    _add_bundle_options(p, device=True)


def _add_predict_batch(sub) -> None:
    from headstart.service.localize import DEFAULTS

    p = sub.add_parser(
        "predict-batch",
        help="predict a whole image collection on Ray Data into parquet parts",
        description="Predict every image of SOURCE (a folder, a glob, a folder URI such as s3://bucket/photos/, "
        "or a .txt/.csv/.parquet list of paths, URIs or http(s) URLs) with a bundle, on a local Ray instance or a "
        "cluster (--ray-address), into "
        "parquet parts under --out. Rerunning the same command resumes: finished parts are kept.",
    )
    p.add_argument("model", help="bundle directory or model-store tag NAME[:VERSION]")
    p.add_argument(
        "source", help="folder, glob, folder URI (s3://, gs://, ...), or .txt/.csv/.parquet list of image paths or URIs"
    )
    p.add_argument("--out", required=True, help="output folder of parquet parts")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--localize", action="store_true", help="also the boxes (JSON per row)")
    p.add_argument("--conf", type=float, default=DEFAULTS.conf, help="lowest box confidence with --localize")
    _add_novelty_threshold(p)
    _add_bundle_options(p, device=False)
    p.add_argument("--batch-size", type=int, default=32, help="images per actor call")
    p.add_argument("--actors", type=int, help="predicting actors (default: one per CPU of the cluster)")
    p.add_argument(
        "--cpus-per-actor",
        type=float,
        help="CPUs each actor holds (default: all CPUs but one, shared; one inference thread per CPU)",
    )
    p.add_argument(
        "--gpus-per-actor",
        type=float,
        default=0.0,
        help="GPUs each actor holds; > 0 runs the bundle with ONNX Runtime's CUDA provider (not measured)",
    )
    p.add_argument("--part-size", type=int, default=1000, help="images per output part (the unit of resuming)")
    _add_json(p)
    p.add_argument("--ray-address", help="join this Ray cluster (default $RAY_ADDRESS, else a local instance)")
    p.add_argument("--no-progress", dest="progress", action="store_false")


def _add_export(sub) -> None:
    from headstart.service.cpu import INT8_WEIGHT_BITS, INT8_WEIGHT_BITS_CHOICES

    p = sub.add_parser("export", help="verified ONNX bundle (+ int8), imported into the BentoML model store")
    p.add_argument("run_dir")
    p.add_argument("--out", help="bundle directory (default RUN_DIR/bundle)")
    p.add_argument("--int8", action="store_true", help="also a static int8 model, calibrated on training images")
    p.add_argument(
        "--int8-weight-bits",
        type=int,
        choices=INT8_WEIGHT_BITS_CHOICES,
        default=INT8_WEIGHT_BITS,
        help="the int8 model's weights in 7 bits (default: right on every CPU) or 8 (closer to fp32, but x86 CPUs "
        "without VNNI or AMX saturate on them: only for servers known to have them)",
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="keep the int8 model even if it loses > 1 accuracy point; replace an --out that is not a bundle",
    )
    p.add_argument("--name", help="model name in the store (default: the run directory's name)")
    p.add_argument("--no-store", dest="store", action="store_false", help="do not import into the BentoML store")
    _add_json(p)
    p.add_argument("--weights", help="backbone weights file, if it moved since training")
    p.add_argument(
        "--data",
        help="the data set's folder (or its data.yaml / labels CSV), if it moved since training: export checks the "
        "model on its validation images",
    )


def _add_serve(sub) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over HTTP with BentoML (classify, localize, /ui)",
        description="Run `bentoml serve` of the headstart service with MODEL: a model-store tag NAME[:VERSION], a "
        "bundle directory, or a run directory holding an exported bundle. Binds 127.0.0.1 unless --host says "
        "otherwise (0.0.0.0: every interface). Settings not given here are read from HEADSTART_* variables.",
    )
    p.add_argument("model", help="model-store tag NAME[:VERSION], bundle directory, or run directory")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=3000)
    p.add_argument("--workers", type=int, help="worker processes (default: one per core on a CPU, one on a GPU)")
    p.add_argument("--threads", type=int, help="inference threads per worker (default: cores / workers)")
    _add_bundle_options(p, device=True)
    p.set_defaults(variant=None, device=None, runtime=None, precision=None)  # not given: HEADSTART_*, else default


def _add_compare(sub) -> None:
    p = sub.add_parser("compare", help="the options that differ between runs and their headline metrics")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def _cmd_compare(args) -> int:
    from headstart.compare import compare_runs, format_comparison

    result = compare_runs(args.run_dirs)
    print(json.dumps(result) if args.json else format_comparison(result))
    return 0


def _add_convert(sub) -> None:
    p = sub.add_parser(
        "convert",
        help="a COCO JSON or Pascal VOC detection data set as a YOLO one to train on",
        description="Write a COCO JSON data set (annotations/instances_*.json, a Roboflow export's "
        "SPLIT/_annotations.coco.json, or the JSON file) or a Pascal VOC one (Annotations/, JPEGImages/, "
        "ImageSets/Main/) as a YOLO data set in OUT: data.yaml, images/SPLIT/ (links to the source's images, or "
        "copies with --copy) and labels/SPLIT/*.txt. The source is not touched; what cannot be used (crowd regions, "
        "boxes of no area, missing images) is left out and counted. Then: headstart train OUT --out RUN.",
    )
    p.add_argument("source", help="the COCO or VOC data set's folder (or a COCO JSON file)")
    p.add_argument("--out", required=True, help="a new (or empty) folder for the YOLO data set")
    p.add_argument("--copy", action="store_true", help="copy the images instead of linking to them")
    _add_json(p)


def _cmd_convert(args) -> int:
    from headstart.convert import convert

    result = convert(args.source, args.out, copy=args.copy)
    _print(args, result.to_dict(), f"{result.format()}\nthen: headstart train {args.out} --out RUN")
    return 0


def _add_cache(sub) -> None:
    p = sub.add_parser(
        "cache",
        help="the feature cache: where it is and how large; --keep-gb N removes the least recently used features",
        description="The feature cache every run reads and fills (features of each image's views, and the notes of "
        "the images a data check read). It only grows: remove what you no longer use with --keep-gb or --clear "
        "(a run that needs a removed feature computes it again). Nothing else in the folder is touched.",
    )
    p.add_argument("--cache-dir", help="the cache (default $HEADSTART_CACHE or ~/.cache/headstart)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--keep-gb", type=float, help="remove the least recently used files beyond this many GiB")
    what.add_argument("--clear", action="store_true", help="remove every file of the cache")
    _add_json(p)


def _cmd_cache(args) -> int:
    import time

    from headstart.features import FeatureCache, default_cache_dir

    if args.keep_gb is not None and args.keep_gb < 0:
        raise ValueError(f"--keep-gb must be 0 or more, not {args.keep_gb}.")
    root = Path(args.cache_dir) if args.cache_dir else default_cache_dir()
    if root.exists() and not root.is_dir():  # read as an empty cache before
        raise ValueError(f"{root} is a file, not a feature cache: give the cache's folder (--cache-dir).")
    cache = FeatureCache(root)
    removed = None
    if args.clear or args.keep_gb is not None:
        files, freed = cache.prune(0 if args.clear else int(args.keep_gb * 2**30))
        removed = {"files": files, "bytes": freed}
    usage = cache.usage()

    def day(t: float | None) -> str:
        return time.strftime("%Y-%m-%d", time.localtime(t)) if t else "-"

    def size(n: int) -> str:
        return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"

    line = f"feature cache {usage['root']}: {usage['files']} files, {size(usage['bytes'])}"
    if usage["files"]:
        line += f" (least recently used {day(usage['oldest'])}, most recently {day(usage['newest'])})"
    if removed is not None:
        line = f"removed {removed['files']} files ({size(removed['bytes'])}); {line}"
    _print(args, {**usage, "removed": removed}, line)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headstart", description=__doc__)
    parser.add_argument(
        "-v", "--verbose", action="store_true", help="headstart's debug lines and the libraries' INFO lines (named)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    verbs = (_add_train, _add_crossval, _add_evaluate, _add_predict, _add_predict_batch, _add_export, _add_serve)
    for add in (*verbs, _add_convert, _add_compare, _add_cache):
        add(sub)
    return parser


def _cmd_predict_batch(args) -> int:
    """Predict a whole image collection on Ray Data (torch-free workers); prints the summary as JSON."""
    from headstart.extras import require

    require("ray")
    from headstart.service.batch import predict_batch

    summary = predict_batch(
        args.model,
        args.source,
        args.out,
        top_k=args.top_k,
        localize=args.localize,
        conf=args.conf,
        novelty_threshold=args.novelty_threshold,
        variant=args.variant,
        runtime=args.runtime,
        precision=args.precision,
        batch_size=args.batch_size,
        actors=args.actors,
        cpus_per_actor=args.cpus_per_actor,
        gpus_per_actor=args.gpus_per_actor,
        ray_address=args.ray_address,
        part_size=args.part_size,
        progress=args.progress,
    )
    line = (
        f"{summary['images']} images, {summary['errors']} errors, "
        f"{summary.get('images_per_second', '-')} images/s -> {args.out}"
    )
    _print(args, {"out": str(args.out), **summary}, line)
    return 0


def _cmd_serve(args) -> int:
    """Check the model and the options at once (one line and exit 2 when wrong), then become `bentoml serve`."""
    from headstart.api import serve_settings
    from headstart.service.devserver import serve

    options = {k: getattr(args, k) for k in ("port", "workers", "threads", "variant", "device", "runtime", "precision")}
    model, env = serve_settings(args.model, host=args.host, **options)
    log.info("serving %s on http://%s:%d (Ctrl-C stops it)", model, args.host, args.port)
    serve(model, args.host, args.port, **env)
    return 0  # not reached: the process is now bentoml serve


COMMANDS = {
    "train": _cmd_train,
    "evaluate": _cmd_evaluate,
    "predict": _cmd_predict,
    "export": _cmd_export,
    "predict-batch": _cmd_predict_batch,
    "crossval": _cmd_crossval,
    "serve": _cmd_serve,
    "compare": _cmd_compare,
    "convert": _cmd_convert,
    "cache": _cmd_cache,
}


#: Loggers whose INFO lines the CLI prints; other libraries' only from WARNING up. With --verbose: these from DEBUG,
#: the others from INFO, named (the libraries' DEBUG lines stay out: a `headstart -v train` printed 400 of them, PIL's
#: EXIF tags of every photo and matplotlib's scores of every font, and none of its own).
OWN_LOGGERS = ("headstart", "training", "service", "models", "bentoml.headstart", "__main__")


def ours_or_warnings(record: logging.LogRecord) -> bool:
    return record.levelno >= logging.WARNING or record.name.startswith(OWN_LOGGERS)


class NamingOthers(logging.Formatter):
    """Our lines as they are; another library's with its logger's name in front (``[onnxscript] ...``)."""

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        return line if record.name.startswith(OWN_LOGGERS) else f"[{record.name}] {line}"


def configure_logging(verbose: bool) -> None:
    """INFO up to stderr, other libraries' only from WARNING up; with ``verbose`` see :data:`OWN_LOGGERS`."""
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for handler in logging.getLogger().handlers:
        if verbose:
            handler.setFormatter(NamingOthers("%(message)s"))
        else:  # the libraries' INFO chatter (80 lines of ONNX rewriting per export) only with --verbose
            handler.addFilter(ours_or_warnings)
    for name in OWN_LOGGERS:  # NOTSET: the root's INFO (also where an earlier call in this process was verbose)
        logging.getLogger(name).setLevel(logging.DEBUG if verbose else logging.NOTSET)


def main(argv: list[str] | None = None) -> int:
    from headstart.service import usage_reports

    usage_reports.turn_off(openvino_converter=True)  # a process of headstart's own: OpenVINO without its converter
    escaping_streams()
    args = build_parser().parse_args(argv)
    configure_logging(args.verbose)
    if args.command in ("train", "crossval", "evaluate"):  # the commands that draw plots
        matplotlib_folder()
    if args.command in ("train", "crossval", "predict-batch") and not sys.stderr.isatty():
        args.progress = False  # bars redraw a terminal; in a log or a pipe each update would be a line of its own
    from headstart.extras import missing_extra
    from headstart.service.errors import HeadstartError  # torch-free: `headstart predict BUNDLE` never imports torch

    try:
        return COMMANDS[args.command](args)
    except (HeadstartError, ValueError) as exc:
        print(f"headstart {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # a library of one of headstart's extras not installed: which extra
        missing = missing_extra(exc)
        if missing is None:
            raise
        print(f"headstart {args.command}: error: {missing}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headstart {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `headstart predict ... | head`: the reader has all it wanted (a traceback before)
        with contextlib.suppress(OSError):  # nothing more goes to the closed pipe, the final flush included
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # as a command ended by SIGPIPE
    except OSError as exc:  # the file system refused: a folder that cannot be made or written, a full disk
        if args.verbose:
            raise
        print(f"headstart {args.command}: error: {refused(exc)}", file=sys.stderr)
        return 1


#: what to do about the file system's refusals, by errno name (EDQUOT is not on every system)
WHAT_TO_DO = {
    getattr(errno, name): todo
    for names, todo in (
        (("ENOTDIR",), "a file stands where a folder is needed: choose another path"),
        (("EEXIST",), "something of that name is in the way: choose another path"),
        (("EACCES", "EPERM"), "this user may not write there: choose a folder it can write"),
        (("EROFS",), "the file system is read-only: choose a folder on another"),
        (("ENOSPC", "EDQUOT"), "the disk is full: free some space, or choose a folder on another disk"),
        (("ENAMETOOLONG",), "the name is too long for the file system: choose a shorter path"),
    )
    for name in names
    if hasattr(errno, name)
}


def refused(exc: OSError) -> str:
    """An OSError as one line: what was refused, where, and what to do (``-v`` shows the traceback): `headstart
    train --out` under a file, `--heatmap` on a read-only disk, a full disk printed a traceback."""
    where = f": {exc.filename}" if exc.filename else ""
    what = exc.strerror or str(exc)
    todo = WHAT_TO_DO.get(exc.errno)
    return f"{what}{where}" + (f" ({todo})" if todo else "")


def matplotlib_folder() -> None:
    """MPLCONFIGDIR in the temporary folder (``headstart-matplotlib-UID``, kept from run to run) where matplotlib's
    own cannot be written (a missing or read-only home): matplotlib made a new temporary one at each run, listed
    the system's fonts into it again (0.13 s with this machine's 39 font files, more with a desktop's hundreds) and
    said so in two lines of warning each time.
    An MPLCONFIGDIR set is left as it is."""
    from headstart.runs import stand_in, unwritable

    if os.environ.get("MPLCONFIGDIR"):
        return
    home = os.path.expanduser("~")
    if sys.platform.startswith("linux") or sys.platform.startswith("freebsd"):  # matplotlib's own choice
        folder = Path(os.environ.get("XDG_CONFIG_HOME") or os.path.join(home, ".config")) / "matplotlib"
    else:
        folder = Path(home) / ".matplotlib"
    if home != "~" and folder.is_absolute() and not unwritable(folder):
        return
    instead = stand_in("matplotlib")
    if instead is not None:
        os.environ["MPLCONFIGDIR"] = str(instead)
        log.debug("matplotlib's folder %s cannot be written: MPLCONFIGDIR=%s", folder, instead)


def escaping_streams() -> None:
    """Standard output and error that cannot encode every character (a file or pipe on Windows, in cp1252;
    PYTHONIOENCODING=ascii) write what they cannot as an escape (``\\u871c``): the first class name in another script
    stopped `headstart predict > answers.txt` with "'charmap' codec can't encode characters"."""
    for stream in (sys.stdout, sys.stderr):
        encoding = (getattr(stream, "encoding", None) or "utf-8").lower()
        if not encoding.startswith("utf") and hasattr(stream, "reconfigure"):
            stream.reconfigure(errors="backslashreplace")


def run() -> None:
    """The `headstart` command (and `python -m headstart`): :func:`main`, then :func:`exit_now`."""
    exit_now(main())


def exit_now(code: int) -> None:
    """Exit with ``code`` once the command is done, without what a normal exit adds and nobody needs: the
    interpreter's teardown (with torch loaded, freeing every module takes 0.7-1.4 s and writes nothing) and the wait
    for threads libraries leave behind (where the user opted in to OpenVINO's usage reports, its import sends an
    event from a thread, which a machine without internet access waits out). Measured on the 2-core AMD EPYC:
    `headstart train` exited 1.5 s after its last line, now at once. The exit handlers run (Ray, multiprocessing,
    temporary folders), logs and the standard streams are flushed first; headstart's own threads have all finished
    when a command returns."""
    import atexit
    import contextlib

    atexit._run_exitfuncs()
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe: nothing more can be said there
            stream.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
