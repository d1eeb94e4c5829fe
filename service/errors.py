"""The one base class of every error headstart reports to its user (torch-free, at the bottom of the house)."""

from __future__ import annotations


class HeadstartError(Exception):
    """An error the user can fix: the message names the problem and what to do. The CLI prints it (exit 2); the
    service turns the input errors among them into 4xx answers."""


class ImageError(HeadstartError, ValueError):
    """The bytes given cannot be used as an image. The message says why and what to do."""
