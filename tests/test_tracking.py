"""Experiment tracking (`--log tensorboard,mlflow`): what a run logs, read back with TensorBoard's and MLflow's own
readers; `headstart compare`."""

from __future__ import annotations

import json

import pytest

from .conftest import make_image_folder


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    """A small run logged to TensorBoard and to a local MLflow store, then exported."""
    import os

    from headstart.exporter import export_bundle
    from headstart.tasks import ClassifyConfig, train

    tmp = tmp_path_factory.mktemp("tracked")
    data = make_image_folder(tmp / "data", {"red": 12, "blue": 12}, splits={"train": 0.75, "val": 0.25})
    env = {"MLFLOW_TRACKING_URI": f"sqlite:///{tmp / 'mlflow.db'}", "MLFLOW_EXPERIMENT_NAME": "headstart-test"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = ClassifyConfig(
            data_dir=str(data),
            out=str(tmp / "run"),
            backbone="test_resnet",
            pretrained=False,
            views=1,
            epochs=4,
            patience=10,
            batch_size=8,
            cache_dir=str(tmp / "cache"),
            progress=False,
            log="tensorboard,mlflow",
        )
        run = train(cfg)
        export_bundle(run, tmp / "bundle", store=False)
    finally:
        for k, v in saved.items():
            os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
    return run, env["MLFLOW_TRACKING_URI"]


def test_tensorboard_holds_every_epoch_the_final_metrics_the_plots_and_the_options(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = tracked_run
    history = json.loads((run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    val_loss = events.Scalars("val_loss")
    assert [e.step for e in val_loss] == [h["epoch"] for h in history]
    assert [round(e.value, 5) for e in val_loss] == [round(h["val_loss"], 5) for h in history]
    assert events.Scalars("final/accuracy")[-1].value == pytest.approx(metrics["accuracy"])
    assert {"confusion_matrix", "training_curves"} <= set(tags["images"])
    assert any("options" in t for t in tags["tensors"])


def test_mlflow_holds_the_options_the_history_the_metrics_the_artifacts_and_the_bundle(tracked_run):
    from mlflow.tracking import MlflowClient

    run, uri = tracked_run
    client = MlflowClient(uri)
    record = json.loads((run / "mlflow.json").read_text())
    mlrun = client.get_run(record["run_id"])
    history = json.loads((run / "history.json").read_text())
    metrics = json.loads((run / "metrics.json").read_text())
    assert mlrun.data.params["backbone"] == "test_resnet" and mlrun.data.params["epochs"] == "4"
    assert mlrun.data.tags["headstart.run_dir"] == str(run.resolve())
    steps = client.get_metric_history(record["run_id"], "val_accuracy")
    assert [m.step for m in steps] == [h["epoch"] for h in history]
    assert mlrun.data.metrics["final.accuracy"] == pytest.approx(metrics["accuracy"])
    artifacts = {a.path for a in client.list_artifacts(record["run_id"])}
    assert {"metrics.json", "confusion_matrix.png", "training_curves.png", "bundle"} <= artifacts
    bundle = {a.path for a in client.list_artifacts(record["run_id"], "bundle")}
    assert {"bundle/manifest.json", "bundle/model.onnx"} <= bundle
    # a local store keeps its artifacts beside its database, never in the working directory
    beside = run.parent / "mlartifacts"
    assert mlrun.info.artifact_uri.startswith(str(beside)) or mlrun.info.artifact_uri.startswith(f"file://{beside}")
    assert beside.is_dir()


def test_an_unknown_or_missing_tracker_is_refused_before_any_work(tmp_path, monkeypatch):
    import builtins

    from headstart.tracking import parse

    with pytest.raises(ValueError, match="use tensorboard, mlflow"):
        parse("wandb")
    real_import = builtins.__import__

    def no_mlflow(name, *args, **kwargs):
        if name == "mlflow":
            raise ImportError("No module named 'mlflow'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_mlflow)
    with pytest.raises(ValueError, match="pip install mlflow-skinny"):
        parse("tensorboard, mlflow")
    monkeypatch.setenv("HEADSTART_LOG", "tensorboard")
    monkeypatch.setattr(builtins, "__import__", real_import)
    assert parse("") == ["tensorboard"]


def test_compare_prints_the_options_that_differ_and_the_headline_metrics(tracked_run, tiny_run, capsys):
    from headstart.cli import main

    run, _ = tracked_run
    assert main(["compare", str(tiny_run), str(run)]) == 0
    table = capsys.readouterr().out.splitlines()
    labels = [line.split()[0] for line in table[1:]]
    assert "--epochs" in labels and "--views" in labels and "accuracy" in labels and "seconds" in labels
    assert "--backbone" not in labels and "--out" not in labels  # the same, or not about what was learned
    assert main(["compare", str(tiny_run), str(run), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["options"]["epochs"] == [20, 4]
    assert len(result["metrics"]["accuracy"]) == 2
    assert main(["compare", str(run)]) == 2
