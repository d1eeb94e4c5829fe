"""Fonts for the text drawn on images: a detection's ``label confidence`` (/localize_image) and a heatmap's
caption (/heatmap, ``headstart predict --heatmap``).

Pillow's default font (Aileron) draws unaccented Latin only: a class named ``fourmis été`` came out with a box for
each ``é``, a Chinese or Russian one as boxes alone. The text is drawn in DejaVu Sans, shipped beside this file
(Latin, Greek, Cyrillic, Arabic, Hebrew and more: ``fonts/LICENSE``), and what it lacks (Chinese, Japanese, Korean,
Devanagari, Thai...) from an installed font that has it, found in the usual font folders, one run of characters per
font on a common baseline. Characters no font here draws are said once in the log, with what to install; they show
as boxes.
"""

from __future__ import annotations

import logging
import os
import sys
import unicodedata
from collections.abc import Iterator
from functools import cache, lru_cache
from pathlib import Path

from PIL import ImageDraw, ImageFont, features

log = logging.getLogger("headstart")

#: the font every label is drawn in first
DEJAVU = Path(__file__).with_name("fonts") / "DejaVuSans.ttf"
FONT_SUFFIXES = (".ttf", ".otf", ".ttc")
#: a code point no font has: what a font draws for it is its "missing glyph" box
NO_GLYPH = "\U0010ffff"
#: the left-to-right mark: written after a label, it keeps the number that follows on the label's right when the
#: label is Arabic or Hebrew (the bidirectional algorithm put "0.35" inside "نحلة 0.35", before the word)
LTR = "\u200e"
#: the text laid out left to right as a whole (a label starting with an Arabic word made the line right to left),
#: where Pillow has libraqm (its wheels do); without it, Pillow's basic layout takes no direction and draws
#: right-to-left scripts unshaped, in their stored order
LAYOUT = {"direction": "ltr"} if features.check_feature("raqm") else {}
_SAID: set[str] = set()


def font_folders() -> list[Path]:
    """Where installed fonts are: the system's and the user's folders on Linux, macOS and Windows."""
    folders = [Path(p) / "fonts" for p in os.environ.get("XDG_DATA_DIRS", "/usr/local/share:/usr/share").split(":")]
    home = os.path.expanduser("~")  # left as "~" where there is none (a container's user without HOME or passwd line)
    homes = [] if home == "~" else [Path(home)]
    folders += [h / sub for h in homes for sub in (".local/share/fonts", ".fonts")]
    if sys.platform == "darwin":
        folders += [Path("/System/Library/Fonts"), Path("/Library/Fonts"), *(h / "Library/Fonts" for h in homes)]
    if sys.platform == "win32":
        folders += [Path(os.environ.get("WINDIR", r"C:\Windows")) / "Fonts"]
    return list(dict.fromkeys(folders))


class Label:
    """``text`` at ``size`` pixels, laid out in runs of one font each (:func:`runs`): :meth:`bbox` and
    :meth:`draw` as Pillow's ``textbbox`` and ``text`` with ``xy`` the top left (at the tallest font's ascent)."""

    def __init__(self, text: str, size: int) -> None:
        self.text = text
        self.runs = [(part, _font(path, size)) for part, path in runs(text)]
        self.ascent = max((font.getmetrics()[0] for _, font in self.runs), default=0)

    def _placed(self, xy: tuple[float, float]) -> Iterator[tuple[tuple[float, float], str, ImageFont.ImageFont]]:
        x, y = xy
        for part, font in self.runs:
            yield (x, y + self.ascent), part, font
            x += font.getlength(part, **LAYOUT)

    def bbox(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float]) -> tuple[float, float, float, float]:
        boxes = [draw.textbbox(at, part, font=font, anchor="ls", **LAYOUT) for at, part, font in self._placed(xy)]
        if not boxes:
            return (xy[0], xy[1], xy[0], xy[1])
        return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))

    def draw(self, draw: ImageDraw.ImageDraw, xy: tuple[float, float], fill) -> None:
        for at, part, font in self._placed(xy):
            draw.text(at, part, fill=fill, font=font, anchor="ls", **LAYOUT)


def runs(text: str) -> list[tuple[str, str]]:
    """``text`` cut into runs of (characters, the font file that draws them): DejaVu Sans where it can, else the
    first installed font that has the character, else DejaVu Sans (no font here has it: drawn as a box). Spaces,
    combining marks and format characters stay in the run they follow."""
    out: list[tuple[str, str]] = []
    for char in text:
        category = unicodedata.category(char)
        joins = char.isspace() or category[0] == "M" or category == "Cf"
        path = out[-1][1] if out and joins else font_for(char) or str(DEJAVU)
        if out and out[-1][1] == path:
            out[-1] = (out[-1][0] + char, path)
        else:
            out.append((char, path))
    return out


def check(texts) -> str:
    """The characters of ``texts`` (a model's labels) that no font here draws, said once in the log with what to
    install; '' when every one is drawn. Looking fonts up takes a moment the first time, so the service does it when
    it starts rather than in its first drawing request."""
    undrawn = "".join(sorted({c for t in texts for c in t if not c.isspace() and font_for(c) is None}))
    if undrawn and undrawn not in _SAID:
        _SAID.add(undrawn)
        log.warning(
            "no font here draws %r (in the model's labels): drawn images (boxes, heatmaps) show them as boxes. "
            "Install a font that has them where the model is served (Chinese, Japanese, Korean on Debian or Ubuntu: "
            "apt install fonts-noto-cjk; other scripts: fonts-noto) and start it again",
            undrawn,
        )
    return undrawn


@cache
def font_for(char: str) -> str | None:
    """The font file that draws ``char``: DejaVu Sans, else the first installed font that has it, else None."""
    if _has(str(DEJAVU), char):
        return str(DEJAVU)
    return next((path for path in installed_fonts() if _has(path, char)), None)


@cache
def installed_fonts() -> list[str]:
    """The font files in :func:`font_folders`, regular upright ones first (names without Bold, Italic...)."""
    found = []
    for folder in font_folders():
        if folder.is_dir():
            for root, _, files in os.walk(folder):
                found += [os.path.join(root, f) for f in files if f.lower().endswith(FONT_SUFFIXES)]
    styled = ("bold", "italic", "oblique", "light", "thin", "black", "heavy", "condensed", "mono")
    return sorted(found, key=lambda p: (any(s in Path(p).stem.lower() for s in styled), p))


@lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.truetype(path, size)
    except ImportError:  # a Pillow built without FreeType: its bitmap font (ASCII), rather than no image
        return ImageFont.load_default()


@cache
def _missing_glyph(path: str) -> bytes | None:
    try:
        return _mask(_font(path, 16), NO_GLYPH)
    except Exception:  # not a font Pillow can read (a broken file among the installed fonts)
        return None


def _has(path: str, char: str) -> bool:
    """Whether the font at ``path`` has a glyph for ``char``: what it draws differs from its missing-glyph box."""
    box = _missing_glyph(path)
    return box is not None and _mask(_font(path, 16), char) != box


def _mask(font: ImageFont.FreeTypeFont, char: str) -> bytes:
    mask = font.getmask(char)
    return f"{mask.size}".encode() + bytes(mask)
