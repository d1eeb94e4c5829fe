"""The README's detector training (`headstart train ../shared/data/coco128`, the pyramid head's defaults, the shared
MobileNetV2) with today's code and with the code of commit REV, alternated: what the head's training costs, and what
a change to it saves.

The feature cache is warmed first (one run with today's code, not counted: extracting 1,200 augmented views is the
same work for both codes and would hide the head; ``--cache-dir`` names one already warm instead), then each code
trains ``--repeats`` times from that cache, each run a new process. Printed per run: the wall time, the head's
seconds (``metrics.json``: ``training.seconds.head``), the peak resident memory (``os.wait4``) and the validation
mAP@0.5 and mAP@0.5:0.95 of the epoch kept; then the medians and the ratio. The two codes' mAP need not be equal
where a change rounds differently (a loss written out instead of composed: the training's trajectory drifts from
the first differing step on): the script prints both, and says whether they are the same.

    .venv/bin/python benchmarks/detector_training.py --baseline REV [--repeats 2] [--cache-dir DIR] [-- TRAIN_ARGS]

Arguments after ``--`` go to `headstart train` (say ``--epochs 3`` for a shorter comparison).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import SHARED, check_idle, code_of, machine_line, run_headstart, train_args

COCO128 = SHARED / "data" / "coco128"


def train(out: Path, cache: Path, extra: list[str], where: dict | None) -> dict:
    """One `headstart train` in a new process: wall seconds, peak resident MB and what metrics.json reports."""
    wall, peak, _ = run_headstart([*train_args(COCO128, out, cache), *extra], where)
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "wall": wall,
        "head": metrics["training"]["seconds"]["head"],
        "peak_mb": peak,
        "map50": metrics["map50"],
        "map50_95": metrics["map50_95"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--baseline", required=True, help="the commit whose code is the baseline")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--cache-dir", help="a warm feature cache to reuse (default: a new one, warmed first)")
    parser.add_argument("train_args", nargs="*", help="after --: more `headstart train` arguments")
    args = parser.parse_args()
    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        where = code_of(args.baseline, tmp)
        cache = Path(args.cache_dir) if args.cache_dir else tmp / "cache"
        if not args.cache_dir:
            warm = train(tmp / "warm", cache, args.train_args, None)
            print(f"cache warmed: {warm['wall']:.1f} s (not counted)")
        runs: dict[str, list[dict]] = {"today": [], args.baseline: []}
        for r in range(args.repeats):
            for code, env in (("today", None), (args.baseline, where)):
                run = train(tmp / f"{code}-{r}", cache, args.train_args, env)
                runs[code].append(run)
                print(
                    f"  {code:>10}: {run['wall']:6.1f} s wall, head {run['head']:6.1f} s, "
                    f"peak {run['peak_mb']:5.0f} MB, mAP@0.5 {run['map50']:.4f}, mAP@0.5:0.95 {run['map50_95']:.4f}"
                )
    med = {code: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for code, rs in runs.items()}
    today, base = med["today"], med[args.baseline]
    print(
        f"median wall: today {today['wall']:.1f} s, {args.baseline} {base['wall']:.1f} s -> "
        f"{base['wall'] / today['wall']:.2f}x; head {today['head']:.1f} vs {base['head']:.1f} s -> "
        f"{base['head'] / today['head']:.2f}x; peak {today['peak_mb']:.0f} vs {base['peak_mb']:.0f} MB"
    )
    same = all(
        (a["map50"], a["map50_95"]) == (b["map50"], b["map50_95"])
        for a, b in zip(runs["today"], runs[args.baseline], strict=True)
    )
    print("validation mAP: " + ("the same both ways" if same else "differs between the codes (see the runs above)"))


if __name__ == "__main__":
    main()
