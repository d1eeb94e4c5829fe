"""The memory a JPEG's decoding takes at its peak, against the estimate by which headstart refuses an image first.

libjpeg reads every scan of a progressive JPEG into a buffer of all its DCT coefficients at the stored size (2 bytes
each) before it scales or converts anything, so a progressive file decoded at 1/8 scale holds far more than its
pixels; a baseline one decoded at 1/8 scale holds a few rows. For each kind (baseline and progressive, 4:2:0 and
4:4:4 chroma, CMYK, grey), an image of ``--side`` x ``--side`` (default 8000: 64 MP, the largest taken) is decoded
whole and as a 224 px model decodes it (``decode_for``: 1/8 scale at 64 MP), each in a fresh process; the peak is
the process's VmHWM above its resident memory before the decode.

    .venv/bin/python benchmarks/decode_memory.py [--side 8000]
"""

from __future__ import annotations

import argparse
import io
import subprocess
import sys
from pathlib import Path

import numpy as np
from _common import machine_line
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

MEASURE = """
import sys
import headstart.service.preprocess as pp
estimates, real = [], pp.decode_cost
pp.decode_cost = lambda *args: estimates.append(real(*args)) or estimates[-1]
data = sys.stdin.buffer.read()
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1]) * 1024
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
base = status("VmRSS:")
img = pp.decode_image(data, min_side=int(sys.argv[1]) or None, max_bytes=1 << 40)
print(estimates[0], status("VmHWM:") - base, "x".join(map(str, img.size)))
"""

KINDS = {
    "baseline 4:2:0": ("RGB", {}),
    "baseline 4:4:4": ("RGB", {"subsampling": 0}),
    "progressive 4:2:0": ("RGB", {"progressive": True}),
    "progressive 4:4:4": ("RGB", {"progressive": True, "subsampling": 0}),
    "progressive CMYK": ("CMYK", {"progressive": True}),
    "progressive grey": ("L", {"progressive": True}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--side", type=int, default=8000)
    args = parser.parse_args()
    print(machine_line(torch=False))
    rng = np.random.default_rng(0)
    picture = Image.fromarray(rng.integers(0, 255, (250, 250, 3), np.uint8)).resize(
        (args.side, args.side), Image.Resampling.BILINEAR
    )
    print("kind | file MB | decoded | estimate MiB | peak MiB | peak / estimate")
    print("--- | --- | --- | --- | --- | ---")
    for kind, (mode, options) in KINDS.items():
        buf = io.BytesIO()
        picture.convert(mode).save(buf, "JPEG", quality=90, **options)
        data = buf.getvalue()
        for min_side in (0, 512):  # whole; decode_for of a 256 px resize (2 x 256)
            out = subprocess.run(
                [sys.executable, "-c", MEASURE, str(min_side)], input=data, capture_output=True, check=True, cwd=ROOT
            ).stdout.split()
            estimate, peak = int(out[0]), int(out[1])
            print(
                f"{kind} | {len(data) / 1e6:.1f} | {out[2].decode()} | {estimate / 2**20:.0f} | {peak / 2**20:.0f} | "
                f"{peak / estimate:.2f}"
            )


if __name__ == "__main__":
    main()
