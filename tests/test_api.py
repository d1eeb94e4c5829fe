"""The Python API (``import headstart``): the command line's verbs as functions with the same options, answers
typed, and one installed package that a user's own ``models/``, ``service/`` or ``training.py`` cannot shadow."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest
from PIL import Image

import headstart
from headstart.cli import main
from headstart.service.errors import HeadstartError

from .conftest import HYMENOPTERA, counting_calls, make_image_folder, synthetic_image

REAL_IMAGES = sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:2]


def test_train_export_load_predict_evaluate_from_python(tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", {"red": 12, "blue": 12}, splits={"train": 0.75, "val": 0.25})
    run = headstart.train(
        data,
        out=tmp_path / "run",
        backbone="test_resnet",
        pretrained=False,
        views=1,
        epochs=8,
        batch_size=8,
        lr=1e-2,
        cache_dir=tmp_path / "cache",
        progress=False,
    )
    assert isinstance(run, headstart.Run) and run.task == "classify" and run.labels == ["blue", "red"]
    assert run.metrics["accuracy"] == json.loads((run.dir / "metrics.json").read_text())["accuracy"]

    bundle = run.export(store=False)
    assert bundle.dir == run.dir / "bundle" and bundle.tag is None and list(bundle.manifest.labels) == ["blue", "red"]

    model = headstart.load(bundle.dir)
    red = sorted((data / "val" / "red").glob("*.jpg"))
    image = red[0]
    inputs = [
        str(image),
        image.read_bytes(),
        Image.open(image),
        np.asarray(Image.open(image).convert("RGB")),
        tmp_path / "missing.jpg",
        data / "val" / "blue",  # a folder: its images, sorted
    ]
    answers = model.predict(inputs, top_k=2)
    blues = sorted((data / "val" / "blue").glob("*.jpg"))
    assert len(answers) == 5 + len(blues)
    assert [a.image for a in answers[:5]] == [str(image), None, None, None, str(tmp_path / "missing.jpg")]
    assert "does not exist" in answers[4].error and answers[4].label is None and answers[4].score is None
    assert [a.image for a in answers[5:]] == [str(p) for p in blues]
    first = answers[0]
    assert first.label == first.predictions[0].label and first.score == first.predictions[0].score
    for same in answers[1:4]:  # the file's bytes, its PIL image and its pixels answer as the file does
        assert same.predictions[0].label == first.predictions[0].label
        assert same.predictions[0].score == pytest.approx(first.predictions[0].score, abs=1e-5)

    # the same answer as `headstart predict --json` prints
    assert main(["predict", str(bundle.dir), str(image), "--top-k", "2", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["predictions"] == first.model_dump()["predictions"]
    assert (printed["novelty"], printed["unknown"]) == (first.novelty, first.unknown)

    # evaluate: the run (PyTorch) and its bundle (on its runtime) agree
    by_run = run.evaluate(data / "val", tmp_path / "eval-run")
    by_bundle = headstart.evaluate(bundle, data / "val", tmp_path / "eval-bundle")
    assert by_run["num_images"] == by_bundle["num_images"] == 6
    assert by_run["accuracy"] == by_bundle["accuracy"]
    assert (tmp_path / "eval-bundle" / "confusion_matrix.png").is_file()
    assert (tmp_path / "eval-bundle" / "predictions.csv").is_file()

    boxes = model.predict(image, localize=True)[0]
    assert boxes.detections is not None and boxes.method and boxes.image_size == list(Image.open(image).size)


def test_options_are_checked_as_the_command_line_checks_them(tmp_path):
    data = make_image_folder(tmp_path / "data", {"red": 4, "blue": 4}, splits={"train": 0.5, "val": 0.5})
    with pytest.raises(TypeError, match="no option epoch; the options are: .*epochs"):
        headstart.train(data, out=tmp_path / "run", epoch=3)
    with pytest.raises(ValueError, match="mosaic does not apply to .*: it is an image folder for classification"):
        headstart.train(data, out=tmp_path / "run", mosaic=0.5)
    with pytest.raises(HeadstartError, match="does not exist. Give a run directory"):
        headstart.load(tmp_path / "nowhere" / "bundle")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"top_k": 0}, "top_k must be between 1 and 1000, got 0"),
        ({"top_k": -3}, "top_k must be between 1 and 1000, got -3"),
        ({"novelty_threshold": -1.0}, "novelty_threshold must be between 0 and 2, got -1.0"),
        ({"novelty_threshold": float("nan")}, "novelty_threshold must be between 0 and 2, got nan"),
        ({"label_threshold": 3.0}, "label_threshold must be between 0 and 1, got 3.0"),
        ({"batch_size": 0}, "batch_size must be at least 1"),
    ],
)
def test_answer_options_out_of_range_are_refused_as_the_service_refuses_them(tiny_bundle, tmp_path, options, words):
    """`headstart predict --novelty-threshold -1` answered "none of these" for every image, `--top-k 0` one class:
    the service's 400s for the same values now hold for the command line, the Python API and predict-batch."""
    image = next(make_image_folder(tmp_path / "d", {"red": 1}).rglob("*.jpg"))
    model = headstart.load(tiny_bundle.bundle_dir)
    with pytest.raises(ValueError, match=re.escape(words)):
        model.predict(image, **options)
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "batch_size"]
    if flags:
        assert main(["predict", str(tiny_bundle.bundle_dir), str(image), *flags]) == 2
    if "novelty_threshold" in options:  # predict-batch too, before Ray starts
        from headstart.service.batch import predict_batch

        with pytest.raises(HeadstartError, match=re.escape(words)):
            predict_batch(tiny_bundle.bundle_dir, str(image), tmp_path / "out", **options)


def test_evaluate_takes_what_predict_takes(tiny_run, tiny_bundle, tmp_path, capsys):
    data = make_image_folder(tmp_path / "data", {"red": 4, "blue": 4})
    results = []
    for ref in (str(tiny_run), str(tiny_bundle.bundle_dir), tiny_bundle.tag):
        assert main(["evaluate", ref, str(data), "--out", str(tmp_path / "eval"), "--json", "--precision", "fp32"]) == 0
        results.append(json.loads(capsys.readouterr().out))
    assert results[0]["num_images"] == 8 and results[0]["accuracy"] == results[1]["accuracy"] == results[2]["accuracy"]
    # a tag has no folder of its own to write into: --out is asked for, in one line
    assert main(["evaluate", tiny_bundle.tag, str(data)]) == 2
    assert "--out" in capsys.readouterr().err
    # without --json: one line a person reads
    assert main(["evaluate", str(tiny_bundle.bundle_dir), str(data)]) == 0
    line = capsys.readouterr().out.strip()
    beside = tiny_bundle.bundle_dir.parent / f"{tiny_bundle.bundle_dir.name}-eval"  # never inside the bundle
    assert line.startswith("num_images 8, accuracy ") and line.endswith(str(beside))


def test_evaluate_decodes_each_image_once(tiny_bundle, tmp_path, capsys, monkeypatch):
    """`headstart evaluate` checks every file (decoding it) before the model reads it: the check's decoding is the
    model's (each image decoded once, the images of --other too), and the answers are those of decoding again."""
    from headstart import data, features
    from headstart.service import ahead

    folder = make_image_folder(tmp_path / "data", {"red": 4, "blue": 4})
    other = make_image_folder(tmp_path / "other", {"grey": 3})
    calls = counting_calls(
        monkeypatch, kept=(features, "decode_for"), eighth=(data, "decode_image"), again=(ahead, "decode_for")
    )
    command = ["evaluate", str(tiny_bundle.bundle_dir), str(folder), "--other", str(other), "--json"]
    assert main([*command, "--out", str(tmp_path / "once")]) == 0
    assert calls == {"kept": 11, "eighth": 0, "again": 0}
    once = json.loads((tmp_path / "once" / "metrics.json").read_text())
    monkeypatch.setattr(features, "decoded_budget", lambda: 0)  # nothing kept: the check at 1/8 scale, as before
    assert main([*command, "--out", str(tmp_path / "twice")]) == 0
    assert calls == {"kept": 22, "eighth": 11, "again": 0}  # the model's decoding done anew: each decoded twice
    assert json.loads((tmp_path / "twice" / "metrics.json").read_text()) == once
    assert (
        "open_set" in once
        and (tmp_path / "once" / "other_predictions.csv").read_text()
        == (tmp_path / "twice" / "other_predictions.csv").read_text()
    )
    capsys.readouterr()


def test_every_verb_prints_a_human_line_and_json_when_asked(tiny_run, tiny_bundle, tmp_path, capsys):
    red = tmp_path / "red.jpg"
    synthetic_image(0, np.random.default_rng(1)).save(red)
    photo = REAL_IMAGES[0]  # a photo of an ant: none of these for a model of red squares and blue discs
    assert main(["predict", str(tiny_bundle.bundle_dir), str(red), str(photo), str(tmp_path / "nope.jpg")]) == 1
    ok, unknown, bad = capsys.readouterr().out.strip().splitlines()
    assert re.fullmatch(rf"{red}: red 0\.\d{{3}}, blue 0\.\d{{3}}", ok), ok
    assert re.fullmatch(rf"{photo}: none of these \(novelty [\d.]+ > [\d.]+; nearest \w+ [\d.]+, \w+ [\d.]+\)", unknown)
    assert bad.startswith(f"{tmp_path / 'nope.jpg'}: error: ")
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b"), "--no-store"]) == 0
    assert capsys.readouterr().out.strip().startswith(f"{tmp_path / 'b'}: verified, images ")
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "b2"), "--no-store", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["bundle"] == str(tmp_path / "b2")


def test_answers_come_batch_by_batch_in_order_with_heatmaps_and_errors_in_their_places(tiny_bundle, tmp_path, capsys):
    from types import SimpleNamespace

    from headstart.predicting import LoadedModel
    from headstart.service.localize import LocalizeError

    rng = np.random.default_rng(3)
    (tmp_path / "in").mkdir()
    paths = [tmp_path / "in" / f"{k}.jpg" for k in range(60)]
    for k, path in enumerate(paths):
        synthetic_image(k % 2, rng).save(path)
    (tmp_path / "in" / "sub").mkdir()
    shutil.copy(paths[1], tmp_path / "in" / "sub" / "1.jpg")  # a second 1.jpg: its heatmap must not replace the first
    items = [*paths[:3], tmp_path / "missing.jpg", paths[3].read_bytes(), *paths[4:], tmp_path / "in" / "sub" / "1.jpg"]
    (tmp_path / "maps" / "5.heatmap.jpg").mkdir(parents=True)  # a heatmap that cannot be written: that image's error
    model = headstart.load(tiny_bundle.bundle_dir)
    decoded = []
    decode = model._decode
    model._decode = lambda item: decoded.append(item) or decode(item)

    answers = model.answers(items, top_k=2, batch_size=2, heatmaps=tmp_path / "maps")
    first = next(answers)  # answered while most images are not decoded yet (at most 4 per thread ahead, 8 threads)
    assert first.image == str(paths[0]) and len(decoded) <= 2 + 4 * 8 < len(items)
    got = [first, *answers]
    assert [a.image for a in got] == [str(p) if not isinstance(p, bytes) else None for p in items]
    assert "does not exist" in got[3].error and got[3].heatmap is None
    assert got[4].heatmap == str(tmp_path / "maps" / "image-4.heatmap.jpg")  # no file name: its place in the list
    assert got[6].image == str(paths[5]) and got[6].error.startswith("The heatmap could not be written to ")
    assert (got[1].heatmap, got[-1].heatmap) == (
        str(tmp_path / "maps" / "1.heatmap.jpg"),
        str(tmp_path / "maps" / "1-2.heatmap.jpg"),
    )
    for answer in got[:3] + got[4:6] + got[7:]:
        assert answer.error is None and Image.open(answer.heatmap).format == "JPEG"
    # predict (batches of 16, no heatmaps): the same answers; compared by best class, since "none of these" near
    # the threshold may move with the batch in bf16
    same = model.predict(items, top_k=2)
    for a, b in zip(got[:6] + got[7:], same[:6] + same[7:], strict=True):
        best = [x.predictions[0].label if x.predictions else None for x in (a, b)]
        assert (a.image, a.error, best[0]) == (b.image, b.error, best[1])
    assert same[6].error is None and same[6].predictions

    # the command line prints them so, the failed heatmap as an error line (exit status 1)
    assert (
        main(
            ["predict", str(tiny_bundle.bundle_dir), str(paths[4]), str(paths[5]), "--heatmap", str(tmp_path / "maps")]
        )
        == 1
    )
    written, failed = capsys.readouterr().out.strip().splitlines()
    assert (
        written.endswith(f"; heatmap {tmp_path / 'maps' / '4.heatmap.jpg'}")
        and ": error: The heatmap could not" in failed
    )

    # a model without class activation maps (a detector) is refused before any image is read
    detector = LoadedModel(SimpleNamespace(output_names=["boxes"]), "a detector")
    with pytest.raises(LocalizeError, match="heatmaps are for classifiers"):
        next(detector.answers(items, heatmaps=tmp_path / "detector-maps"))
    assert not (tmp_path / "detector-maps").exists()


def counting_runs(bundle, tmp_path: Path, seed: int):
    """(the bundle loaded, five synthetic JPEGs, the batch sizes of each run of its model from now on)."""
    rng = np.random.default_rng(seed)
    paths = [tmp_path / f"{k}.jpg" for k in range(5)]
    for k, path in enumerate(paths):
        synthetic_image(k % 2, rng).save(path)
    model = headstart.load(bundle.bundle_dir)
    runs, run = [], model.model.run
    model.model.run = lambda pixels, names=None: runs.append(len(pixels)) or run(pixels, names)
    return model, paths, runs


def test_localize_runs_the_model_once_per_batch_for_the_boxes_and_the_classes(tiny_bundle, tmp_path):
    """`headstart predict --localize` ran the model twice per image, once for the classes and once for the boxes
    (4.65 s without, 7.75 s with, the coco128 detector): the run that gives the boxes gives the scores."""
    model, paths, runs = counting_runs(tiny_bundle, tmp_path, seed=5)
    located = model.predict(paths, top_k=2, localize=True, batch_size=2, label_threshold=0.3)
    assert runs == [2, 2, 1]
    runs.clear()
    plain = model.predict(paths, top_k=2, batch_size=2, label_threshold=0.3)
    assert runs == [2, 2, 1]
    for a, b in zip(located, plain, strict=True):  # the same batches: the same scores, open-set answer, labels
        assert a.detections is not None and b.detections is None
        assert a.model_dump(include={"predictions", "novelty", "novelty_threshold", "unknown", "labels"}) == (
            b.model_dump(include={"predictions", "novelty", "novelty_threshold", "unknown", "labels"})
        )


def test_heatmaps_come_from_the_run_that_answered_once_per_batch(tiny_bundle, tmp_path):
    """`headstart predict --heatmap` (with --localize too) ran the model again for each image's heatmap: the batch's
    run now gives the answers (and boxes) and the class maps drawn, so the answers are those without heatmaps and each
    heatmap is the one the image's own outputs give."""
    from headstart.service.heatmap import heatmap

    model, paths, runs = counting_runs(tiny_bundle, tmp_path, seed=6)
    mapped = model.predict(paths, top_k=2, batch_size=2, heatmaps=tmp_path / "maps")
    assert runs == [2, 2, 1]
    runs.clear()
    assert len(model.predict([*paths[:4], tmp_path / "missing.jpg"], batch_size=2, heatmaps=tmp_path / "m2")) == 5
    assert runs == [2, 2]  # no run for a batch without a readable image
    runs.clear()
    located = model.predict(paths, top_k=2, batch_size=2, localize=True, heatmaps=tmp_path / "m3")
    assert runs == [2, 2, 1]  # the run that gives the boxes gives the heatmaps
    runs.clear()
    plain = model.predict(paths, top_k=2, batch_size=2)
    assert runs == [2, 2, 1]
    for a, b, c in zip(mapped, plain, located, strict=True):  # the same batches: the same answers
        assert a.heatmap is not None and b.heatmap is None and c.detections is not None
        assert a.model_dump(exclude={"heatmap"}) == b.model_dump(exclude={"heatmap"})
        assert c.model_dump(exclude={"heatmap", "detections", "method", "image_size"}) == b.model_dump(
            exclude={"heatmap", "detections", "method", "image_size"}
        )
        assert Path(c.heatmap).read_bytes() == Path(a.heatmap).read_bytes()  # the same outputs draw the same map
    # the heatmap of the batch's outputs is the one a run of the image alone draws (within the runtime's last bits)
    heatmap(model.model, Image.open(paths[1]).convert("RGB")).image.save(tmp_path / "alone.jpg", quality=90)
    alone, written, other = (
        np.asarray(Image.open(f).convert("RGB"), dtype=np.int16)
        for f in (tmp_path / "alone.jpg", mapped[1].heatmap, mapped[0].heatmap)  # other: another image's heatmap
    )
    assert written.shape == alone.shape and np.abs(written - alone).mean() < 0.5 < np.abs(written - other).mean()


def test_importing_headstart_is_light_and_a_users_own_packages_do_not_shadow_it(tmp_path):
    """In a project folder with its own models/, service/ and training.py (on sys.path first, as `python` puts the
    working directory), headstart still imports its own; and `import headstart` alone imports no torch."""
    for package in ("models", "service"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text(f"raise ImportError('the user\\'s own {package}/')\n")
    (tmp_path / "training.py").write_text('raise ImportError("the user\'s own training.py")\n')
    code = (
        "import sys\n"
        "import headstart\n"
        "assert 'torch' not in sys.modules, 'import headstart imported torch'\n"
        "import headstart.cli, headstart.service.guard, headstart.models, headstart.tasks, headstart.loaded_run\n"
        "assert not {'models', 'service', 'training'} & set(sys.modules), 'a folder name was imported'\n"
        "print(headstart.train.__module__, headstart.load.__module__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["headstart.api", "headstart.api"]
    # `python -m headstart` is the command, from that folder too
    help_text = subprocess.run(
        [sys.executable, "-m", "headstart", "--help"], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert help_text.returncode == 0 and "predict-batch" in help_text.stdout, help_text.stderr[-2000:]


def test_training_imports_albumentations_without_the_hugging_face_hub_and_the_recipes_stay_the_same():
    """albumentations imports huggingface_hub (with httpx and trio: a training run's imports took 2.30 s, now 2.11)
    only for pushing pipelines to the Hub: headstart imports it without; huggingface_hub stays importable (timm's).
    The recipes (part of the feature cache's keys) are those of an albumentations that has the Hub."""
    recipes = (
        "from headstart.augment import recipe_key, recipe\n"
        "from headstart.service.preprocess import PreprocessSpec\n"
        "from headstart.tasks.classify.augment import build_augmentation as classify\n"
        "from headstart.tasks.detect.augment import build_detection_augmentation as detect\n"
        "spec = PreprocessSpec()\n"
        "print(recipe_key(recipe('classify', 'heavy', classify('heavy', spec), spec)))\n"
        "print(recipe_key(recipe('detect', 'heavy', detect('heavy', spec), spec)))\n"
    )
    without = (
        "import sys\n"
        "import headstart.engine\n"
        "import albumentations.core.hub_mixin as hub\n"
        "assert 'huggingface_hub' not in sys.modules and not hub.is_huggingface_hub_available\n"
        "import huggingface_hub\n"
        "assert huggingface_hub.hf_hub_download\n"
    )
    outs = [
        subprocess.run([sys.executable, "-c", first + recipes], capture_output=True, text=True, timeout=300)
        for first in (without, "import huggingface_hub\n")
    ]
    assert all(out.returncode == 0 for out in outs), [out.stderr[-3000:] for out in outs]
    assert outs[0].stdout == outs[1].stdout and len(outs[0].stdout.splitlines()) == 2


@pytest.mark.slow
def test_serve_from_python_answers_over_http_and_stops(tiny_bundle, tmp_path):
    from headstart.service.devserver import free_port

    port = free_port()
    with headstart.serve(tiny_bundle.bundle_dir, port=port, wait=False, log=tmp_path / "server.log") as server:
        assert server.url == f"http://127.0.0.1:{port}"
        with REAL_IMAGES[0].open("rb") as f:
            answer = httpx.post(f"{server.url}/classify", files={"image": ("a.jpg", f, "image/jpeg")}, timeout=60)
        assert answer.status_code == 200 and answer.json()["predictions"][0]["label"] in ("red", "blue")
    assert server.process.poll() is not None  # stopped with the block
    with pytest.raises(Exception, match="int8"):  # checked before anything starts
        headstart.serve(tiny_bundle.bundle_dir, port=port, wait=False, variant="int8")


@pytest.mark.slow
def test_the_readme_python_example_runs(tmp_path, monkeypatch):
    """The quick start's Python block, as printed, on the shared data (its placeholders pointed at real files)."""
    from headstart.service.devserver import free_port

    from .conftest import PHOTOS, ROOT, SHARED, require_shared

    require_shared()
    readme = (ROOT / "README.md").read_text()
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    (tmp_path / "shared").symlink_to(SHARED)
    work = tmp_path / "work"
    (work / "more-photos").mkdir(parents=True)
    (work / "photo.jpg").symlink_to(PHOTOS / "cat_720p.jpg")
    (work / "more-photos" / "bee.jpg").symlink_to(sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[0])
    (work / "path" / "to" / "labelled").mkdir(parents=True)
    (work / "path" / "to" / "labelled" / "test-folder").symlink_to(HYMENOPTERA / "val")
    monkeypatch.chdir(work)
    code = code.replace("port=3000", f"port={free_port()}")
    printed = []
    monkeypatch.setattr("builtins.print", lambda *args: printed.append(args))
    exec(compile(code, "README.md", "exec"), {})
    accuracy, *answers, url = printed
    assert accuracy[0] > 0.9
    assert [a[0] for a in answers] == ["photo.jpg", "more-photos/bee.jpg"]
    assert answers[0][1] is None and answers[0][3] is True  # the cat: none of these
    assert answers[1][1] == "bees" and answers[1][3] is False
    assert (work / "eval" / "metrics.json").is_file() and url[0].startswith("http://127.0.0.1:")


def test_a_folder_of_jfif_photos_is_predicted(tiny_bundle, tmp_path):
    """Browsers on Windows save web images as .jfif (JPEG): a folder of them was skipped, no image and no word."""
    image = next(make_image_folder(tmp_path / "d", {"red": 1}).rglob("*.jpg"))
    folder = tmp_path / "downloads"
    folder.mkdir()
    for suffix in (".jfif", ".JPE", ".jpg"):
        shutil.copy(image, folder / f"photo{suffix}")
    answers = headstart.load(tiny_bundle.bundle_dir).predict(folder)
    assert sorted(Path(a.image).name for a in answers) == ["photo.JPE", "photo.jfif", "photo.jpg"]
    assert all(a.error is None and a.predictions for a in answers)
