"""The BentoML service at three levels: the class called directly, its ASGI app, and a real `bentoml serve`."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from headstart.loaded_run import load_run
from headstart.predict import predict_paths
from headstart.service.devserver import free_port, start
from headstart.service.preprocess import decode_image, preprocess

from .conftest import ROOT, import_service, serving
from .images import ANT, BEE, bad_images, exif_rotated, good_variants

pytestmark = pytest.mark.slow  # these use the real hymenoptera classifier


@pytest.fixture(scope="module")
def svc_module(hymenoptera_bundle):
    return import_service(str(hymenoptera_bundle.bundle_dir))


@pytest.fixture(scope="module")
def svc(svc_module):
    return svc_module.Headstart()


@pytest.fixture(scope="module")
def client(svc_module):
    from starlette.testclient import TestClient

    with TestClient(svc_module.Headstart.to_asgi(), raise_server_exceptions=False) as c:
        yield c


# ---------------------------------------------------------------- the class, called directly


def test_class_classifies_real_photos(svc, hymenoptera_bundle):
    bee = svc.classify(BEE, top_k=2)
    assert [p.label for p in bee.predictions] == ["bees", "ants"]
    assert bee.predictions[0].score > 0.9
    assert svc.classify(ANT, top_k=1).predictions[0].label == "ants"
    assert bee.model.name == "ants-bees" and bee.model.version == hymenoptera_bundle.manifest.version
    info = svc.info()
    assert info.labels == ["ants", "bees"] and (info.runtime, info.providers) == ("openvino", ["OpenVINO CPU"])
    assert info.metrics["accuracy"] >= 0.93 and info.input_size == 224


def test_service_preprocessing_is_training_preprocessing(svc, hymenoptera_run, monkeypatch):
    """Byte-identical model input on real images, and the same probabilities as the trained PyTorch model."""
    seen = []
    original = svc.bundle.run  # a model with a novelty score answers from all its outputs
    monkeypatch.setattr(
        svc.bundle, "run", lambda pixels, names=None: seen.append(pixels.copy()) or original(pixels, names)
    )
    run = load_run(hymenoptera_run)
    images = [BEE, ANT, *sorted((ROOT.parent / "shared" / "photos").glob("*.bmp"))]
    for path in images:
        svc.classify(path, top_k=2)
    training_pixels = [preprocess(decode_image(p), run.spec) for p in images]
    for served, trained in zip(seen, training_pixels, strict=True):
        assert served.shape == (1, *trained.shape)
        assert served[0].tobytes() == trained.tobytes()
    torch_probs = predict_paths(run.model, images, run.spec)
    served_bee = {p.label: p.score for p in svc.classify(BEE, top_k=2).predictions}
    # the served precision: fp32 matches PyTorch to 1e-4; bf16 (where the export allowed it) as closely as the
    # export measured on the validation images
    check = svc.bundle.manifest.runtimes["fp32"].get("openvino-bf16", {})
    tolerance = 1e-4 if svc.bundle.precision == "fp32" else max(1e-4, 2 * check["max_abs_prob_diff"])
    assert abs(served_bee["bees"] - torch_probs[0, 1]) < tolerance


def test_work_for_an_abandoned_request_is_dropped_not_run(svc, monkeypatch):
    """A request whose client left (or whose time ran out) while it waited for the inference thread is not run."""
    import time

    from headstart.service import guard

    ran = []
    original = svc.bundle.run
    monkeypatch.setattr(svc.bundle, "run", lambda pixels, names=None: ran.append(1) or original(pixels, names))
    for state in (
        guard.RequestState(deadline=time.monotonic() + 60, disconnected=True),
        guard.RequestState(deadline=time.monotonic() - 1),
    ):
        token = guard._CURRENT.set(state)
        try:
            with pytest.raises(svc_module_exception(svc), match="left or the request timed out"):
                svc.classify(BEE, top_k=1)
        finally:
            guard._CURRENT.reset(token)
    assert not ran
    # a merged batch runs in BentoML's dispatcher task, whose context is that of whichever request started it
    token = guard._CURRENT.set(guard.RequestState(deadline=time.monotonic() - 1))
    try:
        assert svc.classify_batch([BEE])[0].predictions[0].label == "bees" and ran
    finally:
        guard._CURRENT.reset(token)
    token = guard._CURRENT.set(guard.RequestState(deadline=time.monotonic() + 60))
    try:
        assert svc.classify(BEE, top_k=1).predictions[0].label == "bees" and ran
    finally:
        guard._CURRENT.reset(token)


def svc_module_exception(svc):
    return importlib.import_module(type(svc).__module__).RequestAbandoned


def test_exif_rotation_is_applied(svc, tmp_path):
    rotated, upright = exif_rotated()
    (tmp_path / "rotated.jpg").write_bytes(rotated)
    upright.save(tmp_path / "upright.png")
    a = svc.classify(tmp_path / "rotated.jpg", top_k=2).predictions
    b = svc.classify(tmp_path / "upright.png", top_k=2).predictions
    assert a[0].label == b[0].label == "bees"
    assert abs(a[0].score - b[0].score) < 0.02  # JPEG re-encoding differs slightly; orientation must not


@pytest.mark.parametrize("name", list(bad_images()))
def test_class_bad_images_raise_invalid_argument(svc, name, tmp_path):
    from bentoml.exceptions import InvalidArgument

    data, _, message = bad_images()[name]
    (tmp_path / "upload").write_bytes(data)
    with pytest.raises(InvalidArgument, match=message):
        svc.classify(tmp_path / "upload")
    with pytest.raises(InvalidArgument, match="top_k"):
        svc.classify(BEE, top_k=0)


# ---------------------------------------------------------------- the ASGI app


def post_image(client, data: bytes, content_type: str = "image/jpeg", **fields):
    return client.post("/classify", files={"image": ("upload", data, content_type)}, data=fields)


@pytest.mark.parametrize("name", list(good_variants()))
def test_asgi_accepts_every_image_mode(client, name):
    data, ctype = good_variants()[name]
    resp = post_image(client, data, ctype, top_k="1")
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["predictions"][0]["label"] in ("ants", "bees")
    assert set(body) == {"predictions", "labels", "model", "novelty", "novelty_threshold", "unknown"}
    # what the image holds: a single-label model's best class, or nothing where the image is "none of these"
    assert body["labels"] == ([] if body["unknown"] else body["predictions"][:1])


@pytest.mark.parametrize("name", list(bad_images()))
def test_asgi_bad_images_are_400_with_a_message(client, name):
    data, ctype, message = bad_images()[name]
    resp = post_image(client, data, ctype)
    assert resp.status_code == 400, resp.text
    assert message in resp.text


@pytest.mark.parametrize(
    ("kwargs", "status", "message"),
    [
        ({}, 415, "multipart/form-data"),  # empty body
        ({"data": {"top_k": "1"}}, 415, "multipart/form-data"),  # a form without the file
        ({"files": {"top_k": (None, "1")}}, 400, "'image' is missing"),  # multipart without the image field
        (
            {"files": {"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")}, "data": {"top_k": "0"}},
            400,
            "top_k",
        ),
        (
            {"files": {"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")}, "data": {"top_k": "99999"}},
            400,
            "top_k",
        ),
        (
            {"files": {"image": ("a.jpg", BEE.read_bytes(), "image/jpeg")}, "data": {"top_k": "many"}},
            400,
            "top_k",
        ),
        ({"files": {"image": ("a.txt", b"hello", "text/plain")}}, 400, "not an image format"),
        (
            {"content": b"{not json", "headers": {"content-type": "application/json"}},
            400,
            "The body is not valid JSON",
        ),
        (
            {"content": b"x" * (33 * 1024 * 1024), "headers": {"content-type": "image/jpeg"}},
            413,
            "larger than",
        ),
    ],
    ids=[
        "empty-body",
        "form-no-file",
        "missing-image",
        "top_k-0",
        "top_k-huge",
        "top_k-text",
        "text-file",
        "bad-json",
        "too-big",
    ],
)
def test_asgi_bad_requests(client, kwargs, status, message):
    resp = client.post("/classify", **kwargs)
    assert resp.status_code == status, resp.text
    assert message in resp.text


def test_asgi_an_upload_named_as_a_picture_in_another_form_says_what_to_do(client):
    """BentoML saves an upload under a name ending as the client's (tmpXXXXIMG_0042.CR2): a camera RAW photo is a
    400 saying to export it as JPEG, alone and in a batch."""
    raw = b"II*\x00raw sensor data"
    resp = client.post("/classify", files={"image": ("IMG_0042.CR2", raw, "image/x-canon-cr2")})
    assert resp.status_code == 400, resp.text
    assert resp.json()["error"].endswith(
        "Its name says it is a camera RAW photo: export them as JPEG first (darktable, RawTherapee or Lightroom)."
    )
    batch = client.post(
        "/classify_batch", files=[("images", ("IMG_0042.CR2", raw)), ("images", ("a.jpg", ANT.read_bytes()))]
    )
    assert "camera RAW photo" in batch.json()[0]["error"] and batch.json()[1]["error"] is None


def test_the_guards_endpoint_table_matches_the_service(svc_module):
    """Adding a parameter to an endpoint without the guard knowing would make every request using it a 400."""
    from headstart.service.guard import ENDPOINTS

    apis = svc_module.Headstart.apis
    assert {f"/{name}" for name in apis} == set(ENDPOINTS)
    for name, api in apis.items():
        endpoint = ENDPOINTS[f"/{name}"]
        fields = set(api.input_spec.model_fields)
        assert fields == {*endpoint.files, *endpoint.fields}, name
        assert set(getattr(api.input_spec, "multipart_fields", ())) == set(endpoint.files), name


@pytest.mark.parametrize("ctype", ["application/octet-stream", "text/plain", None])
def test_asgi_an_image_is_known_by_its_bytes_not_its_declared_type(client, ctype):
    files = {"image": ("photo", BEE.read_bytes(), ctype) if ctype else ("photo", BEE.read_bytes())}
    resp = client.post("/classify", files=files, data={"top_k": "2"})
    assert resp.status_code == 200, resp.text
    assert resp.json() == post_image(client, BEE.read_bytes(), top_k="2").json()


def test_asgi_an_image_sent_as_the_body_itself_with_options_in_the_query(client):
    """`curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'` and a browser's `fetch(url, {body: file})` were
    a 415 ("send multipart/form-data"): the body is the image, the options come in the query string, and the answer
    is the upload's. A query option on a form upload counts too (it was silently ignored)."""
    form = post_image(client, ANT.read_bytes(), top_k="1").json()
    for ctype in ("image/jpeg", "application/octet-stream", "image/png"):  # the bytes decide, as for an upload
        resp = client.post("/classify?top_k=1", content=ANT.read_bytes(), headers={"content-type": ctype})
        assert resp.status_code == 200 and resp.json() == form, resp.text
    resp = client.post("/classify", files={"image": ("a.jpg", ANT.read_bytes(), "image/jpeg")}, params={"top_k": "1"})
    assert resp.json() == form
    batch = client.post("/classify_batch", content=ANT.read_bytes(), headers={"content-type": "image/jpeg"}).json()
    assert [r["predictions"][0]["label"] for r in batch] == [form["predictions"][0]["label"]]
    boxes = client.post("/localize?conf=0.3", content=BEE.read_bytes(), headers={"content-type": "image/jpeg"})
    assert boxes.status_code == 200 and "detections" in boxes.json()
    for query, field, said in [
        ("top_k=0", "top_k", "top_k must be between 1"),
        ("top_k=1&top_k=2", "top_k", "'top_k' is given more than once"),
        ("top_k=%FF", None, "The query string is not UTF-8 text."),
    ]:
        resp = client.post(f"/classify?{query}", content=ANT.read_bytes(), headers={"content-type": "image/jpeg"})
        assert resp.status_code == 400 and said in resp.json()["error"], (query, resp.text)
        assert resp.json()["field"] == field, query
    gateway = client.post("/classify?code=KEY&top_k=1", content=ANT.read_bytes(), headers={"content-type": "image/png"})
    assert gateway.json() == form  # another's parameter (Azure Functions' key, a cache-buster): not the service's
    both = client.post("/classify?top_k=1", files={"image": ("a.jpg", ANT.read_bytes())}, data={"top_k": "2"})
    assert both.status_code == 400 and "in the query string and the body" in both.json()["error"]
    empty = client.post("/classify", content=b"", headers={"content-type": "image/jpeg"})
    assert empty.status_code == 400 and "The body is empty" in empty.json()["error"]
    text = client.post("/classify", content=b"hello", headers={"content-type": "application/octet-stream"})
    assert text.status_code == 400 and "not an image format" in text.json()["error"]


def test_asgi_an_image_sent_in_json_as_base64(client):
    """A web or mobile app often holds the image as base64 (a FileReader's data: URL, a JSON API client): JSON was a
    415. ``{"image": "<base64>", "top_k": 1}`` is answered as the upload of the same bytes; a data: URL, the line
    breaks of ``base64`` without -w0, the URL-safe alphabet and missing padding too; /classify_batch takes a list;
    the options are JSON numbers or booleans, within the form's limits; paths, URLs and the rest are a 400 naming
    the field."""
    import base64

    ant, bee = ANT.read_bytes(), BEE.read_bytes()
    b64 = base64.b64encode(ant).decode()
    form = post_image(client, ant, top_k="1").json()
    wrapped = "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76))
    urlsafe = base64.urlsafe_b64encode(ant).decode().rstrip("=")
    for image in (b64, "data:image/jpeg;base64," + b64, wrapped, urlsafe):
        resp = client.post("/classify", json={"image": image, "top_k": 1})
        assert resp.status_code == 200 and resp.json() == form, resp.text[:300]
    typed = client.post(
        "/classify?top_k=1",
        content=json.dumps({"image": b64}),
        headers={"content-type": "application/json; charset=utf-8"},
    )
    assert typed.status_code == 200 and typed.json() == form
    nulls = client.post(
        "/classify", json={"image": b64, "top_k": 1, "novelty_threshold": None, "label_threshold": None}
    )
    assert nulls.json() == form
    batch = client.post("/classify_batch", json={"images": [b64, base64.b64encode(bee).decode(), "aGVsbG8="]}).json()
    assert [r["predictions"][0]["label"] for r in batch[:2]] == ["ants", "bees"], batch
    assert "not an image format" in batch[2]["error"]
    boxes = client.post("/localize", json={"image": b64, "conf": 0.3, "boxes_if_unknown": True})
    assert boxes.status_code == 200 and "detections" in boxes.json(), boxes.text
    cases = [
        ({"image": "/home/me/ant.jpg"}, "image", "looks like a path: paths are not read"),
        ({"image": "/etc/passwd"}, "image", "looks like a path: paths are not read"),
        ({"image": "C:\\photos\\ant.jpg"}, "image", "is not base64"),
        ({"image": "https://example.com/ant.jpg"}, "image", "URLs are not fetched"),
        ({"image": "data:image/jpeg,%FF%D8"}, "image", "data: URL without base64"),
        ({"image": ""}, "image", "is missing or empty"),
        ({"top_k": 1}, "image", "is missing or empty"),
        ({"image": [b64, b64]}, "image", "takes one image, not a list"),
        ({"image": {"content": b64}}, "image", "must be a base64 string"),
        ({"image": b64, "top_k": [1]}, "top_k", "takes a number, not a JSON list"),
        ({"image": b64, "top_k": "9" * 100}, "top_k", "longer than 64 bytes"),
        ({"image": b64, "top_k": 0}, "top_k", "top_k must be between 1"),
        ({"image": b64, "topk": 1}, "topk", "Unknown field 'topk'; this endpoint takes image, top_k"),
        ({"images": [b64]}, "images", "Unknown field 'images'"),
    ]
    for doc, field, said in cases:
        resp = client.post("/classify", json=doc)
        assert resp.status_code == 400 and said in resp.json()["error"], (
            doc if len(str(doc)) < 99 else field,
            resp.text,
        )
        assert resp.json()["field"] == field, resp.text
    too_many = client.post("/classify_batch", json={"images": [b64] * 33})
    assert too_many.status_code == 400 and "send at most 32 per request" in too_many.json()["error"]
    for body, said in [
        (b'{"image": "' + b64.encode() + b'", "top_k": 1, "top_k": 2}', "'top_k' is given more than once"),
        (b'{"image": ', "The body is not valid JSON"),
        (b'{"image": "' + b64.encode() + b'", "novelty_threshold": NaN}', "holds NaN, which is not a number in JSON"),
        (b'["' + b64.encode() + b'"]', "The JSON body must be an object"),
        (b"[" * 100_000 + b"]" * 100_000, "nested too deeply"),
        (b"{" + b",".join(b'"k%d": 1' % i for i in range(1_000_000)) + b"}", "holds more entries than this endpoint"),
        (b'{"image": "' + b64.encode() + b'", "top_k": [' + b"1," * 100 + b"1]}", "holds more entries than"),
        (b"\xff\xfe\x00", "The body is not valid JSON"),
    ]:
        resp = client.post("/classify", content=body, headers={"content-type": "application/json"})
        assert resp.status_code == 400 and said in resp.json()["error"], (said, resp.text[:300])
    both = client.post("/classify?top_k=1", json={"image": b64, "top_k": 2})
    assert both.status_code == 400 and "in the query string and the body" in both.json()["error"]


def test_asgi_top_k_above_label_count_returns_all_labels(client):
    resp = post_image(client, BEE.read_bytes(), top_k="50")
    assert [p["label"] for p in resp.json()["predictions"]] == ["bees", "ants"]


def test_asgi_batch_answers_each_image(client):
    files = [
        ("images", ("a.jpg", BEE.read_bytes(), "image/jpeg")),
        ("images", ("b.jpg", ANT.read_bytes(), "image/jpeg")),
        ("images", ("c.jpg", b"broken", "image/jpeg")),
    ]
    resp = client.post("/classify_batch", files=files)
    assert resp.status_code == 200, resp.text
    items = resp.json()
    assert [i["predictions"][0]["label"] for i in items[:2]] == ["bees", "ants"]
    assert items[2]["predictions"] == [] and "not an image" in items[2]["error"]
    assert client.post("/classify_batch").status_code == 415


def test_asgi_info_health_and_openapi(client):
    info = client.post("/info").json()
    assert info["labels"] == ["ants", "bees"] and info["task"] == "classify"
    # the default runtime on a CPU: OpenVINO, in bf16 only because the export verified it, and only with bf16 units
    from headstart.service.cpu import cpu_info

    assert (info["runtime"], info["device"]) == ("openvino", "cpu")
    why = "check" if cpu_info().has_bf16 else "has no bf16 units"
    assert info["precision"] in ("fp32", "bf16") and why in info["precision_note"], info["precision_note"]

    # the CPU beside them: its kind decides the kernels (AMX, AVX-512 BF16, ...), and whether bf16 is possible at all
    assert info["cpu"]["kind"] == cpu_info().kind and info["cpu"]["cores"] >= 1
    assert info["precision"] == "fp32" or info["cpu"]["kind"] in ("AMX", "AVX-512 BF16")
    # the bundle's int8 file as the export made it (served or not): its weight bits, say
    assert info["variant"] == "fp32" and info["int8"]["weight_bits"] == 7 and info["int8"]["metric"] == "accuracy"
    assert client.get("/healthz").status_code == 200 and client.get("/readyz").status_code == 200
    spec = client.get("/docs.json").json()
    for route in ("/classify", "/classify_batch", "/info"):
        assert route in spec["paths"], route
    assert "multipart/form-data" in json.dumps(spec["paths"]["/classify"])


def test_the_openapi_document_shows_every_body_the_service_reads(client):
    """BentoML documents the multipart form only: the docs page and client generators knew nothing of the image as
    the body with its options in the query, nor of JSON with base64. The document now holds all three, and each
    way it describes is answered alike."""
    import base64

    got = client.get("/docs.json")
    spec = got.json()
    head = client.head("/docs.json")
    assert head.status_code == 200 and head.headers["content-length"] == got.headers["content-length"]
    assert head.content == b"" and int(got.headers["content-length"]) == len(got.content)
    classify = spec["paths"]["/classify"]["post"]
    content = classify["requestBody"]["content"]
    assert set(content) == {"multipart/form-data", "application/json", "image/*", "application/octet-stream"}
    body = content["application/json"]["schema"]
    assert body["required"] == ["image"] and body["properties"]["image"]["format"] == "byte"
    assert body["properties"]["top_k"] == {"type": "integer", "default": 5, "minimum": 1, "maximum": 1000}
    assert body["properties"]["novelty_threshold"]["nullable"]  # null: the default
    assert content["image/*"]["schema"] == {"type": "string", "format": "binary"}
    query = {p["name"]: p for p in classify["parameters"]}
    assert set(query) == {"top_k", "novelty_threshold", "label_threshold"}
    assert all(p["in"] == "query" and not p["required"] for p in query.values())
    assert query["top_k"]["schema"] == {"type": "integer", "default": 5, "minimum": 1, "maximum": 1000}
    assert query["novelty_threshold"]["schema"] == {"type": "number", "minimum": 0, "maximum": 2.0}  # absent: default
    batch = spec["paths"]["/classify_batch"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert batch["properties"]["images"]["type"] == "array" and batch["properties"]["images"]["maxItems"] == 32
    assert "parameters" not in spec["paths"]["/classify_batch"]["post"]
    localize = {p["name"] for p in spec["paths"]["/localize"]["post"]["parameters"]}
    assert localize == {"conf", "iou", "max_detections", "novelty_threshold", "boxes_if_unknown"}
    assert set(spec["paths"]["/info"]["post"]["requestBody"]["content"]) == {"application/json"}  # untouched
    assert "securitySchemes" not in spec.get("components", {}) and "security" not in classify  # no keys asked
    # each option's range, in the form, JSON and the query alike, and the service's own: each bound is answered, one
    # step past it is a 400 naming the option
    ant64 = base64.b64encode(ANT.read_bytes()).decode()
    checked = 0
    for route, item in spec["paths"].items():
        content = item.get("post", {}).get("requestBody", {}).get("content", {})
        if "image/*" not in content:
            continue
        form = content["multipart/form-data"]["schema"]["properties"]
        query = {p["name"]: p["schema"] for p in item["post"].get("parameters", [])}
        for option, schema in form.items():
            if "minimum" not in schema:
                continue
            assert content["application/json"]["schema"]["properties"][option]["minimum"] == schema["minimum"]
            assert query[option].get("maximum") == schema.get("maximum"), (route, option)
            step = 1 if schema["type"] == "integer" else 0.001
            bounds = [(schema["minimum"], True), (schema["minimum"] - step, False)]
            if "maximum" in schema:
                bounds += [(schema["maximum"], True), (schema["maximum"] + step, False)]
            for value, allowed in bounds:
                resp = client.post(route, json={"image": ant64, option: value})
                assert (resp.status_code == 200) == allowed, (route, option, value, resp.text[:200])
                assert allowed or resp.json()["field"] == option, (route, option, resp.text)
                checked += 1
    assert checked >= 40
    # in the OpenAPI 3.0 it declares (BentoML's own schemas held 2.0's "file" and 3.1's null type)
    assert spec["openapi"].startswith("3.0")

    def walk(node):
        if isinstance(node, dict):
            assert node.get("type") not in ("file", "null") and {"type": "null"} not in node.get("anyOf", []), node
            assert not ("default" in node and node["default"] is None and not node.get("nullable")), node
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(spec)
    # what it describes is what is served: the three ways, one answer
    ant = ANT.read_bytes()
    answers = [
        post_image(client, ant, top_k="1").json(),
        client.post("/classify?top_k=1", content=ant, headers={"content-type": "image/*"}).json(),
        client.post("/classify", json={"image": base64.b64encode(ant).decode(), "top_k": 1}).json(),
    ]
    assert answers[0] == answers[1] == answers[2] and len(answers[0]["predictions"]) == 1


# ---------------------------------------------------------------- a real `bentoml serve`


def test_served_classify_with_bentoml_client(server):
    import bentoml

    url, _, _ = server
    with bentoml.SyncHTTPClient(url) as client:
        result = client.classify(image=BEE, top_k=1)
        assert result["predictions"][0]["label"] == "bees"
        batch = client.classify_batch(images=[BEE, ANT])
        assert [b["predictions"][0]["label"] for b in batch] == ["bees", "ants"]
        assert client.info()["name"] == "ants-bees"


def test_served_bad_inputs_over_plain_http(server):
    url, proc, _ = server
    with httpx.Client(base_url=url, timeout=30) as http:
        for name, (data, ctype, message) in bad_images().items():
            resp = http.post("/classify", files={"image": ("x", data, ctype)})
            assert resp.status_code == 400 and message in resp.text, (name, resp.status_code, resp.text)
        for name, (data, ctype) in good_variants().items():
            resp = http.post("/classify", files={"image": ("x", data, ctype)}, data={"top_k": "1"})
            assert resp.status_code == 200, (name, resp.text)
        assert http.post("/classify").status_code == 415
        assert (
            http.post(
                "/classify", files={"image": ("x", BEE.read_bytes(), "image/jpeg")}, data={"top_k": "-3"}
            ).status_code
            == 400
        )
        big = http.post("/classify", content=b"\0" * (40 * 1024 * 1024), headers={"content-type": "image/jpeg"})
        assert big.status_code == 413
        assert http.get("/healthz").status_code == 200
        assert http.get("/readyz").status_code == 200
        metrics = http.get("/metrics")
        assert metrics.status_code == 200 and "bentoml_service_request" in metrics.text
    assert proc.poll() is None  # still running


def test_serve_refuses_a_tampered_bundle(hymenoptera_bundle, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(hymenoptera_bundle.bundle_dir, bad)
    data = bytearray((bad / "model.onnx").read_bytes())
    data[-100] ^= 0xFF
    (bad / "model.onnx").write_bytes(bytes(data))
    port, log = free_port(), tmp_path / "server.log"
    proc = start(str(bad), port, log)
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "does not match its manifest" in log.read_text()


def test_serve_without_openvino_refuses_it_by_name_and_auto_takes_onnxruntime(hymenoptera_bundle, tmp_path):
    """OpenVINO missing (simulated by a package that fails to import): HEADSTART_RUNTIME=openvino refuses to start
    with a message; auto serves on ONNX Runtime and says so in /info."""
    import httpx

    fake = tmp_path / "site" / "openvino"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('openvino is not installed (simulated)')\n")
    env = {"PYTHONPATH": f"{fake.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    log = tmp_path / "refused.log"
    proc = start(str(hymenoptera_bundle.bundle_dir), free_port(), log, HEADSTART_RUNTIME="openvino", **env)
    try:
        assert proc.wait(timeout=90) != 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "openvino package is not installed: pip install openvino" in log.read_text()
    with serving(str(hymenoptera_bundle.bundle_dir), tmp_path / "auto.log", **env) as (url, _, _):
        info = httpx.post(f"{url}/info", timeout=30).json()
    assert (info["runtime"], info["precision"], info["providers"]) == ("onnxruntime", "fp32", ["CPUExecutionProvider"])


def test_cuda_requested_without_gpu_fails_loudly(hymenoptera_bundle):
    from headstart.service.bundle import BundleError, available_providers, load_bundle

    if "CUDAExecutionProvider" in available_providers():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BundleError, match="GPU was requested"):
        load_bundle(hymenoptera_bundle.bundle_dir, device="cuda")


@pytest.fixture(scope="module")
def built_bento(hymenoptera_bundle, tmp_path_factory):
    """`bentoml build` with the real bundle, then `bentoml export` of the bento (model included) to an archive."""
    env = {**os.environ, "HEADSTART_MODEL": hymenoptera_bundle.tag}
    out = subprocess.run(
        [sys.executable, "-m", "bentoml", "build", "--output", "tag"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    tag = out.stdout.strip().splitlines()[-1].removeprefix("__tag__:")
    archive = tmp_path_factory.mktemp("bento") / "bento.bento"
    subprocess.run(
        [sys.executable, "-m", "bentoml", "export", tag, str(archive)],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        timeout=300,
    )
    return archive


def test_bentoml_build_packs_model_and_dockerfile(hymenoptera_bundle, built_bento):
    import tarfile

    archive = built_bento
    with tarfile.open(archive) as tar:
        names = set(tar.getnames())
        name, version = hymenoptera_bundle.tag.split(":")
        assert f"./models/{name}/{version}/model.onnx" in names
        assert "./env/docker/Dockerfile" in names
        requirements = tar.extractfile("./env/python/requirements.txt").read().decode()
    assert "onnxruntime" in requirements and "openvino" in requirements and "torch" not in requirements
    assert "ray" not in requirements  # batch prediction's extra stays out of the service
    assert not any(n.startswith("./src/training") or n.startswith("./src/models") for n in names)


def test_the_built_bento_serves_from_a_fresh_venv_holding_only_its_requirements(built_bento, tmp_path):
    """As a container would run it: the bento's own requirements in a new virtual environment (no torch, no project
    checkout on the path), `bentoml serve BENTO` answers /classify and /localize."""
    import tarfile

    import httpx

    from headstart.service.devserver import stop, wait_ready

    bento = tmp_path / "bento"
    with tarfile.open(built_bento) as tar:
        tar.extractall(bento, filter="data")
    venv, uv = tmp_path / "venv", Path(sys.executable).parent / "uv"
    subprocess.run([str(uv), "venv", "-q", "-p", sys._base_executable, str(venv)], check=True, timeout=120)
    install = subprocess.run(
        [
            str(uv),
            "pip",
            "install",
            "-q",
            "--python",
            str(venv / "bin" / "python"),
            "-r",
            str(bento / "env" / "python" / "requirements.txt"),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-2000:]
    assert subprocess.run([str(venv / "bin" / "python"), "-c", "import torch"], capture_output=True).returncode != 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/bin:/bin", "HOME": str(elsewhere), "BENTOML_HOME": str(elsewhere / "bentoml")}
    port, log = free_port(), tmp_path / "bento.log"
    proc = subprocess.Popen(
        [str(venv / "bin" / "bentoml"), "serve", str(bento), "--host", "127.0.0.1", "--port", str(port)],
        cwd=elsewhere,
        env=env,
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, log, timeout=120)
        files = {"image": ("bee.jpg", BEE.read_bytes())}
        answer = httpx.post(f"{url}/classify", files=files, data={"top_k": "1"}, timeout=30).json()
        assert answer["predictions"][0]["label"] == "bees"
        where = httpx.post(f"{url}/localize", files=files, timeout=30).json()
        assert where["method"] == "cam" and where["detections"][0]["label"] == "bees"
    finally:
        stop(proc)
