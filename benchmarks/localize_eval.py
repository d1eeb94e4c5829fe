"""Localization on coco128: the trained grid head against a trivial baseline, and localize against classify latency.

1. Train the YOLO-style grid head on the first 100 coco128 images (by file name) and evaluate on the last 28:
   mAP@0.5, mAP@0.5:0.95 (torchmetrics / pycocotools) and AP per class with at least 5 boxes in those 28 images.
   Of the 100 training images, 80 fit the head and 20 pick the epoch (best mAP@0.5); the 28 test images are
   used for nothing but the final figures.
2. Baseline, in the same run on the same 28 images: every class seen in training predicted in every image at its
   mean training box, scored by its share of the training boxes.
3. Latency of `localize` against `classify` on the same exported model, one image at a time: in process (decode +
   preprocess + ONNX Runtime + decoding) and over HTTP against `bentoml serve`. Target: localize <= 1.2x classify.
   With ``--cam-bundle`` the same for a classifier bundle (class activation maps).

    .venv/bin/python benchmarks/localize_eval.py [--views 8] [--epochs 60] [--cam-bundle BUNDLE]
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


def split_report(train_n: int = 80, val_n: int = 20, test_n: int = 28):
    """coco128 by file name: the first 100 images for training (80 to fit, 20 to pick the epoch), the last 28 to test."""
    from training.detect_data import scan_yolo_dataset

    report = scan_yolo_dataset(COCO, val_fraction=0.2)
    samples = sorted((s for v in report.splits.values() for s in v), key=lambda s: s.path.name)
    report.splits = {"train": samples[:train_n], "val": samples[train_n : train_n + val_n]}
    report.split_source = f"first {train_n} to fit / next {val_n} to pick the epoch, by file name"
    return report, samples[train_n + val_n : train_n + val_n + test_n]


def mean_box_baseline(report, test) -> tuple[list[dict], list[dict]]:
    from service.preprocess import decode_image
    from training.detect_eval import ground_truth_in_pixels

    fit = report.splits["train"] + report.splits["val"]
    classes = np.concatenate([s.classes for s in fit])
    boxes = np.concatenate([s.boxes for s in fit])
    seen = np.unique(classes)
    mean = {int(k): boxes[classes == k].mean(0) for k in seen}
    share = {int(k): float((classes == k).mean()) for k in seen}
    sizes = [decode_image(s.path).size for s in test]
    preds = []
    for w, h in sizes:
        rows = [[(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h] for cx, cy, bw, bh in
                mean.values()]  # fmt: skip
        preds.append(
            {
                "boxes": np.array(rows),
                "scores": np.array(list(share.values())),
                "labels": np.array(list(mean)),
            }
        )
    return preds, ground_truth_in_pixels(test, sizes)


def in_process_latency(bundle_dir: Path, paths: list[Path], repeats: int) -> dict:
    """Median ms per image of classify and localize, alternated image by image so drift hits both alike."""
    from service.bundle import load_bundle
    from service.inference import classify_images
    from service.localize import localize_images
    from service.preprocess import decode_image

    bundle = load_bundle(bundle_dir)
    data = [p.read_bytes() for p in paths]
    for d in data[:3]:  # warm-up
        classify_images(bundle, [decode_image(d)])
        localize_images(bundle, [decode_image(d)])
    times: dict[str, list[float]] = {"classify": [], "localize": []}
    for _ in range(repeats):
        for d in data:
            for name, fn in (("classify", classify_images), ("localize", localize_images)):
                t0 = time.perf_counter()
                fn(bundle, [decode_image(d)])
                times[name].append(time.perf_counter() - t0)
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def http_latency(bundle_dir: Path, paths: list[Path], repeats: int, workdir: Path) -> dict:
    import httpx

    times: dict[str, list[float]] = {"classify": [], "localize": []}
    with (
        running_server(str(bundle_dir), workdir, HEADSTART_WORKERS="1") as (url, _, _),
        httpx.Client() as http,
    ):
        data = [p.read_bytes() for p in paths]
        for route in times:  # warm-up
            http.post(f"{url}/{route}", files={"image": ("a.jpg", data[0], "image/jpeg")}, timeout=60)
        for _ in range(repeats):
            for d in data:
                for route in times:
                    t0 = time.perf_counter()
                    resp = http.post(
                        f"{url}/{route}", files={"image": ("a.jpg", d, "image/jpeg")}, timeout=60
                    )
                    times[route].append(time.perf_counter() - t0)
                    assert resp.status_code == 200, resp.text
    return {k: 1000 * statistics.median(v) for k, v in times.items()}


def print_latency(what: str, ms: dict) -> None:
    ratio = ms["localize"] / ms["classify"]
    print(f"  {what}: classify {ms['classify']:.1f} ms, localize {ms['localize']:.1f} ms -> {ratio:.2f}x "
          f"({'within' if ratio <= 1.2 else 'OVER'} the 1.2x target)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--views", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=60)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--input-size", type=int, default=320)
    parser.add_argument("--augment", default="heavy")
    parser.add_argument("--repeats", type=int, default=3, help="passes over the 28 images for latency")
    parser.add_argument("--cam-bundle", help="a classifier bundle to time CAM localization on as well")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    from training.detect_eval import evaluate_detector, mean_average_precision
    from training.export import export_bundle
    from training.load import load_run
    from training.tasks import DetectConfig, train

    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    report, test = split_report()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DetectConfig(data_dir=str(COCO), out=f"{tmp}/run", backbone="torchvision:mobilenet_v2", weights=str(WEIGHTS),
                           input_size=args.input_size, views=args.views, epochs=args.epochs, hidden=args.hidden,
                           augment=args.augment, seed=args.seed, cache_dir=f"{tmp}/cache", progress=False,
                           )  # fmt: skip
        t0 = time.perf_counter()
        run = train(cfg, report)
        seconds = time.perf_counter() - t0
        train_metrics = json.loads((run / "metrics.json").read_text())
        loaded = load_run(run)
        metrics, _, _ = evaluate_detector(loaded.model, test, loaded.spec, report.labels)
        preds, truth = mean_box_baseline(report, test)
        base = mean_average_precision(preds, truth, report.labels)
        print(f"\ngrid head ({args.input_size}px, {train_metrics['training']['views']} views, hidden {args.hidden}, "
              f"epoch {train_metrics['training']['head']['best_epoch']} of {train_metrics['training']['head']['epochs_run']}, "
              f"picked on the 20 held-out training images: mAP@0.5 {train_metrics['map50']:.4f}) "
              f"trained in {seconds:.0f} s on the first 100 images; tested on the last 28 "
              f"({metrics['num_boxes']} boxes):")  # fmt: skip
        print(f"  {'':<22}{'mAP@0.5':>9}{'mAP@.5:.95':>12}")
        print(f"  {'grid head':<22}{metrics['map50']:>9.4f}{metrics['map50_95']:>12.4f}")
        print(f"  {'mean-box baseline':<22}{base['map50']:>9.4f}{base['map50_95']:>12.4f}")
        print(f"  ratio{'':<17}{metrics['map50'] / max(base['map50'], 1e-9):>8.1f}x"
              f"{metrics['map50_95'] / max(base['map50_95'], 1e-9):>11.1f}x")  # fmt: skip
        print("  per class (>= 5 boxes in the 28 images): AP@0.5 grid / baseline, AP@.5:.95 grid / baseline")
        for name, v in sorted(metrics["per_class"].items(), key=lambda kv: -kv[1]["boxes"]):
            if v["boxes"] >= 5:
                b = base["per_class"].get(name, {"ap50": 0.0, "ap50_95": 0.0})
                print(f"    {name:<16}{v['boxes']:>4} boxes  {v['ap50']:.3f} / {b['ap50']:.3f}   "
                      f"{v['ap50_95']:.3f} / {b['ap50_95']:.3f}")  # fmt: skip

        bundle = export_bundle(run, f"{tmp}/bundle", store=False).bundle_dir
        paths = [s.path for s in test]
        print(f"\nlatency per image, median over {args.repeats} passes of the 28 images (one at a time):")
        print_latency("detector, in process", in_process_latency(bundle, paths, args.repeats))
        print_latency(
            "detector, HTTP (bentoml serve, 1 worker)", http_latency(bundle, paths, args.repeats, Path(tmp))
        )
        if args.cam_bundle:
            print_latency(
                "classifier + CAM, in process", in_process_latency(Path(args.cam_bundle), paths, args.repeats)
            )
            print_latency("classifier + CAM, HTTP (bentoml serve, 1 worker)",
                          http_latency(Path(args.cam_bundle), paths, args.repeats, Path(tmp)))  # fmt: skip


if __name__ == "__main__":
    main()
