"""The house rules that keep the code easy to change, checked on the source (fast, no training).

- the floors are one-way: ``service/`` (torch-free) ← ``models/`` ← ``training/``;
- no circle of imports and no private name crossing files;
- one table of endpoints: the service's routes, the request guard and the README agree;
- one config: `headstart train`'s options are the task configs' fields, refused for the other task with a message;
- one contract: run records and manifests of another schema version are refused with a message naming it.
"""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("service", "models", "training")


def module_name(path: Path) -> str:
    """A source file's module, named by its folder (``training/cli.py``: training.cli; installed as headstart.cli)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def folder_module(installed: str) -> str:
    """The folder name of an installed module: headstart.service.* is service.*, headstart.models.* models.*, and
    the rest of headstart is training/ (pyproject.toml's package-dir)."""
    for package in ("service", "models"):
        if installed == f"headstart.{package}" or installed.startswith(f"headstart.{package}."):
            return installed.removeprefix("headstart.")
    if installed == "headstart" or installed.startswith("headstart."):
        return "training" + installed.removeprefix("headstart")
    return installed


def project_imports(top_level_only: bool, raw: bool = False) -> dict[str, list[tuple[str, list[str]]]]:
    """Per project module: (imported module, imported names) of each import statement, modules named by folder
    (relative imports resolved); ``raw``: the names as written, relative ones with their leading dots."""
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            module = module_name(path)
            own_package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
            tree = ast.parse(path.read_text())
            typing_only = {  # `if TYPE_CHECKING:` imports are for type checkers: they never run
                id(n)
                for block in ast.walk(tree)
                if isinstance(block, ast.If) and getattr(block.test, "id", None) == "TYPE_CHECKING"
                for n in ast.walk(block)
            }
            nodes = [n for n in (tree.body if top_level_only else ast.walk(tree)) if id(n) not in typing_only]
            found = []
            for node in nodes:
                if isinstance(node, ast.ImportFrom):
                    if raw:
                        found.append(("." * node.level + (node.module or ""), [a.name for a in node.names]))
                    elif node.level:
                        base = own_package[: len(own_package) - node.level + 1]
                        found.append(
                            (".".join([*base, *([node.module] if node.module else [])]), [a.name for a in node.names])
                        )
                    else:
                        found.append((folder_module(node.module), [a.name for a in node.names]))
                elif isinstance(node, ast.Import):
                    found += [(a.name if raw else folder_module(a.name), []) for a in node.names]
            out[module] = found
    return out


def test_imports_name_the_installed_package():
    """The project installs as one package, ``headstart`` (so a user's own ``models/``, ``service/`` or
    ``training.py`` cannot stand in for ours): training/ and models/ import ``headstart...``, never the folder
    names; service/ imports itself relatively, so the bento runs the same files as the top-level ``service``."""
    for module, imports in project_imports(top_level_only=False, raw=True).items():
        for target, _ in imports:
            top = target.split(".")[0]
            assert top not in PACKAGES, f"{module} imports {target}: import headstart.{target} (or relatively)"
            if module.startswith("service"):
                assert not target.startswith("headstart"), (
                    f"{module} imports {target}: service/ imports itself relatively"
                )


def test_the_floors_are_one_way():
    allowed = {"service": {"service"}, "models": {"service", "models"}, "training": set(PACKAGES)}
    forbidden_libs = {"service": {"torch", "torchvision", "timm"}}
    for module, imports in project_imports(top_level_only=False).items():
        floor = module.split(".")[0]
        for target, _ in imports:
            top = target.split(".")[0]
            if top in PACKAGES:
                assert top in allowed[floor], f"{module} imports {target}: {floor}/ must not depend on {top}/"
            assert top not in forbidden_libs.get(floor, ()), f"{module} imports {top}; service/ is torch-free"


def test_only_a_task_knows_its_folder():
    """training/ outside training/tasks/NAME/ knows no task: it asks the registry (training/tasks/__init__.py, which
    alone names each task's config) and the base classes (training.tasks.base); and no task imports another's
    folder. A new task touches nothing else."""
    tasks = {p.name for p in (ROOT / "training" / "tasks").iterdir() if p.is_dir() and p.name != "__pycache__"}
    for module, imports in project_imports(top_level_only=False).items():
        parts = module.split(".")
        own = parts[2] if parts[:2] == ["training", "tasks"] and len(parts) > 2 and parts[2] in tasks else None
        for target, _ in imports:
            t = target.split(".")
            if module != "training.tasks" and t[:2] == ["training", "tasks"] and len(t) > 2 and t[2] in tasks:
                assert t[2] == own, f"{module} imports {target}: only training/tasks/{t[2]}/ may (use the registry)"


def test_no_private_name_crosses_files():
    for module, imports in project_imports(top_level_only=False).items():
        for target, names in imports:
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            assert not private, f"{module} imports private {private} from {target}: make it public or move it"


def test_no_circle_of_imports():
    imports = project_imports(top_level_only=False)  # imports inside functions count too
    graph = {m: set() for m in imports}
    for module, imps in imports.items():
        for target, names in imps:  # `from training import runs` imports the module training.runs
            graph[module] |= {t for t in (target, *(f"{target}.{n}" for n in names)) if t in imports and t != module}
    for start in graph:  # depth-first search for a path back to ``start``
        stack, seen = [(start, [start])], set()
        while stack:
            node, path = stack.pop()
            for nxt in graph.get(node, ()):
                assert nxt != start, f"import circle: {' -> '.join([*path, nxt])}"
                if nxt not in seen:
                    seen.add(nxt)
                    stack.append((nxt, [*path, nxt]))


def test_readme_endpoint_table_matches_the_guard_and_the_service():
    """The README's endpoint table names each route of ENDPOINTS (which the service's signatures are checked
    against in test_service.py) with exactly its fields."""
    from headstart.service.guard import ENDPOINTS

    readme = (ROOT / "README.md").read_text()
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^\| `POST (/\w+)` \| ([^|]*) \|", readme, re.M)}
    assert set(rows) == set(ENDPOINTS), "README endpoint table and service.guard.ENDPOINTS name other routes"
    for route, endpoint in ENDPOINTS.items():
        if rows[route].startswith("as `"):  # "as `/localize`": the same fields as that route
            rows[route] = rows[rows[route][4:].split("`")[0]]
        named = set(re.findall(r"`(\w+)` \(", rows[route]))
        assert named == {*endpoint.files, *endpoint.fields}, f"README row of {route} names {sorted(named)}"


def test_the_service_settings_are_read_in_one_place_and_the_readme_lists_them():
    """Every HEADSTART_* variable of the service is a field of service/settings.py (nothing else reads one), and the
    README's table of settings is that list, with its defaults."""
    from headstart.service.settings import Settings

    for path in sorted((ROOT / "service").glob("*.py")):
        if path.name != "settings.py":
            assert 'os.environ.get("HEADSTART_' not in path.read_text(), f"{path.name} reads a HEADSTART_ variable"
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `(HEADSTART_[A-Z_]+)` \| `([^`]*)` \| ([^|]*) \|$", readme, re.M)
    assert rows == [(v, d, h) for v, d, h in Settings.describe()], "README settings table != service/settings.py"


def test_train_options_are_the_task_configs_fields():
    from headstart.cli import build_parser
    from headstart.config import cli_fields
    from headstart.tasks import CONFIGS

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.items() if a[0] == "train")[1]
    # json: how the result is shown; task: which task, where the data alone cannot say
    dests = {a.dest for a in train._actions} - {"help", "data_dir", "out", "json", "task"}
    assert dests == {k for config in CONFIGS.values() for k in cli_fields(config)}
    # nothing given: the task's own defaults apply (no argparse default leaks into the config)
    args = parser.parse_args(["train", "data", "--out", "run"])
    assert set(vars(args)) == {"command", "verbose", "data_dir", "out", "json", "task"}


@pytest.mark.parametrize(
    ("option", "task"),
    [
        ("--input-size", "classify"),
        ("--unfreeze", "detect"),
        ("--label-smoothing", "detect"),
        ("--eval-every", "classify"),
    ],
)
def test_an_option_of_the_other_task_is_refused_with_a_message(option, task, tiny_folder, tmp_path, capsys):
    from headstart.cli import main

    data = tiny_folder
    if task == "detect":  # the task is chosen by the data set: a data.yaml makes it detection
        data = tmp_path / "yolo"
        data.mkdir()
        (data / "data.yaml").write_text("train: images\nnames: [cat]\n")
    assert main(["train", str(data), "--out", str(tmp_path / "run"), option, "1"]) == 2
    err = capsys.readouterr().err
    assert f"{option} does not apply to {data}" in err
    assert not (tmp_path / "run").exists()


def test_run_record_and_manifest_of_another_schema_version_are_refused(tiny_run, tiny_bundle, tmp_path):
    import shutil

    import yaml

    from headstart.loaded_run import load_run
    from headstart.runs import RunError
    from headstart.service.bundle import BundleError, load_bundle

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    record = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**record, "headstart_run": 7}))
    with pytest.raises(RunError, match=r"schema version 7; this headstart reads version 1"):
        load_run(run)
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.bundle_dir, bundle)
    manifest = json.loads((bundle / "manifest.json").read_text())
    (bundle / "manifest.json").write_text(json.dumps({**manifest, "schema_version": 2}))
    with pytest.raises(BundleError, match=r"schema version 2; this headstart reads version 1\. Re-export"):
        load_bundle(bundle)


def test_records_round_trip_through_the_contract(tiny_run, tiny_bundle):
    import yaml

    from headstart.service.contract import Manifest, RunRecord

    data = yaml.safe_load((tiny_run / "config.yaml").read_text())
    assert RunRecord.from_dict(data).to_dict() == data
    manifest = json.loads((tiny_bundle.bundle_dir / "manifest.json").read_text())
    assert Manifest.from_dict(manifest).to_dict() == manifest
    assert tiny_bundle.manifest.to_dict() == manifest


def test_a_bundle_and_a_run_are_both_models(tiny_run, tiny_bundle):
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.bundle import load_bundle
    from headstart.service.contract import Model

    bundle, run = load_bundle(tiny_bundle.bundle_dir), RunModel(load_run(tiny_run))
    for model in (bundle, run):
        assert isinstance(model, Model)
    assert (bundle.task, bundle.labels, bundle.spec, bundle.feature_map) == (
        run.task,
        run.labels,
        run.spec,
        run.feature_map,
    )


def test_a_runs_model_computes_cpu_batch_pixels_at_a_time(tiny_run, monkeypatch):
    """`predict RUN_DIR` runs the PyTorch model `CPU_BATCH_PIXELS` at a time (8 images of 224 px, 1 of a detector's
    512) in even parts, as a bundle's session does, each output the parts' in order."""
    import numpy as np

    import headstart.predict as predict
    from headstart.loaded_run import load_run

    model = predict.RunModel(load_run(tiny_run))
    size = model.spec.input_size
    pixels = np.random.default_rng(0).random((5, 3, size, size), dtype=np.float32) * 255
    whole = model.run(pixels)
    seen, forward = [], model.model.forward
    monkeypatch.setattr(model.model, "forward", lambda x: seen.append(len(x)) or forward(x))
    monkeypatch.setattr(predict, "CPU_BATCH_PIXELS", 2 * size * size)
    parts = model.run(pixels)
    assert seen == [2, 2, 1]
    seen.clear()
    monkeypatch.setattr(predict, "CPU_BATCH_PIXELS", 4 * size * size)
    assert [o.shape for o in model.run(pixels, model.output_names[:1])] == [parts[0].shape]
    assert seen == [3, 2]  # even parts: not 4 and 1
    for a, b in zip(parts, whole, strict=True):
        assert a.shape == b.shape and np.allclose(a, b, rtol=1e-4, atol=1e-5)


def test_help_and_the_train_command_line_import_no_torch():
    code = (
        "import sys\nfrom headstart.cli import build_parser\nbuild_parser().parse_args(['train', 'd', '--out', "
        "'r', '--epochs', '3'])\nassert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_loading_a_run_and_exporting_it_need_no_augmentation_or_plotting_library():
    """albumentations, OpenCV and matplotlib are for training: `predict RUN_DIR` and export load neither."""
    code = (
        "import sys\nfrom headstart.loaded_run import load_run\nfrom headstart.tasks import CONFIGS, task_named\n"
        "import headstart.exporter\nfor name in CONFIGS: task_named(name)\n"
        "loaded = [m for m in ('albumentations', 'cv2', 'matplotlib') if m in sys.modules]\n"
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_a_run_and_a_bundle_manifest_written_before_the_engine_still_load():
    """tests/reference/ holds a run directory and a bundle manifest written by b8f400a, the last commit with two
    trainers and untyped records: both read through the contract unchanged."""
    from headstart.loaded_run import load_run
    from headstart.predict import RunModel
    from headstart.service.contract import Manifest
    from headstart.service.preprocess import decode_image, preprocess
    from tests.conftest import MOBILENET, PHOTOS, require_shared

    require_shared()
    reference = ROOT / "tests" / "reference"
    run = load_run(reference / "run-b8f400a", weights=MOBILENET)  # its weights path was on another machine
    assert run.task == "classify" and run.labels == ["blue", "red"] and run.record.options["epochs"] == 5
    model = RunModel(run)
    probs = model.predict(preprocess(decode_image(next(PHOTOS.glob("*.jpg"))), model.spec)[None])
    assert probs.shape == (1, 2) and abs(float(probs.sum()) - 1) < 1e-5
    manifest = json.loads((reference / "manifest-b8f400a.json").read_text())
    assert Manifest.from_dict(manifest).to_dict() == manifest
