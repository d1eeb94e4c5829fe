"""The headstart BentoML service: classification and localization on OpenVINO (CPU) or ONNX Runtime (GPU), no torch.

Model selection: ``HEADSTART_MODEL``, a model-store tag (``name`` or ``name:version``) or a bundle directory;
otherwise the newest model that `headstart export` put in the BentoML model store. A tag is declared at class
scope, so ``bentoml build`` packs that model into the bento (and the container finds it without any variable).
Every setting (model, device, runtime, precision, variant, workers, threads, limits) is a ``HEADSTART_*`` variable,
read once at start: ``service/settings.py``.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from http import HTTPStatus
from pathlib import Path
from typing import Annotated, TypeVar

import bentoml
from bentoml.exceptions import BentoMLException, InvalidArgument
from bentoml.validators import ContentType
from PIL import Image
from pydantic import ValidationError

from . import connections, fonts, usage_reports
from .answers import (
    BatchItem,
    ClassifyResponse,
    InfoResponse,
    LocalizeResponse,
    ModelInfo,
)
from .bundle import Bundle, BundleError, load_bundle, variant_file, verify_bundle
from .cpu import cpu_info
from .errors import HeadstartError
from .formats import conversion_hint
from .guard import MAX_REQUEST_BYTES, REQUEST_TIMEOUT_S, RequestGuard, cross_origin, current_request
from .heatmap import heatmap as class_heatmap
from .inference import check_answer_options, classified, classify_arrays, classify_images
from .localize import DEFAULTS, LocalizeError, LocalizeParams, draw_detections, localize_images
from .preprocess import ImageError, decode_for, preprocess
from .runtime import choose_runtime
from .settings import SETTINGS, Settings
from .webpage import WebPage

# under "bentoml" so that BentoML's logging configuration (its handler, its format) prints the start line
log = logging.getLogger("bentoml.headstart")
# BentoML's, ONNX Runtime's and OpenVINO's usage reports off unless the operator turns them on (e.g.
# BENTOML_DO_NOT_TRACK=False; service/usage_reports.py). Uvicorn's connections get header deadlines (connections.py).
usage_reports.turn_off(openvino_converter=True)
connections.install()
T = TypeVar("T")
#: The CPU /info reports beside the runtime and precision: they decide which kernels run, and so the speed.
CPU = {k: v for k, v in cpu_info().to_dict().items() if k in ("model_name", "cores", "kind", "extensions")}


def default_model_ref(settings: Settings) -> str:
    """``HEADSTART_MODEL``, else the newest model exported by headstart in the model store.

    Inside a built bento the store holds exactly the model packed at build time, so a container needs no variable.
    """
    if settings.model:
        return settings.model
    models = [m for m in bentoml.models.list() if m.info.labels.get("exported_by") == "headstart"]
    if not models:
        raise BundleError(
            "No model to serve: set HEADSTART_MODEL to a model-store tag or a bundle directory, or export one with "
            "`headstart export RUN_DIR` (it goes into the BentoML model store)."
        )
    return str(max(models, key=lambda m: m.info.creation_time).tag)


# At import, what `bentoml serve` needs to refuse a bad start at once (instead of restarting workers that can never
# serve): the settings (service/settings.py), the bundle's files against its manifest, a usable runtime and device.
# A configuration error ends the process with one line and exit status 1 (a worker that fails in __init__ instead is
# restarted by BentoML for ever, with the port open and every request hanging).
def _start_checks() -> tuple[str, str, str]:
    model_ref = default_model_ref(SETTINGS)
    variant_file(*verify_bundle(model_ref), SETTINGS.variant)
    return model_ref, *choose_runtime(SETTINGS.runtime, SETTINGS.device)


try:
    MODEL_REF, RUNTIME, DEVICE = _start_checks()
except HeadstartError as exc:
    sys.exit(f"headstart cannot start: {exc}")
MODEL_IS_PATH = os.sep in MODEL_REF or Path(MODEL_REF).is_dir()
#: Pixels a merged /classify_batch batch may decode in all (four of the largest images allowed; JPEGs count at the
#: scale they are decoded at, so 32 camera photos take about 16 MP).
MAX_BATCH_DECODE_PIXELS = 4 * SETTINGS.max_image_pixels
#: CPU serving: one worker process per core, so request handling (Python, GIL-bound) runs on every core, with the
#: cores shared among the workers' inference threads. Measured on 2 cores at concurrency 32: 2 workers x 1 thread
#: served 1.9x (Intel AMX) and 1.65x (AMD EPYC) the requests of 1 worker x 2 threads (benchmarks/RESULTS.md). One
#: worker on a GPU.
WORKERS = SETTINGS.workers or (1 if DEVICE == "cuda" else cpu_info().cores)
THREADS = SETTINGS.threads or max(1, cpu_info().cores // WORKERS)
#: An uploaded file. Any declared content type is accepted (curl sends application/octet-stream for a file without
#: an image extension): the decoder identifies the format by its bytes, from an allow-list.
ImageFile = Path


class RequestAbandoned(BentoMLException):
    """The client left, or the request's time ran out, before its turn on the inference thread came."""

    error_code = HTTPStatus.REQUEST_TIMEOUT


class ClientErrorsAsOneLine(logging.Filter):
    """BentoML logs every failed request at ERROR with a traceback. A 4xx is the client's problem: one INFO line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, ValidationError):
            status = 400
        elif isinstance(exc, BentoMLException) and exc.error_code < 500:
            status = int(exc.error_code)
        else:
            return True
        record.msg = f"{record.msg} -> {status}: %s".replace("Exception on", "Client error on")
        record.args = (*(record.args or ()), str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        record.levelno, record.levelname = logging.INFO, "INFO"
        record.exc_info = record.exc_text = None
        return True


logging.getLogger("bentoml._internal.server.http_app").addFilter(ClientErrorsAsOneLine())


def _params(conf: float, iou: float, max_detections: int, boxes_if_unknown: bool = False) -> LocalizeParams:
    try:
        return LocalizeParams(conf=conf, iou=iou, max_detections=max_detections, boxes_if_unknown=boxes_if_unknown)
    except LocalizeError as exc:
        raise InvalidArgument(str(exc)) from exc


def _threshold(value: float | None) -> float | None:
    """A request's novelty threshold, else the service's setting (HEADSTART_NOVELTY_THRESHOLD), else None (the
    model's own)."""
    if value is None:
        return SETTINGS.novelty_threshold
    _checked(novelty_threshold=value)
    return float(value)


def _checked(**options) -> None:
    """A request's answer options in range, else a 400 naming the first that is not (check_answer_options)."""
    try:
        check_answer_options(**options)
    except ValueError as exc:
        raise InvalidArgument(str(exc)) from None


def _open_set_info(bundle: Bundle) -> tuple[dict | None, str]:
    if bundle.open_set is None:
        return None, (
            "This model has no novelty score: it was exported before headstart had one, trained with --bank-size 0, "
            "or is a detector. Its answers carry no 'none of these'; retrain and export to get one."
        )
    source = "HEADSTART_NOVELTY_THRESHOLD" if SETTINGS.novelty_threshold is not None else "the model's export"
    in_force = SETTINGS.novelty_threshold if SETTINGS.novelty_threshold is not None else bundle.open_set["threshold"]
    info = {**bundle.open_set, "threshold": in_force, "calibrated_threshold": bundle.open_set["threshold"]}
    note = (
        f"An image whose novelty exceeds {in_force:.4f} (set by {source}) is 'none of these'; the export's threshold "
        f"keeps {100 * bundle.open_set['kept_rate']:.0f}% of the validation images as one of the model's classes."
    )
    return info, note


def _keys_from(settings: Settings) -> str:
    """Where the API keys asked come from, for the start line."""
    named = bool(set(settings.api_keys) - set(settings.api_keys_file))
    return " and ".join(
        v for v, on in (("HEADSTART_API_KEYS", named), ("HEADSTART_API_KEYS_FILE", settings.api_keys_file)) if on
    )


def open_bundle() -> Bundle:
    try:
        return load_bundle(
            MODEL_REF,
            variant=SETTINGS.variant,
            device=DEVICE,
            runtime=RUNTIME,
            precision=SETTINGS.precision,
            threads=THREADS,
            spinning=SETTINGS.spinning,
            memory_arena=SETTINGS.memory_arena,
        )
    except BundleError as exc:
        log.error("headstart cannot start: %s", exc)
        raise


@bentoml.service(name="headstart", traffic={"timeout": REQUEST_TIMEOUT_S}, workers=WORKERS)
class Headstart:
    if not MODEL_IS_PATH:
        model_ref = bentoml.models.BentoModel(MODEL_REF)

    def __init__(self) -> None:
        self.bundle = open_bundle()
        self.model = ModelInfo(name=self.bundle.name, version=self.bundle.version)
        self.open_set_info = _open_set_info(self.bundle)
        fonts.check(self.bundle.labels)  # the fonts the drawn images' labels need, looked up now, not in a request
        # Decoding, inference and drawing all run on this one thread. BentoML hands each request to whichever thread
        # of its pool is free, and glibc keeps a heap per thread, each grown to the largest request it has handled:
        # spread over the pool, memory rose in steps for minutes. On one thread it stays flat, at the same throughput
        # (benchmarks/RESULTS.md, "Memory"): BentoML runs one request per worker at a time anyway.
        self._worker = ThreadPoolExecutor(1, thread_name_prefix="headstart-inference")
        keys = len(SETTINGS.api_keys)
        log.info(
            "headstart serving %s:%s (%s file) on %s: %s; CPU %s; %s; %s",
            self.bundle.name,
            self.bundle.version,
            self.bundle.variant,
            self.bundle.session.describe(),
            self.bundle.precision_note,
            cpu_info().summary(),
            self.open_set_info[1],
            f"API keys asked ({keys} in {_keys_from(SETTINGS)})"
            if keys
            else "no API key asked (HEADSTART_API_KEYS unset)",
        )

    def _decode(self, path: Path) -> Image.Image:
        """An upload decoded for the model (a JPEG at the scale its preprocessing needs), or a 400 saying why not."""
        try:
            return decode_for(Path(path), self.bundle.spec)
        except ImageError as exc:  # the saved upload keeps its name's ending: a .NEF is said to be camera RAW
            raise InvalidArgument(f"{exc}{conversion_hint(path)}") from exc

    def _on_worker(self, fn: Callable[..., T], *args, one_request: bool = True) -> T:
        """Run ``fn`` on the inference thread, unless by its turn the client has left or the time is up.

        ``one_request=False`` for merged batches: BentoML's batch dispatcher runs in a task created during whichever
        request started it, so the request state it sees belongs to some earlier, long-finished request.
        """
        request = current_request() if one_request else None

        def run() -> T:
            if request is not None and request.abandoned():
                raise RequestAbandoned("The client left or the request timed out before it was served.")
            return fn(*args)

        return self._worker.submit(run).result()

    @bentoml.api(route="/classify")
    def classify(
        self,
        image: ImageFile,
        top_k: int = 5,
        novelty_threshold: float | None = None,
        label_threshold: float | None = None,
    ) -> ClassifyResponse:
        """Top-k labels for one uploaded image (JPEG, PNG, GIF, BMP, TIFF, WebP, AVIF; HEIC where pillow-heif is
        installed), and whether it is none of them.

        ``top_k`` is 1 to 1000; values above the number of labels return every label. ``unknown`` is true when the
        image is unlike every class the model learned (``novelty`` above ``novelty_threshold``: the request's
        ``novelty_threshold``, 0 to 2, else the service's). ``labels`` is what the image holds: the best class, or
        none for "none of these"; for a multi-label model every label at or above its threshold (the model's, chosen
        on validation; ``label_threshold``, 0 to 1, for one threshold for every label).
        """
        _checked(top_k=top_k, label_threshold=label_threshold)
        limit = _threshold(novelty_threshold)
        answer = self._on_worker(
            lambda: classify_images(self.bundle, [self._decode(image)], top_k, limit, label_threshold)[0]
        )
        return ClassifyResponse(**answer, model=self.model)

    # adaptive batching limits, chosen by measurement (benchmarks/RESULTS.md): BentoML answers 503 to requests it
    # predicts cannot finish within max_latency_ms, which at 200 ms rejected most requests under load on 2 cores;
    # 10 s rejects none, while the batching window itself still adapts to traffic
    @bentoml.api(
        route="/classify_batch",
        batchable=True,
        max_batch_size=SETTINGS.max_batch_size,
        max_latency_ms=SETTINGS.max_latency_ms,
    )
    def classify_batch(self, images: list[ImageFile]) -> list[BatchItem]:
        """Top-5 labels for each of several images; requests are merged into batches by the server.

        An image that cannot be decoded gets an ``error`` in its own entry; the others are still answered.
        """
        results, errors = self._on_worker(self._classify_many, images, one_request=False)
        results = iter(results)
        return [
            BatchItem(model=self.model, error=err) if err else BatchItem(**next(results), model=self.model)
            for err in errors
        ]

    def _classify_many(self, images: list[Path]) -> tuple[list[dict], list[str | None]]:
        # Each image is reduced to the model's input as soon as it is decoded: a merged batch holds 32 arrays of
        # 3 x 224 x 224, not 32 full-size photos.
        # A merged batch gets the decoding work of a few of the largest images (MAX_BATCH_DECODE_PIXELS): its
        # clients cannot be told apart, nor seen leaving, so a batch of 32 slow images cannot hold the worker for
        # minutes; the images past the budget get an error of their own, to be sent again.
        arrays, errors, spent = [], [], 0
        for path in images:
            if spent > MAX_BATCH_DECODE_PIXELS:
                errors.append(
                    f"This batch's decoding budget ({MAX_BATCH_DECODE_PIXELS / 1e6:g} MP decoded) was spent on the "
                    "images before this one. Send it again, alone or in a batch of smaller images."
                )
                continue
            try:
                img = decode_for(Path(path), self.bundle.spec)
                spent += img.width * img.height
                arrays.append(preprocess(img, self.bundle.spec))
                del img  # not held while the next image decodes
                errors.append(None)
            except ImageError as exc:
                errors.append(f"{exc}{conversion_hint(path)}")
        return classify_arrays(self.bundle, arrays, 5, SETTINGS.novelty_threshold), errors

    @bentoml.api(route="/localize")
    def localize(
        self,
        image: ImageFile,
        conf: float = DEFAULTS.conf,
        iou: float = DEFAULTS.iou,
        max_detections: int = DEFAULTS.max_detections,
        novelty_threshold: float | None = None,
        boxes_if_unknown: bool = DEFAULTS.boxes_if_unknown,
    ) -> LocalizeResponse:
        """Where each class is in one image: boxes in original pixels with label and confidence, after NMS.

        ``conf`` (0-1): lowest confidence kept; ``iou`` (0-1): overlap above which a weaker box of the same class is
        suppressed; ``max_detections``: 1 to 1000. ``method`` is ``cam`` for a classifier (class activation map on
        the backbone grid) and ``trained`` for a detector. ``predictions`` are the top-5 image-level scores of the
        same model run. An image judged none of the classes (``unknown``) gets no class activation boxes unless
        ``boxes_if_unknown`` is true.
        """
        params = _params(conf, iou, max_detections, boxes_if_unknown)
        limit = _threshold(novelty_threshold)
        result = self._on_worker(lambda: localize_images(self.bundle, [self._decode(image)], params, limit)[0])
        return LocalizeResponse(
            **{k: result[k] for k in ("detections", "grid", "image_size", "method")},
            **classified(self.bundle, result["scores"], result, 5),  # the classes, as /classify gives them
            model=self.model,
        )

    @bentoml.api(route="/localize_image")
    def localize_image(
        self,
        image: ImageFile,
        conf: float = DEFAULTS.conf,
        iou: float = DEFAULTS.iou,
        max_detections: int = DEFAULTS.max_detections,
        novelty_threshold: float | None = None,
        boxes_if_unknown: bool = DEFAULTS.boxes_if_unknown,
    ) -> Annotated[Image.Image, ContentType("image/jpeg")]:
        """The uploaded image (EXIF-rotated) with the boxes of `/localize` and their labels drawn on it, as JPEG."""
        params = _params(conf, iou, max_detections, boxes_if_unknown)
        limit = _threshold(novelty_threshold)

        def draw() -> Image.Image:
            img = self._decode(image)
            drawn = draw_detections(img, localize_images(self.bundle, [img], params, limit)[0]["detections"])
            drawn.format = "JPEG"  # BentoML encodes a returned image in its format
            return drawn

        return self._on_worker(draw)

    @bentoml.api(route="/heatmap")
    def heatmap(
        self, image: ImageFile, index: int = -1, novelty_threshold: float | None = None
    ) -> Annotated[Image.Image, ContentType("image/jpeg")]:
        """Why the model answered what it did: the class activation map of class ``index`` (-1: the top class) laid
        over the uploaded image as a heatmap (warm: most like that class), with the class, its score and "none of
        these" where it applies written on it; JPEG, at most 1024 pixels on its longer side. Classifiers only."""
        if not -1 <= index < len(self.bundle.labels):
            raise InvalidArgument(
                f"index must be -1 (the top class) or 0 to {len(self.bundle.labels) - 1}, got {index}."
            )
        limit = _threshold(novelty_threshold)

        def draw() -> Image.Image:
            try:
                picture = class_heatmap(self.bundle, self._decode(image), index, limit).image
            except LocalizeError as exc:
                raise InvalidArgument(str(exc)) from exc
            picture.format = "JPEG"
            return picture

        return self._on_worker(draw)

    @bentoml.api(route="/info")
    def info(self) -> InfoResponse:
        """Labels, task, model name and version, training metrics, the runtime, device and precision in use (and the
        CPU), input size."""
        m = self.bundle.manifest
        return InfoResponse(
            name=m.name,
            version=m.version,
            task=m.task,
            labels=list(m.labels),
            input_size=m.preprocess.input_size,
            preprocess=m.preprocess.to_dict(),
            backbone=m.backbone["name"],
            metrics=m.metrics,
            runtime=self.bundle.runtime,
            device=self.bundle.session.device,
            precision=self.bundle.precision,
            precision_note=self.bundle.precision_note,
            providers=self.bundle.providers,
            variant=self.bundle.variant,
            max_request_bytes=MAX_REQUEST_BYTES,
            cpu=CPU,
            open_set=self.open_set_info[0],
            open_set_note=self.open_set_info[1],
            thresholds=m.thresholds,
            int8=m.int8,
        )


if SETTINGS.cors_origins:  # outermost: the guard's refusals (413, 503, ...) carry the CORS headers too, or a
    # browser page would see a network error instead of their message
    middleware, options = cross_origin(list(SETTINGS.cors_origins))
    Headstart.add_asgi_middleware(middleware, **options)
Headstart.add_asgi_middleware(RequestGuard)
Headstart.add_asgi_middleware(WebPage)
