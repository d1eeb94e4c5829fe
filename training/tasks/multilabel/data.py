"""Multi-label data sets: a CSV of images and their labels, or a YOLO data set read as image-level labels.

CSV layouts (paths relative to the CSV; a header row names the columns):

- ``image,labels``: the labels of each image separated by spaces (an empty cell: an image with none of them,
  kept: "none of these" is an answer too);
- ``image,<label>,<label>,...``: one column per label holding 1 or 0 (multi-hot);
- either with a ``split`` column (train, val or test) fixing the split; otherwise a seeded random split.

Every file is checked before training (as a classifier's): a missing, unreadable or corrupt image is skipped and
named; a repeated image is kept once (the first row) and named; so is a label cell that is not 0/1.
"""

from __future__ import annotations

import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from headstart.data import (
    DatasetError,
    VerifiedImages,
    check_file,
    count_table,
    listed,
    more_line,
    not_a_folder,
    same_bytes,
    some,
    verified_images,
)
from headstart.labels_csv import SPLITS, Row, find_csv, first_rows, read_csv
from headstart.service.files import shown

if TYPE_CHECKING:
    from headstart.features import DecodedImages


@dataclass(frozen=True)
class Sample:
    path: Path
    labels: tuple[int, ...]  # indices of the labels the image holds (may be empty)
    sha256: str

    @property
    def identity(self) -> str:
        """What the cached features of its views depend on: the image bytes."""
        return self.sha256


@dataclass
class MultiLabelReport:
    root: Path
    source: Path  # the CSV, or the YOLO data.yaml
    labels: list[str]
    splits: dict[str, list[Sample]]
    split_source: str
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    skipped_rows: list[tuple[str, str]] = field(default_factory=list)  # (row, reason): a bad row
    duplicates: list[str] = field(default_factory=list)  # images named twice: kept once
    unknown_labels: list[str] = field(default_factory=list)  # names outside the model's labels (evaluation)
    warnings: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, dict[str, int]]:
        out = {}
        for split, samples in self.splits.items():
            per = Counter(k for s in samples for k in s.labels)
            out[split] = {self.labels[k]: per.get(k, 0) for k in range(len(self.labels))}
            out[split]["(none)"] = sum(1 for s in samples if not s.labels)
        return out

    def targets(self, split: str) -> np.ndarray:
        """The split's labels as a multi-hot matrix (N, K) of 0/1."""
        return multi_hot([s.labels for s in self.splits[split]], len(self.labels))

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "source": str(self.source),
            "labels": self.labels,
            "split_source": self.split_source,
            "images": {split: len(samples) for split, samples in self.splits.items()},
            "counts": self.counts(),
            "corrupt": [{"path": p, "reason": r} for p, r in self.corrupt],
            "skipped_rows": [{"row": p, "reason": r} for p, r in self.skipped_rows],
            "duplicates": self.duplicates,
            "unknown_labels": self.unknown_labels,
            "warnings": self.warnings,
        }

    def format(self) -> str:
        lines = [f"Data set {self.source} ({self.split_source}; multi-label: images per label)"]
        total = ("images", [len(v) for v in self.splits.values()])
        lines += count_table("label", "labels", [*self.labels, "(none)"], self.counts(), total)
        if self.corrupt:
            lines.append(f"  skipped {len(self.corrupt)} missing, corrupt or unreadable images:")
            lines += [f"    {shown(p)}: {r}" for p, r in listed(self.corrupt)] + more_line(self.corrupt)
        if self.skipped_rows:
            lines.append(f"  skipped {len(self.skipped_rows)} rows:")
            lines += [f"    {p}: {r}" for p, r in listed(self.skipped_rows)] + more_line(self.skipped_rows)
        if self.duplicates:
            lines.append(f"  {len(self.duplicates)} images named in more than one row (the first row kept):")
            lines += [f"    {shown(p)}" for p in listed(self.duplicates)] + more_line(self.duplicates)
        if self.unknown_labels:
            lines.append(f"  labels the model does not know, ignored: {', '.join(self.unknown_labels)}")
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


def multi_hot(label_sets, num_labels: int) -> np.ndarray:
    out = np.zeros((len(label_sets), num_labels), np.float32)
    for i, labels in enumerate(label_sets):
        out[i, list(labels)] = 1
    return out


def scan_csv(
    data: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: list[str] | None = None,
    workers: int = 4,
    verified: VerifiedImages | None = None,
    decoded: DecodedImages | None = None,
) -> MultiLabelReport:
    """Read, check and split a labels CSV. ``labels`` fixes the labels (a trained model's: names outside them are
    reported and ignored); images ``verified`` holds are not decoded again; those decoded are kept in ``decoded``
    while it has room."""
    csv_path = find_csv(str(data))
    if csv_path is None:
        raise DatasetError(f"{data} is not a labels CSV, nor a folder holding labels.csv.")
    table = read_csv(csv_path)
    columns, skipped = table.columns, table.skipped
    rows, again = first_rows(table.rows)
    duplicates = [str(row.path) for row in again]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        checked = list(pool.map(lambda r: check_file(r.path, verified, decoded), rows))
    if verified is not None:
        verified.save()
    corrupt = [(str(r.path), reason) for r, (status, reason) in zip(rows, checked, strict=True) if status != "ok"]
    good = [(r, sha) for r, (status, sha) in zip(rows, checked, strict=True) if status == "ok"]
    if not good:
        why = [f"{len(corrupt)} images could not be read, e.g. {corrupt[0][0]}: {corrupt[0][1]}"] if corrupt else []
        why += [f"{len(skipped)} rows skipped, e.g. {skipped[0][0]}: {skipped[0][1]}"] if skipped else []
        why = why or ["it has no rows"]
        raise DatasetError(f"{csv_path} names no readable image ({'; '.join(why)}).")
    known = labels or columns or sorted({n for r, _ in good for n in r.names})
    unknown = sorted({n for r, _ in good for n in r.names} - set(known))
    index = {name: i for i, name in enumerate(known)}
    samples = [(r, Sample(r.path, tuple(sorted(index[n] for n in r.names if n in index)), sha)) for r, sha in good]
    splits, split_source = _split(samples, val_fraction, seed)
    report = MultiLabelReport(
        csv_path.parent, csv_path, list(known), splits, split_source, corrupt, skipped, duplicates, unknown
    )
    report.warnings += table.notes
    if labels is None:
        check_splits(report)
    return report


def _split(samples: list[tuple[Row, Sample]], val_fraction: float, seed: int) -> tuple[dict, str]:
    if any(r.split for r, _ in samples):
        splits = {s: [x for r, x in samples if (r.split or "train") == s] for s in SPLITS}
        return {s: v for s, v in splits.items() if v or s != "test"}, "split column"
    items = sorted((x for _, x in samples), key=lambda x: x.sha256)
    random.Random(seed).shuffle(items)
    n_val = max(1, round(len(items) * val_fraction)) if len(items) > 1 and val_fraction > 0 else 0
    return {"train": items[n_val:], "val": items[:n_val]}, f"random(seed={seed}, val_fraction={val_fraction})"


def keep_every_label_in_training(report: MultiLabelReport) -> None:
    """A random split (headstart's, not the user's) can leave a rare label in validation images only: those images
    move to the training split, and the report says how many."""
    if not report.split_source.startswith("random"):
        return
    seen = {k for s in report.splits["train"] for k in s.labels}
    moved = [s for s in report.splits["val"] if set(s.labels) - seen]
    if moved:
        report.splits["train"] = report.splits["train"] + moved
        report.splits["val"] = [s for s in report.splits["val"] if s not in moved]
        report.warnings.append(
            f"{len(moved)} validation images moved to training: they hold labels no training image held"
        )


def check_splits(report: MultiLabelReport) -> None:
    """A label the validation images hold but no training image does cannot be learned, nor its threshold chosen:
    refused (a split the user gave; headstart's random split keeps every label in training). Labels with few
    training images are warned about."""
    keep_every_label_in_training(report)
    counts = report.counts()
    train, val = counts.get("train", {}), counts.get("val", {})
    if not report.splits.get("train") or not report.splits.get("val"):
        raise DatasetError(f"{report.source} needs training and validation images (give a split column, or more rows).")
    only_val = [label for label in report.labels if val.get(label, 0) and not train.get(label, 0)]
    if only_val:
        raise DatasetError(
            f"{', '.join(only_val)} appear in validation images but in no training image: the model cannot learn "
            "them. Move some of those images to the training split, or drop the label."
        )
    report.warnings += same_pictures(report)
    never = [label for label in report.labels if not train.get(label, 0)]
    if never:
        report.warnings.append(f"labels in no image, ignored by the metrics: {some(never)}")
    rare = [f"{label} ({train[label]})" for label in report.labels if 0 < train.get(label, 0) < 5]
    if rare:
        report.warnings.append(f"labels with fewer than 5 training images (their metrics rest on little): {some(rare)}")


def _names(report: MultiLabelReport, sample: Sample) -> str:
    return " ".join(report.labels[k] for k in sample.labels) or "(none)"


def same_pictures(report: MultiLabelReport) -> list[str]:
    """Warnings for identical images (the same bytes under other names): in training and in validation or test (a
    leak that flatters the metrics), or given different labels (the model is taught both)."""
    leaks, conflicts = [], []
    for group in same_bytes(report.splits):
        splits = {split for split, _ in group}
        if "train" in splits and len(splits) > 1:
            leaks.append(group)
        if len({s.labels for _, s in group}) > 1:
            conflicts.append(group)

    def named(groups: list[list[tuple[str, Sample]]]) -> str:
        text = "; ".join(
            " == ".join(f"{shown(s.path)} ({split}: {_names(report, s)})" for split, s in g) for g in groups[:5]
        )
        return text + (f"; and {len(groups) - 5} more" if len(groups) > 5 else "")

    warnings = []
    if leaks:
        warnings.append(
            f"images in training and in validation or test (identical bytes; {len(leaks)}): a leak that flatters the "
            f"metrics. Remove them from one side: {named(leaks)}"
        )
    if conflicts:
        warnings.append(
            f"identical images given different labels ({len(conflicts)}): the model is taught both. Label the "
            f"picture once: {named(conflicts)}"
        )
    return warnings


def from_detection(report, labels: list[str] | None = None) -> MultiLabelReport:
    """A YOLO data set's scan (the detect task's, asked through the registry) as image-level labels: each image
    holds the classes of its boxes; an image without boxes holds none. ``labels`` (a trained model's) maps the
    classes by name; names outside them are reported and ignored."""
    names = list(report.labels)
    known = labels or names
    index = {name: i for i, name in enumerate(known)}
    splits = {
        split: [
            Sample(s.path, tuple(sorted({index[names[int(c)]] for c in s.classes if names[int(c)] in index})), s.sha256)
            for s in samples
        ]
        for split, samples in report.splits.items()
    }
    out = MultiLabelReport(
        Path(report.root),
        Path(report.yaml_path),
        list(known),
        splits,
        report.split_source,
        corrupt=list(report.corrupt),
        skipped_rows=[(m, "malformed label line") for m in report.malformed],
        unknown_labels=sorted(set(names) - set(known)),
    )
    if labels is None:
        check_splits(out)
    return out


def _scan_detection(data_dir: str, val_fraction: float, seed: int, run=None, decoded=None):
    """A YOLO data set scanned by the detect task (through the registry), with ``run``'s feature cache."""
    from headstart.tasks import CONFIGS, task_named

    cache = {"cache_dir": run.cache_dir, "no_cache": run.no_cache} if run is not None else {"no_cache": True}
    detect = CONFIGS["detect"](data_dir=data_dir, out="", val_fraction=val_fraction, seed=seed, **cache)
    return task_named("detect").scan(detect, decoded=decoded)


def scan_data(data_dir: str, val_fraction: float, seed: int, labels: list[str] | None = None, run=None, decoded=None):
    """A labels CSV, or a YOLO data set read as image-level labels; for a training ``run`` (a RunConfig), the images
    its feature cache knows were read are not decoded again (:class:`headstart.data.VerifiedImages`), and those
    decoded are kept in ``decoded`` while it has room."""
    if find_csv(data_dir) is not None:
        verified = verified_images(run) if run is not None else None
        return scan_csv(
            data_dir, val_fraction=val_fraction, seed=seed, labels=labels, verified=verified, decoded=decoded
        )
    from headstart.tasks import CONFIGS

    if CONFIGS["detect"].claims(data_dir):
        return from_detection(_scan_detection(data_dir, val_fraction, seed, run, decoded), labels)
    if not Path(data_dir).is_dir():  # missing, or an archive to unpack
        raise DatasetError(not_a_folder(data_dir, "Data set"))
    raise ValueError(
        f"{data_dir} is not a multi-label data set: give a labels CSV (image,labels), a folder holding labels.csv, "
        "or a YOLO data set (a folder with data.yaml)."
    )
