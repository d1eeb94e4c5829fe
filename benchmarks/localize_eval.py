"""Localization on coco128: the trained grid head against a trivial baseline, and localize against classify latency.

1. Train the YOLO-style grid head on the first 100 coco128 images (by file name) and evaluate on the last 28:
   mAP@0.5, mAP@0.5:0.95 (torchmetrics / pycocotools) and AP per class with at least 5 boxes in those 28 images.
   The head after the last epoch is evaluated (no epoch is picked by its score on the 28 evaluation images).
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


def split_report(train_n: int = 100, eval_n: int = 28):
    from training.detect_data import scan_yolo_dataset

    report = scan_yolo_dataset(COCO, val_fraction=0.2)
    samples = sorted((s for v in report.splits.values() for s in v), key=lambda s: s.path.name)
    report.splits = {"train": samples[:train_n], "val": samples[train_n : train_n + eval_n]}
    report.split_source = f"first {train_n} / next {eval_n} by file name"
    return report


def mean_box_baseline(report) -> tuple[list[dict], list[dict]]:
    from service.preprocess import decode_image
    from training.detect import ground_truth_in_pixels

    classes = np.concatenate([s.classes for s in report.splits["train"]])
    boxes = np.concatenate([s.boxes for s in report.splits["train"]])
    seen = np.unique(classes)
    mean = {int(k): boxes[classes == k].mean(0) for k in seen}
    share = {int(k): float((classes == k).mean()) for k in seen}
    sizes = [decode_image(s.path).size for s in report.splits["val"]]
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
    return preds, ground_truth_in_pixels(report.splits["val"], sizes)


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

    from training.detect import DetectConfig, mean_average_precision, train_detector
    from training.export import export_bundle

    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    report = split_report()
    with tempfile.TemporaryDirectory() as tmp:
        cfg = DetectConfig(data_dir=str(COCO), out=f"{tmp}/run", backbone="torchvision:mobilenet_v2", weights=str(WEIGHTS),
                           input_size=args.input_size, views=args.views, epochs=args.epochs, hidden=args.hidden,
                           augment=args.augment, seed=args.seed, cache_dir=f"{tmp}/cache", progress=False,
                           select="last")  # fmt: skip
        t0 = time.perf_counter()
        run = train_detector(cfg, report)
        seconds = time.perf_counter() - t0
        metrics = json.loads((run / "metrics.json").read_text())
        preds, truth = mean_box_baseline(report)
        base = mean_average_precision(preds, truth, report.labels)
        print(f"\ngrid head ({args.input_size}px, {metrics['training']['views']} views, hidden {args.hidden}, "
              f"best epoch {metrics['training']['head']['best_epoch']} of {metrics['training']['head']['epochs_run']}) "
              f"trained in {seconds:.0f} s on the first 100 images; evaluated on the last 28 "
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
        paths = [s.path for s in report.splits["val"]]
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
