"""`headstart serve`: the service started from the CLI, on loopback by default, with one start line; GET /info and
/docs."""

from __future__ import annotations

import socket
import subprocess
import sys

import httpx
import pytest

from headstart.service.devserver import free_port, stop, wait_ready
from tests.conftest import ROOT


@pytest.mark.slow
def test_headstart_serve_binds_loopback_logs_one_start_line_and_answers(tiny_bundle, tmp_path):
    port, log = free_port(), tmp_path / "serve.log"
    run_dir = tiny_bundle.bundle_dir.parent
    if not (run_dir / "bundle").exists():  # a run directory holds its exported bundle there
        (run_dir / "bundle").symlink_to(tiny_bundle.bundle_dir)
    proc = subprocess.Popen(
        [sys.executable, "-m", "headstart.cli", "serve", str(run_dir), "--port", str(port), "--workers", "1"],
        cwd=ROOT,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log)
        with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as http:
            info, docs = http.get("/info"), http.get("/docs")
            index = http.get(docs.headers["location"])
    finally:
        stop(proc)
    text = log.read_text()
    assert f"listening on http://127.0.0.1:{port}" in text, text[-2000:]
    starts = [line for line in text.splitlines() if "headstart serving tiny-test:" in line]
    assert len(starts) == 1 and "fp32 file" in starts[0] and "CPU" in starts[0], text[-2000:]
    assert starts[0].endswith("no API key asked (HEADSTART_API_KEYS unset)")
    assert info.status_code == 200 and info.json()["name"] == "tiny-test"
    assert docs.status_code == 308 and index.status_code == 200 and "swagger" in index.text.lower()


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["no-such-model:v1"], "no-such-model"),
        (["TINY", "--variant", "int8"], "no int8 model"),
        (["TINY", "--runtime", "onnxruntime", "--device", "cuda"], "CUDA"),
        # bentoml ended these in its traceback ("OSError: [Errno 98] Address already in use"), after "serving ..."
        (["TINY", "--port", "BUSY"], "is in use by another process"),
        (["TINY", "--host", "203.0.113.7"], "is not an address of this machine"),  # TEST-NET-3: no machine's
        (["TINY", "--host", "no-such-host.invalid"], "is not a name this machine can resolve"),
        (["TINY", "--port", "70000"], "a port is at most 65535"),
        (["RUN"], "is a run directory with no exported bundle in it"),  # was "not a headstart bundle"
    ],
    ids=["model", "variant", "device", "port-in-use", "host-elsewhere", "host-unknown", "port-range", "run"],
)
def test_headstart_serve_refuses_a_wrong_start_with_one_line(tiny_bundle, tmp_path, args, words):
    (tmp_path / "config.yaml").write_text("task: classify\n")  # a run directory, never exported
    args = [{"TINY": str(tiny_bundle.bundle_dir), "RUN": str(tmp_path)}.get(a, a) for a in args]
    with socket.socket() as busy:  # another process's server, listening
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in args]
        out = subprocess.run(
            [sys.executable, "-m", "headstart.cli", "serve", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    lines = [line for line in out.stderr.splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and words in lines[0], out.stderr[-2000:]


@pytest.mark.slow
def test_every_4xx_answer_has_one_json_shape(server):
    url, _, _ = server
    image = {"image": ("a.jpg", b"not an image", "image/jpeg")}
    with httpx.Client(base_url=url, timeout=60) as http:
        answers = {
            "guard: unknown field": (http.post("/classify", files=image, data={"colour": "red"}), "colour"),
            "guard: not a form, an image or JSON": (http.post("/classify", data={"image": "x"}), None),
            "guard: JSON without the image": (http.post("/classify", json={}), "image"),
            "service: range": (http.post("/classify", files=image, data={"top_k": "0"}), "top_k"),
            "pydantic: type": (http.post("/classify", files=image, data={"top_k": "many"}), "top_k"),
            "service: image": (http.post("/classify", files=image), "image"),
            "starlette: 404": (http.get("/no-such-page"), None),
            "page: 405": (http.post("/ui"), None),
        }
        # no HEADSTART_CORS_ORIGINS: another site's page may not read the answers
        assert (
            "access-control-allow-origin" not in http.post("/classify", headers={"Origin": "https://x.example"}).headers
        )
    for name, (resp, field) in answers.items():
        assert 400 <= resp.status_code < 500 and resp.headers["content-type"] == "application/json", name
        body = resp.json()
        assert isinstance(body, dict) and set(body) == {"error", "field"} and body["error"], (name, body)
        assert body["field"] == field, (name, body)


def test_headstart_serve_keeps_the_environments_settings_unless_an_option_is_given(tiny_bundle, monkeypatch):
    """HEADSTART_VARIANT=int8 in the environment and no --variant: the int8 check runs (and fails on this bundle);
    --variant fp32 given: it wins."""
    from headstart.cli import main

    served = []
    monkeypatch.setattr("headstart.service.devserver.serve", lambda model, host, port, **env: served.append(env))
    monkeypatch.setenv("HEADSTART_VARIANT", "int8")
    assert main(["serve", str(tiny_bundle.bundle_dir)]) == 2 and not served
    port = str(free_port())  # the start checks that the port is free: not 3000, which something here may hold
    assert (
        main(["serve", str(tiny_bundle.bundle_dir), "--variant", "fp32", "--runtime", "onnxruntime", "--port", port])
        == 0
    )
    assert served[0]["HEADSTART_VARIANT"] == "fp32" and served[0]["HEADSTART_RUNTIME"] == "onnxruntime"


@pytest.mark.slow
def test_api_keys_keep_out_whoever_has_none_and_leave_the_probes_open(tiny_bundle, tmp_path):
    """A service reachable from the internet answered anyone: HEADSTART_API_KEYS asks every model route and /info for
    one of its keys (Authorization: Bearer, or X-API-Key), the probes, metrics, docs and /ui stay open, and the keys
    appear in no answer and no log line."""
    from tests.conftest import serving
    from tests.images import ANT

    keys = ["9f86d081884c7d659a2feaa0c55ad015", "second-key-for-rotation-0001"]
    image = {"image": ("ant.jpg", ANT.read_bytes(), "image/jpeg")}
    secret = tmp_path / "headstart-keys"  # the second as a secret mounted as a file (HEADSTART_API_KEYS_FILE)
    secret.write_text(f"{keys[1]}\n")
    env = {"HEADSTART_API_KEYS": keys[0], "HEADSTART_API_KEYS_FILE": str(secret)}
    with serving(str(tiny_bundle.bundle_dir), tmp_path / "server.log", **env) as (
        url,
        proc,
        log,
    ):
        with httpx.Client(base_url=url, timeout=60) as http:
            refused = http.post("/classify", files=image)
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == 'Bearer realm="headstart"'
            assert refused.json()["error"].startswith("This service needs an API key")
            assert http.post("/info", headers={"Authorization": "Bearer not-the-key-0123456"}).status_code == 401
            for key in keys:  # two keys at once: one being replaced, its successor
                answered = http.post("/classify", files=image, headers={"Authorization": f"Bearer {key}"})
                assert answered.status_code == 200 and answered.json()["predictions"], answered.text
            typed = {"X-API-Key": keys[0], "content-type": "image/jpeg"}
            raw = http.post("/classify?top_k=1", content=ANT.read_bytes(), headers=typed)
            assert raw.status_code == 200 and len(raw.json()["predictions"]) == 1
            assert http.post("/info", headers={"X-API-Key": keys[1]}).json()["labels"]
            for path in ("/readyz", "/livez", "/metrics", "/ui", "/docs.json"):
                assert http.get(path).status_code == 200, path
            spec = http.get("/docs.json").json()  # the docs page's Authorize button, and client generators
            scheme = spec["components"]["securitySchemes"]["apiKey"]
            assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")
            assert spec["paths"]["/classify"]["post"]["security"] == [{"apiKey": []}]
            assert "401" in spec["paths"]["/info"]["post"]["responses"]
            assert not any("security" in op for op in spec["paths"]["/readyz"].values() if isinstance(op, dict))
        import bentoml  # BentoML's own Python client, as the README shows it: token= is the Bearer key

        with bentoml.SyncHTTPClient(url, token=keys[1]) as client:
            assert client.classify(image=ANT, top_k=1)["predictions"][0]["label"]
        with bentoml.SyncHTTPClient(url) as client, pytest.raises(bentoml.exceptions.BentoMLException, match="API key"):
            client.classify(image=ANT)
        said = log.read_text()
        assert "Traceback" not in said and not any(key in said for key in keys)
        assert "API keys asked (2 in HEADSTART_API_KEYS and HEADSTART_API_KEYS_FILE)" in said  # the door is locked


def test_cors_lets_the_named_sites_pages_call_the_api_and_read_its_refusals(tiny_bundle, tmp_path):
    """A web app on another site calling /classify from the browser was blocked (no CORS headers, no way to add
    them): HEADSTART_CORS_ORIGINS names the sites; the guard's refusals carry the headers too (else the page sees a
    network error, not the 413's message). Unset, no site is let in (test_every_4xx_answer_has_one_json_shape)."""
    from headstart.service.settings import Settings, SettingsError
    from tests.conftest import serving
    from tests.images import ANT

    app, other = "https://app.example.com", "https://elsewhere.example.com"
    preflight = {"Access-Control-Request-Method": "POST", "Access-Control-Request-Headers": "content-type"}
    image = {"image": ("ant.jpg", ANT.read_bytes(), "image/jpeg")}
    env = {"HEADSTART_CORS_ORIGINS": f"{app}, http://localhost:5173", "HEADSTART_MAX_REQUEST_BYTES": "200000"}
    with serving(str(tiny_bundle.bundle_dir), tmp_path / "server.log", **env) as (url, proc, log):
        with httpx.Client(base_url=url, timeout=60) as http:
            asked = http.options("/classify", headers={"Origin": app, **preflight})
            assert asked.status_code == 200 and asked.headers["access-control-allow-origin"] == app
            assert "POST" in asked.headers["access-control-allow-methods"]
            answered = http.post("/classify", files=image, headers={"Origin": app})
            assert answered.status_code == 200 and answered.headers["access-control-allow-origin"] == app
            big = {"image": ("big.jpg", b"\xff" * 300_000, "image/jpeg")}
            refused = http.post("/classify", files=big, headers={"Origin": app})
            assert refused.status_code == 413 and refused.headers["access-control-allow-origin"] == app
            assert set(refused.json()) == {"error", "field"}  # the guard's message, readable by the page
            barred = http.options("/classify", headers={"Origin": other, **preflight})  # was Starlette's plain text
            assert barred.status_code == 400 and "access-control-allow-origin" not in barred.headers
            assert barred.json() == {
                "error": f"Cross-origin request refused: the origin {other} is not one HEADSTART_CORS_ORIGINS names.",
                "field": None,
            }
            put = http.options("/classify", headers={"Origin": app, "Access-Control-Request-Method": "PUT"})
            assert put.status_code == 400 and "the method PUT is not GET or POST" in put.json()["error"]
            stranger = http.post("/classify", files=image, headers={"Origin": other})
            assert stranger.status_code == 200 and "access-control-allow-origin" not in stranger.headers
        assert "Traceback" not in log.read_text()
    with pytest.raises(SettingsError, match="'https://app.example.com/' is not an origin"):
        Settings.from_env({"HEADSTART_CORS_ORIGINS": "https://app.example.com/"})
