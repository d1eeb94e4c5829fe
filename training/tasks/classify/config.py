"""The classifier's options (`headstart train IMAGE_FOLDER` or `LABELS.csv`). Torch-free: the command line is built
from them."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.config import OpenSetOptions, RunConfig, check_number, option
from headstart.labels_csv import find_csv, header_of, single_label


@dataclass
class ClassifyConfig(RunConfig, OpenSetOptions):
    """A classifier from an image folder (one subfolder per class, optionally inside train/, val/ and test/) or from
    a labels CSV with one class per image (``image,label``)."""

    task = "classify"
    headline = ("accuracy", "macro_f1", "calibration_error")
    data_kind = "an image folder for classification (one subfolder per class) or an image,label CSV"
    RESULT_KEYS = (
        *RunConfig.RESULT_KEYS,
        "activation",
        "label_smoothing",
        "class_weights",
        "unfreeze",
        "finetune_epochs",
        "finetune_lr",
        *OpenSetOptions.OPEN_SET_KEYS,
    )

    activation: str = option("relu", "head activation", group="head", choices=("relu", "leaky_relu"))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    class_weights: str = option(
        "auto", "class-weighted loss; auto = when classes are unbalanced (ratio > 1.5)", choices=("auto", "on", "off")
    )
    unfreeze: int = option(0, "fine-tune the last N backbone stages afterwards", group="backbone")
    finetune_epochs: int = option(5, "epochs of fine-tuning with --unfreeze", group="backbone")
    finetune_lr: float = option(1e-4, "backbone learning rate when fine-tuning (the head gets 10x)", group="backbone")
    audit: bool = option(
        True, "no data audit (likely label errors, near-duplicates, outliers)", group="open_set", flag="--no-audit"
    )

    @classmethod
    def claims(cls, data_dir: str) -> bool:
        csv_path = find_csv(data_dir)  # image,label: one class per image (a folder is the default task's anyway)
        return csv_path is not None and single_label(header_of(csv_path))

    def validate(self) -> None:
        super().validate()
        if self.class_weights not in ("auto", "on", "off"):
            raise ValueError(f"Invalid --class-weights {self.class_weights!r}. Use auto, on or off.")
        if self.unfreeze < 0 or self.finetune_epochs < 0:
            raise ValueError("--unfreeze and --finetune-epochs must be >= 0.")
        check_number("--label-smoothing", self.label_smoothing, low=0.0, high=1.0)
        check_number("--finetune-lr", self.finetune_lr, low=0.0, low_ok=False)
        self.validate_open_set()
