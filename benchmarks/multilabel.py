"""Multi-label classification on coco128's image-level labels: headstart against a linear probe, by k-fold.

Every image of coco128 (its 80 classes, read as the classes present in each image) is scored once by a model that
never saw it: per fold,

(a) ``headstart train --task multilabel`` with its defaults (the prototype head with the backbone's ImageNet answer
    on the augmented views; the thresholds, and with ``--option classifier=linear`` the epoch, chosen on a validation
    part of the training folds), scored at its own thresholds;
(b) a linear probe on the same frozen pooled features (clean, one view per image): per-label logistic regression
    with an L2 penalty chosen on the same validation part (by mAP), its global threshold chosen there too.

Both are scored on the held-out fold with mAP (macro over the labels present, and micro) and sample-F1. Then the
cost of the answer: in process, the service's own classify path (decode, preprocess, the model, the answer) on a
multi-label bundle and on a single-label bundle of the same backbone, alternating, median of many calls.

    .venv/bin/python benchmarks/multilabel.py --folds 3
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED, check_idle, machine_line

COCO = SHARED / "data" / "coco128"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
BACKBONE = "torchvision:mobilenet_v2"
PENALTIES = (1e-4, 1e-3, 1e-2, 1e-1)


def pooled(model, paths: list[Path], spec) -> np.ndarray:
    """The frozen backbone's pooled features of image files (clean, fp32, the service's preprocessing)."""
    from headstart.service.inference import outputs_of_files

    with torch.inference_mode():
        return outputs_of_files(lambda px: [model.pooled(torch.from_numpy(px)).numpy()], paths, spec)[0]


def probe(train_x, train_y, val_x, val_y, test_x, seed: int) -> tuple[np.ndarray, np.ndarray, float]:
    """Per-label logistic regression (full-batch L-BFGS) for each L2 penalty; the one with the best validation mAP.
    Returns (validation probabilities, test probabilities, the penalty)."""
    from headstart.tasks.multilabel.metrics import mean_average_precision

    mean, std = train_x.mean(0), train_x.std(0) + 1e-6
    tx, vx, sx = (torch.from_numpy((x - mean) / std) for x in (train_x, val_x, test_x))
    ty = torch.from_numpy(train_y)
    best = None
    for penalty in PENALTIES:
        torch.manual_seed(seed)
        layer = torch.nn.Linear(tx.shape[1], ty.shape[1])
        opt = torch.optim.LBFGS(layer.parameters(), max_iter=200, line_search_fn="strong_wolfe")

        def closure(layer=layer, opt=opt, penalty=penalty):
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(layer(tx), ty, reduction="sum") / len(tx)
            loss = loss + penalty * layer.weight.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            val_p, test_p = torch.sigmoid(layer(vx)).numpy(), torch.sigmoid(layer(sx)).numpy()
        score = mean_average_precision(val_p, val_y)["map_macro"] or 0.0
        if best is None or score > best[0]:
            best = (score, val_p, test_p, penalty)
    return best[1], best[2], best[3]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--loss", default="weighted", choices=("weighted", "bce", "asl"))
    parser.add_argument("--latency-calls", type=int, default=200, help="0: no latency measurement")
    parser.add_argument("--cache-dir", help="feature cache shared between runs (default: a new temporary one)")
    parser.add_argument(
        "--option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a training option other than the default (e.g. augment=light, views=4): repeatable",
    )
    args = parser.parse_args()
    print(machine_line())
    check_idle()

    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.inference import outputs_of_files
    from headstart.tasks import CONFIGS, train
    from headstart.tasks.multilabel.data import multi_hot, scan_data
    from headstart.tasks.multilabel.metrics import choose_thresholds, evaluation

    report = scan_data(str(COCO), 0.2, args.seed)
    labels = report.labels
    pooled_all = sorted((s for v in report.splits.values() for s in v), key=lambda s: (s.sha256, str(s.path)))
    random.Random(args.seed).shuffle(pooled_all)
    parts = [pooled_all[i :: args.folds] for i in range(args.folds)]
    print(f"coco128 as image-level labels: {len(pooled_all)} images, {len(labels)} labels, {args.folds} folds")
    tmp = Path(tempfile.mkdtemp(prefix="headstart-multilabel-"))
    cfg = CONFIGS["multilabel"](
        data_dir=str(COCO),
        out="",
        backbone=BACKBONE,
        weights=str(WEIGHTS),
        cache_dir=args.cache_dir or str(tmp / "cache"),
        progress=False,
        seed=args.seed,
        loss=args.loss,
    )
    fields = cfg.__dataclass_fields__
    for item in args.option:
        name, _, value = item.partition("=")
        cfg = dataclasses.replace(cfg, **{name: type(fields[name].default)(value)})
    print(f"options: loss {cfg.loss}, augment {cfg.augment}, views {cfg.views}, epochs {cfg.epochs}; {args.option}")
    rows = {"headstart": [], "linear probe": []}
    seconds = {"headstart": [], "linear probe": []}
    for i in range(args.folds):
        rest = [s for j, p in enumerate(parts) if j != i for s in p]
        random.Random(args.seed + 1000 + i).shuffle(rest)
        n_val = max(1, round(len(rest) * cfg.val_fraction))
        fold = dataclasses.replace(
            report, splits={"train": rest[n_val:], "val": rest[:n_val]}, split_source=f"fold {i}"
        )
        test = parts[i]
        truth = multi_hot([s.labels for s in test], len(labels))
        started = time.perf_counter()
        run_dir = train(dataclasses.replace(cfg, out=str(tmp / f"fold-{i + 1}")), fold)
        seconds["headstart"].append(time.perf_counter() - started)
        run = load_run(run_dir)
        model = RunModel(run)
        probs = outputs_of_files(lambda px, m=model: m.run(px, ["probabilities"]), [s.path for s in test], run.spec)[0]
        rows["headstart"].append(evaluation(probs, truth, labels, model.thresholds))

        net = run.model.eval()
        started = time.perf_counter()
        xs = [
            pooled(net, [s.path for s in part], run.spec) for part in (fold.splits["train"], fold.splits["val"], test)
        ]
        ys = [multi_hot([s.labels for s in part], len(labels)) for part in (fold.splits["train"], fold.splits["val"])]
        val_p, test_p, penalty = probe(xs[0], ys[0], xs[1], ys[1], xs[2], args.seed)
        thresholds = choose_thresholds(val_p, ys[1], labels, 10**9)  # one global threshold, as headstart's default
        seconds["linear probe"].append(time.perf_counter() - started)
        rows["linear probe"].append(evaluation(test_p, truth, labels, thresholds))
        print(
            f"fold {i + 1}: headstart mAP {rows['headstart'][-1]['map_macro']:.4f}, "
            f"linear probe mAP {rows['linear probe'][-1]['map_macro']:.4f} (L2 {penalty:g}), {len(test)} test images"
        )

    print("\n| method (same folds, same frozen MobileNetV2) | mAP macro | mAP micro | sample-F1 | seconds per fold |")
    print("|---|---|---|---|---|")
    summary = {}
    for name in rows:
        cell = []
        for metric in ("map_macro", "map_micro", "sample_f1"):
            values = [r[metric] for r in rows[name]]
            summary[(name, metric)] = statistics.fmean(values)
            cell.append(f"{statistics.fmean(values):.4f} ± {statistics.stdev(values) if len(values) > 1 else 0:.4f}")
        print(f"| {name} | {' | '.join(cell)} | {statistics.fmean(seconds[name]):.1f} |")
    ratio = summary[("headstart", "map_macro")] / max(summary[("linear probe", "map_macro")], 1e-9)
    print(f"\nheadstart / linear probe, macro mAP: {ratio:.3f} (target >= 1.10)")
    if args.latency_calls:
        latency(tmp, args.latency_calls, args.seed)


def latency(tmp: Path, calls: int, seed: int) -> None:
    """The service's classify path in process, multi-label bundle against single-label bundle, same backbone."""
    from headstart.exporter import export_bundle
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.preprocess import decode_for
    from headstart.tasks import CONFIGS, train

    single = train(
        CONFIGS["classify"](
            data_dir=str(SHARED / "data" / "hymenoptera"),
            out=str(tmp / "single"),
            backbone=BACKBONE,
            weights=str(WEIGHTS),
            cache_dir=str(tmp / "cache"),
            progress=False,
            seed=seed,
            views=1,
            epochs=5,  # its defaults otherwise: a novelty score, as the multi-label model has
        )
    )
    bundles = {
        "multi-label": load_bundle(export_bundle(tmp / "fold-1", tmp / "ml-bundle", store=False).bundle_dir, threads=1),
        "single-label": load_bundle(export_bundle(single, tmp / "sl-bundle", store=False).bundle_dir, threads=1),
    }
    photo = (SHARED / "photos" / "cat_720p.jpg").read_bytes()
    times = {name: [] for name in bundles}
    for _ in range(calls):
        for name, bundle in bundles.items():
            started = time.perf_counter()
            classify_images(bundle, [decode_for(photo, bundle.spec)], 5)
            times[name].append(time.perf_counter() - started)
    med = {name: statistics.median(t) * 1000 for name, t in times.items()}
    for name, bundle in bundles.items():
        print(f"{name}: {bundle.runtime}, {bundle.precision} ({bundle.precision_note})")
    print(
        f"classify in process (decode + preprocess + model + answer, 720p JPEG, one thread, median of {calls}): "
        f"multi-label {med['multi-label']:.2f} ms, single-label {med['single-label']:.2f} ms, "
        f"ratio {med['multi-label'] / med['single-label']:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
