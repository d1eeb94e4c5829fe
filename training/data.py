"""What every task's data check shares: the error a data set gets, and the check of one file."""

from __future__ import annotations

import hashlib
from pathlib import Path

from service.errors import HeadstartError
from service.preprocess import IMAGE_SUFFIXES, ImageError, decode_image


class DatasetError(HeadstartError, ValueError):
    """The data set cannot be trained on as it is; the message names the problem and the fix."""


def check_file(path: Path) -> tuple[str, str]:
    """Decode a file fully. Returns ("ok", sha256), ("ignored", reason) or ("corrupt", reason)."""
    data = path.read_bytes()
    looks_like_image = path.suffix.lower() in IMAGE_SUFFIXES
    try:
        decode_image(data, min_side=1)  # a JPEG at 1/8 scale: every byte is still decoded (truncation shows)
    except ImageError as exc:
        if not looks_like_image and "not an image format" in str(exc):
            return "ignored", "not an image"
        return "corrupt", str(exc)
    return "ok", hashlib.sha256(data).hexdigest()
