"""The data check of a rerun: every image decoded again, against the images an earlier check read (by their bytes).

`headstart train` checks every file before training by decoding it (a JPEG at 1/8 scale: every byte is still read).
A rerun on the same photos with other options (the usual way to tune a head: the features come from the cache)
decoded them all again; now the images a check read are noted in the feature cache by the sha256 of their bytes
(``headstart.data.VerifiedImages``) and not decoded again. This times the classifier's data check
(``scan_image_folder``) of a folder of large photos both ways, alternated, and checks that both report the same:

- ``--photos enlarged`` (default): the hymenoptera photos enlarged 7x (about 9 MP; Lanczos, JPEG quality 92, as
  ``benchmarks/decode_scale.py`` makes them; no camera detail in them, so their files are smaller than a phone's),
  ``--count`` of them per class;
- ``--photos hymenoptera``: the shared photos as they are (about 500 x 375).

    .venv/bin/python benchmarks/data_check.py [--photos enlarged|hymenoptera] [--count 100] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, machine_line
from decode_scale import enlarged

HYMENOPTERA = SHARED / "data" / "hymenoptera"


def photo_folder(kind: str, count: int, tmp: Path) -> Path:
    if kind == "hymenoptera":
        return HYMENOPTERA
    root = tmp / "photos"
    for split, share in (("train", 0.6), ("val", 0.4)):
        for label in ("ants", "bees"):
            paths = sorted(p for p in (HYMENOPTERA / split / label).glob("*.jpg"))[: round(count * share)]
            (root / split / label).mkdir(parents=True)
            for path, data in zip(paths, enlarged(paths, 7, rotate=False), strict=True):
                (root / split / label / path.name).write_bytes(data)
    return root


def main() -> None:
    from headstart.data import VerifiedImages
    from headstart.tasks.classify.data import scan_image_folder

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", choices=("enlarged", "hymenoptera"), default="enlarged")
    parser.add_argument("--count", type=int, default=100, help="enlarged photos per class")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    print(machine_line(torch=False))
    with tempfile.TemporaryDirectory() as tmp:
        root = photo_folder(args.photos, args.count, Path(tmp))
        files = [p for p in root.rglob("*") if p.is_file()]
        print(f"{len(files)} files, {sum(p.stat().st_size for p in files) / len(files) / 1e6:.2f} MB each on average")
        cache = Path(tmp) / "cache"
        reference = scan_image_folder(root, verified=VerifiedImages(cache)).to_dict()  # notes every image once
        check_idle()
        times: dict[str, list[float]] = {"every image decoded": [], "checked before": []}
        for _ in range(args.repeats):
            for name, verified in (("every image decoded", None), ("checked before", VerifiedImages(cache))):
                start = time.perf_counter()
                report = scan_image_folder(root, verified=verified).to_dict()
                times[name].append(time.perf_counter() - start)
                assert report == reference, f"{name}: another report"
    base, now = (statistics.median(t) for t in times.values())
    print(f"data check, median of {args.repeats} (the same report both ways):")
    print(f"  every image decoded again: {base:.3f} s")
    print(f"  images checked before:     {now:.3f} s ({base / now:.1f}x faster)")


if __name__ == "__main__":
    main()
