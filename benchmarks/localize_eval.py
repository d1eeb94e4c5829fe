"""Detection on coco128 under k-fold cross-validation: three detectors on the same folds, then localize latency.

Every image is scored once, by a model that never saw it (``training/crossval.py``: folds by content hash and seed;
per fold, the other folds train, and a fifth of them picks the epoch). On the same folds, in one run:

1. ``grid``: the single-scale grid head (stride 32) with its own defaults (320 px, 8 views, 60 epochs, hidden 256).
2. ``faster-rcnn``: torchvision's Faster R-CNN on the same frozen MobileNetV2 (its stride-32 map, 512 px), RPN
   and box head trained for ``--frcnn-epochs`` epochs with horizontal flips: the single-map anchor of the issue.
3. ``pyramid``: headstart's multi-scale detector with the product defaults (`headstart train` on a YOLO data set).

For person only (a person detector) and for all 80 classes (Faster R-CNN: person only unless ``--frcnn-all``): AP50,
AP50:95 and AP small/medium/large (COCO areas), mean ± spread over folds, and training seconds per fold. Then the
pyramid detector of fold 1 (person) is exported with ``--int8``: AP50 of every file on every runtime it may be served
with, on that fold's held-out images (not the validation images the export's gate uses), and the latency of
`localize` against `classify` on that bundle at its input size (512), one image at a time, in process and over HTTP.

    .venv/bin/python benchmarks/localize_eval.py [--folds 4] [--frcnn-epochs 12] [--skip grid,faster-rcnn]

``--ablate [NAMES]`` adds, for person only, variants of the pyramid detector that each change one default (width 128,
4 or 8 views per image for 30 or 15 epochs instead of 12 for 10,
no mosaic, 384 px, every cell inside a box assigned (no centre sampling), a plain focal loss instead
of the IoU-quality target), on the same folds: all of them, or the comma-separated names of ``ablations()``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED, check_idle, machine_line, running_server

COCO = SHARED / "data" / "coco128"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
GRID = dict(head="grid", input_size=320, views=8, epochs=60, hidden=256, eval_every=5)


def frcnn_fold(train: list, test: list, num_classes: int, epochs: int, seed: int) -> tuple[dict, float]:
    """Faster R-CNN (torchvision) on the frozen MobileNetV2's stride-32 map: train on ``train``, score ``test``."""
    import torch
    from torchvision.models.detection import FasterRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
    from torchvision.ops import MultiScaleRoIAlign

    from headstart.models import build_backbone
    from headstart.service.preprocess import decode_image
    from headstart.tasks.detect.metrics import ground_truth_in_pixels, mean_average_precision

    torch.manual_seed(seed)
    backbone = build_backbone("torchvision:mobilenet_v2", weights=str(WEIGHTS))
    body = backbone.features.eval()
    body.out_channels = backbone.num_features
    model = FasterRCNN(
        body,
        min_size=512,
        max_size=512,
        box_predictor=FastRCNNPredictor(512, num_classes + 1),
        rpn_anchor_generator=AnchorGenerator(((32, 64, 128, 256, 512),), ((0.5, 1.0, 2.0),)),
        box_roi_pool=MultiScaleRoIAlign(["0"], 7, 2),
        box_batch_size_per_image=64,
        box_head=TwoMLPHead(backbone.num_features * 49, 512),
        image_mean=list(backbone.preprocess.mean),
        image_std=list(backbone.preprocess.std),
    )

    def tensor(path) -> torch.Tensor:
        return torch.from_numpy(np.asarray(decode_image(path).convert("RGB"), np.float32) / 255).permute(2, 0, 1)

    def target(s, img: torch.Tensor, flip: bool) -> dict:
        h, w = img.shape[1:]
        cx, cy, bw, bh = s.boxes.T if len(s.boxes) else np.zeros((4, 0))
        x1, x2 = (cx - bw / 2) * w, (cx + bw / 2) * w
        if flip:
            x1, x2 = w - x2, w - x1
        boxes = np.stack([x1, (cy - bh / 2) * h, x2, (cy + bh / 2) * h], 1).reshape(-1, 4)
        return {"boxes": torch.as_tensor(boxes, dtype=torch.float32), "labels": torch.as_tensor(s.classes + 1)}

    images = [tensor(s.path) for s in train]
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    gen = torch.Generator().manual_seed(seed)
    started = time.perf_counter()
    for _ in range(epochs):
        model.train()
        body.eval()
        order = torch.randperm(len(train), generator=gen).tolist()
        for start in range(0, len(order), 4):
            batch = order[start : start + 4]
            flips = torch.rand(len(batch), generator=gen) < 0.5
            imgs = [images[i].flip(-1) if f else images[i] for i, f in zip(batch, flips, strict=True)]
            targets = [target(train[i], images[i], bool(f)) for i, f in zip(batch, flips, strict=True)]
            loss = sum(model(imgs, targets).values())
            opt.zero_grad()
            loss.backward()
            opt.step()
        sched.step()
    seconds = time.perf_counter() - started
    model.eval()
    model.roi_heads.score_thresh, model.roi_heads.detections_per_img = 0.001, 100
    preds, sizes = [], []
    with torch.no_grad():
        for s in test:
            img = tensor(s.path)
            sizes.append((img.shape[2], img.shape[1]))
            out = model([img])[0]
            preds.append(
                {"boxes": out["boxes"].numpy(), "scores": out["scores"].numpy(), "labels": out["labels"].numpy() - 1}
            )
    labels = [str(k) for k in range(num_classes)]
    return mean_average_precision(preds, ground_truth_in_pixels(test, sizes), labels), seconds


def ablations() -> dict[str, tuple[dict, dict]]:
    """Person-only variants of the pyramid detector (``--ablate``): name -> (config options, module patches). Each
    changes one choice of the default, to show what it is worth on the same folds."""
    from functools import partial

    from headstart.tasks.detect.pyramid_loss import assign, pyramid_loss

    return {
        "width 128": ({"width": 128}, {}),
        "views 4": ({"views": 4, "epochs": 30}, {}),
        "views 8": ({"views": 8, "epochs": 15}, {}),
        "no mosaic": ({"mosaic": 0.0}, {}),
        "input 384": ({"input_size": 384}, {}),
        "no centre samp.": ({}, {"headstart.tasks.detect.fit.assign": partial(assign, radius=1e6)}),
        "focal, no IoU": ({}, {"headstart.tasks.detect.fit.pyramid_loss": partial(pyramid_loss, quality_target=False)}),
    }


def headstart_fold(
    report, folds, i: int, options: dict, tmp: Path, seed: int, patches: dict | None = None
) -> tuple[dict, float, Path]:
    from contextlib import ExitStack
    from unittest import mock

    from headstart.crossval import fold_report
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.tasks import DetectConfig, train
    from headstart.tasks.detect.metrics import evaluate_detector

    fold, test = fold_report(report, folds, i, 0.2, seed)
    cfg = DetectConfig(
        data_dir=str(COCO),
        out=str(tmp / f"run-{i}"),
        backbone="torchvision:mobilenet_v2",
        weights=str(WEIGHTS),
        seed=seed,
        cache_dir=str(tmp / "cache"),
        progress=False,
        overwrite=True,
        **options,
    )
    with ExitStack() as stack:
        for target, replacement in (patches or {}).items():
            stack.enter_context(mock.patch(target, replacement))
        t0 = time.perf_counter()
        run_dir = train(cfg, fold)
        seconds = time.perf_counter() - t0
    run = load_run(run_dir)
    return evaluate_detector(RunModel(run), test)[0], seconds, run_dir


METRICS = ("map50", "map50_95", "map_small", "map_medium", "map_large")


def line(name: str, rows: list[dict], seconds: list[float]) -> str:
    cells = []
    for m in METRICS:
        values = [r[m] for r in rows if r[m] >= 0]
        mean = statistics.fmean(values) if values else float("nan")
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        cells.append(f"{mean:.3f}±{std:.3f}")
    return f"  {name:<15}" + "".join(f"{c:>14}" for c in cells) + f"{statistics.fmean(seconds):>10.0f}"


def bundle_ap(bundle_dir: Path, test: list, variant: str, runtime: str) -> tuple[dict, str]:
    """AP of an exported bundle's file on held-out images, through the serving runtime (what a client gets)."""
    from headstart.service.bundle import load_bundle
    from headstart.service.preprocess import decode_for, original_size, preprocess_batch
    from headstart.tasks.detect.metrics import (
        ground_truth_in_pixels,
        mean_average_precision,
        predictions_in_pixels,
    )

    bundle = load_bundle(bundle_dir, variant=variant, runtime=runtime)
    boxes, scores, sizes = [], [], []
    for start in range(0, len(test), 8):
        images = [decode_for(s.path, bundle.spec) for s in test[start : start + 8]]
        sizes += [original_size(img) for img in images]
        _, b, sc = bundle.run(preprocess_batch(images, bundle.spec))
        boxes.append(b)
        scores.append(sc)
    preds = predictions_in_pixels(np.concatenate(boxes), np.concatenate(scores), sizes, bundle.spec)
    metrics = mean_average_precision(preds, ground_truth_in_pixels(test, sizes), bundle.labels)
    return metrics, f"{bundle.session.describe()} ({bundle.precision_note})"


def in_process_latency(bundle_dir: Path, paths: list[Path], repeats: int) -> dict:
    """Median ms per image of classify and localize, alternated image by image so drift hits both alike."""
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.localize import localize_images
    from headstart.service.preprocess import decode_for

    bundle = load_bundle(bundle_dir)
    data = [p.read_bytes() for p in paths]
    for d in data[:3]:  # warm-up
        classify_images(bundle, [decode_for(d, bundle.spec)])
        localize_images(bundle, [decode_for(d, bundle.spec)])
    times: dict[str, list[float]] = {"classify": [], "localize": []}
    for _ in range(repeats):
        for d in data:
            for name, fn in (("classify", classify_images), ("localize", localize_images)):
                t0 = time.perf_counter()
                fn(bundle, [decode_for(d, bundle.spec)])
                times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def http_latency(bundle_dir: Path, paths: list[Path], repeats: int, workdir: Path) -> dict:
    import httpx

    times: dict[str, list[float]] = {"classify": [], "localize": []}
    with running_server(str(bundle_dir), workdir, HEADSTART_WORKERS="1") as (url, _, _), httpx.Client() as http:
        data = [p.read_bytes() for p in paths]
        for route in times:  # warm-up
            http.post(f"{url}/{route}", files={"image": ("a.jpg", data[0], "image/jpeg")}, timeout=60)
        for _ in range(repeats):
            for d in data:
                for route in times:
                    t0 = time.perf_counter()
                    resp = http.post(f"{url}/{route}", files={"image": ("a.jpg", d, "image/jpeg")}, timeout=60)
                    times[route].append(time.perf_counter() - t0)
                    assert resp.status_code == 200, resp.text
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=4)
    parser.add_argument("--frcnn-epochs", type=int, default=12)
    parser.add_argument("--frcnn-all", action="store_true", help="Faster R-CNN for all 80 classes too")
    parser.add_argument(
        "--skip", default="", help="comma-separated: grid, faster-rcnn, pyramid, person, all-classes, latency"
    )
    parser.add_argument(
        "--ablate",
        nargs="?",
        const="all",
        default="",
        help="person only: pyramid variants (see ablations()); all, or comma-separated names",
    )
    parser.add_argument("--repeats", type=int, default=2, help="passes over 28 images for latency")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    from headstart.crossval import make_folds
    from headstart.tasks.detect.data import keep_classes, scan_yolo_dataset

    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    full = scan_yolo_dataset(COCO, val_fraction=0.2)
    settings = ([] if "person" in skip else [("person", keep_classes(full, ["person"]))]) + (
        [] if "all-classes" in skip else [("all 80", full)]
    )
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        bundle_run = None
        for what, report in settings:
            pooled = [s for items in report.splits.values() for s in items]
            folds = make_folds(pooled, args.folds, args.seed)
            methods = [m for m in ("grid", "faster-rcnn", "pyramid") if m not in skip]
            if what != "person" and not args.frcnn_all:
                methods = [m for m in methods if m != "faster-rcnn"]
            variants = ablations() if args.ablate and what == "person" else {}
            if args.ablate not in ("", "all"):
                wanted = [n.strip() for n in args.ablate.split(",")]
                unknown = [n for n in wanted if n not in variants]
                if unknown:
                    parser.error(f"unknown ablation {unknown}; choose from {list(ablations())}")
                variants = {n: variants[n] for n in wanted}
            for method in methods + list(variants):
                rows, seconds = [], []
                for i in range(args.folds):
                    if method == "faster-rcnn":
                        from headstart.crossval import fold_report

                        fold, test = fold_report(report, folds, i, 0.2, args.seed)
                        train_set = fold.splits["train"] + fold.splits["val"]
                        m, s = frcnn_fold(train_set, test, len(report.labels), args.frcnn_epochs, args.seed)
                    else:
                        options, patches = variants.get(method, (GRID if method == "grid" else {}, {}))
                        m, s, run_dir = headstart_fold(
                            report, folds, i, options, tmp / f"{what}-{method}", args.seed, patches
                        )
                        if method == "pyramid" and what == "person" and i == 0:
                            bundle_run = (run_dir, folds[0])
                    rows.append(m)
                    seconds.append(s)
                    print(
                        f"  [{what} / {method} / fold {i + 1}] AP50 {m['map50']:.4f} AP50:95 {m['map50_95']:.4f} "
                        f"({s:.0f} s)",
                        flush=True,
                    )
                results[(what, method)] = (rows, seconds)

        boxes = {what: sum(len(s.classes) for items in r.splits.values() for s in items) for what, r in settings}
        print(
            f"\n{args.folds}-fold cross-validation on coco128 (seed {args.seed}), held-out folds only; mean±std over "
            "folds; last column: training seconds per fold"
        )
        print(
            f"  {'':<15}"
            + "".join(f"{h:>14}" for h in ("AP50", "AP50:95", "AP small", "AP medium", "AP large"))
            + f"{'train s':>10}"
        )
        for what, _ in settings:
            print(f" {what} ({boxes[what]} boxes)")
            for (w, method), (rows, seconds) in results.items():
                if w == what:
                    print(line(method, rows, seconds))
        person = {
            m: statistics.fmean(r["map50"] for r in rows) for (w, m), (rows, _) in results.items() if w == "person"
        }
        for anchor in ("grid", "faster-rcnn"):
            if anchor in person and "pyramid" in person:
                print(f"  person AP50: pyramid / {anchor} = {person['pyramid'] / max(person[anchor], 1e-9):.1f}x")
        print(json.dumps({f"{w}/{m}": [round(r["map50"], 4) for r in rows] for (w, m), (rows, _) in results.items()}))

        if bundle_run is not None and "latency" not in skip:
            from headstart.exporter import export_bundle

            run_dir, test = bundle_run
            bundle = export_bundle(run_dir, tmp / "bundle", int8=True, force=True, store=False).bundle_dir
            manifest = json.loads((bundle / "manifest.json").read_text())
            print(f"\nexport --int8 gate (fold 1's validation images): {json.dumps(manifest['int8'])}")
            print(f"held-out AP of the exported files, fold 1 person ({len(test)} images):")
            for variant in ("fp32", "int8"):
                for runtime in ("onnxruntime", "openvino"):
                    m, how = bundle_ap(bundle, test, variant, runtime)
                    print(f"  {variant} on {runtime}: AP50 {m['map50']:.4f} AP50:95 {m['map50_95']:.4f}  [{how}]")
            paths = [s.path for s in test][:28]
            print(
                f"\nlatency per image of the pyramid detector (512 px), median over {args.repeats} passes of "
                f"{len(paths)} images:"
            )
            for where, ms in (
                ("in process", in_process_latency(bundle, paths, args.repeats)),
                ("HTTP, bentoml serve, 1 worker", http_latency(bundle, paths, args.repeats, tmp)),
            ):
                print(
                    f"  {where}: classify {ms['classify']:.1f} ms, localize {ms['localize']:.1f} ms -> "
                    f"{ms['localize'] / ms['classify']:.2f}x"
                )


if __name__ == "__main__":
    main()
