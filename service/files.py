"""Reading an image file a user named (a data set, a batch job's list): what it is is looked at before it is read.

``Path.read_bytes`` on whatever a folder or a list holds reads ``/dev/zero`` until memory runs out, blocks for ever
on a FIFO, reads a 1 GiB video whole, and raises a traceback on a dangling link, a symlink loop or an unreadable file;
a file name that is not UTF-8 cannot be written to JSON or a Parquet string column. :func:`read_image_file` returns
the bytes of a regular file within :data:`MAX_FILE_BYTES`, or raises :class:`FileProblem` saying what the file is and
what to do; :func:`shown` writes any path as printable text. Training's data check, evaluation and ``predict-batch``
all read through here.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import stat
from pathlib import Path

from .preprocess import ImageError
from .settings import SETTINGS

#: Largest image file read (HEADSTART_MAX_FILE_BYTES): an uncompressed 64 MP TIFF is 192 MB.
MAX_FILE_BYTES = SETTINGS.max_file_bytes
_KINDS = {
    stat.S_IFIFO: "a FIFO (named pipe)",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFSOCK: "a socket",
    stat.S_IFDIR: "a folder",
}


#: a URL (https://, s3://, ...) given where a file is read: the message says so rather than "does not exist"
_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


class FileProblem(ImageError):
    """The file cannot be used as an image file at all (what it is, its size, its name, or reading it failed)."""

    def __init__(self, message: str, *, too_large: bool = False) -> None:
        super().__init__(message)
        self.too_large = too_large


def shown(path: str | Path) -> str:
    """``path`` as printable UTF-8 text: bytes of a name that are not UTF-8 as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def utf8_name(path: str | Path) -> bool:
    try:
        str(path).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_image_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (links followed), or :class:`FileProblem`."""
    if not utf8_name(path):
        raise FileProblem(f"The file name {shown(path)!r} is not UTF-8; rename the file.")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if _URL.match(os.fspath(path)):
            raise FileProblem(
                "This is a URL, not a file: headstart reads image files on this machine. Download it first (for "
                "example curl -LO URL) and give the file."
            ) from None
        raise FileProblem("The file does not exist (deleted, or a link to nothing).") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise FileProblem("The path is a loop of symbolic links.") from None
        raise FileProblem(f"The file cannot be read ({exc.strerror}).") from None
    _check_kind(info, max_bytes)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)  # a FIFO put in its place since the stat cannot block
    except OSError as exc:
        raise FileProblem(f"The file cannot be read ({exc.strerror}).") from None
    try:
        _check_kind(os.fstat(fd), max_bytes)
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise FileProblem(_too_large(size, max_bytes), too_large=True)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise FileProblem(f"The file cannot be read ({exc.strerror}).") from None
    finally:
        os.close(fd)


def _too_large(size: int, max_bytes: int) -> str:
    return (
        f"The file is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB an image file may be "
        "(HEADSTART_MAX_FILE_BYTES). Downscale or re-compress it."
    )


def _check_kind(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise FileProblem(f"The path is {kind}, not a regular file.")
    if info.st_size > max_bytes:
        raise FileProblem(_too_large(info.st_size, max_bytes), too_large=True)


def image_paths(source: str) -> list[str] | None:
    """The images a folder (recursively, by image suffix; FIFOs and links with an image's name included, to be
    reported) or a glob names, in a fixed order; None when ``source`` is neither (a file, a list, a URI)."""
    from .formats import IMAGE_SUFFIXES

    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if any(ch in source for ch in "*?["):
        return sorted(p for p in glob.glob(source, recursive=True) if not Path(p).is_dir())
    return None
