"""Backbone feature extraction speed for `headstart train`: eager vs traced torch vs OpenVINO, fp32 vs bf16, batch 8
vs 64.

Real hymenoptera validation images through the shared MobileNetV2 (or --backbone with --weights), pooled features
as the feature cache stores them; prints images/s per variant, the ratio to eager fp32 at batch 64, and how far
each variant's features are from eager fp32. Then the training views as `headstart train` makes them (decode, 8
heavy-augmentation views, the backbone; no cache) on ``--view-images`` training images, with the model's turns taken
in line against overlapped with the next image's decoding and augmentation (OpenVINO), alternating rounds: seconds
(median) and the ratio, and whether the features are the same bits.

    .venv/bin/python benchmarks/feature_extraction.py [--images 128] [--view-images 120] [--rounds 4]
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch
from _common import SHARED, check_idle, machine_line

from headstart.extractor import Extractor, features_fn
from headstart.features import FeatureCache, extract_features
from headstart.models import PixelNormalize, build_backbone
from headstart.service.preprocess import decode_for, preprocess


def eager_fn(net, bf16: bool):
    net = net.eval().to(memory_format=torch.channels_last)

    @torch.inference_mode()
    def run(pixels):
        ctx = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else nullcontext()
        with ctx:
            return (
                net(torch.from_numpy(pixels).contiguous(memory_format=torch.channels_last)).float().mean((2, 3)).numpy()
            )

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backbone", default="torchvision:mobilenet_v2")
    parser.add_argument("--weights", default=str(SHARED / "weights" / "mobilenet_v2_imagenet.pth"))
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--view-images", type=int, default=120)
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    print(machine_line())
    check_idle()
    bb = build_backbone(args.backbone, pretrained=False, weights=args.weights)
    net = torch.nn.Sequential(PixelNormalize(bb.preprocess.mean, bb.preprocess.std), bb.features)
    paths = sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))[: args.images]
    pixels = np.stack([preprocess(decode_for(p, bb.preprocess), bb.preprocess) for p in paths])
    variants = {
        "eager fp32 (autocast off)": eager_fn(net, False),
        "eager bf16 autocast": eager_fn(net, True),
        "traced fp32 (--extractor torch, val)": features_fn(net, False),
        "traced bf16 (--extractor torch, train views)": features_fn(net, True),
    }
    extractor = Extractor(net, input_size=bb.preprocess.input_size, extractor="auto")
    if extractor.runtime == "openvino":  # the default where OpenVINO is installed
        variants["OpenVINO fp32 (headstart, val)"] = extractor.fn(False)
        variants["OpenVINO bf16 (headstart, train views)"] = extractor.fn(True)
    reference = None
    rows = []
    for name, fn in variants.items():
        for batch in (64, 8):
            fn(pixels[:batch])
            start = time.perf_counter()
            feats = np.concatenate([fn(pixels[i : i + batch]) for i in range(0, len(pixels), batch)])
            ips = len(pixels) / (time.perf_counter() - start)
            if reference is None:
                reference = feats
            corr = float(np.corrcoef(feats.ravel(), reference.ravel())[0, 1])
            rows.append((name, batch, ips, float(np.abs(feats - reference).max()), corr))
            print(f"  {name} batch {batch}: {ips:.1f} img/s", flush=True)
    base = rows[0][2]
    print()
    print("| variant | batch | images/s | vs eager fp32 batch 64 | max abs diff vs eager fp32 | correlation |")
    print("|---|---|---|---|---|---|")
    for name, batch, ips, diff, corr in rows:
        print(f"| {name} | {batch} | {ips:.1f} | {ips / base:.2f}x | {diff:.2e} | {corr:.5f} |")
    if extractor.runtime == "openvino":
        views_in_turn_or_overlapped(extractor, bb.preprocess, args.view_images, args.rounds)


def views_in_turn_or_overlapped(extractor: Extractor, spec, images: int, rounds: int) -> None:
    from headstart.tasks.classify.augment import augmented_views, build_augmentation
    from headstart.tasks.classify.data import Sample

    paths = sorted((SHARED / "data" / "hymenoptera" / "train").rglob("*.jpg"))[:images]
    samples = [Sample(path=p, label=0, sha256=f"{k:064x}") for k, p in enumerate(paths)]
    pipeline = build_augmentation("heavy", spec)
    overlapped = extractor.fn(True)  # has start(): the model runs while the next image's views are made

    def in_turn(pixels):  # the same model, no start(): extract_features computes in line
        return overlapped(pixels)

    def run(model) -> tuple[float, np.ndarray]:
        start = time.perf_counter()
        feats, _ = extract_features(
            model,
            samples,
            lambda img, sample, seed: (augmented_views(img, pipeline, spec, 8, seed), {}),
            views=8,
            shape=(1280,),
            cache=FeatureCache(None),
            namespace="benchmark",
            spec=spec,
            batch_size=8,
            progress=False,
        )
        return time.perf_counter() - start, feats

    times = {"in turn": [], "overlapped": []}
    feats = {}
    for _ in range(rounds):
        for name, model in (("in turn", in_turn), ("overlapped", overlapped)):
            seconds, feats[name] = run(model)
            times[name].append(seconds)
    a, b = (float(np.median(times[k])) for k in ("in turn", "overlapped"))
    print()
    print(
        f"training views ({len(samples)} images x 8 heavy views, decoded, augmented, OpenVINO bf16, batch 8; median "
        f"of {rounds} alternating rounds): in turn {a:.2f} s, overlapped {b:.2f} s: {a / b:.2f}x; the same features: "
        f"{np.array_equal(feats['in turn'], feats['overlapped'])}"
    )


if __name__ == "__main__":
    main()
