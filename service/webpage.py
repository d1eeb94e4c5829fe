"""A one-page web UI served by the service at ``/ui``: drop, paste or pick an image, see the top classes and the boxes,
"none of these" where the image is unlike every class, and the class activation heatmap on request.

Plain HTML and JavaScript, no build step and nothing fetched from elsewhere (the page works offline and inside a
container). It calls the service's own ``/info``, ``/localize`` and ``/heatmap``; the boxes are drawn over the image
as the browser shows it (EXIF-rotated, like the boxes the service returns).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
from pathlib import Path

from .guard import API_KEYS, ENDPOINTS, document_api_keys
from .localize import DEFAULTS
from .multipart import document_bodies
from .settings import SETTINGS

PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>headstart</title>
<link rel="icon" href="data:,">
<style>
  body { font-family: system-ui, sans-serif; margin: 0 auto; max-width: 60rem; padding: 1rem; color: #222; }
  h1 { font-size: 1.4rem; margin: 0 0 .25rem; }
  #model { color: #666; font-size: .9rem; margin-bottom: 1rem; }
  #auth { margin-bottom: 1rem; }
  #drop { display: block; border: 2px dashed #999; border-radius: .5rem; padding: 1.5rem; text-align: center;
          cursor: pointer; }
  #drop.over { border-color: #0a7; background: #efffe9; }
  #controls { margin: .75rem 0; display: flex; gap: 1rem; align-items: center; }
  #result { display: flex; gap: 1.5rem; flex-wrap: wrap; align-items: flex-start; }
  #stage { position: relative; display: inline-block; max-width: 100%; }
  #stage img { display: block; max-width: 100%; max-height: 70vh; }
  .box { position: absolute; border: 2px solid; box-sizing: border-box; pointer-events: none; }
  .box span { position: absolute; left: -2px; top: -1.3em; color: #fff; font-size: .75rem; padding: 0 .25em;
              white-space: nowrap; }
  #predictions { list-style: none; padding: 0; margin: 0; min-width: 14rem; }
  #predictions li { display: flex; justify-content: space-between; gap: 1rem; padding: .2rem 0;
                    border-bottom: 1px solid #eee; }
  #error { color: #b00; margin: .5rem 0; }
  #verdict { font-size: 1.1rem; margin: .5rem 0; }
  #verdict.unknown { color: #fff; background: #555; padding: .4rem .6rem; border-radius: .3rem; }
  #predictions.unknown { opacity: .5; }
</style>
</head>
<body>
<h1>headstart</h1>
<div id="model">loading model information…</div>
<div id="auth" hidden>This service asks for an API key:
  <input id="key" type="password" autocomplete="off" aria-label="API key">
  <button id="use-key" type="button">Use it</button></div>
<label id="drop" for="file">Drop an image here, paste one (Ctrl+V), or click to pick one
  <input id="file" type="file" accept="image/*" hidden>
</label>
<div id="controls">
  <label>confidence ≥ <input id="conf" type="range" min="0.05" max="0.95" step="0.05" value="@CONF@">
    <output id="conf-value">@CONF@</output></label>
  <label><input id="heat" type="checkbox"> heatmap</label>
  <span id="status"></span>
</div>
<div id="error" role="alert"></div>
<div id="verdict" role="status"></div>
<div id="result">
  <div id="stage"></div>
  <ol id="predictions"></ol>
</div>
<script>
"use strict";
const COLORS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46f0f0", "#f032e6", "#d2f53c",
                "#008080", "#aa6e28"];
const $ = (id) => document.getElementById(id);
let current = null;
let multilabel = false;  // /info's thresholds: every label at or above its own is in the answer

// HEADSTART_API_KEYS: the service answers 401 without a key; the page asks for one and keeps it for the tab
let key = sessionStorage.getItem("headstart-key") || "";
const withKey = (options) =>
  key ? { ...options, headers: { ...(options.headers || {}), Authorization: `Bearer ${key}` } } : options;
const keyAsked = (resp) => { if (resp.status === 401) $("auth").hidden = false; return resp; };

function loadInfo() {
  fetch("info", withKey({ method: "POST", headers: { "Content-Type": "application/json" }, body: "{}" }))
    .then(keyAsked).then(async (r) => {
    const info = await r.json();
    if (!r.ok) throw new Error(info.error || r.status);
    $("auth").hidden = true;
    multilabel = info.thresholds != null;
    const openSet = info.open_set ? ` · none of these above novelty ${info.open_set.threshold.toFixed(3)}` : "";
    $("model").textContent = `${info.name}:${info.version} · ${info.task} · ${info.labels.length} classes · ` +
      `${info.backbone} · ${info.providers.join(", ")}${openSet}`;
  }).catch((err) => { $("model").textContent = `model information unavailable: ${err.message}`; });
}
loadInfo();
$("use-key").addEventListener("click", () => {
  key = $("key").value.trim();
  sessionStorage.setItem("headstart-key", key);
  loadInfo();
  if (current) analyse(current);
});

async function analyse(file) {
  current = file;
  $("error").textContent = "";
  $("status").textContent = "analysing…";
  const form = new FormData();
  form.append("image", file, file.name || "image");
  form.append("conf", $("conf").value);
  let body;
  try {
    const resp = keyAsked(await fetch("localize", withKey({ method: "POST", body: form })));
    body = await resp.json();
    if (!resp.ok) {
      const message = Array.isArray(body) ? body.map((e) => e.error || e.msg).join("; ") : (body.error || resp.status);
      throw new Error(message);
    }
  } catch (err) {
    $("status").textContent = "";
    $("error").textContent = `The service could not analyse this file: ${err.message}`;
    return;
  }
  let picture = file;
  if ($("heat").checked) {
    const heatForm = new FormData();
    heatForm.append("image", file, file.name || "image");
    const resp = keyAsked(await fetch("heatmap", withKey({ method: "POST", body: heatForm })));
    if (resp.ok) picture = await resp.blob();
    else $("error").textContent = "No heatmap for this model or image.";
  }
  show(file, picture, body);
}

function verdict(body) {
  const el = $("verdict");
  const unknown = body.unknown === true;
  el.className = unknown ? "unknown" : "";
  $("predictions").className = unknown ? "unknown" : "";
  if (unknown) {
    el.textContent = `None of these: this image is unlike every class the model learned ` +
      `(novelty ${body.novelty.toFixed(2)} > ${body.novelty_threshold.toFixed(2)}). Closest classes, for reference:`;
  } else if (multilabel) {
    el.textContent = body.labels.length
      ? `Labels: ${body.labels.map((p) => `${p.label} ${(100 * p.score).toFixed(0)}%`).join(", ")}`
      : "None of the labels reaches its threshold. Scores, for reference:";
  } else if (body.unknown === false) {
    el.textContent = `${body.predictions[0].label} (novelty ${body.novelty.toFixed(2)}, ` +
      `within ${body.novelty_threshold.toFixed(2)})`;
  } else {
    el.textContent = "";
  }
}

function show(file, picture, body) {
  const stage = $("stage");
  stage.replaceChildren();
  const img = document.createElement("img");
  img.alt = file.name || "uploaded image";
  img.src = URL.createObjectURL(picture);
  stage.appendChild(img);
  verdict(body);
  const [w, h] = body.image_size;
  for (const det of body.detections) {
    const b = det.box;
    const div = document.createElement("div");
    div.className = "box";
    div.dataset.label = det.label;
    const color = COLORS[det.index % COLORS.length];
    div.style.borderColor = color;
    div.style.left = `${(100 * b.x1) / w}%`;
    div.style.top = `${(100 * b.y1) / h}%`;
    div.style.width = `${(100 * (b.x2 - b.x1)) / w}%`;
    div.style.height = `${(100 * (b.y2 - b.y1)) / h}%`;
    const tag = document.createElement("span");
    tag.style.background = color;
    tag.textContent = `${det.label} ${det.confidence.toFixed(2)}`;
    div.appendChild(tag);
    stage.appendChild(div);
  }
  const list = $("predictions");
  list.replaceChildren(...body.predictions.map((p) => {
    const li = document.createElement("li");
    li.className = "prediction";
    li.dataset.label = p.label;
    const name = document.createElement("span");
    name.textContent = p.label;
    const score = document.createElement("span");
    score.textContent = `${(100 * p.score).toFixed(1)}%`;
    li.append(name, score);
    return li;
  }));
  $("status").textContent = `${body.detections.length} box(es), method: ${body.method}`;
}

$("file").addEventListener("change", (e) => { if (e.target.files.length) analyse(e.target.files[0]); });
const drop = $("drop");
drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
drop.addEventListener("dragleave", () => drop.classList.remove("over"));
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  drop.classList.remove("over");
  if (e.dataTransfer.files.length) analyse(e.dataTransfer.files[0]);
});
document.addEventListener("paste", (e) => {  // a screenshot, or an image copied from another page
  const item = [...(e.clipboardData ? e.clipboardData.items : [])].find((i) => i.kind === "file");
  if (!item) return;
  e.preventDefault();
  analyse(item.getAsFile());
});
$("conf").addEventListener("input", () => { $("conf-value").textContent = $("conf").value; });
$("conf").addEventListener("change", () => { if (current) analyse(current); });
$("heat").addEventListener("change", () => { if (current) analyse(current); });
</script>
</body>
</html>
"""

PAGE_BYTES = PAGE.replace("@CONF@", f"{DEFAULTS.conf:g}").encode()  # the slider starts at the default


def _inline_hash(tag: str) -> str:
    """The CSP source (``'sha256-...'``) allowing the page's one inline ``tag`` element and nothing else."""
    text = PAGE_BYTES.decode()
    body = text[text.index(f"<{tag}>") + len(tag) + 2 : text.index(f"</{tag}>")]
    return "'sha256-" + base64.b64encode(hashlib.sha256(body.encode()).digest()).decode() + "'"


#: Headers on every answer: no MIME sniffing, no framing by other sites, no referrer sent elsewhere, and a content
#: security policy (BentoML's Swagger page at / needs its inline styles; /ui gets a stricter one below).
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
DEFAULT_CSP = (
    "default-src 'self'; img-src 'self' data: blob:; style-src 'self' 'unsafe-inline'; frame-ancestors 'none'; "
    "base-uri 'none'; form-action 'self'"
)
#: /ui: its own inline script and style (by hash), images from uploads (blob:), requests to this origin only.
PAGE_CSP = (
    f"default-src 'none'; script-src {_inline_hash('script')}; style-src {_inline_hash('style')}; "
    "img-src 'self' blob: data:; connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
)
#: BentoML's / page (Swagger UI) as it ships, but for the Google Tag Manager script and iframe it loads from
#: googletagmanager.com (HEADSTART_THIRD_PARTY_SCRIPTS=1 serves it unchanged).
_TAG_MANAGER = re.compile(
    r"<script>\(function\(w,d,s,l,i\).*?</script>|<!-- Google Tag Manager.*?-->|<noscript><iframe[^>]*googletagmanager"
    r".*?</noscript>",
    re.DOTALL,
)


def _index_page() -> bytes | None:
    """BentoML's / page without third-party scripts, or None to leave / to BentoML."""
    if SETTINGS.third_party_scripts:
        return None
    import _bentoml_impl.server

    page = (Path(_bentoml_impl.server.__file__).parent / "main-openapi.html").read_text()
    return _TAG_MANAGER.sub("", page).encode()


class WebPage:
    """ASGI middleware answering ``GET /ui`` with the page (and ``GET /`` with BentoML's page without its
    third-party script); security headers on every answer; everything else goes to the service."""

    def __init__(self, app) -> None:
        self.app = app
        self.index = _index_page()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path = scope.get("path")
        if path == "/docs" and scope.get("method") in ("GET", "HEAD"):  # the OpenAPI UI is BentoML's / page
            await self._respond(send, 308, b"", "text/plain; charset=utf-8", [(b"location", b"/")])
            return
        if path == "/info" and scope.get("method") == "GET":  # BentoML routes POST only: GET /info too
            await self._get_as_post(scope, receive, send)
            return
        if path == "/ui/":  # the page's links are relative to /ui
            await self._respond(send, 308, b"", "text/plain; charset=utf-8", [(b"location", b"/ui")])
            return
        if path == "/ui" or (path == "/" and self.index is not None):
            page, csp = (PAGE_BYTES, PAGE_CSP) if path == "/ui" else (self.index, DEFAULT_CSP)
            if scope.get("method") not in ("GET", "HEAD"):
                body = json.dumps({"error": f"Use GET {path}.", "field": None}).encode()
                await self._respond(send, 405, body, "application/json", [(b"allow", b"GET")])
                return
            body = page if scope.get("method") == "GET" else b""
            await self._respond(send, 200, body, "text/html; charset=utf-8", [], length=len(page), csp=csp)
            return

        if path == "/docs.json" and scope.get("method") in ("GET", "HEAD"):  # a HEAD's length is the GET's
            send = _documented(send, head=scope["method"] == "HEAD")
            scope = {**scope, "method": "GET"}

        async def secured(message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in _security(DEFAULT_CSP) if k not in names]
                message = {**message, "headers": [*message.get("headers", []), *extra]}
            await send(message)

        await self.app(scope, receive, secured)

    async def _get_as_post(self, scope, receive, send) -> None:
        """A GET of a route that takes no input, served as a POST with an empty body."""
        first = [{"type": "http.request", "body": b"", "more_body": False}]

        async def empty_then_client():
            return first.pop() if first else await receive()

        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() not in (b"content-type", b"content-length")]
        await self.__call__({**scope, "method": "POST", "headers": headers}, empty_then_client, send)

    @staticmethod
    async def _respond(
        send, status: int, body: bytes, ctype: str, extra: list, length: int | None = None, csp: str = DEFAULT_CSP
    ) -> None:
        headers = [
            (b"content-type", ctype.encode()),
            (b"content-length", str(len(body) if length is None else length).encode()),
            (b"cache-control", b"no-cache"),
            *_security(csp),
            *extra,
        ]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})


def _documented(send, head: bool = False):
    """``send`` for BentoML's OpenAPI document, which it completes with the bodies the guard reads besides the
    multipart form (:func:`document_bodies`) and, where the service asks for them, the API keys
    (:func:`document_api_keys`); any other answer (an error) goes on as it came."""
    held: dict = {"chunks": []}

    async def wrapped(message) -> None:
        if message["type"] == "http.response.start":
            held["start"] = message
            return
        if message["type"] != "http.response.body" or "start" not in held:
            await send(message)
            return
        held["chunks"].append(message.get("body", b""))
        if message.get("more_body", False):
            return
        start, body = held.pop("start"), b"".join(held.pop("chunks"))
        if start["status"] == 200:
            with contextlib.suppress(ValueError):
                spec = document_bodies(json.loads(body), ENDPOINTS.values())
                body = json.dumps(document_api_keys(spec) if API_KEYS else spec).encode()
        headers = [(k, v) for k, v in start.get("headers", []) if k.lower() != b"content-length"]
        await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if head else body})

    return wrapped


def _security(csp: str) -> list[tuple[bytes, bytes]]:
    return [*SECURITY_HEADERS, (b"content-security-policy", csp.encode())]
