"""The request gatekeeper on its own, in front of a stand-in app: canonical headers and bodies, limits, load shedding,
abandoned requests. (The same cases against a real `bentoml serve`: tests/test_reliability.py.)"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re

import pytest

from headstart.service.guard import (
    ENDPOINTS,
    MAX_BATCH_IMAGES,
    MAX_FIELD_BYTES,
    RequestGuard,
    RequestRejected,
    current_request,
    parse_upload,
)

from .bad_requests import BOUNDARY, raw_multipart

JPEG = b"\xff\xd8\xff\xe0 pretend jpeg bytes"
MULTIPART = f"multipart/form-data; boundary={BOUNDARY}".encode()


class Recorder:
    """An ASGI app that records what reached it and answers 200 (optionally after waiting for ``release``)."""

    def __init__(self) -> None:
        self.seen: list[tuple[dict, bytes]] = []
        self.states = []
        self.release: asyncio.Event | None = None

    async def __call__(self, scope, receive, send) -> None:
        message = await receive()
        self.states.append(current_request())
        self.seen.append((dict(scope["headers"]), message.get("body", b"")))
        if self.release is not None and scope["path"] != "/info":  # /info answers at once
            await self.release.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def call(guard, path: str, body: bytes, headers: list[tuple[bytes, bytes]], chunks: int = 1, method: str = "POST"):
    """Send one request through ``guard``; returns (status, headers, body)."""
    return run(_call(guard, path, body, headers, chunks, method))


def run(coro):
    """Run a scenario, failing (not hanging) if it has not finished in 10 s."""
    return asyncio.run(asyncio.wait_for(coro, 10))


async def _call(guard, path, body, headers, chunks=1, method="POST", disconnect: asyncio.Event | None = None):
    size = max(1, -(-len(body) // chunks))
    pieces = [body[i : i + size] for i in range(0, len(body), size)] or [b""]
    messages = [{"type": "http.request", "body": p, "more_body": i < len(pieces) - 1} for i, p in enumerate(pieces)]
    sent: list[dict] = []

    async def receive():
        if messages:
            return messages.pop(0)
        if disconnect is not None:
            await disconnect.wait()
        else:
            await asyncio.Event().wait()  # a client that stays connected
        return {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": headers}
    await guard(scope, receive, send)
    start = sent[0]
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def upload(parts, ctype: bytes = MULTIPART, path: str = "/classify", guard=None, chunks: int = 1):
    app = Recorder()
    status, headers, body = call(
        guard or RequestGuard(app), path, raw_multipart(parts), [(b"content-type", ctype)], chunks
    )
    return status, body, app


def test_an_image_declared_as_octet_stream_or_untyped_reaches_the_service_as_a_file():
    for ctype in ("application/octet-stream", None, "text/plain"):
        status, _, app = upload([("image", "photo", JPEG, ctype)])
        assert status == 200
        headers, body = app.seen[0]
        assert b'name="image"; filename="upload"' in body and JPEG in body


def test_the_body_is_rebuilt_with_our_boundary_and_safe_file_names():
    name = "蜜蜂の写真" * 30 + ".jpg"  # 450 bytes of UTF-8: BentoML put it in a temporary file's name
    status, _, app = upload([("image", name, JPEG, "image/jpeg"), ("top_k", None, b"3", None)])
    assert status == 200
    headers, body = app.seen[0]
    ctype = headers[b"content-type"]
    assert ctype.startswith(b"multipart/form-data; boundary=headstart-")
    assert headers[b"content-length"] == str(len(body)).encode()
    assert BOUNDARY.encode() not in body and "蜜蜂".encode() not in body
    parts = parse_upload(ctype, body, ENDPOINTS["/classify"])
    assert parts == [("image", b"upload", JPEG), ("top_k", None, b"3")]


def test_media_type_is_case_insensitive_and_canonicalised():
    status, _, app = upload(
        [("image", "a.jpg", JPEG, None)], ctype=f"Multipart/Form-Data; boundary={BOUNDARY}".encode()
    )
    assert status == 200
    assert app.seen[0][0][b"content-type"].startswith(b"multipart/form-data; boundary=")


@pytest.mark.parametrize("header", [b"content-type", b"content-length"])
def test_a_duplicated_framing_header_is_refused(header):
    app = Recorder()
    body = raw_multipart([("image", "a.jpg", JPEG, None)])
    value = MULTIPART if header == b"content-type" else str(len(body)).encode()
    headers = [
        (b"content-type", MULTIPART),
        (header, value),
        (header, b"text/plain" if header == b"content-type" else b"1"),
    ]
    status, _, text = call(RequestGuard(app), "/classify", body, headers)
    assert status == 400 and b"more than one" in text
    assert not app.seen


@pytest.mark.parametrize(
    ("parts", "message"),
    [
        ([("image", "a.jpg", JPEG, None)] * 2, b"more than 1 time"),
        ([("image", "a.jpg", JPEG, None), *[("top_k", None, b"1", None)] * 1001], b"more than 1 time"),
        ([("image", "a.jpg", JPEG, None), ("top_k", None, b"1" * 5000, None)], b"longer than 64 bytes"),
        ([("image", "a.jpg", JPEG, None), ("top_k", None, b"[" * 100_000, None)], b"longer than 64 bytes"),
        ([("image", "a.jpg", JPEG, None), ("top_k", None, b"x" * (2 << 20), None)], b"longer than 64 bytes"),
        ([("image", "a.jpg", JPEG, None), ("top_k", None, b"\xff\xfe", None)], b"not UTF-8"),
        ([("image", None, b"http://169.254.169.254/latest", None)], b"must be an uploaded file"),
        ([("top_k", None, b"3", None)], b"'image' is missing"),
        ([("image", "a.jpg", JPEG, None), ("picture", "b.jpg", JPEG, None)], b"Unknown field"),
    ],
    ids=[
        "image-twice",
        "1002-parts",
        "long-number",
        "nested-brackets",
        "1-MiB-text",
        "binary-text",
        "url",
        "missing",
        "unknown-field",
    ],
)
def test_fields_are_refused_beyond_what_the_endpoint_takes(parts, message):
    status, text, app = upload(parts)
    assert status == 400, text
    assert message in text
    assert not app.seen


def test_a_batch_takes_at_most_the_stated_number_of_images():
    ok = [("images", f"{i}.jpg", JPEG, None) for i in range(MAX_BATCH_IMAGES)]
    assert upload(ok, path="/classify_batch")[0] == 200
    status, text, _ = upload([*ok, ok[0]], path="/classify_batch")
    assert status == 400 and f"at most {MAX_BATCH_IMAGES} images".encode() in text


def test_part_headers_are_bounded():
    head = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="a"\r\nX-Pad: {"p" * 10_000}\r\n'
    body = f"{head}\r\nx\r\n--{BOUNDARY}--\r\n"
    status, _, text = call(RequestGuard(Recorder()), "/classify", body.encode(), [(b"content-type", MULTIPART)])
    assert status == 400 and b"header size" in text


def test_a_chunked_body_over_the_limit_is_413_on_every_route():
    for path in ("/info", "/classify", "/nowhere"):
        app = Recorder()
        status, _, text = call(RequestGuard(app, max_bytes=1000), path, b"{" + b" " * 5000 + b"}", [], chunks=10)
        assert status == 413 and b"larger than 1000 bytes" in text, path
        assert not app.seen


def test_routes_without_input_take_an_empty_body_only():
    for body, status in [(b"", 200), (b"{}", 200), (b'{"x": 1}', 400), (b"[" * 10_000, 400)]:
        app = Recorder()
        got, _, text = call(RequestGuard(app), "/info", body, [(b"content-type", b"application/json")])
        assert got == status, (body[:20], text)
        if status == 200:
            assert app.seen[0][1] == b"{}"


def test_over_the_concurrency_limit_requests_get_503_with_retry_after_once_their_body_is_in():
    async def scenario():
        app = Recorder()
        app.release = asyncio.Event()
        guard = RequestGuard(app, max_concurrency=2)
        body = raw_multipart([("image", "a.jpg", JPEG, None)])
        headers = [(b"content-type", MULTIPART)]
        held = [asyncio.ensure_future(_call(guard, "/classify", body, headers)) for _ in range(2)]
        while len(app.seen) < 2:
            await asyncio.sleep(0.001)
        status, resp_headers, text = await _call(guard, "/classify", body, headers)
        info = await _call(guard, "/info", b"", [])  # routes without input are not counted
        app.release.set()
        done = [await h for h in held]
        after = await _call(guard, "/classify", body, headers)
        return (
            status,
            resp_headers,
            text,
            info[0],
            [d[0] for d in done],
            after[0],
            guard.inflight,
            guard.inflight_bytes,
        )

    status, headers, text, info, done, after, inflight, inflight_bytes = run(scenario())
    assert status == 503 and headers[b"retry-after"] == b"1" and b"busy" in text
    assert info == 200 and done == [200, 200] and after == 200
    assert inflight == 0 and inflight_bytes == 0


async def _stalled(guard, path: str, body: bytes, headers, scope_extra: dict | None = None):
    """A request whose body stops after its first half: the client stays connected and sends nothing more."""
    sent: list[dict] = []
    messages = [{"type": "http.request", "body": body[: len(body) // 2], "more_body": True}]

    async def receive():
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": headers, **(scope_extra or {})}
    await guard(scope, receive, send)
    return sent[0]["status"], dict(sent[0]["headers"]), b"".join(m.get("body", b"") for m in sent[1:])


def test_a_body_that_stops_arriving_is_a_408_and_holds_no_slot_meanwhile():
    """Bytes are counted as they arrive and a request is admitted once its body is in: a client that declares a
    large body and stalls holds neither a concurrency slot nor its declared bytes, and gets 408 (connection closed)
    at the body deadline."""

    async def scenario():
        guard = RequestGuard(Recorder(), max_concurrency=1, max_inflight_bytes=10_000, body_timeout=0.3)
        body = raw_multipart([("image", "a.jpg", JPEG, None)])
        declared = [(b"content-type", MULTIPART), (b"content-length", b"9000")]
        stalled = [asyncio.ensure_future(_stalled(guard, "/classify", body, declared)) for _ in range(5)]
        await asyncio.sleep(0.05)
        served = await _call(guard, "/classify", body, [(b"content-type", MULTIPART)])
        return served[0], [await s for s in stalled], guard.inflight, guard.inflight_bytes

    served, stalled, inflight, inflight_bytes = run(scenario())
    assert served == 200
    for status, headers, text in stalled:
        assert status == 408 and headers[b"connection"] == b"close" and b"stopped arriving" in text
    assert inflight == 0 and inflight_bytes == 0


@pytest.mark.parametrize(
    ("headers", "extra", "status", "message"),
    [
        ([(b"transfer-encoding", b"chunked"), (b"content-length", b"10")], {}, 400, b"Transfer-Encoding and Content"),
        ([(b"content-length", b"10")], {"headstart.bad_header": "Content-Type"}, 400, b"not printable ASCII"),
    ],
    ids=["te-and-cl", "non-ascii-content-type"],
)
def test_ambiguous_or_undecodable_framing_is_refused(headers, extra, status, message):
    body = raw_multipart([("image", "a.jpg", JPEG, None)])
    scope = {"type": "http", "method": "POST", "path": "/classify", "headers": [(b"content-type", MULTIPART), *headers]}
    sent = []

    async def receive():
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message):
        sent.append(message)

    run(RequestGuard(Recorder())({**scope, **extra}, receive, send))
    assert sent[0]["status"] == status and message in sent[1]["body"]


def test_a_chunked_body_of_tiny_chunks_is_refused_at_the_chunk_that_crosses_the_line():
    """h11 parses chunks in Python: the connection refuses (RemoteProtocolError, which uvicorn answers with a 400 and
    a close) once a body has more than 64 chunks beyond one per KB of payload; 8 KB chunks pass."""
    import h11

    from headstart.service.connections import bound_chunks

    def feed(chunk: int, total: int) -> tuple[int, list[str]]:
        conn, refused = h11.Connection(h11.SERVER), []
        bound_chunks(conn, refused)
        head = b"POST /classify HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        body = b"".join(b"%x\r\n" % chunk + b"x" * chunk + b"\r\n" for _ in range(total // chunk)) + b"0\r\n\r\n"
        conn.receive_data(head + body)
        payload = 0
        with contextlib.suppress(h11.RemoteProtocolError):
            while (event := conn.next_event()) is not h11.NEED_DATA and not isinstance(event, h11.EndOfMessage):
                payload += len(getattr(event, "data", b""))
        return payload, refused

    payload, refused = feed(1, 100_000)
    assert refused and "too small" in refused[0] and payload <= 200, (payload, refused)
    payload, refused = feed(8192, 1 << 20)
    assert payload == 1 << 20 and not refused


def test_bodies_in_flight_are_bounded_in_bytes():
    app = Recorder()
    guard = RequestGuard(app, max_inflight_bytes=1000)
    body = raw_multipart([("image", "a.jpg", b"x" * 2000, None)])
    for headers, chunks in (([(b"content-length", str(len(body)).encode())], 1), ([], 4)):
        status, resp_headers, text = call(guard, "/classify", body, [(b"content-type", MULTIPART), *headers], chunks)
        assert status == 503 and resp_headers[b"retry-after"] == b"1", text
    assert guard.inflight_bytes == 0 and guard.inflight == 0


def test_the_request_state_tells_when_the_client_has_left_or_time_is_up():
    async def scenario():
        app = Recorder()
        app.release = asyncio.Event()
        left = asyncio.Event()
        guard = RequestGuard(app, timeout=60)
        body = raw_multipart([("image", "a.jpg", JPEG, None)])
        task = asyncio.ensure_future(_call(guard, "/classify", body, [(b"content-type", MULTIPART)], disconnect=left))
        while not app.states:
            await asyncio.sleep(0.001)
        state = app.states[0]
        before = state.abandoned()
        left.set()
        await asyncio.sleep(0.01)
        after = state.abandoned()
        app.release.set()
        await task
        short = RequestGuard(Recorder(), timeout=-1)
        await _call(short, "/classify", body, [(b"content-type", MULTIPART)])
        return before, after, short.app.states[0].abandoned()

    before, after, timed_out = run(scenario())
    assert before is False and after is True and timed_out is True
    assert current_request() is None


def test_rejections_are_json_with_an_error_message():
    status, text, _ = upload([("top_k", None, b"3", None)])
    assert status == 400 and "error" in json.loads(text)


def test_the_parser_refuses_what_is_not_a_form_an_image_or_json():
    for ctype in (b"text/plain", b"application/x-www-form-urlencoded", b"application/xml", b""):
        with pytest.raises(RequestRejected) as err:
            parse_upload(ctype, b"image=x", ENDPOINTS["/classify"])
        assert err.value.status == 415 and 'as JSON with the file in base64 ({"image": ' in err.value.message
    with pytest.raises(RequestRejected) as err:
        parse_upload(b"application/json", b"{}", ENDPOINTS["/classify"])
    assert err.value.status == 400 and "Field 'image' is missing or empty" in err.value.message
    parts = parse_upload(b"application/vnd.api+json", b'{"images": ["aGk=", "aGk"]}', ENDPOINTS["/classify_batch"])
    assert parts == [("images", b"upload", b"hi"), ("images", b"upload", b"hi")]
    assert MAX_FIELD_BYTES == 64


def test_every_client_error_body_becomes_one_shape():
    """BentoML's one-element list, its pydantic validation error, Starlette's plain-text 404 and the guard's own
    answers all become {"error": message, "field": name or null}."""
    from headstart.service.guard import error_body

    classify = ENDPOINTS["/classify"]
    cases = [
        (b'[{"error": "top_k must be between 1 and 1000, got 0."}]', b"application/json", classify, "top_k"),
        (b'[{"error": "The image is empty (0 bytes)."}]', b"application/json", classify, "image"),
        (
            b'{"error": "1 validation error for Input", "detail": [{"loc": ["body", "top_k"], "msg": "Input should '
            b'be a valid integer", "url": "https://errors.pydantic.dev"}]}',
            b"application/json",
            classify,
            "top_k",
        ),
        (b"Not Found", b"text/plain; charset=utf-8", None, None),
        (
            b'{"error": "Unknown field \'x\'; this endpoint takes image, top_k", "field": "x"}',
            b"application/json",
            classify,
            "x",
        ),
    ]
    for raw, ctype, endpoint, field in cases:
        body = json.loads(error_body(raw, ctype, endpoint))
        assert set(body) == {"error", "field"} and body["field"] == field and body["error"], (raw, body)
        assert "pydantic.dev" not in body["error"]


# ---------------------------------------------------------------- API keys (HEADSTART_API_KEYS)

KEY = "k" * 8 + "0123456789abcdef"


def keyed(path: str, headers: list[tuple[bytes, bytes]], method: str = "POST", body: bytes | None = None):
    """One request through a guard that asks for KEY; returns (status, headers, body, what reached the app)."""
    app = Recorder()
    guard = RequestGuard(app, api_keys=("another-key-0123456789", KEY))
    body = raw_multipart([("image", "a.jpg", JPEG, None)]) if body is None else body
    status, answer_headers, text = call(guard, path, body, [(b"content-type", MULTIPART), *headers], method=method)
    return status, answer_headers, text, app.seen


@pytest.mark.parametrize(
    ("headers", "said"),
    [
        ([], "This service needs an API key: send it as Authorization: Bearer KEY (or X-API-Key: KEY)."),
        ([(b"authorization", b"Bearer wrong-key-0123456789")], "The API key is not one this service accepts"),
        ([(b"authorization", f"Basic {KEY}".encode())], "The API key is not one this service accepts"),
        ([(b"x-api-key", KEY.encode()), (b"x-api-key", KEY.encode())], "Send one API key"),
        ([(b"x-api-key", KEY[:-1].encode())], "The API key is not one this service accepts"),
    ],
    ids=["none", "wrong", "basic", "two", "short-by-one"],
)
def test_a_request_without_a_right_key_is_a_401_before_its_body_is_read(headers, said):
    status, answer_headers, text, seen = keyed("/classify", headers)
    assert status == 401 and json.loads(text) == {"error": json.loads(text)["error"], "field": None}
    assert json.loads(text)["error"].startswith(said) and not seen
    assert answer_headers[b"www-authenticate"] == b'Bearer realm="headstart"'
    assert KEY not in text.decode()  # a key is never said back


@pytest.mark.parametrize(
    "headers",
    [
        [(b"authorization", f"Bearer {KEY}".encode())],
        [(b"authorization", f"bearer  {KEY} ".encode())],
        [(b"x-api-key", KEY.encode())],
    ],
    ids=["bearer", "bearer-case-and-spaces", "x-api-key"],
)
def test_either_header_with_any_of_the_keys_passes(headers):
    status, _, _, seen = keyed("/classify", headers)
    assert status == 200 and len(seen) == 1


OPEN = ["/readyz", "/livez", "/healthz", "/metrics", "/ui", "/docs.json", "/", "/static_content/x.js"]


@pytest.mark.parametrize("path", OPEN)
def test_probes_metrics_docs_and_the_page_stay_open_with_keys(path):
    status, _, _, seen = keyed(path, [], method="GET", body=b"")
    assert status == 200 and len(seen) == 1
    assert keyed("/info", [], method="GET", body=b"")[0] == 401  # the model's description is not
    assert keyed("/classify", [], method="OPTIONS", body=b"")[0] == 200  # a browser's preflight carries no key


def test_api_keys_too_short_or_unfit_for_a_header_stop_the_service():
    from headstart.service.settings import Settings, SettingsError

    assert Settings.from_env({"HEADSTART_API_KEYS": f" {KEY} , {KEY[::-1]} "}).api_keys == (KEY, KEY[::-1])
    with pytest.raises(SettingsError, match="key 2 of 2 has 5 characters, too few") as caught:
        Settings.from_env({"HEADSTART_API_KEYS": f"{KEY},short"})
    assert "short" not in str(caught.value)
    with pytest.raises(SettingsError, match="key 1 of 1 holds a space"):
        Settings.from_env({"HEADSTART_API_KEYS": "a key with spaces in it"})
    assert Settings.from_env({}).api_keys == ()


def test_api_keys_from_a_file_as_docker_and_kubernetes_mount_secrets(tmp_path):
    """HEADSTART_API_KEYS_FILE: the keys of a secret mounted as a file (one per line, # comments), asked with those
    of HEADSTART_API_KEYS, each once; a file missing, empty or holding a short key stops the service, saying which
    file and never the key."""
    from headstart.service.settings import Settings, SettingsError

    secret = tmp_path / "headstart-keys"
    secret.write_text(f"# rotated 2026-12\n{KEY}\n\n{KEY[::-1]}  # the next one\nkey#with-a-hash-inside\n")
    keys = (KEY, KEY[::-1], "key#with-a-hash-inside")  # a # in a key is part of it, not a comment
    assert Settings.from_env({"HEADSTART_API_KEYS_FILE": str(secret)}).api_keys == keys
    both = Settings.from_env({"HEADSTART_API_KEYS": f"{KEY},{'z' * 20}", "HEADSTART_API_KEYS_FILE": str(secret)})
    assert both.api_keys == (KEY, "z" * 20, KEY[::-1], "key#with-a-hash-inside")
    guard = RequestGuard(None, api_keys=both.api_keys)
    for key in both.api_keys:
        guard._check_key({"path": "/classify", "method": "POST", "headers": [(b"x-api-key", key.encode())]})
    cases = [
        (tmp_path / "missing", None, "cannot be read (No such file or directory)"),
        (tmp_path / "empty", "\n# nothing yet\n", "holds no key"),
        (tmp_path / "short", "tooshort\n", "HEADSTART_API_KEYS_FILE: key 1 of 1 has 8 characters"),
        (tmp_path / "latin1", None, "cannot be read (not UTF-8 text)"),
    ]
    (tmp_path / "latin1").write_bytes(b"caf\xe9-key-0123456789\n")
    for path, text, said in cases:
        if text is not None:
            path.write_text(text)
        with pytest.raises(SettingsError, match=re.escape(said)) as caught:
            Settings.from_env({"HEADSTART_API_KEYS_FILE": str(path)})
        assert "tooshort" not in str(caught.value)
