"""Labels CSVs: a table of images and their labels, which the classifier and the multi-label classifier train on.

Paths are relative to the CSV; a header row names the columns:

- ``image,label``: one class per image (the classifier: `headstart train labels.csv`, as Kaggle's tables give it;
  the columns may be named ``filename``, ``file``, ``path``, ``image_path``, ``image_id``, ``id`` ... and ``class``
  too, in any case; a table of two columns with other names, ``id,breed``, is read as such);
- ``image,labels``: the labels of each image separated by spaces, or by ``|``, ``;`` or ``,`` where the cells hold
  them (the multi-label classifier; an empty cell: an image with none of them; the column may be named ``tags``);
- ``image,<label>,<label>,...``: one column per label holding 1 or 0 (multi-hot; the multi-label classifier;
  columns holding other things, ids or sizes, are left out and named);
- any of them with a ``split`` column (train, val or valid or validation, or test) fixing the split.

A table naming its images without their folder or extension (Kaggle's ids: ``000bec18``, the file
``train/000bec18.jpg``) is read where its images are found (:func:`_placed`), and the data check says so.

Torch-free: the task registry asks :func:`single_label` which task a CSV is for.
"""

from __future__ import annotations

import contextlib
import csv
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from headstart.data import DatasetError
from headstart.service.files import delimiter, text_of
from headstart.service.formats import IMAGE_SUFFIXES

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


def csv_text(csv_path: Path, head: int = -1) -> str:
    """A labels CSV's text (its first ``head`` bytes, the end of a cut character left out): UTF-8, with a byte-order
    mark or none, or UTF-16 where it starts with one (Excel's "Unicode text", which was "Cannot read ... Save it as
    UTF-8"); UnicodeDecodeError for anything else."""
    with open(csv_path, "rb") as f:
        data = f.read(head)
    return text_of(data, "strict" if head < 0 else "ignore")


def header_of(csv_path: Path) -> list[str]:
    """The column names of a CSV's first row (empty where it cannot be read: :func:`read_csv` says why)."""
    try:
        first = next(iter(csv_text(csv_path, head=65536).splitlines()), "")
    except OSError:
        return []
    return [h.strip() for h in next(csv.reader([first], delimiter=delimiter(first)), [])]


#: the image column's name, as tables name it (``image``, or the first of the others a header holds; Kaggle's tables
#: say image_id, image_name, id_code or id)
IMAGE_COLUMNS = ("image", "filename", "file_name", "file", "path", "image_path")
IMAGE_COLUMNS += ("image_id", "image_name", "id_code", "id")
#: a single-label table's class column (``label``, or ``class``)
LABEL_COLUMNS = ("label", "class")
#: a multi-label table's column listing each image's labels (Planet's tables say tags)
LIST_COLUMNS = ("labels", "tags")
#: what separates the labels in such a column: the first of these its cells hold, else spaces
LIST_SEPARATORS = ("|", ";", ",")
#: a multi-hot column's values (case aside; 1.0 and 0.0 as pandas writes a column that had gaps)
ONE, ZERO = frozenset({"1", "1.0", "true", "yes"}), frozenset({"0", "0.0", "false", "no", ""})


@dataclass(frozen=True)
class Layout:
    """Which column of a labels CSV holds what: the image, the split (or None), and the labels as ``kind`` says:
    ``label`` (one class per image, column ``label``), ``list`` (the labels of each image in column ``label``) or
    ``multihot`` (the other columns, each 1 or 0; those holding other things are left out by :func:`read_csv`)."""

    image: int
    split: int | None
    kind: str
    label: int | None


def layout_of(header: list[str]) -> Layout | None:
    """The layout a header row gives (None: it names no image column). A table of two columns whose names say
    nothing (``id,breed``, Kaggle's way) is the images and their class, in that order."""
    image, split = _column(header, IMAGE_COLUMNS), _column(header, ("split",))
    named = [i for i in range(len(header)) if i != split]
    if image is None and len(named) == 2 and _column(header, LIST_COLUMNS + LABEL_COLUMNS) is None:
        image = named[0]
    if image is None:
        return None
    listed = _column(header, LIST_COLUMNS)
    if listed is not None and listed != image:
        return Layout(image, split, "list", listed)
    label = _column(header, LABEL_COLUMNS)
    others = [i for i in named if i != image]
    if label is None and len(others) == 1:
        label = others[0]
    if label is not None and label != image:
        return Layout(image, split, "label", label)
    return Layout(image, split, "multihot", None)


def single_label(header: list[str]) -> bool:
    """The ``image,label`` layout: one class per image (a classifier's data), not a multi-label table."""
    layout = layout_of(header)
    return layout is not None and layout.kind == "label"


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


@dataclass
class Table:
    """A labels CSV read: its rows, the label columns of a multi-hot layout (None for the others), the rows skipped
    with the reason, and what else the reading decided that the user should know, in words."""

    rows: list[Row]
    columns: list[str] | None
    skipped: list[tuple[str, str]]
    notes: list[str]


def read_csv(csv_path: Path) -> Table:
    """Read a labels CSV: the layout from its header (:func:`layout_of`); in a multi-hot table, the columns holding
    other things than 1 and 0 (ids, sizes, notes) left out; each image found where the CSV names it, or, where the
    table names images without their folder or extension (Kaggle's ids), where :func:`_placed` finds them."""
    try:
        text = csv_text(csv_path)
    except (OSError, UnicodeDecodeError) as exc:
        raise DatasetError(f"Cannot read {csv_path}: {exc}. Save it as UTF-8 text.") from exc
    lines = text.splitlines()
    reader = csv.reader(lines, delimiter=delimiter(lines[0] if lines else ""))
    header = [h.strip() for h in next(reader, [])]
    layout = layout_of(header)
    if layout is None:
        raise DatasetError(
            f"{csv_path} has no 'image' column (its header is {','.join(header) or 'empty'}; "
            f"{', '.join(IMAGE_COLUMNS[1:])} are read as it too). The first row must name the columns: image,label "
            "(one class per image), image,labels (labels separated by spaces), or image and one 0/1 column per "
            "label; optionally split (train, val or test)."
        )
    entries, skipped, notes = [], [], []  # (where, cells) of the rows that name an image
    for line, cells in enumerate(reader, start=2):
        if not any(c.strip() for c in cells):
            continue
        where = f"{csv_path.name}:{line}"
        if len(cells) != len(header):
            skipped.append((where, f"{len(cells)} cells where the header has {len(header)}"))
        elif not cells[layout.image].strip():
            skipped.append((where, "no image named"))
        elif "\0" in cells[layout.image]:
            skipped.append((where, "the image's name holds a NUL character, which no file name can"))
        else:
            entries.append((where, [c.strip() for c in cells]))
    label_cols: list[int] = []
    if layout.kind == "multihot":
        label_cols, left_out = _multihot_columns(header, layout, [cells for _, cells in entries])
        if left_out:
            notes.append(
                f"{csv_path.name}: columns left out (they hold other things than 1 and 0, so they are not labels): "
                + ", ".join(left_out)
            )
        if not label_cols:
            raise DatasetError(
                f"{csv_path} names no labels (its header is {','.join(header)}): name the column of each image's "
                "class 'label' (a classifier), or add a 'labels' column (labels separated by spaces) or one 0/1 "
                "column per label (multi-label)."
            )
    separator = _separator([cells[layout.label] for _, cells in entries]) if layout.kind == "list" else None
    kept = []
    for where, cells in entries:
        split = cells[layout.split].lower() if layout.split is not None else None
        split = "val" if split in ("valid", "validation") else split  # as an image folder's valid/ (Roboflow)
        if split is not None and split not in SPLITS:
            skipped.append((where, f"split {split!r} is not train, val (valid, validation) or test"))
            continue
        if layout.kind == "multihot":
            values = [cells[i].lower() for i in label_cols]
            if any(v not in ONE | ZERO for v in values):
                skipped.append((where, "a label column holds something other than 0 or 1"))
                continue
            names = tuple(header[i] for i, v in zip(label_cols, values, strict=True) if v in ONE)
        elif layout.kind == "label":
            if not cells[layout.label]:
                skipped.append((where, "no label"))
                continue
            names = (cells[layout.label],)
        else:
            parts = cells[layout.label].split(separator)
            names = tuple(dict.fromkeys(p.strip() for p in parts if p.strip()))
        kept.append((where, cells[layout.image], names, split))
    paths, said = _placed(csv_path.parent, [image for _, image, _, _ in kept], csv_path.name)
    notes += [f"{csv_path.name}: {said}"] if said else []
    rows = [Row(where, path, names, split) for (where, _, names, split), path in zip(kept, paths, strict=True)]
    skipped.sort(key=lambda skip: int(skip[0].rsplit(":", 1)[1]))  # in the table's order
    return Table(rows, [header[i] for i in label_cols] if layout.kind == "multihot" else None, skipped, notes)


def _multihot_columns(header: list[str], layout: Layout, cells: list[list[str]]) -> tuple[list[int], list[str]]:
    """The label columns of a multi-hot table (all but the image and split columns, less those of which more than
    half the cells that are not empty hold something other than 1 and 0), and those left out, each with an example
    of what it holds."""
    labels, left_out = [], []
    for i in (i for i in range(len(header)) if i not in (layout.image, layout.split)):
        values = [row[i].lower() for row in cells if row[i]]
        other = [v for v in values if v not in ONE | ZERO]
        if 2 * len(other) > len(values):
            left_out.append(f"{header[i] or f'column {i + 1}'} (e.g. {other[0]!r})")
        else:
            labels.append(i)
    return labels, left_out


def _separator(cells: list[str]) -> str | None:
    """What separates the labels in a labels column: the first of :data:`LIST_SEPARATORS` a cell holds (the labels
    may then have spaces in their names), else None (spaces)."""
    return next((sep for sep in LIST_SEPARATORS if any(sep in c for c in cells)), None)


#: images looked at to find where a table's images are (spread over the table)
PLACE_SAMPLE = 64


def _placed(base: Path, names: list[str], table: str) -> tuple[list[Path], str | None]:
    """The image file of each of ``names``: ``base / name`` (the CSV's folder) where that holds it. A table naming its
    images without their folder or extension (Kaggle's ids; the files in ``train_images/ID.jpg``, or in two folders
    as HAM10000's) has the folders of ``base`` and the image extensions tried on a sample of its names, and each image
    is looked for where the sample found images, the most found first; an image found in two places is an error
    (which one the table means cannot be told). Returns the paths, and what was found, in words (None where the table
    names its images as they are)."""
    default = [base / name for name in names]
    sample = names[:: max(1, len(names) // PLACE_SAMPLE)][:PLACE_SAMPLE]
    if all((base / n).is_file() for n in sample):
        return default, None
    folders = [base]
    with contextlib.suppress(OSError):
        folders += sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))[:PLACE_SAMPLE]
    files = {d: _listed(d) for d in folders}
    suffixes = ("", *sorted(IMAGE_SUFFIXES), *sorted(s.upper() for s in IMAGE_SUFFIXES))

    def found(folder: Path, name: str, suffix: str) -> bool:
        if "/" not in name and "\\" not in name:
            return name + suffix in files[folder]
        return folder == base and (folder / (name + suffix)).is_file()  # a name with its folder: only the extension

    hits = Counter((d, s) for n in sample for d in folders for s in suffixes if found(d, n, s))
    places = [place for place, _ in hits.most_common()]
    if not places or places[0] == (base, ""):
        return default, None
    paths, twice = [], []
    for name, as_written in zip(names, default, strict=True):
        where = [as_written] if found(base, name, "") else [d / (name + s) for d, s in places if found(d, name, s)]
        twice += [(name, where)] if len(where) > 1 else []
        paths.append(where[0] if where else as_written)
    if twice:
        name, where = twice[0]
        raise DatasetError(
            f"{table} names its images without their folder, and {len(twice)} of them are in more than one folder "
            f"(e.g. {name}: {' and '.join(w.relative_to(base).as_posix() for w in where)}): which one it means cannot "
            f"be told. Write each image's folder in its cell ({where[0].relative_to(base).as_posix()}), or move the "
            "other folder out."
        )
    shown = [(d.relative_to(base).as_posix() + "/" if d != base else "") + f"NAME{s}" for d, s in places[:3]]
    return paths, f"the table names its images as NAME; read as {' or '.join(shown)}{' or ...' if places[3:] else ''}"


def _listed(folder: Path) -> frozenset[str]:
    """The names in ``folder`` (none where it cannot be listed)."""
    try:
        return frozenset(os.listdir(folder))
    except OSError:
        return frozenset()
