from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from headstart.service import devserver

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HEADSTART_SHARED", ROOT.parent / "shared"))
HYMENOPTERA = SHARED / "data" / "hymenoptera"
COCO128 = SHARED / "data" / "coco128"
MOBILENET = SHARED / "weights" / "mobilenet_v2_imagenet.pth"
PHOTOS = SHARED / "photos"

# A tiny timm test model with random weights: fast enough for many small end-to-end runs.
TINY_BACKBONE = ["--backbone", "test_resnet", "--no-pretrained"]

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never wait on the network in tests
# a private BentoML model store for the test session (set before bentoml is first imported)
os.environ["BENTOML_HOME"] = tempfile.mkdtemp(prefix="headstart-tests-bentoml-")
# removed when the session ends: a suite run must not leave its model store behind (CI disks are small)
atexit.register(shutil.rmtree, os.environ["BENTOML_HOME"], ignore_errors=True)


def require_shared() -> None:
    if not MOBILENET.exists() or not HYMENOPTERA.exists():
        pytest.fail(f"shared assets not found at {SHARED}; clone with ../shared beside the repository")


def synthetic_image(label: int, rng: np.random.Generator, size: int = 96) -> Image.Image:
    """Class 0: a red square, class 1: a blue disc, class 2: a green bar, on noisy grey, at random places."""
    img = rng.integers(90, 160, size=(size, size, 3), dtype=np.uint8)
    s = size // 3
    x, y = rng.integers(0, size - s, size=2)
    if label == 0:
        img[y : y + s, x : x + s] = (220, 30, 30)
    elif label == 1:
        yy, xx = np.mgrid[:size, :size]
        img[(yy - y - s // 2) ** 2 + (xx - x - s // 2) ** 2 < (s // 2) ** 2] = (30, 30, 220)
    else:
        img[y : y + s // 3, :] = (30, 200, 30)
    return Image.fromarray(img)


def counting_calls(monkeypatch, **targets: tuple) -> dict[str, int]:
    """How often each of ``targets`` (a name: (module, function name)) is called from now on, by name."""
    calls = dict.fromkeys(targets, 0)
    for key, (module, name) in targets.items():
        real = getattr(module, name)

        def counted(*args, _real=real, _key=key, **kwargs):
            calls[_key] += 1
            return _real(*args, **kwargs)

        monkeypatch.setattr(module, name, counted)
    return calls


def make_image_folder(
    root: Path, per_class: dict[str, int], seed: int = 0, splits: dict[str, float] | None = None
) -> Path:
    """Class-per-subfolder JPEGs; with ``splits`` (e.g. {"train": .7, "val": .3}) inside split folders."""
    rng = np.random.default_rng(seed)
    for label, (name, count) in enumerate(per_class.items()):
        for i in range(count):
            if splits:
                split = "train" if i < round(count * splits["train"]) else "val"
                folder = root / split / name
            else:
                folder = root / name
            folder.mkdir(parents=True, exist_ok=True)
            synthetic_image(label, rng).save(folder / f"{name}_{i:03d}.jpg", quality=92)
    return root


def coco128_report(first: int, last: int):
    """coco128 with a fixed split: the first ``first`` images (by name) to train on, the last ``last`` to validate."""
    from headstart.tasks.detect.data import scan_yolo_dataset

    report = scan_yolo_dataset(COCO128, val_fraction=0.2)
    samples = sorted((s for v in report.splits.values() for s in v), key=lambda s: s.path.name)
    report.splits = {"train": samples[:first], "val": samples[-last:]}
    report.split_source = f"first {first} / last {last}"
    return report


@pytest.fixture
def image_server():
    """An HTTP server on 127.0.0.1 serving the hymenoptera photos under /photos/, and what the web does besides:
    /moved (a redirect), /page (an HTML page), /huge (a Content-Length over any limit), /endless (a body without a
    length that does not end), /slow (a byte a second), /later/photos/... (a photo after 1 s). Yields its base
    URL, whose ``most_at_once`` says how many requests it has answered at the same time at most."""
    import http.server
    import threading
    import time

    class Base(str):
        most_at_once = 0

    lock, now = threading.Lock(), [0]

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(HYMENOPTERA), **kwargs)

        def log_message(self, *args):  # quiet
            pass

        def do_GET(self):
            with lock:
                now[0] += 1
                base.most_at_once = max(base.most_at_once, now[0])
            try:
                self.answer()
            finally:
                with lock:
                    now[0] -= 1

        def answer(self):
            if self.path.startswith("/later/"):
                time.sleep(1.0)
                self.path = self.path[len("/later") :]
            if self.path.startswith("/photos/"):
                self.path = self.path[len("/photos") :]
                return super().do_GET()
            if self.path == "/moved":
                self.send_response(302)
                bee = sorted((HYMENOPTERA / "val" / "bees").iterdir())[0]
                self.send_header("Location", f"/photos/val/bees/{bee.name}")
                self.end_headers()
                return
            body = {"/page": b"<html><body>a page</body></html>"}.get(self.path)
            self.send_response(200 if self.path in ("/page", "/huge", "/endless", "/slow") else 404)
            self.send_header("Content-Type", "text/html" if body else "image/jpeg")
            if self.path == "/huge":
                self.send_header("Content-Length", str(1 << 40))
            self.end_headers()
            with contextlib.suppress(OSError):  # the client hangs up
                if body:
                    self.wfile.write(body)
                elif self.path == "/huge":
                    self.wfile.write(b"\xff" * 1000)
                elif self.path == "/endless":
                    for _ in range(64):
                        self.wfile.write(b"\xff" * (1 << 20))
                elif self.path == "/slow":
                    for _ in range(30):
                        self.wfile.write(b"\xff")
                        self.wfile.flush()
                        time.sleep(1)

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    base = Base(f"http://127.0.0.1:{server.server_address[1]}")
    yield base
    server.shutdown()
    server.server_close()


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / "data", {"red": 16, "blue": 16}, splits={"train": 0.75, "val": 0.25})


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture(scope="session")
def hymenoptera_run(tmp_path_factory) -> Path:
    """The real end-to-end run: hymenoptera + the shared ImageNet MobileNetV2, default recipe (about 30 s)."""
    require_shared()
    from headstart.tasks import ClassifyConfig, train

    tmp = tmp_path_factory.mktemp("hymenoptera")
    cfg = ClassifyConfig(
        data_dir=str(HYMENOPTERA),
        out=str(tmp / "run"),
        backbone="torchvision:mobilenet_v2",
        weights=str(MOBILENET),
        cache_dir=str(tmp / "cache"),
        progress=False,
    )
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> Path:
    """A small trained run on synthetic images with the tiny random backbone."""
    from headstart.tasks import ClassifyConfig, train

    tmp = tmp_path_factory.mktemp("tiny")
    data = make_image_folder(tmp / "data", {"red": 16, "blue": 16}, splits={"train": 0.75, "val": 0.25})
    cfg = ClassifyConfig(
        data_dir=str(data),
        out=str(tmp / "run"),
        backbone="test_resnet",
        pretrained=False,
        views=2,
        epochs=20,
        batch_size=8,
        lr=1e-2,
        cache_dir=str(tmp / "cache"),
        progress=False,
    )
    return train(cfg)


@pytest.fixture(scope="session")
def tiny_bundle(tiny_run, tmp_path_factory):
    from headstart.exporter import export_bundle

    return export_bundle(tiny_run, tmp_path_factory.mktemp("bundle") / "tiny", name="tiny-test")


@pytest.fixture(scope="session")
def hymenoptera_bundle(hymenoptera_run, tmp_path_factory):
    """The real ants/bees classifier exported with --int8 (fp32 + int8 ONNX) and imported as ants-bees."""
    from headstart.exporter import export_bundle

    return export_bundle(hymenoptera_run, tmp_path_factory.mktemp("bundle") / "ants-bees", int8=True, name="ants-bees")


def import_service(model_ref: str):
    """The service module as `bentoml serve` imports it, with ``HEADSTART_MODEL=model_ref`` (its settings are read
    once, when service.settings is imported: read again here)."""
    import importlib

    import headstart.service.settings

    os.environ["HEADSTART_MODEL"] = model_ref
    importlib.reload(headstart.service.settings)
    import headstart.service.service as module

    return importlib.reload(module)


@contextlib.contextmanager
def serving(model: str, log: Path, **env: str):
    """A ready `bentoml serve` of ``model`` on a free port (extra HEADSTART_* settings in ``env``), stopped on exit;
    yields (url, process, log file). The service runs on the CPU in tests."""
    with devserver.serving(model, log, **{"HEADSTART_DEVICE": "cpu", **env}) as running:
        yield running


@pytest.fixture(scope="session")
def server(hymenoptera_bundle, tmp_path_factory):
    with serving(hymenoptera_bundle.tag, tmp_path_factory.mktemp("serve") / "server.log") as running:
        yield running


#: Fixtures that train on the real shared data or start `bentoml serve`: a test using one is end to end.
END_TO_END_FIXTURES = {"hymenoptera_run", "hymenoptera_bundle", "server", "detector_run", "detector_bundle"}


def pytest_collection_modifyitems(config, items):
    """Tests by layer: end-to-end tests are marked ``slow`` (by the fixtures they use, or by hand), so
    ``pytest -m "not slow"`` runs the fast tests of one part each."""
    for item in items:
        if END_TO_END_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.endswith("reference"):
            item.add_marker(pytest.mark.slow)
