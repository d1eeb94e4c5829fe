"""`headstart predict` as a user runs it (a new process, `--json`), today's code against a baseline commit's in the
same run, alternating: the wall time and the peak resident memory of each, and how far their answers differ.

MODEL is what `headstart predict` takes (a bundle, a run directory or a model-store tag), IMAGES its images (files,
folders, quoted globs); ``--localize`` asks for boxes as well (a detector's answers), ``--heatmap`` for each image's
heatmap (written to a folder of each run's own), ``--runtime`` names the runtime.
``--baseline REV`` runs the same command with the code of commit REV (``_common.code_of``). ``--batch`` runs
`headstart predict-batch MODEL IMAGE` instead (one folder, a glob or a list; a local Ray instance, its parquet
parts read back for the answers), and the peak is that of all its processes together (the driver, Ray's own and
its actors, polled every 0.1 s).

    .venv/bin/python benchmarks/predict_memory.py MODEL IMAGES... [--localize] [--heatmap] [--runtime R]
        [--baseline REV] [--rounds N] [--batch]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
from pathlib import Path

from _common import alternate_headstart, check_idle, codes, machine_line


def answers_of(stdout: bytes) -> dict[str, dict]:
    """Each image's answer, by image name."""
    lines = [json.loads(line) for line in stdout.decode().splitlines() if line.strip()]
    return {a["image"]: a for a in lines}


def batch_answers(out: Path) -> dict[str, dict]:
    """Each image's answer in predict-batch's parquet parts, by its path, as `predict --json` gives it."""
    import pyarrow.parquet as pq

    answers = {}
    for row in pq.read_table(out).to_pylist():
        scores = zip(row["labels"] or [], row["scores"] or [], strict=True)
        answers[row["path"]] = {
            "predictions": [{"label": label, "score": score} for label, score in scores],
            "detections": json.loads(row["boxes"]) if row["boxes"] else [],
        }
    return answers


def differences(a: dict[str, dict], b: dict[str, dict]) -> str:
    """How two runs' answers differ: the top labels that are not the same, the largest score difference, and the
    detections' counts."""
    if a.keys() != b.keys():
        return f"different images answered ({len(a)} and {len(b)})"
    top, score, boxes = 0, 0.0, 0
    for name, x in a.items():
        y = b[name]
        px, py = x.get("predictions") or [], y.get("predictions") or []
        top += bool(px and py and px[0]["label"] != py[0]["label"])
        score = max([score, *(abs(p["score"] - q["score"]) for p, q in zip(px, py, strict=False))])
        dx, dy = x.get("detections") or [], y.get("detections") or []
        boxes += len(dx) != len(dy)
        for p, q in zip(dx, dy, strict=False):
            score = max(score, abs(p["confidence"] - q["confidence"]))
    return f"{top} top labels differ, scores by at most {score:.2e}, {boxes} images with another number of boxes"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("images", nargs="+")
    parser.add_argument("--localize", action="store_true")
    parser.add_argument("--heatmap", action="store_true", help="also write each image's heatmap (predict only)")
    parser.add_argument("--runtime", choices=("auto", "openvino", "onnxruntime"), default="auto")
    parser.add_argument("--baseline", metavar="REV", help="also predict with the code of this commit")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", action="store_true", help="headstart predict-batch (one IMAGES source)")
    args = parser.parse_args()
    if args.batch and len(args.images) != 1:
        parser.error("--batch takes one IMAGES source (a folder, a quoted glob or a list)")
    if args.batch and args.heatmap:
        parser.error("--heatmap is `headstart predict`'s; predict-batch writes no heatmaps")
    print(machine_line(torch=False))
    check_idle()
    # absolute paths: a baseline's process runs in the folder of its commit's files
    model = args.model if not Path(args.model).exists() else os.path.abspath(args.model)
    flags = ["--json", "--runtime", args.runtime] + (["--localize"] if args.localize else [])
    verb = "predict-batch" if args.batch else "predict"
    command = [verb, model, *map(os.path.abspath, args.images), *flags]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)

        def args_of(name: str, r: int) -> list[str]:
            if args.batch:
                return [*command, "--out", str(tmp / f"out-{name}-{r}"), "--no-progress"]
            return [*command, "--heatmap", str(tmp / f"heatmaps-{name}-{r}")] if args.heatmap else command

        runs = alternate_headstart(args.rounds, codes(args.baseline, tmp), args_of, tree=args.batch)
        last = args.rounds - 1
        if args.batch:
            answers = {name: batch_answers(tmp / f"out-{name}-{last}") for name in runs}
        else:
            answers = {name: answers_of(done[-1][2]) for name, done in runs.items()}
    wall = {name: statistics.median(seconds for seconds, _, _ in done) for name, done in runs.items()}
    peak = {name: statistics.median(peak for _, peak, _ in done) for name, done in runs.items()}
    images = len(answers["today"])
    what = "peak resident memory of all its processes together" if args.batch else "peak resident memory"
    shown = " ".join(flags + (["--heatmap DIR"] if args.heatmap else []))
    print(f"`headstart {verb} MODEL IMAGES {shown}` on {images} images, medians over {args.rounds} rounds:")
    for name in runs:
        print(f"  {name}: {wall[name]:.1f} s wall, {what} {peak[name]:.0f} MB")
    if args.baseline:
        base = args.baseline
        print(
            f"today's code: {wall[base] / wall['today']:.2f}x as fast, {peak[base] / peak['today']:.2f}x less memory; "
            f"answers against {base}: {differences(answers['today'], answers[base])}"
        )


if __name__ == "__main__":
    main()
