"""The package installs whole (pyproject.toml): a wheel built from the checkout, installed without ``-e`` in a fresh
virtual environment, trains and exports from outside the checkout, from the command line and from Python, in a
project folder holding its own ``models/``, ``service/`` and ``training.py`` (usual in ML repositories: ours are
``headstart.models``, ``headstart.service`` and ``headstart`` itself, so theirs cannot stand in). CI installs with
``-e``, which hides a package or a data file the wheel leaves out."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from tests.conftest import ROOT, make_image_folder


def run(cmd: list, cwd: Path, env: dict, timeout: float = 600) -> str:
    out = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(map(str, cmd))} failed:\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"
    return out.stdout


@pytest.mark.slow
def test_a_built_wheel_installs_whole_and_trains_and_exports_outside_the_checkout(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    source = tmp_path / "source"  # setuptools builds in the source tree: a copy keeps the checkout clean
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, source)
    for name in ("service", "training", "models"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            tmp_path / "dist",
            source,
        ],
        tmp_path,
        env,
    )
    (wheel,) = (tmp_path / "dist").glob("headstart-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    installed_as = {"training": "headstart", "service": "headstart/service", "models": "headstart/models"}
    sources = {
        f"{installed_as[top]}/{p.relative_to(ROOT / top)}"
        for top in installed_as
        for p in (ROOT / top).rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert sources <= names, f"the wheel leaves out {sorted(sources - names)}"
    assert not [n for n in names if n.split("/")[0] in installed_as], "the folder names must not be installed"

    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", venv], tmp_path, env)
    python, headstart = venv / "bin" / "python", venv / "bin" / "headstart"
    run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel], tmp_path, env)
    site = Path(run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp_path, env).strip())
    # the dependencies (torch, onnxruntime, ...) from the test environment: a .pth line adds its folder to sys.path,
    # after the fresh environment's own, and runs none of the hooks in it (the editable install's among them)
    (site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")

    elsewhere = tmp_path / "elsewhere"  # a user's project, with the names ML repositories often have
    for package in ("models", "service"):
        (elsewhere / package).mkdir(parents=True)
        (elsewhere / package / "__init__.py").write_text(f"raise ImportError('the user\\'s own {package}/')\n")
    (elsewhere / "training.py").write_text('raise ImportError("the user\'s own training.py")\n')
    where = run(
        [
            python,
            "-c",
            "import headstart, headstart.tasks, headstart.service.guard, headstart.models, headstart.cli, sys\n"
            "print(headstart.__file__)\n"
            "assert not {'service', 'training', 'models'} & set(sys.modules), sorted(sys.modules)",
        ],
        elsewhere,
        env,
    )
    assert Path(where.strip()).is_relative_to(site), f"headstart was imported from {where.strip()}, not the wheel"
    assert "train" in run([headstart, "--help"], elsewhere, env)
    data = make_image_folder(elsewhere / "data", {"red": 6, "blue": 6}, splits={"train": 0.5, "val": 0.5})
    run(
        [
            headstart,
            "train",
            data,
            "--out",
            elsewhere / "run",
            "--backbone",
            "test_resnet",
            "--no-pretrained",
            "--views",
            "1",
            "--epochs",
            "2",
            "--no-progress",
            "--cache-dir",
            elsewhere / "cache",
        ],
        elsewhere,
        env,
    )
    out = run([headstart, "export", elsewhere / "run", "--out", elsewhere / "bundle", "--no-store"], elsewhere, env)
    assert (elsewhere / "bundle" / "manifest.json").is_file(), out
    # the Python API, from the user's folder (on sys.path first, beside their own models/ and service/)
    image = next((data / "val" / "red").glob("*.jpg"))
    code = f"import headstart\nprint(headstart.load('bundle').predict({str(image)!r})[0].predictions[0].label)"
    assert run([python, "-c", code], elsewhere, env).strip() in ("red", "blue")
    kubernetes = site / "headstart" / "service" / "kubernetes" / "headstart.yaml"
    assert kubernetes.is_file(), "the Kubernetes manifests are not installed"


def _requirement_name(requirement: str) -> str:
    """ "torch==2.14.1" → "torch", "ray[data]==2.60.0" → "ray" (as pip compares names: lower case, - for _)."""
    name = re.split(r"[\[<>=!~;\s]", requirement, maxsplit=1)[0]
    return name.lower().replace("_", "-")


def test_every_library_of_an_extra_is_known_to_the_missing_extra_message():
    tomllib = pytest.importorskip("tomllib")
    from headstart.extras import EXTRAS, USES

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for extra, requirements in extras.items():
        if extra in ("dev", "all"):  # the tests' tools; every other extra
            continue
        assert extra in EXTRAS and extra in USES, f"extras.py does not know the {extra!r} extra"
        listed = {_requirement_name(d) for d in EXTRAS[extra]}
        assert listed == {_requirement_name(r) for r in requirements}, extra
    assert set(EXTRAS) <= set(extras)
    for modules in EXTRAS.values():  # the development environment has every extra: each module name is right
        for module in modules.values():
            assert importlib.util.find_spec(module) is not None, module


MISSING = [
    ("torch", ["train", "{data}", "--out", "{tmp}/run"], "train"),
    ("torch", ["export", "{run}", "--out", "{tmp}/bundle"], "train"),
    ("torch", ["predict", "{run}", "{image}"], "train"),
    ("torch", ["evaluate", "{tmp}/some-bundle", "{data}", "--out", "{tmp}/eval"], "train"),
    ("bentoml", ["serve", "{tmp}/some-bundle"], "serve"),
    ("bentoml", ["export", "{run}", "--out", "{tmp}/bundle"], "serve"),  # the model store: before the work
    ("ray", ["predict-batch", "{tmp}/some-bundle", "{data}", "--out", "{tmp}/out"], "scale"),
]


@pytest.mark.parametrize(("module", "argv", "extra"), MISSING, ids=[f"{a[0]}-without-{m}" for m, a, _ in MISSING])
def test_a_command_whose_extra_is_missing_says_which_extra_to_install(tmp_path, module, argv, extra):
    """`pip install headstart` installs the serving code alone: `headstart train` there ended in a traceback ending
    "No module named 'torch'", `headstart serve` printed "serving ..." before its child failed on bentoml."""
    data = make_image_folder(tmp_path / "data", {"red": 2, "blue": 2})
    run_dir = tmp_path / "a-run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("task: classify\n")  # a run directory to the verbs: its PyTorch model
    image = next(data.rglob("*.jpg"))
    args = [a.format(data=data, tmp=tmp_path, run=run_dir, image=image) for a in argv]
    code = (  # the library as if not installed: `import torch` raises ModuleNotFoundError
        f"import sys\nsys.modules[{module!r}] = None\nfrom headstart.cli import main\nsys.exit(main({args!r}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr and "http://" not in out.stderr, out.stderr  # no "serving ... on http://"
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"headstart {argv[0]}: error: {module} is not installed in this Python"), line
    assert f'pip install "headstart[{extra}]"' in line and f'pip install -e ".[{extra}]"' in line, line
    assert ("--no-store" in line) == (argv[0] == "export" and module == "bentoml"), line


def test_the_python_api_says_which_extra_is_missing_too(tmp_path):
    data = make_image_folder(tmp_path / "data", {"red": 2, "blue": 2})
    code = (
        "import sys\nsys.modules['torch'] = None\nimport headstart\nfrom headstart.extras import MissingExtra\n"
        f"try:\n    headstart.train({str(data)!r}, out={str(tmp_path / 'run')!r})\n"
        "except MissingExtra as exc:\n    assert isinstance(exc, ModuleNotFoundError) and exc.name == 'torch'\n"
        "    print(exc)\nelse:\n    raise SystemExit('trained without torch')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("torch is not installed") and 'pip install "headstart[train]"' in out.stdout


def test_a_broken_install_or_another_module_is_not_called_a_missing_extra():
    from headstart.extras import missing_extra

    # torch is installed here: a part of it missing is a broken install, whose own error says more
    assert missing_extra(ModuleNotFoundError("No module named 'torch._C'", name="torch._C")) is None
    assert missing_extra(ModuleNotFoundError("No module named 'my_models'", name="my_models")) is None
    assert missing_extra(ModuleNotFoundError("no name")) is None


def test_compare_needs_no_torch(tiny_run, tmp_path):
    """`headstart compare` reads two folders of YAML and JSON: on a serving-only install it said to install the
    train extra (each task's headline metrics were read from its torch-importing task module)."""
    import json
    import shutil

    from headstart.compare import compare_runs

    shutil.copytree(tiny_run, tmp_path / "a")
    shutil.copytree(tiny_run, tmp_path / "b")
    config = (tmp_path / "b" / "config.yaml").read_text()
    (tmp_path / "b" / "config.yaml").write_text(config.replace("seed: 0", "seed: 1"))
    expected = compare_runs([tmp_path / "a", tmp_path / "b"])
    assert expected["options"] == {"seed": [0, 1]} and "accuracy" in expected["metrics"]
    code = (
        "import sys\nsys.modules['torch'] = None\nfrom headstart.cli import main\n"
        f"sys.exit(main(['compare', {str(tmp_path / 'a')!r}, {str(tmp_path / 'b')!r}, '--json']))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout) == json.loads(json.dumps(expected, default=str))
