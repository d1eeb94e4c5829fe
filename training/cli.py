"""The `headstart` command: train, evaluate, predict, export."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("headstart")


def _add_train(sub) -> None:
    p = sub.add_parser("train", help="train a new head on a frozen pretrained backbone",
                       description="Train a head on a frozen pretrained backbone: a classifier from an image folder "
                       "(one subfolder per class, optionally inside train/ val/ test/), or a YOLO-style grid "
                       "detector from a YOLO-format data set (a folder with data.yaml, or the yaml itself). "
                       "Defaults marked * differ by task: classifier / detector.")  # fmt: skip
    p.add_argument(
        "data_dir",
        help="image folder: one subfolder per class, optionally inside train/ and val/; or a YOLO data set",
    )
    p.add_argument("--out", required=True, help="run directory to write")
    g = p.add_argument_group("backbone")
    g.add_argument(
        "--backbone", default="resnet50", help="timm model name or torchvision:NAME (default resnet50)"
    )
    g.add_argument(
        "--weights", help="local state dict (.pth/.safetensors) instead of downloading pretrained weights"
    )
    g.add_argument("--no-pretrained", dest="pretrained", action="store_false", help="random backbone weights")
    g.add_argument("--unfreeze", type=int, default=0, help="fine-tune the last N backbone stages afterwards")
    g.add_argument("--finetune-epochs", type=int, default=5)
    g.add_argument("--finetune-lr", type=float, default=1e-4, help="backbone learning rate (head gets 10x)")
    g = p.add_argument_group("data and augmentation")
    g.add_argument(
        "--val-fraction", type=float, default=0.2, help="validation share when there is no val/ folder"
    )
    g.add_argument("--augment", default="heavy", choices=["none", "light", "heavy"])
    g.add_argument(
        "--views", type=int, default=8, help="augmented views per training image (features cached)"
    )
    g.add_argument("--cache-dir", help="feature cache (default $HEADSTART_CACHE or ~/.cache/headstart)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the feature cache")
    g.add_argument(
        "--precision",
        default="auto",
        choices=["auto", "fp32", "bf16"],
        help="for augmented training views; auto = bf16 where the CPU has bf16 units",
    )
    g = p.add_argument_group("head")
    g.add_argument("--hidden", type=int, help="* hidden width: 0 (linear head) / 256")
    g.add_argument("--dropout", type=float, help="* 0.2 / 0.1")
    g.add_argument("--activation", default="relu", choices=["relu", "leaky_relu"])
    g = p.add_argument_group("detection (YOLO-format data sets only)")
    g.add_argument("--input-size", type=int, help="square input, letterboxed (default 320: a 10x10 grid)")
    g.add_argument("--boxes-per-cell", type=int, help="box predictors per grid cell (default 2)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--epochs", type=int, help="* 100 / 60")
    g.add_argument("--patience", type=int, help="* early stopping: 10 epochs without a better val loss / "
                   "15 epochs without a better val mAP@0.5")  # fmt: skip
    g.add_argument("--batch-size", type=int, help="* 128 / 32")
    g.add_argument("--lr", type=float, default=1e-3)
    g.add_argument("--weight-decay", type=float, help="* 1e-4 / 5e-4")
    g.add_argument("--label-smoothing", type=float, default=0.0)
    g.add_argument(
        "--class-weights",
        default="auto",
        choices=["auto", "on", "off"],
        help="class-weighted loss; auto = when classes are unbalanced (ratio > 1.5)",
    )
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("run")
    g.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    g.add_argument("--overwrite", action="store_true", help="replace an existing run in --out")
    g.add_argument("--no-progress", dest="progress", action="store_false")


DETECT_ONLY = ("input_size", "boxes_per_cell")
CLASSIFY_ONLY = ("unfreeze", "activation", "label_smoothing", "class_weights")


def _cmd_train(args) -> int:
    from training.detect_data import find_data_yaml

    given = {k: v for k, v in vars(args).items() if v is not None}  # unset options take the task's default
    if find_data_yaml(args.data_dir) is not None:
        from training.detect import DetectConfig, train_detector

        defaults = build_parser().parse_args(["train", "x", "--out", "x"])
        changed = [k for k in CLASSIFY_ONLY if getattr(args, k) != getattr(defaults, k)]
        if changed:
            raise ValueError(f"--{changed[0].replace('_', '-')} applies to classification only; "
                             f"{args.data_dir} is a YOLO detection data set.")  # fmt: skip
        keys = DetectConfig.__dataclass_fields__
        train_detector(DetectConfig(**{k: v for k, v in given.items() if k in keys}))
        return 0
    from training.train import TrainConfig, train

    for key in DETECT_ONLY:
        if key in given:
            raise ValueError(f"--{key.replace('_', '-')} applies to YOLO detection data sets (with a data.yaml); "
                             f"{args.data_dir} has none.")  # fmt: skip
    keys = TrainConfig.__dataclass_fields__
    train(TrainConfig(**{k: v for k, v in given.items() if k in keys}))
    return 0


def _cmd_evaluate(args) -> int:
    import numpy as np

    from training.data import scan_eval_folder
    from training.evaluate import write_evaluation
    from training.predict import predict_paths
    from training.runs import load_run, write_json

    run = load_run(args.run_dir, weights=args.weights)
    if run.config.get("task") == "detect":
        return _evaluate_detector(run, args)
    report = scan_eval_folder(args.data_dir, run.labels)
    log.info("%s", report.format())
    samples = report.splits["eval"]
    out = Path(args.out) if args.out else run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    probs = predict_paths(run.model, [s.path for s in samples], run.spec)
    metrics = write_evaluation(out, probs, np.array([s.label for s in samples]), run.labels,
                               [s.path for s in samples], run.spec)  # fmt: skip
    metrics = {"split": str(Path(args.data_dir).resolve()), **metrics, "data": report.to_dict()}
    write_json(out / "metrics.json", metrics)
    summary = {k: metrics[k] for k in ("num_images", "accuracy", "macro_f1", "calibration_error")}
    print(json.dumps({**summary, "out": str(out)}))
    return 0


def _evaluate_detector(run, args) -> int:
    """mAP of a detection run on a YOLO-format data set's 'test' split, else 'val', else 'train'."""
    from training.detect import evaluate_detector
    from training.detect_data import scan_yolo_eval_split
    from training.evaluate import plot_detections
    from training.runs import write_json

    report = scan_yolo_eval_split(args.data_dir)
    (split,) = report.splits
    log.info("%s", report.format())
    log.info("evaluating on the %s", report.split_source)
    if report.labels != run.labels:
        raise ValueError(
            f"{report.yaml_path} names other classes than the run was trained on; cannot evaluate."
        )
    samples = report.splits[split]
    out = Path(args.out) if args.out else run.run_dir / "eval"
    out.mkdir(parents=True, exist_ok=True)
    metrics, preds, truth = evaluate_detector(run.model, samples, run.spec, run.labels)
    plot_detections([s.path for s in samples], preds, truth, run.labels, out / "predictions.png")
    write_json(
        out / "metrics.json",
        {"split": str(Path(args.data_dir).resolve()), **metrics, "data": report.to_dict()},
    )
    summary = {"split": split, **{k: metrics[k] for k in ("num_images", "num_boxes", "map50", "map50_95")}}
    print(json.dumps({**summary, "out": str(out)}))
    return 0


def _cmd_predict(args) -> int:
    """Predict with a run directory (PyTorch), or a bundle directory / model-store tag (ONNX Runtime)."""
    from service.preprocess import ImageError, decode_image

    model_ref = Path(args.model)
    if not model_ref.exists() and ("/" in args.model or "\\" in args.model):
        from service.bundle import BundleError

        raise BundleError(
            f"{args.model} does not exist. Give a run directory (headstart train --out), a bundle directory "
            "(headstart export --out) or a model-store tag NAME[:VERSION]."
        )
    if (model_ref / "config.yaml").is_file():
        from training.predict import RunModel
        from training.runs import load_run

        model = RunModel(load_run(model_ref, weights=args.weights))
    else:
        from service.bundle import load_bundle

        model = load_bundle(args.model, variant=args.variant, device=args.device)
    from service.inference import classify_images
    from service.localize import LocalizeParams, localize_images

    params = LocalizeParams(conf=args.conf) if args.localize else None

    def classify(path: Path) -> dict:
        img = decode_image(path)
        out = {"predictions": classify_images(model, [img], args.top_k)[0]}
        if params is not None:
            result = localize_images(model, [img], params)[0]
            out.update(
                detections=result["detections"], method=result["method"], image_size=result["image_size"]
            )
        return out

    status = 0
    for image in args.images:
        try:
            result = classify(Path(image))
        except (ImageError, OSError) as exc:
            print(json.dumps({"image": image, "error": str(exc)}))
            status = 1
            continue
        print(json.dumps({"image": image, **result}))
    return status


def _cmd_export(args) -> int:
    from training.export import export_bundle

    result = export_bundle(
        args.run_dir, args.out, int8=args.int8, force=args.force, name=args.name, store=args.store,
        weights=args.weights,
    )  # fmt: skip
    m = result.manifest
    print(json.dumps({"bundle": str(result.bundle_dir), "tag": result.tag, "verification": m["verification"],
                      "int8": m["int8"]}))  # fmt: skip
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="headstart", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_train(sub)
    p = sub.add_parser("evaluate", help="metrics and plots of a trained run on a labelled folder")
    p.add_argument("run_dir")
    p.add_argument("data_dir", help="labelled folder: one subfolder per class")
    p.add_argument("--out", help="output folder (default RUN_DIR/eval)")
    p.add_argument("--weights", help="backbone weights file, if it moved since training")
    p = sub.add_parser("predict", help="top-k labels and scores as JSON lines")
    p.add_argument("model", help="run directory, bundle directory, or model-store tag NAME[:VERSION]")
    p.add_argument("images", nargs="+")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--localize", action="store_true", help="also print boxes (CAM for classifiers)")
    p.add_argument("--conf", type=float, default=0.25, help="lowest box confidence with --localize")
    p.add_argument("--weights", help="backbone weights file, if it moved since training (run directories)")
    p.add_argument("--variant", default="fp32", choices=["fp32", "int8"], help="bundle model to use")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"], help="ONNX Runtime device")
    p = sub.add_parser("export", help="verified ONNX bundle (+ int8), imported into the BentoML model store")
    p.add_argument("run_dir")
    p.add_argument("--out", help="bundle directory (default RUN_DIR/bundle)")
    p.add_argument(
        "--int8", action="store_true", help="also a static int8 model, calibrated on training images"
    )
    p.add_argument(
        "--force",
        action="store_true",
        help="keep the int8 model even if it loses > 1 accuracy point; replace an --out that is not a bundle",
    )
    p.add_argument("--name", help="model name in the store (default: the run directory's name)")
    p.add_argument(
        "--no-store", dest="store", action="store_false", help="do not import into the BentoML store"
    )
    p.add_argument("--weights", help="backbone weights file, if it moved since training")
    return parser


COMMANDS = {"train": _cmd_train, "evaluate": _cmd_evaluate, "predict": _cmd_predict, "export": _cmd_export}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(message)s",
                        stream=sys.stderr)  # fmt: skip
    from service.errors import HeadstartError  # torch-free: `headstart predict BUNDLE` never imports torch

    try:
        return COMMANDS[args.command](args)
    except (HeadstartError, ValueError) as exc:
        print(f"headstart {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"headstart {args.command}: interrupted; rerun with --resume to continue", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
