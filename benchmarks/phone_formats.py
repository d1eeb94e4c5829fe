"""Phone formats: HEIC (what iPhones save; read through pillow-heif) and AVIF (Pillow) against the same photos as
JPEG: the classifier's answers and the time of decode + preprocess.

The photos: the hymenoptera validation JPEGs, the shared camera JPEGs (3264 x 2448 phone, 2048 x 1536 with EXIF
orientation 6, a 2048 x 1536 trail camera) and the phone photo enlarged to 8064 x 6048 (48 MP, the size of the
largest iPhone HEICs; no detail added: it measures the decoders' cost), each re-encoded here as HEIC (a grid of
512 px tiles, as iPhones write; quality 90) and as AVIF (quality 90), the EXIF orientation carried over. The
hymenoptera classifier (trained here, or --bundle) answers each photo from every format; printed per set and
format: the top-1 agreement with the JPEG's answer, the largest probability difference, and the median time of
``decode_for`` + ``preprocess`` (the formats alternated photo by photo). The JPEG is decoded at a reduced DCT
scale; HEIC and AVIF are decoded whole. Encoding the 48 MP HEIC takes about 40 s.

    .venv/bin/python benchmarks/phone_formats.py [--bundle BUNDLE] [--repeats 5]
"""

from __future__ import annotations

import argparse
import io
import statistics
import tempfile
import time

import numpy as np
from _common import SHARED, check_idle, machine_line
from PIL import Image

HYMENOPTERA = SHARED / "data" / "hymenoptera"


def reencoded(jpeg: bytes, fmt: str) -> bytes:
    """The photo as ``fmt`` (its pixels as stored, its EXIF orientation kept)."""
    img = Image.open(io.BytesIO(jpeg))
    exif = img.getexif()
    buf = io.BytesIO()
    options = {"tile_size": 512} if fmt == "HEIF" else {}
    img.convert("RGB").save(buf, fmt, quality=90, exif=exif.tobytes(), **options)
    return buf.getvalue()


def enlarged(path, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.open(path).convert("RGB").resize(size, Image.Resampling.BILINEAR).save(buf, "JPEG", quality=92)
    return buf.getvalue()


def run_set(bundle, name: str, jpegs: list[bytes], repeats: int) -> list[dict]:
    from headstart.service.inference import scores_and_novelty
    from headstart.service.preprocess import decode_for, preprocess

    spec = bundle.spec
    files = {
        "JPEG": jpegs,
        "HEIF": [reencoded(b, "HEIF") for b in jpegs],
        "AVIF": [reencoded(b, "AVIF") for b in jpegs],
    }
    probs = {
        fmt: np.concatenate([scores_and_novelty(bundle, preprocess(decode_for(b, spec), spec)[None])[0] for b in data])
        for fmt, data in files.items()
    }
    times = {fmt: [] for fmt in files}
    for _ in range(repeats):
        for i in range(len(jpegs)):
            for fmt, data in files.items():
                started = time.perf_counter()
                preprocess(decode_for(data[i], spec), spec)
                times[fmt].append((time.perf_counter() - started) * 1000)
    return [
        {
            "set": name,
            "format": fmt,
            "photos": len(jpegs),
            "MB each": sum(map(len, files[fmt])) / len(jpegs) / 1e6,
            "top-1 = JPEG's": float((probs[fmt].argmax(1) == probs["JPEG"].argmax(1)).mean()),
            "max |dp|": float(np.abs(probs[fmt] - probs["JPEG"]).max()),
            "ms decode + preprocess": statistics.median(times[fmt]),
        }
        for fmt in files
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a classifier bundle (default: train and export the hymenoptera one)")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line())
    check_idle()
    from headstart.service.bundle import load_bundle
    from headstart.service.formats import allowed_formats

    missing = {"AVIF", "HEIF"} - set(allowed_formats())
    if missing:
        raise SystemExit(
            f"this installation does not read {sorted(missing)}: pip install 'headstart[heif]' and Pillow 11.3+"
        )
    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            from serve_load import make_bundle

            args.bundle = make_bundle(tmp)
        bundle = load_bundle(args.bundle, precision="fp32")
        sets = {
            "hymenoptera val": [p.read_bytes() for p in sorted((HYMENOPTERA / "val").rglob("*.jpg"))],
            "camera (8 MP, 3 MP EXIF 6, 3 MP)": [
                p.read_bytes() for p in sorted((SHARED / "photos" / "camera").glob("*.jpg"))
            ],
            "48 MP (the phone photo enlarged)": [enlarged(SHARED / "photos" / "camera" / "jolla.jpg", (8064, 6048))],
        }
        rows = [row for name, jpegs in sets.items() for row in run_set(bundle, name, jpegs, args.repeats)]
    keys = list(rows[0])
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(" | ".join(f"{row[k]:.4f}" if isinstance(row[k], float) else str(row[k]) for k in keys))


if __name__ == "__main__":
    main()
