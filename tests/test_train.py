"""`headstart train/evaluate/predict` end to end on small synthetic folders, plus the real hymenoptera check."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from headstart import runs
from headstart.cli import main
from headstart.features import FeatureCache
from headstart.loaded_run import load_run
from headstart.models import build_backbone
from headstart.models.backbone import BackboneError
from headstart.runs import RunError
from headstart.tasks import ClassifyConfig, train

from .conftest import PHOTOS, counting_calls, make_image_folder


def tiny_config(data, out, cache, **kw) -> ClassifyConfig:
    defaults = dict(
        backbone="test_resnet", pretrained=False, views=3, epochs=30, patience=30, progress=False, batch_size=8, lr=1e-2
    )
    return ClassifyConfig(data_dir=str(data), out=str(out), cache_dir=str(cache), **{**defaults, **kw})


def head_tensors(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / runs.HEAD))


def test_train_writes_a_complete_run(tiny_folder, tmp_path, cache_dir):
    run_dir = train(tiny_config(tiny_folder, tmp_path / "run", cache_dir))
    for name in (*runs.REQUIRED, "augmentation.json", "data_report.json", "history.json"):
        assert (run_dir / name).is_file(), name
    for png in ("confusion_matrix.png", "training_curves.png", "worst_predictions.png"):
        assert (run_dir / png).read_bytes()[:4] == b"\x89PNG"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["accuracy"] >= 0.75  # colour shapes are separable even with random features
    assert set(metrics["per_class"]) == {"blue", "red"}
    assert {"precision", "recall", "f1", "support"} <= set(metrics["per_class"]["red"])
    assert 0 <= metrics["calibration_error"] <= 1
    assert json.loads((run_dir / "labels.json").read_text()) == ["blue", "red"]
    aug = json.loads((run_dir / "augmentation.json").read_text())
    assert aug["preset"] == "heavy" and "RandomResizedCrop" in json.dumps(aug["pipeline"])
    assert not (run_dir / runs.CHECKPOINT).exists()


def test_a_cache_folder_that_cannot_be_written_is_said_before_any_work(tiny_folder, tmp_path, monkeypatch, caplog):
    """HOME missing or read-only (a container's): the run stopped with NotADirectoryError at its first feature. The
    default cache is passed over with one warning, the run keeps its features in memory; a --cache-dir or
    HEADSTART_CACHE given that cannot be written is an error naming it; an empty XDG_CACHE_HOME is unset (the cache
    went to ./headstart/ of the current folder)."""
    from headstart.features import default_cache_dir

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.delenv("HEADSTART_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", "")
    monkeypatch.setenv("HOME", str(blocked))
    assert default_cache_dir() == blocked / ".cache" / "headstart" / "features"
    monkeypatch.chdir(tmp_path)
    cfg = tiny_config(tiny_folder, tmp_path / "run", cache="unused", views=1, epochs=2)
    cfg.cache_dir = None
    with caplog.at_level(logging.INFO):
        run_dir = train(cfg)
    said = [r.getMessage() for r in caplog.records]
    assert [m for m in said if "cannot be written" in m] == [
        f"the feature cache {blocked}/.cache/headstart/features cannot be written (Not a directory): this run keeps "
        "its features in memory only, and the next computes them again. Set HEADSTART_CACHE or --cache-dir to a "
        "folder this user can write."
    ]
    assert any(m.endswith("(float32), not cached") for m in said)
    assert (run_dir / runs.METRICS).is_file() and not (tmp_path / "headstart").exists()
    for given in ("--cache-dir", "HEADSTART_CACHE"):
        cfg = tiny_config(tiny_folder, tmp_path / f"run-{given}", cache=blocked / "cache", views=1, epochs=2)
        if given == "HEADSTART_CACHE":
            cfg.cache_dir = None
            monkeypatch.setenv("HEADSTART_CACHE", str(blocked / "cache"))
        with pytest.raises(ValueError, match=r"cannot be written: Not a directory\. .*--no-cache") as err:
            train(cfg)
        assert f"{blocked}/cache" in str(err.value) and f"({given})" in str(err.value)
        assert not (tmp_path / f"run-{given}" / runs.METRICS).exists()
    # no home at all (a container's user without HOME or a passwd line: "~" stays "~"): not ./~/.cache/ here
    from headstart.features import cache_root

    monkeypatch.delenv("HEADSTART_CACHE")
    monkeypatch.setattr("os.path.expanduser", lambda path: path)
    with caplog.at_level(logging.WARNING):
        assert cache_root(dataclasses.replace(cfg, cache_dir=None)) is None
    assert "(no home folder to hold it)" in caplog.records[-1].getMessage() and not (tmp_path / "~").exists()


def test_matplotlib_gets_a_lasting_folder_where_its_own_cannot_be_written(tmp_path, monkeypatch):
    """Under a missing or read-only home matplotlib made a new temporary folder at each run, listed the fonts again
    and warned in two lines: the plotting commands give it one in the temporary folder, kept between runs."""
    import tempfile

    from headstart.cli import matplotlib_folder

    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    monkeypatch.setenv("HOME", str(blocked))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("MPLCONFIGDIR", raising=False)
    matplotlib_folder()
    stand_in = Path(os.environ["MPLCONFIGDIR"])
    assert stand_in.parent == Path(tempfile.gettempdir()) and stand_in.name.startswith("headstart-matplotlib-")
    assert stand_in.is_dir()
    monkeypatch.setenv("MPLCONFIGDIR", str(tmp_path / "mine"))  # one set is left as it is
    matplotlib_folder()
    assert os.environ["MPLCONFIGDIR"] == str(tmp_path / "mine")
    monkeypatch.delenv("MPLCONFIGDIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # a usable home: nothing set
    matplotlib_folder()
    assert "MPLCONFIGDIR" not in os.environ and (tmp_path / "home" / ".config" / "matplotlib").is_dir()


def test_same_seed_same_result_and_cache_reuse(tiny_folder, tmp_path, cache_dir):
    a = train(tiny_config(tiny_folder, tmp_path / "a", cache_dir))
    files = sorted(cache_dir.rglob("*.npy"))
    assert len(files) == 56  # 24 train images (3 views each, one file), 8 val images, the 24 train images clean
    mtimes = [f.stat().st_mtime_ns for f in files]
    b = train(tiny_config(tiny_folder, tmp_path / "b", cache_dir))
    assert [f.stat().st_mtime_ns for f in files] == mtimes  # nothing recomputed
    for key, value in head_tensors(a).items():
        assert torch.equal(value, head_tensors(b)[key])


def test_cache_invalidation_on_changed_image_and_recipe(tiny_folder, tmp_path, cache_dir):
    train(tiny_config(tiny_folder, tmp_path / "a", cache_dir))
    before = {f.name for f in cache_dir.rglob("*.npy")}
    victim = tiny_folder / "train" / "red" / "red_000.jpg"
    make_image_folder(tmp_path / "other", {"x": 1}, seed=9)
    victim.write_bytes((tmp_path / "other" / "x" / "x_000.jpg").read_bytes())
    train(tiny_config(tiny_folder, tmp_path / "b", cache_dir))
    after = {f.name for f in cache_dir.rglob("*.npy")}
    assert len(after - before) == 2  # exactly the changed image: its views and its clean features
    train(tiny_config(tiny_folder, tmp_path / "c", cache_dir, augment="light"))
    assert len({f.name for f in cache_dir.rglob("*.npy")} - after) == 24  # new recipe: train views only


def test_the_cache_command_shows_and_prunes_the_least_recently_used_and_nothing_else(
    tiny_folder, tmp_path, cache_dir, capsys
):
    """`headstart cache`: where the cache is and how large; --keep-gb removes the least recently used files (a read
    counts as a use), --clear every file of the cache, and nothing else in the folder; a run after either computes
    what it needs again, with the same result."""
    import os
    import time

    a = train(tiny_config(tiny_folder, tmp_path / "a", cache_dir))
    of_a = {p for p, _ in FeatureCache(cache_dir).files()}  # its 56 features and the note of the checked images
    train(tiny_config(tiny_folder, tmp_path / "b", cache_dir, augment="light"))  # 24 more files: other views
    own = FeatureCache(cache_dir).files()
    assert len(own) == 56 + 24 + 1  # and the note of the checked images
    assert main(["cache", "--cache-dir", str(cache_dir), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["files"] == 81 and shown["bytes"] == sum(st.st_size for _, st in own) and shown["removed"] is None
    old = {p for p, _ in own}
    hour = 3600 * 10**9
    for path in old:  # all written 2 h and used 1 h ago (where the kernel itself would not note a read: relatime)
        os.utime(path, ns=(time.time_ns() - hour, time.time_ns() - 2 * hour))
    # then a run of `a`'s options reads its 56 files
    again = train(tiny_config(tiny_folder, tmp_path / "a2", cache_dir))
    used = of_a
    foreign = cache_dir / "notes.txt"
    foreign.write_text("mine")
    (cache_dir / "ab").mkdir(exist_ok=True)
    (cache_dir / "ab" / "mine.json").write_text("{}")
    keep = sum(p.stat().st_size for p in used)
    assert main(["cache", "--cache-dir", str(cache_dir), "--keep-gb", str(keep / 2**30), "--json"]) == 0
    pruned = json.loads(capsys.readouterr().out)
    assert pruned["removed"]["files"] == 24 and pruned["files"] == 57
    assert {p for p, _ in FeatureCache(cache_dir).files()} == used
    assert main(["cache", "--cache-dir", str(cache_dir), "--clear"]) == 0
    assert "removed 57 files" in capsys.readouterr().out
    assert FeatureCache(cache_dir).files() == [] and foreign.read_text() == "mine"
    assert (cache_dir / "ab" / "mine.json").is_file()
    c = train(tiny_config(tiny_folder, tmp_path / "c", cache_dir))  # everything computed again
    for key, value in head_tensors(a).items():
        assert torch.equal(value, head_tensors(c)[key]) and torch.equal(value, head_tensors(again)[key])
    assert main(["cache", "--cache-dir", str(cache_dir), "--keep-gb", "-1"]) == 2
    assert "--keep-gb must be 0 or more" in capsys.readouterr().err
    assert main(["cache", "--cache-dir", str(foreign)]) == 2  # a file: was shown as an empty cache
    assert f"{foreign} is a file, not a feature cache" in capsys.readouterr().err
    # a read from the cache notes the use itself (the kernel may not: noatime; relatime after a day); an access
    # time in the future, which the kernel leaves as it is, shows it
    path = next(p for p, _ in FeatureCache(cache_dir).files() if p.suffix == ".npy")
    written, future = path.stat().st_mtime_ns, time.time_ns() + 86400 * 10**9
    os.utime(path, ns=(future, written))
    assert FeatureCache(cache_dir).get(path.stem, None) is not None
    assert path.stat().st_atime_ns < future and path.stat().st_mtime_ns == written


def test_a_prune_that_cannot_remove_a_file_removes_the_others_and_says_so(tmp_path, monkeypatch, caplog):
    from pathlib import Path

    cache = FeatureCache(tmp_path)
    for i in range(3):
        cache.put(f"{i:02x}" * 32, np.zeros(256, np.float32))
    stuck, real = cache._path("01" * 32), Path.unlink

    def unlink(self, missing_ok=False):
        if self == stuck:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with caplog.at_level(logging.WARNING):
        assert cache.prune(0)[0] == 2
    assert [p for p, _ in cache.files()] == [stuck] and "could not remove 1 files" in caplog.text


def test_truncated_cache_file_is_recomputed(tiny_folder, tmp_path, cache_dir):
    a = train(tiny_config(tiny_folder, tmp_path / "a", cache_dir))
    for f in sorted(cache_dir.rglob("*.npy"))[:3]:
        f.write_bytes(f.read_bytes()[:100])
    b = train(tiny_config(tiny_folder, tmp_path / "b", cache_dir))
    assert json.loads((b / "metrics.json").read_text())["training"]["feature_cache_recomputed_corrupt"] == 3
    for key, value in head_tensors(a).items():
        assert torch.equal(value, head_tensors(b)[key])


def test_a_cache_write_that_fails_stops_the_run_with_the_disks_error(tiny_folder, tmp_path, cache_dir, monkeypatch):
    """Cache files are written on a thread of their own: a write that fails (a full disk) still stops the run, with
    its error, and no run is marked done; what was written before it stays valid for the next run."""
    original, calls = FeatureCache.put, {"n": 0}

    def put(self, key, arr, dtype=np.float32):
        calls["n"] += 1
        if calls["n"] > 4:
            raise OSError(28, "No space left on device")
        return original(self, key, arr, dtype)

    monkeypatch.setattr(FeatureCache, "put", put)
    with pytest.raises(OSError, match="No space left on device"):
        train(tiny_config(tiny_folder, tmp_path / "full", cache_dir))
    assert not (tmp_path / "full" / runs.DONE).exists()
    assert len(list(cache_dir.rglob("*.npy"))) == 4
    monkeypatch.setattr(FeatureCache, "put", original)
    again = train(tiny_config(tiny_folder, tmp_path / "again", cache_dir))
    assert json.loads((again / "metrics.json").read_text())["training"]["feature_cache_recomputed_corrupt"] == 0


class Interrupt(KeyboardInterrupt):
    pass


def interrupt_after(monkeypatch, target, name, calls):
    original = getattr(target, name)
    count = {"n": 0}

    def wrapper(*args, **kwargs):
        count["n"] += 1
        if count["n"] > calls:
            raise Interrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(target, name, wrapper)


@pytest.mark.parametrize("where", ["features", "head"])
def test_resume_after_interruption_gives_the_same_result(where, tiny_folder, tmp_path, monkeypatch):
    reference = train(tiny_config(tiny_folder, tmp_path / "ref", tmp_path / "cache_ref"))
    cfg = tiny_config(tiny_folder, tmp_path / "run", tmp_path / "cache")
    with monkeypatch.context() as m:
        if where == "features":
            interrupt_after(m, FeatureCache, "put", 10)
        else:
            interrupt_after(m, runs, "save_torch", 7)
        with pytest.raises(Interrupt):
            train(cfg)
    assert not (tmp_path / "run" / runs.DONE).exists()
    if where == "head":
        assert (tmp_path / "run" / runs.CHECKPOINT).exists()
    with pytest.raises(RunError, match="--resume"):
        train(cfg)
    cfg.resume = True
    train(cfg)
    for key, value in head_tensors(reference).items():
        assert torch.equal(value, head_tensors(tmp_path / "run")[key]), key
    ref_hist = json.loads((reference / "history.json").read_text())
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == ref_hist


def test_resume_refuses_changed_options(tiny_folder, tmp_path, cache_dir):
    train(tiny_config(tiny_folder, tmp_path / "run", cache_dir))
    with pytest.raises(RunError, match="lr"):
        train(tiny_config(tiny_folder, tmp_path / "run", cache_dir, lr=0.1, resume=True))


def test_class_weights_when_unbalanced(tmp_path, cache_dir):
    data = make_image_folder(tmp_path / "d", {"many": 30, "few": 8})
    run_dir = train(tiny_config(data, tmp_path / "run", cache_dir, views=1, augment="none"))
    info = json.loads((run_dir / "metrics.json").read_text())["training"]["class_weights"]
    assert info["weighted_loss"] is True and info["weights"][0] > info["weights"][1]  # "few" sorts first


def test_hidden_head_unfreeze_and_reload(tiny_folder, tmp_path, cache_dir):
    cfg = tiny_config(
        tiny_folder, tmp_path / "run", cache_dir, hidden=16, activation="leaky_relu", unfreeze=1, finetune_epochs=2
    )
    run_dir = train(cfg)
    assert (run_dir / runs.BACKBONE_TAIL).is_file()
    run = load_run(run_dir)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["training"]["finetune"]["unfrozen_stages"] == ["layer4"]
    # the reloaded model reproduces the run's validation accuracy
    from headstart.predict import predict_paths

    val = sorted((tiny_folder / "val").rglob("*.jpg"))
    probs = predict_paths(run.model, val, run.spec)
    targets = np.array([run.labels.index(p.parent.name) for p in val])
    assert (probs.argmax(1) == targets).mean() == pytest.approx(metrics["accuracy"])


def test_backbone_batchnorm_stays_in_eval_mode():
    bb = build_backbone("test_resnet", pretrained=False)
    bb.freeze(2)
    bb.features.train()
    bns = [m for m in bb.features.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns and not any(m.training for m in bns)
    before = [m.running_mean.clone() for m in bns]
    bb.features(torch.randn(4, 3, 64, 64) * 5 + 3)
    assert all(torch.equal(a, m.running_mean) for a, m in zip(before, bns, strict=True))
    trainable = {n.split(".")[1] for n, p in bb.features.named_parameters() if p.requires_grad}
    assert trainable == {"layer3", "layer4"}


def test_backbone_errors(monkeypatch, tmp_path):
    with pytest.raises(BackboneError, match="resnet50"):
        build_backbone("resnt50", pretrained=False)
    from torchvision.models._api import WeightsEnum

    def offline(*a, **k):
        raise urllib.error.URLError("Name or service not known")

    monkeypatch.setattr(WeightsEnum, "get_state_dict", offline)
    with pytest.raises(BackboneError, match="--weights PATH.*--no-pretrained"):
        build_backbone("torchvision:mobilenet_v2")
    bad = tmp_path / "bad.pth"
    torch.save({"features.0.weight": torch.zeros(3)}, bad)
    with pytest.raises(BackboneError, match="do not fit"):
        build_backbone("torchvision:mobilenet_v2", weights=bad)
    with pytest.raises(BackboneError, match="vit_b_16 has no convolutional feature map"):
        build_backbone("torchvision:vit_b_16", pretrained=False)
    with pytest.raises(BackboneError, match="not a spatial feature map"):
        build_backbone("test_vit", pretrained=False)


def test_an_unreachable_hub_fails_at_once_with_what_to_do(monkeypatch):
    """huggingface_hub retried an unreachable hub for about 50 s before failing: the hub is probed first, and the
    download runs in offline mode when it does not answer (cached weights still load, others fail at once)."""
    import timm
    from huggingface_hub import constants

    from headstart.models.backbone import hub_reachable

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: connection refused
    monkeypatch.setenv("HF_HUB_CACHE", "/nonexistent-headstart-cache")
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # the probe decides, not the environment
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    assert not hub_reachable()
    offline_during_download, create = [], timm.create_model

    def recording(*args, **kwargs):
        offline_during_download.append(constants.HF_HUB_OFFLINE)
        return create(*args, **kwargs)

    monkeypatch.setattr(timm, "create_model", recording)
    with pytest.raises(BackboneError, match="--weights PATH.*HF_HUB_OFFLINE.*--no-pretrained"):
        build_backbone("resnet18")
    assert offline_during_download == [True] and constants.HF_HUB_OFFLINE is False


def test_cli_errors_are_clear(tiny_folder, tmp_path, capsys):
    assert (
        main(
            [
                "train",
                str(tmp_path / "missing"),
                "--out",
                str(tmp_path / "r"),
                "--backbone",
                "test_resnet",
                "--no-pretrained",
            ]
        )
        == 2
    )
    assert "does not exist" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nothing"), "x.jpg"]) == 2
    assert "does not exist. Give a run directory" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["predict", str(tmp_path / "empty"), "x.jpg"]) == 2
    assert "not a headstart bundle" in capsys.readouterr().err
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.yaml").write_text("{}")
    assert main(["evaluate", str(tmp_path / "half"), str(tiny_folder / "val")]) == 2
    assert "incomplete" in capsys.readouterr().err


def test_cli_train_evaluate_predict(tiny_folder, tmp_path, cache_dir, capsys):
    out = tmp_path / "run"
    args = [
        "train",
        str(tiny_folder),
        "--out",
        str(out),
        "--backbone",
        "test_resnet",
        "--no-pretrained",
        "--views",
        "2",
        "--cache-dir",
        str(cache_dir),
        "--no-progress",
    ]
    assert main(args) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), str(tiny_folder / "val"), "--out", str(tmp_path / "ev"), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["num_images"] == 8 and (tmp_path / "ev" / "confusion_matrix.png").is_file()
    image = next((tiny_folder / "val" / "red").glob("*.jpg"))
    assert main(["predict", str(out), str(image), str(tmp_path / "nope.jpg"), "--top-k", "2", "--json"]) == 1
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [p["label"] for p in lines[0]["predictions"]] and len(lines[0]["predictions"]) == 2
    assert sum(p["score"] for p in lines[0]["predictions"]) == pytest.approx(1.0, abs=1e-5)
    assert "does not exist" in lines[1]["error"]


@pytest.mark.slow
def test_hymenoptera_with_shared_mobilenet_reaches_093(hymenoptera_run):
    """The real check: real photos, real pretrained features, default recipe."""
    metrics = json.loads((hymenoptera_run / "metrics.json").read_text())
    assert metrics["num_images"] == 153
    assert metrics["accuracy"] >= 0.93, metrics["accuracy"]
    preprocess = json.loads((hymenoptera_run / "preprocess.json").read_text())
    assert preprocess["resize"] == 256 and preprocess["input_size"] == 224  # from the weights' own config
    run = load_run(hymenoptera_run)
    from headstart.predict import predict_paths

    probs = predict_paths(run.model, [PHOTOS / "cat.bmp"], run.spec)
    assert probs.shape == (1, 2) and np.isclose(probs.sum(), 1.0, atol=1e-5)


# ---------------------------------------------------------------- the engine: devices, and resuming any task


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_device_cuda_without_a_gpu_is_refused_before_anything_is_written(tiny_folder, tmp_path, cache_dir, capsys):
    args = [
        "train",
        str(tiny_folder),
        "--out",
        str(tmp_path / "run"),
        "--backbone",
        "test_resnet",
        "--no-pretrained",
        "--device",
        "cuda",
    ]
    assert main(args) == 2
    assert "--device cuda was asked for but torch sees no usable GPU" in capsys.readouterr().err
    assert not any((tmp_path / "run").iterdir())


def test_auto_device_on_a_machine_without_gpu_is_the_cpu(tiny_folder, tmp_path, cache_dir):
    from headstart.extractor import resolve_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == expected
    run_dir = train(tiny_config(tiny_folder, tmp_path / "run", cache_dir, epochs=2))
    assert json.loads((run_dir / "metrics.json").read_text())["training"]["device"] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on a lent GPU machine)")
def test_training_on_cuda_extracts_fits_and_finetunes_there_like_the_cpu(tiny_folder, tmp_path):
    """The same run on the GPU and on the CPU: the same files, and heads that agree (not bit for bit: other kernels)."""
    runs_ = {
        d: train(
            tiny_config(
                tiny_folder,
                tmp_path / d,
                tmp_path / f"cache-{d}",
                device=d,
                precision="fp32",
                unfreeze=1,
                finetune_epochs=1,
                hidden=8,
            )
        )
        for d in ("cpu", "cuda")
    }
    metrics = {d: json.loads((r / "metrics.json").read_text()) for d, r in runs_.items()}
    assert metrics["cuda"]["training"]["device"] == "cuda"
    assert abs(metrics["cuda"]["accuracy"] - metrics["cpu"]["accuracy"]) <= 0.25
    files = {d: sorted(p.name for p in r.iterdir()) for d, r in runs_.items()}
    assert files["cuda"] == files["cpu"]
    model = load_run(runs_["cuda"]).model  # a GPU-trained run loads and predicts on the CPU
    pixels = torch.rand(2, 3, 224, 224) * 255
    assert torch.isfinite(model(pixels)[0]).all()


def test_a_detection_run_resumes_after_interruption_with_the_same_head(tmp_path, monkeypatch):
    """The engine gives every task --resume: here a grid detector, interrupted during head training."""
    from .conftest import COCO128, MOBILENET, coco128_report, require_shared

    require_shared()
    from headstart.tasks import DetectConfig

    def config(out, **kw):
        return DetectConfig(
            data_dir=str(COCO128),
            out=str(out),
            backbone="torchvision:mobilenet_v2",
            weights=str(MOBILENET),
            input_size=128,
            views=1,
            hidden=16,
            epochs=6,
            eval_every=2,
            cache_dir=str(tmp_path / "cache"),
            progress=False,
            **kw,
        )

    reference = train(config(tmp_path / "ref"), coco128_report(16, 8))
    with monkeypatch.context() as m:
        interrupt_after(m, runs, "save_torch", 3)
        with pytest.raises(Interrupt):
            train(config(tmp_path / "run"), coco128_report(16, 8))
    assert (tmp_path / "run" / runs.CHECKPOINT).exists() and not (tmp_path / "run" / runs.DONE).exists()
    train(config(tmp_path / "run", resume=True), coco128_report(16, 8))
    for key, value in head_tensors(reference).items():
        assert torch.equal(value, head_tensors(tmp_path / "run")[key]), key
    assert json.loads((tmp_path / "run" / "history.json").read_text()) == json.loads(
        (reference / "history.json").read_text()
    )


def test_a_run_whose_features_would_not_fit_the_memory_bound_stops_before_extracting(tiny_folder, tmp_path, cache_dir):
    with pytest.raises(
        ValueError,
        match=r"would take .* GiB in memory .* over --max-feature-gb 1e-09\. Not even 1 view "
        r"per image fits: lower --input-size",
    ):
        train(tiny_config(tiny_folder, tmp_path / "run", cache_dir, max_feature_gb=1e-9))
    assert not cache_dir.exists() or not any(cache_dir.rglob("*.npy"))
    run_dir = train(tiny_config(tiny_folder, tmp_path / "ok", cache_dir, epochs=2))
    training = json.loads((run_dir / "metrics.json").read_text())["training"]
    gib, views = training["feature_gib"], training["views"]
    assert 0 < gib < 0.01 and views == 3
    # a bound of about 2.5 views per image: the error names how many views do fit (2), and 2 views then train
    bound = gib * 2.5 / 3
    with pytest.raises(ValueError, match=r"Lower --views \(3; at most 2 fit\) or --input-size"):
        train(tiny_config(tiny_folder, tmp_path / "run2", cache_dir, max_feature_gb=bound))
    assert train(tiny_config(tiny_folder, tmp_path / "two", cache_dir, epochs=2, views=2, max_feature_gb=bound))


def test_overwrite_keeps_the_bundle_exported_from_the_old_run(tmp_path, caplog):
    """--overwrite empties the run directory, but the bundle `headstart export` wrote inside it is moved beside the
    run (RUN.bundle-TIMESTAMP) and the log says where; without --overwrite or --resume an existing run is refused."""
    from headstart import runs

    run_dir = tmp_path / "run"
    (run_dir / "bundle").mkdir(parents=True)
    (run_dir / "bundle" / "manifest.json").write_text("{}")
    (run_dir / "head.safetensors").write_bytes(b"old")
    with pytest.raises(runs.RunError, match="--overwrite"):
        runs.prepare_run_dir(run_dir, {}, resume=False, overwrite=False)
    with caplog.at_level("WARNING"):
        runs.prepare_run_dir(run_dir, {}, resume=False, overwrite=True)
    assert run_dir.is_dir() and not any(run_dir.iterdir())
    (kept,) = tmp_path.glob("run.bundle-*")
    assert (kept / "manifest.json").read_text() == "{}" and str(kept) in caplog.text


def test_progress_bars_only_on_a_terminal(tiny_folder, tmp_path, cache_dir):
    """tqdm wrote every update as a new line when the output was a file or a pipe: the CLI draws bars only on a
    terminal."""
    import subprocess
    import sys

    options = ["--backbone", "test_resnet", "--no-pretrained", "--views", "2", "--epochs", "3"]
    options += ["--out", str(tmp_path / "run"), "--cache-dir", str(cache_dir)]
    out = subprocess.run(
        [sys.executable, "-m", "headstart.cli", "train", str(tiny_folder), *options],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert "\r" not in out.stderr and "it/s" not in out.stderr and "img/s" not in out.stderr, out.stderr[-1000:]
    assert "done in" in out.stderr


def test_the_training_curves_mark_the_kept_epoch(tiny_run, monkeypatch, tmp_path):
    """Early stopping keeps the best epoch, not the last: the curves mark it, where metrics.json says it is."""
    from matplotlib.axes import Axes

    from headstart.tasks.classify.metrics import plot_training_curves

    history = json.loads((tiny_run / "history.json").read_text())
    best = json.loads((tiny_run / "metrics.json").read_text())["training"]["head"]["best_epoch"]
    lines, axvline = [], Axes.axvline
    monkeypatch.setattr(
        Axes, "axvline", lambda self, x=0, **kw: lines.append((x, kw.get("label"))) or axvline(self, x, **kw)
    )
    plot_training_curves(history, tmp_path / "curves.png", best)
    assert lines == [(best, f"kept (epoch {best})")] * 2 and (tmp_path / "curves.png").stat().st_size > 0


def test_the_confusion_matrix_of_many_classes_shows_the_most_confused_and_the_rest_summed(monkeypatch, tmp_path):
    """120 classes were drawn whole: a 6200-pixel picture of 14,400 counts (300 classes: 137 s and 8.3 GB). Now the
    30 most confused, and a row and a column for the others, whose counts add up to the whole matrix."""
    from matplotlib.axes import Axes
    from PIL import Image

    from headstart.tasks.classify.metrics import MOST_CLASSES_PLOTTED, confused_classes, plot_confusion_matrix

    n = 120
    rng = np.random.default_rng(0)
    cm = np.diag(rng.integers(5, 20, n))
    for true, pred, count in ((7, 90, 6), (90, 7, 2), (33, 34, 4), (118, 0, 1)):
        cm[true, pred] = count
    picked = confused_classes(cm)
    assert len(picked) == MOST_CLASSES_PLOTTED and {0, 7, 33, 34, 90, 118} <= set(picked.tolist())
    assert picked.tolist() == sorted(picked.tolist())
    assert confused_classes(cm[:10, :10]).tolist() == list(range(10))
    drawn = []
    imshow = Axes.imshow
    monkeypatch.setattr(Axes, "imshow", lambda self, x, **kw: drawn.append(np.asarray(x)) or imshow(self, x, **kw))
    plot_confusion_matrix(cm, [f"class {i}" for i in range(n)], tmp_path / "cm.png")
    (shown,) = drawn
    assert shown.shape == (MOST_CLASSES_PLOTTED + 1,) * 2 and shown.sum() == cm.sum()
    rest = np.setdiff1d(np.arange(n), picked)
    assert shown[-1, -1] == cm[np.ix_(rest, rest)].sum()
    row, column = picked.tolist().index(7), picked.tolist().index(90)
    assert shown[row, column] == 6 and shown[column, row] == 2 and shown[row, row] == cm[7, 7]
    with Image.open(tmp_path / "cm.png") as png:
        assert max(png.size) <= 100 * (0.5 * (MOST_CLASSES_PLOTTED + 1) + 2)  # inches at 100 dpi
    plot_confusion_matrix([[3, 1], [0, 4]], ["a", "b"], tmp_path / "small.png")
    assert drawn[1].tolist() == [[3, 1], [0, 4]]  # a few classes: drawn whole, no "other classes"


def test_openvino_features_match_torch_and_repeat_bit_for_bit():
    """The default extractor on CPUs: OpenVINO's fp32 features are torch's within float noise (the export check's
    |Δp| <= 1e-3 sees nothing of it), its bf16 features within a bf16 rounding step, and a second extractor built
    from the same net gives the same bits (runs stay reproducible on one machine)."""
    from torch import nn

    from headstart.extractor import Extractor, features_fn
    from headstart.models import PixelNormalize
    from headstart.service.preprocess import PreprocessSpec, decode_for, preprocess_batch
    from headstart.service.runtime import openvino_available

    from .conftest import HYMENOPTERA, MOBILENET, require_shared

    require_shared()
    if not openvino_available():
        pytest.skip("openvino is not installed")
    spec = PreprocessSpec()
    paths = sorted((HYMENOPTERA / "val" / "bees").glob("*.jpg"))[:12]
    pixels = preprocess_batch([decode_for(p, spec) for p in paths], spec)
    backbone = build_backbone("torchvision:mobilenet_v2", pretrained=False, weights=str(MOBILENET))
    net = nn.Sequential(PixelNormalize(spec.mean, spec.std), backbone.features).eval()
    reference = features_fn(net, bf16=False)(pixels)

    extractor = Extractor(net, input_size=spec.input_size)
    assert extractor.runtime == "openvino"
    fp32, bf16 = extractor.fn(False)(pixels), extractor.fn(True)(pixels)
    assert fp32.shape == bf16.shape == reference.shape == (12, 1280)
    assert np.abs(fp32 - reference).max() <= 1e-4 * np.abs(reference).max()  # measured 9e-6 of 4.2
    assert np.corrcoef(bf16.ravel(), reference.ravel())[0, 1] >= 0.995  # measured 0.999, as torch's own bf16
    again = Extractor(net, input_size=spec.input_size)
    assert np.array_equal(again.fn(False)(pixels), fp32) and np.array_equal(again.fn(True)(pixels), bf16)
    maps = Extractor(net, input_size=spec.input_size, pool=False).fn(False)(pixels[:2])
    assert maps.shape == (2, 1280, 7, 7) and np.allclose(maps.mean(axis=(2, 3)), fp32[:2], atol=1e-4)
    # started (computing while the next pixels are made), each batch's features are those computed in turn
    waits = [extractor.fn(True).start(pixels[k : k + 4]) for k in range(0, 12, 4)]
    for k, wait in zip(range(0, 12, 4), waits, strict=True):
        assert np.array_equal(wait(), extractor.fn(True)(pixels[k : k + 4]))


def test_a_decoded_image_is_kept_for_the_next_pass_once_and_within_its_bound(tmp_path):
    """The training images' clean pass takes the images their augmented pass decoded (each decoded once for
    both); a kept image is handed out once, and what is kept stays within the bound."""
    from PIL import Image

    from headstart.features import DecodedImages
    from headstart.service.preprocess import PreprocessSpec

    spec = PreprocessSpec()
    paths = []
    for k in range(3):
        paths.append(tmp_path / f"{k}.png")
        Image.new("RGB", (100, 50), (k, 0, 0)).save(paths[-1])
    decoded = DecodedImages(spec, max_bytes=2 * 100 * 50 * 3)
    images = [decoded.take(p) for p in paths]
    for p, img in zip(paths, images, strict=True):
        decoded.keep(p, img)
    assert decoded.bytes == 2 * 100 * 50 * 3  # the third is over the bound: not kept
    assert decoded.take(paths[0]) is images[0] and decoded.take(paths[1]) is images[1]
    again = decoded.take(paths[0])  # handed out once: decoded anew
    assert again is not images[0] and np.array_equal(np.asarray(again), np.asarray(images[0]))
    assert decoded.take(paths[2]) is not images[2] and decoded.bytes == 0


def test_what_decoded_images_may_hold_follows_the_memory_available(monkeypatch):
    """An eighth of the memory available (a container's limit counted), between 256 MiB and 1 GiB."""
    from headstart import features

    assert 0 < features.memory_available() < 2**50  # read on Linux (CI, the machines here)
    for available, budget in ((None, 256), (2**30, 256), (4 * 2**30, 512), (64 * 2**30, 1024)):
        monkeypatch.setattr(features, "memory_available", lambda _a=available: _a)
        assert features.decoded_budget() == budget * 2**20
        assert features.DecodedImages(None).max_bytes == budget * 2**20


def test_a_first_run_decodes_each_image_once_and_a_rerun_none(tiny_folder, tmp_path, cache_dir, monkeypatch):
    """The data check decodes each image as the model reads it and hands it to the feature extraction: a first run
    decodes every image once (it decoded each twice: at 1/8 scale for the check, then for the features), a rerun
    on the same cache none. Where the preprocessing read before the backbone is built is not the backbone's, the
    kept images are let go and each is decoded again: the same features, the same head."""
    from headstart import data, engine, features
    from headstart.service.preprocess import PreprocessSpec

    calls = counting_calls(monkeypatch, model=(features, "decode_for"), eighth=(data, "decode_image"))
    first = train(tiny_config(tiny_folder, tmp_path / "first", cache_dir))
    assert calls == {"model": 32, "eighth": 0}  # 24 training and 8 validation images, each decoded once
    calls.update(model=0)
    train(tiny_config(tiny_folder, tmp_path / "rerun", cache_dir))
    assert calls == {"model": 0, "eighth": 0}

    monkeypatch.setattr(engine, "backbone_preprocess", lambda *a: PreprocessSpec(resize=512))  # not test_resnet's
    other = train(tiny_config(tiny_folder, tmp_path / "other", tmp_path / "other-cache"))
    assert calls == {"model": 64, "eighth": 0}  # the check's decoding did not serve: each decoded again
    for key, value in head_tensors(first).items():
        assert torch.equal(value, head_tensors(other)[key])


@pytest.mark.parametrize(
    "name, weights",
    [
        ("test_resnet", None),
        ("resnet18", None),
        ("torchvision:resnet18", None),
        ("torchvision:mobilenet_v2", "weights/mobilenet_v2_imagenet.pth"),  # its preprocessing in the JSON beside it
    ],
)
def test_the_preprocessing_read_before_the_build_is_the_builds(name, weights):
    """What the data check decodes for is read before the backbone is built (without building or downloading it):
    it must be what the built backbone gives; an unknown name gives none (the build says what is wrong)."""
    from headstart.models.backbone import backbone_preprocess

    from .conftest import SHARED, require_shared

    if weights:
        require_shared()
        weights = SHARED / weights
    built = build_backbone(name, pretrained=False, weights=weights).preprocess
    assert backbone_preprocess(name, weights) == built
    assert backbone_preprocess(name.replace("resnet", "resnett").replace("mobilenet", "mobilenett")) is None


def test_the_extractor_is_chosen_recorded_and_kept_apart_in_the_cache(tiny_folder, tmp_path, cache_dir):
    from headstart.service.runtime import openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    torch_run = train(tiny_config(tiny_folder, tmp_path / "torch", cache_dir, extractor="torch"))
    files = len(list(cache_dir.rglob("*.npy")))
    default = train(tiny_config(tiny_folder, tmp_path / "default", cache_dir))
    assert len(list(cache_dir.rglob("*.npy"))) == 2 * files  # OpenVINO's features never stand in for torch's
    for run_dir, runtime in ((torch_run, "torch"), (default, "openvino")):
        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["training"]["extractor"] == runtime
        assert metrics["accuracy"] >= 0.75
    with pytest.raises(ValueError, match="Invalid --extractor 'onnx'. Use one of auto, openvino, torch"):
        train(tiny_config(tiny_folder, tmp_path / "bad", cache_dir, extractor="onnx"))
    with pytest.raises(ValueError, match="--extractor openvino runs on the CPU"):
        train(tiny_config(tiny_folder, tmp_path / "gpu", cache_dir, extractor="openvino", device="cuda"))


def test_training_does_not_ask_pypi_for_a_newer_albumentations():
    """Importing albumentations asks pypi.org for its latest version (a request per training run, a warning on every
    offline one); headstart turns that off unless the user asks for it (NO_ALBUMENTATIONS_UPDATE=0)."""
    import os
    import subprocess
    import sys

    probe = "import headstart.engine, albumentations.check_version as c; print(c.opener is None)"
    env = {k: v for k, v in os.environ.items() if k != "NO_ALBUMENTATIONS_UPDATE"}
    env["https_proxy"] = env["HTTPS_PROXY"] = "http://127.0.0.1:9"  # should a check run, it fails here at once
    for setting, checked in ((None, False), ("0", True)):
        run_env = env if setting is None else {**env, "NO_ALBUMENTATIONS_UPDATE": setting}
        cmd = [sys.executable, "-W", "default", "-c", probe]
        done = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == str(not checked)  # the check makes its URL opener first
        assert ("version info" in done.stderr) == checked, done.stderr


def test_the_command_exits_at_once_with_everything_written(tiny_folder, tmp_path, cache_dir):
    """`headstart` skips the interpreter's teardown and the threads libraries leave (OpenVINO's usage event): what
    the command printed and wrote is all there, and its exit code is the command's."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "headstart", "train", str(tiny_folder), "--out", str(tmp_path / "run")]
    cmd += ["--backbone", "test_resnet", "--no-pretrained", "--views", "2", "--epochs", "3"]
    cmd += ["--cache-dir", str(cache_dir), "--json"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    printed = json.loads(done.stdout)
    assert printed["run"] == str(tmp_path / "run") and (tmp_path / "run" / runs.DONE).is_file()
    assert "done in" in done.stderr  # the log, flushed before the exit
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=300)  # the run exists: refused
    assert again.returncode == 2 and "--overwrite" in again.stderr and again.stdout == ""


def test_a_net_openvino_refuses_is_computed_by_torch_or_refused_by_name(monkeypatch, caplog):
    from torch import nn

    from headstart import extractor

    net = nn.Sequential(nn.Conv2d(3, 4, 3, stride=2), nn.ReLU()).eval()
    pixels = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32) * 255

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(extractor, "_openvino_fns", refuse)
    fallback = extractor.Extractor(net, input_size=32)
    assert fallback.runtime == "torch" and "torch computes them" in caplog.text
    assert np.allclose(fallback.fn(False)(pixels), extractor.features_fn(net, False)(pixels))
    with pytest.raises(ValueError, match="OpenVINO cannot compute this backbone's features .*--extractor torch"):
        extractor.Extractor(net, input_size=32, extractor="openvino")


def test_openvino_compiles_only_for_a_missing_feature_and_a_late_refusal_starts_again_with_torch(
    tiny_folder, tmp_path, cache_dir, monkeypatch, caplog
):
    """A run compiles the backbone for OpenVINO when the cache lacks a feature: a rerun on a warm cache never does
    (same features, same head). Should OpenVINO refuse the net then, the run starts its passes again with torch
    (whose features are cached under their own name) and says so; `--extractor openvino` is refused by name."""
    from headstart import extractor
    from headstart.service.runtime import openvino_available

    if not openvino_available():
        pytest.skip("openvino is not installed")
    compiled = []
    real = extractor._openvino_fns
    monkeypatch.setattr(extractor, "_openvino_fns", lambda *a, **k: compiled.append(1) or real(*a, **k))
    first = train(tiny_config(tiny_folder, tmp_path / "first", cache_dir))
    files = len(list(cache_dir.rglob("*.npy")))
    assert len(compiled) == 1 and files > 0
    warm = train(tiny_config(tiny_folder, tmp_path / "warm", cache_dir))
    assert len(compiled) == 1 and len(list(cache_dir.rglob("*.npy"))) == files  # nothing compiled, nothing new
    for run_dir in (first, warm):
        assert json.loads((run_dir / "metrics.json").read_text())["training"]["extractor"] == "openvino"
    for key, value in head_tensors(first).items():
        assert torch.equal(value, head_tensors(warm)[key])

    def refuse(*args, **kwargs):
        raise RuntimeError("unsupported operation")

    monkeypatch.setattr(extractor, "_openvino_fns", refuse)
    with caplog.at_level(logging.WARNING):
        fallback = train(tiny_config(tiny_folder, tmp_path / "fallback", cache_dir, views=2))  # a feature missing
    assert "OpenVINO cannot compute this backbone's features (unsupported operation); torch computes them" in (
        caplog.text
    )
    metrics = json.loads((fallback / "metrics.json").read_text())
    assert metrics["training"]["extractor"] == "torch" and metrics["accuracy"] >= 0.75
    files = len(list(cache_dir.rglob("*.npy")))
    torch_run = train(tiny_config(tiny_folder, tmp_path / "torch", cache_dir, views=2, extractor="torch"))
    assert len(list(cache_dir.rglob("*.npy"))) == files  # the fallback's features are torch's, cached as such
    for key, value in head_tensors(fallback).items():
        assert torch.equal(value, head_tensors(torch_run)[key])
    with pytest.raises(ValueError, match="OpenVINO cannot compute this backbone's features .*--extractor torch"):
        train(tiny_config(tiny_folder, tmp_path / "named", cache_dir, views=4, extractor="openvino"))


@pytest.mark.parametrize(
    ("option", "value", "words"),
    [
        ("lr", -1.0, "--lr must be a finite number above 0, got -1.0"),
        ("lr", 0.0, "--lr must be a finite number above 0"),
        ("lr", float("nan"), "--lr must be a finite number above 0, got nan"),
        ("lr", float("inf"), "--lr must be a finite number above 0, got inf"),
        ("weight_decay", -1e-4, "--weight-decay must be a finite number at least 0"),
        ("dropout", 1.0, "--dropout must be a finite number at least 0 and below 1, got 1.0"),
        ("label_smoothing", 1.5, "--label-smoothing must be a finite number at least 0 and below 1"),
        ("finetune_lr", 0.0, "--finetune-lr must be a finite number above 0"),
        ("seed", -5, "--seed must be 0 or more, got -5"),  # numpy's "expected non-negative integer" in the split
    ],
)
def test_a_number_out_of_range_is_refused_before_any_work(tiny_folder, tmp_path, cache_dir, option, value, words):
    """torch refused these only when it built the head or its optimizer, after the data check and the backbone,
    and the run directory it left was in the way of the corrected command ("already exists")."""
    with pytest.raises(ValueError, match=re.escape(words)):
        train(tiny_config(tiny_folder, tmp_path / "run", cache_dir, **{option: value}))
    assert not (tmp_path / "run").exists()


def test_a_detectors_loss_weights_are_checked_before_any_work():
    from headstart.tasks import DetectConfig

    for option in ("lambda_coord", "lambda_noobj"):
        with pytest.raises(ValueError, match=f"--{option.replace('_', '-')} must be a finite number at least 0"):
            DetectConfig(data_dir="data.yaml", out="run", **{option: -1.0}).validate()
        DetectConfig(data_dir="data.yaml", out="run", **{option: 0.0}).validate()


def test_a_classifier_trains_on_an_image_label_csv_as_on_its_folders(tiny_folder, tmp_path, cache_dir, capsys):
    """The same images with the same split, as class folders and as an image,label CSV: the same classifier. The
    command line takes the CSV as a classifier's data, evaluates on it, and exports it moved (`--data`)."""
    images = sorted(tiny_folder.rglob("*.jpg"))
    rows = [f"{p.relative_to(tiny_folder)},{p.parent.name},{p.parent.parent.name}" for p in images]
    (tiny_folder / "train.csv").write_text("image,label,split\n" + "\n".join(rows) + "\n")
    by_folders = train(tiny_config(tiny_folder, tmp_path / "folders", cache_dir))
    by_csv = train(tiny_config(tiny_folder / "train.csv", tmp_path / "csv", cache_dir))
    assert json.loads((by_csv / "splits.json").read_text()) == json.loads((by_folders / "splits.json").read_text())
    for name, tensor in head_tensors(by_folders).items():
        assert torch.equal(tensor, head_tensors(by_csv)[name]), name
    argv = ["train", str(tiny_folder / "train.csv"), "--out", str(tmp_path / "cli"), "--backbone", "test_resnet"]
    assert main([*argv, "--no-pretrained", "--epochs", "2", "--views", "1", "--cache-dir", str(cache_dir)]) == 0
    assert runs.read_record(tmp_path / "cli").task == "classify"
    assert main(["evaluate", str(by_csv), str(tiny_folder / "train.csv"), "--out", str(tmp_path / "ev")]) == 0
    assert "num_images 32" in capsys.readouterr().out  # every row: train and val
    moved = tmp_path / "moved"
    tiny_folder.rename(moved)
    argv = ["export", str(by_csv), "--out", str(tmp_path / "b"), "--no-store"]
    assert main([*argv, "--data", str(moved / "train.csv")]) == 0
