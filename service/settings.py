"""Every ``HEADSTART_*`` setting of the service in one place, read once from the environment at start.

:class:`Settings` is the list: each field names its variable, its default and what it does (the README's table of
settings is checked against it by tests/test_architecture.py). A value that cannot be used stops the service at
start with a message naming the variable and what it takes, never a traceback.

Torch-free. Training reads the image limits too (``max_image_pixels``, ``max_aspect_ratio``): an image a server
would refuse is refused in a data set as well.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .errors import HeadstartError
from .runtime import DEVICES, PRECISIONS, RUNTIMES, VARIANTS


class SettingsError(HeadstartError, ValueError):
    """A ``HEADSTART_*`` variable holds a value that cannot be used; the message names it and what it takes."""


def setting(
    variable: str,
    default: Any,
    help: str,
    *,
    choices: tuple | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
    kind: type | None = None,
):
    """A field of :class:`Settings`: its environment variable, default, help, and the values it takes (``kind``:
    their type, where the default (None: unset) does not say it)."""
    meta = {"variable": variable, "help": help, "choices": choices, "minimum": minimum, "maximum": maximum}
    return dataclasses.field(default=default, metadata=meta | {"kind": kind or type(default)})


@dataclass(frozen=True)
class Settings:
    model: str = setting(
        "HEADSTART_MODEL",
        "",
        "a model-store tag (NAME or NAME:VERSION) or a bundle directory; "
        "unset: the newest model exported by headstart in the store (inside a built bento, the one "
        "packed)",
    )
    device: str = setting(
        "HEADSTART_DEVICE",
        "auto",
        "auto: CUDA when onnxruntime-gpu and a GPU are present, else "
        "CPU; cpu; cuda: refuse to start unless the CUDA provider is used",
        choices=DEVICES,
    )
    runtime: str = setting(
        "HEADSTART_RUNTIME",
        "auto",
        "auto: ONNX Runtime with CUDA on a GPU, else OpenVINO where "
        "installed, else ONNX Runtime; openvino, onnxruntime: that one or refuse to start",
        choices=RUNTIMES,
    )
    precision: str = setting(
        "HEADSTART_PRECISION",
        "auto",
        "auto: OpenVINO computes in bf16 only where `headstart "
        "export` measured that precision on the validation images and it passed; fp32: always "
        "full precision",
        choices=PRECISIONS,
    )
    variant: str = setting(
        "HEADSTART_VARIANT", "fp32", "which file of the bundle: fp32, or int8 (export --int8)", choices=VARIANTS
    )
    workers: int = setting(
        "HEADSTART_WORKERS", 0, "worker processes; 0: one per core on a CPU, one on a GPU", minimum=0
    )
    threads: int = setting(
        "HEADSTART_THREADS", 0, "inference threads per worker; 0: the cores divided among the workers", minimum=0
    )
    memory_arena: bool = setting(
        "HEADSTART_MEMORY_ARENA",
        True,
        "ONNX Runtime's CPU memory arena: 1.33x the "
        "throughput with varying batch sizes, memory rising to a plateau set by the largest "
        "batch (benchmarks/memory.py); 0: flat memory",
    )
    spinning: bool = setting(
        "HEADSTART_SPINNING",
        True,
        "ONNX Runtime's threads spin between requests (lower "
        "latency); 0: they sleep, leaving the CPU to request handling",
    )
    max_batch_size: int = setting(
        "HEADSTART_MAX_BATCH_SIZE",
        32,
        "images BentoML's adaptive batching merges into one /classify_batch call (a CPU runs the model on at "
        "most 16 images of 224 px at a time)",
        minimum=1,
    )
    max_latency_ms: int = setting(
        "HEADSTART_MAX_LATENCY_MS",
        10_000,
        "adaptive batching's latency bound: BentoML answers 503 to requests it predicts cannot finish within it",
        minimum=1,
    )
    max_batch_images: int = setting(
        "HEADSTART_MAX_BATCH_IMAGES", 32, "images one /classify_batch request may carry", minimum=1
    )
    max_request_bytes: int = setting(
        "HEADSTART_MAX_REQUEST_BYTES", 32 << 20, "largest request body, chunked or not (413 beyond)", minimum=1
    )
    max_concurrency: int = setting(
        "HEADSTART_MAX_CONCURRENCY",
        64,
        "requests to the model routes one worker holds at once; past it, 503 with Retry-After before the body is read",
        minimum=1,
    )
    max_inflight_bytes: int = setting(
        "HEADSTART_MAX_INFLIGHT_BYTES",
        256 << 20,
        "bytes of request bodies one worker holds at once; past it, 503 with Retry-After",
        minimum=1,
    )
    request_timeout: float = setting(
        "HEADSTART_REQUEST_TIMEOUT",
        60.0,
        "seconds a request may take; on the "
        "single-image routes, work still queued for a request past it (or for a client "
        "that left) is dropped; a merged /classify_batch batch is shared by several "
        "clients and always runs",
        minimum=0.001,
    )
    header_timeout: float = setting(
        "HEADSTART_HEADER_TIMEOUT",
        10.0,
        "seconds a connection may take to send a request's headers (after it opens or after its previous answer); "
        "past it, the connection is closed",
        minimum=0.1,
    )
    body_timeout: float = setting(
        "HEADSTART_BODY_TIMEOUT",
        10.0,
        "seconds a request's body may go without a byte arriving (408 past it; the whole body must arrive within "
        "HEADSTART_REQUEST_TIMEOUT)",
        minimum=0.1,
    )
    max_image_pixels: int = setting(
        "HEADSTART_MAX_IMAGE_PIXELS",
        64_000_000,
        "largest image decoded, in pixels (400 beyond; in training, a skipped file)",
        minimum=1,
    )
    max_decode_bytes: int = setting(
        "HEADSTART_MAX_DECODE_BYTES",
        512 << 20,
        "largest memory one image's decoding may take, estimated by format and mode before decoding (400 beyond): "
        "a 64 MP RGB image takes 256 MB, a 64 MP progressive JPEG 200-500 MB at any scale, a lossless WebP or an "
        "RGBA PNG about 1 GB",
        minimum=1 << 20,
    )
    max_file_bytes: int = setting(
        "HEADSTART_MAX_FILE_BYTES",
        256 << 20,
        "largest image file read from disk or a URL (training data, evaluation, predict, predict-batch): bigger "
        "files are skipped and reported without being read",
        minimum=1,
    )
    url_timeout: float = setting(
        "HEADSTART_URL_TIMEOUT",
        30.0,
        "seconds an image URL's server may take to send the whole file (headstart predict, predict-batch; the HTTP "
        "service reads no URLs)",
        minimum=0.1,
    )
    max_aspect_ratio: float = setting(
        "HEADSTART_MAX_ASPECT_RATIO", 100.0, "longest side over shortest side accepted", minimum=1.0
    )
    third_party_scripts: bool = setting(
        "HEADSTART_THIRD_PARTY_SCRIPTS",
        False,
        "1: serve BentoML's / page as it ships, with its Google Tag Manager script; 0: without it (no request leaves "
        "the browser for another site)",
    )
    cors_origins: tuple[str, ...] = setting(
        "HEADSTART_CORS_ORIGINS",
        (),
        "the other sites whose pages may call the API from a browser (CORS), comma-separated: "
        "https://app.example.com,http://localhost:5173, or * for any; unset: none (a page of the service's own "
        "address, as /ui, always may)",
        kind=lambda raw: cors_origins(raw),
    )
    api_keys: tuple[str, ...] = setting(
        "HEADSTART_API_KEYS",
        (),
        "the keys a request must carry (Authorization: Bearer KEY, or X-API-Key: KEY), comma-separated, each of 16 "
        "or more characters (openssl rand -hex 16); unset: none asked. The health routes, /metrics, the docs and the "
        "/ui page itself stay open (the page asks for a key)",
        kind=lambda raw: api_keys(raw),
    )
    api_keys_file: tuple[str, ...] = setting(
        "HEADSTART_API_KEYS_FILE",
        (),
        "a file holding API keys (one per line, or comma-separated; # comments), asked as HEADSTART_API_KEYS's are "
        "and with them: a Docker or Kubernetes secret mounted as a file (/run/secrets/headstart-keys), so that the "
        "keys are in no environment listing",
        kind=lambda raw: api_keys_from_file(raw),
    )
    novelty_threshold: float | None = setting(
        "HEADSTART_NOVELTY_THRESHOLD",
        None,
        "novelty above which an image is 'none of these' (0-2); unset: the threshold the model's export calibrated "
        "(its kept rate of validation images); a request's novelty_threshold field overrides both",
        minimum=0.0,
        maximum=2.0,
        kind=float,
    )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> Settings:
        """The settings the environment gives (unset or empty variables keep their defaults)."""
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(f.metadata["variable"], "").strip()
            if raw:
                values[f.name] = _parse(f, raw)
        if values.get("api_keys_file"):  # the keys asked: the variable's and the file's, each once
            values["api_keys"] = tuple(dict.fromkeys((*values.get("api_keys", ()), *values["api_keys_file"])))
        return cls(**values)

    @classmethod
    def describe(cls) -> list[tuple[str, str, str]]:
        """(variable, default, help) of every setting, in order: the README's table."""
        return [(f.metadata["variable"], _shown(f.default), f.metadata["help"]) for f in dataclasses.fields(cls)]


def _parse(f: dataclasses.Field, raw: str) -> Any:
    variable, kind, meta = f.metadata["variable"], f.metadata["kind"], f.metadata
    if kind is bool:
        if raw.lower() not in ("0", "1", "true", "false", "yes", "no"):
            raise SettingsError(f"{variable}={raw!r}: use 1 or 0 (true/false, yes/no).")
        return raw.lower() in ("1", "true", "yes")
    try:
        value = kind(raw)
    except SettingsError:
        raise
    except ValueError:
        what = {int: "a whole number", float: "a number"}.get(kind, "a value")
        raise SettingsError(f"{variable}={raw!r} is not {what}.") from None
    if meta["choices"] and value not in meta["choices"]:
        raise SettingsError(f"{variable}={raw!r}: use one of {', '.join(meta['choices'])}.")
    if meta["minimum"] is not None and not value >= meta["minimum"]:
        raise SettingsError(f"{variable}={raw!r}: must be at least {meta['minimum']:g}.")
    if meta["maximum"] is not None and not value <= meta["maximum"]:
        raise SettingsError(f"{variable}={raw!r}: must be at most {meta['maximum']:g}.")
    return value


def _shown(default: Any) -> str:
    if isinstance(default, bool):
        return "1" if default else "0"
    return "(none)" if default in ("", None, ()) else str(default)


def comma_separated(raw: str) -> tuple[str, ...]:
    """The entries of a comma-separated setting, each stripped, empty ones left out."""
    return tuple(entry.strip() for entry in raw.split(",") if entry.strip())


def cors_origins(raw: str) -> tuple[str, ...]:
    """HEADSTART_CORS_ORIGINS as origins: ``*``, or each ``scheme://host[:port]`` as a browser sends it in
    ``Origin`` (no path, no trailing slash: such an entry would never match, and the page would fail with no word
    of why)."""
    import re

    origins = comma_separated(raw)
    for origin in origins:
        if origin != "*" and not re.fullmatch(r"https?://(\[[0-9A-Fa-f:.]+\]|[^/\s:\[\]]+)(:\d{1,5})?", origin):
            raise SettingsError(
                f"HEADSTART_CORS_ORIGINS: {origin!r} is not an origin; write each as a browser sends it, "
                "scheme://host[:port] without a path (https://app.example.com), or * for any site."
            )
    return origins


#: the shortest API key taken: 16 characters of a random hex string are 64 bits, beyond guessing over HTTP
MIN_API_KEY = 16


def api_keys(raw: str, variable: str = "HEADSTART_API_KEYS") -> tuple[str, ...]:
    """HEADSTART_API_KEYS as keys: printable ASCII without spaces (a header carries them), each at least
    :data:`MIN_API_KEY` characters. A key is never repeated in a message: it is a secret."""
    import re

    keys = comma_separated(raw)
    for n, key in enumerate(keys, start=1):
        if not re.fullmatch(r"[!-~]+", key):
            raise SettingsError(
                f"{variable}: key {n} of {len(keys)} holds a space or a character that is not printable ASCII; "
                "a header cannot carry it. Use letters and digits (openssl rand -hex 16)."
            )
        if len(key) < MIN_API_KEY:
            raise SettingsError(
                f"{variable}: key {n} of {len(keys)} has {len(key)} characters, too few to keep anyone out; "
                f"use {MIN_API_KEY} or more (openssl rand -hex 16 gives 32)."
            )
    return keys


def api_keys_from_file(raw: str) -> tuple[str, ...]:
    """The keys in the file HEADSTART_API_KEYS_FILE names: one per line or comma-separated, ``#`` comments (at a line's
    start or after a space) and blank lines left out, each checked as :func:`api_keys` checks them. A file that
    cannot be read, or holds no key, stops the service (an empty secret must not leave it open)."""
    variable = "HEADSTART_API_KEYS_FILE"
    try:
        with open(raw, encoding="utf-8") as f:
            text = f.read(1 << 20)
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else "not UTF-8 text"
        raise SettingsError(f"{variable}={raw!r} cannot be read ({why}).") from None
    import re

    lines = [re.sub(r"(^|\s)#.*", "", line) for line in text.splitlines()]  # a # inside a key is the key's
    keys = api_keys(",".join(lines), variable)
    if not keys:
        raise SettingsError(f"{variable}={raw!r} holds no key: write one per line (openssl rand -hex 16).")
    return keys


#: The settings of this process, read once at import (the service reads them when `bentoml serve` starts it).
def _from_env() -> Settings:
    """The settings of this process; a value that cannot be used ends it with one line (no traceback): the service
    and the CLI both read them when they start."""
    try:
        return Settings.from_env()
    except SettingsError as exc:
        raise SystemExit(f"headstart cannot start: {exc}") from None


SETTINGS = _from_env()
