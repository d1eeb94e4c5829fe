"""Decoding bounded by the output: JPEGs decoded at a reduced DCT scale against decoded whole, on large photos.

For each set of large JPEGs, the hymenoptera classifier (trained here, or --bundle) answers twice per photo: from the
photo decoded whole and from the photo decoded the way headstart decodes it (``service.preprocess.decode_for``: the
smallest DCT scale whose shorter side is still 2 x the resize target). Prints the top-1 agreement, the largest
probability and novelty differences, how often "none of these" changes, and the time of decode + preprocess both
ways (median over repeats, the two ways alternated photo by photo).

The sets: the shared camera photos (3264 x 2448 phone, 2048 x 1536 with EXIF orientation 6, a 2048 x 1536 trail
camera), the hymenoptera photos whose shorter side is at least 1024 (native), and, as photos of 8 MP and more, the
hymenoptera validation images and the coco128 images enlarged 4x (Lanczos; at most 12 MP) and saved as JPEG quality
92: no camera
detail in them, but every decoder path of a large JPEG, EXIF-rotated ones included (a copy of each set with
orientation 6 written into the EXIF). Last, the camera photos saved again as progressive JPEGs (quality 92, EXIF
kept), as web exports and some editors write them: libjpeg decodes every scan of a progressive file into the whole
coefficient buffer before any scaling, so the reduced scale saves much less there.

    .venv/bin/python benchmarks/decode_scale.py [--bundle BUNDLE] [--repeats 5]
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


def enlarged(paths: list[Path], factor: int, rotate: bool, most: float = 12e6) -> list[bytes]:
    """Each photo enlarged ``factor`` times (to at most ``most`` pixels) as a quality-92 JPEG; with ``rotate`` stored
    sideways with EXIF orientation 6 (as phones store portrait photos), so that it shows upright."""
    out = []
    for p in paths:
        img = Image.open(p).convert("RGB")
        f = min(factor, (most / (img.width * img.height)) ** 0.5)
        img = img.resize((round(img.width * f), round(img.height * f)), Image.Resampling.LANCZOS)
        exif = Image.Exif()
        if rotate:
            img = img.transpose(Image.Transpose.ROTATE_90)  # orientation 6 turns it back 90 degrees clockwise
            exif[0x0112] = 6
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92, exif=exif.tobytes())
        out.append(buf.getvalue())
    return out


def progressive(paths: list[Path]) -> list[bytes]:
    """Each photo saved again as a progressive JPEG (quality 92), its EXIF kept."""
    out = []
    for p in paths:
        img = Image.open(p)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=92, progressive=True, exif=img.info.get("exif", b""))
        out.append(buf.getvalue())
    return out


def answers(bundle, images: list[Image.Image]) -> tuple[np.ndarray, np.ndarray | None]:
    from headstart.service.inference import scores_and_novelty
    from headstart.service.preprocess import preprocess

    probs, novelty = zip(
        *(scores_and_novelty(bundle, preprocess(img, bundle.spec)[None]) for img in images), strict=True
    )
    return np.concatenate(probs), None if novelty[0] is None else np.concatenate(novelty)


def compare(bundle, name: str, photos: list[bytes], repeats: int) -> dict:
    from headstart.service.preprocess import decode_for, decode_image, preprocess

    spec = bundle.spec
    whole = [decode_image(b) for b in photos]
    reduced = [decode_for(b, spec) for b in photos]
    assert [im.size for im in whole] == [tuple(im.info["original_size"]) for im in reduced]
    (p_whole, n_whole), (p_reduced, n_reduced) = answers(bundle, whole), answers(bundle, reduced)
    times = {"whole": [], "reduced": []}
    for _ in range(repeats):
        for data in photos:
            for how, decode in (("whole", decode_image), ("reduced", lambda b: decode_for(b, spec))):
                started = time.perf_counter()
                preprocess(decode(data), spec)
                times[how].append((time.perf_counter() - started) * 1000)
    threshold = bundle.open_set["threshold"] if bundle.open_set else None
    row = {
        "set": name,
        "photos": len(photos),
        "size": "x".join(map(str, whole[0].size)),
        "decoded at": "x".join(map(str, reduced[0].size)),
        "top-1 agreement": float((p_whole.argmax(1) == p_reduced.argmax(1)).mean()),
        "max |dp|": float(np.abs(p_whole - p_reduced).max()),
        "ms whole": statistics.median(times["whole"]),
        "ms reduced": statistics.median(times["reduced"]),
    }
    if threshold is not None:
        row["max |d novelty|"] = float(np.abs(n_whole - n_reduced).max())
        row["unknown changed"] = int(((n_whole > threshold) != (n_reduced > threshold)).sum())
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", help="a classifier bundle (default: train and export the hymenoptera one)")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    print(machine_line())
    check_idle()
    from headstart.service.bundle import load_bundle

    with tempfile.TemporaryDirectory() as tmp:
        if args.bundle is None:
            from serve_load import make_bundle

            args.bundle = make_bundle(tmp)
        bundle = load_bundle(args.bundle, precision="fp32")  # the comparison is about pixels: full precision
        val = sorted((HYMENOPTERA / "val").rglob("*.jpg"))
        coco = sorted((SHARED / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))
        big = [  # one of them (10368 x 7776) is over the 64 MP limit: refused whole or not
            p
            for p in sorted(HYMENOPTERA.rglob("*.jpg"))
            if min(Image.open(p).size) >= 1024 and Image.open(p).size[0] * Image.open(p).size[1] <= 64_000_000
        ]
        sets = {
            **{
                f"camera: {p.name} (real)": [p.read_bytes()]
                for p in sorted((SHARED / "photos" / "camera").glob("*.jpg"))
            },
            "hymenoptera >= 1024 px, <= 64 MP (real)": [p.read_bytes() for p in big],
            "hymenoptera val x4": enlarged(val, 4, rotate=False),
            "hymenoptera val x4, EXIF 6": enlarged(val[::3], 4, rotate=True),
            "coco128 x4": enlarged(coco, 4, rotate=False),
            **{
                f"camera: {p.name}, saved progressive": progressive([p])
                for p in sorted((SHARED / "photos" / "camera").glob("*.jpg"))
            },
        }
        rows = [compare(bundle, name, photos, args.repeats) for name, photos in sets.items()]
    keys = list(rows[0])
    print(" | ".join(keys))
    print(" | ".join("---" for _ in keys))
    for row in rows:
        print(
            " | ".join(f"{row.get(k, ''):.4f}" if isinstance(row.get(k), float) else str(row.get(k, "")) for k in keys)
        )
    everything = sum(r["photos"] for r in rows)
    agree = sum(r["top-1 agreement"] * r["photos"] for r in rows) / everything
    print(f"all {everything} photos: top-1 agreement {agree:.4f}")


if __name__ == "__main__":
    main()
