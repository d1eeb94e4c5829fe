"""Reliability: hostile HTTP input, load, training and export faults, untrusted files."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from headstart import runs

from .bad_requests import BOUNDARY, corpus, raw_multipart
from .conftest import MOBILENET, ROOT, make_image_folder
from .images import ANT, BEE, hostile_images, large_16bit_png, mutants

SOAK_SECONDS = float(os.environ.get("HEADSTART_SOAK_SECONDS", "20"))


# ---------------------------------------------------------------- hostile HTTP input


@pytest.mark.slow
@pytest.mark.parametrize(("name", "method", "path", "kwargs", "status"), corpus(), ids=[c[0] for c in corpus()])
def test_hostile_requests_get_4xx_with_a_message(server, name, method, path, kwargs, status):
    url, proc, _ = server
    with httpx.Client(base_url=url, timeout=60) as http:
        if method == "RAW":
            code, text = send_raw(url, kwargs["raw"], hang_up=kwargs.get("close", False))
        else:
            resp = http.request(method, path, **kwargs)
            code, text = resp.status_code, resp.text
        assert code == status, (code, text[:300])
        if method != "RAW" and status not in (404, 405):  # RAW: some are refused by the HTTP parser itself
            assert "error" in text
        assert http.get("/readyz").status_code == 200
    assert proc.poll() is None


def send_raw(url: str, data: bytes, hang_up: bool = False) -> tuple[int | None, str]:
    """Send bytes over a plain socket; returns the status code and body (None if the client hung up first)."""
    import socket
    from urllib.parse import urlparse

    u = urlparse(url)
    with socket.create_connection((u.hostname, u.port), timeout=30) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(data)  # the server may answer (e.g. 413) before the whole body is sent
        if hang_up:
            return None, ""
        response = b""
        while b"\r\n\r\n" not in response or len(response) < 12:
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            response += chunk
    head, _, body = response.partition(b"\r\n\r\n")
    return int(head.split()[1]), body.decode(errors="replace")


@pytest.mark.slow
def test_uploads_are_known_by_their_bytes_whatever_the_client_declares(server):
    """curl -F sends application/octet-stream for a file without an image extension; some clients send no type or
    a long non-ASCII file name; media types are case-insensitive. Each gets the same answer as a plain upload."""
    url, _, _ = server
    photo = BEE.read_bytes()
    with httpx.Client(base_url=url, timeout=60) as http:
        expected = http.post("/classify", files={"image": ("bee.jpg", photo, "image/jpeg")}).json()
        assert expected["predictions"][0]["label"] == "bees"
        variants = {
            "octet-stream": {"files": {"image": ("photo", photo, "application/octet-stream")}},
            "no-type": {
                "content": raw_multipart([("image", "photo", photo, None)]),
                "headers": {"content-type": f"multipart/form-data; boundary={BOUNDARY}"},
            },
            "long-non-ascii-name": {"files": {"image": ("蜜蜂の写真" * 30 + ".jpg", photo, "image/jpeg")}},
            "mixed-case-media-type": {
                "content": raw_multipart([("image", "a.jpg", photo, "image/jpeg")]),
                "headers": {"content-type": f"Multipart/Form-Data; boundary={BOUNDARY}"},
            },
        }
        for name, kwargs in variants.items():
            resp = http.post("/classify", **kwargs)
            assert resp.status_code == 200, (name, resp.text)
            assert resp.json() == expected, name
        resp = http.post("/localize", files={"image": ("蜜蜂" * 100, photo, "application/octet-stream")})
        assert resp.status_code == 200 and resp.json()["predictions"][0]["label"] == "bees"


@pytest.mark.slow
def test_a_hostile_image_in_a_batch_fails_only_itself(server):
    url, _, _ = server
    bad, _, message = hostile_images()["png-truncated-ihdr"]
    files = [
        ("images", ("a.jpg", BEE.read_bytes(), "image/jpeg")),
        ("images", ("b.png", bad, "image/png")),
        ("images", ("c.jpg", ANT.read_bytes(), "image/jpeg")),
    ]
    with httpx.Client(base_url=url, timeout=60) as http, ThreadPoolExecutor(4) as pool:
        # other clients' requests merged into the same batch are answered too
        others = [pool.submit(http.post, "/classify_batch", files=[files[0]]) for _ in range(3)]
        resp = http.post("/classify_batch", files=files)
        assert all(o.result().status_code == 200 for o in others)
    assert resp.status_code == 200, resp.text
    items = resp.json()
    assert items[0]["predictions"][0]["label"] == "bees" and items[2]["predictions"][0]["label"] == "ants"
    assert message in items[1]["error"] and not items[1]["predictions"]


@pytest.mark.slow
def test_mutated_images_over_http_never_get_a_server_error(server):
    """A seeded mutation fuzz of small valid JPEG, PNG, GIF, BMP, TIFF and WebP files, sent to the model routes."""
    url, proc, _ = server
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=url, timeout=60) as http:
        for i, (name, data) in enumerate(mutants(seed=11, count=90)):
            route = ("/classify", "/localize", "/classify_batch")[i % 3]
            field = "images" if route == "/classify_batch" else "image"
            resp = http.post(route, files={field: (name, data, "application/octet-stream")})
            statuses[resp.status_code] = statuses.get(resp.status_code, 0) + 1
            assert resp.status_code < 500, (name, route, resp.text[:300])
    assert statuses.get(400, 0) > 10 and statuses.get(200, 0) > 10, statuses  # both kinds of mutant were sent
    assert proc.poll() is None


#: Growth of the server's resident memory (both workers) allowed while it answers the memory bombs: the largest
#: image accepted (64 MP, here 16-bit) needs about 400 MiB while it is decoded (benchmarks/RESULTS.md).
BOMB_RSS_BOUND_MIB = 768
#: Time within which each bomb is answered: a hang guard, generous for a loaded 2-core machine. That they are refused
#: before decoding is shown by their messages (only the header checks give them) and, counted, in test_preprocess.py.
BOMB_SECONDS = 10.0


@pytest.mark.slow
def test_memory_and_cpu_bombs_are_answered_at_once_within_a_memory_bound(server):
    import threading

    url, proc, _ = server
    bombs = {k: hostile_images()[k] for k in ("aspect-2x30000", "jpeg-500-scans")}
    big16 = large_16bit_png()
    peak, stop = [0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], server_rss(proc))
            time.sleep(0.02)

    with httpx.Client(base_url=url, timeout=120) as http:
        http.post("/classify", files={"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")})  # warm
        baseline = server_rss(proc)
        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            for _ in range(2):
                for name, (data, ctype, message) in bombs.items():
                    start = time.perf_counter()
                    resp = http.post("/classify", files={"image": ("x", data, ctype)})
                    elapsed = time.perf_counter() - start
                    assert resp.status_code == 400 and message in resp.text, (name, resp.text)
                    assert elapsed < BOMB_SECONDS, f"{name} answered in {elapsed:.2f} s"
                files = [("images", (f"{i}.png", big16, "image/png")) for i in range(3)]
                resp = http.post("/classify_batch", files=files)
                assert resp.status_code == 200 and all(not item["error"] for item in resp.json()), resp.text[:300]
        finally:
            stop.set()
            sampler.join()
    growth = (peak[0] - baseline) / 2**20
    assert growth < BOMB_RSS_BOUND_MIB, f"server RSS rose {growth:.0f} MiB answering the bombs"


@pytest.mark.slow
def test_a_server_at_its_concurrency_limit_answers_503_with_retry_after(hymenoptera_bundle, tmp_path):
    """One worker that holds one request at a time: while a request is admitted (here a batch of four 64 MP PNGs,
    seconds of decoding), others are shed at once with 503 and Retry-After; once it is done, requests are served
    again. (A request is admitted once its body is in: one whose body is still arriving holds no slot.)"""
    from PIL import Image

    from .conftest import serving
    from .images import encode

    large = encode(Image.new("RGB", (8000, 8000), (30, 60, 90)), "PNG")
    bee = {"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")}
    batch = [("images", (f"{i}.png", large, "image/png")) for i in range(4)]
    with (
        serving(
            hymenoptera_bundle.tag, tmp_path / "server.log", HEADSTART_WORKERS="1", HEADSTART_MAX_CONCURRENCY="1"
        ) as (url, _, _),
        httpx.Client(base_url=url, timeout=300) as http,
        ThreadPoolExecutor(1) as pool,
    ):
        for _ in range(3):  # a probe in flight the moment the batch's body is in sheds the batch: then again
            held = pool.submit(http.post, "/classify_batch", files=batch)
            time.sleep(0.5)
            shed, deadline = [], time.time() + 60
            while len(shed) < 3 and not held.done() and time.time() < deadline:  # until the batch is admitted
                response = http.post("/classify", files=bee)
                if response.status_code != 200 or shed:
                    shed.append(response)
            assert http.get("/readyz").status_code == 200  # health checks are not counted
            done = held.result()
            if not held_was_shed(done):
                break
        again = http.post("/classify", files=bee)
    assert not held_was_shed(done), done.text[:300]
    assert [r.status_code for r in shed] == [503] * 3, [r.text for r in shed]
    assert all(r.headers["retry-after"] == "1" and "busy" in r.json()["error"] for r in shed)
    assert again.status_code == 200 and again.json()["predictions"][0]["label"] == "bees"


def held_was_shed(response: httpx.Response) -> bool:
    return response.status_code != 200 or any(item["error"] for item in response.json())


@pytest.mark.slow
def test_client_errors_are_logged_as_one_line_without_a_traceback(server):
    url, _, log = server
    marker = f"/classify?probe={time.time_ns()}"
    httpx.post(f"{url}{marker}", files={"image": ("x", b"not an image", "image/jpeg")}, timeout=60)
    httpx.post(
        f"{url}/localize", files={"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")}, data={"conf": "7"}, timeout=60
    )
    deadline = time.time() + 10
    while "Client error on /localize" not in log.read_text() and time.time() < deadline:
        time.sleep(0.1)
    text = log.read_text()
    assert "Client error on /classify [POST] -> 400: The data is not an image format" in text
    assert "Client error on /localize [POST] -> 400" in text
    assert "Traceback" not in text


def test_corpus_is_big_enough():
    assert len(corpus()) >= 60


@pytest.mark.slow
def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Property-based requests generated from the service's own OpenAPI schema: no 5xx."""
    url, proc, _ = server
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{url}/docs.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "40",
        "--seed",
        "7",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert re.search(r"\d+ generated, \d+ passed", out.stdout), out.stdout[-2000:]
    assert httpx.get(f"{url}/readyz").status_code == 200 and proc.poll() is None


@pytest.mark.slow
def test_uploaded_file_names_never_reach_the_file_system(server):
    url, _, _ = server
    target = Path("/tmp/headstart-pwned.jpg")
    target.unlink(missing_ok=True)
    with httpx.Client(base_url=url, timeout=60) as http:
        for name in (
            "../../../../../../tmp/headstart-pwned.jpg",
            "/tmp/headstart-pwned.jpg",
            "..\\..\\x.jpg",
        ):
            resp = http.post("/classify", files={"image": (name, BEE.read_bytes(), "image/jpeg")})
            assert resp.status_code == 200
    assert not target.exists()


# ---------------------------------------------------------------- load and soak


def server_rss(proc: subprocess.Popen) -> int:
    import psutil

    p = psutil.Process(proc.pid)
    return sum(x.memory_info().rss for x in [p, *p.children(recursive=True)])


@pytest.mark.slow
def test_short_soak_mixed_traffic(server):
    """A bounded soak on loopback: good and bad requests at concurrency 16; every good one answered correctly."""
    from .images import bad_images

    url, proc, log = server
    bad = list(bad_images().values())
    good = [(BEE.read_bytes(), "bees"), (ANT.read_bytes(), "ants")]

    def client(k: int, seconds: float) -> tuple[int, int, int]:
        ok = wrong = server_errors = 0
        end = time.time() + seconds
        i = k
        with httpx.Client(base_url=url, timeout=60) as http:
            while time.time() < end:
                i += 1
                if i % 4 == 0:
                    data, ctype, _ = bad[i % len(bad)]
                    resp = http.post("/classify", files={"image": ("x", data, ctype)})
                    server_errors += resp.status_code >= 500
                    wrong += resp.status_code != 400
                else:
                    data, label = good[i % 2]
                    resp = http.post("/classify", files={"image": ("x.jpg", data, "image/jpeg")}, data={"top_k": "1"})
                    server_errors += resp.status_code >= 500
                    if resp.status_code == 200 and resp.json()["predictions"][0]["label"] == label:
                        ok += 1
                    else:
                        wrong += 1
        return ok, wrong, server_errors

    with ThreadPoolExecutor(16) as pool:  # warm-up: allocator pools and caches fill
        list(pool.map(lambda k: client(k, 10), range(16)))
    rss_before = server_rss(proc)
    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(lambda k: client(k, SOAK_SECONDS), range(16)))
    rss_after = server_rss(proc)
    ok = sum(r[0] for r in results)
    assert ok > 100
    assert sum(r[1] for r in results) == 0, "a good request was answered wrongly or a bad one not with 400"
    assert sum(r[2] for r in results) == 0
    growth = (rss_after - rss_before) / 2**20
    # A gross-leak bound only: under a first heavy load RSS rises for a minute or two (BentoML's request threads
    # each keep a glibc heap) and then levels off, as benchmarks/soak.py shows over 10 minutes; 172 MiB was seen
    # here in 20 s. Leaking a decoded image per request (~600 KB) would exceed this within the 20 s.
    assert growth < 256, f"server RSS grew {growth:.0f} MiB in {SOAK_SECONDS} s ({ok} good requests): a leak"
    new_log = log.read_text()
    assert "status=500" not in new_log
    assert "Traceback" not in new_log  # the bad images are the clients' errors: one INFO line each
    assert httpx.get(f"{url}/readyz").status_code == 200


# ---------------------------------------------------------------- training faults


def train_cmd(data: Path, out: Path, cache: Path, *extra: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "headstart.cli",
        "train",
        str(data),
        "--out",
        str(out),
        "--backbone",
        "test_resnet",
        "--no-pretrained",
        "--views",
        "4",
        "--batch-size",
        "8",
        "--lr",
        "0.01",
        "--epochs",
        "150",
        "--patience",
        "150",
        "--cache-dir",
        str(cache),
        "--no-progress",
        *extra,
    ]


def train_env() -> dict[str, str]:
    """The environment of every training process here: one OpenMP thread each. Two runs at once then take a core
    each instead of four spinning threads sharing two cores (on a 2-core AMD EPYC: 13.7 s instead of 46.6 s), and
    every run, the reference included, computes with the same threads."""
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def heads_equal(a: Path, b: Path) -> bool:
    ta, tb = load_file(str(a / runs.HEAD)), load_file(str(b / runs.HEAD))
    return ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)


@pytest.fixture(scope="module")
def fault_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = make_image_folder(root / "data", {"red": 40, "blue": 40}, splits={"train": 0.75, "val": 0.25})
    reference = root / "reference"
    subprocess.run(
        train_cmd(data, reference, root / "ref-cache"), check=True, cwd=ROOT, capture_output=True, env=train_env()
    )
    return data, reference


def kill_when(cmd: list[str], condition, timeout: float = 120) -> None:
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=train_env())
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            if condition():
                proc.send_signal(signal.SIGKILL)
                proc.wait()
                return
            if proc.poll() is not None:
                raise AssertionError("the run finished before the kill point; make it longer")
            time.sleep(0.01)
        raise AssertionError("kill point never reached")
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("phase", ["features", "head"])
def test_sigkill_then_resume_gives_the_same_result(fault_data, tmp_path, phase):
    data, reference = fault_data
    out, cache = tmp_path / "run", tmp_path / "cache"
    cmd = train_cmd(data, out, cache)
    if phase == "features":
        kill_when(cmd, lambda: len(list(cache.rglob("*.npy"))) >= 10)
        assert not (out / runs.CHECKPOINT).exists()
    else:
        kill_when(cmd, lambda: (out / runs.CHECKPOINT).exists())
    assert not (out / runs.DONE).exists()
    # whatever the kill left behind in the cache is either complete or ignored (temporary names)
    for f in cache.rglob("*.npy"):
        np.load(f, allow_pickle=False)
    subprocess.run([*cmd, "--resume"], check=True, cwd=ROOT, capture_output=True, env=train_env())
    assert (out / runs.DONE).exists()
    assert heads_equal(out, reference)


def test_two_runs_sharing_a_cache_at_once(fault_data, tmp_path):
    data, reference = fault_data
    cache = tmp_path / "shared-cache"
    procs = [
        subprocess.Popen(
            train_cmd(data, tmp_path / f"run{i}", cache),
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=train_env(),
        )
        for i in range(2)
    ]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err.decode()[-2000:]
    for i in range(2):
        assert heads_equal(tmp_path / f"run{i}", reference)
    assert not list(cache.rglob("*.tmp"))
    for f in cache.rglob("*.npy"):
        np.load(f, allow_pickle=False)


# ---------------------------------------------------------------- export faults


@pytest.mark.parametrize("where", ["embed_manifest", "quantize_int8", "replace_dir"])
def test_failed_export_leaves_previous_bundle_and_store(tiny_run, tmp_path, monkeypatch, where):
    import bentoml

    import headstart.exporter as export_mod
    import headstart.runs

    export_mod.export_bundle(tiny_run, tmp_path / "b", name="fault-test", int8=where == "quantize_int8")
    before = {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()}
    tags = sorted(str(m.tag) for m in bentoml.models.list())

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device (simulated)")

    monkeypatch.setattr(headstart.runs if where == "replace_dir" else export_mod, where, fail)
    with pytest.raises(OSError, match="simulated"):
        export_mod.export_bundle(tiny_run, tmp_path / "b", name="fault-test", int8=where == "quantize_int8")
    assert {p.name: p.read_bytes() for p in (tmp_path / "b").iterdir()} == before
    if where != "replace_dir":  # the store import happens before the final move
        assert sorted(str(m.tag) for m in bentoml.models.list()) == tags
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


# ---------------------------------------------------------------- untrusted files


def test_no_pickle_is_loaded_from_user_files():
    """torch.load always with weights_only=True; no pickle/np.load(allow_pickle=True) anywhere in the product."""
    sources = [p for d in ("service", "training", "models") for p in (ROOT / d).rglob("*.py")]
    assert sources
    for path in sources:
        text = path.read_text()
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
        assert "import pickle" not in text and "cloudpickle" not in text, path
        assert "allow_pickle=True" not in text, path
        assert "eval(" not in text.replace("model.eval(", "").replace(".eval()", ""), path


def test_pickled_weights_file_is_refused(tmp_path):
    from headstart.models import build_backbone
    from headstart.models.backbone import BackboneError

    class Evil:
        def __reduce__(self):
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": Evil()}, path)
    with pytest.raises(BackboneError, match="Cannot read weights"):
        build_backbone("test_resnet", weights=path)
    assert not (tmp_path / "pwned").exists()


def test_weights_from_a_checkpoint_load_and_every_other_file_is_named_for_what_it_is(tmp_path):
    """A training checkpoint ({"model": state_dict, "epoch": 3}) was refused as "not a state dict"; a whole pickled
    model, an image or a damaged .safetensors file got torch's advice to load with weights_only=False (running the
    file's code) and to file an issue with PyTorch, or a safetensors traceback."""
    from safetensors.torch import save_file

    from headstart.models import build_backbone
    from headstart.models.backbone import BackboneError, load_state_dict_file

    state = torch.load(MOBILENET, map_location="cpu", weights_only=True)  # the real ImageNet MobileNetV2
    for key in ("state_dict", "model_state_dict", "model", "net", "state_dict_ema", "model_ema"):
        torch.save({key: state, "epoch": 3, "optimizer": {"lr": 0.1}}, tmp_path / "ckpt.pth")
        loaded = load_state_dict_file(tmp_path / "ckpt.pth")
        assert loaded.keys() == state.keys() and all(torch.equal(loaded[k], state[k]) for k in state), key
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in state.items()}
    torch.save({"model_ema": ema, "model": state}, tmp_path / "both.pth")
    assert all(torch.equal(load_state_dict_file(tmp_path / "both.pth")[k], state[k]) for k in state)  # not the EMA
    built = build_backbone("torchvision:mobilenet_v2", weights=tmp_path / "ckpt.pth")
    assert built.weights_sha256 == build_backbone("torchvision:mobilenet_v2", weights=MOBILENET).weights_sha256

    torch.save(nn.Sequential(nn.Linear(2, 2)), tmp_path / "whole.pth")
    torch.save({"epoch": 3}, tmp_path / "no-weights.pth")
    from PIL import Image

    Image.new("RGB", (8, 8)).save(tmp_path / "photo.pth", "JPEG")
    save_file(state, tmp_path / "good.safetensors")
    (tmp_path / "cut.safetensors").write_bytes((tmp_path / "good.safetensors").read_bytes()[:100])
    for name, words in (
        ("whole.pth", r"holds a pickled Python object \(.*: the whole model\?\).*does not unpickle"),
        ("no-weights.pth", r"does not hold a state dict .*\(it holds a dict with keys \['epoch'\]\)"),
        ("photo.pth", "it is not a file torch.save writes"),
        ("cut.safetensors", "not a safetensors file, or a damaged one"),
    ):
        with pytest.raises(BackboneError, match=words) as caught:
            load_state_dict_file(tmp_path / name)
        assert "weights_only" not in str(caught.value) and "file an issue" not in str(caught.value), name


def test_manifest_cannot_point_outside_the_bundle(tiny_bundle, tmp_path):
    from headstart.service.bundle import BundleError, load_bundle

    bad = tmp_path / "bundle"
    shutil.copytree(tiny_bundle.bundle_dir, bad)
    manifest = json.loads((bad / "manifest.json").read_text())
    manifest["files"] = {"/etc/hostname": {"sha256": "0"}, **manifest["files"]}
    (bad / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(bad)


def test_model_name_from_environment_is_checked(monkeypatch):
    """HEADSTART_MODEL goes through verify_bundle: an existing directory must be a bundle, anything else a tag."""
    from headstart.service.bundle import BundleError, verify_bundle

    for ref in ("../../etc", "/", "x; rm -rf /", "UPPER:case", "a" * 300 + "/x", "name:../../x"):
        with pytest.raises(BundleError):
            verify_bundle(ref)


def test_stale_temporary_cache_files_are_swept(tmp_path):
    """A writer killed mid-write leaves `.NAME.XXXX.tmp`; the next cache to open removes it once it is old."""
    from headstart.features import FeatureCache

    folder = tmp_path / "ab"
    folder.mkdir(parents=True)
    stale, fresh, data = folder / ".abc.npy.1.tmp", folder / ".abd.npy.2.tmp", folder / "abe.npy"
    for f in (stale, fresh, data):
        f.write_bytes(b"x")
    old = time.time() - 2 * FeatureCache.STALE_TMP_SECONDS
    os.utime(stale, (old, old))
    cache = FeatureCache(tmp_path)
    assert cache.removed_stale == 1
    assert not stale.exists() and fresh.exists() and data.exists()
