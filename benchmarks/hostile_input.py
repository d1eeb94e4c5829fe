"""Cost of hostile images: headstart's decode + preprocess against a naive Pillow pipeline, in one run.

Each case runs in a fresh process (peak RSS is per process) and reports wall time, peak RSS above the interpreter's
own, and the outcome. The naive pipeline is what headstart did before its decode step bounded the work: open with
every Pillow format, decode, convert 16-bit through float64, resize the whole image, then crop.

    .venv/bin/python benchmarks/hostile_input.py
"""

from __future__ import annotations

import json
import subprocess
import sys

from _common import ROOT, SHARED, check_idle, machine_line

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[3])
import numpy as np
from PIL import Image
from headstart.service.preprocess import PreprocessSpec, decode_for, preprocess, resized_size, INTERPOLATIONS
from tests.images import hostile_images, large_16bit_png, work_bombs
import io

def naive(data, spec):
    img = Image.open(io.BytesIO(data))
    img.load()
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.float64)
        img = Image.fromarray(np.clip(arr * 255.0 / 65535.0, 0, 255).round().astype(np.uint8)).convert("RGB")
    img = img.convert("RGB")
    w, h = resized_size(img.size, spec)
    img = img.resize((w, h), INTERPOLATIONS[spec.interpolation])
    left, top = (w - spec.input_size) // 2, (h - spec.input_size) // 2
    return np.asarray(img.crop((left, top, left + spec.input_size, top + spec.input_size)), np.float32)

case, how = sys.argv[1], sys.argv[2]
if case == "photo (cat_720p.jpg)":
    data = open(sys.argv[4], "rb").read()
elif case == "64 MP 16-bit PNG":
    data = large_16bit_png()
else:
    data = {**hostile_images(), **work_bombs()}[case][0]
spec = PreprocessSpec()
def status(key):
    return int(next(l for l in open("/proc/self/status") if l.startswith(key)).split()[1])
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again here: making the input is not counted
base = status("VmRSS:")
start = time.perf_counter()
try:
    preprocess(decode_for(data, spec), spec) if how == "headstart" else naive(data, spec)
    outcome = "decoded"
except Exception as exc:
    outcome = f"{type(exc).__name__}: {str(exc)[:60]}"
elapsed = time.perf_counter() - start
peak = (status("VmHWM:") - base) / 1024
print(json.dumps({"seconds": elapsed, "peak_mib": peak, "outcome": outcome, "bytes": len(data)}))
"""

CASES = ["photo (cat_720p.jpg)", "aspect-2x30000", "jpeg-500-scans", "png-truncated-ihdr", "64 MP 16-bit PNG"]
# round 3 (issue 24): work inside the allowed formats (tests/images.py, work_bombs)
CASES += [
    "bmp-rle8",
    "pgm-plain-300k-comment-lines",
    "ppm-maxval-1000",
    "ppm-padded-header",
    "png-1900-icc-profiles",
    "png-60000-tiny-chunks",
    "webp-lossless-64mp",
    "png-rgba-64mp",
]
# round 4 (issue 28): what Pillow walks in Python before a JPEG's image data, or to a GIF's second frame
CASES += ["jpeg-4mb-of-fill-bytes", "jpeg-4mb-between-segments", "jpeg-1m-empty-comments"]
CASES += ["gif-200k-empty-comments", "gif-1mb-between-blocks"]


def run(case: str, how: str) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", CHILD, case, how, str(ROOT), str(SHARED / "photos" / "cat_720p.jpg")],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=ROOT,
    )
    if out.returncode:
        return {"seconds": float("nan"), "peak_mib": float("nan"), "outcome": f"crashed ({out.returncode})"}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    print(machine_line(torch=False))
    check_idle()
    naive = f"{'naive s':>8} {'MiB':>6} {'outcome':<34}"
    print(f"{'case':<28} {'input':>9} | {naive} | {'headstart s':>11} {'MiB':>5} outcome")
    for case in CASES:
        naive, ours = run(case, "naive"), run(case, "headstart")
        print(
            f"{case:<28} {ours.get('bytes', 0):>9} | {naive['seconds']:8.3f} {naive['peak_mib']:6.0f} "
            f"{naive['outcome'][:34]:<34} | {ours['seconds']:11.3f} {ours['peak_mib']:5.0f} {ours['outcome'][:50]}"
        )


if __name__ == "__main__":
    main()
