"""Reading an image file a user named (a data set, a batch job's list): what it is is looked at before it is read.

``Path.read_bytes`` on whatever a folder or a list holds reads ``/dev/zero`` until memory runs out, blocks for ever
on a FIFO, reads a 1 GiB video whole, and raises a traceback on a dangling link, a symlink loop or an unreadable file;
a file name that is not UTF-8 cannot be written to JSON or a Parquet string column. :func:`read_image_file` returns
the bytes of a regular file within :data:`MAX_FILE_BYTES`, or raises :class:`FileProblem` saying what the file is and
what to do; :func:`shown` writes any path as printable text. Training's data check, evaluation and ``predict-batch``
all read through here. :func:`read_image` also reads http(s) URLs (`headstart predict`, ``predict-batch``), within the
same size and :data:`SETTINGS.url_timeout`; the HTTP service reads none.
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
#: the URLs :func:`read_image` fetches itself (``predict-batch`` opens the others with pyarrow's file systems)
WEB = ("http://", "https://")


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


def is_url(source: str | os.PathLike) -> bool:
    """``source`` names a URL (a scheme and ``://``) rather than a file on this machine."""
    return isinstance(source, str) and bool(_URL.match(source))


def read_image(source: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of an image file on this machine or at an http(s) URL, or :class:`FileProblem`."""
    if isinstance(source, str) and source.lower().startswith(WEB) and not os.path.exists(source):
        return read_image_url(source, max_bytes)
    return read_image_file(source, max_bytes)


def read_image_url(url: str, max_bytes: int = MAX_FILE_BYTES, timeout: float | None = None) -> bytes:
    """The body of an http(s) ``url`` (redirects followed), within ``max_bytes`` and ``timeout`` seconds for the whole
    of it (HEADSTART_URL_TIMEOUT), or :class:`FileProblem` saying what the server did. A web page where an image
    was expected is named as such: its address is usually the page's, not the image's."""
    import http.client
    import time
    import urllib.error
    import urllib.request

    timeout = SETTINGS.url_timeout if timeout is None else timeout
    if not url.lower().startswith(WEB):
        raise FileProblem("Only http:// and https:// URLs are read here; download the file first.")
    if not utf8_name(url):
        raise FileProblem(f"The URL {shown(url)!r} is not UTF-8 text.")
    deadline = time.monotonic() + timeout
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "headstart", "Accept": "image/*,*/*;q=0.5"})
        with urllib.request.urlopen(request, timeout=timeout) as response:
            kind = response.headers.get_content_type()
            if kind.startswith("text/") or kind in ("application/json", "application/xhtml+xml"):
                raise FileProblem(
                    f"The URL gives {kind}, not an image: a web page's address rather than its image's? Give the "
                    "image's own address (in a browser: right-click the image, Copy image address)."
                )
            length = response.headers.get("Content-Length", "")
            if length.isdigit() and int(length) > max_bytes:
                raise FileProblem(too_large_message(int(length), max_bytes), too_large=True)
            chunks, size = [], 0
            while chunk := response.read1(1 << 20):  # what has arrived (read() waits for all 1 MiB)
                size += len(chunk)
                if size > max_bytes:
                    raise FileProblem(too_large_message(size, max_bytes), too_large=True)
                if time.monotonic() > deadline:
                    raise TimeoutError
                chunks.append(chunk)
            return b"".join(chunks)
    except FileProblem:
        raise
    except urllib.error.HTTPError as exc:
        raise FileProblem(f"The server answered {exc.code} {exc.reason} for this URL.") from None
    except urllib.error.URLError as exc:
        reason = exc.reason.strerror if isinstance(exc.reason, OSError) and exc.reason.strerror else exc.reason
        if isinstance(exc.reason, TimeoutError):
            reason = f"no answer within {timeout:g} s (HEADSTART_URL_TIMEOUT)"
        raise FileProblem(
            f"The URL cannot be read: {reason}. Check it, the network and any proxy (HTTPS_PROXY)."
        ) from None
    except TimeoutError:
        raise FileProblem(
            f"The URL's file did not arrive within {timeout:g} s (HEADSTART_URL_TIMEOUT); download it first, or raise "
            "the timeout."
        ) from None
    except (OSError, http.client.HTTPException, ValueError) as exc:  # reset, cut short, not a valid URL
        said = f": {exc}" if str(exc) else ""
        raise FileProblem(f"The URL cannot be read: {type(exc).__name__}{said}.") from None


def read_image_file(path: str | Path, max_bytes: int = MAX_FILE_BYTES) -> bytes:
    """The bytes of the regular file ``path`` (links followed), or :class:`FileProblem`."""
    if not utf8_name(path):
        raise FileProblem(f"The file name {shown(path)!r} is not UTF-8; rename the file.")
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if _URL.match(os.fspath(path)):
            raise FileProblem(
                "This is a URL, not a file on this machine: headstart predict reads http(s) URLs, predict-batch "
                "those and s3://, gs://, hdfs://; training and evaluation read files. Download it first (for example "
                "curl -LO URL) and give the file."
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
                raise FileProblem(too_large_message(size, max_bytes), too_large=True)
            chunks.append(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise FileProblem(f"The file cannot be read ({exc.strerror}).") from None
    finally:
        os.close(fd)


def too_large_message(size: int, max_bytes: int) -> str:
    return (
        f"The file is {size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB an image file may be "
        "(HEADSTART_MAX_FILE_BYTES). Downscale or re-compress it."
    )


def _check_kind(info: os.stat_result, max_bytes: int) -> None:
    if not stat.S_ISREG(info.st_mode):
        kind = _KINDS.get(stat.S_IFMT(info.st_mode), "not a regular file")
        raise FileProblem(f"The path is {kind}, not a regular file.")
    if info.st_size > max_bytes:
        raise FileProblem(too_large_message(info.st_size, max_bytes), too_large=True)


def delimiter(header_line: str) -> str:
    """What separates a CSV's cells, as its header row shows: a comma, else a semicolon (what Excel writes where the
    comma is the decimal mark: German, French, ...), else a tab."""
    return next((d for d in (",", ";", "\t") if d in header_line), ",")


def text_of(data: bytes, errors: str = "strict", utf16_errors: str | None = None) -> str:
    """Text as Windows and the rest save it: UTF-16 where it starts with a byte-order mark (PowerShell 5, Excel's
    "Unicode Text"), else UTF-8 with or without one (Notepad's); ``errors`` as ``bytes.decode`` takes them, for UTF-16
    ``utf16_errors`` where given (surrogateescape has nothing to keep there)."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        return data.decode("utf-16", utf16_errors or errors)
    return data.decode("utf-8-sig", errors)


def list_text(path: str | Path) -> str:
    """A list's text (:func:`text_of`), bytes that are not UTF-8 kept as surrogates (a name that is not UTF-8: its
    image's error says so). A byte-order mark was read as part of the first path ("does not exist"), and UTF-16 as no
    path at all."""
    return text_of(Path(path).read_bytes(), "surrogateescape", utf16_errors="replace")


def listed_images(path: str | Path) -> list[str]:
    """The images a .txt list names: one path or URL per line, blank lines and ``#`` comments left out (a name that
    is not UTF-8 kept as its bytes: its image's error says so); a relative path from here, else beside the list
    (:func:`list_text` reads it)."""
    lines = list_text(path).splitlines()
    return _beside(path, [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")])


def _beside(listing: str | Path, names: list[str]) -> list[str]:
    """``names`` from the list ``listing``, a relative path that names no file from here but one beside the list
    (``train/1.jpg`` in ``data/labels.csv``, run from elsewhere) made that file's path; the others as written (a
    path that works from here, an absolute path, a URL: what a job's output then shows)."""
    folder = Path(listing).parent
    if folder.resolve() == Path.cwd().resolve():
        return names
    out = []
    for name in names:
        if not is_url(name) and not os.path.isabs(name) and not os.path.lexists(name):
            there = folder / name
            name = str(there) if os.path.lexists(there) else name
        out.append(name)
    return out


#: the column of a .csv (or .parquet) list that names the images, by the names tables give it (else the first column)
LIST_COLUMNS = ("path", "image", "url", "uri", "image_url", "image_path", "filename", "file_name", "file")


def table_images(path: str | Path) -> list[str]:
    """The images a .csv list names: a header row, then one image per row in the column named ``path`` (or another of
    :data:`LIST_COLUMNS`' names, else the first), its cells separated by a comma, a semicolon or a tab
    (:func:`delimiter`); rows with an empty cell there are left out. ValueError naming the line where a row has no
    such cell or the file is not a CSV. A relative path is read from here, else beside the list (:func:`_beside`)."""
    import csv
    import io

    with io.StringIO(list_text(path), newline="") as f:
        separator = delimiter(f.readline())
        f.seek(0)
        reader = csv.reader(f, delimiter=separator)
        try:
            header = next(reader, None)
            if not header or not any(cell.strip() for cell in header):
                raise ValueError(f"{path} is empty: a .csv list has a header row (path, ...) and one image per row.")
            named = [cell.strip().lower() for cell in header]
            column = next((named.index(c) for c in LIST_COLUMNS if c in named), 0)
            out = []
            for row in reader:
                if not any(cell.strip() for cell in row):
                    continue  # a blank line
                if len(row) <= column:
                    raise ValueError(
                        f"{path}, line {reader.line_num}: the row has no {header[column].strip()!r} cell (column "
                        f"{column + 1}). Give each row its image there."
                    )
                if row[column].strip():
                    out.append(row[column].strip())
            return _beside(path, out)
        except csv.Error as exc:  # a cell over csv's size limit (131,072 characters)
            raise ValueError(f"{path}, line {reader.line_num}: not a CSV this list can be read from ({exc}).") from None


def image_paths(source: str) -> list[str] | None:
    """The images a folder (recursively, by image suffix; FIFOs and links with an image's name included, to be
    reported) or a glob names, in a fixed order; None when ``source`` is neither (a file, a list, a URI). A file
    whose name holds ``[``, ``*`` or ``?`` (``photo [1].jpg``) is that file, not a glob."""
    from .formats import IMAGE_SUFFIXES

    path = Path(source)
    if path.is_dir():
        return sorted(str(p) for p in path.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and not p.is_dir())
    if os.path.lexists(source) or is_url(source):
        return None
    if any(ch in source for ch in "*?["):
        return sorted(p for p in glob.glob(source, recursive=True) if not Path(p).is_dir())
    return None
