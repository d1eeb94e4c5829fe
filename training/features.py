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

import numpy as np
import torch
from tqdm.auto import tqdm

from service.preprocess import PreprocessSpec, decode_image
from training.augment import augmented_views
from training.data import Sample
from training.runs import atomic_write_bytes

log = logging.getLogger(__name__)


def default_cache_dir() -> Path:
    base = os.environ.get("HEADSTART_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "headstart"
    )
    return Path(base) / "features"


def cpu_has_bf16() -> bool:
    """True on CPUs with native bf16 units (AMX tiles or AVX-512 BF16), where bf16 convolutions run several times
    faster than fp32 (measured 3-4x for MobileNetV2 here with channels_last)."""
    try:
        with open("/proc/cpuinfo") as fh:
            flags = fh.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        return False


class FeatureCache:
    """A directory of ``<key>.npy`` arrays with atomic writes and validation on read. ``root=None`` disables it."""

    #: Temporary files older than this are left over from a killed writer and are removed when a cache opens.
    STALE_TMP_SECONDS = 3600

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root is not None else None
        self.recomputed_corrupt = 0
        self.removed_stale = 0
        if self.root is not None and self.root.is_dir():
            cutoff = (
                time.time() - self.STALE_TMP_SECONDS
            )  # younger ones may belong to a run writing right now
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


def _item_key(namespace: str, sample: Sample, views: int, seed: int) -> str:
    return hashlib.sha256(f"{namespace}:{sample.sha256}:{views}:{seed}".encode()).hexdigest()


def _item_seed(seed: int, sample: Sample) -> int:
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample.sha256}".encode()).digest()[:4], "little")


def pooled_features_fn(
    model: torch.nn.Module, bf16: bool, pool: bool = True
) -> Callable[[np.ndarray], np.ndarray]:
    """pixels (N, 3, S, S) float32 → pooled features (N, C) float32 (``pool=False``: feature maps (N, C, H, W)).

    The frozen backbone is traced and frozen with TorchScript (conv/BatchNorm folding, oneDNN fusion) in
    channels_last; with ``bf16`` its weights are cast to bfloat16. ``benchmarks/feature_extraction.py`` measures the
    variants (MobileNetV2, batch 8, 2 cores: eager fp32 55 img/s, traced fp32 131, traced bf16 193). If tracing
    fails (an unusual model), the eager model is used.
    """
    import copy
    import warnings

    dtype = torch.bfloat16 if bf16 else torch.float32
    net = copy.deepcopy(model).eval().to(dtype=dtype, memory_format=torch.channels_last)
    for p in net.parameters():
        p.requires_grad_(False)
    run_net: Callable = net
    example = torch.zeros(2, 3, 64, 64, dtype=dtype).contiguous(memory_format=torch.channels_last)
    try:
        with warnings.catch_warnings(), torch.inference_mode():
            warnings.simplefilter("ignore")
            traced = torch.jit.freeze(torch.jit.trace(net, example, check_trace=False))
            if not bf16:
                traced = torch.jit.optimize_for_inference(traced)
            traced(example)
            run_net = traced
    except Exception as exc:
        log.debug("TorchScript tracing failed (%s); using the eager backbone", exc)

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(pixels).to(dtype).contiguous(memory_format=torch.channels_last)
        out = run_net(x).float()
        return (out.mean(dim=(2, 3)) if pool else out.contiguous()).numpy()

    return run


def extract_features(
    run_model: Callable[[np.ndarray], np.ndarray],
    samples: Sequence[Sample],
    *,
    spec: PreprocessSpec,
    pipeline,
    views: int,
    num_features: int,
    cache: FeatureCache,
    namespace: str,
    seed: int = 0,
    batch_size: int = 64,
    desc: str = "features",
    progress: bool = True,
) -> np.ndarray:
    """Features (N, views, C) for ``samples``; cached per image. ``pipeline=None`` means eval preprocessing."""
    out = np.empty((len(samples), views, num_features), np.float32)
    todo: list[int] = []
    for i, sample in enumerate(samples):
        cached = cache.get(_item_key(namespace, sample, views, seed), (views, num_features))
        if cached is None:
            todo.append(i)
        else:
            out[i] = cached
    if not todo:
        return out

    per_chunk = max(1, batch_size // views)
    bar = tqdm(total=len(todo) * views, desc=desc, unit="img", disable=not progress, leave=False)
    # Decoding and augmentation run in line with the model: on 2 cores a prefetch thread only competes with
    # torch's own threads (measured: no faster).
    for start in range(0, len(todo), per_chunk):
        chunk = todo[start : start + per_chunk]
        pixels = np.concatenate([
            augmented_views(decode_image(samples[i].path), pipeline, spec, views, _item_seed(seed, samples[i]))
            for i in chunk
        ])  # fmt: skip
        feats = np.concatenate(
            [run_model(pixels[k : k + batch_size]) for k in range(0, len(pixels), batch_size)]
        )
        feats = feats.reshape(len(chunk), views, num_features)
        for j, i in enumerate(chunk):
            out[i] = feats[j]
            cache.put(_item_key(namespace, samples[i], views, seed), feats[j])
        bar.update(len(chunk) * views)
    bar.close()
    return out
