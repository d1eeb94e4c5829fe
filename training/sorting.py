"""Images sorted into a folder per answer (`headstart predict MODEL photos/ --sort-into sorted/`): each image linked
(or copied) into ``sorted/CLASS/``, ``sorted/none-of-these/`` where the model says it is none of its classes, and for
a multi-label model into the folder of each label it holds (``sorted/no-label/`` for none). The result has the
layout of a classifier's data set: the folders can be looked through, put right, and trained on.

Torch-free (a bundle sorts without it); :meth:`headstart.predicting.LoadedModel.answers` calls it per answer.
"""

from __future__ import annotations

import errno
import filecmp
import io
import os
import shutil
from pathlib import Path
from urllib.parse import unquote, urlsplit

from headstart.service.errors import HeadstartError
from headstart.service.files import is_url
from headstart.service.formats import IMAGE_SUFFIXES

#: the folder of the images a model calls "none of these", and of a multi-label model's images holding no label
NONE_OF_THESE, NO_LABEL = "none-of-these", "no-label"
#: the errors of a file system that cannot hold symbolic links (FAT and exFAT drives, some network shares)
NO_LINKS = {errno.EPERM, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS, errno.EINVAL}


class SortError(HeadstartError, ValueError):
    """The images cannot be sorted as asked; the message says what to change."""


def sort_folder(task: str, labels: list[str], into: str | os.PathLike | None, copy: bool) -> Path | None:
    """The folder images are sorted into, made; refused at once for a detector (its answer is boxes, not a class)
    and for a model with a class named as one of the folders of no class."""
    if into is None:
        if copy:
            raise SortError("copy is for sorting the images (--sort-into DIR): add it, or leave copy out.")
        return None
    if task == "detect":
        raise SortError(
            "--sort-into sorts images by their class; a detector answers boxes. Use --json for its boxes, or a "
            "classifier (a multi-label one sorts an image into the folder of each class it holds)."
        )
    taken = sorted({folder_name(label) for label in labels} & {NONE_OF_THESE, NO_LABEL})
    if taken:
        raise SortError(
            f"The model has a class named {taken[0]!r}, the folder --sort-into keeps for images of no class: sort "
            "with `headstart predict --json` and a script instead."
        )
    folder = Path(into)
    if folder.exists() and not folder.is_dir():
        raise SortError(f"--sort-into {folder} is a file: name a folder (it is made if missing).")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def folder_name(label: str) -> str:
    """A class's folder: its name, with path separators and characters no file system takes replaced."""
    name = "".join("_" if c in '/\\:*?"<>|' or ord(c) < 32 else c for c in label).strip()
    return "_" if name in ("", ".", "..") else name


def inside(item, folder: Path) -> bool:
    """Whether ``item`` (an input) is a file inside ``folder``: the images a previous sort wrote there, left out of
    a new sort of the folder above it."""
    if not isinstance(item, str | os.PathLike) or is_url(os.fspath(item)):
        return False
    path = Path(item)  # its folder resolved, not the file: a link the sort made points out of the folder
    return (path.parent.resolve() / path.name).is_relative_to(folder.resolve())


def folders_of(answer) -> list[str]:
    """The folders an answer sorts its image into: ``none-of-these``, the class, or each label (``no-label``)."""
    if answer.unknown:
        return [NONE_OF_THESE]
    return [folder_name(p.label) for p in answer.labels] or [NO_LABEL]


def file_image(answer, item, data: bytes | None, folder: Path, copy: bool, index: int) -> list[Path] | None:
    """Put the image of ``answer`` into its folders under ``folder``: a link to the file (``copy``: a copy of it), or
    for a URL the bytes read from it. Returns the files (None for an image given in memory: there is no file to
    sort). A name taken by another image gets -2, -3, ...; the same image sorted again (a rerun) is left as it is."""
    if data is not None:  # an http(s) URL: its bytes
        name = _url_name(os.fspath(item), data, index)
    elif isinstance(item, str | os.PathLike):
        name = Path(item).name
    else:
        return None
    written = []
    for sub in folders_of(answer):
        target = folder / sub
        target.mkdir(exist_ok=True)
        written.append(_place(target, name, None if data is not None else Path(item), data, copy))
    return written


#: the longest file name (in bytes) most file systems take: ext4, XFS, APFS, NTFS (255 UTF-16 units)
NAME_BYTES = 255


def fitted(stem: str, tail: str) -> str:
    """``stem + tail``, the stem cut (at a character) so that the name fits in :data:`NAME_BYTES` bytes of UTF-8:
    an image named with 250 bytes got no heatmap ("File name too long") once ``.heatmap.jpg`` was added."""
    room = NAME_BYTES - len(tail.encode())
    if len(stem.encode("utf-8", "surrogateescape")) <= room:
        return stem + tail
    return stem.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore") + tail


def _place(target: Path, name: str, source: Path | None, data: bytes | None, copy: bool) -> Path:
    """``source`` (or ``data``) as ``target/name``, or ``name`` with -2, -3, ... where another image has it (the
    stem cut where the number would make the name too long: :func:`fitted`)."""
    stem, suffix = Path(name).stem, Path(name).suffix
    real = source.resolve() if source is not None else None
    for n in range(1, 10_000):
        path = target / (name if n == 1 else fitted(stem, f"-{n}{suffix}"))
        if path.is_symlink() or path.exists():
            if _same(path, real, data, copy):
                return path
            continue
        if data is not None:
            path.write_bytes(data)
        elif copy:
            shutil.copy2(real, path)
        else:
            try:
                path.symlink_to(real)
            except OSError as exc:
                if exc.errno in NO_LINKS:
                    raise SortError(
                        f"{target} cannot hold links to the images ({exc.strerror}; a FAT or exFAT drive, or a share "
                        "without them): add --copy to copy the images instead."
                    ) from exc
                raise
        return path
    raise SortError(f"{target} holds 10,000 images named like {name}: sort into a new folder.")


def _same(path: Path, real: Path | None, data: bytes | None, copy: bool) -> bool:
    """Whether ``path`` already is this image as this sort would write it (a link to it, or the same bytes)."""
    if path.is_symlink():
        return not copy and real is not None and Path(os.readlink(path)) == real
    if not path.is_file():
        return False
    if data is not None:
        return path.stat().st_size == len(data) and path.read_bytes() == data
    return copy and filecmp.cmp(path, real, shallow=False)


def _url_name(url: str, data: bytes, index: int) -> str:
    """A file name for an image read from ``url``: its path's last part (``.../cat.jpg?w=800``: cat.jpg), with the
    extension of its format where that part has none of an image's."""
    name = Path(unquote(urlsplit(url).path)).name or f"image-{index}"
    name = folder_name(name)
    if Path(name).suffix.lower() not in IMAGE_SUFFIXES:
        from PIL import Image

        try:
            with Image.open(io.BytesIO(data)) as img:
                kind = (img.format or "").lower()
        except Exception:  # the image was decoded already; a name is all that is asked here
            kind = ""
        name += {"jpeg": ".jpg", "mpo": ".jpg", "": ".jpg"}.get(kind, f".{kind}")
    return name
