"""Per-epoch diagnosis of one cross-validation fold of the pyramid detector: validation vs held-out AP50.

`headstart train` picks the epoch with the best validation mAP@0.5; on a small data set the validation split is a
handful of images, so whether that choice means anything is worth seeing. This trains one fold of
``benchmarks/localize_eval.py`` (coco128, person only, the same folds for the same seed) evaluating after every
epoch, keeps the head's weights at each evaluation, then scores every one of them on the fold's held-out images:

    .venv/bin/python benchmarks/detect_curve.py [--seed 0] [--fold 2] [--folds 3] [--views 4 --epochs 30]

It prints one line per epoch (validation mAP@0.5 on the fold's validation fifth, held-out AP50) and which epoch the
run selected. A curve whose held-out AP jumps from epoch to epoch while the training loss falls is a head that
memorises its views: the epoch picked is then a lottery. Any option of `headstart train` for detection
changes the run (validation every epoch and no early stopping unless given). Diagnostic only.
"""

from __future__ import annotations

import argparse
import copy
import tempfile
from pathlib import Path

import torch
from _common import check_idle, machine_line
from localize_eval import COCO, headstart_fold

import headstart.tasks.detect.fit as detect_fit


def main() -> None:
    from headstart.config import add_config_options
    from headstart.tasks import DetectConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folds", type=int, default=3)
    parser.add_argument("--fold", type=int, default=1, help="which fold is held out, 1-based as localize_eval prints")
    add_config_options(parser, DetectConfig)  # `headstart train`'s detection options; --seed also cuts the folds
    args = parser.parse_args()
    if not 1 <= args.fold <= args.folds:
        parser.error(f"--fold must be between 1 and --folds ({args.folds})")
    given = {k: v for k, v in vars(args).items() if k not in ("folds", "fold")}
    seed = given.pop("seed", 0)
    # what localize_eval.headstart_fold and the fold itself decide: the backbone, the data, the run's housekeeping
    fixed = [
        k
        for k in (
            "backbone",
            "pretrained",
            "weights",
            "val_fraction",
            "classes",
            "cache_dir",
            "no_cache",
            "resume",
            "overwrite",
            "progress",
        )
        if k in given
    ]
    if fixed:
        field = DetectConfig.__dataclass_fields__[fixed[0]]
        parser.error(
            f"{field.metadata['flag'] or '--' + fixed[0].replace('_', '-')} is set by this benchmark: "
            "MobileNetV2 on coco128's person boxes, the fold's own validation fifth"
        )

    from headstart.crossval import fold_report, make_folds
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.tasks.detect.data import keep_classes, scan_yolo_dataset
    from headstart.tasks.detect.metrics import evaluate_detector

    options = {"eval_every": 1, "patience": 10**6, **given}
    busy = check_idle()
    print(machine_line() + f"; other CPU use before: {busy:.0%}")
    report = keep_classes(scan_yolo_dataset(COCO, val_fraction=0.2), ["person"])
    pooled = [s for items in report.splits.values() for s in items]
    folds = make_folds(pooled, args.folds, seed)

    snapshots: list[tuple[dict, dict]] = []
    original_fit = detect_fit.fit

    def recording_fit(phase, schedule, checkpoint, progress):
        evaluate = phase.evaluate

        def evaluate_and_keep() -> dict:
            row = evaluate()
            snapshots.append(({k: v.detach().clone() for k, v in phase.model.state_dict().items()}, row))
            return row

        phase = copy.copy(phase)
        phase.evaluate = evaluate_and_keep
        return original_fit(phase, schedule, checkpoint, progress)

    with tempfile.TemporaryDirectory() as tmp:
        selected, seconds, run_dir = headstart_fold(
            report, folds, args.fold - 1, options, Path(tmp), seed, {"headstart.tasks.detect.fit.fit": recording_fit}
        )
        _, test = fold_report(report, folds, args.fold - 1, 0.2, seed)
        run = load_run(run_dir)
        print(
            f"seed {seed}, fold {args.fold} of {args.folds}, options {options}: {len(test)} held-out images, "
            f"trained in {seconds:.0f} s"
        )
        print(f"{'epoch':>6} {'val mAP50':>10} {'held-out AP50':>14}")
        for k, (state, row) in enumerate(snapshots):
            run.model.head.load_state_dict({name: v.contiguous() for name, v in state.items()})
            with torch.no_grad():
                held_out = evaluate_detector(RunModel(run), test)[0]["map50"]
            print(f"{k + 1:>6} {row['val_map50']:>10.4f} {held_out:>14.4f}")
        print(f"the run kept (best validation mAP50): held-out AP50 {selected['map50']:.4f}")


if __name__ == "__main__":
    main()
