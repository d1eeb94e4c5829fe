"""A first `headstart train` on a data set (nothing in the feature cache, nothing noted by an earlier data check),
with today's code and with the code of commit REV, alternated: what a user's first run costs, and what a change
to it saves; then `headstart evaluate` of a run on the set's validation folder, both codes alternated.

The data sets (``--sets``, all by default):

- ``hymenoptera``: the shared photos as they are (245 train / 153 val, about 500 x 375);
- ``jpeg-9mp``: 200 of them enlarged 7x to about 9 MP (Lanczos, JPEG quality 92; 120 train / 80 val, ants and
  bees; ``benchmarks/data_check.py``'s set);
- ``heic-6mp``: 40 of them enlarged 6x to about 6 MP (3000 x 2004 and the like; bilinear) and saved as HEIC (512 px
  tiles, quality 90, as iPhones write; ``benchmarks/phone_formats.py``'s encoding; 24 train / 16 val). Needs
  pillow-heif.

Each run is `headstart train SET` as the README runs it (MobileNetV2 with the shared weights), in a new process with
an empty ``--cache-dir``; printed per set: each run's wall time and its "done in" (in process), the medians, the
ratio, and whether both codes gave the same validation metrics (they must: the images are decoded alike); the
same for `headstart evaluate RUN SET/val` (a run trained here with today's code; each evaluation a new process).

    .venv/bin/python benchmarks/first_train.py --baseline REV [--sets hymenoptera,jpeg-9mp,heic-6mp] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from pathlib import Path

from _common import SHARED, check_idle, code_of, machine_line, run_headstart, train_args

HYMENOPTERA = SHARED / "data" / "hymenoptera"
SETS = ("hymenoptera", "jpeg-9mp", "heic-6mp")


def heic_folder(tmp: Path, per_class: dict[str, int]) -> Path:
    from phone_formats import enlarged, reencoded

    from headstart.service.formats import allowed_formats

    if "HEIF" not in allowed_formats():  # registers pillow-heif's plugin where installed
        raise SystemExit("heic-6mp needs pillow-heif: pip install pillow-heif (or leave the set out: --sets)")
    root = tmp / "heic"
    for split, count in per_class.items():
        for label in ("ants", "bees"):
            (root / split / label).mkdir(parents=True)
            for path in sorted((HYMENOPTERA / split / label).glob("*.jpg"))[:count]:
                heic = reencoded(enlarged(path, factor=6), "HEIF")
                (root / split / label / f"{path.stem}.heic").write_bytes(heic)
    return root


def data_set(name: str, tmp: Path) -> Path:
    if name == "hymenoptera":
        return HYMENOPTERA
    if name == "jpeg-9mp":
        from data_check import photo_folder

        return photo_folder("enlarged", 100, tmp)
    return heic_folder(tmp, {"train": 12, "val": 8})


def timed(args: list[str], out: Path, where: dict | None) -> tuple[float, dict]:
    """Wall seconds of `headstart ARGS` in a new process (``where``: the code of another commit), and the
    metrics.json it wrote into ``out``."""
    wall, _, _ = run_headstart(args, where)
    return wall, json.loads((out / "metrics.json").read_text())


def first_run(data: Path, where: dict | None) -> tuple[float, dict]:
    """`headstart train` in a new process with an empty feature cache."""
    with tempfile.TemporaryDirectory() as tmp:
        return timed(train_args(data, f"{tmp}/run", f"{tmp}/cache"), Path(tmp) / "run", where)


def evaluation(run: Path, folder: Path, where: dict | None) -> tuple[float, dict]:
    """`headstart evaluate RUN FOLDER` in a new process."""
    with tempfile.TemporaryDirectory() as tmp:
        return timed(["evaluate", str(run), str(folder), "--out", f"{tmp}/eval"], Path(tmp) / "eval", where)


def alternated(label: str, once, repeats: int, baseline: str, where: dict) -> dict[str, list[tuple[float, dict]]]:
    """``once(where)`` with today's code and the baseline's in turn, ``repeats`` times each: every run printed,
    then the median walls and whether both codes gave the same metrics (timings aside)."""
    load = check_idle()
    runs: dict[str, list[tuple[float, dict]]] = {"today": [], baseline: []}
    for repeat in range(repeats):
        for code, env in (("today", None), (baseline, where)):
            wall, metrics = once(env)
            runs[code].append((wall, metrics))
            seconds = metrics.get("training", {}).get("seconds")
            what = f", done in {seconds['total']:.2f} s, val accuracy {metrics['accuracy']:.4f}" if seconds else ""
            print(f"  {code:>10} {label} {repeat}: {wall:.2f} s wall{what}", flush=True)
    load = max(load, check_idle())
    now, then = (statistics.median(wall for wall, _ in runs[code]) for code in ("today", baseline))
    same = scores(runs["today"][0][1]) == scores(runs[baseline][0][1])
    print(
        f"  {label} median wall: today {now:.2f} s, {baseline} {then:.2f} s: today's code {then / now:.2f}x as fast; "
        f"the same metrics: {'yes' if same else 'NO'}"
        + (f"; the CPU was {load:.0%} busy with other work" if load > 0.15 else "")
    )
    return runs


def scores(metrics: dict) -> dict:
    """The metrics, without the run's timings."""
    return {k: v for k, v in metrics.items() if k != "training"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", metavar="REV", required=True, help="the commit to compare with")
    parser.add_argument("--sets", default=",".join(SETS), help=f"comma-separated, of {', '.join(SETS)}")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each code per set, alternated")
    args = parser.parse_args()
    sets = [s.strip() for s in args.sets.split(",") if s.strip()]
    unknown = sorted(set(sets) - set(SETS))
    if unknown:
        parser.error(f"unknown set(s) {unknown}: choose from {', '.join(SETS)}")
    print(machine_line())
    with tempfile.TemporaryDirectory() as tmp:
        where = code_of(args.baseline, Path(tmp))
        for name in sets:
            data = data_set(name, Path(tmp) / name)
            files = [p for p in data.rglob("*") if p.is_file()]
            print(
                f"\n{name}: {len(files)} files, {sum(p.stat().st_size for p in files) / len(files) / 1e6:.2f} MB each"
            )
            runs = alternated("train", partial(first_run, data), args.repeats, args.baseline, where)
            inside = {
                code: statistics.median(m["training"]["seconds"]["total"] for _, m in r) for code, r in runs.items()
            }
            print(f"  train in process: today's code {inside[args.baseline] / inside['today']:.2f}x as fast")

            run = Path(tmp) / f"{name}-run"
            subprocess.run(
                [sys.executable, "-m", "headstart", *train_args(data, run, Path(tmp) / f"{name}-cache")],
                check=True,
                capture_output=True,
            )
            alternated("evaluate", partial(evaluation, run, data / "val"), args.repeats, args.baseline, where)


if __name__ == "__main__":
    main()
