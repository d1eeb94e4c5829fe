"""ASGI middleware in front of the BentoML app: request size limit and strict uploads for the image routes.

BentoML 1.4 has no request-size setting; it answers 500 to malformed multipart bodies; and for a file field that
holds text instead of a file it tries to download that text as a URL (a JSON body can likewise name a path on the
server). None of that reaches BentoML here: image routes take multipart/form-data whose image fields are uploaded
files, a malformed body is a 400, anything else a 415, and bodies over the limit a 413, each with a message.
"""

from __future__ import annotations

import json
import os

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

#: Largest request body accepted, in bytes (HEADSTART_MAX_REQUEST_BYTES, default 32 MiB).
MAX_REQUEST_BYTES = int(os.environ.get("HEADSTART_MAX_REQUEST_BYTES", 32 * 1024 * 1024))
#: Routes that take image uploads: their file fields, and all the fields they accept.
FILE_ROUTES: dict[str, tuple[set[str], set[str]]] = {
    "/classify": ({"image"}, {"image", "top_k"}),
    "/classify_batch": ({"images"}, {"images"}),
    "/localize": ({"image"}, {"image", "conf", "iou", "max_detections"}),
    "/localize_image": ({"image"}, {"image", "conf", "iou", "max_detections"}),
}


class RequestRejected(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_multipart(
    content_type: bytes, body: bytes, file_fields: set[str], allowed: set[str] | None = None
) -> None:
    """Raise RequestRejected unless ``body`` is well-formed multipart whose ``file_fields`` parts are uploaded files
    and whose fields are all in ``allowed`` (when given)."""
    ctype, params = parse_options_header(content_type)
    if ctype != b"multipart/form-data":
        raise RequestRejected(
            415, "Send the image as multipart/form-data (a file upload), e.g. curl -F image=@photo.jpg"
        )
    boundary = params.get(b"boundary")
    if not boundary:
        raise RequestRejected(400, "The multipart/form-data Content-Type has no boundary parameter.")
    problems: list[str] = []
    header = {"field": b"", "value": b""}
    part: dict[bytes, bytes] = {}

    def on_header_field(data: bytes, start: int, end: int) -> None:
        header["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        header["value"] += data[start:end]

    def on_header_end() -> None:
        part[header["field"].lower()] = header["value"]
        header["field"], header["value"] = b"", b""

    def on_headers_finished() -> None:
        disposition, options = parse_options_header(part.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("latin-1")
        if disposition != b"form-data" or not name:
            problems.append("a part has no Content-Disposition: form-data name")
        elif allowed is not None and name not in allowed:
            problems.append(f"unknown field {name!r}; this endpoint takes {', '.join(sorted(allowed))}")
        elif name in file_fields and b"filename" not in options:
            problems.append(
                f"field {name!r} must be an uploaded file, not text (URLs and paths are not fetched)"
            )
        part.clear()

    parser = MultipartParser(boundary, {
        "on_header_field": on_header_field, "on_header_value": on_header_value, "on_header_end": on_header_end,
        "on_headers_finished": on_headers_finished,
    })  # fmt: skip
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRejected(400, f"Malformed multipart/form-data body: {exc}.") from exc
    if problems:
        raise RequestRejected(400, "; ".join(dict.fromkeys(problems)) + ".")


class RequestGuard:
    def __init__(self, app, max_bytes: int = MAX_REQUEST_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    @staticmethod
    async def _reject(send, status: int, message: str) -> None:
        body = json.dumps({"error": message}).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, receive) -> bytes:
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise RequestRejected(400, "The client disconnected before sending the whole body.")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                raise RequestRejected(413, self._too_large())
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)

    def _too_large(self) -> str:
        return f"Request body larger than {self.max_bytes} bytes. Send smaller images (or fewer per request)."

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers", []))
        try:
            length = headers.get(b"content-length")
            if length is not None and (not length.isdigit() or int(length) > self.max_bytes):
                raise RequestRejected(413 if length.isdigit() else 400, self._too_large())
            route = FILE_ROUTES.get(scope.get("path", "").rstrip("/"))
            ctype = headers.get(b"content-type", b"")
            multipart = parse_options_header(ctype)[0] == b"multipart/form-data"
            if scope.get("method") != "POST" or (route is None and not multipart):
                await self.app(scope, self._limited(receive), send)
                return
            body = await self._read_body(receive)
            check_multipart(ctype, body, *(route or (set(), None)))
        except RequestRejected as exc:
            await self._reject(send, exc.status, exc.message)
            return
        except _BodyTooLarge:
            await self._reject(send, 413, self._too_large())
            return
        await self.app(scope, self._replay(body, receive), send)

    @staticmethod
    def _replay(body: bytes, receive):
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay

    def _limited(self, receive):
        seen = 0

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _BodyTooLarge
            return message

        return limited


class _BodyTooLarge(Exception):
    pass
