"""Multi-label classification (the third task, ``training/tasks/multilabel/``): the CSV and YOLO data sets and their
checks, thresholds chosen on validation, the metrics, and the answer everywhere it goes (export, predict,
predict-batch, /classify, /info)."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cli import main
from headstart.data import DatasetError
from headstart.tasks import config_for_data
from headstart.tasks.multilabel.data import scan_csv
from headstart.tasks.multilabel.metrics import average_precision, choose_thresholds, mean_average_precision

from .conftest import COCO128, MOBILENET, PHOTOS, require_shared, serving

SHAPES = ("red", "blue", "green")


def scene(present: set[str], rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Noisy grey with any of a red square, a blue disc and a green bar, at random places."""
    img = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    s = size // 3
    if "red" in present:
        x, y = rng.integers(0, size - s, size=2)
        img[y : y + s, x : x + s] = (220, 30, 30)
    if "blue" in present:
        x, y = rng.integers(0, size - s, size=2)
        yy, xx = np.mgrid[:size, :size]
        img[(yy - y - s // 2) ** 2 + (xx - x - s // 2) ** 2 < (s // 2) ** 2] = (30, 30, 220)
    if "green" in present:
        y = rng.integers(0, size - s // 3)
        img[y : y + s // 3, :] = (30, 200, 30)
    return Image.fromarray(img)


def make_csv_set(root: Path, n: int, seed: int = 0, split: bool = False) -> tuple[Path, dict[str, set[str]]]:
    """``n`` scenes and ``root/labels.csv`` (image,labels[,split]); returns the CSV and each image's labels."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    truth, rows = {}, [["image", "labels", *(["split"] if split else [])]]
    for i in range(n):
        present = {name for name in SHAPES if rng.random() < 0.45}
        name = f"images/scene_{i:03d}.jpg"
        scene(present, rng).save(root / name)
        truth[name] = present
        rows.append([name, " ".join(sorted(present)), *(["val" if i % 4 == 0 else "train"] if split else [])])
    with (root / "labels.csv").open("w", newline="") as f:
        csv.writer(f).writerows(rows)
    return root / "labels.csv", truth


def test_the_csv_layouts_and_what_the_data_check_reports(tmp_path):
    path, truth = make_csv_set(tmp_path, 24, split=True)
    good = path.read_text()
    (tmp_path / "images" / "broken.jpg").write_bytes((tmp_path / "images" / "scene_000.jpg").read_bytes()[:300])
    extra = [
        "images/missing.jpg,red,train",  # no such file
        "images/broken.jpg,blue,train",  # truncated
        "images/scene_001.jpg,red blue,train",  # named twice: the first row counts
        "images/scene_002.jpg,red,holdout",  # a split that is not train/val/test
        "images/scene_003.jpg,red",  # too few cells
    ]
    path.write_text(good + "\n".join(extra) + "\n")
    report = scan_csv(path)
    assert report.labels == ["blue", "green", "red"] and report.split_source == "split column"
    assert {Path(p).name for p, _ in report.corrupt} == {"missing.jpg", "broken.jpg"}
    assert report.duplicates == [str(tmp_path / "images" / "scene_001.jpg")]
    reasons = dict(report.skipped_rows)
    assert "holdout" in reasons["labels.csv:29"] and "2 cells" in reasons["labels.csv:30"]
    by_name = {s.path.name: {report.labels[k] for k in s.labels} for ss in report.splits.values() for s in ss}
    assert by_name == {Path(k).name: v for k, v in truth.items()}  # images without a label kept, with none
    assert (
        sum(1 for v in truth.values() if not v) == report.counts()["train"]["(none)"] + report.counts()["val"]["(none)"]
    )
    text = report.format()
    assert "missing.jpg" in text and "broken.jpg" in text and "named in more than one row" in text

    # the multi-hot layout of the same data gives the same data set
    multi = tmp_path / "multi.csv"
    with multi.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["image", *SHAPES, "split"])
        for i, (name, present) in enumerate(truth.items()):
            writer.writerow([name, *(int(s in present) for s in SHAPES), "val" if i % 4 == 0 else "train"])
    again = scan_csv(multi)
    assert again.labels == list(SHAPES)
    assert {s.path.name: {again.labels[k] for k in s.labels} for ss in again.splits.values() for s in ss} == by_name
    assert config_for_data(str(multi)).task == "multilabel" and config_for_data(str(tmp_path)).task == "multilabel"


def test_a_label_seen_only_in_validation_and_an_unreadable_csv_are_refused(tmp_path):
    path, _ = make_csv_set(tmp_path, 12, split=True)
    rows = path.read_text().splitlines()
    rows.append("images/scene_000.jpg,unicorn,val")  # a duplicate: ignored, so add a new image
    shutil.copy(tmp_path / "images" / "scene_001.jpg", tmp_path / "images" / "only_val.jpg")
    rows.append("images/only_val.jpg,unicorn,val")
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="unicorn appear in validation images but in no training image"):
        scan_csv(path)
    (tmp_path / "bad.csv").write_text("file,tags\na.jpg,x\n")
    with pytest.raises(DatasetError, match="no 'image' column"):
        scan_csv(tmp_path / "bad.csv")


def test_average_precision_and_thresholds():
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    truth = np.array([1, 0, 1, 0, 1])
    assert average_precision(scores, truth) == pytest.approx((1 / 1 + 2 / 3 + 3 / 5) / 3)
    assert average_precision(scores, np.zeros(5)) is None
    probs = np.array([[0.9, 0.2], [0.8, 0.1], [0.3, 0.7], [0.2, 0.6]])
    y = np.array([[1, 0], [1, 0], [0, 1], [0, 1]])
    maps = mean_average_precision(probs, y)
    assert maps["map_macro"] == 1.0 and maps["ap"] == [1.0, 1.0]
    chosen = choose_thresholds(probs, y, ["a", "b"], min_positives=2)
    assert 0.3 < chosen["global"] <= 0.6 and set(chosen["per_label"]) == {"a", "b"}
    assert choose_thresholds(probs, y, ["a", "b"], min_positives=3)["per_label"] == {}  # too few positives each


def train_scenes(path: Path, out: Path, cache: Path) -> headstart.Run:
    """A multi-label model of the scenes at ``path`` on the shared MobileNetV2 (a random backbone's features cannot
    tell a photo from the scenes: "none of these" needs real ones)."""
    require_shared()
    return headstart.train(
        path,
        out=out,
        backbone="torchvision:mobilenet_v2",
        weights=MOBILENET,
        views=2,
        epochs=40,
        batch_size=16,
        lr=1e-2,
        cache_dir=cache,
        progress=False,
        min_label_positives=5,
    )


def test_a_csv_set_trains_exports_predicts_and_serves(tmp_path, capsys):
    path, _ = make_csv_set(tmp_path / "data", 64, split=True)
    run = train_scenes(path, tmp_path / "run", tmp_path / "cache")
    m = run.metrics
    val_count = sum(1 for line in path.read_text().splitlines() if line.endswith(",val"))
    assert run.task == "multilabel" and m["thresholds"]["chosen_on"] == f"{val_count} validation images"
    assert 0 <= m["map_macro"] <= 1 and 0 <= m["sample_f1"] <= 1 and set(m["per_label"]) == set(SHAPES)
    for name in ("precision_recall.png", "worst_predictions.png", "predictions.csv", "training_curves.png"):
        assert (run.dir / name).is_file(), name

    # predictions.csv round trip: each row's predicted labels are its scores at the thresholds
    limits = {k: m["thresholds"]["per_label"].get(k, m["thresholds"]["global"]) for k in SHAPES}
    with (run.dir / "predictions.csv").open() as f:
        for row in csv.DictReader(f):
            scores = json.loads(row["scores"])
            assert set(row["predicted"].split()) == {k for k, v in scores.items() if v >= limits[k]}
            assert (row["unknown"] == "True") == (float(row["novelty"]) > m["open_set"]["threshold"])

    # "none of these": a novelty threshold keeping 95% of the validation images (the training images are its bank)
    novelty = m["open_set"]
    assert novelty["kept_rate"] == 0.95 and novelty["val_kept"] == pytest.approx(0.95, abs=0.07)
    assert (run.dir / "open_set.safetensors").is_file()

    bundle = run.export(store=False, int8=True)
    assert bundle.manifest.task == "multilabel" and bundle.manifest.thresholds == m["thresholds"]
    assert bundle.manifest.verification["label_set_agreement"] == 1.0
    assert bundle.manifest.open_set["threshold"] == novelty["threshold"]
    assert bundle.manifest.verification["novelty_max_abs_diff"] <= 1e-3

    model = headstart.load(bundle.dir)
    images = sorted((tmp_path / "data" / "images").glob("*.jpg"))[:6]
    answers = model.predict(images, top_k=3, novelty_threshold=1.0)  # none of them "none of these"
    for answer in answers:
        scores = {p.label: p.score for p in answer.predictions}
        assert not answer.unknown and answer.novelty <= 1.0
        assert {p.label for p in answer.labels} == {k for k, v in scores.items() if v >= limits[k]}
    assert all(len(a.labels) == 3 for a in model.predict(images, label_threshold=0.0, novelty_threshold=1.0))
    assert all(a.labels == [] for a in model.predict(images, label_threshold=1.0))
    # a real photo is unlike every scene the model learned: none of these, whatever its label scores
    other = model.predict(PHOTOS / "cat_720p.jpg", label_threshold=0.0)[0]
    assert other.unknown and other.novelty > novelty["threshold"] and other.labels == []
    answers = model.predict(images, top_k=3)  # as served: the model's own novelty threshold

    # the same through the command line, a person's line and JSON
    assert main(["predict", str(bundle.dir), str(images[0]), "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert [p["label"] for p in printed["labels"]] == [p.label for p in answers[0].labels]
    assert main(["predict", str(bundle.dir), str(images[0])]) == 0
    line = capsys.readouterr().out.strip()
    shown = ", ".join(f"{p.label} {p.score:.3f}" for p in answers[0].labels) or "no label (best: "
    assert line.startswith(f"{images[0]}: {shown}")

    # evaluate: the run and its bundle score the same images alike
    by_run = run.evaluate(path, tmp_path / "eval-run")
    by_bundle = headstart.evaluate(bundle, path, tmp_path / "eval-bundle", precision="fp32")
    assert by_run["num_images"] == by_bundle["num_images"] == val_count  # its test split, else val, else all
    assert by_run["map_macro"] == pytest.approx(by_bundle["map_macro"], abs=1e-4)
    kept = [json.loads((tmp_path / d / "metrics.json").read_text())["open_set"] for d in ("eval-run", "eval-bundle")]
    assert kept[0] == pytest.approx(kept[1], abs=1e-3) and 0.5 <= kept[0]["kept"] <= 1.0

    # served: /classify answers the labels, /info the thresholds; label_threshold overrides them, or is a 400
    with serving(str(bundle.dir), tmp_path / "server.log") as (url, _, _):
        with images[0].open("rb") as f:
            data = f.read()
        answer = httpx.post(f"{url}/classify", files={"image": ("a.jpg", data, "image/jpeg")}, timeout=60).json()
        assert [p["label"] for p in answer["labels"]] == [p.label for p in answers[0].labels]
        assert answer["novelty_threshold"] == novelty["threshold"] and answer["unknown"] == answers[0].unknown
        every = httpx.post(
            f"{url}/classify",
            files={"image": ("a.jpg", data, "image/jpeg")},
            data={"label_threshold": "0", "novelty_threshold": "1"},
            timeout=60,
        ).json()
        assert len(every["labels"]) == 3
        cat = (PHOTOS / "cat_720p.jpg").read_bytes()
        unknown = httpx.post(f"{url}/classify", files={"image": ("c.jpg", cat, "image/jpeg")}, timeout=60).json()
        assert unknown["unknown"] and unknown["labels"] == []
        bad = httpx.post(
            f"{url}/classify", files={"image": ("a.jpg", data, "image/jpeg")}, data={"label_threshold": "2"}, timeout=60
        )
        assert bad.status_code == 400 and bad.json()["field"] == "label_threshold"
        boxes = httpx.post(f"{url}/localize", files={"image": ("a.jpg", data, "image/jpeg")}, timeout=60).json()
        assert [p["label"] for p in boxes["labels"]] == [p.label for p in answers[0].labels]
        info = httpx.get(f"{url}/info", timeout=30).json()
        assert info["task"] == "multilabel" and info["thresholds"] == m["thresholds"]
        assert info["open_set"]["threshold"] == novelty["threshold"]


@pytest.mark.slow
def test_a_yolo_set_trains_as_image_level_labels(tmp_path):
    """coco128 with --task multilabel: each image holds the classes of its boxes; a folder holding both a labels CSV
    and a data.yaml is refused until --task says which."""
    from headstart.tasks.multilabel.data import scan_data

    report = scan_data(str(COCO128), 0.2, 0)
    assert len(report.labels) == 80
    for sample in report.splits["train"][:20]:
        label_file = COCO128 / "labels" / "train2017" / f"{sample.path.stem}.txt"
        classes = {int(line.split()[0]) for line in label_file.read_text().splitlines() if line.strip()}
        assert set(sample.labels) == classes

    both = tmp_path / "both"
    shutil.copytree(COCO128, both, symlinks=True)
    (both / "labels.csv").write_text("image,labels\n")
    with pytest.raises(ValueError, match="Say which with --task detect or --task multilabel"):
        config_for_data(str(both))
    assert config_for_data(str(both), "multilabel").task == "multilabel"

    assert (
        main(
            [
                "train",
                str(COCO128),
                "--task",
                "multilabel",
                "--out",
                str(tmp_path / "run"),
                "--backbone",
                "test_resnet",
                "--no-pretrained",
                "--views",
                "1",
                "--epochs",
                "3",
                "--cache-dir",
                str(tmp_path / "cache"),
                "--no-progress",
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["task"] == "multilabel" and np.isfinite(metrics["map_macro"])


def test_crossval_gives_finite_reproducible_figures(tmp_path, capsys):
    path, _ = make_csv_set(tmp_path / "data", 36, seed=3)
    summaries = []
    for out in ("a", "b"):
        args = ["crossval", str(path), "--out", str(tmp_path / out), "--folds", "3", "--backbone", "test_resnet"]
        args += ["--no-pretrained", "--views", "1", "--epochs", "6", "--cache-dir", str(tmp_path / "cache")]
        assert main([*args, "--no-progress", "--json"]) == 0
        summaries.append(json.loads(capsys.readouterr().out))
    a, b = summaries
    assert [r["test_images"] for r in a["per_fold"]] == [12, 12, 12]
    for metric in ("map_macro", "map_micro", "micro_f1", "sample_f1"):
        assert np.isfinite(a[metric]["mean"]) and np.isfinite(a[metric]["std"])
        assert [r[metric] for r in a["per_fold"]] == [r[metric] for r in b["per_fold"]]  # same seed, same figures
    assert (tmp_path / "a" / "crossval.json").is_file() and (tmp_path / "a" / "fold-3" / "metrics.json").is_file()


def test_mean_and_mean_max_features_keep_apart_in_the_cache(tmp_path, caplog):
    """--pooling changes what every split's cached vectors are (the clean validation ones too): runs with either
    share one cache without reading each other's files."""
    import logging

    path, _ = make_csv_set(tmp_path / "data", 24, split=True)
    common = dict(backbone="test_resnet", pretrained=False, views=1, epochs=2, progress=False)
    caplog.set_level(logging.WARNING, logger="headstart")
    for i, pooling in enumerate(("meanmax", "mean", "lse", "meanmax")):
        run = headstart.train(path, tmp_path / f"run{i}", cache_dir=tmp_path / "cache", pooling=pooling, **common)
        assert run.config["options"]["pooling"] == pooling
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]
    for run in ("run0", "run2"):  # mean+max, and log-sum-exp over the cells, in the graph: ONNX agrees with PyTorch
        bundle = headstart.export(tmp_path / run, store=False)
        assert bundle.manifest.verification["max_abs_prob_diff"] <= 1e-3
        assert bundle.manifest.verification["label_set_agreement"] == 1.0
