"""'None of these': the novelty score, its calibrated threshold, and the data audit.

Fast tests of the parts first (calibration, the bank, the score, AUROC, the audit's three findings on synthetic
features, the setting, a run without a bank); then end to end on the real hymenoptera classifier: photos of other
things are answered "unknown" while its own validation images are kept, every runtime and the int8 file agree,
a bundle without a novelty score still serves, the per-request override, the heatmap, `evaluate --other`, and the
audit finding labels flipped on purpose and a duplicate planted across train and val.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from headstart.models import Novelty, NoveltyConfig, feature_bank
from headstart.open_set import calibrate, choose_bank
from headstart.service.preprocess import decode_image
from headstart.tasks.classify.audit import label_issues, near_duplicates, outliers
from headstart.tasks.classify.metrics import auroc
from tests.conftest import COCO128, HYMENOPTERA, MOBILENET, PHOTOS

#: real photos of things that are neither ants nor bees: the shared photos (a cat, a bird, a dragonfly, a hot dog,
#: Grace Hopper, three camera shots) and COCO images (people, streets, animals, food; no insects)
OTHER_THINGS = (
    sorted(p for p in PHOTOS.rglob("*") if p.suffix.lower() in (".jpg", ".bmp"))
    + sorted((COCO128 / "images" / "train2017").glob("*.jpg"))[:40]
)


# ---------------------------------------------------------------- the parts


@pytest.mark.parametrize("n", [20, 21, 153, 7])
def test_calibration_keeps_the_rate_and_no_image_sits_on_the_threshold(n):
    scores = np.random.default_rng(n).uniform(0.1, 0.6, n)
    targets = np.arange(n) % 2
    threshold, calibration = calibrate(scores, targets, ["a", "b"], 0.95)
    kept = scores <= threshold
    assert kept.mean() >= 0.95 and (kept.sum() - 1) / n < 0.95  # the fewest images that reach the rate
    assert not np.isclose(scores, threshold).any()
    assert calibration["images"] == n and set(calibration["per_class_kept"]) == {"a", "b"}


def test_the_bank_keeps_every_class_in_proportion_and_all_when_it_fits():
    labels = np.array([0] * 900 + [1] * 90 + [2] * 10)
    rows = choose_bank(labels, 100, seed=0)
    assert len(rows) <= 100 and np.bincount(labels[rows]).tolist() == [90, 9, 1]
    assert (rows == choose_bank(labels, 100, seed=0)).all()  # the seed decides
    assert (choose_bank(labels, 1000, seed=0) == np.arange(1000)).all()


def test_the_score_is_the_mean_cosine_distance_to_the_nearest_bank_rows():
    bank = torch.eye(4)  # four orthogonal directions
    novelty = Novelty(feature_bank(bank), NoveltyConfig(k=2, threshold=0.5, kept_rate=0.95))
    x = torch.tensor([[3.0, 0, 0, 0], [1.0, 1.0, 0, 0], [0, 0, 0, -1.0]])
    got = novelty(x).tolist()
    assert got == pytest.approx([0.5, 1 - np.sqrt(0.5), 1.0], abs=1e-3)  # float16 bank
    assert novelty.k == 2 and Novelty(feature_bank(bank[:1]), NoveltyConfig(5, 0.5, 0.95)).k == 1


def test_auroc_counts_pairs_and_ties():
    assert auroc(np.array([0.1, 0.2]), np.array([0.3, 0.4])) == 1.0
    assert auroc(np.array([0.3, 0.4]), np.array([0.1, 0.2])) == 0.0
    assert auroc(np.array([0.1, 0.3]), np.array([0.2, 0.3])) == pytest.approx(0.625)  # 2.5 of 4 pairs


def clusters(per_class: int = 40, classes: int = 3, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Unit feature vectors around one direction per class."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, 64))
    y = np.repeat(np.arange(classes), per_class)
    x = centres[y] + 0.6 * rng.normal(size=(len(y), 64))
    return x / np.linalg.norm(x, axis=1, keepdims=True), y


def test_the_audit_puts_flipped_labels_first():
    x, y = clusters()
    flipped = [3, 50, 97]
    given = y.copy()
    given[flipped] = (y[flipped] + 1) % 3
    issues = label_issues(x, given, ["a", "b", "c"], [f"img{i}" for i in range(len(y))], seed=0)
    top = [int(f["path"][3:]) for f in issues[:3]]
    assert sorted(top) == flipped
    assert all(f["suggested"] == "abc"[y[int(f["path"][3:])]] for f in issues[:3])


def test_the_audit_finds_duplicates_and_outliers():
    x, y = clusters(per_class=20)
    x = np.concatenate([x, x[:1]])  # image 60: the same file as image 0, in val
    paths = [f"img{i}" for i in range(len(x))]
    sha = [str(i) for i in range(60)] + ["0"]
    pairs = near_duplicates(x, ["train"] * 60 + ["val"], paths, sha)
    assert pairs[0] == {"paths": ["img0", "img60"], "splits": "train-val", "similarity": 1.0, "identical_files": True}
    far = x.copy()
    far[5] = -far[5]  # a class-0 image pointing away from its class
    found = outliers(far[:60], y, ["a", "b", "c"], paths[:60])
    assert found[0]["path"] == "img5" and found[0]["outlier"] and not found[-1]["outlier"]


def test_the_novelty_threshold_setting_is_checked():
    from headstart.service.settings import Settings, SettingsError

    assert Settings.from_env({}).novelty_threshold is None
    assert Settings.from_env({"HEADSTART_NOVELTY_THRESHOLD": "0.4"}).novelty_threshold == 0.4
    for bad in ("abc", "-0.1", "2.5", "nan"):
        with pytest.raises(SettingsError, match="HEADSTART_NOVELTY_THRESHOLD"):
            Settings.from_env({"HEADSTART_NOVELTY_THRESHOLD": bad})


def without_bank(run: Path, tmp_path: Path) -> Path:
    """A copy of a run as headstart wrote it before the novelty score existed: no open_set.safetensors."""
    old = tmp_path / "old-run"
    shutil.copytree(run, old)
    (old / "open_set.safetensors").unlink()
    return old


def test_a_run_and_a_bundle_without_a_bank_answer_without_the_open_set_fields(tiny_run, tmp_path):
    from headstart.exporter import export_bundle
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images

    assert (tiny_run / "open_set.safetensors").is_file()
    old = without_bank(tiny_run, tmp_path)
    model = RunModel(load_run(old))
    assert model.open_set is None and model.output_names == ["probabilities", "class_map"]
    result = export_bundle(old, tmp_path / "bundle", store=False)
    assert result.manifest.open_set is None and result.manifest.output_names == ["probabilities", "class_map"]
    bundle = load_bundle(result.bundle_dir)
    image = decode_image(next((tiny_run.parent / "data" / "val" / "red").glob("*.jpg")))
    for m in (model, bundle):
        answer = classify_images(m, [image], 2)[0]
        assert answer["unknown"] is None and answer["novelty"] is None and len(answer["predictions"]) == 2


# ---------------------------------------------------------------- end to end on the real classifier


def val_images() -> list[Path]:
    return sorted((HYMENOPTERA / "val").rglob("*.jpg"))


def test_other_things_are_none_of_these_and_the_classes_are_kept(hymenoptera_bundle):
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images

    bundle = load_bundle(hymenoptera_bundle.bundle_dir, runtime="onnxruntime")
    open_set = bundle.open_set
    assert open_set["kept_rate"] == 0.95 and open_set["k"] == 5
    own = [classify_images(bundle, [decode_image(p)])[0] for p in val_images()]
    other = [classify_images(bundle, [decode_image(p)])[0] for p in OTHER_THINGS]
    kept = np.mean([not a["unknown"] for a in own])
    unknown = np.mean([a["unknown"] for a in other])
    assert kept >= 0.95, kept  # the rate the threshold was set at, on the images it was set on
    assert unknown >= 0.9, unknown  # measured: 0.96-0.98
    assert all(a["novelty_threshold"] == open_set["threshold"] for a in own + other)


def test_every_runtime_precision_and_the_int8_file_agree_on_none_of_these(hymenoptera_bundle):
    from headstart.open_set import NOVELTY_TOLERANCE
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import scores_and_novelty
    from headstart.service.preprocess import preprocess
    from headstart.tasks.classify.export import INT8_NOVELTY_TOLERANCE

    pixels = np.stack(
        [
            preprocess(decode_image(p), hymenoptera_bundle.manifest.preprocess)
            for p in val_images()[::3] + OTHER_THINGS[::2]
        ]
    )
    reference = load_bundle(hymenoptera_bundle.bundle_dir, runtime="onnxruntime")
    threshold = reference.open_set["threshold"]
    _, want = scores_and_novelty(reference, pixels)
    runtimes = hymenoptera_bundle.manifest.runtimes
    for variant, runtime, precision, tolerance in (
        ("fp32", "openvino", "fp32", 1e-4),
        ("fp32", "openvino", "auto", NOVELTY_TOLERANCE),  # bf16 where the CPU has it and the export allowed it
        ("int8", "onnxruntime", "auto", INT8_NOVELTY_TOLERANCE),
        ("int8", "openvino", "auto", INT8_NOVELTY_TOLERANCE),
    ):
        bundle = load_bundle(hymenoptera_bundle.bundle_dir, variant=variant, runtime=runtime, precision=precision)
        assert bundle.open_set["threshold"] == threshold  # one threshold, whatever computes the score
        _, got = scores_and_novelty(bundle, pixels)
        what = f"{variant} on {runtime} ({bundle.precision})"
        assert np.abs(got - want).max() <= tolerance, what
        assert ((got > threshold) == (want > threshold)).mean() >= 0.97, what
    for rows in runtimes.values():  # the export measured each and allowed it
        for row in rows.values():
            assert row["novelty_max_abs_diff"] <= NOVELTY_TOLERANCE and row["allowed"], row


def test_the_run_writes_predictions_and_the_audit(hymenoptera_run):
    metrics = json.loads((hymenoptera_run / "metrics.json").read_text())
    with open(hymenoptera_run / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["num_images"] == 153
    assert set(rows[0]) == {"path", "label", "predicted", "score", "novelty", "unknown"}
    kept = sum(r["unknown"] == "false" for r in rows) / len(rows)
    assert kept == pytest.approx(metrics["open_set"]["kept"]) and kept >= 0.95
    audit = json.loads((hymenoptera_run / "audit.json").read_text())
    assert audit["summary"]["train_images"] == 245 and (hymenoptera_run / "audit.png").stat().st_size > 10_000
    # the hymenoptera set's "image not found" placeholder GIF is the furthest image from its class
    assert audit["outliers"][0]["path"].endswith("imageNotFound.gif") and audit["outliers"][0]["outlier"]


def test_evaluate_with_images_of_other_things(hymenoptera_run, tmp_path, capsys):
    from headstart.cli import main

    assert (
        main(
            [
                "evaluate",
                str(hymenoptera_run),
                str(HYMENOPTERA / "val"),
                "--out",
                str(tmp_path),
                "--other",
                str(PHOTOS),
                "--json",
            ]
        )
        == 0
    )
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["novelty_auroc"] >= 0.95 and summary["novelty_other_images"] == 9
    assert summary["novelty_kept"] >= 0.95
    assert (tmp_path / "predictions.csv").is_file() and (tmp_path / "other_predictions.csv").is_file()


def test_predict_answers_unknown_and_writes_heatmaps(hymenoptera_run, tmp_path, capsys):
    from PIL import Image

    from headstart.cli import main

    cat, bee = PHOTOS / "cat_720p.jpg", sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0]
    assert main(["predict", str(hymenoptera_run), str(cat), str(bee), "--heatmap", str(tmp_path), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert [line["unknown"] for line in lines] == [True, False]
    for line in lines:
        picture = Image.open(line["heatmap"])
        assert picture.format == "JPEG" and max(picture.size) <= 1024
    assert main(["predict", str(hymenoptera_run), str(cat), "--novelty-threshold", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unknown"] is False  # the override


@pytest.fixture(scope="module")
def old_bundle(hymenoptera_run, tmp_path_factory):
    """The hymenoptera model exported as headstart did before the novelty score: no novelty output."""
    from headstart.exporter import export_bundle

    tmp = tmp_path_factory.mktemp("old")
    return export_bundle(without_bank(hymenoptera_run, tmp), tmp / "bundle", store=False)


def test_over_http_unknown_the_override_the_heatmap_and_info(server, hymenoptera_bundle):
    import httpx

    url, _, _ = server
    cat = (PHOTOS / "cat_720p.jpg").read_bytes()
    with httpx.Client(base_url=url, timeout=60) as client:
        info = client.post("/info").json()
        assert info["open_set"]["threshold"] == hymenoptera_bundle.manifest.open_set["threshold"]
        body = client.post("/classify", files={"image": ("cat.jpg", cat)}).json()
        assert body["unknown"] is True and body["novelty"] > body["novelty_threshold"]
        assert body["predictions"][0]["label"] in ("ants", "bees")  # the probabilities are as they were
        override = client.post("/classify", files={"image": ("cat.jpg", cat)}, data={"novelty_threshold": "2"})
        assert override.json()["unknown"] is False and override.json()["novelty_threshold"] == 2.0
        bad = client.post("/classify", files={"image": ("c", cat)}, data={"novelty_threshold": "3"})
        assert bad.status_code == 400 and "novelty_threshold must be between 0 and 2" in bad.text
        boxes = client.post("/localize", files={"image": ("cat.jpg", cat)}).json()
        assert boxes["unknown"] is True and boxes["detections"] == []
        asked = client.post("/localize", files={"image": ("c", cat)}, data={"boxes_if_unknown": "true", "conf": "0.1"})
        assert asked.json()["detections"]
        batch = client.post("/classify_batch", files=[("images", ("c", cat)), ("images", ("b", b"nope"))]).json()
        assert batch[0]["unknown"] is True and batch[1]["error"] and batch[1]["unknown"] is None
        heat = client.post("/heatmap", files={"image": ("cat.jpg", cat)}, data={"index": "1"})
        assert heat.status_code == 200 and heat.headers["content-type"] == "image/jpeg"
        assert client.post("/heatmap", files={"image": ("c", cat)}, data={"index": "2"}).status_code == 400


def test_a_bundle_without_a_novelty_score_still_serves_and_says_so(old_bundle):
    from tests.conftest import import_service

    assert old_bundle.manifest.open_set is None
    svc = import_service(str(old_bundle.bundle_dir)).Headstart()
    info = svc.info()
    assert info.open_set is None and "no novelty score" in info.open_set_note
    body = svc.classify(PHOTOS / "cat_720p.jpg", top_k=2)
    assert body.unknown is None and body.novelty is None and len(body.predictions) == 2


@pytest.mark.slow
def test_the_audit_finds_flipped_labels_and_a_planted_duplicate(tmp_path):
    """A copy of hymenoptera with 5% of its training labels flipped and one validation image copied into train:
    the flipped images lead the label issues, and the copy is reported across train and val."""
    from headstart.tasks import ClassifyConfig, train

    data = tmp_path / "data"
    shutil.copytree(HYMENOPTERA, data)
    rng = np.random.default_rng(0)
    flipped = []
    for name, other in (("ants", "bees"), ("bees", "ants")):
        files = sorted((data / "train" / name).glob("*.jpg"))
        for f in rng.choice(files, 6, replace=False):
            target = data / "train" / other / f"flipped-{f.name}"
            f.rename(target)
            flipped.append(str(target.resolve()))
    planted = sorted((data / "val" / "bees").glob("*.jpg"))[0]
    shutil.copy(planted, data / "train" / "bees" / "planted.jpg")
    run = train(
        ClassifyConfig(
            data_dir=str(data),
            out=str(tmp_path / "run"),
            backbone="torchvision:mobilenet_v2",
            weights=str(MOBILENET),
            views=2,
            epochs=10,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
        )
    )
    audit = json.loads((run / "audit.json").read_text())
    top = {Path(f["path"]).resolve().as_posix() for f in audit["label_issues"][: len(flipped) + 4]}
    found = [f for f in flipped if f in top]
    assert len(found) >= 0.75 * len(flipped), (found, audit["label_issues"][:16])
    dupes = [d for d in audit["near_duplicates"] if d["splits"] == "train-val" and d["identical_files"]]
    assert any(Path(p).name == "planted.jpg" for d in dupes for p in d["paths"])
