"""Labels CSVs: a table of images and their labels, which the classifier and the multi-label classifier train on.

Paths are relative to the CSV; a header row names the columns:

- ``image,label``: one class per image (the classifier: `headstart train labels.csv`, as Kaggle's tables give it;
  the columns may be named ``filename``, ``file``, ``path`` or ``image_path`` and ``class`` too, in any case);
- ``image,labels``: the labels of each image separated by spaces (the multi-label classifier; an empty cell: an
  image with none of them);
- ``image,<label>,<label>,...``: one column per label holding 1 or 0 (multi-hot; the multi-label classifier);
- any of them with a ``split`` column (train, val or valid or validation, or test) fixing the split.

Torch-free: the task registry asks :func:`single_label` which task a CSV is for.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from headstart.data import DatasetError

#: the file a folder holds for `headstart train FOLDER` to be a labels CSV data set
CSV_NAME = "labels.csv"
SPLITS = ("train", "val", "test")


def find_csv(data_dir: str) -> Path | None:
    """The labels CSV ``data_dir`` names: the file itself (``*.csv``), or ``labels.csv`` inside the folder."""
    path = Path(data_dir)
    if path.suffix.lower() == ".csv" and path.is_file():
        return path
    if path.is_dir() and (path / CSV_NAME).is_file():
        return path / CSV_NAME
    return None


def header_of(csv_path: Path) -> list[str]:
    """The column names of a CSV's first row (empty where it cannot be read: :func:`read_csv` says why)."""
    try:
        with open(csv_path, encoding="utf-8-sig", newline="") as f:
            return [h.strip() for h in next(csv.reader(f), [])]
    except (OSError, UnicodeDecodeError, csv.Error):
        return []


#: the image column's name, as tables name it (``image``, or the first of the others a header holds)
IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "path", "image_path")
#: a single-label table's class column (``label``, or ``class``)
LABEL_COLUMNS = ("label", "class")


def single_label(header: list[str]) -> bool:
    """The ``image,label`` layout: one class per image (a classifier's data), not a multi-label table."""
    return "labels" not in header and _column(header, LABEL_COLUMNS) is not None


def _column(header: list[str], names: tuple[str, ...]) -> int | None:
    """The index of the first of ``names`` the header holds (case and spaces aside), else None."""
    folded = [h.strip().lower() for h in header]
    return next((folded.index(n) for n in names if n in folded), None)


@dataclass
class Row:
    where: str  # "FILE.csv:LINE" for messages
    path: Path
    names: tuple[str, ...]
    split: str | None


def first_rows(rows: list[Row]) -> tuple[list[Row], list[Row]]:
    """The rows with each image once (its first row), and the later rows that name an image again."""
    seen: dict[Path, Row] = {}
    again = []
    for row in rows:
        key = row.path.resolve()
        if key in seen:
            again.append(row)
        else:
            seen[key] = row
    return list(seen.values()), again


def read_csv(csv_path: Path) -> tuple[list[Row], list[str] | None, list[tuple[str, str]]]:
    """The rows of a labels CSV, the label columns of a multi-hot layout (None for ``image,labels`` and
    ``image,label``), and the rows skipped with the reason."""
    try:
        text = csv_path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read {csv_path}: {exc}. Save it as UTF-8 text.") from exc
    reader = csv.reader(text.splitlines())
    header = [h.strip() for h in next(reader, [])]
    image_col = _column(header, IMAGE_COLUMNS)
    if image_col is None:
        raise DatasetError(
            f"{csv_path} has no 'image' column (its header is {','.join(header) or 'empty'}; filename, file, path "
            "or image_path are read as it too). The first row must name the columns: image,label (one class per "
            "image), image,labels (labels separated by spaces), or image and one 0/1 column per label; optionally "
            "split (train, val or test)."
        )
    split_col = _column(header, ("split",))
    single = single_label(header)
    label_col = _column(header, LABEL_COLUMNS) if single else None
    multi = "labels" not in header and not single
    label_cols = [i for i, h in enumerate(header) if i not in (image_col, split_col)] if multi else []
    if multi and not label_cols:
        raise DatasetError(f"{csv_path} names no labels: add a 'labels' column or one 0/1 column per label.")
    rows, skipped = [], []
    for line, cells in enumerate(reader, start=2):
        where = f"{csv_path.name}:{line}"
        if not any(c.strip() for c in cells):
            continue
        if len(cells) != len(header):
            skipped.append((where, f"{len(cells)} cells where the header has {len(header)}"))
            continue
        image = cells[image_col].strip()
        if not image:
            skipped.append((where, "no image named"))
            continue
        split = cells[split_col].strip().lower() if split_col is not None else None
        split = "val" if split in ("valid", "validation") else split  # as an image folder's valid/ (Roboflow)
        if split is not None and split not in SPLITS:
            skipped.append((where, f"split {split!r} is not train, val (valid, validation) or test"))
            continue
        if multi:
            values = [cells[i].strip() for i in label_cols]
            if any(v not in ("0", "1", "") for v in values):
                skipped.append((where, "a label column holds something other than 0 or 1"))
                continue
            names = tuple(header[i] for i, v in zip(label_cols, values, strict=True) if v == "1")
        elif single:
            label = cells[label_col].strip()
            if not label:
                skipped.append((where, "no label"))
                continue
            names = (label,)
        else:
            names = tuple(dict.fromkeys(cells[header.index("labels")].split()))
        rows.append(Row(where, (csv_path.parent / image), names, split))
    return rows, ([header[i] for i in label_cols] if multi else None), skipped
