"""Image-folder data sets: discovery, splitting and the pre-training data report.

Layout: one subfolder per class. If the folder has ``train/`` and ``val/`` (optionally ``test/``) subfolders they are
the splits (``valid/`` or ``validation/`` for ``val/``: Roboflow exports ``valid/``); otherwise a stratified split
is made with a fixed seed. Every file is checked before training: files that are not images are ignored, corrupt or
truncated images are skipped and listed, never a crash.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from headstart import crossval, runs
from headstart.data import (
    DatasetError,
    VerifiedImages,
    check_file,
    conversions_needed,
    count_table,
    foreign_layout,
    listed,
    more_line,
    not_a_folder,
    same_bytes,
    some,
)
from headstart.labels_csv import find_csv, first_rows, header_of, read_csv, single_label
from headstart.service.bundle import MANIFEST
from headstart.service.files import shown, utf8_name

if TYPE_CHECKING:
    from headstart.features import DecodedImages

SPLITS = ("train", "val", "test")
#: the folder names the validation split goes by (Roboflow's exports: valid/)
VAL_FOLDERS = ("val", "valid", "validation")


@dataclass(frozen=True)
class Sample:
    path: Path
    label: int
    sha256: str

    @property
    def identity(self) -> str:
        """What the cached features of its views depend on: the image bytes."""
        return self.sha256


@dataclass
class DatasetReport:
    root: Path
    labels: list[str]
    splits: dict[str, list[Sample]]
    split_source: str  # "folders" or "random(seed=..., val_fraction=...)"
    ignored: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not images
    corrupt: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): skipped
    duplicates: list[tuple[str, str]] = field(default_factory=list)  # (train path, val/test path)
    warnings: list[str] = field(default_factory=list)
    conflicts: list[list[tuple[str, str]]] = field(default_factory=list)  # identical images: (path, class) each

    def counts(self) -> dict[str, dict[str, int]]:
        return {
            split: {self.labels[k]: v for k, v in sorted(Counter(s.label for s in samples).items())}
            for split, samples in self.splits.items()
        }

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "labels": self.labels,
            "split_source": self.split_source,
            "counts": self.counts(),
            "ignored": [{"path": p, "reason": r} for p, r in self.ignored],
            "corrupt": [{"path": p, "reason": r} for p, r in self.corrupt],
            "duplicates": [{"train": a, "other": b} for a, b in self.duplicates],
            "conflicts": [[{"path": p, "label": c} for p, c in group] for group in self.conflicts],
            "warnings": self.warnings,
        }

    def format(self) -> str:
        lines = [f"Data set {self.root} ({self.split_source})"]
        counts = self.counts()
        lines += count_table("class", "classes", self.labels, counts, ("total", [len(v) for v in self.splits.values()]))
        if self.ignored:
            lines.append(f"  ignored {len(self.ignored)} files that are not images:")
            lines += [f"    {shown(p)} ({r})" for p, r in listed(self.ignored)] + more_line(self.ignored)
        if self.corrupt:
            lines.append(f"  skipped {len(self.corrupt)} corrupt or unreadable files:")
            lines += [f"    {shown(p)}: {r}" for p, r in listed(self.corrupt)] + more_line(self.corrupt)
        lines += [f"  WARNING: {w}" for w in self.warnings]
        return "\n".join(lines)


#: The files that make a folder headstart's own output, never a class: a run, an evaluation or a bundle written inside
#: the data folder (`headstart train DATA --out DATA/run`) was read as a class of its plots by the next training, and
#: made `headstart evaluate RUN DATA` fail on "class folders ['run'] that the model does not know"
OUTPUT_MARKERS = {
    runs.CONFIG: "a run directory",  # the run's record
    MANIFEST: "a bundle",
    crossval.SUMMARY: "a cross-validation",
    runs.METRICS: "an evaluation",  # `headstart evaluate --out` (a run holds one too: its CONFIG comes first)
}


def _output_kind(folder: Path, inside: bool = True) -> str | None:
    """What of headstart's ``folder`` is: one of :data:`OUTPUT_MARKERS`' kinds or, with ``inside``, "a folder of
    runs" (``--out DATA/runs/NAME``; a cross-validation not finished: its fold runs), else None."""
    own = next((kind for name, kind in OUTPUT_MARKERS.items() if (folder / name).is_file()), None)
    if own is not None or not inside:
        return own
    with os.scandir(folder) as entries:  # a class folder of many images: no stat of each (DirEntry's file type)
        subfolders = [Path(e.path) for e in entries if not e.name.startswith(".") and _is_dir(e)]
    return "a folder of runs" if any(_output_kind(d, inside=False) for d in subfolders) else None


def _is_dir(entry: os.DirEntry) -> bool:
    """Whether ``entry`` is a folder, links followed; a link loop or an unreadable link is not (the data check
    reports it as a file)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _list_class_dirs(folder: Path, warnings: list[str] | None = None) -> list[Path]:
    """The class folders in ``folder``: its subfolders but hidden ones and headstart's own outputs (named in
    ``warnings``)."""
    dirs = []
    for d in sorted((d for d in folder.iterdir() if d.is_dir() and not d.name.startswith(".")), key=lambda d: d.name):
        kind = _output_kind(d)
        if kind is not None:
            if warnings is not None:
                warnings.append(
                    f"{shown(d)} is {kind} of headstart's, not a class: left out (keep runs and evaluations outside "
                    "the data folder, e.g. --out runs/NAME)."
                )
            continue
        if not utf8_name(d.name):
            raise DatasetError(
                f"The class folder {shown(d)!r} has a name that is not UTF-8. A class name becomes a label in the "
                "model and its answers (JSON): rename the folder."
            )
        dirs.append(d)
    return dirs


def _list_files(class_dir: Path) -> list[Path]:
    """Everything in a class folder but folders and hidden files: FIFOs, devices and broken links are listed too, to
    be reported (check_file), not silently passed over."""
    return sorted(p for p in class_dir.rglob("*") if not p.name.startswith(".") and not p.is_dir())


def _check_tree(
    files: dict[str, dict[str, list[Path]]],
    workers: int,
    verified: VerifiedImages | None = None,
    decoded: DecodedImages | None = None,
) -> tuple[dict[str, dict[str, list[tuple[Path, str]]]], list[tuple[str, str]], list[tuple[str, str]]]:
    """Decode every file in parallel (but those ``verified`` holds; into ``decoded`` while it has room); return the
    good (path, sha256) per split and class, the ignored, the corrupt."""
    all_paths = [p for per_class in files.values() for paths in per_class.values() for p in paths]
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = dict(
            zip(all_paths, pool.map(partial(check_file, verified=verified, decoded=decoded), all_paths), strict=True)
        )
    if verified is not None:
        verified.save()
    ignored = [(shown(p), r) for p, (status, r) in results.items() if status == "ignored"]
    corrupt = [(shown(p), r) for p, (status, r) in results.items() if status == "corrupt"]
    good = {
        split: {c: [(p, results[p][1]) for p in paths if results[p][0] == "ok"] for c, paths in per_class.items()}
        for split, per_class in files.items()
    }
    return good, ignored, corrupt


def scan_image_folder(
    root: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    labels: list[str] | None = None,
    workers: int = 4,
    verified: VerifiedImages | None = None,
    decoded: DecodedImages | None = None,
) -> DatasetReport:
    """Discover, check and split an image-folder data set. ``labels`` fixes the label order (e.g. a trained run's);
    images ``verified`` holds are not decoded again (:class:`headstart.data.VerifiedImages`); those decoded are
    kept in ``decoded`` while it has room (:func:`headstart.data.check_file`)."""
    root = Path(root)
    csv_path = _classifier_csv(root)
    if csv_path is not None:
        files, outputs = _csv_files(csv_path)
        root = csv_path
        if not files:
            raise DatasetError(f"{csv_path} names no image with a class. {' '.join(outputs)}".strip())
    else:
        files, outputs = _folder_files(root)
    if not any(files.values()):
        raise DatasetError(
            f"No class folders found in {root}. Put one subfolder per class (e.g. {root}/cats/*.jpg), "
            "optionally inside train/ and val/."
        )
    good, ignored, corrupt = _check_tree(files, workers, verified, decoded)
    if corrupt and not any(items for per_class in good.values() for items in per_class.values()):
        path, why = corrupt[0]
        raise DatasetError(
            f"{root} holds no readable image ({len(corrupt)} could not be read, e.g. {path}: {why.rstrip('.')}). "
            f"{' '.join(outputs)}".strip()
        )
    try:
        labels = _labels(good, root, labels)
    except DatasetError as exc:  # too few images: say which files are pictures in another form
        raise DatasetError(f"{exc} {conversions_needed(ignored)}".strip()) from None
    splits, split_source, warnings = _split(good, labels, val_fraction, seed)
    duplicates = _leaks(splits)
    conflicts = _conflicts(splits, labels)
    warnings += _warnings(splits, labels, duplicates, corrupt, conflicts) + outputs
    return DatasetReport(root, list(labels), splits, split_source, ignored, corrupt, duplicates, warnings, conflicts)


def _classifier_csv(root: Path) -> Path | None:
    """The labels CSV a classifier reads from ``root``: a .csv file given (a multi-label one is refused by
    :func:`_csv_files`, by name), or a folder's labels.csv in the image,label layout; None for a class-folder set."""
    csv_path = find_csv(str(root))
    return csv_path if csv_path is not None and (root.is_file() or single_label(header_of(csv_path))) else None


def _csv_files(csv_path: Path, known: list[str] | None = None) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """The images of an ``image,label`` CSV by split and class, as :func:`_folder_files` gives a folder's, and what
    the CSV held that is not used (rows skipped, an image named twice: the first row kept), in words. ``known``: the
    classes of a trained model (a row of another class: an error naming it)."""
    header = header_of(csv_path)
    if not single_label(header):
        raise DatasetError(
            f"{csv_path} gives images several labels (a 'labels' column, or one 0/1 column per label): a multi-label "
            "data set (`headstart train` without --task trains one on it). A classifier takes one class per image: "
            "an image,label CSV, or a folder with one subfolder per class."
        )
    table = read_csv(csv_path)
    rows, again = first_rows(table.rows)
    twice = [row.where for row in again]
    skipped = table.skipped
    by_split = any(row.split for row in rows)
    files: dict[str, dict[str, list[Path]]] = {}
    for row in rows:
        split = (row.split or "train") if by_split else "all"
        files.setdefault(split, {}).setdefault(row.names[0], []).append(row.path)
    if known is not None:
        unknown = sorted({c for per_class in files.values() for c in per_class} - set(known))
        if unknown:
            raise DatasetError(f"{csv_path} has classes {unknown} that the model does not know (it knows {known}).")
    if by_split and "train" not in files:
        raise DatasetError(f"{csv_path}: no row is of the train split; a classifier needs training images.")
    notes = list(table.notes)
    if skipped:
        notes.append(f"{csv_path.name}: {len(skipped)} rows skipped: " + "; ".join(f"{w}: {r}" for w, r in skipped[:5]))
    if twice:
        notes.append(f"{len(twice)} rows name an image an earlier row names (the first kept): {', '.join(twice[:5])}")
    return files, notes


def _folder_files(root: Path) -> tuple[dict[str, dict[str, list[Path]]], list[str]]:
    """The image files of a class-folder data set by split (or "all") and class, and what was left out, in words."""
    if not root.is_dir():
        raise DatasetError(not_a_folder(root))
    foreign = foreign_layout(root)
    if foreign is not None:
        raise DatasetError(foreign)
    split_dirs = _split_dirs(root)
    outputs: list[str] = []  # headstart's own outputs found among the class folders, and folders left out
    if split_dirs and "train" not in split_dirs:
        raise DatasetError(f"{root} has {sorted(split_dirs)} folders but no train/ folder. Add train/.")
    if not split_dirs:
        split_dirs = {"all": root}
    else:
        kept = {d.name for d in split_dirs.values()}  # beside them: headstart's outputs pass unsaid, others are named
        others = sorted(
            d
            for d in root.iterdir()
            if d.is_dir() and not d.name.startswith(".") and d.name not in kept and _output_kind(d) is None
        )
        if others:
            outputs.append(
                f"{', '.join(shown(d.name) + '/' for d in others)} beside train/: not a split folder (train/, "
                f"{' or '.join(v + '/' for v in VAL_FOLDERS)}, test/), left out."
            )

    files: dict[str, dict[str, list[Path]]] = {
        split: {d.name: _list_files(d) for d in _list_class_dirs(folder, outputs)}
        for split, folder in split_dirs.items()
    }
    return files, outputs


def _split_dirs(root: Path) -> dict[str, Path]:
    """The split folders of ``root`` by split name, in the order train, val, test; none where it has none."""
    vals = [name for name in VAL_FOLDERS if (root / name).is_dir()]
    if len(vals) > 1:
        raise DatasetError(
            f"{root} has {' and '.join(v + '/' for v in vals)}: which is the validation split? Keep one of them."
        )
    names = {"train": "train", "val": vals[0] if vals else "val", "test": "test"}
    return {split: root / name for split, name in names.items() if (root / name).is_dir()}


Checked = dict[str, dict[str, list[tuple[Path, str]]]]  # split → class → (path, sha256) of readable images


def _labels(good: Checked, root: Path, labels: list[str] | None) -> list[str]:
    """The class names (sorted folder names of train/, unless given), each with at least 2 readable images."""
    train_key = "train" if "train" in good else "all"
    if labels is None:
        labels = sorted(c for c, items in good[train_key].items() if items)
        if len(labels) < 2:
            raise DatasetError(f"Found {len(labels)} class(es) with images in {root}; a classifier needs at least 2.")
        for split, per_class in good.items():
            extra = sorted(c for c, items in per_class.items() if items and c not in labels)
            if extra:
                raise DatasetError(
                    f"Classes {extra} have images in {split}/ but none in train/. Add training images for them "
                    "or remove them."
                )
    totals = Counter()
    for per_class in good.values():
        for c, items in per_class.items():
            totals[c] += len(items)
    too_few = [c for c in labels if totals[c] < 2]
    if too_few:
        raise DatasetError(
            f"Classes {too_few} have fewer than 2 readable images; each class needs at least 2 "
            "(one to train, one to validate). Add images or remove the class folder."
        )
    return labels


def _split(
    good: Checked, labels: list[str], val_fraction: float, seed: int
) -> tuple[dict[str, list[Sample]], str, list[str]]:
    """The train/val(/test) samples: the split folders as they are, else a stratified random split."""
    index = {name: i for i, name in enumerate(labels)}

    def samples(per_class: dict[str, list[tuple[Path, str]]]) -> list[Sample]:
        return [Sample(p, index[c], h) for c, items in per_class.items() if c in index for p, h in items]

    split_from = "all" if "all" in good else ("train" if "val" not in good else None)
    if not split_from:
        splits = {s: samples(good[s]) for s in SPLITS if s in good}
        missing = [labels[k] for k in range(len(labels)) if not any(s.label == k for s in splits["val"])]
        warnings = [f"classes {missing} have no validation images; their metrics are undefined."] if missing else []
        return splits, "train/val folders", warnings
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"--val-fraction must be between 0 and 1, got {val_fraction}.")
    rng = random.Random(seed)
    train, val = [], []
    for c in labels:
        items = sorted(good[split_from].get(c, []))
        rng.shuffle(items)
        n_val = min(len(items) - 1, max(1, round(len(items) * val_fraction)))
        val += [Sample(p, index[c], h) for p, h in items[:n_val]]
        train += [Sample(p, index[c], h) for p, h in items[n_val:]]
    splits = {"train": train, "val": val}
    if "test" in good:
        splits["test"] = samples(good["test"])
    where = "" if split_from == "all" else " of train/ (no val/ folder)"
    return splits, f"random stratified split{where}, seed={seed}, val_fraction={val_fraction}", []


def _leaks(splits: dict[str, list[Sample]]) -> list[tuple[str, str]]:
    """(train path, val/test path) of images with identical bytes on both sides (:func:`headstart.data.same_bytes`'s
    groups, as the multi-label task finds its leaks): each val/test image with the first training image like it."""
    pairs = []
    for group in same_bytes(splits):
        train = [s.path for split, s in group if split == "train"]
        pairs += [(str(train[0]), str(s.path)) for split, s in group if train and split != "train"]
    return pairs


def _conflicts(splits: dict[str, list[Sample]], labels: list[str]) -> list[list[tuple[str, str]]]:
    """The images with identical bytes filed under more than one class, in any split: each a list of (path, class).
    Training would be taught both labels for one picture (and validation would count one of them wrong)."""
    return [
        [(shown(s.path), labels[s.label]) for _, s in group]
        for group in same_bytes(splits)
        if len({s.label for _, s in group}) > 1
    ]


def _conflict_warning(conflicts: list[list[tuple[str, str]]], harm: str) -> str:
    return (
        f"images filed under more than one class (identical bytes; {len(conflicts)}): {harm}. Keep each in the one "
        "class folder it belongs to: "
        + "; ".join(" == ".join(f"{p} ({c})" for p, c in group) for group in conflicts[:5])
        + (f"; and {len(conflicts) - 5} more (the JSON report lists them all)" if len(conflicts) > 5 else "")
    )


#: A class with fewer validation images than this gets a warning: its metrics rest on them.
FEW_VALIDATION_IMAGES = 5


def _warnings(splits, labels: list[str], duplicates: list, corrupt: list, conflicts: list) -> list[str]:
    warnings = []
    if conflicts:
        warnings.append(_conflict_warning(conflicts, "the model is taught both labels for one picture"))
    if duplicates:
        warnings.append(
            f"{len(duplicates)} images appear in train and in val/test (identical bytes): a leak that inflates "
            "validation accuracy. Remove them from one side: " + "; ".join(f"{a} == {b}" for a, b in duplicates[:5])
        )
    counts = Counter(s.label for s in splits["train"])
    if counts and max(counts.values()) > 1.5 * min(counts.get(k, 0) for k in range(len(labels))):
        named: list[int | None] = list(range(len(labels)))
        if len(labels) > 10:  # the extremes: the whole table is above
            by_size = sorted(named, key=lambda k: (counts.get(k, 0), k))
            named = [*by_size[:5], None, *by_size[-5:]]
        shown = ("..." if k is None else f"{labels[k]}={counts.get(k, 0)}" for k in named)
        warnings.append("classes are unbalanced in train: " + ", ".join(shown))
    val = Counter(s.label for s in splits.get("val", []))
    thin = [k for k in range(len(labels)) if val.get(k, 0) < FEW_VALIDATION_IMAGES]
    if splits.get("val") and thin:
        warnings.append(
            f"few validation images for {len(thin)} of {len(labels)} classes: "
            + some([f"{labels[k]} ({val.get(k, 0)})" for k in thin])
            + f"; their precision, recall and F1 rest on fewer than {FEW_VALIDATION_IMAGES} images each (one image "
            "moves them by 20 points or more); add validation images of these classes for figures you can trust."
        )
    if corrupt:
        warnings.append(f"{len(corrupt)} corrupt images were skipped (listed above).")
    return warnings


def scan_eval_folder(
    root: str | Path, labels: list[str], workers: int = 4, decoded: DecodedImages | None = None
) -> DatasetReport:
    """Check a labelled folder (class subfolders directly inside) for evaluation against a trained run's labels;
    the images decoded are kept in ``decoded`` while it has room (the evaluation takes them)."""
    root = Path(root)
    csv_path = _classifier_csv(root)
    if csv_path is not None:
        files, outputs = _csv_files(csv_path, known=labels)  # every row, whatever its split: evaluated
        root, files = csv_path, {"eval": {c: [p for per in files.values() for p in per.get(c, [])] for c in labels}}
        if not any(files["eval"].values()):
            raise DatasetError(f"{csv_path} names no image with a class. {' '.join(outputs)}".strip())
    else:
        per_class, outputs = _eval_class_files(root, labels)
        files = {"eval": per_class}
    good, ignored, corrupt = _check_tree(files, workers, None, decoded)
    index = {name: i for i, name in enumerate(labels)}
    samples = [Sample(p, index[c], h) for c, items in good["eval"].items() for p, h in items]
    if not samples:
        raise DatasetError(f"{root} has no readable images.")
    conflicts = _conflicts({"eval": samples}, labels)
    warnings = [_conflict_warning(conflicts, "the model can be right on only one of the copies")] if conflicts else []
    warnings += [f"{len(corrupt)} corrupt images were skipped (listed above)."] if corrupt else []
    warnings += outputs
    return DatasetReport(
        root, list(labels), {"eval": samples}, "evaluation folder", ignored, corrupt, [], warnings, conflicts
    )


def _eval_class_files(root: Path, labels: list[str]) -> tuple[dict[str, list[Path]], list[str]]:
    """The image files of each class folder of ``root`` (every one of them a class of ``labels``), and what was left
    out, in words."""
    if not root.is_dir():
        raise DatasetError(not_a_folder(root))
    outputs: list[str] = []
    # an empty folder holds nothing to evaluate: `evaluate --out DATA/eval` makes its own before this scan
    class_dirs = [d for d in _list_class_dirs(root, outputs) if d.name in labels or _list_files(d)]
    unknown = sorted(d.name for d in class_dirs if d.name not in labels)
    if unknown:
        raise DatasetError(
            f"{root} has class folders {unknown} that the model does not know (it knows {labels}). "
            "Point evaluate at a folder whose subfolders are the model's labels."
        )
    if not class_dirs:
        raise DatasetError(f"{root} has no class folders; expected subfolders named after {labels}.")
    return {d.name: _list_files(d) for d in class_dirs}, outputs


def scan_other_images(root: str | Path, workers: int = 4, decoded: DecodedImages | None = None) -> DatasetReport:
    """Check a folder of images of other things (`headstart evaluate --other`): every image in it, at any depth,
    with no labels; files that are not images are ignored, corrupt ones skipped and listed; the images decoded are
    kept in ``decoded`` while it has room."""
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(not_a_folder(root, "--other"))
    good, ignored, corrupt = _check_tree({"other": {"": _list_files(root)}}, workers, None, decoded)
    samples = [Sample(p, -1, h) for p, h in good["other"][""]]
    if not samples:
        raise DatasetError(f"--other {root} holds no readable images.")
    warnings = [f"{len(corrupt)} corrupt images were skipped (listed above)."] if corrupt else []
    return DatasetReport(root, [], {"other": samples}, "images of other things", ignored, corrupt, [], warnings)
