"""Training options: one dataclass per task, one place for each default and its help text. Torch-free.

:class:`RunConfig` holds what every task shares; a task's config subclasses it, adds its own options and sets its
own defaults. The `headstart train` command line is generated from these fields (``training/cli.py``), so an option,
its default and its help are written once, here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda")
AUGMENT_PRESETS = ("none", "light", "heavy")


def option(default: Any, help: str, *, group: str = "optimisation", choices: tuple | None = None,
           flag: str | None = None, type: type | None = None, cli: bool = True) -> Any:  # fmt: skip
    """A config field with what the command line needs: its help, group, choices and (for booleans) flag."""
    meta = {"help": help, "group": group, "choices": choices, "flag": flag, "type": type, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class RunConfig:
    """Options every task shares. Subclasses set ``task`` and may override defaults (see :func:`option`)."""

    task = "base"
    #: options a ``--resume`` must not change: they determine the result
    RESULT_KEYS = ("backbone", "pretrained", "weights", "val_fraction", "augment", "views", "hidden", "dropout",
                   "epochs", "patience", "batch_size", "lr", "weight_decay", "precision", "seed")  # fmt: skip

    data_dir: str = option("", "the data set", cli=False)
    out: str = option("", "run directory to write", cli=False)
    backbone: str = option("resnet50", "timm model name or torchvision:NAME", group="backbone")
    pretrained: bool = option(True, "random backbone weights", group="backbone", flag="--no-pretrained")
    weights: str | None = option(None, "local state dict (.pth/.safetensors) instead of downloading pretrained "
                                 "weights", group="backbone", type=str)  # fmt: skip
    val_fraction: float = option(0.2, "validation share when the data set has no validation split", group="data")
    augment: str = option("heavy", "augmentation preset", group="data", choices=AUGMENT_PRESETS)
    views: int = option(8, "augmented views per training image (features cached)", group="data")
    hidden: int = option(0, "hidden width of the head", group="head")
    dropout: float = option(0.2, "dropout in the head", group="head")
    epochs: int = option(100, "most epochs of head training")
    patience: int = option(10, "early stopping: epochs without a better validation score")
    batch_size: int = option(128, "head-training batch size")
    lr: float = option(1e-3, "head learning rate (AdamW, cosine decay)")
    weight_decay: float = option(1e-4, "AdamW weight decay")
    precision: str = option("auto", "for augmented training views; auto = bf16 where the CPU (or GPU) has bf16 "
                            "units; validation is always fp32", group="data", choices=PRECISIONS)  # fmt: skip
    seed: int = option(0, "seed of the split, the augmentations and the head")
    cache_dir: str | None = option(None, "feature cache (default $HEADSTART_CACHE or ~/.cache/headstart)",
                                   group="data", type=str)  # fmt: skip
    no_cache: bool = option(False, "do not read or write the feature cache", group="data", flag="--no-cache")
    max_feature_gb: float = option(8.0, "most memory the cached features of a run may take (the same again on disk "
                                   "in the cache); a run that needs more stops before extracting", group="data")  # fmt: skip
    resume: bool = option(False, "continue an interrupted run in --out", group="run", flag="--resume")
    overwrite: bool = option(False, "replace an existing run in --out", group="run", flag="--overwrite")
    progress: bool = option(True, "no progress bars", group="run", flag="--no-progress")
    #: small batches keep activations in cache: ~2x faster than 64 on this CPU
    extract_batch_size: int = option(8, "feature-extraction batch", cli=False)
    device: str = option("auto", "where features are extracted and the head trained; auto = cuda when a GPU is "
                         "visible", group="run", choices=DEVICES)  # fmt: skip

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and the valid values."""
        for name in ("augment", "precision", "device"):
            f = self.__dataclass_fields__[name]
            if getattr(self, name) not in f.metadata["choices"]:
                raise ValueError(f"Invalid --{name} {getattr(self, name)!r}. Use one of {', '.join(f.metadata['choices'])}.")
        if min(self.views, self.epochs, self.patience, self.batch_size, self.extract_batch_size) < 1:
            raise ValueError("--views, --epochs, --patience and --batch-size must be at least 1.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.hidden < 0:
            raise ValueError(f"--hidden must be >= 0, got {self.hidden}.")
        if not self.max_feature_gb > 0:
            raise ValueError(f"--max-feature-gb must be positive, got {self.max_feature_gb}.")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one.")

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def result_options(self) -> dict:
        return {k: getattr(self, k) for k in self.RESULT_KEYS}


# ---------------------------------------------------------------- the tasks' own options


def task_default(name: str, value: Any) -> Any:
    """The shared option ``name`` (its help, group and choices from :class:`RunConfig`) with a task's own default."""
    return dataclasses.field(default=value, metadata=RunConfig.__dataclass_fields__[name].metadata)


@dataclass
class ClassifyConfig(RunConfig):
    task = "classify"
    RESULT_KEYS = (*RunConfig.RESULT_KEYS, "activation", "label_smoothing", "class_weights", "unfreeze",
                   "finetune_epochs", "finetune_lr")  # fmt: skip

    activation: str = option("relu", "head activation", group="head", choices=("relu", "leaky_relu"))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    class_weights: str = option("auto", "class-weighted loss; auto = when classes are unbalanced (ratio > 1.5)",
                                choices=("auto", "on", "off"))  # fmt: skip
    unfreeze: int = option(0, "fine-tune the last N backbone stages afterwards", group="backbone")
    finetune_epochs: int = option(5, "epochs of fine-tuning with --unfreeze", group="backbone")
    finetune_lr: float = option(1e-4, "backbone learning rate when fine-tuning (the head gets 10x)", group="backbone")

    def validate(self) -> None:
        super().validate()
        if self.class_weights not in ("auto", "on", "off"):
            raise ValueError(f"Invalid --class-weights {self.class_weights!r}. Use auto, on or off.")
        if self.unfreeze < 0 or self.finetune_epochs < 0:
            raise ValueError("--unfreeze and --finetune-epochs must be >= 0.")


@dataclass
class DetectConfig(RunConfig):
    task = "detect"
    RESULT_KEYS = (*RunConfig.RESULT_KEYS, "input_size", "boxes_per_cell", "select", "lambda_coord",
                   "lambda_noobj", "eval_every", "head", "width", "mosaic", "classes")  # fmt: skip

    hidden: int = task_default("hidden", 256)
    dropout: float = task_default("dropout", 0.1)
    # 12 views for 10 epochs, not 4 for 30 (the same number of steps): person AP50 0.121 -> 0.218 under 3-fold
    # cross-validation (benchmarks/localize_eval.py --ablate "views 4"); more augmented views memorise less
    views: int = task_default("views", 12)
    epochs: int = task_default("epochs", 10)
    patience: int = task_default("patience", 15)
    batch_size: int = task_default("batch_size", 32)
    weight_decay: float = task_default("weight_decay", 5e-4)
    head: str = option("pyramid", "pyramid: multi-scale (strides 8, 16, 32) neck and dense head; grid: one "
                       "stride-32 grid (the first detector)", group="detection", choices=("pyramid", "grid"))  # fmt: skip
    input_size: int = option(512, "square input, letterboxed (512: grids of 64, 32 and 16 cells)",
                             group="detection")  # fmt: skip
    width: int = option(64, "channels of the pyramid neck and head (--head pyramid)", group="detection")
    mosaic: float = option(0.5, "share of training views that are a 2x2 mosaic of four training images "
                           "(--head pyramid)", group="detection")  # fmt: skip
    classes: str = option("", "train on these classes only (comma-separated names); default all", group="data")
    boxes_per_cell: int = option(2, "box predictors per grid cell (--head grid)", group="detection")
    select: str = option("best", "best: the epoch with the best validation mAP@0.5 (early stopping); last: the "
                         "final epoch", group="detection", choices=("best", "last"))  # fmt: skip
    lambda_coord: float = option(5.0, "weight of the box loss (--head grid)", group="detection")
    lambda_noobj: float = option(0.5, "weight of the objectness loss of predictors without an object (--head grid)",
                                 group="detection")  # fmt: skip
    eval_every: int = option(3, "epochs between validation mAP measurements", group="detection")

    def validate(self) -> None:
        super().validate()
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"--input-size must be a multiple of 32, at least 64; got {self.input_size}.")
        if self.eval_every < 1:
            raise ValueError(f"--eval-every must be at least 1, got {self.eval_every}.")
        if self.select not in ("best", "last"):
            raise ValueError(f"Invalid --select {self.select!r}: best or last.")
        if self.head not in ("pyramid", "grid"):
            raise ValueError(f"Invalid --head {self.head!r}: pyramid or grid.")
        if not 0.0 <= self.mosaic <= 1.0:
            raise ValueError(f"--mosaic must be between 0 and 1, got {self.mosaic}.")
        if self.width < 8:
            raise ValueError(f"--width must be at least 8, got {self.width}.")

    def class_names(self) -> list[str]:
        return [n.strip() for n in self.classes.split(",") if n.strip()]


#: every task's config by task name (the task itself, with torch, is in training/tasks/)
CONFIGS: dict[str, type[RunConfig]] = {"classify": ClassifyConfig, "detect": DetectConfig}


def cli_fields(config_type: type[RunConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_type) if f.metadata.get("cli", False)}
