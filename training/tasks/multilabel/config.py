"""The multi-label classifier's options (`headstart train CSV` or `--task multilabel`). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from headstart.config import OpenSetOptions, RunConfig, option, task_default
from headstart.labels_csv import find_csv, header_of, single_label


@dataclass
class MultiLabelConfig(RunConfig, OpenSetOptions):
    """Multi-label classification: a CSV of images and their labels (``image,labels`` with the labels separated by
    spaces, or one 0/1 column per label; an optional ``split`` column), or a YOLO data set read as the classes
    present in each image (``--task multilabel``)."""

    task = "multilabel"
    headline = ("map_macro", "micro_f1", "sample_f1")
    crossval = True
    data_kind = "a multi-label data set (a CSV of images and labels, or a YOLO data set with --task multilabel)"
    RESULT_KEYS = (
        *RunConfig.RESULT_KEYS,
        "classifier",
        "prior_weight",
        "loss",
        "min_label_positives",
        "pooling",
        *OpenSetOptions.OPEN_SET_KEYS,
    )

    #: light: the random crops of heavy cut small objects out of the view while its labels still name them
    #: (coco128, 3 folds: macro mAP 0.423 light, 0.400 heavy; benchmarks/multilabel.py)
    augment: str = task_default("augment", "light")
    views: int = task_default("views", 8)
    epochs: int = task_default("epochs", 100)
    patience: int = task_default("patience", 15)
    classifier: str = option(
        "prototype",
        "what scores each label: prototype = the cosine of the image's vector with the mean direction of the "
        "label's training views, scaled, plus a bias per label (no epochs: the scale and the biases are a logistic "
        "regression on the training views, each view's image left out of its own labels' means); linear = a linear "
        "layer trained on the views with --loss for --epochs",
        group="multilabel",
        choices=("prototype", "linear"),
    )
    prior_weight: float = option(
        0.5,
        "weight of the backbone's own ImageNet classifier beside the features in the prototype head (the square "
        "roots of its probabilities; used where the backbone has one: torchvision and timm models whose classifier "
        "is one linear layer on the pooled features); 0: the features alone",
        group="multilabel",
    )
    loss: str = option(
        "weighted",
        "loss of --classifier linear: weighted = binary cross-entropy with each label's positives weighted by its "
        "negatives/positives (at most 20); bce = unweighted; asl = asymmetric loss (gamma- 4, gamma+ 0, clip 0.05)",
        group="multilabel",
        choices=("weighted", "bce", "asl"),
    )
    pooling: str = option(
        "mean",
        "what the head reads of the backbone's last map: mean = each channel's mean over the cells; meanmax = its "
        "mean and its maximum; lse = the head scores every cell, the image's score is their log-sum-exp (small "
        "objects; the maps are cached, float16)",
        group="multilabel",
        choices=("mean", "meanmax", "lse"),
    )
    min_label_positives: int = option(
        20,
        "a label gets a threshold of its own only with at least this many validation positives; the others share "
        "the global threshold (per-label thresholds overfit small validation sets)",
        group="multilabel",
    )

    def validate(self) -> None:
        super().validate()
        if self.loss not in ("weighted", "bce", "asl"):
            raise ValueError(f"Invalid --loss {self.loss!r}. Use weighted, bce or asl.")
        if self.min_label_positives < 1:
            raise ValueError("--min-label-positives must be at least 1.")
        if not 0.0 <= self.prior_weight <= 10.0:
            raise ValueError(f"--prior-weight must be between 0 and 10, got {self.prior_weight}.")
        if self.classifier not in ("prototype", "linear"):
            raise ValueError(f"Invalid --classifier {self.classifier!r}. Use prototype or linear.")
        if self.classifier == "prototype" and (self.hidden or self.pooling == "lse"):
            raise ValueError(
                "--classifier prototype scores the image's pooled vector directly: it has no hidden layer and no "
                "per-cell pooling. Use --classifier linear with --hidden or --pooling lse."
            )
        self.validate_open_set()

    @classmethod
    def claims(cls, data_dir: str) -> bool:
        csv_path = find_csv(data_dir)  # image,labels or 0/1 columns; image,label is a classifier's
        return csv_path is not None and not single_label(header_of(csv_path))
