"""Hand-made hostile requests: each must get a 4xx with a message, and the server must stay healthy."""

from __future__ import annotations

from .images import BEE, bad_images

JPEG = BEE.read_bytes()
BOUNDARY = "b0undary"


def raw_multipart(parts: list[tuple[str, str | None, bytes, str | None]], boundary: str = BOUNDARY) -> bytes:
    """parts: (field name, filename or None, payload, content type or None)."""
    out = b""
    for name, filename, payload, ctype in parts:
        disposition = f'form-data; name="{name}"' + (
            f'; filename="{filename}"' if filename is not None else ""
        )
        out += f"--{boundary}\r\nContent-Disposition: {disposition}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + payload + b"\r\n"
    return out + f"--{boundary}--\r\n".encode()


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def corpus() -> list[tuple[str, str, str, dict, int | None]]:
    """(name, method, path, httpx request kwargs, expected status). Method RAW sends ``kwargs["raw"]`` over a plain
    socket (for requests no HTTP client will send); status None means the client hangs up and no answer is due."""
    cases: list[tuple[str, str, str, dict, int]] = []
    for name, (data, ctype, _) in bad_images().items():
        cases.append((f"image-{name}", "POST", "/classify", {"files": {"image": ("x", data, ctype)}}, 400))
    cases += [
        ("no-body", "POST", "/classify", {}, 415),
        ("json-body", "POST", "/classify", {"json": {"image": "photo.jpg"}}, 415),
        ("json-server-path", "POST", "/classify", {"json": {"image": "/etc/passwd"}}, 415),
        ("text-plain", "POST", "/classify", {"content": b"hello", "headers": {"content-type": "text/plain"}}, 415),
        ("urlencoded", "POST", "/classify", {"data": {"image": "x"}}, 415),
        ("octet-stream", "POST", "/classify", {"content": JPEG, "headers": {"content-type": "application/octet-stream"}}, 415),
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
        ("image-as-text-type", "POST", "/classify", {"files": {"image": ("a.txt", JPEG, "text/plain")}}, 400),
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
