"""YOLO-format detection data sets (Ultralytics / Roboflow exports): ``data.yaml`` plus image and label folders.

``data.yaml`` names the classes (``names``: a list, or a mapping index → name) and the image folders (``train``,
optionally ``val``; relative to ``path``, itself relative to the yaml file; a ``../x`` that does not exist is read
as ``x``, as Ultralytics reads Roboflow's exports). Each image ``.../images/.../x.jpg`` has
its labels in ``.../labels/.../x.txt``, one ``class cx cy w h`` line per object, normalised to [0, 1]. The labels of
Ultralytics' other tasks train a detector too, as Ultralytics reads them: a segmentation data set's polygon lines
(``class x1 y1 x2 y2 x3 y3 ...``) give their bounding boxes, a pose data set's lines (``data.yaml``'s ``kpt_shape``:
``class cx cy w h`` and its keypoints) their boxes.

Everything that is not usable is reported, never fatal: images without a label file are background images (kept:
they teach the model where nothing is), label files without an image are listed, malformed label lines are
reported with file and line and skipped, corrupt images are skipped.
"""

from __future__ import annotations

import hashlib
import random
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple

import numpy as np
import yaml

from headstart.data import DatasetError, VerifiedImages, check_file, foreign_layout, listed, more_line, not_a_folder
from headstart.service.files import shown
from headstart.service.formats import IMAGE_SUFFIXES

if TYPE_CHECKING:
    from headstart.features import DecodedImages


@dataclass
class DetSample:
    path: Path
    sha256: str
    classes: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) float32, YOLO cx cy w h normalised to the (EXIF-rotated) image

    @property
    def is_background(self) -> bool:
        return len(self.classes) == 0

    @property
    def identity(self) -> str:
        """What the cached features of its views depend on: the image bytes and the boxes."""
        boxes = hashlib.sha256(self.classes.tobytes() + self.boxes.tobytes()).hexdigest()
        return f"{self.sha256}:{boxes}"


@dataclass
class DetectionReport:
    root: Path
    yaml_path: Path
    labels: list[str]
    splits: dict[str, list[DetSample]] = field(default_factory=dict)
    split_source: str = "data.yaml"
    background: list[str] = field(default_factory=list)
    orphan_labels: list[str] = field(default_factory=list)
    malformed: list[str] = field(default_factory=list)
    corrupt: list[tuple[str, str]] = field(default_factory=list)
    polygons: int = 0  # label lines that were polygons (a segmentation data set): their bounding boxes used

    def box_counts(self, split: str) -> list[int]:
        counts = [0] * len(self.labels)
        for s in self.splits.get(split, []):
            for c in s.classes:
                counts[int(c)] += 1
        return counts

    def format(self) -> str:
        lines = [f"detection data set {self.yaml_path} ({len(self.labels)} classes, split: {self.split_source})"]
        for split, items in self.splits.items():
            boxes = sum(len(s.classes) for s in items)
            lines.append(
                f"  {split:<6} {len(items):5d} images, {boxes:6d} boxes, "
                f"{sum(s.is_background for s in items)} background"
            )
        if self.background:
            lines.append(
                f"  {len(self.background)} image(s) without a label file, used as background: "
                + ", ".join(self.background[:5])
                + (" ..." if len(self.background) > 5 else "")
            )
        if self.orphan_labels:
            lines.append(
                f"  {len(self.orphan_labels)} label file(s) without an image, ignored: "
                + ", ".join(self.orphan_labels[:5])
                + (" ..." if len(self.orphan_labels) > 5 else "")
            )
        if self.polygons:
            lines.append(
                f"  {self.polygons} label line(s) are polygons (segmentation labels): trained on their bounding boxes"
            )
        for line in self.malformed[:20]:
            lines.append(f"  malformed label skipped: {line}")
        if len(self.malformed) > 20:
            lines.append(f"  ... {len(self.malformed) - 20} more malformed label lines")
        for path, why in listed(self.corrupt):
            lines.append(f"  corrupt or unreadable file skipped: {shown(path)}: {why}")
        lines += more_line(self.corrupt, indent="  ")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {
            "root": str(self.root),
            "yaml": str(self.yaml_path),
            "labels": self.labels,
            "split_source": self.split_source,
            "splits": {
                split: {
                    "images": len(items),
                    "boxes": sum(len(s.classes) for s in items),
                    "boxes_per_class": self.box_counts(split),
                }
                for split, items in self.splits.items()
            },
            "background_images": self.background,
            "orphan_label_files": self.orphan_labels,
            "malformed_label_lines": self.malformed,
            "polygon_label_lines": self.polygons,
            "corrupt": [{"path": p, "reason": r} for p, r in self.corrupt],
        }


def find_data_yaml(data: str | Path) -> Path | None:
    """The data set's yaml: ``data`` itself, or ``data.yaml`` / ``dataset.yaml`` inside the folder ``data``."""
    data = Path(data)
    if data.is_file() and data.suffix in (".yaml", ".yml"):
        return data
    for name in ("data.yaml", "data.yml", "dataset.yaml"):
        if (data / name).is_file():
            return data / name
    return None


def _names(raw, yaml_path: Path) -> list[str]:
    if isinstance(raw, dict):
        try:
            keys = sorted(int(k) for k in raw)
        except (TypeError, ValueError) as exc:
            raise DatasetError(f"{yaml_path}: 'names' keys must be class indices 0..K-1.") from exc
        if keys != list(range(len(keys))):
            raise DatasetError(f"{yaml_path}: 'names' must number the classes 0..{len(keys) - 1} without gaps.")
        return [str(raw[k] if k in raw else raw[str(k)]) for k in keys]
    if isinstance(raw, list) and raw:
        return [str(n) for n in raw]
    raise DatasetError(f"{yaml_path} has no 'names' list of class names (e.g. names: [cat, dog]).")


def label_path(image: Path) -> Path:
    """``.../images/.../x.jpg`` → ``.../labels/.../x.txt`` (the Ultralytics convention)."""
    parts = list(image.parts)
    for i in range(len(parts) - 2, -1, -1):
        if parts[i] == "images":
            parts[i] = "labels"
            break
    else:
        return image.with_suffix(".txt")
    return Path(*parts).with_suffix(".txt")


class Labels(NamedTuple):
    classes: np.ndarray  # (M,) int64
    boxes: np.ndarray  # (M, 4) cx cy w h, normalised
    problems: list[str]  # "file:line: reason", each line skipped
    polygons: int = 0  # lines that were polygons, read as their bounding boxes


def pose_values(spec: dict) -> int | None:
    """The values on a label line of a pose data set (``kpt_shape: [K, D]``: class, box and K keypoints of D
    values), else None."""
    shape = spec.get("kpt_shape")
    try:
        k, d = (int(v) for v in shape)
    except (TypeError, ValueError):
        return None
    return 5 + k * d if k > 0 and d in (2, 3) else None


def parse_labels(path: Path, num_classes: int, pose: int | None = None) -> Labels:
    """A label file → its boxes; a polygon line (``class`` and 3 or more ``x y`` points) gives its bounding box; with
    ``pose`` (:func:`pose_values`) a line of that many values gives its box (the keypoints after it left aside)."""
    classes, boxes, problems, polygons = [], [], [], 0
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        return Labels(np.zeros(0, np.int64), np.zeros((0, 4), np.float32), [f"{path}: unreadable ({exc})"])
    for n, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{n}"
        polygon = pose is None and len(fields) >= 7 and len(fields) % 2 == 1
        if len(fields) != 5 and not polygon and len(fields) != pose:
            expected = f"{pose} values (class, box, keypoints: kpt_shape)" if pose else "5 values, or a polygon"
            problems.append(f"{where}: expected 'class cx cy w h' ({expected}), got {len(fields)}")
            continue
        try:
            cls = int(fields[0])
            values = [float(v) for v in fields[1:]]
        except ValueError:
            problems.append(f"{where}: not numbers: {line.strip()[:60]!r}")
            continue
        if not 0 <= cls < num_classes:
            problems.append(f"{where}: class {cls} is not in 0..{num_classes - 1}")
            continue
        if polygon:
            if not all(np.isfinite(values)):
                problems.append(f"{where}: the polygon's points must be numbers")
                continue
            left, right, top, bottom = min(values[0::2]), max(values[0::2]), min(values[1::2]), max(values[1::2])
            cx, cy, w, h = (left + right) / 2, (top + bottom) / 2, right - left, bottom - top
        else:
            cx, cy, w, h = values[:4]
        if not all(np.isfinite([cx, cy, w, h])) or w <= 0 or h <= 0:
            problems.append(f"{where}: width and height must be positive numbers")
            continue
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
        tol = 0.01
        if x1 < -tol or y1 < -tol or x2 > 1 + tol or y2 > 1 + tol:
            problems.append(f"{where}: box ({cx}, {cy}, {w}, {h}) is outside the image (values are normalised)")
            continue
        x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2)
        classes.append(cls)
        boxes.append([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1])
        polygons += polygon
    return Labels(np.asarray(classes, np.int64), np.asarray(boxes, np.float32).reshape(-1, 4), problems, polygons)


def _resolved(path: Path) -> Path:
    """``path`` with its links resolved, or as it is where they loop (check_file reports the loop)."""
    try:
        return path.resolve()
    except (OSError, RuntimeError):
        return path.absolute()


def _image_files(entry, base: Path, yaml_path: Path) -> list[Path]:
    entries = entry if isinstance(entry, list) else [entry]
    files: list[Path] = []
    for item in entries:
        path = (base / str(item)).resolve() if not Path(str(item)).is_absolute() else Path(str(item))
        if not path.exists() and str(item).startswith("../"):  # Roboflow's exports: train: ../train/images, beside
            path = (base / str(item)[3:]).resolve()  # the yaml; Ultralytics reads them so
        if path.is_dir():
            files += sorted(p for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
        elif path.is_file() and path.suffix == ".txt":  # a list of image paths
            for line in path.read_text(errors="surrogateescape").splitlines():  # any bytes: reported, not a crash
                if line.strip():
                    p = Path(line.strip())
                    files.append(p if p.is_absolute() else _resolved(path.parent / p))
        else:
            raise DatasetError(f"{yaml_path}: image folder {path} does not exist. Fix 'path', 'train' or 'val'.")
    return files


def _read_yaml(data: str | Path) -> tuple[Path, dict, list[str], Path]:
    """(data.yaml path, its contents, class names, the folder its paths are relative to)."""
    yaml_path = find_data_yaml(data)
    if yaml_path is None:
        if not Path(data).is_dir():
            raise DatasetError(not_a_folder(data, "Data set"))
        raise DatasetError(
            foreign_layout(Path(data))
            or f"{data} has no data.yaml; a YOLO-format data set needs one with 'names' and 'train'."
        )
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except yaml.YAMLError as exc:
        raise DatasetError(f"{yaml_path} is not valid YAML: {exc}") from exc
    if not isinstance(spec, dict):
        raise DatasetError(f"{yaml_path} needs 'names' and image folders ('train', 'val', 'test').")
    labels = _names(spec.get("names"), yaml_path)
    return yaml_path, spec, labels, (yaml_path.parent / str(spec.get("path") or ".")).resolve()


def _scan_splits(
    report: DetectionReport,
    split_files: dict[str, list[Path]],
    workers: int,
    verified: VerifiedImages | None = None,
    decoded: DecodedImages | None = None,
    pose: int | None = None,
) -> None:
    """Check every image and label file of ``split_files`` into ``report`` (corrupt, background, orphans, ...); images
    ``verified`` holds are not decoded again; ``pose``: see :func:`parse_labels`."""
    n_labels = len(report.labels)

    def load(path: Path) -> tuple[Path, str, str, DetSample | None, Labels | None]:
        status, info = check_file(path, verified, decoded)
        if status != "ok":
            return path, status, info, None, None
        lpath = label_path(path)
        if not lpath.is_file():
            return (
                path,
                "background",
                "",
                DetSample(path, info, np.zeros(0, np.int64), np.zeros((0, 4), np.float32)),
                None,
            )
        labels = parse_labels(lpath, n_labels, pose)
        return path, "ok", "", DetSample(path, info, labels.classes, labels.boxes), labels

    image_stems: set[Path] = set()
    with ThreadPoolExecutor(workers) as pool:
        for split, files in split_files.items():
            samples = []
            for path, status, info, sample, labels in pool.map(load, files):
                image_stems.add(label_path(path))
                if labels is not None:
                    report.malformed += labels.problems
                    report.polygons += labels.polygons
                if status == "corrupt":
                    report.corrupt.append((shown(path), info))
                elif sample is not None:
                    if status == "background":
                        report.background.append(str(path))
                    samples.append(sample)
            report.splits[split] = samples
    if verified is not None:
        verified.save()
    label_dirs = {label_path(f).parent for files in split_files.values() for f in files}
    for folder in sorted(label_dirs):
        if folder.is_dir():
            report.orphan_labels += sorted(str(p) for p in folder.glob("*.txt") if p not in image_stems)


def scan_yolo_eval_split(
    data: str | Path, *, workers: int = 4, decoded: DecodedImages | None = None
) -> DetectionReport:
    """The images to evaluate on: data.yaml's 'test' split, else 'val', else 'train' (as Ultralytics data sets for
    evaluation often define only one); the report's only split is named after the one used. The images decoded are
    kept in ``decoded`` while it has room."""
    yaml_path, spec, labels, base = _read_yaml(data)
    split = next((s for s in ("test", "val", "train") if spec.get(s)), None)
    if split is None:
        raise DatasetError(f"{yaml_path} names no images: give 'test', 'val' or 'train' (an image folder or list).")
    report = DetectionReport(root=base, yaml_path=yaml_path, labels=labels, split_source=f"'{split}' of data.yaml")
    _scan_splits(report, {split: _image_files(spec[split], base, yaml_path)}, workers, None, decoded, pose_values(spec))
    if not report.splits[split]:
        raise DatasetError(f"{yaml_path}: the '{split}' split has no readable image.")
    return report


def scan_yolo_dataset(
    data: str | Path,
    *,
    val_fraction: float = 0.2,
    seed: int = 0,
    workers: int = 4,
    verified: VerifiedImages | None = None,
    decoded: DecodedImages | None = None,
) -> DetectionReport:
    """Read and check a YOLO-format data set for training: its train/val splits and everything that was skipped
    (images ``verified`` holds are not decoded again; those decoded are kept in ``decoded`` while it has room)."""
    yaml_path, spec, labels, base = _read_yaml(data)
    if "train" not in spec:
        raise DatasetError(f"{yaml_path} needs 'train' (an image folder) and 'names' to train on.")
    report = DetectionReport(root=base, yaml_path=yaml_path, labels=labels)
    split_files = {"train": _image_files(spec["train"], base, yaml_path)}
    if spec.get("val") and spec["val"] != spec["train"]:
        split_files["val"] = _image_files(spec["val"], base, yaml_path)
    _scan_splits(report, split_files, workers, verified, decoded, pose_values(spec))

    if "val" not in report.splits:
        if not 0.0 < val_fraction < 1.0:
            raise DatasetError(f"{yaml_path} names no 'val' images; --val-fraction must be in (0, 1).")
        items = list(report.splits["train"])
        random.Random(seed).shuffle(items)
        n_val = max(1, round(len(items) * val_fraction))
        report.splits = {"train": items[n_val:], "val": items[:n_val]}
        report.split_source = f"random {val_fraction:.0%} of train (seed {seed})"
    if not report.splits["train"] or not any(len(s.classes) for s in report.splits["train"]):
        raise DatasetError(f"{yaml_path}: no training image has a usable box; check the label files.")
    if not report.splits["val"]:
        raise DatasetError(f"{yaml_path}: no validation images. Add 'val' to the yaml or lower --val-fraction.")
    return report


def keep_classes(report: DetectionReport, names: list[str]) -> DetectionReport:
    """The data set restricted to the classes ``names`` (in that order): other boxes dropped, classes renumbered;
    an image left without boxes stays as background."""
    unknown = [n for n in names if n not in report.labels]
    if unknown:
        raise DatasetError(
            f"--classes names {', '.join(map(repr, unknown))}, not classes of {report.yaml_path} "
            f"(it has: {', '.join(report.labels[:20])}{' ...' if len(report.labels) > 20 else ''})."
        )
    if len(set(names)) != len(names):
        raise DatasetError(f"--classes names a class twice: {', '.join(names)}.")
    new_id = {report.labels.index(n): i for i, n in enumerate(names)}

    def restrict(s: DetSample) -> DetSample:
        keep = np.isin(s.classes, list(new_id))
        classes = np.array([new_id[int(c)] for c in s.classes[keep]], np.int64)
        return DetSample(s.path, s.sha256, classes, s.boxes[keep].reshape(-1, 4))

    out = DetectionReport(
        root=report.root,
        yaml_path=report.yaml_path,
        labels=list(names),
        splits={k: [restrict(s) for s in v] for k, v in report.splits.items()},
        split_source=report.split_source,
        background=report.background,
        orphan_labels=report.orphan_labels,
        malformed=report.malformed,
        corrupt=report.corrupt,
        polygons=report.polygons,
    )
    if not any(len(s.classes) for s in out.splits.get("train", [])):
        raise DatasetError(f"No training image has a box of {', '.join(names)}.")
    return out


def labelled_samples(data: str | Path, images: list[Path], labels: list[str]) -> list[DetSample]:
    """The samples of ``images`` with their boxes read from the data set's label files, classes numbered as in
    ``labels`` (a run trained on some classes only: the others' boxes dropped)."""
    _, spec, names, _ = _read_yaml(data)
    ids = {i: labels.index(n) for i, n in enumerate(names) if n in labels}
    out = []
    for image in images:
        lpath = label_path(image)
        classes, boxes = (
            parse_labels(lpath, len(names), pose_values(spec))[:2]
            if lpath.is_file()
            else (np.zeros(0, np.int64), np.zeros((0, 4), np.float32))
        )
        keep = np.isin(classes, list(ids))
        out.append(
            DetSample(image, "", np.array([ids[int(c)] for c in classes[keep]], np.int64), boxes[keep].reshape(-1, 4))
        )
    return out
