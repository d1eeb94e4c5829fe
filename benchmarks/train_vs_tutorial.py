"""headstart train vs the PyTorch transfer-learning tutorial's fixed-feature-extractor recipe.

Same data (hymenoptera), same backbone (the shared ImageNet MobileNetV2), same machine, one process:

(a) baseline, the tutorial's recipe: a new Linear head, 25 epochs, batch 4, SGD(lr=0.001, momentum=0.9),
    StepLR(step_size=7, gamma=0.1), RandomResizedCrop(224) + RandomHorizontalFlip on the fly, Resize(256) +
    CenterCrop(224) for val, the backbone run on every image every epoch, best val accuracy kept. One deviation:
    the frozen backbone stays in eval mode (the tutorial calls model.train(), which would put BatchNorm in training
    mode; with these weights that wrecks the features, see ../shared/README.md).
(b) `headstart train` with its defaults, as a user runs it: a new process (start and imports counted), an empty
    feature cache; once per seed (--seeds).

Prints the val accuracies, wall times, the phases of each headstart run and the time ratio (to headstart's median
wall time). Target (issue 28): (b) accuracy >= (a) minus one image on every seed, in at most a twentieth of (a)'s wall
time. ``--baseline REV`` also runs (b) with the code of commit REV, each seed right after today's (a change's
effect, measured in one run on one machine).

    .venv/bin/python benchmarks/train_vs_tutorial.py [--epochs 25] [--seeds 3] [--extractor auto|openvino|torch]
        [--baseline REV]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED, check_idle, code_of, machine_line
from torch import nn


def tutorial_baseline(data: Path, weights: Path, epochs: int) -> tuple[float, float]:
    import torchvision
    from torchvision import datasets, transforms

    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    tfs = {
        "train": transforms.Compose(
            [
                transforms.RandomResizedCrop(224),
                transforms.RandomHorizontalFlip(),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
        "val": transforms.Compose(
            [
                transforms.Resize(256),
                transforms.CenterCrop(224),
                transforms.ToTensor(),
                transforms.Normalize(mean, std),
            ]
        ),
    }
    sets = {x: datasets.ImageFolder(data / x, tfs[x]) for x in ("train", "val")}
    loaders = {x: torch.utils.data.DataLoader(sets[x], batch_size=4, shuffle=True, num_workers=0) for x in sets}
    model = torchvision.models.mobilenet_v2(num_classes=1000)
    model.load_state_dict(torch.load(weights, weights_only=True))
    for p in model.parameters():
        p.requires_grad = False
    model.classifier[1] = nn.Linear(model.last_channel, 2)
    criterion = nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(model.classifier[1].parameters(), lr=0.001, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.1)

    start = time.perf_counter()
    best_acc, best_state = 0.0, copy.deepcopy(model.state_dict())
    for epoch in range(epochs):
        for phase in ("train", "val"):
            model.eval()  # frozen backbone: BatchNorm in eval (see module docstring)
            if phase == "train":
                model.classifier.train()
            corrects = 0
            for inputs, labels in loaders[phase]:
                optimizer.zero_grad()
                with torch.set_grad_enabled(phase == "train"):
                    outputs = model(inputs)
                    loss = criterion(outputs, labels)
                    if phase == "train":
                        loss.backward()
                        optimizer.step()
                corrects += int((outputs.argmax(1) == labels).sum())
            if phase == "train":
                scheduler.step()
            acc = corrects / len(sets[phase])
            if phase == "val" and acc > best_acc:
                best_acc, best_state = acc, copy.deepcopy(model.state_dict())
        print(
            f"  tutorial epoch {epoch + 1}/{epochs}: val acc {acc:.4f} ({time.perf_counter() - start:.0f}s)",
            flush=True,
        )
    model.load_state_dict(best_state)
    return best_acc, time.perf_counter() - start


def headstart_run(
    data: Path, weights: Path, seed: int, extractor: str, where: dict | None = None
) -> tuple[float, float, dict]:
    """`headstart train` as a user runs it: a new process (its start and imports counted), an empty feature cache;
    ``where``: the code of another commit (:func:`_common.code_of`)."""
    import json
    import subprocess
    import sys

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "headstart", "train", str(data), "--out", f"{tmp}/run"]
        cmd += ["--backbone", "torchvision:mobilenet_v2", "--weights", str(weights), "--cache-dir", f"{tmp}/cache"]
        cmd += ["--seed", str(seed), "--extractor", extractor, "--no-progress"]
        start = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True, **(where or {}))
        seconds = time.perf_counter() - start
        metrics = json.loads(Path(f"{tmp}/run/metrics.json").read_text())
    return metrics["accuracy"], seconds, metrics["training"]


def median_wall(runs: list[tuple[float, float]]) -> float:
    """The median wall time of (accuracy, wall) runs (the upper middle one of an even count)."""
    return sorted(w for _, w in runs)[len(runs) // 2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    parser.add_argument("--seeds", type=int, default=3, help="headstart runs with seeds 0..N-1")
    parser.add_argument("--extractor", default="auto", help="headstart's --extractor (auto, openvino, torch)")
    parser.add_argument("--baseline", metavar="REV", help="also run headstart with the code of this commit")
    args = parser.parse_args()
    data = SHARED / "data" / "hymenoptera"
    weights = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
    print(machine_line())
    load = check_idle()
    val_images = sum(1 for _ in (data / "val").rglob("*") if _.is_file())

    runs, before = [], []
    with tempfile.TemporaryDirectory() as tmp:
        where = code_of(args.baseline, Path(tmp)) if args.baseline else None
        for seed in range(args.seeds):
            for code, into in ((None, runs), (where, before)) if where else ((None, runs),):
                acc, wall, info = headstart_run(data, weights, seed, args.extractor, code)
                s = info["seconds"]
                print(
                    f"headstart{f' at {args.baseline}' if code else ''} seed {seed}: val acc {acc:.4f} "
                    f"({round(acc * val_images)}/{val_images}) in {wall:.1f}s wall (in process {s['total']}s: "
                    f"features {s['features']}s by {info.get('extractor', 'torch')}, head {s['head']}s; "
                    f"{info['views']} views; start, imports and the rest {wall - s['total']:.1f}s)",
                    flush=True,
                )
                into.append((acc, wall))
    base_acc, base_s = tutorial_baseline(data, weights, args.epochs)
    load = max(load, check_idle())

    hs_s = median_wall(runs)
    accs = [a for a, _ in runs]
    ratio = base_s / hs_s
    one_image = 1 / val_images
    print()
    print("| recipe | val accuracy | wall time (s) |")
    print("|---|---|---|")
    print(f"| PyTorch tutorial, fixed feature extractor ({args.epochs} epochs) | {base_acc:.4f} | {base_s:.1f} |")
    for seed, (acc, wall) in enumerate(runs):
        print(f"| `headstart train` (defaults, cold cache, new process), seed {seed} | {acc:.4f} | {wall:.1f} |")
    print()
    print(f"time ratio tutorial / headstart (median wall): {ratio:.1f}x (target >= 20x)")
    if before:
        then = median_wall(before)
        print(
            f"with the code of {args.baseline}: median wall {then:.1f}s, {base_s / then:.1f}x the tutorial; today's "
            f"code {then / hs_s:.2f}x as fast; accuracies then {[round(a, 4) for a, _ in before]}"
        )
    worst = min(accs)
    print(
        f"accuracy difference, worst seed: {worst - base_acc:+.4f}, mean {np.mean(accs) - base_acc:+.4f} "
        f"(target >= -{one_image:.4f}, one image of {val_images})"
    )
    ok = ratio >= 20 and worst >= base_acc - one_image - 1e-9
    print(f"targets met: {ok}; other CPU use before/after the runs: {load:.0%}")


if __name__ == "__main__":
    main()
