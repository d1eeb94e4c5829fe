"""`headstart predict --sort-into DIR` (``headstart.load(...).predict(sort_into=...)``): the images sorted into a folder
per answer, as links or copies, a class-folder data set again (``training/sorting.py``)."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import headstart
from headstart.cli import main
from headstart.predicting import Answer
from headstart.service.answers import Prediction
from headstart.service.inference import MAX_NOVELTY
from headstart.sorting import NO_LABEL, NONE_OF_THESE, SortError, folder_name, folders_of, sort_folder

from .conftest import synthetic_image


def photos(root: Path, n: int = 6) -> list[Path]:
    """``n`` synthetic photos of the tiny model's two classes (red, blue) in ``root``, and a second 0.jpg in a
    subfolder (another photo of the same name)."""
    rng = np.random.default_rng(5)
    (root / "sub").mkdir(parents=True)
    paths = [root / f"{k}.jpg" for k in range(n)]
    for k, path in enumerate(paths):
        synthetic_image(k % 2, rng).save(path)
    synthetic_image(0, rng).save(root / "sub" / "0.jpg")
    return [*paths, root / "sub" / "0.jpg"]


def tree(folder: Path) -> dict[str, list[str]]:
    return {d.name: sorted(f.name for f in d.iterdir()) for d in sorted(folder.iterdir()) if d.is_dir()}


def test_images_are_linked_into_a_folder_per_class_and_a_rerun_adds_nothing(tiny_bundle, tmp_path, capsys):
    """A photo archive sorted by the model: DIR/CLASS/ links to the files (two photos named 0.jpg: 0.jpg and
    0-2.jpg), the layout `headstart train` reads; the same command again changes nothing (the folder's own images,
    under the folder sorted, are not sorted again)."""
    images = photos(tmp_path / "in")
    model = headstart.load(tiny_bundle.bundle_dir)
    answers = model.predict(tmp_path / "in", sort_into=tmp_path / "in" / "sorted", novelty_threshold=MAX_NOVELTY)
    assert len(answers) == len(images)
    for answer in answers:
        (path,) = answer.sorted
        assert Path(path).parent.name == answer.label and os.readlink(path) == str(Path(answer.image).resolve())
    assert sorted(f for names in tree(tmp_path / "in" / "sorted").values() for f in names) == sorted(
        ["0-2.jpg", *(p.name for p in images[:-1])]
    )
    before = tree(tmp_path / "in" / "sorted")
    again = model.predict(tmp_path / "in", sort_into=tmp_path / "in" / "sorted", novelty_threshold=MAX_NOVELTY)
    assert len(again) == len(images) and tree(tmp_path / "in" / "sorted") == before
    assert [a.sorted for a in again] == [a.sorted for a in answers]

    # the command line says where each image went, and how many went into each folder; --copy copies
    argv = ["predict", str(tiny_bundle.bundle_dir), str(images[0]), "--sort-into", str(tmp_path / "s")]
    assert main([*argv, "--novelty-threshold", str(MAX_NOVELTY)]) == 0
    out, err = capsys.readouterr()
    label = out.split(": ", 1)[1].split(" ", 1)[0]  # the line's best class (a lone image's, in bf16 perhaps)
    assert out.strip().endswith(f"; -> {tmp_path / 's' / label / '0.jpg'}")
    assert f"sorted into {tmp_path / 's'} as links to the files (--copy copies them): {label} 1" in err
    assert main(["predict", str(tiny_bundle.bundle_dir), str(images[1]), "--sort-into", str(tmp_path / "s"),
                 "--copy", "--json", "--novelty-threshold", str(MAX_NOVELTY)]) == 0  # fmt: skip
    (copied,) = json.loads(capsys.readouterr().out)["sorted"]
    assert not os.path.islink(copied) and Path(copied).read_bytes() == images[1].read_bytes()


def test_images_named_as_long_as_a_file_system_allows_get_their_heatmaps_and_places(tiny_bundle, tmp_path):
    """A file named with 250 bytes (the limit is 255) got no heatmap, "File name too long" once .heatmap.jpg was
    added, and a second one of the name no place in the sorted folder once -2 was: the names are cut to fit."""
    from headstart.sorting import NAME_BYTES, fitted

    long_stem = "蜜" * 80 + "b" * 8  # 248 bytes of UTF-8: a character is 3 of them
    rng = np.random.default_rng(0)
    paths = [tmp_path / sub / f"{long_stem}.jpg" for sub in ("a", "b")]
    for path in paths:  # two red squares: one class folder for both
        path.parent.mkdir()
        synthetic_image(0, rng).save(path)
    model = headstart.load(tiny_bundle.bundle_dir)
    answers = model.predict(
        paths, heatmaps=tmp_path / "maps", sort_into=tmp_path / "sorted", novelty_threshold=MAX_NOVELTY
    )
    assert [a.error for a in answers] == [None, None]
    names = [Path(a.heatmap).name for a in answers]
    assert names[0].endswith(".heatmap.jpg") and names[1].endswith("-2.heatmap.jpg")
    assert all(len(n.encode()) <= NAME_BYTES and n.startswith("蜜" * 70) for n in names)
    assert all(Path(a.heatmap).is_file() for a in answers)
    assert answers[0].label == answers[1].label  # one class folder: the second one's name gets -2
    assert Path(answers[1].sorted[0]).name == fitted(long_stem, "-2.jpg")
    assert all(Path(a.sorted[0]).resolve() == Path(a.image).resolve() for a in answers)
    assert fitted("蜜" * 100, ".jpg") == "蜜" * 83 + ".jpg"  # cut at a character, not inside one


def test_photos_of_other_things_go_to_none_of_these(hymenoptera_bundle, tmp_path):
    """The hymenoptera model on its 153 validation ants and bees and on the three camera shots (none shows an ant or
    a bee): the camera shots in none-of-these/, most ants in ants/ and bees in bees/ (the model keeps 95% of its
    validation images as a class, 96% right: some go to none-of-these/ or to the other class)."""
    from tests.conftest import HYMENOPTERA, PHOTOS

    model = headstart.load(hymenoptera_bundle.bundle_dir)
    model.predict([HYMENOPTERA / "val", PHOTOS / "camera"], sort_into=tmp_path / "sorted")
    got = tree(tmp_path / "sorted")
    assert set(got[NONE_OF_THESE]) >= {p.name for p in (PHOTOS / "camera").glob("*.jpg")}
    for kind in ("ants", "bees"):
        truth = {p.name for p in (HYMENOPTERA / "val" / kind).iterdir()}
        assert len(set(got[kind]) & truth) >= 0.85 * len(truth), (kind, len(set(got[kind]) & truth), len(truth))


def test_urls_are_sorted_as_their_bytes_and_in_memory_images_are_answered_unsorted(tiny_bundle, image_server, tmp_path):
    from tests.conftest import HYMENOPTERA

    ant = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[0]
    model = headstart.load(tiny_bundle.bundle_dir)
    url = f"{image_server}/photos/val/ants/{ant.name}?w=800"
    got = model.predict([url, ant.read_bytes(), f"{image_server}/missing.jpg"], sort_into=tmp_path / "s")
    assert Path(got[0].sorted[0]).name == ant.name and Path(got[0].sorted[0]).read_bytes() == ant.read_bytes()
    assert got[1].error is None and got[1].sorted is None  # bytes: no file to sort
    assert "404" in got[2].error and got[2].sorted is None
    assert sum(len(v) for v in tree(tmp_path / "s").values()) == 1
    from headstart.sorting import _url_name

    assert _url_name("https://host/", ant.read_bytes(), 7) == "image-7.jpg"  # no name: its place in the list
    assert _url_name("https://host/photo?id=3", ant.read_bytes(), 0) == "photo.jpg"  # the format's extension


def test_what_cannot_be_sorted_is_said(tiny_bundle, tmp_path, monkeypatch):
    """A drive without links (FAT, exFAT): stop at once, saying to add --copy; a full disk while copying: that
    image's error line, the others sorted; a detector, copy without a folder, a class named as a folder of no
    class: refused before any image is read."""
    images = photos(tmp_path / "in", 4)
    model = headstart.load(tiny_bundle.bundle_dir)

    def no_links(self, target):
        raise OSError(errno.EPERM, "Operation not permitted")

    with monkeypatch.context() as m:
        m.setattr(Path, "symlink_to", no_links)
        with pytest.raises(SortError, match=r"cannot hold links to the images .*: add --copy to copy the images"):
            model.predict(images, sort_into=tmp_path / "fat")
    copy2, calls = shutil.copy2, []

    def disk_full_once(src, dst, **kwargs):
        calls.append(src)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return copy2(src, dst, **kwargs)

    monkeypatch.setattr(shutil, "copy2", disk_full_once)
    got = model.predict(images, sort_into=tmp_path / "full", copy=True, novelty_threshold=MAX_NOVELTY)
    assert [a.error is None for a in got] == [True, False, True, True, True]
    assert got[1].error.startswith(f"The image could not be sorted into {tmp_path / 'full'}: ") and not got[1].sorted
    assert sum(len(v) for v in tree(tmp_path / "full").values()) == 4

    with pytest.raises(SortError, match="add it, or leave copy out"):
        model.predict(images, copy=True)
    with pytest.raises(SortError, match="a detector answers boxes"):
        sort_folder("detect", ["person"], tmp_path / "d", False)
    with pytest.raises(SortError, match="has a class named 'none-of-these'"):
        sort_folder("classify", ["cat", "none-of-these"], tmp_path / "d", False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(SortError, match="is a file: name a folder"):
        sort_folder("classify", ["cat"], tmp_path / "file", False)
    assert not (tmp_path / "d").exists()


def test_the_folders_of_an_answer():
    """A multi-label answer goes into the folder of each label it holds (no-label where none); a class name that no
    file system takes as a folder is made one that it takes."""
    labels = [Prediction(label="cat", index=0, score=0.9), Prediction(label="dog/puppy", index=1, score=0.8)]
    assert folders_of(Answer(labels=labels, predictions=labels)) == ["cat", "dog_puppy"]
    assert folders_of(Answer(labels=[], predictions=labels)) == [NO_LABEL]
    assert folders_of(Answer(labels=[], predictions=labels, unknown=True)) == [NONE_OF_THESE]
    assert [folder_name(n) for n in ("a:b", "..", " ", "tab\tname", "café")] == ["a_b", "_", "_", "tab_name", "café"]
