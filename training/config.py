"""Training options: what every task shares, and how a task declares its own. Torch-free.

:class:`RunConfig` holds the options every task shares; a task's config (``training/tasks/NAME/config.py``)
subclasses it, adds its own options with :func:`option` and sets its own defaults with :func:`task_default`. The
`headstart train` command line is generated from these fields (``training/cli.py``), so an option, its default and its
help are written once.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, ClassVar

from headstart.service.runtime import DEVICES

PRECISIONS = ("auto", "fp32", "bf16")
#: what computes the frozen features: auto = OpenVINO on CPUs where it is installed, torch on GPUs
EXTRACTORS = ("auto", "openvino", "torch")
#: the augmentation presets every task offers (each task builds its own pipeline for them)
AUGMENT_PRESETS = ("none", "light", "heavy")


def option(
    default: Any,
    help: str,
    *,
    group: str = "optimisation",
    choices: tuple | None = None,
    flag: str | None = None,
    type: type | None = None,
    cli: bool = True,
) -> Any:
    """A config field with what the command line needs: its help, group, choices and (for booleans) flag."""
    meta = {"help": help, "group": group, "choices": choices, "flag": flag, "type": type, "cli": cli}
    return dataclasses.field(default=default, metadata=meta)


@dataclass
class OpenSetOptions:
    """The options of a task with a novelty score, "none of these" (a mixin of its config: ``training/open_set.py``)."""

    OPEN_SET_KEYS = ("kept_rate", "novelty_k", "bank_size")

    kept_rate: float = option(
        0.95,
        "share of the validation images the novelty threshold keeps as the model's classes (the rest, and images "
        "less like the training images, are 'none of these')",
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

    def validate_open_set(self) -> None:
        if not 0.5 <= self.kept_rate < 1.0:
            raise ValueError(f"--kept-rate must be at least 0.5 and below 1, got {self.kept_rate}.")
        if self.novelty_k < 1 or self.bank_size < 0:
            raise ValueError("--novelty-k must be at least 1 and --bank-size at least 0 (0: no novelty score).")


@dataclass
class RunConfig:
    """Options every task shares. A task's config sets ``task`` (its name in the registry, ``training/tasks/``) and
    ``data_kind``, may claim data sets (:meth:`claims`) and override defaults (see :func:`option`)."""

    task = "base"
    #: what the task trains on, for messages ("it is ...")
    data_kind = "a data set"
    #: whether `headstart crossval` cross-validates this task (its task class then has ``cross_validate``)
    crossval = False
    #: the metrics that sum a run up: the end-of-run log line, `headstart compare` (torch-free: read here)
    headline: ClassVar[tuple[str, ...]] = ()
    #: options a ``--resume`` must not change: they determine the result
    RESULT_KEYS = (
        "backbone",
        "pretrained",
        "weights",
        "val_fraction",
        "augment",
        "views",
        "hidden",
        "dropout",
        "epochs",
        "patience",
        "batch_size",
        "lr",
        "weight_decay",
        "precision",
        "extractor",
        "seed",
    )

    data_dir: str = option("", "the data set", cli=False)
    out: str = option("", "run directory to write", cli=False)
    backbone: str = option("resnet50", "timm model name or torchvision:NAME", group="backbone")
    pretrained: bool = option(True, "random backbone weights", group="backbone", flag="--no-pretrained")
    weights: str | None = option(
        None,
        "local state dict (.pth/.safetensors) instead of downloading pretrained weights",
        group="backbone",
        type=str,
    )
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
    precision: str = option(
        "auto",
        "for augmented training views; auto = bf16 where the CPU (or GPU) has bf16 units; validation is always fp32",
        group="data",
        choices=PRECISIONS,
    )
    extractor: str = option(
        "auto",
        "what runs the frozen backbone over the images; auto = OpenVINO on CPUs where installed (1.7x torch's "
        "speed in bf16, 1.5x in fp32: benchmarks/feature_extraction.py), else torch",
        group="data",
        choices=EXTRACTORS,
    )
    seed: int = option(0, "seed of the split, the augmentations and the head")
    cache_dir: str | None = option(
        None, "feature cache (default $HEADSTART_CACHE or ~/.cache/headstart)", group="data", type=str
    )
    no_cache: bool = option(False, "do not read or write the feature cache", group="data", flag="--no-cache")
    max_feature_gb: float = option(
        8.0,
        "most memory the cached features of a run may take (the same again on disk "
        "in the cache); a run that needs more stops before extracting",
        group="data",
    )
    resume: bool = option(False, "continue an interrupted run in --out", group="run", flag="--resume")
    overwrite: bool = option(False, "replace an existing run in --out", group="run", flag="--overwrite")
    progress: bool = option(True, "no progress bars", group="run", flag="--no-progress")
    log: str = option(
        "",
        "experiment tracking: tensorboard, mlflow or both, comma-separated (default $HEADSTART_LOG, else off)",
        group="run",
        type=str,
    )
    #: small batches keep activations in cache: ~2x faster than 64 on this CPU
    extract_batch_size: int = option(8, "feature-extraction batch", cli=False)
    device: str = option(
        "auto",
        "where features are extracted and the head trained; auto = cuda when a GPU is visible",
        group="run",
        choices=DEVICES,
    )

    def validate(self) -> None:
        """Raise ValueError naming the first invalid option and the valid values."""
        for name in ("augment", "precision", "extractor", "device"):
            f = self.__dataclass_fields__[name]
            if getattr(self, name) not in f.metadata["choices"]:
                raise ValueError(
                    f"Invalid --{name} {getattr(self, name)!r}. Use one of {', '.join(f.metadata['choices'])}."
                )
        if self.extractor == "openvino" and self.device == "cuda":
            raise ValueError("--extractor openvino runs on the CPU; with --device cuda use --extractor torch or auto.")
        from headstart.tracking import parse

        parse(self.log)  # an unknown or uninstalled tracker is refused before any work
        if min(self.views, self.epochs, self.patience, self.batch_size, self.extract_batch_size) < 1:
            raise ValueError("--views, --epochs, --patience and --batch-size must be at least 1.")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"--val-fraction must be between 0 and 1, got {self.val_fraction}.")
        if self.hidden < 0:
            raise ValueError(f"--hidden must be >= 0, got {self.hidden}.")
        if self.seed < 0:  # numpy refused it in the data split: "expected non-negative integer", no option named
            raise ValueError(f"--seed must be 0 or more, got {self.seed}.")
        # torch refused these only when the head was built or its optimizer made, after the data check and the
        # backbone, leaving a run directory that the corrected command then found in its way
        check_number("--lr", self.lr, low=0.0, low_ok=False)
        check_number("--weight-decay", self.weight_decay, low=0.0)
        check_number("--dropout", self.dropout, low=0.0, high=1.0)
        if not self.max_feature_gb > 0:
            raise ValueError(f"--max-feature-gb must be positive, got {self.max_feature_gb}.")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one.")

    @classmethod
    def claims(cls, data_dir: str) -> bool:
        """Whether ``data_dir`` is unmistakably this task's data (a detector's data.yaml, ...). A data set no task
        claims goes to the registry's default task."""
        return False

    def options(self) -> dict:
        return dataclasses.asdict(self)

    def result_options(self) -> dict:
        return {k: getattr(self, k) for k in self.RESULT_KEYS}


def check_number(flag: str, value: float, *, low: float, low_ok: bool = True, high: float | None = None) -> None:
    """ValueError unless ``value`` is a finite number of at least ``low`` (above it without ``low_ok``) and below
    ``high``: the message names the option and its range."""
    bounds = f"{'at least' if low_ok else 'above'} {low:g}" + (f" and below {high:g}" if high is not None else "")
    ok = math.isfinite(value) and (value >= low if low_ok else value > low) and (high is None or value < high)
    if not ok:
        raise ValueError(f"{flag} must be a finite number {bounds}, got {value}.")


def task_default(name: str, value: Any) -> Any:
    """The shared option ``name`` (its help, group and choices from :class:`RunConfig`) with a task's own default."""
    return dataclasses.field(default=value, metadata=RunConfig.__dataclass_fields__[name].metadata)


def cli_fields(config_type: type[RunConfig]) -> dict[str, dataclasses.Field]:
    return {f.name: f for f in dataclasses.fields(config_type) if f.metadata.get("cli", False)}


# ---------------------------------------------------------------- the command line made from the configs

#: titles of the option groups of `headstart train --help` (a group not named here is titled by its name)
GROUPS = {
    "backbone": "backbone",
    "data": "data and augmentation",
    "head": "head",
    "detection": "detection (YOLO-format data sets only)",
    "optimisation": "optimisation",
    "open_set": "open set: 'none of these' (classification, multi-label)",
    "multilabel": "multi-label (a labels CSV, or --task multilabel)",
    "run": "run",
}


def command_line_options(configs) -> dict[str, dict]:
    """Every option of the given task configs: its field, and each task's default (the tasks that have it)."""
    options: dict[str, dict] = {}
    for config in configs:
        for key, f in cli_fields(config).items():
            entry = options.setdefault(key, {"field": f, "defaults": {}})
            entry["defaults"][config.task] = f.default
    return options


def add_options(parser: argparse.ArgumentParser, options: dict[str, dict]) -> None:
    """``options`` (:func:`command_line_options`) as ``parser``'s arguments, in groups, each help naming its default
    per task and the task it is for; an option left out keeps its config's default."""
    used = {entry["field"].metadata["group"] for entry in options.values()}
    names = [g for g in GROUPS if g in used] + sorted(used - set(GROUPS))
    groups = {name: parser.add_argument_group(GROUPS.get(name, name)) for name in names}
    for key, entry in options.items():
        f, defaults = entry["field"], entry["defaults"]
        meta = f.metadata
        if len(set(map(repr, defaults.values()))) > 1:
            default = "default " + ", ".join(f"{task}: {v}" for task, v in defaults.items())
        else:
            default = "" if f.default is None else f"default {f.default}"
        only = "" if len(defaults) > 1 else f"{next(iter(defaults))} only"
        note = "; ".join(x for x in (default, only) if x)
        kwargs: dict = {"dest": key, "default": argparse.SUPPRESS}
        if meta["flag"]:  # a boolean switch: giving the flag flips the default
            kwargs.update(action="store_const", const=not f.default, help=meta["help"] + (f" ({only})" if only else ""))
            groups[meta["group"]].add_argument(meta["flag"], **kwargs)
            continue
        kind = meta["type"] or type(f.default)
        kwargs.update(type=kind, help=f"{meta['help']} ({note})" if note else meta["help"])
        if meta["choices"]:
            kwargs["choices"] = list(meta["choices"])
        groups[meta["group"]].add_argument("--" + key.replace("_", "-"), **kwargs)


def add_config_options(parser: argparse.ArgumentParser, config: type[RunConfig]) -> None:
    """The command-line options of one task's config (benchmarks/detect_curve.py)."""
    add_options(parser, command_line_options([config]))
