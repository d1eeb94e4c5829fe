"""The detector's options (`headstart train YOLO_DATA`). Torch-free: the command line is built from them."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.config import RunConfig, check_number, option, task_default
from headstart.tasks.detect.data import find_data_yaml


@dataclass
class DetectConfig(RunConfig):
    """A detector from a YOLO-format data set (a folder with data.yaml, or the yaml itself)."""

    task = "detect"
    headline = ("map50", "map50_95")
    data_kind = "a YOLO detection data set (it has a data.yaml)"
    crossval = True
    RESULT_KEYS = (
        *RunConfig.RESULT_KEYS,
        "input_size",
        "boxes_per_cell",
        "select",
        "lambda_coord",
        "lambda_noobj",
        "eval_every",
        "head",
        "width",
        "mosaic",
        "classes",
    )

    hidden: int = task_default("hidden", 256)
    dropout: float = task_default("dropout", 0.1)
    # 12 views for 10 epochs, not 4 for 30 (the same number of steps): person AP50 0.121 -> 0.218 under 3-fold
    # cross-validation (benchmarks/localize_eval.py --ablate "views 4"); more augmented views memorise less
    views: int = task_default("views", 12)
    epochs: int = task_default("epochs", 10)
    patience: int = task_default("patience", 15)
    batch_size: int = task_default("batch_size", 32)
    weight_decay: float = task_default("weight_decay", 5e-4)
    head: str = option(
        "pyramid",
        "pyramid: multi-scale (strides 8, 16, 32) neck and dense head; grid: one stride-32 grid (the first detector)",
        group="detection",
        choices=("pyramid", "grid"),
    )
    input_size: int = option(512, "square input, letterboxed (512: grids of 64, 32 and 16 cells)", group="detection")
    width: int = option(64, "channels of the pyramid neck and head (--head pyramid)", group="detection")
    mosaic: float = option(
        0.5, "share of training views that are a 2x2 mosaic of four training images (--head pyramid)", group="detection"
    )
    classes: str = option("", "train on these classes only (comma-separated names); default all", group="data")
    boxes_per_cell: int = option(2, "box predictors per grid cell (--head grid)", group="detection")
    select: str = option(
        "best",
        "best: the epoch with the best validation mAP@0.5 (early stopping); last: the final epoch",
        group="detection",
        choices=("best", "last"),
    )
    lambda_coord: float = option(5.0, "weight of the box loss (--head grid)", group="detection")
    lambda_noobj: float = option(
        0.5, "weight of the objectness loss of predictors without an object (--head grid)", group="detection"
    )
    eval_every: int = option(3, "epochs between validation mAP measurements", group="detection")

    def validate(self) -> None:
        super().validate()
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"--input-size must be a multiple of 32, at least 64; got {self.input_size}.")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be at least 1, got {self.eval_every}.")
        check_number("--lambda-coord", self.lambda_coord, low=0.0)
        check_number("--lambda-noobj", self.lambda_noobj, low=0.0)
        if self.select not in ("best", "last"):
            raise ValueError(f"Invalid --select {self.select!r}: best or last.")
        if self.head not in ("pyramid", "grid"):
            raise ValueError(f"Invalid --head {self.head!r}: pyramid or grid.")
        if not 0.0 <= self.mosaic <= 1.0:
            raise ValueError(f"--mosaic must be between 0 and 1, got {self.mosaic}.")
        if self.width < 8:
            raise ValueError(f"--width must be at least 8, got {self.width}.")

    @classmethod
    def claims(cls, data_dir: str) -> bool:
        return find_data_yaml(data_dir) is not None

    def class_names(self) -> list[str]:
        return [n.strip() for n in self.classes.split(",") if n.strip()]
