"""The request gatekeeper: ASGI middleware in front of the BentoML app.

BentoML 1.4 has no request-size or field limits, answers 500 to malformed multipart bodies and to many odd fields
(more than 1000 parts, a number of thousands of digits, deeply nested brackets, a 245-byte file name), tries to
download the text of a file field as a URL, and picks a parser from a case-sensitive, first-of-duplicates Content-Type.
None of that reaches it. Here, before BentoML parses anything:

- framing headers are canonical: a duplicated Content-Type or Content-Length is refused (proxies and BentoML would
  disagree on which one counts); the media type is compared case-insensitively;
- framing is strict: ``Transfer-Encoding`` with ``Content-Length`` is refused (RFC 9112 §6.1: a proxy framing by
  length and this server framing by chunks would disagree); a ``Content-Type`` or ``Content-Length`` that is not
  printable ASCII is a 400 (service/connections.py marks it, and refuses tiny chunks before they reach here);
- a body must keep arriving: nothing for ``BODY_TIMEOUT_S`` (or the whole body not there within the request's
  timeout) is a 408, and the connection is closed. Bytes are counted as they arrive, not as declared: a client that
  declares 32 MiB and sends 120 bytes holds 120 bytes, for at most ``BODY_TIMEOUT_S``;
- load is shed once a body is in: at most ``MAX_CONCURRENCY`` requests to the model routes per worker, holding at
  most ``MAX_INFLIGHT_BYTES`` of bodies, else 503 with ``Retry-After``;
- every body is bounded (``MAX_REQUEST_BYTES``, chunked bodies included): 413;
- a model route takes multipart/form-data, with exactly the fields of :data:`ENDPOINTS`: files as uploaded files
  (any declared type: the bytes decide what an image is), other fields as short text, each at most as often as the
  endpoint takes it; or an image as the body itself (``image/*``, application/octet-stream). The text fields may
  come in the query string, within the same limits. What passes is rebuilt as a canonical body (our boundary, safe
  file names, no part headers but ours, the query's fields in it), so BentoML only ever sees what was vouched for;
- routes that take no input (``/info``) take an empty body (or ``{}``);
- every 4xx answer, the guard's and BentoML's and Starlette's, is ``{"error": message, "field": name or null}``
  (:func:`error_body`);
- each request gets a deadline and a disconnect flag (:func:`current_request`), so work queued for a client that has
  left or timed out is dropped instead of run.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import hmac
import json
import re
import time
from dataclasses import dataclass

from python_multipart.multipart import parse_options_header

from .inference import MAX_NOVELTY, MAX_TOP_K
from .localize import MAX_DETECTIONS
from .multipart import MAX_FIELD_BYTES, Endpoint, RequestRejected, canonical_multipart, parse_upload
from .settings import SETTINGS

__all__ = [
    "ENDPOINTS",
    "MAX_FIELD_BYTES",
    "Endpoint",
    "RequestGuard",
    "RequestRejected",
    "canonical_multipart",
    "current_request",
    "parse_upload",
]

# the limits (service/settings.py: HEADSTART_MAX_REQUEST_BYTES, ..._MAX_CONCURRENCY, ..._MAX_INFLIGHT_BYTES,
# ..._REQUEST_TIMEOUT, ..._MAX_BATCH_IMAGES)
#: Largest request body accepted, in bytes.
MAX_REQUEST_BYTES = SETTINGS.max_request_bytes
#: Requests to the model routes one worker holds at once (queued or running); more get 503 + Retry-After.
MAX_CONCURRENCY = SETTINGS.max_concurrency
#: Bytes of request bodies one worker holds at once; more get 503 + Retry-After.
MAX_INFLIGHT_BYTES = SETTINGS.max_inflight_bytes
#: Seconds a request may take in all (BentoML's traffic timeout uses the same figure); queued work past it is dropped.
REQUEST_TIMEOUT_S = SETTINGS.request_timeout
#: Images one /classify_batch request may carry (the server merges requests into batches of its own).
MAX_BATCH_IMAGES = SETTINGS.max_batch_images
#: Seconds a body may go without a byte arriving (HEADSTART_BODY_TIMEOUT): 408 and the connection closed.
BODY_TIMEOUT_S = SETTINGS.body_timeout
RETRY_AFTER_S = 1
CLOSE = ((b"connection", b"close"),)
#: The keys a request must carry where HEADSTART_API_KEYS names any (Authorization: Bearer KEY, or X-API-Key: KEY).
API_KEYS = SETTINGS.api_keys
#: What answers without a key: the probes and metrics an orchestrator reads, the docs, and the /ui page itself (its
#: calls to the model routes carry the key it asks for).
OPEN_PATHS = frozenset({"/livez", "/healthz", "/readyz", "/metrics", "/", "/docs", "/docs.json", "/schema.json", "/ui"})
OPEN_PREFIXES = ("/static_content/",)  # the docs page's scripts and styles


def is_open(path: str) -> bool:
    """Whether ``path`` answers without an API key (:data:`OPEN_PATHS`, :data:`OPEN_PREFIXES`)."""
    return path.rstrip("/") in OPEN_PATHS or path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


LOCALIZE_FIELDS = ("conf", "iou", "max_detections", "novelty_threshold", "boxes_if_unknown")
#: The options' ranges as the service checks them (service/inference.py, service/localize.py), for the OpenAPI
#: document; tests/test_service.py sends each bound and one step past it.
NOVELTY = ("novelty_threshold", 0, MAX_NOVELTY)
CLASSIFY_RANGES = (("top_k", 1, MAX_TOP_K), NOVELTY, ("label_threshold", 0, 1))
LOCALIZE_RANGES = (("conf", 0, 1), ("iou", 0, 1), ("max_detections", 1, MAX_DETECTIONS), NOVELTY)
#: Every API route of the service and its fields. tests/test_service.py checks that the service's own signatures
#: match this table, so adding a parameter to an endpoint cannot silently make the guard reject it.
ENDPOINTS: dict[str, Endpoint] = {
    e.route: e
    for e in (
        Endpoint("/classify", ("image",), ("top_k", "novelty_threshold", "label_threshold"), ranges=CLASSIFY_RANGES),
        Endpoint("/classify_batch", files=("images",), max_files=MAX_BATCH_IMAGES),
        Endpoint("/localize", files=("image",), fields=LOCALIZE_FIELDS, ranges=LOCALIZE_RANGES),
        Endpoint("/localize_image", files=("image",), fields=LOCALIZE_FIELDS, ranges=LOCALIZE_RANGES),
        Endpoint("/heatmap", ("image",), ("index", "novelty_threshold"), ranges=(("index", -1, None), NOVELTY)),
        Endpoint("/info"),
    )
}


def document_api_keys(spec: dict) -> dict:
    """The OpenAPI document of a service that asks for API keys: a bearer scheme, asked by every operation outside
    :data:`OPEN_PATHS`, with its 401. The docs page then has an Authorize button whose key its "Try it out" sends,
    and client generators take the key."""
    scheme = {
        "type": "http",
        "scheme": "bearer",
        "description": "One of the keys in HEADSTART_API_KEYS, as Authorization: Bearer KEY (or X-API-Key: KEY).",
    }
    spec.setdefault("components", {}).setdefault("securitySchemes", {})["apiKey"] = scheme
    for path, item in spec.get("paths", {}).items():
        if is_open(path):
            continue
        for operation in item.values():
            if isinstance(operation, dict) and "responses" in operation:
                operation["security"] = [{"apiKey": []}]
                operation["responses"].setdefault("401", {"description": "No API key, or not one of the service's."})
    return spec


@dataclass
class RequestState:
    """One admitted request, as the code that serves it can see it (:func:`current_request`)."""

    deadline: float
    disconnected: bool = False

    def abandoned(self) -> bool:
        """True once the client has left or the request's time is up: its result can no longer be delivered."""
        return self.disconnected or time.monotonic() > self.deadline


_CURRENT: contextvars.ContextVar[RequestState | None] = contextvars.ContextVar("headstart_request", default=None)


def current_request() -> RequestState | None:
    """The state of the request being served (``None`` outside a request, e.g. in a merged batch)."""
    return _CURRENT.get()


def _single_headers(scope) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    if scope.get("headstart.bad_header"):
        raise RequestRejected(
            400, f"The {scope['headstart.bad_header']} header holds bytes that are not printable ASCII; fix it."
        )
    for key, value in scope.get("headers", []):
        key = key.lower()
        if key in (b"content-type", b"content-length") and key in headers:
            raise RequestRejected(400, f"The request has more than one {key.decode().title()} header; send one.")
        headers[key] = value
    if b"transfer-encoding" in headers and b"content-length" in headers:
        raise RequestRejected(
            400,
            "The request has both Transfer-Encoding and Content-Length (RFC 9112 section 6.1); send one.",
            CLOSE,
        )
    return headers


_FIELD_FIRST = re.compile(r"^(\w+) must be ")


def cross_origin(origins: list[str]):
    """Starlette's CORS middleware for ``origins`` (HEADSTART_CORS_ORIGINS), whose refused preflight is the service's
    JSON 4xx (``{"error": ..., "field": null}``) naming what was refused, not Starlette's plain text "Disallowed CORS
    origin". Outermost, so the guard's refusals carry the CORS headers too."""
    from starlette.middleware.cors import CORSMiddleware
    from starlette.responses import JSONResponse

    class CrossOrigin(CORSMiddleware):
        def preflight_response(self, request_headers):
            answer = super().preflight_response(request_headers)
            if answer.status_code < 400:
                return answer
            what = answer.body.decode("utf-8", "replace").removeprefix("Disallowed CORS ").split(", ")
            why = {
                "origin": f"the origin {request_headers.get('origin')} is not one HEADSTART_CORS_ORIGINS names",
                "method": f"the method {request_headers.get('access-control-request-method')} is not GET or POST",
                "headers": "a header asked for is not allowed",
                "private-network": "requests from a public site to a private network are not allowed",
            }
            message = "Cross-origin request refused: " + "; ".join(why.get(w, w) for w in what) + "."
            headers = {k: v for k, v in answer.headers.items() if k.lower() not in ("content-length", "content-type")}
            return JSONResponse({"error": message, "field": None}, status_code=answer.status_code, headers=headers)

    options = {"allow_origins": origins, "allow_methods": ["GET", "POST"], "allow_headers": ["*"], "max_age": 600}
    return CrossOrigin, options


def error_body(raw: bytes, content_type: bytes, endpoint: Endpoint | None) -> bytes:
    """Any 4xx body BentoML or Starlette writes, as ``{"error": message, "field": name or null}``.

    BentoML answers an argument error as a one-element list (``[{"error": ...}]``), a validation error as
    ``{"error": "1 validation error for ...", "detail": [pydantic's errors, with URLs]}``, and Starlette a 404 or 405 as
    plain text. The field is the one pydantic names, the one a range check starts with ("top_k must be ..."), or, for
    an image that cannot be used, the endpoint's file field.
    """
    text = raw.decode("utf-8", "replace").strip()
    data = None
    if b"json" in content_type:
        with contextlib.suppress(ValueError):
            data = json.loads(text)
    if isinstance(data, list) and len(data) == 1 and isinstance(data[0], dict):
        data = data[0]
    field = None
    if isinstance(data, dict) and isinstance(data.get("detail"), list) and data["detail"]:
        first = data["detail"][0]
        names = [str(x) for x in first.get("loc", ()) if x not in ("body", "query")]
        field = names[0] if names else None
        message = f"{field}: {first.get('msg', 'invalid value')}" if field else str(first.get("msg", text))
    elif isinstance(data, dict) and "error" in data:
        message = str(data["error"])
        match = _FIELD_FIRST.match(message)
        if "field" in data:  # already in this shape (the guard's own answers)
            field = data["field"]
        elif match:
            field = match.group(1)
        elif endpoint is not None and endpoint.files and "image" in message.lower():
            field = endpoint.files[0]
    else:
        message = text or "Client error."
    return json.dumps({"error": message, "field": field}).encode()


def one_error_shape(send, endpoint: Endpoint | None):
    """``send`` with every 4xx answer rewritten by :func:`error_body` (they are small: held whole)."""
    held: dict = {}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start" and 400 <= message["status"] < 500:
            held["start"], held["body"] = message, b""
            return
        if "start" in held and message["type"] == "http.response.body":
            held["body"] += message.get("body", b"")
            if message.get("more_body"):
                return
            start = held.pop("start")
            headers = dict((k.lower(), v) for k, v in start.get("headers", []))
            body = error_body(held.pop("body"), headers.get(b"content-type", b""), endpoint)
            kept = [
                (k, v) for k, v in start.get("headers", []) if k.lower() not in (b"content-type", b"content-length")
            ]
            kept += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
            await send({**start, "headers": kept})
            await send({"type": "http.response.body", "body": body})
            return
        await send(message)

    return wrapped


class RequestGuard:
    def __init__(
        self,
        app,
        max_bytes: int = MAX_REQUEST_BYTES,
        max_concurrency: int = MAX_CONCURRENCY,
        max_inflight_bytes: int = MAX_INFLIGHT_BYTES,
        timeout: float = REQUEST_TIMEOUT_S,
        body_timeout: float = BODY_TIMEOUT_S,
        api_keys: tuple[str, ...] = API_KEYS,
    ) -> None:
        self.app = app
        self.api_keys = tuple(k.encode() for k in api_keys)
        self.body_timeout = body_timeout
        self.max_bytes = max_bytes
        self.max_concurrency = max_concurrency
        self.max_inflight_bytes = max_inflight_bytes
        self.timeout = timeout
        self.inflight = 0
        self.inflight_bytes = 0

    @staticmethod
    async def _reject(send, exc: RequestRejected) -> None:
        body = json.dumps({"error": exc.message, "field": exc.field}).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *exc.headers,
        ]
        await send({"type": "http.response.start", "status": exc.status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    def _check_key(self, scope) -> None:
        """RequestRejected (401) for a request without one of the API keys, where the service has any: before its
        body is read. Preflights (OPTIONS: browsers send no credentials on them), the probes, the docs and the /ui
        page pass. Every key is compared in constant time, whichever matches."""
        if not self.api_keys or scope.get("method") == "OPTIONS" or is_open(scope.get("path", "")):
            return
        given = []
        for name, value in scope.get("headers", []):
            name = name.lower()
            if name == b"authorization":
                scheme, _, credential = value.strip().partition(b" ")
                given.append(credential.strip() if scheme.lower() == b"bearer" else b"")
            elif name == b"x-api-key":
                given.append(value.strip())
        challenge = ((b"www-authenticate", b'Bearer realm="headstart"'),)
        if not given:
            raise RequestRejected(
                401,
                "This service needs an API key: send it as Authorization: Bearer KEY (or X-API-Key: KEY).",
                challenge,
            )
        if len(given) > 1:
            raise RequestRejected(
                401, "Send one API key (one Authorization or X-API-Key header), not several.", challenge
            )
        matched = False
        for key in self.api_keys:  # all compared, so that the time taken tells nothing about which
            matched |= hmac.compare_digest(given[0], key)
        if not matched:
            raise RequestRejected(
                401, "The API key is not one this service accepts (or is not a Bearer key).", challenge
            )

    def _too_large(self) -> RequestRejected:
        return RequestRejected(
            413,
            f"Request body larger than {self.max_bytes} bytes. Send smaller images (or fewer per request).",
            CLOSE,
        )

    def _busy(self, why: str) -> RequestRejected:
        return RequestRejected(
            503,
            f"The server is busy ({why}); retry in {RETRY_AFTER_S} s.",
            ((b"retry-after", str(RETRY_AFTER_S).encode()),),
        )

    def _reserve(self, size: int) -> None:
        if self.inflight_bytes + size > self.max_inflight_bytes:
            raise self._busy("too many request bytes in flight")
        self.inflight_bytes += size

    async def _read_body(self, scope, receive, reserved: list[int]) -> bytes:
        """The whole body, its bytes reserved against ``max_inflight_bytes`` as they arrive."""
        chunks, size = [], 0
        deadline = time.monotonic() + self.timeout
        while True:
            wait = min(self.body_timeout, deadline - time.monotonic())
            try:
                message = await asyncio.wait_for(receive(), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise RequestRejected(
                    408,
                    f"The request body stopped arriving ({size} bytes in; nothing for {wait:.0f} s). Send the whole "
                    "body at once.",
                    CLOSE,
                ) from None
            if message["type"] == "http.disconnect":
                raise RequestRejected(400, "The client disconnected before sending the whole body.", CLOSE)
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise self._too_large()
            if size > reserved[0]:
                self._reserve(size - reserved[0])
                reserved[0] = size
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint = ENDPOINTS.get(scope.get("path", "").rstrip("/"))
        if scope.get("method") != "HEAD":  # a HEAD answer has no body to rewrite
            send = one_error_shape(send, endpoint)
        try:
            self._check_key(scope)
            headers = _single_headers(scope)
            length = headers.get(b"content-length")
            if length is not None and not length.isdigit():
                raise RequestRejected(400, "The Content-Length header is not a number.")
            if length is not None and int(length) > self.max_bytes:
                raise self._too_large()
        except RequestRejected as exc:
            await self._reject(send, exc)
            return
        if scope.get("method") != "POST":
            await self.app(scope, receive, send)
            return
        heavy = endpoint is not None and endpoint.takes_input
        reserved = [0]
        admitted = False
        try:
            body = await self._read_body(scope, receive, reserved)
            if heavy:
                if self.inflight >= self.max_concurrency:
                    raise self._busy(f"{self.max_concurrency} requests in progress")
                self.inflight += 1
                admitted = True
            scope = self._canonical(scope, headers, body, endpoint)
            del body
            await self._serve(scope, receive, send)
        except RequestRejected as exc:
            await self._reject(send, exc)
        finally:
            self.inflight_bytes -= reserved[0]
            if admitted:
                self.inflight -= 1

    def _canonical(self, scope, headers: dict[bytes, bytes], body: bytes, endpoint: Endpoint | None) -> dict:
        """The scope (with the body under ``headstart.body``) that BentoML gets, or RequestRejected."""
        ctype = headers.get(b"content-type", b"")
        # (not an API route: the body goes on as it came, and BentoML answers 404/405 without reading it)
        if endpoint is not None and endpoint.takes_input:  # the query's fields go into the body: BentoML reads those
            query, scope = scope.get("query_string", b""), {**scope, "query_string": b""}
            ctype, body = canonical_multipart(parse_upload(ctype, body, endpoint, query))
        elif endpoint is not None:
            if body.strip() not in (b"", b"{}"):
                media = parse_options_header(ctype)[0].lower()
                if media != b"multipart/form-data" or parse_upload(ctype, body, endpoint):
                    raise RequestRejected(400, f"{endpoint.route} takes no input; send an empty body.")
            ctype, body = b"application/json", b"{}"
        kept = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        kept += [(b"content-type", ctype), (b"content-length", str(len(body)).encode())]
        return {**scope, "headers": kept, "headstart.body": body}

    async def _serve(self, scope, receive, send) -> None:
        """Run the app on the canonical body, with the request's state set and the client watched for leaving.

        The body is handed over once and not kept here: a waiting request holds no second copy.
        """
        state = RequestState(deadline=time.monotonic() + self.timeout)
        token = _CURRENT.set(state)
        pending: list[bytes] = [scope.pop("headstart.body")]

        async def watch():
            message = await receive()
            if message["type"] == "http.disconnect":
                state.disconnected = True
            return message

        async def replay():
            if pending:
                return {"type": "http.request", "body": pending.pop(), "more_body": False}
            return await asyncio.shield(watcher)  # after the body, the next message is the client leaving

        watcher = asyncio.ensure_future(watch())
        try:
            await self.app(scope, replay, send)
        finally:
            _CURRENT.reset(token)
            if not watcher.done():
                watcher.cancel()
