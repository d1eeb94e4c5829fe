"""What a model route's request may carry, for the request guard: a multipart/form-data upload, an image as the body
itself, or JSON with the image in base64, each parsed strictly against what its endpoint takes; what passed is rebuilt
as a canonical multipart body (see ``service/guard.py`` for why)."""

from __future__ import annotations

import binascii
import json
import re
import secrets
from collections.abc import Iterable
from dataclasses import dataclass, field

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from .formats import conversion_suffix

#: Longest value of a text field: numbers need a few characters.
MAX_FIELD_BYTES = 64


@dataclass(frozen=True)
class Endpoint:
    """What one route takes: file fields (at most ``max_files`` uploads each) and short text fields."""

    route: str
    files: tuple[str, ...] = ()
    fields: tuple[str, ...] = ()
    max_files: int = 1
    #: (field, lowest, highest) of the fields with a range, as the service checks them (for the OpenAPI document)
    ranges: tuple[tuple[str, float, float | None], ...] = ()

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
    a browser's ``fetch(url, {body: file})``), or JSON with the image in base64 (:func:`json_parts`). The text fields
    may come in the query string too (``?top_k=3``)."""
    ctype, params = parse_options_header(content_type)
    media = ctype.lower()
    if media.startswith(b"image/") or media == b"application/octet-stream":
        reject_if(not body, "The body is empty: send the image's bytes as the body, or upload it as a file.")
        return [(endpoint.files[0], b"upload", body), *_query_fields(query, endpoint, {})]
    if media == b"application/json" or media.endswith(b"+json"):
        return json_parts(body, endpoint, query)
    reject_if(
        media != b"multipart/form-data",
        "Send the image as multipart/form-data (a file upload), e.g. curl -F image=@photo.jpg, as the body itself "
        "with its type (curl --data-binary @photo.jpg -H 'Content-Type: image/jpeg'; options in the query string, "
        f'?top_k=3), or as JSON with the file in base64 ({{"{(*endpoint.files, "image")[0]}": "/9j/4AAQ..."}})',
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
            _check_text(part.name, value)
        out.append((part.name, part.filename if part.name in endpoint.files else None, value))
    return out + _query_fields(query, endpoint, upload.counts)


def _check_text(name: str, value: bytes) -> None:
    """A text field's value within its limits (a form's, or JSON's), else a 400 naming the field."""
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestRejected(400, f"Field {name!r} is not UTF-8 text; it takes a number.", field=name) from None
    reject_if(
        len(value) > MAX_FIELD_BYTES,
        f"Field {name!r} is longer than {MAX_FIELD_BYTES} bytes; it takes a number.",
        field=name,
    )


class _RepeatedKey(Exception):
    pass


def _no_repeats(pairs: list[tuple[str, object]]) -> dict:
    """An object of JSON, or _RepeatedKey naming a key it holds twice (json.loads would keep the last silently)."""
    out = dict(pairs)
    if len(out) < len(pairs):  # in linear time: an object of a million keys is one pass
        seen: set[str] = set()
        raise _RepeatedKey(next(k for k, _ in pairs if k in seen or seen.add(k)))
    return out


def _no_constant(name: str) -> float:
    raise RequestRejected(400, f"The JSON body holds {name}, which is not a number in JSON; send a number.")


def json_parts(body: bytes, endpoint: Endpoint, query: bytes = b"") -> list[tuple[str, bytes | None, bytes]]:
    """The parts of a JSON request: ``{"image": "<base64 of the file>", "top_k": 3}`` (a ``data:image/...;base64,``
    URL as a browser's FileReader writes it, line breaks, the URL-safe alphabet and missing padding accepted), a list
    of them for a route of several images (``{"images": [...]}``), the options as JSON numbers, booleans or strings
    (null: the default), under the same limits as a form's fields. Paths and URLs are not read."""
    file_field = endpoint.files[0]
    example = f'{{"{file_field}": "/9j/4AAQ..."}} (the file in base64: base64 -w0 photo.jpg)'
    # what the endpoint takes has few entries (a comma between two; a data: URL holds one): a body of a million (a
    # million keys or list items, 12 MB) held the worker for over a second of parsing before any check could refuse it
    most = 2 * (endpoint.max_files + len(endpoint.fields)) + 8
    reject_if(
        body.count(b",") > most,
        f"The JSON body holds more entries than this endpoint takes (an object such as {example}).",
    )
    try:
        doc = json.loads(body, object_pairs_hook=_no_repeats, parse_constant=_no_constant)
    except _RepeatedKey as exc:
        raise RequestRejected(400, f"{exc.args[0][:40]!r} is given more than once in the JSON body.") from None
    except RecursionError:
        raise RequestRejected(400, "The JSON body is nested too deeply to read.") from None
    except ValueError as exc:  # JSONDecodeError, or bytes in no UTF encoding
        raise RequestRejected(400, f"The body is not valid JSON ({exc}). Send an object such as {example}.") from None
    reject_if(not isinstance(doc, dict), f"The JSON body must be an object such as {example}.")
    allowed = ", ".join((*endpoint.files, *endpoint.fields))
    for name in doc:
        reject_if(
            name not in endpoint.files and name not in endpoint.fields,
            f"Unknown field {name[:40]!r}; this endpoint takes {allowed}.",
            field=name[:40],
        )
    reject_if(
        doc.get(file_field) in (None, [], ""),
        f"Field {file_field!r} is missing or empty: send {example}.",
        field=file_field,
    )
    images = doc[file_field]
    if isinstance(images, str):
        images = [images]
    reject_if(
        not isinstance(images, list),
        f"Field {file_field!r} must be a base64 string" + (" or a list of them." if endpoint.max_files > 1 else "."),
        field=file_field,
    )
    reject_if(
        len(images) > endpoint.max_files,
        f"Field {file_field!r} holds {len(images)} images; send at most {endpoint.max_files} per request."
        if endpoint.max_files > 1
        else f"Field {file_field!r} takes one image, not a list.",
        field=file_field,
    )
    out: list[tuple[str, bytes | None, bytes]] = [
        (file_field, b"upload", _base64_image(image, file_field, i if len(images) > 1 else None))
        for i, image in enumerate(images)
    ]
    for name in endpoint.fields:
        value = doc.get(name)
        if value is None:
            continue
        if isinstance(value, bool):
            text = b"true" if value else b"false"
        elif isinstance(value, int | float):
            text = json.dumps(value).encode()
        elif isinstance(value, str):
            text = value.encode("utf-8", "surrogatepass")
        else:
            raise RequestRejected(400, f"Field {name!r} takes a number, not a JSON {type(value).__name__}.", field=name)
        _check_text(name, text)
        out.append((name, None, text))
    return out + _query_fields(query, endpoint, {name: 1 for name, filename, _ in out if filename is None})


_BASE64_URLSAFE = str.maketrans("-_", "+/")


def _base64_image(text: object, name: str, index: int | None) -> bytes:
    """The bytes of one image sent in JSON as base64 text or a ``data:`` URL, or a 400 saying what was wrong."""
    where = f"{name!r}" + (f" (image {index})" if index is not None else "")
    reject_if(not isinstance(text, str), f"Field {where} must be the file's bytes as a base64 string.", field=name)
    if text[:5].lower() == "data:":
        head, comma, text = text.partition(",")
        reject_if(
            not comma or not head.lower().endswith(";base64"),
            f"Field {where} is a data: URL without base64 data; send data:image/jpeg;base64,... .",
            field=name,
        )
    reject_if(
        text[:8].lower().startswith(("http://", "https://", "file:/", "s3://", "gs://")),
        f"Field {where} is a URL: URLs are not fetched. Send the file's bytes in base64 (base64 -w0 photo.jpg).",
        field=name,
    )
    reject_if(  # of the images' base64, only a JPEG's starts with a slash, and always with /9j/
        len(text) <= 4096 and text.startswith(("/", "~", "./", "../")) and not text.startswith("/9j/"),
        f"Field {where} looks like a path: paths are not read. Send the file's bytes in base64 (base64 -w0 photo.jpg).",
        field=name,
    )
    try:  # base64 as btoa, FileReader and base64 -w0 write it, read in one pass
        data = _unbase64(text)
    except (binascii.Error, ValueError):  # else with line breaks (base64 without -w0) or the URL-safe alphabet
        try:
            data = _unbase64("".join(text.split()).translate(_BASE64_URLSAFE))
        except (binascii.Error, ValueError):
            raise RequestRejected(
                400,
                f"Field {where} is not base64 (of the file's bytes: base64 -w0 photo.jpg, or a data:image/...;base64, "
                "URL); paths and URLs are not read.",
                field=name,
            ) from None
    reject_if(not data, f"Field {where} is empty: send the file's bytes in base64.", field=name)
    return data


def _unbase64(text: str) -> bytes:
    """Strict base64 (only its alphabet, nothing after the padding), the padding optional."""
    return binascii.a2b_base64(text + "=" * (-len(text) % 4), strict_mode=True)  # b64decode's validate: a regex more


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
            f"{name!r} is given more than once (in the query string and the body, or twice).",
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
    A name ending as a picture in another form does (``.cr2``, ``.dcm``: :func:`formats.conversion_suffix`) keeps
    that ending, from a fixed list, so that the error can say what to do with it.
    """
    while True:  # a random 32-hex boundary that occurs in no value
        boundary = b"headstart-" + secrets.token_hex(16).encode()
        if not any(boundary in value for _, _, value in parts):
            break
    out = []
    for name, filename, value in parts:
        kept = "" if filename is None else conversion_suffix(filename.decode("utf-8", "replace"))
        disposition = f'form-data; name="{name}"' + (f'; filename="upload{kept}"' if filename is not None else "")
        out.append(b"--" + boundary + b"\r\nContent-Disposition: " + disposition.encode())
        if filename is not None:
            out.append(b"\r\nContent-Type: application/octet-stream")
        out += [b"\r\n\r\n", value, b"\r\n"]
    out.append(b"--" + boundary + b"--\r\n")
    return b"multipart/form-data; boundary=" + boundary, b"".join(out)


_BASE64_FILE = {
    "type": "string",
    "format": "byte",
    "description": "The file's bytes in base64 (base64 -w0 photo.jpg), or a data:image/...;base64, URL.",
}
_QUERY_NOTE = "With the image sent as the body (or in a form or JSON: give an option in one place only)."


def _schema(option: dict, nullable: bool) -> dict:
    """An option's schema as BentoML writes it, its ``default: None`` (not allowed for a type that is not nullable)
    made ``nullable`` where null is accepted (JSON), left out where there is no null (a query string)."""
    schema = {k: v for k, v in option.items() if k != "title" and not (k == "default" and v is None)}
    if nullable and "default" in option and option["default"] is None:
        schema["nullable"] = True
    return schema


def document_bodies(spec: dict, endpoints: Iterable[Endpoint]) -> dict:
    """The service's OpenAPI document with the two other bodies :func:`parse_upload` reads (BentoML documents the
    multipart form only): the image as the body (``image/*``, ``application/octet-stream``) with the options as
    query parameters, and JSON with the image in base64; and each option's range (``Endpoint.ranges``). Client
    generators and the docs page's "Try it out" then offer all three."""
    for endpoint in endpoints:
        operation = spec.get("paths", {}).get(endpoint.route, {}).get("post", {})
        content = operation.get("requestBody", {}).get("content", {})
        form = content.get("multipart/form-data", {}).get("schema", {})
        properties = form.get("properties", {})
        if not endpoint.files or endpoint.files[0] not in properties:
            continue
        for option, lowest, highest in endpoint.ranges:
            if option in properties:
                properties[option].update(minimum=lowest, **({} if highest is None else {"maximum": highest}))
        name = endpoint.files[0]
        several = properties[name].get("type") == "array"
        image = {"type": "array", "items": _BASE64_FILE, "maxItems": endpoint.max_files} if several else _BASE64_FILE
        options = {k: _schema(v, nullable=True) for k, v in properties.items() if k != name}
        content["application/json"] = {
            "schema": {"type": "object", "required": [name], "properties": {name: image, **options}}
        }
        body = {"schema": {"type": "string", "format": "binary"}}
        content["image/*"] = content["application/octet-stream"] = body
        known = {p.get("name") for p in operation.get("parameters", [])}
        for option in (f for f in endpoint.fields if f in properties and f not in known):
            schema = _schema(properties[option], nullable=False)
            operation.setdefault("parameters", []).append(
                {"name": option, "in": "query", "required": False, "schema": schema, "description": _QUERY_NOTE}
            )
    _as_openapi_30(spec)
    return spec


def _as_openapi_30(node: object) -> None:
    """BentoML's schemas in the OpenAPI 3.0 the document declares: its ``type: file`` (OpenAPI 2) a binary string,
    pydantic's ``anyOf [..., {type: null}]`` (3.1) and a ``default: None`` on a type that is not nullable made
    ``nullable``; validators and client generators refused the document as it was."""
    if isinstance(node, list):
        for item in node:
            _as_openapi_30(item)
        return
    if not isinstance(node, dict):
        return
    if node.get("type") == "file":
        node.update(type="string", format="binary")
    others = [s for s in node.get("anyOf", ()) if s != {"type": "null"}]
    if len(others) < len(node.get("anyOf", ())):
        node.pop("anyOf")
        node.update(others[0] if len(others) == 1 else {"anyOf": others}, nullable=True)
    if "type" in node and "default" in node and node["default"] is None:
        node["nullable"] = True
    for value in node.values():
        _as_openapi_30(value)
