"""`headstart convert`: COCO JSON and Pascal VOC detection data sets written as YOLO ones, checked against coco128's
own boxes written in those formats (and back)."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from headstart.cli import main
from headstart.convert import ConvertError, convert
from headstart.tasks.detect.data import label_path, parse_labels, scan_yolo_dataset
from tests.conftest import COCO128, require_shared


def coco128(n: int = 24) -> tuple[list[str], list[tuple]]:
    """coco128's names and its first ``n`` labelled images: (path, width, height, classes, pixel corners)."""
    require_shared()
    names = [str(v) for _, v in sorted(yaml.safe_load((COCO128 / "data.yaml").read_text())["names"].items())]
    out = []
    for image in sorted((COCO128 / "images" / "train2017").glob("*.jpg")):
        if len(out) == n:
            break
        if not label_path(image).is_file():
            continue
        labels = parse_labels(label_path(image), len(names))
        with Image.open(image) as img:
            width, height = img.size
        cx, cy, w, h = labels.boxes.T.astype(float)
        corners = np.stack(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], 1
        )
        out.append((image, width, height, labels.classes.tolist(), corners))
    return names, out


def written_as_coco(root, names, images, layout: str) -> None:
    """The images as a COCO data set: COCO's own layout (annotations/instances_SPLIT2017.json, SPLIT2017/) or a
    Roboflow export's (SPLIT/_annotations.coco.json beside the images; its category 0 the data set, with no box)."""
    split_of = {i: "train" if i < len(images) * 3 // 4 else "val" for i in range(len(images))}
    categories = [{"id": i + 1, "name": n, "supercategory": "thing"} for i, n in enumerate(names)]
    if layout == "roboflow":
        categories = [{"id": 0, "name": "coco-export", "supercategory": "none"}, *categories]
    docs = {s: {"images": [], "annotations": [], "categories": categories} for s in ("train", "val")}
    for i, (image, width, height, classes, corners) in enumerate(images):
        split = split_of[i]
        folder = root / (f"{split}2017" if layout == "coco" else {"train": "train", "val": "valid"}[split])
        folder.mkdir(parents=True, exist_ok=True)
        (folder / image.name).symlink_to(image)
        docs[split]["images"].append({"id": i, "file_name": image.name, "width": width, "height": height})
        for c, (x1, y1, x2, y2) in zip(classes, corners, strict=True):
            bbox = [float(x1), float(y1), float(x2 - x1), float(y2 - y1)]
            docs[split]["annotations"].append(
                {"id": len(docs[split]["annotations"]), "image_id": i, "category_id": c + 1, "bbox": bbox, "iscrowd": 0}
            )
    for split, doc in docs.items():
        if layout == "coco":
            path = root / "annotations" / f"instances_{split}2017.json"
        else:
            path = root / {"train": "train", "val": "valid"}[split] / "_annotations.coco.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc))


def boxes_by_name(data_yaml) -> dict[str, list[tuple]]:
    """Each image's boxes in a YOLO data set, as (class name, cx, cy, w, h) rounded, per split and image name."""
    report = scan_yolo_dataset(data_yaml)
    return {
        f"{split}/{s.path.name}": sorted(
            (report.labels[c], *np.round(b, 4).tolist()) for c, b in zip(s.classes, s.boxes, strict=True)
        )
        for split, samples in report.splits.items()
        for s in samples
    }


@pytest.mark.parametrize("layout", ["coco", "roboflow"])
def test_a_coco_data_set_becomes_the_yolo_one_it_was_written_from(tmp_path, layout):
    names, images = coco128()
    written_as_coco(tmp_path / "src", names, images, layout)
    result = convert(tmp_path / "src", tmp_path / "yolo")
    expected = {}
    for i, (image, *_) in enumerate(images):
        split = "train" if i < len(images) * 3 // 4 else "val"
        labels = parse_labels(label_path(image), len(names))
        expected[f"{split}/{image.name}"] = sorted(
            (names[c], *np.round(b, 4).tolist()) for c, b in zip(labels.classes, labels.boxes, strict=True)
        )
    got = boxes_by_name(tmp_path / "yolo" / "data.yaml")
    assert got.keys() == expected.keys()
    for key in expected:  # the same boxes, to the 4th decimal (pixels through floats and back)
        assert len(got[key]) == len(expected[key]), key
        for a, b in zip(got[key], expected[key], strict=True):
            assert a[0] == b[0] and np.allclose(a[1:], b[1:], atol=2e-4), (key, a, b)
    used = sorted({names[c] for *_, classes, _ in images for c in classes}, key=names.index)
    assert result.labels == used  # the categories with boxes, in the order of their ids
    unused = result.left_out.pop("categories without a box")  # coco128's classes these images do not show
    assert len(unused) == len(names) - len(used) + (layout == "roboflow") and not result.left_out
    assert ("'coco-export'" in unused) == (layout == "roboflow")  # a Roboflow export's data set category
    assert os.path.islink(tmp_path / "yolo" / "images" / "train" / images[0][0].name)  # links, not copies
    assert (tmp_path / "src").is_dir() and not list((tmp_path / "src").rglob("*.txt"))  # the source untouched


def test_a_conversion_that_fails_halfway_leaves_nothing_half_written(tmp_path, monkeypatch):
    """A disk filling up while the images are copied: the empty folder given as --out stays as it was, and no
    temporary folder is left beside it; the next try writes the whole set."""
    names, images = coco128(8)
    written_as_coco(tmp_path / "src", names, images, "coco")
    (tmp_path / "yolo").mkdir()
    copied = []

    def copy_then_fill_the_disk(src, dst, **kwargs):
        if copied:
            raise OSError(28, "No space left on device (simulated)")
        copied.append(shutil.copyfile(src, dst))

    monkeypatch.setattr(shutil, "copy2", copy_then_fill_the_disk)
    with pytest.raises(OSError, match="simulated"):
        convert(tmp_path / "src", tmp_path / "yolo", copy=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "yolo"] and not list((tmp_path / "yolo").iterdir())
    monkeypatch.undo()
    convert(tmp_path / "src", tmp_path / "yolo", copy=True)
    assert len(boxes_by_name(tmp_path / "yolo" / "data.yaml")) == 8
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src", "yolo"]


def test_what_cannot_be_used_is_left_out_and_counted(tmp_path, capsys):
    names, images = coco128(8)
    written_as_coco(tmp_path / "src", names, images, "coco")
    path = tmp_path / "src" / "annotations" / "instances_train2017.json"
    doc = json.loads(path.read_text())
    first = doc["annotations"][0]
    doc["annotations"] += [
        {**first, "id": 900, "iscrowd": 1},  # a crowd region
        {**first, "id": 901, "bbox": [10, 10, 0, 5]},  # no area
        {**first, "id": 902, "image_id": 12345},  # no such image
        {**first, "id": 903, "category_id": 999},  # no such category
        {**first, "id": 904, "bbox": "10 10 5 5"},  # not a list of numbers
        {**first, "id": 905, "bbox": [float("nan"), 1, 2, 3]},  # not a number
        {**first, "id": 906, "image_id": 78},  # on an image that is not one
        {**first, "id": 907, "image_id": [1], "category_id": {"a": 1}},  # ids that cannot be ids
        "a string",
    ]
    (tmp_path / "src" / "train2017" / "broken.jpg").write_bytes(b"not a jpeg")
    doc["images"] += [
        {"id": 77, "file_name": "gone.jpg", "width": 10, "height": 10},  # not on disk
        {"id": 78, "file_name": "broken.jpg", "width": None, "height": "?"},  # no size: the file is asked
        7,
    ]
    for image in doc["images"][:2]:  # sizes missing: read from the images themselves
        if isinstance(image, dict):
            del image["width"], image["height"]
    path.write_text(json.dumps(doc))
    argv = ["convert", str(tmp_path / "src"), "--out", str(tmp_path / "yolo")]
    assert main([*argv, "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    left_out = summary.pop("left_out")
    assert left_out.pop("categories without a box") > 0
    assert left_out == {
        "images listed but not found": 1,
        "entries of 'images' that are not objects": 1,
        "annotations of an image not found": 2,
        "crowd regions (iscrowd)": 1,
        "boxes of no area (or not numbers)": 2,
        "annotations of an unknown category": 1,
        "annotations without a [x, y, width, height] bbox": 1,
        "boxes of an image that cannot be read": 1,
        "entries of 'annotations' that are not objects": 1,
    }
    assert summary["splits"]["train"]["images"] == 7 and summary["splits"]["val"]["images"] == 2  # broken.jpg too
    assert summary["splits"]["train"]["boxes"] == sum(len(c) for *_, c, _ in images[:6])  # the added ones: none
    original = boxes_by_name(COCO128 / "data.yaml")  # the images whose sizes were read: the same boxes
    converted = boxes_by_name(tmp_path / "yolo" / "data.yaml")
    for image, *_ in images[:2]:
        ours, theirs = converted[f"train/{image.name}"], original[f"train/{image.name}"]
        assert [a[0] for a in ours] == [b[0] for b in theirs]
        assert np.allclose([a[1:] for a in ours], [b[1:] for b in theirs], atol=2e-4)
    with pytest.raises(ConvertError, match="exists and is not an empty folder"):
        convert(tmp_path / "src", tmp_path / "yolo")
    with pytest.raises(ConvertError, match="inside the source"):
        convert(tmp_path / "src", tmp_path / "src" / "yolo")
    with pytest.raises(ConvertError, match="neither a COCO JSON data set .* nor a Pascal VOC one"):
        convert(tmp_path / "yolo", tmp_path / "again")
    one = tmp_path / "src" / "annotations" / "instances_train2017.json"
    assert main(["convert", str(one), "--out", str(tmp_path / "one")]) == 0  # the JSON file itself: its split
    assert "then: headstart train" in capsys.readouterr().out
    assert yaml.safe_load((tmp_path / "one" / "data.yaml").read_text())["train"] == "images/train"
    val = tmp_path / "src" / "annotations" / "instances_val2017.json"
    doc = json.loads(val.read_text())
    val.write_text(json.dumps({**doc, "images": [{**i, "file_name": f"x{i['file_name']}"} for i in doc["images"]]}))
    assert main(["convert", str(tmp_path / "src"), "--out", str(tmp_path / "no-val"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)  # the val images gone: no val folder named in data.yaml
    assert list(summary["splits"]) == ["train"] and summary["left_out"]["splits without an image left"] == 1
    assert "val" not in yaml.safe_load((tmp_path / "no-val" / "data.yaml").read_text())
    (tmp_path / "src" / "annotations" / "instances_extra.json").write_text("{}")
    with pytest.raises(ConvertError, match="cannot tell which split 'extra' is"):
        convert(tmp_path / "src", tmp_path / "two")


def written_as_voc(root, names, images, lists: str) -> None:
    """The images as Pascal VOC: one XML per image (corners counted from 1), JPEGImages/, and split lists (``lists``:
    train.txt or trainval.txt for the training split, or none); an XML that is not one, an object without a name."""
    (root / "Annotations").mkdir(parents=True)
    (root / "JPEGImages").mkdir()
    for image, width, height, classes, corners in images:
        (root / "JPEGImages" / image.name).symlink_to(image)
        objects = "".join(
            f"<object><name>{names[c]}</name><difficult>0</difficult><bndbox><xmin>{x1 + 1:.3f}</xmin>"
            f"<ymin>{y1 + 1:.3f}</ymin><xmax>{x2 + 1:.3f}</xmax><ymax>{y2 + 1:.3f}</ymax></bndbox></object>"
            for c, (x1, y1, x2, y2) in zip(classes, corners, strict=True)
        )
        difficult = "<object><name>zebra</name><difficult>1</difficult><bndbox><xmin>1</xmin><ymin>1</ymin>"
        difficult += "<xmax>9</xmax><ymax>9</ymax></bndbox></object><object><name> </name></object>"
        (root / "Annotations" / f"{image.stem}.xml").write_text(
            f"<annotation><filename>{image.name}</filename><size><width>{width}</width><height>{height}</height>"
            f"<depth>3</depth></size>{objects}{difficult}</annotation>"
        )
    (root / "Annotations" / "broken.xml").write_text("<annotation><object>")
    if lists != "none":
        (root / "ImageSets" / "Main").mkdir(parents=True)
        stems = [image.stem for image, *_ in images]
        (root / "ImageSets" / "Main" / f"{lists}.txt").write_text("\n".join(stems[:6]) + "\n")
        (root / "ImageSets" / "Main" / "val.txt").write_text("\n".join([*stems[6:], "no_such_image"]) + "\n")


@pytest.mark.parametrize("lists", ["train", "trainval", "none"])
def test_a_pascal_voc_data_set_becomes_the_yolo_one_it_was_written_from(tmp_path, lists):
    names, images = coco128(8)
    written_as_voc(tmp_path / "VOCdevkit" / "VOC2012", names, images, lists)
    result = convert(tmp_path, tmp_path.parent / f"{tmp_path.name}-yolo")  # VOCdevkit/VOC2012 found inside
    # without split lists every image is in train (training then validates on a random fifth of them)
    splits = {"train": images[:6], "val": images[6:]} if lists != "none" else {"train": images}
    written = yaml.safe_load((result.out / "data.yaml").read_text())
    assert {s: sorted(p.name for p in (result.out / written[s]).iterdir()) for s in splits} == {
        s: sorted(image.name for image, *_ in chosen) for s, chosen in splits.items()
    }
    got = {key.split("/")[1]: boxes for key, boxes in boxes_by_name(result.out / "data.yaml").items()}
    assert sorted(got) == sorted(image.name for image, *_ in images)
    for image, *_ in images:
        labels = parse_labels(label_path(image), len(names))
        expected = sorted((names[c], *b) for c, b in zip(labels.classes, labels.boxes.tolist(), strict=True))
        for a, b in zip(got[image.name], expected, strict=True):
            assert a[0] == b[0] and np.allclose(a[1:], b[1:], atol=2e-4), (image.name, a, b)
    assert result.labels == sorted({names[c] for *_, classes, _ in images for c in classes})  # no zebra
    assert len(result.left_out.pop("objects marked difficult")) == len(result.left_out.pop("objects without a name"))
    assert [line.split(" (")[0] for line in result.left_out.pop("annotation files that cannot be read")] == [
        "broken.xml"
    ]
    missing = {"images of a split list without an annotation": ["val/no_such_image"]}
    assert result.left_out == (missing if lists != "none" else {})
