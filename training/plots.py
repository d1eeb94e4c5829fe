"""Matplotlib for the run directory's plots, without a display.

Class names and file names are drawn in whatever script they are written in: a text holding characters the default
font (DejaVu Sans) lacks, a Chinese class name say, is given the installed fonts that have them as fallbacks
(:func:`fit_fonts`); what no installed font draws is said once, with the package that brings a font for it, instead
of matplotlib's warning per glyph and per draw.
"""

from __future__ import annotations

import logging
import warnings
from functools import cache, lru_cache

log = logging.getLogger("headstart")

#: matplotlib's warning for each glyph its font lacks, at each draw: :func:`fit_fonts` says it once, plainly
GLYPH_WARNING = r"Glyph \d+ .* missing from font"
#: matplotlib's font of last resort: it has a placeholder for every code point, never the glyph
LAST_RESORT = "Last Resort High-Efficiency"
_SAID: set[str] = set()  # the undrawn characters already said


def pyplot():
    """``matplotlib.pyplot`` on the Agg backend (imported on first use: loading a run does not need it)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def image_grid(rows: int, cols: int, cell: tuple[float, float], title_lines: int, fontsize: float):
    """(figure, axes rows x cols) for images under titles of ``title_lines`` lines at ``fontsize``, each
    image in a ``cell`` (width, height) inches, axes off. Laid out by arithmetic: ``tight_layout`` draws the whole
    figure once more to measure it, the images included (the audit plot: 0.46 s with it, 0.30 s without, on the
    2-core AMD EPYC)."""
    plt = pyplot()
    width, height = cols * cell[0], rows * cell[1]
    fig, axes = plt.subplots(rows, cols, figsize=(width, height), squeeze=False)
    margin, gap = 0.05, 0.1  # inches: around the figure, between columns
    title = (title_lines * fontsize * 1.25 + plt.rcParams["axes.titlepad"] + 2) / 72  # a title and its pad, inches
    axes_height = (height - 2 * margin - rows * title) / rows
    axes_width = (width - 2 * margin - (cols - 1) * gap) / cols
    fig.subplots_adjust(
        left=margin / width,
        right=1 - margin / width,
        bottom=margin / height,
        top=1 - (margin + title) / height,
        wspace=gap / axes_width,
        hspace=title / axes_height,
    )
    for ax in axes.ravel():
        ax.axis("off")
    return fig, axes


def save_figure(fig, path, dpi: int, tight: bool = False) -> None:
    """Write ``fig`` as PNG and close it, its texts' fonts fitted first (:func:`fit_fonts`); ``tight``: laid out by
    ``tight_layout`` (which draws the figure, so it comes after the fonts). zlib level 1 instead of Pillow's 6: the
    photo grids (worst predictions, the data audit) encode 3.5x faster (121 -> 35 ms and 142 -> 40 ms, 960x528 and
    1248x768) for files 13% larger; the line plots hardly change."""
    from pathlib import Path

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=GLYPH_WARNING)  # said once by fit_fonts
        fit_fonts(fig, Path(path).name)
        if tight:
            fig.tight_layout()
        fig.savefig(path, dpi=dpi, pil_kwargs={"compress_level": 1})
    pyplot().close(fig)


def fit_fonts(fig, name: str = "a plot") -> str:
    """Give each text of ``fig`` that holds characters its font lacks the installed fonts that have them, as
    fallbacks after its own (matplotlib draws each glyph from the first font of the list that has it). Returns the
    characters no installed font draws ('' when none), which are said once per process in a warning naming the
    plot (``name``): they show as placeholder boxes."""
    from matplotlib import font_manager
    from matplotlib.text import Text

    texts = [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]
    lacking = {}
    for text in texts:
        have = _code_points(font_manager.findfont(text.get_fontproperties()))
        missing = {c for c in text.get_text() if ord(c) not in have and not c.isspace()}
        if missing:
            lacking[text] = missing
    if not lacking:
        return ""
    families, undrawn = _fallbacks(frozenset().union(*lacking.values()))
    for text in lacking:
        own = text.get_fontproperties().get_family()
        text.set_fontfamily([*own, *(f for f in families if f not in own)])
    if undrawn and undrawn not in _SAID:
        _SAID.add(undrawn)
        log.warning(
            f"{name}: no font installed here draws {undrawn!r} (in class or file names): shown as boxes. Install "
            "a font that has them (Chinese, Japanese, Korean on Debian or Ubuntu: apt install fonts-noto-cjk; other "
            "scripts: fonts-noto) and the next plots draw them"
        )
    return undrawn


@cache
def _code_points(path: str) -> frozenset[int]:
    from matplotlib.ft2font import FT2Font

    return frozenset(FT2Font(path).get_charmap())


@lru_cache(maxsize=64)
def _fallbacks(missing: frozenset[str]) -> tuple[list[str], str]:
    """(font families that together draw as many of ``missing`` as the installed fonts can, the characters none
    draws). Regular upright fonts are tried first; fonts installed after matplotlib listed the system's (its cache
    is not refreshed when a font is installed) are added to its list when the listed ones do not suffice."""
    from matplotlib import font_manager

    manager = font_manager.fontManager
    families, left = _covering(manager.ttflist, set(missing))
    if left:
        listed = {entry.fname for entry in manager.ttflist}
        new = {path for path in font_manager.findSystemFonts() if path not in listed}
        for path in sorted(new):
            try:
                manager.addfont(path)
            except Exception:  # a font file matplotlib cannot read is no fallback
                continue
        if new:
            more, left = _covering([e for e in manager.ttflist if e.fname in new], left)
            families += [f for f in more if f not in families]
    return families, "".join(sorted(left))


def _covering(entries, missing: set[str]) -> tuple[list[str], set[str]]:
    families = []
    ranked = sorted(entries, key=lambda e: (e.style != "normal", e.weight not in (400, "normal", "regular")))
    for entry in ranked:
        if not missing:
            break
        if entry.name == LAST_RESORT or entry.name in families:
            continue
        try:
            have = _code_points(entry.fname)
        except Exception:  # an unreadable font file is skipped
            continue
        found = {c for c in missing if ord(c) in have}
        if found:
            families.append(entry.name)
            missing -= found
    return families, missing
