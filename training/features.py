"""Feature extraction with an on-disk cache.

A frozen backbone means every image's features can be computed once: K augmented views per training image plus the
clean validation images. Each image's features are one ``.npy`` file keyed by a hash of everything that determines
them (image bytes, backbone, weights, augmentation recipe, views, seed, precision), written atomically, so a changed
input invalidates exactly what it should, an interrupted run resumes where it stopped, and a truncated file is
detected and recomputed. Runs may share a cache directory.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from headstart.runs import atomic_write_bytes
from headstart.service.cpu import cpu_info
from headstart.service.preprocess import PreprocessSpec, decode_for

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("HEADSTART_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "headstart"
    )
    return Path(base) / "features"


def resolve_device(device: str) -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` → the device training runs on; ``cuda`` without a usable GPU is an error."""
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"Invalid --device {device!r}. Use auto, cpu or cuda.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError(
            "--device cuda was asked for but torch sees no usable GPU (torch.cuda.is_available() is "
            "False). Install a CUDA build of torch, or use --device cpu."
        )
    return torch.device("cuda" if device == "cuda" or (device == "auto" and torch.cuda.is_available()) else "cpu")


def use_bf16(precision: str, device: torch.device) -> bool:
    """Whether augmented training views are extracted in bf16: asked for, or ``auto`` where bf16 units exist."""
    if precision != "auto":
        return precision == "bf16"
    # on CPUs: native bf16 units (AMX tiles or AVX-512 BF16), where bf16 convolutions run several times faster than
    # fp32 (benchmarks/feature_extraction.py)
    return torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_info().has_bf16


class FeatureCache:
    """A directory of ``<key>.npy`` arrays with atomic writes and validation on read. ``root=None`` disables it."""

    #: Temporary files older than this are left over from a killed writer and are removed when a cache opens.
    STALE_TMP_SECONDS = 3600

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.recomputed_corrupt = 0
        self.removed_stale = 0
        if self.root is not None and self.root.is_dir():
            cutoff = time.time() - self.STALE_TMP_SECONDS  # younger ones may belong to a run writing right now
            for tmp in self.root.glob("*/.*.tmp"):
                try:
                    if tmp.stat().st_mtime < cutoff:
                        tmp.unlink()
                        self.removed_stale += 1
                except OSError:
                    pass
            if self.removed_stale:
                log.info(
                    "removed %d stale temporary files from the feature cache %s",
                    self.removed_stale,
                    self.root,
                )

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.npy"

    def get(self, key: str, shape: tuple[int, ...] | None, dtype=np.float32) -> np.ndarray | None:
        if self.root is None:
            return None
        path = self._path(key)
        if not path.exists():
            return None
        try:
            arr = np.load(path, allow_pickle=False)
            if (shape is not None and arr.shape != shape) or arr.dtype != dtype or not np.isfinite(arr).all():
                raise ValueError(f"shape {arr.shape} dtype {arr.dtype}, expected {shape} {np.dtype(dtype)}")
            return arr
        except (OSError, ValueError, EOFError) as exc:
            log.warning("feature cache file %s is unreadable (%s); recomputing it", path, exc)
            self.recomputed_corrupt += 1
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, arr: np.ndarray, dtype=np.float32) -> None:
        if self.root is None:
            return
        buf = io.BytesIO()
        np.save(buf, np.ascontiguousarray(arr, dtype=dtype), allow_pickle=False)
        atomic_write_bytes(self._path(key), buf.getvalue())


def cache_namespace(**parts) -> str:
    """Hash of everything besides the image that determines its features."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def item_key(namespace: str, identity: str, views: int, seed: int) -> str:
    """The cache key of one image's views: the namespace and the image's identity (its bytes, and for detection
    its boxes)."""
    return hashlib.sha256(f"{namespace}:{identity}:{views}:{seed}".encode()).hexdigest()


def item_seed(seed: int, image_sha256: str) -> int:
    """The augmentation seed of one image: the same image gets the same views in every run with this seed."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{image_sha256}".encode()).digest()[:4], "little")


def features_fn(
    model: torch.nn.Module, bf16: bool, pool: bool = True, device: torch.device | str = "cpu"
) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (N, 3, S, S) float32 → pooled features (N, C) float32 (``pool=False``: feature maps (N, C, H, W)).

    The frozen backbone is traced and frozen with TorchScript (conv/BatchNorm folding, oneDNN fusion) in
    channels_last; with ``bf16`` its weights are cast to bfloat16. ``benchmarks/feature_extraction.py`` measures the
    variants (MobileNetV2, batch 8, 2 cores: eager fp32 55 img/s, traced fp32 131, traced bf16 193). If tracing
    fails (an unusual model), the eager model is used. On ``device`` cuda the model runs there; results come back
    to the CPU.
    """
    import copy
    import warnings

    device = torch.device(device)
    dtype = torch.bfloat16 if bf16 else torch.float32
    net = copy.deepcopy(model).eval().to(device=device, dtype=dtype, memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    run_net: Callable = net
    example = torch.zeros(2, 3, 64, 64, dtype=dtype, device=device).contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
            if not bf16 and device.type == "cpu":
                traced = torch.jit.optimize_for_inference(traced)
            traced(example)
            run_net = traced
    except Exception as exc:
        log.debug("TorchScript tracing failed (%s); using the eager backbone", exc)

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(device=device, dtype=dtype).contiguous(memory_format=torch.channels_last)
        out = run_net(x).float()
        return (out.mean(dim=(2, 3)) if pool else out.contiguous()).cpu().numpy()

    return run


class Extractor:
    """What computes a run's frozen features: ``runtime`` "openvino" or "torch", and :meth:`fn` per precision.

    ``extractor`` auto | openvino | torch; ``auto`` is OpenVINO on a CPU where it is installed, else torch. OpenVINO
    runs the net written once to ONNX (TorchScript exporter, batch axis dynamic, ``input_size`` square) and compiled
    per precision: bf16 (on CPUs with bf16 units) for the augmented training views, full fp32 for the clean images.
    Measured on the 2-core AMD EPYC, MobileNetV2 batch 8: 472 img/s in bf16 against torch's traced bf16 282, 232 in
    fp32 against 158; its fp32 features within 4.8e-6 of torch's eager fp32 (``benchmarks/feature_extraction.py``,
    tests/test_train.py). A net OpenVINO cannot take (an unusual model) is computed by torch and the log says why; on
    a GPU torch always computes.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        input_size: int,
        pool: bool = True,
        device: torch.device | str = "cpu",
        extractor: str = "auto",
    ) -> None:
        from headstart.service.runtime import openvino_available

        self.model, self.pool, self.device = model, pool, torch.device(device)
        self._fns: dict[bool, Callable[[np.ndarray], np.ndarray]] = {}
        if extractor == "openvino" and self.device.type != "cpu":
            raise ValueError("--extractor openvino runs on the CPU; with --device cuda use --extractor torch or auto.")
        if extractor == "openvino" and not openvino_available():
            raise ValueError("--extractor openvino needs the openvino package: pip install openvino, or use torch.")
        self.runtime = "torch"
        if extractor != "torch" and self.device.type == "cpu" and openvino_available():
            try:
                self._fns = _openvino_fns(model, input_size, pool)  # both compiled here, so that a refusal
                self.runtime = "openvino"  # falls back before any feature is computed
            except Exception as exc:  # the exporter or OpenVINO refuses some nets
                if extractor == "openvino":
                    raise ValueError(
                        f"OpenVINO cannot compute this backbone's features ({exc}); use --extractor torch."
                    ) from exc
                log.warning("OpenVINO cannot compute this backbone's features (%s); torch computes them", exc)

    def fn(self, bf16: bool) -> Callable[[np.ndarray], np.ndarray]:
        """pixels (N, 3, S, S) float32 → features, as :func:`features_fn` returns them; built once per precision."""
        if bf16 not in self._fns:
            self._fns[bf16] = features_fn(self.model, bf16, pool=self.pool, device=self.device)
        return self._fns[bf16]


class _Pooled(torch.nn.Module):
    """A feature net whose maps are averaged over space, as :func:`features_fn` pools them."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).mean(dim=(2, 3))


def _openvino_fns(model: torch.nn.Module, input_size: int, pool: bool) -> dict[bool, Callable]:
    """{bf16: pixels → features} computed by OpenVINO: the frozen net written to ONNX in a temporary folder (the
    TorchScript exporter: 0.9 s, against several for the dynamo one) and opened there once per precision by the
    service's own loader (``service/runtime.py``: bf16 only on CPUs with bf16 units)."""
    import copy
    import tempfile
    import warnings

    from headstart.service.runtime import open_session

    net = copy.deepcopy(model).eval().float()
    net = _Pooled(net) if pool else net
    with tempfile.TemporaryDirectory(prefix="headstart-features-") as tmp, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        path = Path(tmp) / "features.onnx"
        torch.onnx.export(
            net,
            (torch.zeros(1, 3, input_size, input_size),),
            str(path),
            dynamo=False,
            input_names=["pixels"],
            output_names=["features"],
            dynamic_axes={"pixels": {0: "batch"}, "features": {0: "batch"}},
            opset_version=17,
        )
        threads = torch.get_num_threads()
        sessions = {
            bf16: open_session(path, "openvino", "cpu", precision="bf16" if bf16 else "fp32", threads=threads)
            for bf16 in (False, True)
        }  # compiled: the file may go

    return {bf16: _OpenVINOFeatures(session) for bf16, session in sessions.items()}


class _OpenVINOFeatures:
    """pixels → features on an OpenVINO session; :meth:`start` lets the caller prepare the next pixels meanwhile."""

    def __init__(self, session) -> None:
        self.session = session

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        out = self.session.run(["features"], np.ascontiguousarray(pixels, dtype=np.float32))[0]
        return np.array(out, dtype=np.float32)  # a copy: the request reuses its output buffer

    def start(self, pixels: np.ndarray) -> Callable[[], np.ndarray]:
        wait = self.session.start(["features"], pixels)
        return lambda: wait()[0]


def _starter(run_model: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], Callable[[], np.ndarray]]:
    """``run_model``'s own ``start`` (the model runs while the caller goes on), else one that computes at once."""
    if hasattr(run_model, "start"):
        return run_model.start

    def start(pixels: np.ndarray) -> Callable[[], np.ndarray]:
        out = run_model(pixels)
        return lambda: out

    return start


class DecodedImages:
    """Images one pass decodes, kept for a later pass over the same files (the training images' clean pass after
    their augmented views: each decoded once instead of twice; hymenoptera: 245 decodes of about 1.5 ms fewer), up
    to ``max_bytes`` of pixels; a kept image is handed out once, then forgotten."""

    def __init__(self, spec: PreprocessSpec, max_bytes: int = 256 * 2**20) -> None:
        self.spec, self.max_bytes, self.bytes = spec, max_bytes, 0
        self._kept: dict[Path, Image.Image] = {}

    def take(self, path: Path) -> Image.Image:
        """The image of ``path``: the one kept for it, else decoded now (:func:`decode_for`)."""
        img = self._kept.pop(Path(path), None)
        if img is None:
            return decode_for(path, self.spec)
        self.bytes -= _pixel_bytes(img)
        return img

    def keep(self, path: Path, img: Image.Image) -> None:
        if self.bytes + _pixel_bytes(img) <= self.max_bytes and Path(path) not in self._kept:
            self._kept[Path(path)] = img
            self.bytes += _pixel_bytes(img)


def _pixel_bytes(img: Image.Image) -> int:
    return img.width * img.height * len(img.getbands())


#: make_views(image, sample, seed) → (pixels (V, 3, S, S) float32, named arrays to cache beside the features)
ViewsFn = Callable[[Image.Image, Any, int], tuple[np.ndarray, dict[str, np.ndarray]]]


def extract_features(
    run_model: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[Any],
    make_views: ViewsFn,
    *,
    views: int,
    shape: tuple[int, ...],
    cache: FeatureCache,
    namespace: str,
    spec: PreprocessSpec,
    dtype=np.float32,
    extras: tuple[str, ...] = (),
    seed: int = 0,
    batch_size: int = 64,
    desc: str = "features",
    progress: bool = True,
    decoded: DecodedImages | None = None,
    keep_decoded: bool = False,
) -> tuple[np.ndarray, list[dict[str, np.ndarray]]]:
    """Features (N, views, *shape) of ``samples`` and, per sample, the named ``extras`` its views came with (e.g.
    the boxes after augmentation). Cached per image under :func:`item_key` of the sample's ``identity``; a sample's
    views come from ``make_views`` with its :func:`item_seed`. Images come from ``decoded`` where given (those an
    earlier pass kept; with ``keep_decoded`` this pass keeps its own for a later one)."""
    decoded = decoded or DecodedImages(spec, max_bytes=0)
    out = np.empty((len(samples), views, *shape), dtype)
    found: list[dict[str, np.ndarray]] = [{} for _ in samples]
    todo: list[int] = []
    for i, sample in enumerate(samples):
        key = item_key(namespace, sample.identity, views, seed)
        cached = cache.get(key, (views, *shape), dtype)
        parts = {name: cache.get(f"{key}-{name}", None) for name in extras}
        if cached is None or any(v is None for v in parts.values()):
            todo.append(i)
        else:
            out[i], found[i] = cached, parts
    if not todo:
        return out, found

    per_chunk = max(1, batch_size // views)
    bar = tqdm(total=len(todo) * views, desc=desc, unit="img", disable=not progress, leave=False)

    def finish(chunk: list[int], made: list, waits: list[Callable[[], np.ndarray]]) -> None:
        feats = np.concatenate([wait() for wait in waits]).astype(dtype, copy=False)
        feats = feats.reshape(len(chunk), views, *shape)
        for j, i in enumerate(chunk):
            key = item_key(namespace, samples[i].identity, views, seed)
            out[i], found[i] = feats[j], made[j][1]
            cache.put(key, feats[j], dtype)
            for name, arr in found[i].items():
                cache.put(f"{key}-{name}", arr)
        bar.update(len(chunk) * views)

    # One chunk's images are decoded and augmented while the model computes the previous chunk's (OpenVINO runs on
    # its own threads: 1.20x the speed of taking turns, MobileNetV2 bf16 views on the 2-core AMD EPYC, the same
    # features; benchmarks/feature_extraction.py. A prefetch thread was no faster, its Python competing with the
    # runtime's threads). Torch computes in line.
    start_model = _starter(run_model)
    pending = None
    for first in range(0, len(todo), per_chunk):
        chunk = todo[first : first + per_chunk]
        made = []
        for i in chunk:
            img = decoded.take(samples[i].path)
            made.append(make_views(img, samples[i], item_seed(seed, samples[i].sha256)))
            if keep_decoded:
                decoded.keep(samples[i].path, img)
        pixels = np.concatenate([pixels for pixels, _ in made])
        waits = [start_model(pixels[k : k + batch_size]) for k in range(0, len(pixels), batch_size)]
        if pending is not None:
            finish(*pending)
        pending = (chunk, made, waits)
    if pending is not None:
        finish(*pending)
    bar.close()
    return out, found
