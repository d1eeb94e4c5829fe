"""One training step of the pyramid detector's neck and head, memory layouts and widths compared in one run.

``training/tasks/detect/fit.py`` trains the head channels-last under bf16 autocast (where the CPU has bf16 units): this
measures why. Random maps shaped like MobileNetV2's stride-8/16/32 stages at 512 px (32, 96, 1280 channels), a batch
of 32 (the default), forward + loss + backward + AdamW step; median of ``--repeats`` steps after a warm-up, each
layout and width in turn, and the ratio against the contiguous (NCHW) layout at the same width.

    .venv/bin/python benchmarks/pyramid_step.py [--widths 64,128] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _common import check_idle, machine_line

from headstart.models.pyramid import PyramidHead, PyramidHeadConfig


def step_seconds(width: int, channels_last: bool, bf16: bool, batch: int, repeats: int) -> float:
    torch.manual_seed(0)
    cfg = PyramidHeadConfig((32, 96, 1280), 1, 512, width=width)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    head = PyramidHead(cfg).to(memory_format=fmt)
    maps = [
        torch.randn(batch, c, h, w).contiguous(memory_format=fmt)
        for c, (h, w) in zip(cfg.in_channels, cfg.sizes, strict=True)
    ]
    opt = torch.optim.AdamW(head.parameters())

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = head(maps)
        loss = sum(o.float().square().mean() for o in out)
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="64,128")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    for bf16 in (True, False):
        for width in (int(w) for w in args.widths.split(",")):
            nchw = step_seconds(width, False, bf16, args.batch, args.repeats)
            nhwc = step_seconds(width, True, bf16, args.batch, args.repeats)
            print(
                f"  {'bf16' if bf16 else 'fp32'} width {width:>3}: NCHW {nchw:.3f} s, channels-last {nhwc:.3f} s "
                f"per step of {args.batch} -> {nchw / nhwc:.2f}x"
            )


if __name__ == "__main__":
    main()
