"""headstart train vs the PyTorch transfer-learning tutorial's fixed-feature-extractor recipe.

Same data (hymenoptera), same backbone (the shared ImageNet MobileNetV2), same machine, one process:

(a) baseline, the tutorial's recipe: a new Linear head, 25 epochs, batch 4, SGD(lr=0.001, momentum=0.9),
    StepLR(step_size=7, gamma=0.1), RandomResizedCrop(224) + RandomHorizontalFlip on the fly, Resize(256) +
    CenterCrop(224) for val, the backbone run on every image every epoch, best val accuracy kept. One deviation:
    the frozen backbone stays in eval mode (the tutorial calls model.train(), which would put BatchNorm in training
    mode; with these weights that wrecks the features, see ../shared/README.md).
(b) headstart train with its defaults, starting with an empty feature cache.

Prints both val accuracies, wall times, and the time ratio. Target: (b) accuracy >= (a) minus one image, in at
most a fifth of (a)'s wall time.

    .venv/bin/python benchmarks/train_vs_tutorial.py [--epochs 25]
"""

from __future__ import annotations

import argparse
import copy
import tempfile
import time
from pathlib import Path

import torch
from _common import SHARED, check_idle, machine_line
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


def headstart_run(data: Path, weights: Path) -> tuple[float, float, dict]:
    import json

    from headstart.tasks import ClassifyConfig, train

    with tempfile.TemporaryDirectory() as tmp:
        cfg = ClassifyConfig(
            data_dir=str(data),
            out=f"{tmp}/run",
            backbone="torchvision:mobilenet_v2",
            weights=str(weights),
            cache_dir=f"{tmp}/cache",
            progress=False,
        )
        start = time.perf_counter()
        run_dir = train(cfg)
        seconds = time.perf_counter() - start
        metrics = json.loads((run_dir / "metrics.json").read_text())
    return metrics["accuracy"], seconds, metrics["training"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=25)
    args = parser.parse_args()
    data = SHARED / "data" / "hymenoptera"
    weights = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
    print(machine_line())
    load = check_idle()
    val_images = sum(1 for _ in (data / "val").rglob("*") if _.is_file())

    hs_acc, hs_s, info = headstart_run(data, weights)
    print(
        f"headstart: val acc {hs_acc:.4f} in {hs_s:.1f}s (features {info['seconds']['features']}s, "
        f"head {info['seconds']['head']}s, {info['views']} views)",
        flush=True,
    )
    base_acc, base_s = tutorial_baseline(data, weights, args.epochs)
    load = max(load, check_idle())

    ratio = base_s / hs_s
    one_image = 1 / val_images
    print()
    print("| recipe | val accuracy | wall time (s) |")
    print("|---|---|---|")
    print(f"| PyTorch tutorial, fixed feature extractor ({args.epochs} epochs) | {base_acc:.4f} | {base_s:.1f} |")
    print(f"| headstart train (defaults, cold feature cache) | {hs_acc:.4f} | {hs_s:.1f} |")
    print()
    print(f"time ratio tutorial / headstart: {ratio:.1f}x (target >= 5x)")
    print(f"accuracy difference: {hs_acc - base_acc:+.4f} (target >= -{one_image:.4f}, one image of {val_images})")
    ok = ratio >= 5 and hs_acc >= base_acc - one_image - 1e-9
    print(f"targets met: {ok}; other CPU use before/after the runs: {load:.0%}")


if __name__ == "__main__":
    main()
