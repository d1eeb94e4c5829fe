"""What every task's data check shares: the error a data set gets, and the check of one file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from headstart.service.errors import HeadstartError
from headstart.service.files import FileProblem, read_image_file
from headstart.service.formats import IMAGE_SUFFIXES
from headstart.service.preprocess import ImageError, decode_image


class DatasetError(HeadstartError, ValueError):
    """The data set cannot be trained on as it is; the message names the problem and the fix."""


def check_file(path: Path) -> tuple[str, str]:
    """Decode a file fully. Returns ("ok", sha256), ("ignored", reason) or ("corrupt", reason).

    What the file is comes first (service/files.py): FIFOs, devices, dangling links, loops, unreadable files and
    names that are not UTF-8 are skipped with the reason, a file over the size limit is not read at all (and is
    "ignored" when its name does not say it is an image, e.g. a video).
    """
    looks_like_image = path.suffix.lower() in IMAGE_SUFFIXES
    try:
        data = read_image_file(path)
        decode_image(data, min_side=1)  # a JPEG at 1/8 scale: every byte is still decoded (truncation shows)
    except FileProblem as exc:
        if not looks_like_image and exc.too_large:
            return "ignored", "not an image (not read: too large)"
        return "corrupt", str(exc)
    except ImageError as exc:
        if not looks_like_image and "not an image format" in str(exc):
            return "ignored", "not an image"
        return "corrupt", str(exc)
    return "ok", hashlib.sha256(data).hexdigest()


def listed(entries: list, limit: int = 20) -> list:
    """The first ``limit`` entries of a report's list (a data set can hold 10,000 corrupt files): the rest are
    counted in the line that follows, and all of them are in the run's data_report.json."""
    return entries[:limit]


def more_line(entries: list, limit: int = 20, indent: str = "    ") -> list[str]:
    return (
        [f"{indent}... and {len(entries) - limit} more (all in the run's data_report.json)"]
        if len(entries) > limit
        else []
    )
