"""The classifier's options (`headstart train IMAGE_FOLDER`). Torch-free: the command line is built from them."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.config import RunConfig, option


@dataclass
class ClassifyConfig(RunConfig):
    """A classifier from an image folder: one subfolder per class, optionally inside train/, val/ and test/."""

    task = "classify"
    data_kind = "an image folder for classification (one subfolder per class)"
    RESULT_KEYS = (
        *RunConfig.RESULT_KEYS,
        "activation",
        "label_smoothing",
        "class_weights",
        "unfreeze",
        "finetune_epochs",
        "finetune_lr",
        "kept_rate",
        "novelty_k",
        "bank_size",
    )

    activation: str = option("relu", "head activation", group="head", choices=("relu", "leaky_relu"))
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    class_weights: str = option(
        "auto", "class-weighted loss; auto = when classes are unbalanced (ratio > 1.5)", choices=("auto", "on", "off")
    )
    unfreeze: int = option(0, "fine-tune the last N backbone stages afterwards", group="backbone")
    finetune_epochs: int = option(5, "epochs of fine-tuning with --unfreeze", group="backbone")
    finetune_lr: float = option(1e-4, "backbone learning rate when fine-tuning (the head gets 10x)", group="backbone")
    kept_rate: float = option(
        0.95,
        "share of the validation images the novelty threshold keeps as one of the model's classes (the rest, and "
        "images less like the training images, are 'none of these')",
        group="open_set",
    )
    novelty_k: int = option(5, "nearest training images the novelty score averages over", group="open_set")
    bank_size: int = option(
        1024,
        "most training images whose features the model keeps for the novelty score (float16, subsampled per class "
        "beyond; reading them costs latency: 4096 x 1280 features added 0.5 ms per image to MobileNetV2 on OpenVINO "
        "bf16, 1024 0.15 ms); 0: no novelty score",
        group="open_set",
    )
    audit: bool = option(
        True, "no data audit (likely label errors, near-duplicates, outliers)", group="open_set", flag="--no-audit"
    )

    def validate(self) -> None:
        super().validate()
        if self.class_weights not in ("auto", "on", "off"):
            raise ValueError(f"Invalid --class-weights {self.class_weights!r}. Use auto, on or off.")
        if self.unfreeze < 0 or self.finetune_epochs < 0:
            raise ValueError("--unfreeze and --finetune-epochs must be >= 0.")
        if not 0.5 <= self.kept_rate < 1.0:
            raise ValueError(f"--kept-rate must be at least 0.5 and below 1, got {self.kept_rate}.")
        if self.novelty_k < 1 or self.bank_size < 0:
            raise ValueError("--novelty-k must be at least 1 and --bank-size at least 0 (0: no novelty score).")
