"""`headstart export` as a user runs it (a new process, `--no-store`), today's code against a baseline commit's in
the same run, alternating: the wall time and the peak resident memory of each, and whether both bundles verified with
the same figures.

The run exported is the hymenoptera MobileNetV2 (trained here first, unless ``--run`` names one); ``--int8`` adds
the int8 twin. ``--baseline REV`` runs the export with the code of commit REV as well (``_common.code_of``).

    .venv/bin/python benchmarks/export_time.py [--run RUN_DIR] [--baseline REV] [--rounds N] [--int8]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
from pathlib import Path

from _common import alternate_headstart, check_idle, codes, machine_line, train_hymenoptera


def export_args(run: str, out: Path, int8: bool) -> list[str]:
    """One `headstart export` of ``run`` into ``out``, printing its JSON."""
    return ["export", run, "--out", str(out), "--no-store", "--json"] + (["--int8"] if int8 else [])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="run directory to export (default: train the hymenoptera MobileNetV2)")
    parser.add_argument("--baseline", metavar="REV", help="also export with the code of this commit")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--int8", action="store_true")
    args = parser.parse_args()
    print(machine_line())
    busy = check_idle()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = args.run or str(train_hymenoptera(tmp / "run"))
        runs = alternate_headstart(
            args.rounds,
            codes(args.baseline, tmp),
            lambda name, r: export_args(run, tmp / f"bundle-{name}-{r}", args.int8),
        )
    walls = {name: [seconds for seconds, _, _ in done] for name, done in runs.items()}
    peaks = {name: [peak for _, peak, _ in done] for name, done in runs.items()}
    printed = {name: json.loads(done[-1][2]) for name, done in runs.items()}
    figures = {name: {"verification": p["verification"], "int8": p["int8"]} for name, p in printed.items()}
    result = {name: round(statistics.median(w), 2) for name, w in walls.items()}
    line = ", ".join(f"{name} {seconds:.1f} s" for name, seconds in result.items())
    if args.baseline:
        ratio = result[args.baseline] / result["today"]
        same = figures["today"] == figures[args.baseline]
        line += f": today's code {ratio:.2f}x as fast; the same verification figures: {same}"
    print(f"`headstart export{' --int8' if args.int8 else ''}` median wall over {args.rounds} rounds: {line}")
    peak = {name: statistics.median(p) for name, p in peaks.items()}
    print("peak resident memory (median): " + ", ".join(f"{name} {mb:.0f} MB" for name, mb in peak.items()))
    print(json.dumps({"walls": walls, "peak_mb": peaks, **figures["today"]}))
    print(f"other CPU use before the run: {busy:.0%}")


if __name__ == "__main__":
    main()
