"""Strict multipart/form-data for the request guard: parse an upload against what its endpoint takes, and rebuild
what passed as a canonical body (see ``service/guard.py`` for why)."""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

#: Longest value of a text field: numbers need a few characters.
MAX_FIELD_BYTES = 64


@dataclass(frozen=True)
class Endpoint:
    """What one route takes: file fields (at most ``max_files`` uploads each) and short text fields."""

    route: str
    files: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    max_files: int = 1

    @property
    def takes_input(self) -> bool:
        return bool(self.files or self.fields)


_EXTENDED_FILENAME = re.compile(rb";\s*filename\*\s*=", re.IGNORECASE)


class RequestRejected(Exception):
    """A request refused before BentoML sees it: its status, message, extra headers and the field it is about."""

    def __init__(
        self, status: int, message: str, headers: tuple[tuple[bytes, bytes], ...] = (), field: str | None = None
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers
        self.field = field


@dataclass
class Part:
    name: str = ""
    filename: bytes | None = None
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0


def reject_if(condition: bool, message: str, status: int = 400, field: str | None = None) -> None:
    if condition:
        raise RequestRejected(status, message, field=field)


class UploadParser:
    """python-multipart's callbacks, checking each part against ``endpoint`` as it arrives."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.allowed = ", ".join((*endpoint.files, *endpoint.fields)) or "no fields"
        self.parts: list[Part] = []
        self.counts: dict[str, int] = {}
        self.field, self.value = b"", b""  # python-multipart bounds a part's header size itself
        self.headers: dict[bytes, bytes] = {}

    def callbacks(self) -> dict:
        return {
            "on_header_field": self.on_header_field,
            "on_header_value": self.on_header_value,
            "on_header_end": self.on_header_end,
            "on_headers_finished": self.on_headers_finished,
            "on_part_data": self.on_part_data,
        }

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def on_header_end(self) -> None:
        self.headers[self.field.lower()] = self.value
        self.field, self.value = b"", b""

    def on_headers_finished(self) -> None:
        endpoint = self.endpoint
        raw_disposition = self.headers.get(b"content-disposition", b"")
        disposition, options = parse_options_header(raw_disposition)
        name = options.get(b"name", b"").decode("latin-1")
        self.headers.clear()
        reject_if(disposition.lower() != b"form-data" or not name, "A part has no Content-Disposition: form-data name.")
        reject_if(
            name not in endpoint.files and name not in endpoint.fields,
            f"Unknown field {name[:40]!r}; this endpoint takes {self.allowed}.",
            field=name[:40],
        )
        self.counts[name] = self.counts.get(name, 0) + 1
        limit = endpoint.max_files if name in endpoint.files else 1
        reject_if(
            self.counts[name] > limit,
            f"Field {name!r} is given more than {limit} time{'s' if limit > 1 else ''}"
            + (f"; send at most {limit} images per request." if limit > 1 else "."),
            field=name,
        )
        filename = options.get(b"filename")
        if filename is None and _EXTENDED_FILENAME.search(raw_disposition):
            filename = b"upload"  # only an RFC 5987 filename*= (its value is never used: files are renamed)
        reject_if(
            name in endpoint.files and filename is None,
            f"Field {name!r} must be an uploaded file, not text (URLs and paths are not fetched), "
            f"e.g. curl -F {name}=@photo.jpg",
            field=name,
        )
        self.parts.append(Part(name, filename))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        reject_if(
            part.name in self.endpoint.fields and part.size > MAX_FIELD_BYTES,
            f"Field {part.name!r} is longer than {MAX_FIELD_BYTES} bytes; it takes a number.",
            field=part.name,
        )
        part.chunks.append(data[start:end])


def parse_upload(
    content_type: bytes, body: bytes, endpoint: Endpoint, query: bytes = b""
) -> list[tuple[str, bytes | None, bytes]]:
    """The parts of an upload to ``endpoint`` as (field, filename or None, value); raises RequestRejected for
    anything but well-formed multipart/form-data with the endpoint's fields, each within its limits, or an image
    sent as the body itself (Content-Type ``image/*`` or application/octet-stream: ``curl --data-binary @photo.jpg``,
    a browser's ``fetch(url, {body: file})``). The text fields may come in the query string too (``?top_k=3``)."""
    ctype, params = parse_options_header(content_type)
    media = ctype.lower()
    if media.startswith(b"image/") or media == b"application/octet-stream":
        reject_if(not body, "The body is empty: send the image's bytes as the body, or upload it as a file.")
        return [(endpoint.files[0], b"upload", body), *_query_fields(query, endpoint, {})]
    reject_if(
        media != b"multipart/form-data",
        "Send the image as multipart/form-data (a file upload), e.g. curl -F image=@photo.jpg, or as the body itself "
        "with its type (curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'; options in the query string, "
        "?top_k=3)",
        415,
    )
    boundary = params.get(b"boundary")
    reject_if(not boundary, "The multipart/form-data Content-Type has no boundary parameter.")
    upload = UploadParser(endpoint)
    parser = MultipartParser(boundary, upload.callbacks())
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as exc:
        raise RequestRejected(400, f"Malformed multipart/form-data body: {exc}.") from exc
    for name in endpoint.files:
        reject_if(
            name not in upload.counts,
            f"Field {name!r} is missing: upload the image as a file, e.g. -F {name}=@photo.jpg",
            field=name,
        )
    out = []
    for part in upload.parts:
        value = b"".join(part.chunks)
        if part.name in endpoint.fields:
            try:
                value.decode("utf-8")
            except UnicodeDecodeError:
                raise RequestRejected(
                    400, f"Field {part.name!r} is not UTF-8 text; it takes a number.", field=part.name
                ) from None
        out.append((part.name, part.filename if part.name in endpoint.files else None, value))
    return out + _query_fields(query, endpoint, upload.counts)


def _query_fields(query: bytes, endpoint: Endpoint, given: dict[str, int]) -> list[tuple[str, None, bytes]]:
    """The endpoint's text fields in a query string (``?top_k=3&novelty_threshold=0.5``), within the same limits as
    in a form: each once (in the query or the form, not both), short, UTF-8. Other parameters are not the service's
    (a gateway's key, a cache-buster) and are left out."""
    from urllib.parse import unquote_to_bytes

    out: list[tuple[str, None, bytes]] = []
    for pair in (p for p in query.split(b"&") if p):
        raw_name, _, raw_value = pair.partition(b"=")
        try:
            name = unquote_to_bytes(raw_name.replace(b"+", b" ")).decode("utf-8")
            value = unquote_to_bytes(raw_value.replace(b"+", b" "))
            value.decode("utf-8")
        except UnicodeDecodeError:
            raise RequestRejected(400, "The query string is not UTF-8 text.") from None
        if name not in endpoint.fields:  # another's: an API gateway's key (Azure's ?code=), a cache-buster
            continue
        reject_if(
            name in given or any(n == name for n, _, _ in out),
            f"{name!r} is given more than once (in the query string and the form, or twice).",
            field=name,
        )
        too_long = f"{name!r} is longer than {MAX_FIELD_BYTES} bytes; it takes a number."
        reject_if(len(value) > MAX_FIELD_BYTES, too_long, field=name)
        out.append((name, None, value))
    return out


def canonical_multipart(parts: list[tuple[str, bytes | None, bytes]]) -> tuple[bytes, bytes]:
    """(Content-Type, body) of a multipart body holding ``parts`` with nothing but the headers BentoML needs.

    Uploaded files are named ``upload`` (BentoML makes the client's file name part of a temporary file's name: 245
    bytes or more failed with a 500) and typed application/octet-stream: the decoder identifies images by content.
    """
    while True:  # a random 32-hex boundary that occurs in no value
        boundary = b"headstart-" + secrets.token_hex(16).encode()
        if not any(boundary in value for _, _, value in parts):
            break
    out = []
    for name, filename, value in parts:
        disposition = f'form-data; name="{name}"' + ('; filename="upload"' if filename is not None else "")
        out.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode())
        if filename is not None:
            out.append(b"\r\nContent-Type: application/octet-stream")
        out += [b"\r\n\r\n", value, b"\r\n"]
    out.append(b"--" + boundary + b"--\r\n")
    return b"multipart/form-data; boundary=" + boundary, b"".join(out)
