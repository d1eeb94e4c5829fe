"""Phone formats: HEIC (what iPhones save; read through pillow-heif) and AVIF (Pillow), and PNG, against the same
photos as JPEG: the classifier's answers, decoded as headstart decodes them and decoded whole, and the time of
decode + preprocess.

The photos: the hymenoptera validation JPEGs, the same enlarged 6x (to at most 12 MP: 3000 x 2250 and the like;
bilinear, so no detail added; as PNG all of them, as HEIC and AVIF every third), the shared camera JPEGs (3264 x 2448
phone, 2048 x 1536 with EXIF orientation 6, a 2048 x 1536 trail camera) and the phone photo enlarged to 8064 x 6048
(48 MP, the size of the largest iPhone HEICs), each re-encoded here as PNG, as HEIC (a grid of 512 px tiles, as
iPhones write; quality 90) and as AVIF (quality 90), the EXIF orientation carried over. The hymenoptera classifier
(trained here, or --bundle) answers each photo of every format decoded as headstart decodes it (``decode_for``: a
JPEG at a reduced DCT scale, the others whole and then, where large, reduced by a whole factor) and decoded whole
(``decode_image``). Printed per set and format: the top-1 agreement with the JPEG's answer and with the same file's
whole decoding, the largest probability difference from the whole decoding, and the median time of decode +
preprocess both ways (the formats alternated photo by photo). Encoding the 48 MP HEIC takes about 40 s.

``--baseline REV`` also measures what `headstart.load(BUNDLE).predict(paths)` holds: 48 copies of the 8 MP phone
photo as PNG and as HEIC, predicted in a new process with today's code and with that of commit REV: the peak
resident memory and images/s of each (the answers compared).

    .venv/bin/python benchmarks/phone_formats.py [--bundle BUNDLE] [--repeats 3] [--baseline REV]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED, check_idle, machine_line
from PIL import Image

HYMENOPTERA = SHARED / "data" / "hymenoptera"


FORMATS = ("JPEG", "PNG", "HEIF", "AVIF")


def reencoded(jpeg: bytes, fmt: str) -> bytes:
    """The photo as ``fmt`` (its pixels as stored, its EXIF orientation kept)."""
    img = Image.open(io.BytesIO(jpeg))
    exif = img.getexif()
    buf = io.BytesIO()
    options = {"tile_size": 512, "quality": 90} if fmt == "HEIF" else {"quality": 90} if fmt == "AVIF" else {}
    img.convert("RGB").save(buf, fmt, exif=exif.tobytes(), **options)
    return buf.getvalue()


def enlarged(path, size: tuple[int, int] | None = None, factor: int = 1) -> bytes:
    """The photo enlarged (bilinear) to ``size``, or ``factor`` times to at most 12 MP, as a quality-92 JPEG."""
    img = Image.open(path).convert("RGB")
    buf = io.BytesIO()
    factor = min(factor, (12e6 / (img.width * img.height)) ** 0.5)  # at most 12 MP
    size = size or (round(img.width * factor), round(img.height * factor))
    img.resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def run_set(bundle, name: str, jpegs: list[bytes], repeats: int, formats=FORMATS) -> list[dict]:
    from headstart.service.inference import scores_and_novelty
    from headstart.service.preprocess import decode_for, decode_image, preprocess

    spec = bundle.spec
    ways = {"reduced": lambda b: decode_for(b, spec), "whole": decode_image}
    files = {fmt: jpegs if fmt == "JPEG" else [reencoded(b, fmt) for b in jpegs] for fmt in ("JPEG", *formats[1:])}
    probs = {
        (fmt, way): np.concatenate([scores_and_novelty(bundle, preprocess(decode(b), spec)[None])[0] for b in data])
        for fmt, data in files.items()
        for way, decode in ways.items()
    }
    times = {key: [] for key in probs}
    for _ in range(repeats):
        for i in range(len(jpegs)):
            for fmt, data in files.items():
                for way, decode in ways.items():
                    started = time.perf_counter()
                    preprocess(decode(data[i]), spec)
                    times[fmt, way].append((time.perf_counter() - started) * 1000)
    top1 = {key: p.argmax(1) for key, p in probs.items()}
    return [
        {
            "set": name,
            "format": fmt,
            "photos": len(jpegs),
            "MB each": sum(map(len, files[fmt])) / len(jpegs) / 1e6,
            "top-1 = JPEG's": float((top1[fmt, "reduced"] == top1["JPEG", "reduced"]).mean()),
            "top-1 = whole's": float((top1[fmt, "reduced"] == top1[fmt, "whole"]).mean()),
            "max |dp| from whole": float(np.abs(probs[fmt, "reduced"] - probs[fmt, "whole"]).max()),
            "ms as decoded": statistics.median(times[fmt, "reduced"]),
            "ms whole": statistics.median(times[fmt, "whole"]),
        }
        for fmt in files
    ]


#: `headstart.load(...).predict` over a list of paths in a new process: images/s, peak RSS (MiB: VmHWM, as
#: getrusage's ru_maxrss would be the parent's, kept across exec), best labels
PREDICT_JOB = """
import sys, time
import headstart
model, listing = sys.argv[1:3]
paths = open(listing).read().splitlines()
loaded = headstart.load(model)
started = time.perf_counter()
answers = loaded.predict(paths)
seconds = time.perf_counter() - started
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(len(paths) / seconds, peak / 1024)
print(" ".join(str(a.label or a.error) for a in answers))
"""


def held_memory(bundle_dir: str, baseline: str, tmp: Path) -> list[dict]:
    """Peak memory and images/s of predicting 48 copies of the 8 MP photo as PNG and as HEIC, today's code and
    ``baseline``'s, each in a new process."""
    import subprocess
    import sys

    from _common import code_of

    where = code_of(baseline, tmp)
    photo = (SHARED / "photos" / "camera" / "jolla.jpg").read_bytes()
    rows = []
    for fmt in ("PNG", "HEIF"):
        data = reencoded(photo, fmt)
        folder = tmp / fmt
        folder.mkdir()
        for i in range(48):
            (folder / f"{i:02d}.{fmt.lower()}").write_bytes(data)
        listing = tmp / f"{fmt}.txt"
        listing.write_text("\n".join(str(p) for p in sorted(folder.iterdir())))
        runs = {}
        for code, env in (("today", {}), (baseline, where)):
            out = subprocess.run(
                [sys.executable, "-c", PREDICT_JOB, bundle_dir, str(listing)],
                capture_output=True,
                text=True,
                check=True,
                **env,
            ).stdout.splitlines()
            rate, peak = map(float, out[0].split())
            runs[code] = (rate, peak, out[1])
        rows.append(
            {
                "photos": f"48 x 8 MP {fmt}",
                "peak MiB today": runs["today"][1],
                f"peak MiB {baseline}": runs[baseline][1],
                "img/s today": runs["today"][0],
                f"img/s {baseline}": runs[baseline][0],
                "same labels": runs["today"][2] == runs[baseline][2],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a classifier bundle (default: train and export the hymenoptera one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--baseline", metavar="REV", help="also the memory predict holds, against this commit's")
    args = parser.parse_args()
    print(machine_line())
    check_idle()
    from headstart.service.bundle import load_bundle
    from headstart.service.formats import allowed_formats

    missing = {"AVIF", "HEIF"} - set(allowed_formats())
    if missing:
        raise SystemExit(
            f"this installation does not read {sorted(missing)}: pip install pillow-heif, and Pillow 11.3+"
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            from serve_load import make_bundle

            args.bundle = make_bundle(tmp)
        bundle = load_bundle(args.bundle, precision="fp32")
        val = sorted((HYMENOPTERA / "val").rglob("*.jpg"))
        sets = {
            "hymenoptera val": [p.read_bytes() for p in val],
            "hymenoptera val x6 (at most 12 MP)": ([enlarged(p, factor=6) for p in val], ("JPEG", "PNG")),
            "hymenoptera val x6 (at most 12 MP), every third": (
                [enlarged(p, factor=6) for p in val[::3]],
                ("JPEG", "HEIF", "AVIF"),
            ),
            "camera (8 MP, 3 MP EXIF 6, 3 MP)": [
                p.read_bytes() for p in sorted((SHARED / "photos" / "camera").glob("*.jpg"))
            ],
            "48 MP (the phone photo enlarged)": [enlarged(SHARED / "photos" / "camera" / "jolla.jpg", (8064, 6048))],
        }
        sets = {name: item if isinstance(item, tuple) else (item, FORMATS) for name, item in sets.items()}
        rows = [row for name, (jpegs, fmts) in sets.items() for row in run_set(bundle, name, jpegs, args.repeats, fmts)]
        table(rows)
        if args.baseline:
            table(held_memory(str(args.bundle), args.baseline, Path(tmp)))


def table(rows: list[dict]) -> None:
    keys = list(rows[0])
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    print()


if __name__ == "__main__":
    main()
