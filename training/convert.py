"""`headstart convert SOURCE --out DEST`: a COCO JSON or Pascal VOC detection data set as a YOLO one to train on.

headstart reads detection data as YOLO (``data.yaml``, one ``labels/*.txt`` per image). The other two formats data
sets come in are written out as that, without touching the source: ``DEST/images/SPLIT/`` holds links to the
source's images (copies with ``--copy``), ``DEST/labels/SPLIT/`` one label file per image (an empty one for an
image without boxes), ``DEST/data.yaml`` the splits and the class names. What cannot be used is left out and
reported, never fatal: crowd regions, boxes of no area, images listed but missing, annotations of no image.

- **COCO JSON** (``annotations/instances_train2017.json`` + ``train2017/``, or a Roboflow export's
  ``train/_annotations.coco.json`` beside its images; or the JSON file itself): ``bbox`` is ``[x, y, width, height]``
  in pixels of the image's ``width`` and ``height``; crowd annotations (``iscrowd``) are left out, as Ultralytics'
  converter leaves them out. Classes are the categories that have boxes, in the order of their ids (a Roboflow
  export's category 0, the data set's own name with no box, is left out and said).
- **Pascal VOC** (``Annotations/*.xml``, ``JPEGImages/``, and ``ImageSets/Main/{train,val,test}.txt`` where
  present, else every image in train): corners in pixels, 1-based as VOC counts them; objects marked ``difficult``
  are left out, as VOC's own evaluation and Ultralytics' converter leave them out. Classes in sorted order.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from headstart.runs import written_beside
from headstart.service.errors import HeadstartError
from headstart.service.files import shown
from headstart.service.formats import IMAGE_SUFFIXES

log = logging.getLogger("headstart")

#: a split's name as data sets write it → headstart's
SPLITS = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val", "test": "test"}


NO_AREA = "boxes of no area (or not numbers)"


class ConvertError(HeadstartError, ValueError):
    """The source cannot be converted as given; the message says why and what to do."""


@dataclass
class Item:
    """One image of a split: its file, its name inside the split's folders, its boxes (class, cx, cy, w, h)."""

    path: Path
    name: str
    boxes: list[tuple[int, float, float, float, float]] = field(default_factory=list)


@dataclass
class Conversion:
    source: Path
    kind: str
    out: Path
    labels: list[str]
    splits: dict[str, list[Item]]
    left_out: dict[str, list[str]] = field(default_factory=dict)  # why → what (each an image, a box, a category)

    def skip(self, why: str, what: str) -> None:
        self.left_out.setdefault(why, []).append(what)

    def to_dict(self) -> dict:
        return {
            "source": str(self.source),
            "kind": self.kind,
            "out": str(self.out),
            "data_yaml": str(self.out / "data.yaml"),
            "labels": self.labels,
            "splits": {
                split: {"images": len(items), "boxes": sum(len(i.boxes) for i in items)}
                for split, items in self.splits.items()
            },
            "left_out": {why: len(what) for why, what in self.left_out.items()},
        }

    def format(self) -> str:
        figures = ", ".join(
            f"{split} {len(items)} images ({sum(len(i.boxes) for i in items)} boxes)"
            for split, items in self.splits.items()
        )
        lines = [
            f"{self.source} ({self.kind}) -> {self.out / 'data.yaml'}: {len(self.labels)} classes, {figures}",
        ]
        for why, what in self.left_out.items():
            examples = ", ".join(what[:3]) + (" ..." if len(what) > 3 else "")
            lines.append(f"  left out: {len(what)} {why}: {examples}")
        return "\n".join(lines)


def convert(source: str | os.PathLike, out: str | os.PathLike, *, copy: bool = False) -> Conversion:
    """Write the COCO JSON or Pascal VOC data set ``source`` as a YOLO one in ``out`` (a new or empty folder; links
    to the images, or copies with ``copy``), and return what was written and what was left out."""
    source, out = Path(source), Path(out)
    if not source.exists():
        raise ConvertError(f"{source} does not exist.")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ConvertError(f"--out {out} exists and is not an empty folder; give a new one.")
    if out.resolve().is_relative_to(source.resolve()) and source.is_dir():
        raise ConvertError(f"--out {out} is inside the source {source}: give a folder beside it.")
    if _coco_files(source):
        conversion = _read_coco(source, out)
    elif _voc_root(source) is not None:
        conversion = _read_voc(_voc_root(source), out)
    else:
        raise ConvertError(
            f"{source} is neither a COCO JSON data set (annotations/instances_*.json, or _annotations.coco.json "
            "beside the images, or the JSON file) nor a Pascal VOC one (Annotations/ and JPEGImages/)."
        )
    if not any(i.boxes for i in conversion.splits.get("train", [])):
        raise ConvertError(f"{source}: no training image has a usable box ({_said(conversion)}).")
    for split in [s for s, items in conversion.splits.items() if not items]:  # every image of it left out
        conversion.skip("splits without an image left", split)
        del conversion.splits[split]
    _write(conversion, copy)
    return conversion


def _said(conversion: Conversion) -> str:
    return "; ".join(f"{len(what)} {why}" for why, what in conversion.left_out.items()) or "none left out"


# ---------------------------------------------------------------- COCO JSON


def _coco_files(source: Path) -> list[tuple[str, Path]]:
    """(split, JSON file) of a COCO data set: the file given, ``annotations/instances_SPLIT*.json`` (or any JSON in
    annotations/), ``SPLIT/_annotations.coco.json`` (Roboflow) or ``_annotations.coco.json`` (one split: train)."""
    if source.is_file():
        return [("train", source)] if source.suffix.lower() == ".json" else []
    found = sorted((source / "annotations").glob("instances_*.json")) or sorted((source / "annotations").glob("*.json"))
    files = [(_split_of(p.stem.removeprefix("instances_"), p), p) for p in found]
    files += [(_split_of(p.parent.name, p), p) for p in sorted(source.glob("*/_annotations.coco.json"))]
    if (source / "_annotations.coco.json").is_file():
        files.append(("train", source / "_annotations.coco.json"))
    return files


def _split_of(name: str, path: Path) -> str:
    """``train2017`` → train, ``valid`` → val, ...; a name that is no split is an error naming the file."""
    word = re.match(r"[a-z]*", name.lower()).group()
    if word not in SPLITS:
        raise ConvertError(
            f"{shown(path)}: cannot tell which split {name!r} is; name the files by split (train, val or valid, "
            "test), or give one JSON file (its images are then the training split)."
        )
    return SPLITS[word]


def _read_coco(source: Path, out: Path) -> Conversion:
    files = _coco_files(source)
    if len({split for split, _ in files}) < len(files):
        raise ConvertError(f"{source} holds two annotation files of one split: {', '.join(shown(p) for _, p in files)}")
    documents = {}
    for split, path in files:
        try:
            doc = json.loads(path.read_bytes())
        except (OSError, ValueError) as exc:
            raise ConvertError(f"{shown(path)} cannot be read as JSON: {exc}") from None
        if not isinstance(doc, dict) or not all(isinstance(doc.get(k), list) for k in ("images", "categories")):
            raise ConvertError(f"{shown(path)} is not a COCO annotation file (it needs 'images' and 'categories').")
        if not isinstance(doc.setdefault("annotations", []), list):
            raise ConvertError(f"{shown(path)}: 'annotations' is not a list.")
        if not all(isinstance(c, dict) and isinstance(c.get("id"), int | str) for c in doc["categories"]):
            raise ConvertError(f"{shown(path)}: every entry of 'categories' needs an 'id' (and a 'name').")
        documents[split] = (path, doc)
    categories: dict[int, str] = {}
    for path, doc in documents.values():
        for cat in doc["categories"]:
            cid, name = cat.get("id"), str(cat.get("name", ""))
            if categories.setdefault(cid, name) != name:
                raise ConvertError(f"{shown(path)}: category {cid} is {name!r} here and {categories[cid]!r} elsewhere.")
    annotations = [a for _, doc in documents.values() for a in doc["annotations"] if isinstance(a, dict)]
    used = {_id(a.get("category_id")) for a in annotations}
    ids = sorted((c for c in categories if c in used), key=_id_order)
    conversion = Conversion(source, "COCO JSON", out, [categories[c] for c in ids], {})
    for cid in sorted(set(categories) - used, key=str):
        conversion.skip("categories without a box", repr(categories[cid]))
    index = {c: i for i, c in enumerate(ids)}
    for split, (path, doc) in documents.items():
        conversion.splits[split] = _coco_split(conversion, split, path, doc, index)
    return conversion


def _id(value) -> int | str | None:
    """An id as the file gives it, where it can be one (a list or an object cannot)."""
    return value if isinstance(value, int | str) else None


def _id_order(cid) -> tuple:
    """Category ids in order: numbers by value, then any other id by its text."""
    return (0, cid, "") if isinstance(cid, int) else (1, 0, str(cid))


def _coco_split(conversion: Conversion, split: str, path: Path, doc: dict, index: dict) -> list[Item]:
    folders = _image_folders(path)
    items: dict = {}
    for image in doc["images"]:
        if not isinstance(image, dict):
            conversion.skip("entries of 'images' that are not objects", f"{split}: {str(image)[:40]}")
            continue
        name = str(image.get("file_name", ""))
        found = next((f / name for f in folders if name and (f / name).is_file()), None)
        if found is None:
            conversion.skip("images listed but not found", f"{split}/{name}")
            continue
        width, height = _size(image.get("width")), _size(image.get("height"))
        items[_id(image.get("id"))] = [Item(found, _safe_name(name)), width, height]
    for ann in doc["annotations"]:
        if not isinstance(ann, dict):
            conversion.skip("entries of 'annotations' that are not objects", f"{split}: {str(ann)[:40]}")
            continue
        entry = items.get(_id(ann.get("image_id")))
        if entry is None:
            conversion.skip("annotations of an image not found", f"{split} image {ann.get('image_id')}")
            continue
        item, width, height = entry
        if ann.get("iscrowd"):
            conversion.skip("crowd regions (iscrowd)", f"{split}/{item.name}")
            continue
        if _id(ann.get("category_id")) not in index:
            conversion.skip("annotations of an unknown category", f"{split}/{item.name}")
            continue
        if not width or not height:  # not in the file: the image says
            size = _image_size(item.path)
            if size is None:
                conversion.skip("boxes of an image that cannot be read", f"{split}/{item.name}")
                continue
            entry[1:] = width, height = size
        try:
            x, y, w, h = (float(v) for v in ann["bbox"])
        except (KeyError, TypeError, ValueError):
            conversion.skip("annotations without a [x, y, width, height] bbox", f"{split}/{item.name}")
            continue
        box = _normalised(x, y, x + w, y + h, width, height)
        if box is None:
            conversion.skip(NO_AREA, f"{split}/{item.name}")
            continue
        item.boxes.append((index[ann["category_id"]], *box))
    return _unique([item for item, _, _ in items.values()], conversion, split)


def _image_folders(path: Path) -> list[Path]:
    """Where a COCO file's ``file_name`` may be relative to: its own folder (Roboflow), then, beside it or beside its
    annotations/ folder, ``train2017/`` for ``instances_train2017.json`` (COCO's own layout), ``images/train2017/``,
    ``images/``, the folder itself."""
    stem = path.stem.removeprefix("instances_")
    folders = [path.parent]
    for base in (path.parent, path.parent.parent):
        folders += [base / stem, base / "images" / stem, base / "images", base]
    return list(dict.fromkeys(folders))


# ---------------------------------------------------------------- Pascal VOC


def _voc_root(source: Path) -> Path | None:
    """The folder holding Annotations/ and JPEGImages/: ``source``, or the one VOCdevkit/VOC20xx inside it."""
    candidates = [source, *sorted(source.glob("VOCdevkit/VOC*")), *sorted(source.glob("VOC*"))]
    return next((c for c in candidates if (c / "Annotations").is_dir() and (c / "JPEGImages").is_dir()), None)


def _read_voc(root: Path, out: Path) -> Conversion:
    import xml.etree.ElementTree as ET

    images = {p.stem: p for p in sorted((root / "JPEGImages").iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES}
    conversion = Conversion(root, "Pascal VOC", out, [], {})
    objects: dict[str, tuple[Path, list]] = {}
    for xml in sorted((root / "Annotations").glob("*.xml")):
        try:
            tree = ET.parse(xml).getroot()
        except (ET.ParseError, OSError) as exc:
            conversion.skip("annotation files that cannot be read", f"{shown(xml.name)} ({exc})")
            continue
        image = images.get(Path(tree.findtext("filename") or xml.stem).stem) or images.get(xml.stem)
        if image is None:
            conversion.skip("images listed but not found", shown(xml.name))
            continue
        found = []
        for obj in tree.iter("object"):
            if (obj.findtext("difficult") or "0").strip() == "1":
                conversion.skip("objects marked difficult", f"{image.name}")
                continue
            corners = [obj.findtext(f"bndbox/{k}") for k in ("xmin", "ymin", "xmax", "ymax")]
            name = (obj.findtext("name") or "").strip()
            if not name:
                conversion.skip("objects without a name", image.name)
                continue
            try:
                found.append((name, *(float(c) for c in corners)))
            except (TypeError, ValueError):
                conversion.skip("objects without a bndbox", image.name)
        size = [tree.findtext(f"size/{k}") for k in ("width", "height")]
        objects[xml.stem] = (image, found, size)
    conversion.labels = sorted({name for _, found, _ in objects.values() for name, *_ in found})
    index = {name: i for i, name in enumerate(conversion.labels)}
    items = {}
    for stem, (image, found, size) in objects.items():
        item = Item(image, image.name)
        width, height = _size(size[0]), _size(size[1])
        if found and (not width or not height):  # some exports write 0: the image says
            width, height = _image_size(image) or (None, None)
            if width is None:
                conversion.skip("boxes of an image that cannot be read", image.name)
                found = []
        for name, x1, y1, x2, y2 in found:
            box = _normalised(x1 - 1, y1 - 1, x2 - 1, y2 - 1, width, height)  # VOC's pixels count from 1
            if box is None:
                conversion.skip(NO_AREA, image.name)
            else:
                item.boxes.append((index[name], *box))
        items[stem] = item
    listed = {s: root / "ImageSets" / "Main" / f"{s}.txt" for s in ("train", "val", "test")}
    if not listed["train"].is_file():  # VOC2007's test set beside trainval: trainval is the training split
        listed["train"] = listed["train"].with_name("trainval.txt")
    if listed["train"].is_file():
        for split, path in listed.items():
            if path.is_file():
                stems = [line.split()[0] for line in path.read_text().splitlines() if line.strip()]
                conversion.splits[split] = [items[s] for s in stems if s in items]
                missing = [s for s in stems if s not in items]
                for stem in missing:
                    conversion.skip("images of a split list without an annotation", f"{split}/{stem}")
    else:
        conversion.splits["train"] = list(items.values())
    for split, chosen in conversion.splits.items():
        conversion.splits[split] = _unique(chosen, conversion, split)
    return conversion


# ---------------------------------------------------------------- both


def _normalised(x1: float, y1: float, x2: float, y2: float, width, height) -> tuple[float, ...] | None:
    """Pixel corners → YOLO (cx, cy, w, h) in [0, 1], clipped to the image; None for a box of no area."""
    if not all(math.isfinite(v) for v in (x1, y1, x2, y2)):
        return None
    x1, x2 = (min(max(v / width, 0.0), 1.0) for v in (x1, x2))
    y1, y2 = (min(max(v / height, 0.0), 1.0) for v in (y1, y2))
    if x2 <= x1 or y2 <= y1:
        return None
    return ((x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1)


def _size(value) -> float | None:
    """A width or height from an annotation file: a positive number, else None (the image is asked)."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number > 0 else None


def _image_size(path: Path) -> tuple[int, int] | None:
    """The image's width and height as annotation tools see it (EXIF orientation applied); None if unreadable."""
    from PIL import Image

    from headstart.service.preprocess import quarter_turned

    try:
        with Image.open(path) as img:
            width, height = img.size
            return (height, width) if quarter_turned(img) else (width, height)
    except Exception:  # not an image, damaged, too large for PIL: training's data check will say which
        return None


def _safe_name(name: str) -> str:
    """A COCO ``file_name`` as a relative path inside the split's folder (an absolute or ``..`` one: its base name)."""
    parts = Path(name).parts
    return Path(name).name if Path(name).is_absolute() or ".." in parts else name


def _unique(items: list[Item], conversion: Conversion, split: str) -> list[Item]:
    """Each label file once: ``x.jpg`` and ``x.png`` of one folder would share ``x.txt``."""
    seen, kept = set(), []
    for item in items:
        key = str(Path(item.name).with_suffix("")).casefold()
        if key in seen:
            conversion.skip(
                "images whose label file another image of the split has (same name)", f"{split}/{item.name}"
            )
            continue
        seen.add(key)
        kept.append(item)
    return kept


def _write(conversion: Conversion, copy: bool) -> None:
    out = conversion.out  # absent or empty (checked before): swapped out once the new one is written
    with written_beside(out) as tmp:
        for split, items in conversion.splits.items():
            for item in items:
                image = tmp / "images" / split / item.name
                label = (tmp / "labels" / split / item.name).with_suffix(".txt")
                image.parent.mkdir(parents=True, exist_ok=True)
                label.parent.mkdir(parents=True, exist_ok=True)
                if copy:
                    shutil.copy2(item.path, image)
                else:
                    image.symlink_to(item.path.resolve())
                label.write_text("".join(f"{c} {cx:.6f} {cy:.6f} {w:.6f} {h:.6f}\n" for c, cx, cy, w, h in item.boxes))
        spec = {
            "path": ".",
            **{s: f"images/{s}" for s in conversion.splits},
            "names": dict(enumerate(conversion.labels)),
        }
        header = f"# written by `headstart convert` from {conversion.source} ({conversion.kind})\n"
        (tmp / "data.yaml").write_text(header + yaml.safe_dump(spec, sort_keys=False, allow_unicode=True))
    log.debug("converted %s -> %s", conversion.source, out)
