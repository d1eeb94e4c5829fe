"""`headstart export`: verified, self-describing bundles; tamper detection; int8; the BentoML model store."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

import headstart
from headstart.cli import main
from headstart.exporter import ExportError, export_bundle
from headstart.loaded_run import load_run
from headstart.predict import predict_paths
from headstart.runs import RunError
from headstart.service.bundle import BundleError, embedded_view, load_bundle
from headstart.service.inference import classify_images
from headstart.service.preprocess import decode_image, preprocess

from .conftest import HYMENOPTERA, PHOTOS

REAL_IMAGES = [
    *sorted((HYMENOPTERA / "val" / "ants").glob("*.jpg"))[:4],
    *sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:4],
    PHOTOS / "cat.bmp",
    PHOTOS / "hot_dog.jpg",
]


def test_bundle_layout_and_manifest(tiny_bundle, tiny_run):
    files = {p.name for p in tiny_bundle.bundle_dir.iterdir()}
    assert files == {"model.onnx", "manifest.json"}
    manifest = json.loads((tiny_bundle.bundle_dir / "manifest.json").read_text())
    assert manifest["labels"] == ["blue", "red"]
    assert manifest["task"] == "classify" and manifest["schema_version"] == 1
    assert manifest["preprocess"] == json.loads((tiny_run / "preprocess.json").read_text())
    assert manifest["backbone"]["weights_sha256"]
    assert manifest["verification"]["top1_agreement"] == 1.0
    assert manifest["files"]["model.onnx"]["sha256"]
    # the same manifest (less the file hashes, which cannot live inside the file they hash) is in the ONNX file
    model = onnx.load(str(tiny_bundle.bundle_dir / "model.onnx"))
    embedded = {p.key: p.value for p in model.metadata_props}["headstart_manifest"]
    assert json.loads(embedded) == embedded_view(manifest)
    onnx.checker.check_model(model)
    # dynamic batch axis, pixels in, probabilities, class map and novelty out
    assert model.graph.input[0].name == "pixels"
    assert [o.name for o in model.graph.output] == ["probabilities", "class_map", "novelty"]
    assert manifest["open_set"]["threshold"] > 0 and manifest["open_set"]["kept_rate"] == 0.95


def test_onnx_matches_pytorch_on_real_images(tiny_bundle, tiny_run):
    run = load_run(tiny_run)
    torch_probs = predict_paths(run.model, REAL_IMAGES, run.spec)
    for runtime, batch in [(r, b) for r in ("onnxruntime", "openvino") for b in (1, len(REAL_IMAGES))]:
        bundle = load_bundle(tiny_bundle.bundle_dir, device="cpu", runtime=runtime, precision="fp32")
        preds = [
            p
            for i in range(0, len(REAL_IMAGES), batch)
            for p in (
                answer["predictions"]
                for answer in classify_images(bundle, [decode_image(x) for x in REAL_IMAGES[i : i + batch]], k=2)
            )
        ]
        onnx_probs = np.array([[next(p["score"] for p in ps if p["index"] == k) for k in range(2)] for ps in preds])
        assert np.abs(onnx_probs - torch_probs).max() < 1e-4
        assert (onnx_probs.argmax(1) == torch_probs.argmax(1)).all()
    probs, class_map, novelty = bundle.run(np.zeros((3, 3, run.spec.input_size, run.spec.input_size), np.float32))
    assert probs.shape == (3, 2) and class_map.shape[:2] == (3, 2) and novelty.shape == (3,)
    assert np.allclose(class_map.sum(axis=1), 1.0, atol=1e-5)


def test_bundle_is_in_the_model_store(tiny_bundle):
    import bentoml

    assert tiny_bundle.tag.startswith("tiny-test:")
    tags = [str(m.tag) for m in bentoml.models.list()]
    assert tiny_bundle.tag in tags
    stored = bentoml.models.get(tiny_bundle.tag)
    assert stored.info.metadata["labels"] == ["blue", "red"]
    bundle = load_bundle(tiny_bundle.tag, device="cpu")  # by tag, verified like a directory
    assert bundle.version == tiny_bundle.manifest.version
    assert load_bundle("tiny-test", device="cpu").version  # latest version by name


def test_predict_cli_same_answers_for_run_bundle_and_tag(tiny_bundle, tiny_run, capsys):
    images = [str(p) for p in REAL_IMAGES[:3]]
    answers = []
    for ref in (str(tiny_run), str(tiny_bundle.bundle_dir), tiny_bundle.tag):
        assert main(["predict", ref, *images, "--top-k", "2", "--precision", "fp32", "--json"]) == 0
        answers.append([json.loads(line)["predictions"] for line in capsys.readouterr().out.splitlines()])
    for other in answers[1:]:
        for a, b in zip(answers[0], other, strict=True):
            assert [p["label"] for p in a] == [p["label"] for p in b]
            assert np.allclose([p["score"] for p in a], [p["score"] for p in b], atol=1e-4)


def test_predict_takes_folders_and_globs_and_answers_odd_files_with_an_error_line(tiny_bundle, tmp_path, capsys):
    import os

    folder = tmp_path / "photos"
    (folder / "deeper").mkdir(parents=True)
    for k, src in enumerate(REAL_IMAGES[:3]):
        shutil.copy(src, folder / ("deeper" if k else ".") / f"{k}.jpg")
    os.mkfifo(folder / "pipe.jpg")
    code = main(["predict", tiny_bundle.tag, str(folder), str(tmp_path / "photos" / "deeper" / "*.jpg"), "--json"])
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    names = [Path(line["image"]).name for line in lines]
    assert code == 1 and names == ["0.jpg", "1.jpg", "2.jpg", "pipe.jpg", "1.jpg", "2.jpg"], names
    assert "FIFO" in lines[3]["error"] and all("predictions" in line for k, line in enumerate(lines) if k != 3)
    assert main(["predict", tiny_bundle.tag, str(tmp_path / "empty*")]) == 2


def copy_bundle(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_tampered_bundles_are_refused(tiny_bundle, tmp_path):
    b = copy_bundle(tiny_bundle.bundle_dir, tmp_path / "flip")
    data = bytearray((b / "model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (b / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(BundleError, match=r"model.onnx does not match its manifest"):
        load_bundle(b)

    b = copy_bundle(tiny_bundle.bundle_dir, tmp_path / "labels")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["labels"] = ["cat", "dog"]
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="differs from"):
        load_bundle(b)

    b = copy_bundle(tiny_bundle.bundle_dir, tmp_path / "nomanifest")
    (b / "manifest.json").unlink()
    with pytest.raises(BundleError, match=r"manifest.json is missing"):
        load_bundle(b)

    b = copy_bundle(tiny_bundle.bundle_dir, tmp_path / "badjson")
    (b / "manifest.json").write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        load_bundle(b)

    b = copy_bundle(tiny_bundle.bundle_dir, tmp_path / "escape")
    manifest = json.loads((b / "manifest.json").read_text())
    manifest["files"]["../../etc/passwd"] = {"sha256": "0"}
    (b / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(b)

    with pytest.raises(BundleError, match="No model 'no-such-model:v1' in the BentoML model store"):
        load_bundle("no-such-model:v1")
    with pytest.raises(BundleError, match="neither a bundle directory nor a valid model tag"):
        load_bundle("../Not A Tag")
    with pytest.raises(BundleError, match="no int8 model"):
        load_bundle(tiny_bundle.bundle_dir, variant="int8")


def test_export_bad_runs_write_nothing(tmp_path, tiny_run):
    with pytest.raises(RunError, match="does not exist"):
        export_bundle(tmp_path / "nope", tmp_path / "out", store=False)
    half = tmp_path / "half"
    shutil.copytree(tiny_run, half)
    (half / "DONE").unlink()
    with pytest.raises(RunError, match="incomplete"):
        export_bundle(half, tmp_path / "out", store=False)
    assert not (tmp_path / "out").exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_export_refuses_to_replace_the_run_or_what_is_not_a_bundle(tiny_run, tmp_path):
    run = tmp_path / "work" / "run"
    shutil.copytree(tiny_run, run)
    for out in (
        run,
        run.parent,
        tmp_path,
    ):  # the run itself, or a folder holding it: never, even with --force
        for force in (False, True):
            with pytest.raises(ExportError, match="is the run directory or holds it"):
                export_bundle(run, out, store=False, force=force)
    assert (run / "DONE").is_file()
    other = tmp_path / "photos"
    other.mkdir()
    (other / "keep.jpg").write_bytes(b"precious")
    with pytest.raises(ExportError, match="not a headstart bundle"):
        export_bundle(run, other, store=False)
    assert (other / "keep.jpg").read_bytes() == b"precious"
    assert main(["export", str(run), "--out", str(other), "--no-store"]) != 0
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(ExportError, match="not a headstart bundle"):
        export_bundle(run, a_file, store=False)
    assert a_file.read_text() == "mine"
    # an empty folder, an earlier bundle, or anything with --force is replaced
    (tmp_path / "empty").mkdir()
    export_bundle(run, tmp_path / "empty", store=False)
    export_bundle(run, tmp_path / "empty", store=False)
    export_bundle(run, other, store=False, force=True)
    assert (other / "manifest.json").is_file() and not (other / "keep.jpg").exists()


def test_a_home_bentoml_cannot_use_is_said_before_any_work(tiny_run, tiny_bundle, tmp_path, monkeypatch, caplog):
    """HOME missing or read-only (a container's): export verified the bundle, then stopped with NotADirectoryError at
    the store and threw the bundle away; `headstart serve BUNDLE_DIR` stopped the same way in BentoML's start, and a
    tag a traceback. Now: export refuses at once naming --no-store; serving a folder takes a stand-in BENTOML_HOME
    (a folder needs no store) and says so; a tag says the store cannot be read."""
    from headstart.api import serve_settings
    from headstart.service.devserver import free_port

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("HOME", str(blocked))
    monkeypatch.delenv("BENTOML_HOME", raising=False)
    with pytest.raises(ExportError, match=r"model store .*a-file/bentoml/models cannot be written: Not a directory"):
        export_bundle(tiny_run, tmp_path / "b")
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.tmp*"))
    assert export_bundle(tiny_run, tmp_path / "b", store=False).tag is None  # --no-store needs no store

    with caplog.at_level(logging.WARNING, logger="headstart"):
        served, env = serve_settings(tiny_bundle.bundle_dir, port=free_port())
    assert served == str(Path(tiny_bundle.bundle_dir).resolve())
    stand_in = Path(env["BENTOML_HOME"])
    assert stand_in.is_dir() and not stand_in.is_relative_to(blocked)
    assert any("cannot be written" in r.getMessage() and str(stand_in) in r.getMessage() for r in caplog.records)
    with pytest.raises(ValueError, match="looked up in BentoML's model store.*give|serve the bundle by its folder"):
        serve_settings(tiny_bundle.tag, port=free_port())
    # a new process (this one's BentoML has its home already): one line, no traceback
    image = next((Path(tiny_run).parent / "data").rglob("*.jpg"))
    done = subprocess.run(
        [sys.executable, "-m", "headstart.cli", "predict", tiny_bundle.tag, str(image)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert "looked up in BentoML's model store" in done.stderr and "a-file/bentoml): Not a directory" in done.stderr
    monkeypatch.setenv("BENTOML_HOME", str(stand_in))  # a usable home: nothing set for the server
    assert "BENTOML_HOME" not in serve_settings(tiny_bundle.bundle_dir, port=free_port())[1]


def test_names_the_output_encoding_cannot_hold_are_escaped_not_fatal(tiny_bundle, tiny_run, tmp_path):
    """Output to a file or pipe on Windows is cp1252: `headstart predict MODEL 蜜蜂.jpg > answers.txt` stopped at the
    first name it could not encode. Now the name is written as escapes, and the answer stands."""
    image = tmp_path / "蜜蜂.jpg"
    shutil.copy(next((Path(tiny_run).parent / "data").rglob("*.jpg")), image)
    done = subprocess.run(
        [sys.executable, "-m", "headstart.cli", "predict", str(tiny_bundle.bundle_dir), str(image)],
        capture_output=True,
        timeout=300,
        env={**os.environ, "PYTHONIOENCODING": "cp1252"},
    )
    assert done.returncode == 0, done.stderr.decode("cp1252")[-2000:]
    line = done.stdout.decode("cp1252").strip()
    assert line.startswith(f"{tmp_path}/\\u871c\\u8702.jpg: ") and ("red" in line or "blue" in line)


def test_folders_the_file_system_refuses_are_one_line_each(tiny_bundle, tiny_folder, tmp_path, capsys, monkeypatch):
    """--out, --heatmap, --sort-into and evaluate's --out under a file printed a NotADirectoryError traceback; a
    reader that stops early (`| head`) a BrokenPipeError one. Now one line saying what to do, exit 1; a closed pipe
    ends quietly (141, as SIGPIPE would)."""
    from headstart import cli

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    bundle, image = str(tiny_bundle.bundle_dir), str(next(tiny_folder.rglob("*.jpg")))
    for argv in (
        ["train", str(tiny_folder), "--backbone", "test_resnet", "--no-pretrained", "--out", str(blocked / "run")],
        ["predict", bundle, image, "--heatmap", str(blocked / "maps")],
        ["predict", bundle, image, "--sort-into", str(blocked / "sorted")],
        ["evaluate", bundle, str(tiny_folder / "val"), "--out", str(blocked / "eval")],
    ):
        assert main(argv) == 1, argv
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert err == (
            f"headstart {argv[0]}: error: Not a directory: {blocked}/{argv[-1].rsplit('/', 1)[1]} (a file stands "
            "where a folder is needed: choose another path)"
        ), err

    def reader_gone(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setitem(cli.COMMANDS, "predict", reader_gone)
    assert main(["predict", bundle, image]) == 141
    assert capsys.readouterr().err == ""


def test_predict_names_a_picture_in_another_form_with_what_to_do(tiny_bundle, tmp_path):
    raw = tmp_path / "DSC_0001.NEF"
    raw.write_bytes(b"II*\x00raw sensor data")
    (answer,) = headstart.load(tiny_bundle.bundle_dir).predict(raw)
    assert answer.error.startswith("The data is not an image format that can be read (")
    assert answer.error.endswith(
        "are). Its name says it is a camera RAW photo: export them as JPEG first (darktable, RawTherapee or Lightroom)."
    )


def test_written_files_follow_the_users_umask(tiny_run, tmp_path):
    import os
    import stat

    from headstart import runs

    old = os.umask(0o077)
    try:
        bundle = export_bundle(tiny_run, tmp_path / "private", store=False).bundle_dir
        runs.write_json(tmp_path / "private.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(bundle.stat().st_mode) == 0o700
    for f in (*bundle.iterdir(), tmp_path / "private.json"):
        assert stat.S_IMODE(f.stat().st_mode) & 0o077 == 0, f
    os.umask(0o022)
    try:
        runs.write_json(tmp_path / "shared.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "shared.json").stat().st_mode) == 0o644


def test_failed_export_keeps_previous_bundle_and_store(tiny_run, tmp_path, monkeypatch):
    import bentoml

    import headstart.exporter as export_mod

    first = export_bundle(tiny_run, tmp_path / "b", name="keep-me")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    tags_before = sorted(str(m.tag) for m in bentoml.models.list())

    def boom(*args, **kwargs):
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(export_mod, "import_to_store", boom)
    with pytest.raises(OSError, match="simulated"):
        export_bundle(tiny_run, tmp_path / "b", name="keep-me")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    assert sorted(str(m.tag) for m in bentoml.models.list()) == tags_before
    assert [p.name for p in tmp_path.iterdir()] == ["b"]  # no temporary directory left
    assert load_bundle(first.tag).version == first.manifest.version


def test_int8_refused_when_accuracy_drops_too_much_keeps_the_fp32_bundle(tiny_run, tmp_path, caplog):
    """A refused int8 model is not kept, but the fp32 bundle that passed verification is written, and the log says
    how many validation images changed."""
    with caplog.at_level("WARNING"):
        kept = export_bundle(tiny_run, tmp_path / "q", int8=True, store=False, max_int8_drop=-1.0)
    assert sorted(p.name for p in kept.bundle_dir.iterdir()) == ["manifest.json", "model.onnx"]
    assert kept.manifest.int8 is None and load_bundle(kept.bundle_dir, device="cpu") is not None
    assert "int8 not kept" in caplog.text and "validation images" in caplog.text and "--force" in caplog.text
    forced = export_bundle(tiny_run, tmp_path / "f", int8=True, store=False, max_int8_drop=-1.0, force=True)
    assert (forced.bundle_dir / "model.int8.onnx").is_file()


def test_export_decodes_each_validation_image_once_for_every_check(tiny_run, tmp_path, monkeypatch):
    """The PyTorch reference, ONNX Runtime against it, the int8 file's quality and every runtime and precision read
    the validation images decoded once (each check decoded them again: 4 decodes of each with --int8); the
    calibration decodes the training images once. The figures are those of decoding for each check."""
    from headstart.service import ahead

    decoded: list[str] = []
    real = ahead.decode_for
    monkeypatch.setattr(ahead, "decode_for", lambda path, spec: decoded.append(Path(path).name) or real(path, spec))
    bundle = export_bundle(tiny_run, tmp_path / "b", int8=True, store=False, force=True)
    splits = json.loads((tiny_run / "splits.json").read_text())
    val, train = ([Path(p).name for p, *_ in splits[s]] for s in ("val", "train"))
    assert sorted(decoded) == sorted(val + train)  # each once: the validation images, then the calibration's
    manifest = json.loads((bundle.bundle_dir / "manifest.json").read_text())
    assert manifest["verification"]["images"] == len(val) and manifest["verification"]["top1_agreement"] == 1.0
    assert manifest["int8"]["calibration_images"] == len(train)


@pytest.mark.parametrize("fit", ["crop", "pad"])
def test_the_check_images_hold_a_quarter_of_the_memory_and_give_the_models_input_exactly(fit):
    """An export's check images are held as uint8 (the preprocessing gives whole values in [0, 255]) and each batch
    is the float32 input the service feeds the model, bit for bit, whatever the format (a BMP, a JPEG, a
    sideways photo) and the fit (a classifier's crop, a detector's letterbox); the batches hold as many pixels
    whatever the input size."""
    from headstart.onnx_io import CALIBRATION_BATCH_PIXELS, CHECK_BATCH_PIXELS, CheckImages, batch_for
    from headstart.service.ahead import load_batches
    from headstart.service.preprocess import PreprocessSpec

    spec = PreprocessSpec(input_size=96, resize=110, fit=fit)
    paths = [*REAL_IMAGES, PHOTOS / "camera" / "canon_hdr_NO.jpg"]
    images = CheckImages.load(paths, spec)
    assert images.pixels.dtype == np.uint8 and images.pixels.nbytes == len(paths) * 3 * 96 * 96
    assert images.batch_size == (8 * 224 * 224) // (96 * 96) == 43  # the pixels of 8 images of 224 px
    detector = PreprocessSpec(input_size=512, resize=512, fit="pad")  # its activations bound the export's memory
    assert batch_for(detector, CHECK_BATCH_PIXELS) == 1 and batch_for(detector, CALIBRATION_BATCH_PIXELS) == 1
    images.batch_size = 4
    sizes: list = []
    expected = list(load_batches(paths, spec, 4, sizes))
    got = list(images.batches())
    assert [b.dtype for b in got] == [np.float32] * 3 and len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))
    assert images.sizes == sizes and sizes[-1] == (1536, 2048)  # the EXIF rotation counted


def test_the_int8_file_is_the_same_whatever_the_calibrations_batches(tiny_bundle, tiny_run, tmp_path, monkeypatch):
    """The calibration runs a few images at a time to bound its memory (CALIBRATION_BATCH_PIXELS): its ranges, the
    minimum and maximum of each activation over all the images, and so every scale and zero point of the int8 file,
    are those of one batch of all of them, but for the last bit a convolution kernel may round differently with
    the batch (here: one scale of the tiny network by one ulp; on the hymenoptera MobileNetV2, none)."""
    from onnx import numpy_helper

    from headstart import onnx_io

    run = load_run(tiny_run)
    train = [Path(p) for p, *_ in json.loads((tiny_run / "splits.json").read_text())["train"]]
    fp32, files = tiny_bundle.bundle_dir / "model.onnx", []
    for images in (1, len(train)):
        monkeypatch.setattr(onnx_io, "CALIBRATION_BATCH_PIXELS", images * run.spec.input_size**2)
        files.append(tmp_path / f"int8-{images}.onnx")
        onnx_io.quantize_int8(fp32, files[-1], train, run.spec)
    one, all_at_once = ({i.name: numpy_helper.to_array(i) for i in onnx.load(f).graph.initializer} for f in files)
    assert one.keys() == all_at_once.keys() and any(k.endswith("_scale") for k in one)
    for name, a in one.items():
        b = all_at_once[name]
        if np.issubdtype(a.dtype, np.floating):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=0, err_msg=name)
        else:  # zero points, int8 weights: the same; an int32 bias (scaled by the input's scale) within one step
            assert np.abs(a.astype(np.int64) - b).max(initial=0) <= (1 if a.dtype == np.int32 else 0), name


def test_max_abs_diff_is_numpys_taken_a_few_images_at_a_time():
    from headstart.onnx_io import max_abs_diff

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(37, 5, 3)).astype(np.float32), rng.normal(size=(37, 5, 3)).astype(np.float32)
    assert max_abs_diff(a, b, rows=4) == float(np.abs(a - b).max()) and max_abs_diff(a[:0], b[:0]) == 0.0
    b[-1, 0, 0] = np.nan  # in the last group: still NaN, which no tolerance passes
    assert np.isnan(max_abs_diff(a, b, rows=4))
    with pytest.raises(ValueError, match="different shapes"):
        max_abs_diff(a, b[:, :4])


def test_an_export_whose_onnx_file_gives_nan_is_refused(tiny_run, tmp_path, monkeypatch):
    """A NaN in ONNX Runtime's outputs (here the novelty score of one image) is no difference within a tolerance:
    the export fails and writes nothing."""
    from headstart.tasks.classify import export as classify_export

    real = classify_export.ort_outputs

    def with_nan(session, images):
        outputs = real(session, images)
        outputs[-1][0] = np.nan
        return outputs

    monkeypatch.setattr(classify_export, "ort_outputs", with_nan)
    with pytest.raises(ExportError, match="disagrees with PyTorch"):
        export_bundle(tiny_run, tmp_path / "b", store=False)
    assert not (tmp_path / "b").exists()


@pytest.mark.slow
def test_int8_on_shared_mobilenet_keeps_accuracy(hymenoptera_bundle, hymenoptera_run):
    result = hymenoptera_bundle
    info = result.manifest.int8
    assert info["accuracy_fp32"] - info["accuracy_int8"] <= 0.01
    assert info["top1_agreement"] >= 0.97
    assert result.manifest.verification["top1_agreement"] == 1.0
    assert result.manifest.verification["onnx_accuracy"] == pytest.approx(
        json.loads((hymenoptera_run / "metrics.json").read_text())["accuracy"], abs=1 / 153 + 1e-9
    )
    bundle = load_bundle(result.bundle_dir, variant="int8", device="cpu")
    preds = classify_images(bundle, [decode_image(p) for p in REAL_IMAGES[:8]], k=1)
    assert [p["predictions"][0]["label"] for p in preds][:4].count("ants") >= 3


@pytest.mark.slow
def test_int8_weights_hold_seven_bits_so_no_cpu_saturates_and_old_files_are_flagged(hymenoptera_bundle):
    """A CPU without VNNI sums uint8 x int8 products pairwise in 16 bits: 8-bit weights saturate there (on an AVX2
    AMD EPYC, 96-98% top-1 agreement with fp32 instead of 99.3%), 7-bit ones cannot, so the export writes 7 and says
    so, and a file of 8-bit weights (exported before) is served on such a CPU with a warning naming the fix."""
    import dataclasses

    import onnx
    from onnx import numpy_helper

    from headstart.onnx_io import quantize_int8
    from headstart.service import bundle

    model = onnx.load(str(hymenoptera_bundle.bundle_dir / "model.int8.onnx"))
    int8 = [t for t in model.graph.initializer if t.data_type == onnx.TensorProto.INT8]
    weights = [numpy_helper.to_array(t) for t in int8 if t.name.endswith("_quantized")]  # not the zero points
    assert len(weights) > 40 and all(w.min() >= -64 and w.max() <= 64 for w in weights)  # 2 x 255 x 64 < 2**15
    assert all(int(np.abs(w).max()) == 64 for w in weights)  # symmetric: each tensor's largest weight is +-64
    m = hymenoptera_bundle.manifest
    assert m.int8["weight_bits"] == 7 and "7 bits" in m.int8["scheme"]
    assert bundle.int8_note(m, cpu=AVX2) == ""
    old = dataclasses.replace(m, int8={k: v for k, v in m.int8.items() if k != "weight_bits"})
    assert bundle.int8_note(old, cpu=AVX512_BF16) == "" and bundle.int8_note(old, cpu=cpu_with("", "aarch64")) == ""
    note = bundle.int8_note(old, cpu=AVX2)
    assert "no VNNI" in note and "8-bit weights" in note and "re-export with --int8" in note
    with pytest.raises(ValueError, match="weight_bits must be 7 or 8"):  # before any file is read or written
        quantize_int8(Path("missing.onnx"), Path("never.onnx"), [], m.preprocess, weight_bits=6)


def test_int8_weights_in_eight_bits_on_request_for_cpus_with_vnni(tiny_run, tmp_path, monkeypatch, caplog, capsys):
    """With VNNI or AMX nothing saturates, and 8-bit weights are closer to fp32 (hymenoptera on an AVX-512 VNNI AMD
    EPYC: 100% top-1 agreement against 99.35% with 7 bits): `export --int8 --int8-weight-bits 8` writes them and
    says so in the manifest (the service warns where it serves them on a CPU without VNNI, the test above); the
    export warns on such a CPU; the option without --int8, or another number of bits, is refused before any work."""
    from onnx import numpy_helper

    from headstart.service import cpu

    monkeypatch.setattr(cpu, "cpu_info", lambda: AVX2)
    with caplog.at_level(logging.WARNING, logger="headstart"):
        result = export_bundle(tiny_run, tmp_path / "b", int8=True, store=False, force=True, int8_weight_bits=8)
    assert "8 bits saturate on this CPU" in caplog.text
    m = result.manifest
    assert m.int8["weight_bits"] == 8 and "8 bits" in m.int8["scheme"]
    model = onnx.load(str(result.bundle_dir / "model.int8.onnx"))
    weights = [
        numpy_helper.to_array(t)
        for t in model.graph.initializer
        if t.data_type == onnx.TensorProto.INT8 and t.name.endswith("_quantized")
    ]
    largest = {int(np.abs(w.astype(int)).max()) for w in weights}  # symmetric: each tensor's largest is +-127
    assert largest == {0, 127} or largest == {127}, largest  # (the tiny random model has all-zero layers)
    caplog.clear()
    monkeypatch.setattr(cpu, "cpu_info", lambda: AVX512_BF16)
    with caplog.at_level(logging.WARNING, logger="headstart"):  # and from Python
        bundle = headstart.export(tiny_run, tmp_path / "c", int8=True, store=False, force=True, int8_weight_bits=8)
    assert "saturate" not in caplog.text and bundle.manifest.int8["weight_bits"] == 8
    with pytest.raises(ExportError, match="must be 7 or 8"):
        export_bundle(tiny_run, tmp_path / "d", int8=True, store=False, int8_weight_bits=6)
    assert main(["export", str(tiny_run), "--out", str(tmp_path / "e"), "--int8-weight-bits", "8", "--no-store"]) != 0
    assert "add --int8" in capsys.readouterr().err and not (tmp_path / "e").exists()
    args = ["export", str(tiny_run), "--out", str(tmp_path / "e"), "--int8", "--int8-weight-bits", "8", "--no-store"]
    assert main([*args, "--force"]) == 0 and "int8 kept (8-bit weights)" in capsys.readouterr().out


def test_help_and_predicting_with_a_bundle_import_no_torch(tiny_bundle):
    """`headstart --help` and `headstart predict BUNDLE` run in a serving environment: no torch is imported."""
    import subprocess
    import sys

    code = (
        "import sys, contextlib, io\n"
        "from headstart.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):\n"
        "    main(['--help'])\n"
        "assert 'torch' not in sys.modules, 'help imported torch'\n"
        f"rc = main(['predict', {str(tiny_bundle.bundle_dir)!r}, {str(PHOTOS / 'cat.bmp')!r}, 'no-such.jpg', "
        "'--json'])\n"
        "assert 'torch' not in sys.modules, 'predict BUNDLE imported torch'\n"
        "print('rc', rc)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == "rc 1"  # the missing file is reported in its own line, the photo is classified
    assert json.loads(lines[0])["predictions"] and "error" in json.loads(lines[1])


def test_every_user_error_shares_one_base_class():
    from headstart.data import DatasetError
    from headstart.models.backbone import BackboneError
    from headstart.service.bundle import BundleError
    from headstart.service.errors import HeadstartError
    from headstart.service.localize import LocalizeError
    from headstart.service.preprocess import ImageError

    for cls in (BackboneError, BundleError, DatasetError, ExportError, ImageError, LocalizeError, RunError):
        assert issubclass(cls, HeadstartError), cls
    assert issubclass(ImageError, ValueError) and issubclass(BundleError, RuntimeError)  # as before


# ---------------------------------------------------------------- runtimes: OpenVINO beside ONNX Runtime


def test_export_measures_every_runtime_and_precision_and_records_what_may_be_served(hymenoptera_bundle):
    from headstart.service.runtime import cpu_computes_bf16

    runtimes = hymenoptera_bundle.manifest.runtimes
    expected = {"onnxruntime", "openvino", *(["openvino-bf16"] if cpu_computes_bf16() else [])}
    assert set(runtimes) == {"fp32", "int8"}
    for variant, rows in runtimes.items():
        assert set(rows) == expected, variant
        for key, row in rows.items():
            assert row["images"] == 153 and 0.0 <= row["top1_agreement"] <= 1.0
            assert row["allowed"] == (row["top1_agreement"] >= 0.99 and row["accuracy_drop"] <= 0.01), (variant, key)
        assert rows["openvino"]["top1_agreement"] >= 0.99  # full precision on the same file: the same answers


def test_openvino_and_onnxruntime_agree_on_real_photos(hymenoptera_bundle):
    """Both files, both runtimes, every output (probabilities and the CAM class map), on real photos."""
    photos = [*REAL_IMAGES[:6], *sorted((PHOTOS).glob("*.bmp"))[:4]]
    pixels = np.stack([preprocess(decode_image(p), hymenoptera_bundle.manifest.preprocess) for p in photos])
    fp32 = {
        rt: load_bundle(hymenoptera_bundle.bundle_dir, runtime=rt, precision="fp32").run(pixels)
        for rt in ("onnxruntime", "openvino")
    }
    assert (fp32["onnxruntime"][0].argmax(1) == fp32["openvino"][0].argmax(1)).all()
    for x, y in zip(fp32["onnxruntime"], fp32["openvino"], strict=True):
        assert x.shape == y.shape and np.abs(x - y).max() <= 1e-4, float(np.abs(x - y).max())
    # int8: each runtime's int8 kernels round in their own way, so each is held to the fp32 model, OpenVINO at most
    # twice as far from it as ONNX Runtime. On these photos with the 7-bit weights the export writes, mean |d| of
    # the probabilities, OpenVINO against ONNX Runtime: 0.042 vs 0.025 on an AVX2 AMD EPYC (no VNNI), 0.044 vs
    # 0.024 on an AVX-512 VNNI AMD EPYC (with 8-bit weights there: 0.015 vs 0.028)
    ref = fp32["onnxruntime"]
    int8 = {
        rt: load_bundle(hymenoptera_bundle.bundle_dir, variant="int8", runtime=rt, precision="fp32").run(pixels)
        for rt in ("onnxruntime", "openvino")
    }
    errors = {rt: [float(np.abs(o - r).mean()) for o, r in zip(out, ref, strict=True)] for rt, out in int8.items()}
    for k in range(2):
        assert errors["openvino"][k] <= 2.0 * errors["onnxruntime"][k] + 1e-3, errors
    assert (int8["openvino"][0].argmax(1) == int8["onnxruntime"][0].argmax(1)).all()
    # and as served by default (bf16 only if the export allowed it): fp32's answers; int8's where fp32 decides (a
    # photo of neither ants nor bees may be a coin flip: the dragonfly, ants 0.553, came out bees 0.6 in int8 on an
    # AVX2 AMD EPYC)
    decided = ref[0].max(1) >= 0.6
    for variant, where in (("fp32", slice(None)), ("int8", decided)):
        served = load_bundle(hymenoptera_bundle.bundle_dir, variant=variant, runtime="openvino")
        assert (served.predict(pixels).argmax(1) == ref[0].argmax(1))[where].all(), variant
    assert decided.sum() >= 7


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_started_inputs_give_what_run_gives_whatever_the_order_they_are_taken_in(tiny_bundle, runtime):
    """`Session.start` (feature extraction overlaps the model with decoding): OpenVINO keeps two inputs in flight,
    a third start waits for the oldest and keeps its outputs; ONNX Runtime computes at once. Each waiter gives its
    own input's outputs, copies that later inputs do not overwrite."""
    from headstart.service.runtime import Session, open_session

    session = open_session(tiny_bundle.bundle_dir / "model.onnx", runtime, "cpu")
    names = session.output_names
    size = tiny_bundle.manifest.preprocess.input_size
    batches = [np.random.default_rng(k).random((2, 3, size, size), dtype=np.float32) * 255 for k in range(5)]
    expected = [session.run(names, x) for x in batches]
    waits = [session.start(names, x) for x in batches]
    for k in (4, 0, 2, 1, 3, 0):  # out of order, and one twice
        got = waits[k]()
        assert len(got) == len(names) and all(np.array_equal(g, e) for g, e in zip(got, expected[k], strict=True))
    if runtime == "openvino":
        assert len(session._idle) == Session.IN_FLIGHT and not session._started  # no request lost, none left running
    # an input the model refuses raises (at its waiter on OpenVINO, once, then a message), and nothing is stuck
    bad = np.zeros((2, 4, size, size), np.float32)  # four channels
    with pytest.raises(Exception, match="(?i)shape|dimension"):
        wait = session.start(names, bad)
        wait()
    if runtime == "openvino":
        with pytest.raises(RuntimeError, match="this input's inference failed"):
            wait()
    assert all(np.array_equal(g, e) for g, e in zip(session.start(names, batches[0])(), expected[0], strict=True))
    if runtime == "openvino":  # the failed input's request now serves another input: each still gets its own answer
        again = session.start(names, batches[1])
        with pytest.raises(RuntimeError, match="this input's inference failed"):
            wait()
        assert all(np.array_equal(g, e) for g, e in zip(again(), expected[1], strict=True))
        assert len(session._idle) == Session.IN_FLIGHT and not session._started


@pytest.mark.parametrize("runtime", ["openvino", "onnxruntime"])
def test_a_large_batch_runs_on_a_cpu_in_parts_of_run_pixels_and_whole_on_a_gpu(tiny_bundle, runtime, monkeypatch):
    """A batch larger than `RUN_PIXELS` goes through the model in even parts (the activations, and ONNX Runtime's arena,
    bounded by the pixels of a part), each output the parts' outputs in order; a GPU's session takes it whole."""
    from headstart.service import runtime as runtimes

    session = runtimes.open_session(tiny_bundle.bundle_dir / "model.onnx", runtime, "cpu")
    names, size = session.output_names, tiny_bundle.manifest.preprocess.input_size
    pixels = np.random.default_rng(0).random((7, 3, size, size), dtype=np.float32) * 255
    whole = session.run(names, pixels)
    calls, run = [], session._run
    monkeypatch.setattr(session, "_run", lambda n, p: calls.append(len(p)) or run(n, p))
    monkeypatch.setattr(runtimes, "RUN_PIXELS", 3 * size * size + size)  # three images and a bit: three at most
    parts = session.run(names, pixels)
    assert calls == [3, 2, 2]  # as few parts as fit, even
    for k, output in enumerate(parts):
        expected = np.concatenate([run(names, pixels[i:j])[k] for i, j in ((0, 3), (3, 5), (5, 7))])
        assert output.shape == whole[k].shape and np.array_equal(output, expected)
        assert np.allclose(output, whole[k], rtol=1e-4, atol=1e-5)  # the kernels may round a batch's last bits
    calls.clear()
    monkeypatch.setattr(runtimes, "RUN_PIXELS", 1)  # smaller than one image: one at a time, never none
    session.run(names, pixels[:2])
    assert calls == [1, 1]
    calls.clear()
    session.device = "cuda"
    session.run(names, pixels)
    assert calls == [7]


def cpu_with(flags: str, architecture: str = "x86_64"):
    """A CPU of another kind than this machine's, as :func:`service.cpu.parse_cpuinfo` reads /proc/cpuinfo."""
    from headstart.service.cpu import parse_cpuinfo

    return parse_cpuinfo(f"vendor_id : AuthenticAMD\nflags : {flags}\n", 2, architecture)


AVX512_BF16 = cpu_with("avx2 avx512f avx512_vnni avx512_bf16")  # AMD EPYC Zen 4
AVX2 = cpu_with("avx2 fma")  # AMD EPYC Zen 3: no bf16 units, no VNNI


def test_openvino_computes_bf16_exactly_where_headstart_says_the_cpu_has_bf16_units():
    """One answer to "does this CPU compute bf16" (``cpu_computes_bf16``: AMX or AVX-512 BF16 in /proc/cpuinfo) decides
    the export's bf16 check, the served precision and training's bf16 views; OpenVINO's CPU plugin must agree with it
    on this machine, or the service would promise a precision OpenVINO does not compute."""
    pytest.importorskip("openvino")
    import openvino as ov

    from headstart.service.cpu import cpu_info
    from headstart.service.runtime import cpu_computes_bf16

    capabilities = ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    assert cpu_computes_bf16() == ("BF16" in capabilities), (cpu_info().summary(), capabilities)
    assert cpu_computes_bf16() == cpu_info().has_bf16
    assert not AVX2.has_bf16 and AVX512_BF16.has_bf16 and cpu_with("amx_bf16 amx_int8 avx512f").has_bf16


def test_bf16_is_served_only_where_the_export_allowed_it(hymenoptera_bundle):
    import dataclasses
    import functools

    from headstart.service import bundle

    m = hymenoptera_bundle.manifest
    served_precision = functools.partial(bundle.served_precision, cpu=AVX512_BF16)
    assert served_precision(m, "fp32", "onnxruntime")[0] == "fp32"
    assert served_precision(m, "fp32", "openvino", precision="fp32") == (
        "fp32",
        "fp32 asked for (HEADSTART_PRECISION=fp32)",
    )
    allowed = {"fp32": {"openvino-bf16": {"allowed": True, "top1_agreement": 1.0, "accuracy_drop": 0.0}}}
    assert served_precision(dataclasses.replace(m, runtimes=allowed), "fp32", "openvino")[0] == "bf16"
    # a CPU without bf16 units computes fp32 whatever the export allowed, and the reason says why
    precision, why = bundle.served_precision(dataclasses.replace(m, runtimes=allowed), "fp32", "openvino", cpu=AVX2)
    assert precision == "fp32" and why == "this CPU (AVX2) has no bf16 units (AMX or AVX-512 BF16); serving fp32"
    refused = {"fp32": {"openvino-bf16": {"allowed": False, "top1_agreement": 0.95, "accuracy_drop": 0.03}}}
    precision, why = served_precision(dataclasses.replace(m, runtimes=refused), "fp32", "openvino")
    assert precision == "fp32" and "bf16 failed the export's check" in why and "3.0 accuracy points" in why
    # a detector's check fails on its box scores, and the reason says so
    refused = {
        "fp32": {
            "openvino-bf16": {
                "allowed": False,
                "top1_agreement": 1.0,
                "max_abs_diff": {"probabilities": 0.01, "boxes": 0.2, "scores": 0.08},
            }
        }
    }
    precision, why = served_precision(dataclasses.replace(m, runtimes=refused), "fp32", "openvino")
    assert precision == "fp32" and "box scores moved by up to 0.080" in why
    precision, why = served_precision(dataclasses.replace(m, runtimes=None), "fp32", "openvino")
    assert precision == "fp32" and "not measured" in why


def test_asking_for_openvino_where_it_is_missing_fails_with_a_message(tiny_bundle, monkeypatch):
    from headstart.service import runtime
    from headstart.service.bundle import BundleError

    monkeypatch.setattr(runtime, "openvino_available", lambda: False)
    with pytest.raises(BundleError, match="openvino package is not installed: pip install openvino"):
        load_bundle(tiny_bundle.bundle_dir, runtime="openvino")
    assert load_bundle(tiny_bundle.bundle_dir, runtime="auto").runtime == "onnxruntime"  # auto: the other one
    with pytest.raises(BundleError, match="Invalid runtime 'tensorrt'"):
        load_bundle(tiny_bundle.bundle_dir, runtime="tensorrt")


def test_onnx_metadata_is_read_without_loading_the_model(tiny_bundle):
    from headstart.service.runtime import onnx_metadata

    path = tiny_bundle.bundle_dir / "model.onnx"
    assert onnx_metadata(path) == {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def test_the_cli_prints_its_own_lines_not_the_libraries_chatter(tiny_run, tmp_path):
    """`headstart export` printed about 80 lines of ONNX rewriting (onnxscript, onnx_ir, ONNX Runtime's quantizer);
    they show only with --verbose."""
    import subprocess
    import sys

    def stderr(*extra: str) -> list[str]:
        options = ["--no-store", "--int8", "--force", "--out", str(tmp_path / f"b{len(extra)}")]
        out = subprocess.run(
            [sys.executable, "-m", "headstart.cli", *extra, "export", str(tiny_run), *options],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-2000:]
        return out.stderr.splitlines()

    quiet, verbose = stderr(), stderr("--verbose")
    assert any("ONNX Runtime vs PyTorch" in line for line in quiet) and any("exported" in line for line in quiet)
    assert not any("initializer" in line or "unused nodes" in line for line in quiet), quiet
    assert len(quiet) < 20 and any("unused nodes" in line for line in verbose)
    assert sum(line.startswith("[onnx") for line in verbose) >= 5  # the libraries' lines, each led by its logger


@pytest.mark.parametrize("verbose", [False, True])
def test_verbose_shows_our_debug_and_the_libraries_info_by_name_never_their_debug(tmp_path, verbose):
    """`headstart -v train` printed 400 lines, none of them headstart's: PIL's EXIF tags of every photo it decoded
    and matplotlib's score of every font. With --verbose: our DEBUG lines, the libraries' INFO with their names."""
    import subprocess
    import sys

    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = 6  # rotated: PIL reads the EXIF block (and logs each tag at DEBUG)
    Image.new("RGB", (64, 48), (200, 30, 30)).save(tmp_path / "photo.jpg", exif=exif)
    code = (
        "import logging, sys\n"
        "from headstart.cli import configure_logging\n"
        "from headstart.service.preprocess import decode_image\n"
        f"configure_logging({verbose})\n"
        "img = decode_image(sys.argv[1])\n"
        "logging.getLogger('headstart').debug('our phase took 1.0s')\n"
        "logging.getLogger('headstart').info('our line %dx%d', *img.size)\n"
        "logging.getLogger('onnxscript.rewriter').info('Applied 107 rules')\n"
        "logging.getLogger('onnxscript.rewriter').warning('a warning')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "photo.jpg")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    expected = ["our line 48x64"] + (["our phase took 1.0s", "[onnxscript.rewriter] Applied 107 rules"] * verbose)
    expected += ["[onnxscript.rewriter] a warning" if verbose else "a warning"]
    assert sorted(out.stderr.splitlines()) == sorted(expected)


class _ScaledByBatch(torch.nn.Module):
    """Outputs that depend on the batch's size through a Python number: a trace would bake in its example's."""

    def __init__(self, by_batch: bool) -> None:
        super().__init__()
        self.conv, self.by_batch = torch.nn.Conv2d(3, 4, 3), by_batch

    def forward(self, x):
        y = self.conv(x).mean((2, 3))
        scale = torch.tensor(x.shape[0], dtype=torch.float32) if self.by_batch else 2.0  # a constant in a trace
        return torch.softmax(y, 1), y / scale


@pytest.mark.parametrize("by_batch", [False, True], ids=["traced", "trace-unsure"])
def test_the_onnx_file_is_traced_unless_the_tracer_is_unsure_and_holds_for_every_batch_size(by_batch, tmp_path, caplog):
    import onnxruntime as ort

    from headstart.onnx_io import export_onnx

    torch.manual_seed(0)
    model = _ScaledByBatch(by_batch).eval()
    with caplog.at_level("INFO", logger="headstart"):
        export_onnx(model, tmp_path / "m.onnx", 16, output_names=("probabilities", "scaled"))
    assert ("dynamo exporter (the trace may not hold" in caplog.text) == by_batch
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == (18 if by_batch else 17)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    for batch in (1, 2, 5):  # the trace's example has 2: a baked-in 2 gives wrong outputs at 1 and 5
        x = torch.rand(batch, 3, 16, 16) * 255
        with torch.inference_mode():
            expected = [t.numpy() for t in model(x)]
        for got, want in zip(session.run(None, {"pixels": x.numpy()}), expected, strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_where_the_dynamo_exporter_fails_the_traced_file_is_written_and_said(tmp_path, caplog, monkeypatch):
    from headstart.onnx_io import export_onnx

    export = torch.onnx.export

    def dynamo_fails(*args, dynamo=False, **kw):
        if dynamo:
            raise RuntimeError("an operator the dynamo exporter lacks")
        return export(*args, dynamo=False, **kw)

    monkeypatch.setattr(torch.onnx, "export", dynamo_fails)
    model = _ScaledByBatch(by_batch=False).eval()
    with caplog.at_level("WARNING", logger="headstart"):
        export_onnx(model, tmp_path / "m.onnx", 16, output_names=("probabilities", "scaled"), traced=False)
    assert "the dynamo ONNX exporter failed (an operator the dynamo exporter lacks)" in caplog.text
    assert onnx.load(str(tmp_path / "m.onnx")).opset_import[0].version == 17  # the traced file
    monkeypatch.setattr(torch.onnx, "export", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("no exporter")))
    with pytest.raises(RuntimeError, match="no exporter"):  # neither can write it: the export fails, no file
        export_onnx(model, tmp_path / "n.onnx", 16, output_names=("probabilities", "scaled"))
    assert not (tmp_path / "n.onnx").exists()


def test_export_finds_a_moved_data_set_with_data(tiny_run, tiny_bundle, tmp_path):
    """A run's data set moved (or the run copied to another machine): export said "images of the run are gone ...
    Restore the data set or retrain". `--data` says where it is now; the checks run on the same images there."""
    from headstart.exporter import data_moved

    record = load_run(tiny_run).record
    old_root = record.data["root"]
    shutil.copytree(old_root, tmp_path / "was")
    shutil.copytree(tiny_run, tmp_path / "run", ignore=shutil.ignore_patterns("bundle"))
    for name in ("splits.json", "config.yaml"):  # the copy trained on tmp/was, which then moved to tmp/now
        text = (tmp_path / "run" / name).read_text()
        (tmp_path / "run" / name).write_text(text.replace(old_root, str(tmp_path / "was")))
    (tmp_path / "was").rename(tmp_path / "now")
    with pytest.raises(ExportError, match=r"val images of the run are gone .*give its new place \(--data DIR\)"):
        export_bundle(tmp_path / "run", tmp_path / "b", store=False)
    with pytest.raises(ExportError, match=rf"not where --data puts them .*trained from \({tmp_path / 'was'}\)"):
        export_bundle(tmp_path / "run", tmp_path / "b", store=False, data=tmp_path)
    argv = ["export", str(tmp_path / "run"), "--out", str(tmp_path / "b"), "--no-store", "--int8"]
    assert main([*argv, "--data", str(tmp_path / "now")]) == 0
    exported = load_bundle(tmp_path / "b").manifest
    assert exported.verification == tiny_bundle.manifest.verification  # the same images, the same checks
    assert exported.int8 is not None and exported.int8["calibration_images"] > 0  # the training images, moved too

    # a detector's data.yaml (its `path: ..` above it) and images move with the folder that holds the yaml
    run = load_run(tiny_run)
    run.record = dataclasses.replace(run.record, data={"root": "/old/set", "yaml": "/old/set/yolo/data.yaml"})
    (tmp_path / "new" / "yolo").mkdir(parents=True)
    (tmp_path / "new" / "yolo" / "data.yaml").write_text("names: [a]\n")
    for given in (tmp_path / "new" / "yolo", tmp_path / "new" / "yolo" / "data.yaml"):
        moved = data_moved(run, given)
        assert moved.record.data == {"root": str(tmp_path / "new"), "yaml": str(tmp_path / "new/yolo/data.yaml")}
        assert moved.data_moved == (Path("/old/set/yolo"), tmp_path / "new" / "yolo")
    run.record = dataclasses.replace(run.record, data={"root": "/old/kc/train.csv"})  # an image,label CSV's run
    (tmp_path / "new" / "kc").mkdir()
    (tmp_path / "new" / "kc" / "train.csv").write_text("image,label\n")
    for given in (tmp_path / "new" / "kc", tmp_path / "new" / "kc" / "train.csv"):
        moved = data_moved(run, given)
        assert moved.record.data == {"root": str(tmp_path / "new" / "kc" / "train.csv")}
        assert moved.data_moved == (Path("/old/kc"), tmp_path / "new" / "kc")
    with pytest.raises(ExportError, match="--data /nowhere does not exist"):
        data_moved(run, "/nowhere")
