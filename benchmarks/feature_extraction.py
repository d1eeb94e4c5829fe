"""Backbone feature extraction speed for `headstart train`: eager vs traced torch vs OpenVINO, fp32 vs bf16, batch 8
vs 64.

Real hymenoptera validation images through the shared MobileNetV2 (or --backbone with --weights), pooled features
as the feature cache stores them; prints images/s per variant, the ratio to eager fp32 at batch 64, and how far
each variant's features are from eager fp32.

    .venv/bin/python benchmarks/feature_extraction.py
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch
from _common import SHARED, check_idle, machine_line

from headstart.features import Extractor, features_fn
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


if __name__ == "__main__":
    main()
