"""Class names in any script: drawn on images by the service (service/fonts.py), in the run's plots
(training/plots.py) and in the data check's table, never as boxes where a font here has the glyphs."""

from __future__ import annotations

import logging
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from headstart.service import fonts
from headstart.service.localize import draw_detections

from .conftest import make_image_folder

#: a letter DejaVu Sans lacks and STIXGeneral (a font matplotlib ships) has: a fallback font any machine can test
STIX_ONLY = "\u1d81"


def stix_general() -> str:
    import matplotlib

    return os.path.join(matplotlib.get_data_path(), "fonts", "ttf", "STIXGeneral.ttf")


@pytest.fixture
def installed(monkeypatch):
    """Set the fonts the service finds installed (and forget what it looked up before)."""

    def use(paths: list[str]) -> None:
        monkeypatch.setattr(fonts, "installed_fonts", lambda: list(paths))
        fonts.font_for.cache_clear()

    yield use
    fonts.font_for.cache_clear()


def drawn_label(label: str) -> np.ndarray:
    """The label patch draw_detections puts above a box, in grey levels."""
    img = Image.new("RGB", (400, 200), (0, 0, 0))
    box = {"x1": 10, "y1": 100, "x2": 390, "y2": 190}
    drawn = draw_detections(img, [{"label": label, "index": 2, "confidence": 0.5, "box": box}])
    return np.asarray(drawn.convert("L"))[:100]


def test_accented_cyrillic_greek_and_arabic_labels_are_drawn_with_their_letters_not_boxes():
    """Pillow's default font drew a box for the é of "fourmis été", and for every letter of пчела or نحلة: each
    letter drawn now differs from the font's missing-glyph box, and two names drawn differ from each other."""
    box = drawn_label(fonts.NO_GLYPH)
    for letter in ("é", "п", "Ω", "ن", "ß"):
        assert not np.array_equal(drawn_label(letter), box), letter
        assert fonts.font_for(letter) == str(fonts.DEJAVU)
    assert not np.array_equal(drawn_label("été"), drawn_label("ete"))
    assert not np.array_equal(drawn_label("пчела"), drawn_label("оса"))


def test_a_letter_dejavu_lacks_is_drawn_from_an_installed_font_on_the_same_baseline(installed, tmp_path):
    broken = tmp_path / "broken.ttf"  # a damaged file among the installed fonts is passed over
    broken.write_bytes(b"\x00\x01\x00\x00" + b"junk" * 100)
    installed([str(broken), stix_general()])
    assert fonts.runs(f"x{STIX_ONLY}y 0.50") == [
        ("x", str(fonts.DEJAVU)),
        (STIX_ONLY, stix_general()),
        ("y 0.50", str(fonts.DEJAVU)),
    ]
    with_font = drawn_label(STIX_ONLY)
    installed([])
    assert fonts.font_for(STIX_ONLY) is None
    assert not np.array_equal(with_font, drawn_label(STIX_ONLY))  # without the font: the box
    installed([stix_general()])
    draw = ImageDraw.Draw(Image.new("L", (200, 60)))
    label = fonts.Label(f"x{STIX_ONLY}", 24)
    # one baseline: the runs' boxes start at the top left asked, the tallest font's ascent above the baseline
    left, top, _, bottom = label.bbox(draw, (10, 5))
    assert left >= 10 and top >= 5 and bottom <= 5 + 2 * label.ascent


def test_labels_no_font_here_draws_are_said_once_with_what_to_install(installed, caplog):
    installed([stix_general()])
    fonts._SAID.clear()
    with caplog.at_level(logging.WARNING, logger="headstart"):
        assert fonts.check(["蜜蜂", "fourmis été", f"a{STIX_ONLY}"]) == "蜂蜜"
        assert fonts.check(["蜜蜂"]) == "蜂蜜"
    (said,) = [r.getMessage() for r in caplog.records]
    assert "'蜂蜜'" in said and "fonts-noto-cjk" in said
    assert fonts.check(["fourmis été", "пчела"]) == ""


def test_a_number_after_an_arabic_label_stays_on_its_right():
    """The bidirectional algorithm put the number of "نحلة 0.35" before the word, inside the label; the
    left-to-right mark written after a label keeps it after."""
    draw = ImageDraw.Draw(Image.new("L", (1, 1)))

    def ink(text: str) -> np.ndarray:
        label = fonts.Label(text, 32)
        left, top, right, bottom = label.bbox(draw, (0, 0))
        canvas = Image.new("L", (int(right) + 4, int(bottom) + 4))
        label.draw(ImageDraw.Draw(canvas), (0, 0), fill=255)
        columns = np.flatnonzero(np.asarray(canvas).max(axis=0) > 0)
        return np.asarray(canvas)[:, columns.min() : columns.max() + 1]

    number, word = ink("0.35"), ink("نحلة")
    after = ink(f"نحلة{fonts.LTR} 0.35")
    assert after.shape[1] > number.shape[1] + word.shape[1]
    # the number is the right end of the label, as drawn alone (both on the same baseline)
    right_end = after[:, -number.shape[1] :][: number.shape[0]]
    assert np.abs(right_end.astype(int) - number.astype(int)).mean() < 8
    before = ink("نحلة 0.35")[:, -number.shape[1] :][: number.shape[0]]
    assert np.abs(before.astype(int) - number.astype(int)).mean() > 20  # without the mark: the word's end there


# ---------------------------------------------------------------- the run's plots (matplotlib)


def glyph_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "missing from font" in str(w.message)]


def test_a_plot_draws_a_label_dejavu_lacks_from_an_installed_font_without_warnings(tmp_path):
    from headstart.tasks.classify.metrics import plot_confusion_matrix

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion_matrix([[3, 1], [0, 4]], [f"a{STIX_ONLY}", "été"], tmp_path / "cm.png")
    assert glyph_warnings(caught) == []  # matplotlib warned for the glyph at each draw
    fig = _figure_with([f"a{STIX_ONLY}", "plain"])
    from headstart.plots import fit_fonts

    assert fit_fonts(fig) == ""
    (special,) = [t for t in _texts(fig) if STIX_ONLY in t.get_text()]
    assert "STIXGeneral" in special.get_fontfamily()
    (plain,) = [t for t in _texts(fig) if t.get_text() == "plain"]
    assert "STIXGeneral" not in plain.get_fontfamily()


def test_a_plot_says_once_what_no_installed_font_draws_and_what_to_install(tmp_path, monkeypatch, caplog):
    """On a machine without a Chinese font (a font installed later than matplotlib's list of the system's is looked
    for too): one line naming the characters and the package, no warning per glyph."""
    import matplotlib
    from matplotlib import font_manager

    from headstart import plots
    from headstart.tasks.classify.metrics import plot_confusion_matrix

    shipped = [e for e in font_manager.fontManager.ttflist if e.fname.startswith(matplotlib.get_data_path())]
    monkeypatch.setattr(font_manager.fontManager, "ttflist", shipped)
    monkeypatch.setattr(font_manager, "findSystemFonts", lambda *a, **k: [])
    plots._fallbacks.cache_clear()
    plots._SAID.clear()
    try:
        with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger="headstart"):
            warnings.simplefilter("always")
            plot_confusion_matrix([[3, 1], [0, 4]], ["蜜蜂", "été"], tmp_path / "cm.png")
            plot_confusion_matrix([[3, 1], [0, 4]], ["蜜蜂", "été"], tmp_path / "again.png")
    finally:
        plots._fallbacks.cache_clear()
    assert glyph_warnings(caught) == []
    (said,) = [r.getMessage() for r in caplog.records]
    assert said.startswith("cm.png: ") and "'蜂蜜'" in said and "fonts-noto-cjk" in said
    assert (tmp_path / "cm.png").stat().st_size > 0


def _figure_with(labels):
    from headstart.plots import pyplot

    fig, ax = pyplot().subplots()
    ax.set_xticks(range(len(labels)), labels)
    return fig


def _texts(fig):
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text() and t.get_visible()]


# ---------------------------------------------------------------- the data check's table


def test_the_data_table_keeps_its_columns_under_chinese_class_names(tmp_path):
    from headstart.tasks.classify.data import scan_image_folder

    root = make_image_folder(tmp_path / "d", {"蜜蜂": 4, "fourmis été": 4, "ants": 4})
    lines = scan_image_folder(root).format().splitlines()[1:5]
    from headstart.data import columns

    assert len({columns(line) for line in lines}) == 1, lines  # len() counted 蜜蜂 as 2 of its 4 columns
    assert columns("蜜蜂") == 4 and columns("été") == 3 and columns("e\u0301te\u0301") == 3
    assert Path(root).is_dir()


def test_compare_keeps_its_columns_under_chinese_run_names():
    from headstart.compare import format_comparison
    from headstart.data import columns

    result = {
        "runs": ["runs/蜜蜂-小", "runs/ants-bees-large"],
        "options": {"backbone": ["resnet18", "resnet50"]},
        "metrics": {"accuracy": [0.9608, 0.9673], "seconds": [12.31, 40.02]},
    }
    lines = format_comparison(result).splitlines()
    assert lines[0].split() == ["蜜蜂-小", "ants-bees-large"]
    assert len({columns(line) for line in lines}) == 1, lines
