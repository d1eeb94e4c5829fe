"""Hand-made hostile requests: each must get a 4xx with a message, and the server must stay healthy."""

from __future__ import annotations

import base64

from .images import BEE, bad_images, hostile_images

JPEG = BEE.read_bytes()
BOUNDARY = "b0undary"


def raw_multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    """parts: (field name, filename or None, payload, content type or None)."""
    out = b""
    for name, filename, payload, ctype in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename is not None else "")
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def raw_request(path: str, headers: list[str], body: bytes) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: x\r\n".encode() + "".join(h + "\r\n" for h in headers).encode() + b"\r\n" + body
    )


def chunked(body: bytes, size: int = 1 << 20) -> bytes:
    out = b"".join(
        f"{len(body[i : i + size]):x}\r\n".encode() + body[i : i + size] + b"\r\n" for i in range(0, len(body), size)
    )
    return out + b"0\r\n\r\n"


def field_tricks() -> list[tuple[str, str, str, dict, int | None]]:
    """Requests that reached BentoML's own parsing and got a 500 before the gatekeeper refused them."""
    image = ("image", "a.jpg", JPEG, "image/jpeg")
    two_types = raw_multipart([("image", None, b"http://127.0.0.1:1/x", None)])
    return [
        ("duplicated-content-type", "RAW", "/classify", {"raw": raw_request("/classify", [f"Content-Type: multipart/form-data; boundary={BOUNDARY}", "Content-Type: text/plain", f"Content-Length: {len(two_types)}"], two_types)}, 400),
        ("1002-parts", "POST", "/classify", {"content": raw_multipart([image, *[("top_k", None, b"1", None)] * 1001]), "headers": MULTIPART}, 400),
        ("1002-images", "POST", "/classify_batch", {"content": raw_multipart([("images", f"{i}.jpg", b"x", None) for i in range(1002)]), "headers": MULTIPART}, 400),
        ("text-field-1MiB", "POST", "/classify", {"content": raw_multipart([image, ("top_k", None, b"1" * (1 << 20), None)]), "headers": MULTIPART}, 400),
        ("number-5000-digits", "POST", "/localize", {"content": raw_multipart([image, ("max_detections", None, b"9" * 5000, None)]), "headers": MULTIPART}, 400),
        ("nested-brackets", "POST", "/localize", {"content": raw_multipart([image, ("conf", None, b"[" * 50_000, None)]), "headers": MULTIPART}, 400),
        ("short-nested-brackets", "POST", "/localize", {"content": raw_multipart([image, ("conf", None, b"[" * 60, None)]), "headers": MULTIPART}, 400),
        ("conf-nan", "POST", "/localize", {"content": raw_multipart([image, ("conf", None, b"NaN", None)]), "headers": MULTIPART}, 400),
        ("conf-infinity", "POST", "/localize", {"content": raw_multipart([image, ("conf", None, b"1e999", None)]), "headers": MULTIPART}, 400),
        ("binary-text-field", "POST", "/classify", {"content": raw_multipart([image, ("top_k", None, b"\xff\xfe\x00", None)]), "headers": MULTIPART}, 400),
        ("chunked-oversize-info", "RAW", "/info", {"raw": raw_request("/info", ["Transfer-Encoding: chunked", "Content-Type: application/json"], chunked(b"{" + b" " * (33 << 20) + b"}"))}, 413),
        ("chunked-oversize-classify", "RAW", "/classify", {"raw": raw_request("/classify", ["Transfer-Encoding: chunked", f"Content-Type: multipart/form-data; boundary={BOUNDARY}"], chunked(b"\0" * (33 << 20)))}, 413),
        ("info-with-json-body", "POST", "/info", {"json": {"labels": ["x"] * 10}}, 400),
        ("info-deep-json", "POST", "/info", {"content": b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400),
    ]  # fmt: skip


def corpus() -> list[tuple[str, str, str, dict, int | None]]:
    """(name, method, path, httpx request kwargs, expected status). Method RAW sends ``kwargs["raw"]`` over a plain
    socket (for requests no HTTP client will send); status None means the client hangs up and no answer is due."""
    cases: list[tuple[str, str, str, dict, int]] = []
    for name, (data, ctype, _) in bad_images().items():
        cases.append((f"image-{name}", "POST", "/classify", {"files": {"image": ("x", data, ctype)}}, 400))
    for name, (data, ctype, _) in hostile_images().items():
        for route in ("/classify", "/localize_image"):
            cases.append((f"hostile-{name}{route}", "POST", route, {"files": {"image": ("x", data, ctype)}}, 400))
        cases.append(
            (f"hostile-{name}-json", "POST", "/classify", {"json": {"image": base64.b64encode(data).decode()}}, 400)
        )
    cases += field_tricks()
    cases += [
        ("no-body", "POST", "/classify", {}, 415),
        ("json-body", "POST", "/classify", {"json": {"image": "photo.jpg"}}, 400),
        ("json-server-path", "POST", "/classify", {"json": {"image": "/etc/passwd"}}, 400),
        ("json-url", "POST", "/classify", {"json": {"image": "http://169.254.169.254/latest/meta-data/"}}, 400),
        ("json-file-url", "POST", "/classify", {"json": {"image": "file:///etc/passwd"}}, 400),
        ("json-not-image", "POST", "/classify", {"json": {"image": "aGVsbG8="}}, 400),
        ("json-number-image", "POST", "/classify", {"json": {"image": 7}}, 400),
        ("json-object-option", "POST", "/classify", {"json": {"image": base64.b64encode(JPEG).decode(), "top_k": {"$gt": 1}}}, 400),
        ("json-nan-option", "POST", "/classify", {"content": b'{"image": "' + base64.b64encode(JPEG) + b'", "top_k": NaN}', "headers": {"content-type": "application/json"}}, 400),
        ("json-deep", "POST", "/classify", {"content": b'{"image": ' + b"[" * 100_000, "headers": {"content-type": "application/json"}}, 400),
        ("json-repeated-key", "POST", "/classify", {"content": b'{"image": "aGVsbG8=", "image": "aGVsbG8="}', "headers": {"content-type": "application/json"}}, 400),
        ("json-batch-too-many", "POST", "/classify_batch", {"json": {"images": ["aGVsbG8="] * 1000}}, 400),
        ("json-million-keys", "POST", "/classify", {"content": b"{" + b",".join(b'"k%d":1' % i for i in range(1_000_000)) + b"}", "headers": {"content-type": "application/json"}}, 400),
        ("text-plain", "POST", "/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ("urlencoded", "POST", "/classify", {"data": {"image": "x"}}, 415),
        ("octet-stream-not-an-image", "POST", "/classify", {"content": b"hello", "headers": {"content-type": "application/octet-stream"}}, 400),
        ("image-body-empty", "POST", "/classify", {"content": b"", "headers": {"content-type": "image/jpeg"}}, 400),
        ("image-body-query-image", "POST", "/classify?image=/etc/passwd", {"content": b"hello", "headers": {"content-type": "image/jpeg"}}, 400),
        ("image-body-query-long", "POST", "/classify?top_k=" + "9" * 5000, {"content": JPEG, "headers": {"content-type": "image/jpeg"}}, 400),
        ("image-body-query-not-utf8", "POST", "/classify?top_k=%C0%80", {"content": JPEG, "headers": {"content-type": "image/jpeg"}}, 400),
        ("image-body-hostile", "POST", "/classify", {"content": b"\xff\xd8\xff" + b"\0" * 5000, "headers": {"content-type": "image/jpeg"}}, 400),
        ("multipart-no-boundary", "POST", "/classify", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400),
        ("multipart-garbage", "POST", "/classify", {"content": b"--b0undary\r\nN\x07L\x04F\r\n--b0undary--", "headers": MULTIPART}, 400),
        ("multipart-empty", "POST", "/classify", {"content": b"", "headers": MULTIPART}, 400),
        ("url-in-file-field", "POST", "/classify", {"content": raw_multipart([("image", None, b"http://169.254.169.254/latest", None)]), "headers": MULTIPART}, 400),
        ("file-uri-in-file-field", "POST", "/classify", {"content": raw_multipart([("image", None, b"file:///etc/passwd", None)]), "headers": MULTIPART}, 400),
        ("batch-text-field", "POST", "/classify_batch", {"content": raw_multipart([("images", None, b"{}", None)]), "headers": MULTIPART}, 400),
        ("missing-image-field", "POST", "/classify", {"content": raw_multipart([("top_k", None, b"3", None)]), "headers": MULTIPART}, 400),
        ("wrong-field-name", "POST", "/classify", {"files": {"picture": ("a.jpg", JPEG, "image/jpeg")}}, 400),
        ("top_k-negative", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "-1"}}, 400),
        ("top_k-huge", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "1" + "0" * 30}}, 400),
        ("top_k-nan", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "NaN"}}, 400),
        ("top_k-float", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "2.5"}}, 400),
        ("top_k-unicode-digits", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "٣"}}, 400),
        ("top_k-long-string", "POST", "/classify", {"files": {"image": ("a.jpg", JPEG, "image/jpeg")}, "data": {"top_k": "x" * 100_000}}, 400),
        ("unicode-field-text", "POST", "/classify", {"content": raw_multipart([("image", None, "🐝 ünïcødé ‮".encode(), None)]), "headers": MULTIPART}, 400),
        ("huge-body", "POST", "/classify", {"content": b"\0" * (40 * 1024 * 1024), "headers": MULTIPART}, 413),
        ("huge-content-length", "RAW", "/classify", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: 99999999999\r\n\r\nx"}, 413),
        ("bad-content-length", "RAW", "/classify", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: abc\r\n\r\nx"}, 400),
        ("truncated-body", "RAW", "/classify", {"raw": b"POST /classify HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b0undary\r\nContent-Length: 5000\r\n\r\n--b0undary\r\n", "close": True}, None),
        ("get-on-post-route", "GET", "/classify", {}, 405),
        ("unknown-route", "POST", "/../../etc/passwd", {}, 404),
        ("info-with-garbage-multipart", "POST", "/info", {"content": b"x", "headers": {"content-type": "multipart/form-data"}}, 400),
        ("batch-empty", "POST", "/classify_batch", {"content": raw_multipart([]), "headers": MULTIPART}, 400),
    ]  # fmt: skip
    return cases
