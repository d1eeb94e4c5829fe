"""Data-set checks before training: splits, corrupt files, non-images, leaks, bad layouts."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.data import DatasetError
from headstart.tasks.classify.data import scan_eval_folder, scan_image_folder

from .conftest import HYMENOPTERA, make_image_folder
from .images import hostile_images


def test_real_folder_layout_counts_gif_and_space():
    report = scan_image_folder(HYMENOPTERA)
    assert report.labels == ["ants", "bees"]
    assert report.counts() == {"train": {"ants": 124, "bees": 121}, "val": {"ants": 70, "bees": 83}}
    names = {s.path.name for s in report.splits["train"]}
    assert "ant photos.jpg" in names  # file name with a space
    assert any(s.path.suffix == ".gif" for split in report.splits.values() for s in split)
    assert not report.corrupt and not report.ignored


def test_random_split_is_stratified_and_reproducible(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 20, "b": 10})
    r1 = scan_image_folder(root, val_fraction=0.2, seed=3)
    r2 = scan_image_folder(root, val_fraction=0.2, seed=3)
    r3 = scan_image_folder(root, val_fraction=0.2, seed=4)
    assert r1.counts() == {"train": {"a": 16, "b": 8}, "val": {"a": 4, "b": 2}}
    assert [s.path for s in r1.splits["val"]] == [s.path for s in r2.splits["val"]]
    assert [s.path for s in r1.splits["val"]] != [s.path for s in r3.splits["val"]]
    assert "random stratified split" in r1.split_source


def test_train_without_val_is_split(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 10, "b": 10})
    shutil.move(str(root), str(tmp_path / "train"))
    (tmp_path / "d").mkdir()
    shutil.move(str(tmp_path / "train"), str(tmp_path / "d" / "train"))
    report = scan_image_folder(tmp_path / "d", val_fraction=0.3)
    assert report.counts()["val"] == {"a": 3, "b": 3}
    assert "no val/ folder" in report.split_source


def test_corrupt_non_image_and_odd_modes(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6}, splits={"train": 0.5, "val": 0.5})
    (root / "train" / "a" / "notes.txt").write_text("not an image")
    (root / "train" / "a" / ".DS_Store").write_bytes(b"\0\1")
    good = (root / "train" / "a" / "a_000.jpg").read_bytes()
    (root / "train" / "a" / "truncated.jpg").write_bytes(good[: len(good) // 3])
    (root / "train" / "b" / "garbage.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 50)
    (root / "train" / "b" / "empty.jpg").write_bytes(b"")
    for name, (data, _, _) in hostile_images().items():  # decoder crashes and bombs: skipped, named, no abort
        if name in ("png-truncated-ihdr", "ppm-bad-header", "aspect-2x30000"):
            (root / "train" / "b" / f"hostile-{name}.{'ppm' if 'ppm' in name else 'png'}").write_bytes(data)
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)
    Image.fromarray(arr).convert("P").save(root / "train" / "b" / "palette.png")
    Image.fromarray(arr).convert("CMYK").save(root / "train" / "b" / "cmyk.jpg")
    Image.fromarray(arr).convert("RGBA").save(root / "train" / "b" / "rgba.png")
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(root / "train" / "b" / "sixteen.png")
    report = scan_image_folder(root)
    corrupt = {p.split("/")[-1] for p, _ in report.corrupt}
    assert corrupt == {
        "truncated.jpg",
        "garbage.png",
        "empty.jpg",
        "hostile-png-truncated-ihdr.png",
        "hostile-ppm-bad-header.ppm",
        "hostile-aspect-2x30000.png",
    }
    assert [p.split("/")[-1] for p, _ in report.ignored] == ["notes.txt"]
    assert report.counts()["train"] == {"a": 3, "b": 7}
    text = report.format()
    assert "truncated.jpg" in text and "notes.txt" in text and "corrupt" in text


def test_duplicate_across_train_and_val_is_a_warning(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6}, splits={"train": 0.5, "val": 0.5})
    shutil.copy(root / "train" / "a" / "a_000.jpg", root / "val" / "a" / "copy.jpg")
    shutil.copy(root / "train" / "b" / "b_000.jpg", root / "train" / "b" / "again.jpg")  # within train: no leak
    report = scan_image_folder(root)
    assert report.duplicates == [(str(root / "train" / "a" / "a_000.jpg"), str(root / "val" / "a" / "copy.jpg"))]
    assert any("leak" in w for w in report.warnings)


def test_one_picture_under_two_classes_is_a_warning_naming_both(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6, "c": 3}, splits={"train": 0.5, "val": 0.5})
    shutil.copy(root / "train" / "a" / "a_000.jpg", root / "train" / "b" / "also_a.jpg")  # both in train
    shutil.copy(root / "train" / "a" / "a_001.jpg", root / "val" / "a" / "copy.jpg")  # the same class: a leak only
    report = scan_image_folder(root)
    assert report.conflicts == [[(f"{root}/train/a/a_000.jpg", "a"), (f"{root}/train/b/also_a.jpg", "b")]]
    (warning,) = [w for w in report.warnings if "more than one class" in w]
    assert "train/a/a_000.jpg (a) == " in warning and "train/b/also_a.jpg (b)" in warning and "copy.jpg" not in warning
    assert report.to_dict()["conflicts"] == [
        [{"path": f"{root}/train/a/a_000.jpg", "label": "a"}, {"path": f"{root}/train/b/also_a.jpg", "label": "b"}]
    ]
    # an evaluation folder: one of the copies is always counted wrong
    evaluation = root / "val"
    shutil.copy(evaluation / "a" / "copy.jpg", evaluation / "c" / "copy.jpg")
    report = scan_eval_folder(evaluation, ["a", "b", "c"])
    assert [[c for _, c in group] for group in report.conflicts] == [["a", "c"]]
    assert any("more than one class" in w and "right on only one" in w for w in report.warnings)
    # none where every copy is in one class
    (root / "train" / "b" / "also_a.jpg").unlink()
    (evaluation / "c" / "copy.jpg").unlink()
    assert scan_image_folder(root).conflicts == []
    assert not any("more than one class" in w for w in scan_eval_folder(evaluation, ["a", "b", "c"]).warnings)


def test_class_only_in_val_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6}, splits={"train": 0.5, "val": 0.5})
    make_image_folder(tmp_path / "extra", {"c": 2})
    shutil.copytree(tmp_path / "extra" / "c", root / "val" / "c")
    with pytest.raises(DatasetError, match=r"\['c'\].*none in train"):
        scan_image_folder(root)


def test_class_with_one_image_is_an_error(tmp_path):
    root = make_image_folder(tmp_path / "d", {"a": 6, "lonely": 1})
    with pytest.raises(DatasetError, match="lonely.*fewer than 2"):
        scan_image_folder(root)


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda p: None, "does not exist"),
        (lambda p: p.mkdir(), "No class folders"),
        (lambda p: (p / "val" / "a").mkdir(parents=True), "no train/"),
        (lambda p: make_image_folder(p, {"only": 4}), "at least 2"),
    ],
    ids=["missing", "empty", "no-train", "one-class"],
)
def test_bad_layouts(tmp_path, setup, message):
    root = tmp_path / "d"
    setup(root)
    with pytest.raises(DatasetError, match=message):
        scan_image_folder(root)


def test_eval_folder_uses_model_labels(tmp_path):
    root = make_image_folder(tmp_path / "d", {"b": 3})
    report = scan_eval_folder(root, ["a", "b"])
    assert {s.label for s in report.splits["eval"]} == {1}
    make_image_folder(tmp_path / "d", {"zebra": 2})
    with pytest.raises(DatasetError, match="zebra"):
        scan_eval_folder(root, ["a", "b"])


def test_a_class_with_few_validation_images_is_named_in_a_warning(tmp_path):
    from headstart.tasks.classify.data import scan_image_folder

    root = make_image_folder(tmp_path / "data", {"ants": 40, "bees": 40, "wasps": 4})
    warnings = scan_image_folder(root, val_fraction=0.2).warnings
    (thin,) = [w for w in warnings if w.startswith("few validation images")]
    assert "wasps (1)" in thin and "ants" not in thin and "bees" not in thin


def test_warnings_about_many_classes_name_some_and_count_the_rest(tmp_path):
    """150 classes of 5 images: each warning named every class, one line of 2,400 characters."""
    from headstart.data import WHOLE_REPORT
    from headstart.tasks.classify.data import scan_image_folder

    per_class = {f"c{i:02d}": 5 for i in range(40)} | {"big": 30}
    report = scan_image_folder(make_image_folder(tmp_path / "data", per_class), val_fraction=0.2)
    table = report.format().splitlines()[1:24]  # and the table: the 20 classes with the fewest, a line for the rest
    assert table[1].split() == ["c00", "4", "1"] and table[20].split() == ["c19", "4", "1"]
    assert table[21] == f"  ... and 21 more classes (train 4-24, val 1-6 each; {WHOLE_REPORT})"
    assert table[22].split() == ["total", "184", "46"]
    warnings = report.warnings
    (thin,) = [w for w in warnings if w.startswith("few validation images")]
    assert thin.startswith("few validation images for 40 of 41 classes: c00 (1), c01 (1)") and "and 30 more" in thin
    assert "c39" not in thin and "big" not in thin
    (unbalanced,) = [w for w in warnings if w.startswith("classes are unbalanced")]
    assert unbalanced == "classes are unbalanced in train: c00=4, c01=4, c02=4, c03=4, c04=4, ..., c36=4, c37=4, " + (
        "c38=4, c39=4, big=24"
    )
    assert max(len(w) for w in warnings) < 400


# ---------------------------------------------------------------- images checked by an earlier run


def counting_decodes(monkeypatch) -> list[str]:
    """The sha256 of every image the data check decodes from now on."""
    import hashlib

    from headstart import data

    decoded: list[str] = []
    real = data.decode_image

    def decode(source, **kw):
        decoded.append(hashlib.sha256(source).hexdigest())
        return real(source, **kw)

    monkeypatch.setattr(data, "decode_image", decode)
    return decoded


def test_images_an_earlier_check_read_are_not_decoded_again(tmp_path, monkeypatch, caplog):
    """A data check decodes every file (an 8 MP JPEG: 10-15 ms even at 1/8 scale); a check of the same bytes with the
    same decoding does not decode them again and reports the same. A corrupt file is checked every time; another
    decoding (the key) checks everything again; a line that is not a sha256 is passed over; a cache that cannot be
    written costs only the decoding."""
    import hashlib

    from headstart import data

    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6})
    broken = root / "a" / "broken.jpg"
    broken.write_bytes((root / "a" / "a_000.jpg").read_bytes()[:300])
    broken_sha = hashlib.sha256(broken.read_bytes()).hexdigest()
    decoded = counting_decodes(monkeypatch)
    cache = tmp_path / "cache"

    first = scan_image_folder(root, verified=data.VerifiedImages(cache))
    assert len(decoded) == 13 and len(data.VerifiedImages(cache)) == 12
    decoded.clear()
    second = scan_image_folder(root, verified=data.VerifiedImages(cache))
    assert decoded == [broken_sha]  # only the file that failed
    assert second.to_dict() == first.to_dict() and second.splits == first.splits
    assert [p for p, _ in second.corrupt] == [p for p, _ in first.corrupt] != []

    with data.VerifiedImages(cache).path.open("a") as f:  # a line cut short, a line of something else
        f.write("0123abc\n" + "g" * 64 + "\n")
    assert len(data.VerifiedImages(cache)) == 12

    monkeypatch.setattr(data, "decoding_key", lambda: "another-decoding")
    decoded.clear()
    assert scan_image_folder(root, verified=data.VerifiedImages(cache)).splits == first.splits
    assert len(decoded) == 13

    (tmp_path / "not-a-folder").write_text("")
    decoded.clear()
    with caplog.at_level("WARNING"):
        unwritable = scan_image_folder(root, verified=data.VerifiedImages(tmp_path / "not-a-folder" / "cache"))
    assert unwritable.splits == first.splits and len(decoded) == 13
    assert "checks them again" in caplog.text


def test_the_check_keeps_what_it_decodes_for_the_training_as_the_model_reads_it(tmp_path, monkeypatch):
    """Given the training's ``DecodedImages``, the data check decodes each image as the model will read it
    (``decode_for``; a large JPEG at a reduced DCT scale) and keeps it there while it has room, instead of decoding
    it at 1/8 scale for nothing else; a corrupt file is still reported, an image an earlier check read is not
    decoded at all, and what does not fit is decoded at 1/8 scale as before."""
    from headstart import data
    from headstart.features import DecodedImages
    from headstart.service.preprocess import PreprocessSpec, decode_for

    root = make_image_folder(tmp_path / "d", {"a": 3, "b": 3})
    large = root / "a" / "large.jpg"
    Image.new("RGB", (2400, 1800), (40, 90, 160)).save(large, quality=90)
    (root / "b" / "broken.jpg").write_bytes(large.read_bytes()[:2000])
    spec = PreprocessSpec()  # resize 256: a JPEG decoded at the scale that keeps a 512 px shorter side
    eighths = counting_decodes(monkeypatch)
    kept = DecodedImages(spec)
    report = scan_image_folder(root, decoded=kept)
    assert eighths == [] and len(report.corrupt) == 1
    paths = [s.path for split in report.splits.values() for s in split]
    assert len(paths) == 7 and kept.bytes > 0
    for path in paths:
        img = kept.take(path)
        assert np.array_equal(np.asarray(img), np.asarray(decode_for(path, spec)))
    assert kept.bytes == 0 and kept.take(large).size == (1200, 900)  # 1/2 scale: a shorter side of 512 or more

    cache = tmp_path / "cache"
    scan_image_folder(root, verified=data.VerifiedImages(cache))  # notes every readable image
    eighths.clear()
    again = DecodedImages(spec)
    scan_image_folder(root, verified=data.VerifiedImages(cache), decoded=again)
    assert again.bytes == 0 and len(eighths) == 0  # only the broken file was decoded (kept nowhere)

    small = DecodedImages(spec, max_bytes=96 * 96 * 3)  # room for one synthetic image
    eighths.clear()
    scan_image_folder(root, decoded=small, workers=4)
    assert small.bytes == small.max_bytes and len(eighths) >= 4  # once full, decoded at 1/8 scale (4 at a time)
    small.only([])
    assert small.bytes == 0


def test_the_decoding_key_names_the_decoding_code_pillow_and_the_limits(monkeypatch):
    from headstart import data
    from headstart.service import preprocess

    key = data.decoding_key()
    assert key == data.decoding_key() and len(key) == 16
    monkeypatch.setattr(preprocess, "MAX_IMAGE_PIXELS", preprocess.MAX_IMAGE_PIXELS // 2)
    assert data.decoding_key() != key


@pytest.mark.parametrize("task", ["classify", "multilabel", "detect"])
def test_every_task_s_scan_keeps_the_checked_images_in_the_run_s_feature_cache(task, tmp_path, monkeypatch):
    """A training run's data check (each task's scan, the multi-label task's of a YOLO set included) notes the images
    it read in ``--cache-dir``, and the next run decodes none of them; ``--no-cache`` notes nothing."""
    from headstart.data import verified_images
    from headstart.tasks import CONFIGS, task_named

    from .conftest import COCO128, require_shared

    if task == "classify":
        data_dir = make_image_folder(tmp_path / "d", {"a": 5, "b": 5}, splits={"train": 0.6, "val": 0.4})
    else:
        require_shared()
        data_dir = COCO128
    cache = tmp_path / "cache"
    cfg = CONFIGS[task](data_dir=str(data_dir), out=str(tmp_path / "run"), cache_dir=str(cache))
    decoded = counting_decodes(monkeypatch)
    first = task_named(task).scan(cfg)
    assert decoded and len(verified_images(cfg)) == len(set(decoded))
    decoded.clear()
    again = task_named(task).scan(cfg)
    assert decoded == [] and again.to_dict() == first.to_dict()
    off = CONFIGS[task](
        data_dir=str(data_dir), out=str(tmp_path / "run"), cache_dir=str(tmp_path / "c2"), no_cache=True
    )
    assert verified_images(off) is None
    task_named(task).scan(off)
    assert decoded and not (tmp_path / "c2").exists()


def test_headstarts_own_outputs_in_the_data_folder_are_not_classes(tmp_path):
    """`headstart train DATA --out DATA/run`: the next training read run/ as a class of its plots, and `headstart
    evaluate RUN DATA --out DATA/eval` failed on "class folders ['eval', 'run'] that the model does not know"."""
    root = make_image_folder(tmp_path / "d", {"a": 6, "b": 6})
    plot = Image.new("RGB", (64, 48), (200, 30, 30))
    for name, marker in (("run", "config.yaml"), ("bundle", "manifest.json"), ("eval", "metrics.json")):
        (root / name).mkdir()
        (root / name / marker).write_text("{}\n")
        plot.save(root / name / "confusion_matrix.png")
    (root / "fresh-eval").mkdir()  # what `evaluate --out` makes before it scans
    shutil.copytree(root / "run", root / "runs" / "exp1")  # --out runs/exp1 run from inside the data folder
    report = scan_image_folder(root)
    assert report.labels == ["a", "b"] and sum(len(s) for s in report.splits.values()) == 12
    left_out = [w for w in report.warnings if "of headstart's, not a class" in w]
    assert [w.split()[0] for w in left_out] == [str(root / n) for n in ("bundle", "eval", "run", "runs")], left_out
    assert "a run directory" in left_out[2] and "--out runs/NAME" in left_out[2] and "a folder of runs" in left_out[3]

    evaluation = scan_eval_folder(root, ["a", "b"])
    assert len(evaluation.splits["eval"]) == 12 and len(evaluation.warnings) == 4
    plot.save(root / "fresh-eval" / "cat.png")  # a folder of images the model does not know is still refused
    with pytest.raises(DatasetError, match=r"class folders \['fresh-eval'\]"):
        scan_eval_folder(root, ["a", "b"])

    split = make_image_folder(tmp_path / "s", {"a": 4, "b": 4}, splits={"train": 0.5, "val": 0.5})
    shutil.copytree(root / "run", split / "train" / "run")
    assert scan_image_folder(split).labels == ["a", "b"]


def test_a_roboflow_valid_folder_is_the_validation_split_and_other_folders_are_named(tmp_path):
    """Roboflow exports a classification set as train/, valid/ and test/: valid/ was passed over in silence (the
    validation images were then a random fifth of train/), as any folder beside train/ that is not a split."""
    root = tmp_path / "d"
    for split, seed in (("train", 0), ("valid", 1), ("test", 2)):
        make_image_folder(root / split, {"a": 3, "b": 3}, seed=seed)
    report = scan_image_folder(root)
    assert report.split_source == "train/val folders" and {s: len(v) for s, v in report.splits.items()} == {
        "train": 6,
        "val": 6,
        "test": 6,
    }
    assert all(s.path.parent.parent.name == "valid" for s in report.splits["val"])
    (root / "validation").mkdir()
    with pytest.raises(DatasetError, match=r"has valid/ and validation/: which is the validation split"):
        scan_image_folder(root)
    (root / "validation").rmdir()
    make_image_folder(root / "extra", {"a": 2})
    warnings = scan_image_folder(root).warnings
    expected = "extra/ beside train/: not a split folder (train/, val/ or valid/ or validation/, test/), left out."
    assert expected in warnings


@pytest.mark.parametrize(
    ("files", "words"),
    [
        (["annotations/instances_train2017.json", "train2017/a.jpg", "train2017/b.jpg"], "COCO JSON"),
        (["train/_annotations.coco.json", "train/a.jpg", "valid/_annotations.coco.json", "valid/b.jpg"], "COCO JSON"),
        (["Annotations/a.xml", "JPEGImages/a.jpg", "JPEGImages/b.jpg"], "Pascal VOC"),
    ],
    ids=["coco", "roboflow-coco", "voc"],
)
def test_a_detection_set_in_a_format_headstart_does_not_read_is_named_with_what_to_do(
    tmp_path, files, words, monkeypatch
):
    """COCO's annotations/ and train2017/ were read as two classes ("Found 1 class(es) with images"), a Roboflow
    COCO export's train/ as a split without class folders: the message named neither the format nor a way on."""
    root = tmp_path / "d"
    for name in files:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        if name.endswith(".jpg"):
            Image.new("RGB", (16, 16)).save(root / name)
        else:
            (root / name).write_text("{}\n")
    with pytest.raises(DatasetError, match=f"holds a {words} detection data set") as caught:
        scan_image_folder(root)
    assert "YOLO" in str(caught.value) and "one subfolder of images per class" in str(caught.value)
    assert f"headstart convert {root} --out {root}-yolo" in str(caught.value)
    with pytest.raises(DatasetError, match=f"headstart convert \\. --out {re.escape(str(root))}-yolo"):
        monkeypatch.chdir(root)
        scan_image_folder(Path("."))  # `headstart train .` inside it (its name had raised "has an empty name")
    from headstart.tasks.detect.data import scan_yolo_dataset  # --task detect: the same, not "no data.yaml"

    with pytest.raises(DatasetError, match=f"holds a {words} detection data set"):
        scan_yolo_dataset(root)


def test_an_image_label_csv_is_a_classifiers_data_set(tmp_path):
    """Kaggle's tables (image,label): `headstart train train.csv` went to the multi-label task, read `label` as a 0/1
    column and said "names no readable image (0 skipped). Check the image paths"."""
    from headstart.tasks import config_for_data

    root = make_image_folder(tmp_path / "d", {"red": 6, "blue": 6})
    images = sorted(root.rglob("*.jpg"))
    lines = ["image,label", *(f"{p.relative_to(root)},{p.parent.name}" for p in images)]
    lines += [f"{images[0].relative_to(root)},red", "red/none.jpg,red", f"{images[1].relative_to(root)},", "x,y,z"]
    (root / "train.csv").write_text("\n".join(lines) + "\n")
    assert config_for_data(str(root / "train.csv")).task == "classify"
    report = scan_image_folder(root / "train.csv", val_fraction=0.25, seed=1)
    assert report.root == root / "train.csv" and report.labels == ["blue", "red"]
    assert {s: sum(n.values()) for s, n in report.counts().items()} == {"train": 8, "val": 4}  # stratified: 6 each
    assert {p.name for s in report.splits.values() for p in [x.path for x in s]} == {p.name for p in images}
    assert [p for p, _ in report.corrupt] == [str(root / "red" / "none.jpg")]
    said = " ".join(report.warnings)
    assert "2 rows skipped: train.csv:16: no label; train.csv:17: 3 cells where the header has 2" in said
    assert "1 rows name an image an earlier row names (the first kept): train.csv:14" in said

    # a split column fixes the split; a folder holding labels.csv is the same; multi-label tables stay multi-label
    rows = [f"{p.relative_to(root)},{p.parent.name},{'val' if i % 3 == 0 else 'train'}" for i, p in enumerate(images)]
    (root / "labels.csv").write_text("image,label,split\n" + "\n".join(rows) + "\n")
    report = scan_image_folder(root)
    assert report.split_source == "train/val folders" and len(report.splits["val"]) == 4
    assert config_for_data(str(root)).task == "classify"
    (root / "multi.csv").write_text("image,labels\n" + "\n".join(f"{p.relative_to(root)},a b" for p in images))
    assert config_for_data(str(root / "multi.csv")).task == "multilabel"
    with pytest.raises(DatasetError, match="gives images several labels .* a multi-label data set"):
        scan_image_folder(root / "multi.csv")  # --task classify on it

    # the names other tables give the columns
    (root / "kaggle.csv").write_text(
        "Filename,Class\n" + "\n".join(f"{p.relative_to(root)},{p.parent.name}" for p in images)
    )
    assert config_for_data(str(root / "kaggle.csv")).task == "classify"
    assert scan_image_folder(root / "kaggle.csv").counts() == scan_image_folder(root / "train.csv").counts()

    # evaluation on such a table: every row, whatever its split; a class the model does not know is named
    report = scan_eval_folder(root / "labels.csv", ["blue", "red"])
    assert list(report.splits) == ["eval"] and len(report.splits["eval"]) == 12
    with pytest.raises(DatasetError, match=r"has classes \['blue'\] that the model does not know"):
        scan_eval_folder(root / "labels.csv", ["red", "green"])
    (root / "val.csv").write_text(
        "image,label,split\n" + "\n".join(f"{p.relative_to(root)},{p.parent.name},val" for p in images)
    )
    with pytest.raises(DatasetError, match="no row is of the train split"):
        scan_image_folder(root / "val.csv")
    (root / "bad.csv").write_text("image,label\nred/none.jpg,red\nblue/none.jpg,blue\n")
    with pytest.raises(DatasetError, match=r"holds no readable image \(2 could not be read, e.g. .*none.jpg: The file"):
        scan_image_folder(root / "bad.csv")


def test_kaggles_tables_of_ids_and_classes_find_their_images_beside_them(tmp_path):
    """Kaggle's tables name each image by id, the files in a folder beside (dog breeds: ``id,breed`` and
    ``train/ID.jpg``; Cassava: ``image_id,label`` and ``train_images/ID.jpg``; HAM10000: two folders of images):
    "has no 'image' column", then every image "could not be read: no such file"."""
    from headstart.tasks import config_for_data
    from headstart.tasks.multilabel.data import scan_csv

    source = make_image_folder(tmp_path / "src", {"red": 6, "blue": 6})
    root = tmp_path / "kaggle"
    for i, path in enumerate(sorted(source.rglob("*.jpg"))):
        folder = root / ("train" if i % 2 else "train_more")
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, folder / f"{i:08x}.jpg")
        ids = (root / "ids.txt").open("a")
        ids.write(f"{i:08x},{path.parent.name}\n")
        ids.close()
    shutil.copy(source / "red" / "red_000.jpg", root / "sample_submission.jpg")  # a stray image beside the table
    (root / "test").mkdir()
    shutil.copy(source / "red" / "red_001.jpg", root / "test" / "ffffffff.jpg")
    table = (root / "ids.txt").read_text()
    (root / "labels.csv").write_text("id,breed\n" + table + "deadbeef,red\nbad\0name,red\n")  # no such image: named
    assert config_for_data(str(root)).task == "classify"
    report = scan_image_folder(root / "labels.csv")
    assert report.labels == ["blue", "red"] and sum(len(s) for s in report.splits.values()) == 12
    assert {x.path.parent.name for s in report.splits.values() for x in s} == {"train", "train_more"}
    assert [p for p, _ in report.corrupt] == [str(root / "deadbeef")]
    said = " ".join(report.warnings)
    assert "the table names its images as NAME; read as train_more/NAME.jpg or train/NAME.jpg" in said  # tied: 6 each
    assert "labels.csv:15: the image's name holds a NUL character" in said  # was ValueError: embedded null byte
    for header in ("image_id,label", "Image,Id", "id_code,diagnosis"):  # Cassava, humpback whales, APTOS
        (root / "labels.csv").write_text(f"{header}\n{table}")
        assert scan_image_folder(root).counts() == report.counts(), header
    for sep in (";", "\t"):  # Excel's CSV where the comma is the decimal mark (German, French, ...); tabs
        (root / "labels.csv").write_text(f"image{sep}label\n{table.replace(',', sep)}")
        assert config_for_data(str(root)).task == "classify"
        assert scan_image_folder(root).counts() == report.counts(), sep

    # an id in two folders: which image the table means cannot be told
    (root / "labels.csv").write_text("id,breed\n" + table)
    shutil.copy(root / "train" / "00000001.jpg", root / "test" / "00000001.jpg")
    with pytest.raises(
        DatasetError, match=r"1 of them are in more than one folder \(e.g. 00000001: train/00000001.jpg and test/"
    ):
        scan_image_folder(root)
    (root / "test" / "00000001.jpg").unlink()

    # the same table with the ids' extension (aerial cactus: id,has_cactus), and with paths as they are: no note
    (root / "labels.csv").write_text("id,has_cactus\n" + table.replace(",", ".jpg,"))
    assert scan_image_folder(root).counts() == report.counts()
    listed = [f"{p.relative_to(root)},{c}" for p, c in zip(sorted(root.glob("train*/*.jpg")), "ab" * 6, strict=True)]
    (root / "labels.csv").write_text("file,label\n" + "\n".join(listed))
    assert not [w for w in scan_image_folder(root).warnings if "NAME" in w]

    # a table whose class column goes by another name among other columns: it says which to name 'label'
    (root / "labels.csv").write_text(
        "lesion_id,image_id,dx\n" + "".join(f"L{i},{line}\n" for i, line in enumerate(table.splitlines()))
    )
    assert config_for_data(str(root)).task == "multilabel"
    with pytest.raises(DatasetError, match=r"names no labels \(its header is lesion_id,image_id,dx\): name the col"):
        scan_csv(root)


@pytest.mark.parametrize(
    ("name", "command"),
    [("set.zip", "unzip {p} -d {d}"), ("set.tar.gz", "mkdir {d} && tar -xf {p} -C {d}"), ("set.7z", "7z x {p} -o{d}")],
)
def test_an_archive_given_as_the_data_set_says_to_unpack_it(tmp_path, name, command):
    """Kaggle and Roboflow hand data sets out as archives: `headstart train set.zip` said "Data folder set.zip does
    not exist or is not a folder"."""
    from headstart.tasks.detect.data import scan_yolo_dataset
    from headstart.tasks.multilabel.data import scan_data

    archive = tmp_path / name
    archive.write_bytes(b"PK\x03\x04")
    said = f"is an archive ({name[3:]}): unpack it first ({command.format(p=archive, d=tmp_path / 'set')})"
    for scan in (scan_image_folder, scan_yolo_dataset, lambda p: scan_data(str(p), 0.2, 0)):
        with pytest.raises(DatasetError, match=re.escape(said)):
            scan(archive)
    with pytest.raises(DatasetError, match=re.escape(said)):
        scan_eval_folder(archive, ["a", "b"])
    with pytest.raises(DatasetError, match=f"Data folder {re.escape(str(tmp_path / 'none'))} does not exist"):
        scan_image_folder(tmp_path / "none")
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(DatasetError, match="is a file, not a folder"):
        scan_image_folder(tmp_path / "notes.txt")


@pytest.mark.parametrize(
    ("link", "fetch"),
    [
        ("https://example.com/sets/bees.zip?dl=1", "curl -L -o bees.zip 'https://example.com/sets/bees.zip?dl=1'"),
        ("s3://bucket/sets/bees/", "aws s3 sync s3://bucket/sets/bees bees"),
        ("gs://bucket/bees", "gcloud storage cp -r gs://bucket/bees ."),
    ],
)
def test_a_url_given_as_the_data_set_says_to_download_it(link, fetch):
    """A Kaggle or Roboflow link: "Data folder https:/example.com/... does not exist", its slashes joined."""
    from headstart.tasks.detect.data import scan_yolo_dataset
    from headstart.tasks.multilabel.data import scan_data

    said = f"is a URL: headstart reads a folder on this machine. Download it first ({fetch}), unpack"
    for scan in (scan_image_folder, scan_yolo_dataset, lambda p: scan_data(str(p), 0.2, 0)):
        with pytest.raises(DatasetError, match=re.escape(said)):
            scan(link)


def test_pictures_in_other_forms_are_named_with_what_to_do(tmp_path):
    """A photographer's RAW files, a hospital's DICOM, videos: "not an image", and where they were all the data set
    held, "Found 0 class(es) with images" and nothing more."""
    root = tmp_path / "data"
    for label, suffix in (("ants", ".NEF"), ("bees", ".cr2")):
        (root / label).mkdir(parents=True)
        for k in range(3):
            (root / label / f"{k}{suffix}").write_bytes(b"II*\x00raw sensor data")
    with pytest.raises(
        DatasetError, match=re.escape("Of the files ignored, 6 are camera RAW photos: export them as JPEG")
    ):
        scan_image_folder(root)
    good = make_image_folder(tmp_path / "good", {"ants": 4, "bees": 4})
    (good / "ants" / "scan.dcm").write_bytes(b"DICM")
    (good / "bees" / "clip.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42")
    (good / "bees" / "notes.txt").write_text("x")
    ignored = dict(scan_image_folder(good).ignored)
    assert ignored[str(good / "ants" / "scan.dcm")] == (
        "DICOM, not read: convert them to PNG first (pydicom, or dcmj2pnm from dcmtk)"
    )
    assert ignored[str(good / "bees" / "clip.mp4")].startswith("a video, not read: extract frames first (ffmpeg")
    assert ignored[str(good / "bees" / "notes.txt")] == "not an image"


def test_a_labels_csv_saved_as_unicode_text_by_excel_is_read(tmp_path):
    """Excel's "Unicode Text" is UTF-16 (tab-separated): "Cannot read ... Save it as UTF-8 text"."""
    from headstart.tasks import config_for_data

    root = make_image_folder(tmp_path / "d", {"red": 6, "blue": 6})
    images = sorted(root.rglob("*.jpg"))
    text = "image\tlabel\r\n" + "".join(f"{p.relative_to(root)}\t{p.parent.name}\r\n" for p in images)
    (root / "train.csv").write_bytes(text.encode("utf-16"))
    assert config_for_data(str(root / "train.csv")).task == "classify"
    report = scan_image_folder(root / "train.csv", val_fraction=0.25, seed=1)
    assert report.labels == ["blue", "red"] and sum(len(v) for v in report.splits.values()) == 12
    (root / "train.csv").write_bytes(text.encode("cp1252").replace(b"red", b"r\xe9d"))  # neither: said
    with pytest.raises(DatasetError, match="Save it as UTF-8 text"):
        scan_image_folder(root / "train.csv")
