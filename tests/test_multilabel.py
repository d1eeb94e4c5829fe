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
from headstart.tasks.multilabel.data import multi_hot, scan_csv
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
            writer.writerow([name, *(int(s in present) for s in SHAPES), "Valid" if i % 4 == 0 else "train"])
    again = scan_csv(multi)  # "valid", as Roboflow names the split, is val
    assert again.labels == list(SHAPES)
    assert {k: len(v) for k, v in again.splits.items()} == {k: len(v) for k, v in report.splits.items()}
    assert {s.path.name: {again.labels[k] for k in s.labels} for ss in again.splits.values() for s in ss} == by_name
    assert config_for_data(str(multi)).task == "multilabel" and config_for_data(str(tmp_path)).task == "multilabel"


def test_multi_label_tables_as_others_write_them(tmp_path):
    """Planet's tables (``image_name,tags``, the ids' files in train-jpg/), NIH's labels separated by ``|``, 0/1
    columns beside an id or a size column (its values had every row skipped: "holds something other than 0 or 1"),
    and pandas' 1.0/0.0 or yes/no for the 0/1."""
    path, truth = make_csv_set(tmp_path, 16)
    expected = scan_csv(path)
    by_name = {s.path.name: {expected.labels[k] for k in s.labels} for ss in expected.splits.values() for s in ss}
    (tmp_path / "train-jpg").mkdir()
    for name in truth:
        shutil.move(tmp_path / name, tmp_path / "train-jpg" / Path(name).name)
    stems = {Path(name).stem: present for name, present in truth.items()}

    def read(header: str, rows: list[str]):
        (tmp_path / "labels.csv").write_text(header + "\n" + "\n".join(rows) + "\n")
        report = scan_csv(tmp_path)
        got = {s.path.name: {report.labels[k] for k in s.labels} for ss in report.splits.values() for s in ss}
        assert got == by_name and sorted(report.labels) == expected.labels, header
        return " ".join(report.warnings)

    said = read("image_name,tags", [f"{stem},{' '.join(sorted(p))}" for stem, p in stems.items()])
    assert "labels.csv: the table names its images as NAME; read as train-jpg/NAME.jpg" in said
    read("Image,Labels", [f"train-jpg/{stem}.jpg,{'|'.join(sorted(p))}" for stem, p in stems.items()])
    read("image,labels", [f'train-jpg/{stem}.jpg," {"; ".join(sorted(p))}"' for stem, p in stems.items()])
    said = read(
        f"filename,id,{','.join(SHAPES)},width",
        [f"{stem},{i},{','.join(str(int(s in p)) for s in SHAPES)},96" for i, (stem, p) in enumerate(stems.items())],
    )
    assert (
        "columns left out (they hold other things than 1 and 0, so they are not labels): id (e.g. '2'), width" in said
    )
    words = {0: ("0.0", "no"), 1: ("1.0", "Yes")}
    read(
        f"image,{','.join(SHAPES)}",
        [f"{stem},{','.join(words[int(s in p)][i % 2] for s in SHAPES)}" for i, (stem, p) in enumerate(stems.items())],
    )


def test_one_picture_under_two_names_is_reported_as_a_leak_or_a_label_conflict(tmp_path):
    path, truth = make_csv_set(tmp_path, 16, split=True)
    names = list(truth)  # scene_000 is in val (i % 4 == 0), the others in train
    shutil.copy(tmp_path / names[0], tmp_path / "images" / "val_copy.jpg")
    shutil.copy(tmp_path / names[1], tmp_path / "images" / "relabelled.jpg")
    other = "green" if "green" not in truth[names[1]] else "red"
    rows = path.read_text().splitlines()
    rows += [f"images/val_copy.jpg,{' '.join(sorted(truth[names[0]]))},train", f"images/relabelled.jpg,{other},train"]
    path.write_text("\n".join(rows) + "\n")
    warnings = scan_csv(path).warnings
    (leak,) = [w for w in warnings if "leak" in w]
    assert "scene_000.jpg (val:" in leak and "val_copy.jpg (train:" in leak and "relabelled" not in leak
    (conflict,) = [w for w in warnings if "different labels" in w]
    assert f"{Path(names[1]).name} (train: {' '.join(sorted(truth[names[1]])) or '(none)'})" in conflict
    assert f"relabelled.jpg (train: {other})" in conflict and "val_copy" not in conflict
    path.write_text("\n".join(rows[:-2]) + "\n")
    assert not [w for w in scan_csv(path).warnings if "identical" in w]


def test_a_label_seen_only_in_validation_and_an_unreadable_csv_are_refused(tmp_path):
    path, _ = make_csv_set(tmp_path, 12, split=True)
    rows = path.read_text().splitlines()
    rows.append("images/scene_000.jpg,unicorn,val")  # a duplicate: ignored, so add a new image
    shutil.copy(tmp_path / "images" / "scene_001.jpg", tmp_path / "images" / "only_val.jpg")
    rows.append("images/only_val.jpg,unicorn,val")
    path.write_text("\n".join(rows) + "\n")
    with pytest.raises(DatasetError, match="unicorn appear in validation images but in no training image"):
        scan_csv(path)
    (tmp_path / "bad.csv").write_text("picture,tags\na.jpg,x\n")
    with pytest.raises(DatasetError, match="no 'image' column"):
        scan_csv(tmp_path / "bad.csv")
    (tmp_path / "short.csv").write_text("image,a,b\nimages/scene_000.jpg,1\n")  # said "(0 skipped)"
    with pytest.raises(DatasetError, match=r"no readable image \(1 rows skipped, e.g. short.csv:2: 2 cells where"):
        scan_csv(tmp_path / "short.csv")


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
    # the default head: the labels' prototypes, with the backbone's ImageNet classifier beside the features
    assert m["training"]["head"]["classifier"] == "prototype" and m["training"]["head"]["prior"]
    assert m["training"]["head"]["scale"] > 0 and run.config["head"]["prior_classes"] == 1000
    assert m["map_macro"] >= 0.9  # three coloured shapes: the likeness of a scene to each label's mean is enough
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
    # sorted: each scene into the folder of every label it holds (no-label/ for none), the cat into none-of-these/
    sorted_ = model.predict(images, novelty_threshold=1.0, sort_into=tmp_path / "sorted")
    sorted_ += model.predict(PHOTOS / "cat_720p.jpg", sort_into=tmp_path / "sorted")
    assert sorted_[-1].sorted == [str(tmp_path / "sorted" / "none-of-these" / "cat_720p.jpg")]
    for answer in sorted_[:-1]:
        assert [Path(f).parent.name for f in answer.sorted] == ([p.label for p in answer.labels] or ["no-label"])
        assert all(Path(f).name == Path(answer.image).name for f in answer.sorted)
    holds = {d.name: sorted(f.name for f in d.iterdir()) for d in (tmp_path / "sorted").iterdir()}
    assert sum(map(len, holds.values())) == sum(len(a.sorted) for a in sorted_) > len(sorted_)  # some hold two
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
        classifier = "linear" if pooling == "lse" else "prototype"  # the prototype head reads pooled vectors
        run = headstart.train(
            path, tmp_path / f"run{i}", cache_dir=tmp_path / "cache", pooling=pooling, classifier=classifier, **common
        )
        assert run.config["options"]["pooling"] == pooling
    assert not [r for r in caplog.records if "unreadable" in r.getMessage()]
    for run in ("run0", "run2"):  # mean+max, and log-sum-exp over the cells, in the graph: ONNX agrees with PyTorch
        bundle = headstart.export(tmp_path / run, store=False)
        assert bundle.manifest.verification["max_abs_prob_diff"] <= 1e-3
        assert bundle.manifest.verification["label_set_agreement"] == 1.0


def test_the_prototype_head_reads_unit_vectors_with_the_prior_beside_them_and_its_map_agrees():
    """The head of ``--classifier prototype``: unit-length embeddings (the features, and the prior's probabilities'
    square roots beside them, weighted), logits linear in them, and a class map whose mean over the cells is the
    image's logit (so CAM boxes and /classify tell the same story); mean+max vectors feed the prior their mean half."""
    import torch

    from headstart.models import ClassifierHead, HeadConfig

    torch.manual_seed(0)
    for in_features, prior_features in ((8, 8), (16, 8)):  # mean vectors, and mean+max ones
        cfg = HeadConfig(
            in_features,
            3,
            dropout=0.0,
            normalize=True,
            prior_classes=5,
            prior_features=prior_features,
            prior_weight=0.5,
        )
        head = ClassifierHead(cfg).eval()
        assert not head.prior.weight.requires_grad and head.net[-1].in_features == in_features + 5
        head.center.copy_(torch.rand(in_features + 5) / 10)  # what fit_prototypes sets: no logit depends on it
        fmap = torch.rand(4, prior_features, 3, 3) * 6
        cells = torch.cat([fmap, fmap], dim=1) if in_features > prior_features else fmap  # as the wrapper feeds it
        pooled = cells.mean(dim=(2, 3))
        embedded = head.embed(pooled)
        assert torch.allclose(embedded.norm(dim=1), torch.ones(4), atol=1e-6)
        prior = torch.softmax(head.prior(pooled[:, :prior_features]), dim=1).sqrt()
        parts = [pooled / pooled.norm(dim=1, keepdim=True), 0.5 * prior / prior.norm(dim=1, keepdim=True)]
        assert torch.allclose(embedded, torch.cat(parts, dim=1) / 1.25**0.5, atol=1e-6)
        assert torch.allclose(head(pooled), head.net(embedded - head.center), atol=1e-6)
        assert torch.allclose(head.forward_map(cells).mean(dim=(2, 3)), head(pooled), atol=1e-5)
        both = head.forward_with_map(pooled, cells)  # as the model answers: the prior computed once
        assert torch.allclose(both[0], head(pooled)) and torch.allclose(both[1], head.forward_map(cells))
    plain = ClassifierHead(HeadConfig(8, 3, dropout=0.0, normalize=True)).eval()
    x = torch.rand(2, 8)
    assert torch.allclose(plain(x), plain(3 * x), atol=1e-6)  # a cosine: the vector's length does not count
    plain.center.copy_(torch.rand(8) / 10)
    fmap = torch.rand(2, 8, 3, 3)
    assert torch.allclose(plain.forward_map(fmap).mean(dim=(2, 3)), plain(fmap.mean(dim=(2, 3))), atol=1e-5)
    with pytest.raises(ValueError, match="prior"):
        HeadConfig(8, 3, prior_classes=5, prior_features=8, prior_weight=0.5)  # a prior needs normalised features


def test_left_out_cosines_are_those_of_each_label_mean_without_the_image():
    """The prototype head is calibrated on every training view's cosine with each label's mean direction, the
    view's own image left out of the labels it holds; nothing (NaN) where that leaves no image."""
    import torch

    from headstart.tasks.multilabel.fit import _left_out_cosines

    gen = torch.Generator().manual_seed(0)
    n, v, d = 6, 3, 5
    u = torch.nn.functional.normalize(torch.rand(n, v, d, generator=gen), dim=2)
    y = torch.zeros(n, 3, dtype=torch.bool)
    y[[0, 1, 2], 0] = True  # label 0: three images; label 1: image 3 alone; label 2: no image
    y[3, 1] = True
    per_image = u.sum(1)
    sums = y.float().T @ per_image
    got = _left_out_cosines(u, y, per_image, sums)
    for i in range(n):
        for label in range(3):
            others = [j for j in range(n) if y[j, label] and not (y[i, label] and j == i)]
            for k in range(v):
                if not others:
                    assert torch.isnan(got[i, k, label])
                    continue
                mean = per_image[others].sum(0)
                want = torch.dot(u[i, k], mean) / mean.norm()
                assert got[i, k, label] == pytest.approx(float(want), abs=1e-5)


def test_the_backbone_brings_its_imagenet_classifier_only_where_it_is_one_linear_layer(tmp_path):
    """The prior is the backbone's own classifier where the whole model is one linear layer on the mean of its
    feature map and its weights were loaded: not for random weights, a file without the classifier, or a head with
    a norm (ConvNeXt's)."""
    import timm
    import torch
    import torchvision

    from headstart.models import build_backbone

    require_shared()
    shared = build_backbone("torchvision:mobilenet_v2", weights=MOBILENET).classifier
    assert (shared.in_features, shared.out_features) == (1280, 1000) and not shared.weight.requires_grad
    assert build_backbone("torchvision:mobilenet_v2", pretrained=False).classifier is None
    state = timm.create_model("test_resnet").state_dict()
    torch.save(state, tmp_path / "whole.pth")
    torch.save({k: t for k, t in state.items() if not k.startswith("fc.")}, tmp_path / "no_fc.pth")
    assert build_backbone("test_resnet", weights=tmp_path / "whole.pth").classifier is not None
    assert build_backbone("test_resnet", weights=tmp_path / "no_fc.pth").classifier is None
    torch.save(torchvision.models.convnext_tiny().state_dict(), tmp_path / "convnext.pth")
    assert build_backbone("torchvision:convnext_tiny", weights=tmp_path / "convnext.pth").classifier is None


def test_the_prototype_head_options_are_checked(tmp_path):
    from headstart.tasks.multilabel.config import MultiLabelConfig

    common = dict(data_dir=str(tmp_path), out=str(tmp_path / "run"))
    for bad, message in (
        (dict(hidden=64), "no hidden layer"),
        (dict(pooling="lse"), "no hidden layer and no\\s+per-cell pooling"),
        (dict(prior_weight=-1.0), "--prior-weight"),
        (dict(classifier="knn"), "--classifier"),
    ):
        with pytest.raises(ValueError, match=message):
            MultiLabelConfig(**common, **bad).validate()
    MultiLabelConfig(**common, classifier="linear", hidden=64, pooling="lse").validate()


def test_the_prototype_head_is_each_labels_mean_direction_with_calibrated_probabilities():
    """fit_prototypes on features whose labels add known directions: each label's weights point along the mean of
    its training views (at unit length), the center is the views' mean, and the calibration is a logistic
    regression (unweighted: probabilities, not a rare label's weight): per label, the probabilities of the views it
    was fitted on sum to their positives (the biases' ridge aside), and held-out images holding a label score higher
    than those that do not."""
    from types import SimpleNamespace

    import torch

    from headstart.models import HeadConfig
    from headstart.tasks.base import Features
    from headstart.tasks.multilabel.fit import _left_out_cosines, fit_prototypes

    rng = np.random.default_rng(0)
    k, d, views = 3, 16, 2
    directions = rng.random((k, d))  # against noise of twice their size: the labels overlap, the scores are unsure

    def split(n: int) -> Features:
        sets = [sorted(rng.choice(k, size=int(rng.integers(1, 3)), replace=False).tolist()) for _ in range(n)]
        values = [[directions[s].sum(0) + 2 * rng.random(d) for _ in range(views)] for s in sets]
        return Features([SimpleNamespace(labels=s) for s in sets], np.asarray(values, np.float32), [{}] * n)

    train, val = split(40), split(20)
    job = SimpleNamespace(
        device=torch.device("cpu"),
        train_features=train,
        val_features=Features(val.samples, val.values[:, :1], val.extras),
        labels=["a", "b", "c"],
        training_report={},
        history=[],
        cfg=SimpleNamespace(prior_weight=0.0),
        backbone=SimpleNamespace(name="synthetic"),
    )
    head = fit_prototypes(job, HeadConfig(d, k, dropout=0.0, normalize=True))
    y = multi_hot([s.labels for s in train.samples], k)
    unit = train.values / np.linalg.norm(train.values, axis=2, keepdims=True)
    means = y.T @ unit.sum(1)
    weight = head.net[-1].weight.detach().numpy()
    scale = job.training_report["head"]["scale"]
    assert scale > 0 and np.allclose(weight, scale * means / np.linalg.norm(means, axis=1, keepdims=True), atol=1e-4)
    assert np.allclose(head.center.numpy(), unit.mean(axis=(0, 1)), atol=1e-6)

    u = torch.from_numpy(unit)
    cosines = _left_out_cosines(u, torch.from_numpy(y).bool(), u.sum(1), torch.from_numpy(means)).numpy()
    bias = head.net[-1].bias.detach().numpy() - weight @ head.center.numpy()  # the bias before the center folded in
    probs = torch.sigmoid(torch.from_numpy(scale * cosines + bias)).numpy()
    fitted = np.repeat(y[:, None], views, axis=1)
    for label in range(k):
        seen = ~np.isnan(cosines[:, :, label])
        assert probs[:, :, label][seen].sum() == pytest.approx(fitted[:, :, label][seen].sum(), rel=0.05)
    with torch.no_grad():
        scores = torch.sigmoid(head(torch.from_numpy(val.values[:, 0]))).numpy()
    truth = multi_hot([s.labels for s in val.samples], k).astype(bool)
    for label in range(k):  # held-out images holding the label score higher, on the whole
        assert scores[truth[:, label], label].mean() > scores[~truth[:, label], label].mean() + 0.1
    assert job.history[0]["epoch"] == 0 and job.history[0]["val_map"] > 0.7
