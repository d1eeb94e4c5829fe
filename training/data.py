"""What every task's data check shares: the error a data set gets, the check of one file, and the images checked
by an earlier run."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import threading
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING, Any

from headstart.service.errors import HeadstartError
from headstart.service.files import FileProblem, read_image_file, shown
from headstart.service.formats import IMAGE_SUFFIXES, converted
from headstart.service.preprocess import ImageError, decode_image

if TYPE_CHECKING:
    from headstart.features import DecodedImages

log = logging.getLogger(__name__)


class DatasetError(HeadstartError, ValueError):
    """The data set cannot be trained on as it is; the message names the problem and the fix."""


def check_file(
    path: Path, verified: VerifiedImages | None = None, decoded: DecodedImages | None = None
) -> tuple[str, str]:
    """Decode a file fully. Returns ("ok", sha256), ("ignored", reason) or ("corrupt", reason).

    What the file is comes first (service/files.py): FIFOs, devices, dangling links, loops, unreadable files and
    names that are not UTF-8 are skipped with the reason, a file over the size limit is not read at all (and is
    "ignored" when its name does not say it is an image, e.g. a video). Bytes that ``verified`` holds (read whole
    by an earlier check, with the same decoding) are not decoded again; those read whole now are added to it.
    With ``decoded`` (a training's or an evaluation's, while it has room) an image is decoded as the model will
    read it and kept there for the model's pass, which then does not decode it again; otherwise a JPEG is decoded at
    1/8 scale, the cheapest (every byte is still decoded either way: a truncation shows).
    """
    looks_like_image = path.suffix.lower() in IMAGE_SUFFIXES
    try:
        data = read_image_file(path)
        sha256 = hashlib.sha256(data).hexdigest()
        if verified is None or sha256 not in verified:
            if decoded is not None and not decoded.full:
                decoded.keep(path, decoded.decode(data))
            else:
                decode_image(data, min_side=1)
            if verified is not None:
                verified.add(sha256)
    except FileProblem as exc:
        if not looks_like_image and exc.too_large:
            return "ignored", "not an image (not read: too large)"
        return "corrupt", str(exc)
    except ImageError as exc:
        if not looks_like_image and "not an image format" in str(exc):
            return "ignored", not_an_image(path)
        return "corrupt", str(exc)
    return "ok", sha256


def not_an_image(path: Path) -> str:
    """The reason a file that is not an image is ignored, with what to do where it is a picture in another form."""
    kind = converted(path)
    return "not an image" if kind is None else f"{kind[0]}, not read: {kind[2]}"


def conversions_needed(ignored: list[tuple[str, str]]) -> str:
    """For a data set with too few images: the ignored files that are pictures in another form, counted by kind,
    with what to do ('' where there are none): 6 .NEF photos were "not an image" and the error said only "Found 0
    class(es) with images"."""
    kinds: dict[tuple[str, str, str], int] = {}
    for path, _ in ignored:
        kind = converted(Path(path))
        if kind is not None:
            kinds[kind] = kinds.get(kind, 0) + 1
    return " ".join(
        f"Of the files ignored, {n} {f'are {many}' if n > 1 else f'is {one}'}: {how}."
        for (one, many, how), n in kinds.items()
    )


def same_bytes(splits: dict[str, list]) -> list[list[tuple[str, Any]]]:
    """The samples (of any task: each with a ``sha256`` of its image) whose images are identical, across all splits:
    groups of two or more, each (split, sample) in the order read."""
    by_bytes: dict[str, list[tuple[str, Any]]] = {}
    for split, samples in splits.items():
        for sample in samples:
            by_bytes.setdefault(sample.sha256, []).append((split, sample))
    return [group for group in by_bytes.values() if len(group) > 1]


class VerifiedImages:
    """The images (by the sha256 of their bytes) that this decoding has read in an earlier data check. The check
    decodes every file (an 8 MP JPEG: 10-15 ms, even at 1/8 scale); a run on the same photos again with other options,
    its features in the cache, decoded most of them for nothing else: now it decodes none that were read before.

    One line per image in ``ROOT/verified-KEY.txt`` (ROOT: the feature cache), KEY naming what decides whether a file
    can be read: headstart's decoding code (the source of ``service/preprocess.py`` and ``service/formats.py``),
    Pillow's and pillow-heif's versions, the formats read and the limits (:func:`decoding_key`); a change of any gives
    another file, so every image is checked again. Only images that were read are kept: a file that failed is checked
    every time. Lines are appended (runs may share the cache); a line that is not a sha256 is passed over, and a cache
    that cannot be read or written only costs the decoding."""

    def __init__(self, root: str | Path) -> None:
        from headstart.features import VERIFIED_NOTES, mark_used  # the feature cache's (torch comes with it)

        self.path = Path(root) / VERIFIED_NOTES.format(key=decoding_key())
        self._known: set[str] = set()
        self._new: list[str] = []
        self._lock = threading.Lock()
        try:
            with self.path.open(encoding="ascii", errors="replace") as f:
                self._known = {line.strip() for line in f if _SHA256.fullmatch(line.strip())}
        except OSError:  # none yet, or unreadable: every image is decoded
            return
        mark_used(self.path)  # `headstart cache` keeps it as long as the features read with it

    def __contains__(self, sha256: str) -> bool:
        return sha256 in self._known

    def __len__(self) -> int:
        return len(self._known)

    def add(self, sha256: str) -> None:
        with self._lock:
            if sha256 not in self._known:
                self._known.add(sha256)
                self._new.append(sha256)

    def save(self) -> None:
        """Append the images added since the last save (one write, so that runs sharing the cache do not mix their
        lines)."""
        with self._lock:
            new, self._new = self._new, []
        if not new:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, "".join(f"{sha}\n" for sha in new).encode("ascii"))
            finally:
                os.close(fd)
        except OSError as exc:
            log.warning("could not note the checked images in %s (%s): the next run checks them again", self.path, exc)


_SHA256 = re.compile(r"[0-9a-f]{64}")


def decoding_key() -> str:
    """What decides whether an image can be read, as a short hash (:class:`VerifiedImages`)."""
    from importlib import metadata

    import PIL

    from headstart.service import formats, preprocess

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    def source(module) -> str:
        try:
            return hashlib.sha256(Path(module.__file__).read_bytes()).hexdigest()
        except (OSError, TypeError):  # no source beside it (an unusual installation): its name stands for it
            return module.__name__

    parts = {
        "code": [source(m) for m in (preprocess, formats)],
        "pillow": PIL.__version__,
        "pillow_heif": version("pillow-heif"),
        "formats": list(formats.allowed_formats()),
        "limits": [preprocess.MAX_IMAGE_PIXELS, formats.MAX_DECODE_BYTES],
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def verified_images(cfg) -> VerifiedImages | None:
    """The images checked earlier, in the run's feature cache (``--cache-dir``); None with ``--no-cache`` or where
    no cache can be written (:func:`headstart.features.cache_root`)."""
    from headstart.features import cache_root

    root = cache_root(cfg)
    return None if root is None else VerifiedImages(root)


#: where a data check's lists and counts are whole, for the lines that print some of them
WHOLE_REPORT = "all in the run's data_report.json, or the evaluation's metrics.json"


def listed(entries: list, limit: int = 20) -> list:
    """The first ``limit`` entries of a report's list (a data set can hold 10,000 corrupt files): the rest are
    counted in the line that follows, and all of them are in the report written (:data:`WHOLE_REPORT`)."""
    return entries[:limit]


def more_line(entries: list, limit: int = 20, indent: str = "    ") -> list[str]:
    return [f"{indent}... and {len(entries) - limit} more ({WHOLE_REPORT})"] if len(entries) > limit else []


#: rows a data check's table prints at most: beyond, the rows with the fewest images of the first split (where a
#: data set needs attention) and a line for the rest, whose counts are in the report written (:data:`WHOLE_REPORT`)
TABLE_ROWS = 30


def count_table(
    header: str, plural: str, rows: list[str], counts: dict[str, dict[str, int]], total: tuple[str, list[int]]
) -> list[str]:
    """A data check's table: a row per class (or label) with its count in each split (``counts[split][row]``), and
    the ``total`` row (its name, a count per split); aligned in terminal columns (:func:`columns`). Of more than
    :data:`TABLE_ROWS` rows, the :data:`TABLE_ROWS` - 10 with the fewest images in the first split are printed and
    one line sums up the others (150 classes printed 150 lines before training started)."""
    splits = list(counts)
    fewest = set(rows)
    if len(rows) > TABLE_ROWS:
        first = counts[splits[0]]
        fewest = set(sorted(rows, key=lambda r: first.get(r, 0))[: TABLE_ROWS - 10])
    shown = [r for r in rows if r in fewest]
    width = max([columns(x) for x in [*shown, header, total[0]]]) + 2
    lines = ["  " + ljust(header, width) + "".join(s.rjust(8) for s in splits)]
    lines += ["  " + ljust(r, width) + "".join(str(counts[s].get(r, 0)).rjust(8) for s in splits) for r in shown]
    if len(shown) < len(rows):
        rest = [r for r in rows if r not in fewest]
        spans = {s: sorted({counts[s].get(r, 0) for r in rest}) for s in splits}
        ranges = ", ".join(f"{s} {v[0]}" + (f"-{v[-1]}" if len(v) > 1 else "") for s, v in spans.items())
        lines.append(f"  ... and {len(rest)} more {plural} ({ranges} each; {WHOLE_REPORT})")
    lines.append("  " + ljust(total[0], width) + "".join(str(n).rjust(8) for n in total[1]))
    return lines


def some(names: list[str], limit: int = 10) -> str:
    """The first ``limit`` of ``names``, comma-separated, and how many more: a warning naming 150 classes ran to
    2,400 characters on one line."""
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def columns(text: str) -> int:
    """The columns ``text`` takes in a terminal: a wide or full-width character (Chinese, Japanese, Korean) two, a
    combining mark none (``len`` counted 蜜蜂 as 2 of its 4, and the counts after it stood two columns off)."""
    return sum(0 if unicodedata.combining(c) else 2 if unicodedata.east_asian_width(c) in "WF" else 1 for c in text)


def ljust(text: str, width: int) -> str:
    """``text`` padded with spaces to ``width`` terminal columns (:func:`columns`)."""
    return text + " " * (width - columns(text))


def rjust(text: str, width: int) -> str:
    return " " * (width - columns(text)) + text


#: archives a data set is downloaded as (Kaggle, Roboflow, a colleague's mail), by how their names end
ARCHIVES = (".zip", ".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".7z", ".rar")


def not_a_folder(path: str | Path, what: str = "Data folder") -> str:
    """Why ``path`` cannot be read as a data set's folder, and what to do: it does not exist, it is an archive to
    unpack first (``unzip x.zip -d x``; headstart reads folders), or it is another file."""
    url = re.match(r"([a-z][a-z0-9+.-]*):/+(.*)", os.fspath(path), re.IGNORECASE)
    if url and url.group(1).lower() in ("http", "https", "s3", "gs", "ftp") and not Path(path).exists():
        # a Kaggle or Roboflow link ("https:/..." once a Path joined its slashes): not a folder of this machine
        scheme, link = url.group(1).lower(), f"{url.group(1)}://{url.group(2)}".rstrip("/")
        name = link.rsplit("/", 1)[-1].split("?")[0] or "data"
        curl = f"curl -L -o {name} '{link}'"
        fetch = {"s3": f"aws s3 sync {link} {name}", "gs": f"gcloud storage cp -r {link} ."}.get(scheme, curl)
        return (
            f"{what} {link} is a URL: headstart reads a folder on this machine. Download it first ({fetch}), unpack "
            "it if it is an archive, and give the folder."
        )
    path = Path(path)
    name = path.name.lower()
    archive = next((suffix for suffix in ARCHIVES if name.endswith(suffix)), None)
    if not path.exists():
        return f"{what} {shown(path)} does not exist."
    if archive is not None and path.is_file():
        folder, file = shown(path.with_name(path.name[: -len(archive)] or "data")), shown(path)
        how = {".zip": f"unzip {file} -d {folder}", ".7z": f"7z x {file} -o{folder}", ".rar": f"7z x {file} -o{folder}"}
        command = how.get(archive, f"mkdir {folder} && tar -xf {file} -C {folder}")
        return (
            f"{file} is an archive ({archive}): unpack it first ({command}) and give the folder of the data set it "
            "holds."
        )
    return f"{what} {shown(path)} is a file, not a folder."


def foreign_layout(root: Path) -> str | None:
    """What to do where ``root`` is a detection data set in a format headstart trains on only once converted, which
    the class-folder scan would take for classes (COCO's annotations/ and train2017/ as two "classes", one of them
    empty; a Roboflow COCO export's train/ as images without classes): COCO JSON or Pascal VOC. None otherwise."""
    patterns = ("annotations/instances_*.json", "_annotations.coco.json", "*/_annotations.coco.json")
    coco = sorted(p for pattern in patterns for p in root.glob(pattern))
    if coco:
        kind, found = "COCO JSON", coco[0]
    elif (root / "Annotations").is_dir() and (root / "JPEGImages").is_dir():
        kind, found = "Pascal VOC", root / "Annotations"
    else:
        return None
    named = root.absolute()  # `headstart train .` inside it: a name to put -yolo after
    yolo = shown(named.with_name(f"{named.name}-yolo")) if named.name else "yolo-data"
    return (
        f"{root} holds a {kind} detection data set ({shown(found)}): headstart trains a detector on YOLO data (a "
        f"data.yaml naming the classes and the image folders, a labels/*.txt per image). Convert it: headstart "
        f"convert {shown(root)} --out {yolo} (the images linked, not copied), then train on {yolo}. To classify "
        "images instead, give a folder with one subfolder of images per class."
    )
