"""Feature extraction with an on-disk cache (what computes the features: ``extractor.py``).

A frozen backbone means every image's features can be computed once: K augmented views per training image plus the
clean validation images. Each image's features are one ``.npy`` file keyed by a hash of everything that determines
them (image bytes, backbone, weights, augmentation recipe, views, seed, precision), written atomically, so a changed
input invalidates exactly what it should, an interrupted run resumes where it stopped, and a truncated file is
detected and recomputed. Runs may share a cache directory.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from headstart.runs import atomic_write_bytes, unwritable
from headstart.service.preprocess import PreprocessSpec, decode_for, decode_side

log = logging.getLogger(__name__)


#: The cache's notes of the images a data check read (``headstart.data.VerifiedImages``), one file per decoding.
VERIFIED_NOTES = "verified-{key}.txt"
#: The folders of the features: the first two hex digits of their keys.
_SHARDS = "[0-9a-f][0-9a-f]"


def default_cache_dir() -> Path:
    """``$HEADSTART_CACHE/features``, else ``$XDG_CACHE_HOME/headstart/features``, else ``~/.cache/...``; an empty
    variable counts as unset (an empty XDG_CACHE_HOME put the cache in ./headstart/ of whatever folder a run
    started in)."""
    base = os.environ.get("HEADSTART_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "headstart"
    )
    return Path(base) / "features"


_UNUSABLE: set[str] = set()  # default cache folders found unusable (said once)


def cache_root(cfg) -> Path | None:
    """The feature cache's folder for a run's options: ``--cache-dir``, else :func:`default_cache_dir`; None with
    ``--no-cache``. Made and tried with a small write first: a folder given by the user (``--cache-dir``,
    ``$HEADSTART_CACHE``) that cannot be written is an error saying so; the default one (under a home folder that is
    missing or read-only, as in many containers) is passed over with one warning, and the run keeps its features in
    memory only. Either way before any work (a run stopped with NotADirectoryError at its first feature)."""
    if cfg.no_cache:
        return None
    given = cfg.cache_dir or os.environ.get("HEADSTART_CACHE")
    root = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    # "~" where no home can be found (a container's user without HOME or passwd line): not ./~/.cache/ of the run
    why = "no home folder to hold it" if not given and not root.is_absolute() else unwritable(root)
    if why:
        if given:
            where = "--cache-dir" if cfg.cache_dir else "HEADSTART_CACHE"
            raise ValueError(
                f"The feature cache {root} ({where}) cannot be written: {why}. Give a folder this user can write, or "
                "--no-cache to keep the features in memory only."
            )
        if str(root) not in _UNUSABLE:
            _UNUSABLE.add(str(root))
            log.warning(
                "the feature cache %s cannot be written (%s): this run keeps its features in memory only, and the "
                "next computes them again. Set HEADSTART_CACHE or --cache-dir to a folder this user can write.",
                root,
                why,
            )
        return None
    return root


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
            mark_used(path)  # the last to go when the cache is pruned (:meth:`prune`)
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

    # ------------------------------------------------ what `headstart cache` shows and removes

    def files(self) -> list[tuple[Path, os.stat_result]]:
        """The cache's own files (features, their extras, the notes of checked images), least recently used first
        (by their access time, which a read from the cache sets). Nothing else in the folder is counted or ever
        removed: ``--cache-dir`` may name a folder that holds more."""
        if self.root is None or not self.root.is_dir():
            return []
        found = [*self.root.glob(f"{_SHARDS}/*.npy"), *self.root.glob(VERIFIED_NOTES.format(key="*"))]
        out = []
        for path in found:
            with contextlib.suppress(OSError):  # removed meanwhile (another run, another prune)
                out.append((path, path.stat()))
        return sorted(out, key=lambda item: item[1].st_atime)

    def usage(self) -> dict:
        """Files, bytes, and when the least and the most recently used feature were last used (Unix time)."""
        files = self.files()
        return {
            "root": str(self.root),
            "files": len(files),
            "bytes": sum(st.st_size for _, st in files),
            "oldest": files[0][1].st_atime if files else None,
            "newest": files[-1][1].st_atime if files else None,
        }

    def prune(self, keep_bytes: int) -> tuple[int, int]:
        """Remove the least recently used files until the cache holds at most ``keep_bytes``; returns how many files
        and bytes went. A run that later needs a removed feature computes it again; one running now loses nothing
        (a file it is writing is not one of these, and a feature removed under it is computed again)."""
        files = self.files()
        total, removed, freed, kept = sum(st.st_size for _, st in files), 0, 0, []
        for path, st in files:
            if total - freed <= keep_bytes:
                break
            try:
                path.unlink(missing_ok=True)  # missing: another prune took it
            except OSError as exc:  # a read-only cache, a file of another user: the others still go
                kept.append(exc)
                continue
            removed, freed = removed + 1, freed + st.st_size
        if kept:
            log.warning("could not remove %d files of the feature cache (%s)", len(kept), kept[0])
        self._remove_empty_folders()
        return removed, freed

    def _remove_empty_folders(self) -> None:
        for folder in self.root.glob(_SHARDS) if self.root is not None else ():
            with contextlib.suppress(OSError):
                folder.rmdir()  # only where empty


def mark_used(path: Path) -> None:
    """Its access time set to now, its modification time (when it was computed) kept: the kernel may not set the
    access time on a read (``noatime``, ``relatime``)."""
    with contextlib.suppress(OSError):  # a cache on a read-only disk is still read
        os.utime(path, ns=(time.time_ns(), path.stat().st_mtime_ns))


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


def _starter(run_model: Callable[[np.ndarray], np.ndarray]) -> Callable[[np.ndarray], Callable[[], np.ndarray]]:
    """``run_model``'s own ``start`` (the model runs while the caller goes on), else one that computes at once."""
    if hasattr(run_model, "start"):
        return run_model.start

    def start(pixels: np.ndarray) -> Callable[[], np.ndarray]:
        out = run_model(pixels)
        return lambda: out

    return start


class DecodedImages:
    """Images decoded for a later pass over the same files, kept up to ``max_bytes`` of pixels; a kept image is
    handed out once, then forgotten. The training images' clean pass takes those of their augmented pass (each
    decoded once instead of twice; hymenoptera: 245 decodes of about 1.5 ms fewer), and the extraction those of the
    data check, which decodes every new image before training (:func:`headstart.data.check_file`): on a first run
    a photo is then decoded once, not twice (an 8 MP JPEG about 14 ms, a HEIC of 6 MP 200 ms). Threads may keep
    images at once (the check's)."""

    def __init__(self, spec: PreprocessSpec, max_bytes: int | None = None) -> None:
        self.spec, self.bytes = spec, 0
        self.max_bytes = decoded_budget() if max_bytes is None else max_bytes
        self._kept: dict[Path, Image.Image] = {}
        self._lock = threading.Lock()

    def decode(self, source: bytes | str | Path) -> Image.Image:
        """``source`` decoded as this pass decodes it (:func:`decode_for` at :attr:`spec`)."""
        return decode_for(source, self.spec)

    def serves(self, spec: PreprocessSpec) -> bool:
        """Whether the images kept here are those ``spec`` decodes (:func:`decode_side`)."""
        return decode_side(spec) == decode_side(self.spec)

    @property
    def full(self) -> bool:
        return self.bytes >= self.max_bytes

    def take(self, path: Path) -> Image.Image:
        """The image of ``path``: the one kept for it, else decoded now (:func:`decode_for`)."""
        with self._lock:
            img = self._kept.pop(Path(path), None)
            if img is not None:
                self.bytes -= _pixel_bytes(img)
        return self.decode(path) if img is None else img

    def keep(self, path: Path, img: Image.Image) -> None:
        with self._lock:
            if self.bytes + _pixel_bytes(img) <= self.max_bytes and Path(path) not in self._kept:
                self._kept[Path(path)] = img
                self.bytes += _pixel_bytes(img)

    def only(self, paths) -> None:
        """Forget the images of any other path (a data set's files that no pass reads: a test split, duplicates)."""
        wanted = {Path(p) for p in paths}
        with self._lock:
            for path in [p for p in self._kept if p not in wanted]:
                self.bytes -= _pixel_bytes(self._kept.pop(path))


def decoded_budget() -> int:
    """What :class:`DecodedImages` may hold: an eighth of the memory available, between 256 MiB and 1 GiB (200
    photos of 9 MP decoded at 1/4 scale: 450 MB; 40 HEICs of 6 MP, decoded whole: 720 MB)."""
    available = memory_available()
    return 256 * 2**20 if available is None else max(256 * 2**20, min(2**30, available // 8))


def memory_available() -> int | None:
    """Bytes of memory this process could still take: the kernel's estimate (``MemAvailable``), lowered to what the
    control group's limit leaves (a container's); None where neither can be read (not Linux)."""
    found = []
    with contextlib.suppress(OSError, ValueError, IndexError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            found.append(int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text()))
    return max(0, min(found)) if found else None


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
    writer = _CacheWriter(cache)

    def finish(chunk: list[int], made: list, waits: list[Callable[[], np.ndarray]]) -> None:
        feats = np.concatenate([wait() for wait in waits]).astype(dtype, copy=False)
        feats = feats.reshape(len(chunk), views, *shape)
        for j, i in enumerate(chunk):
            key = item_key(namespace, samples[i].identity, views, seed)
            out[i], found[i] = feats[j], made[j][1]
            writer.put(key, feats[j], dtype)
            for name, arr in found[i].items():
                writer.put(f"{key}-{name}", arr)
        bar.update(len(chunk) * views)

    # One chunk's images are decoded and augmented while the model computes the previous chunk's (OpenVINO runs on
    # its own threads: 1.20x the speed of taking turns, MobileNetV2 bf16 views on the 2-core AMD EPYC, the same
    # features; benchmarks/feature_extraction.py. A prefetch thread was no faster, its Python competing with the
    # runtime's threads). Torch computes in line.
    start_model = _starter(run_model)
    pending = None
    with writer, bar:  # an error (a disk full, a runtime refusing the net) waits for the writes, closes the bar
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
    return out, found


class _CacheWriter:
    """Cache files written on a thread of their own, in order, while the extraction goes on: writing a file and
    waiting for the disk to hold it (``fsync``) had taken the extracting thread 0.6-0.9 s of a hymenoptera run.
    A failed write stops the extraction at the next ``put`` or at the end, with the disk's error; leaving the block
    waits for every write, also on the way out of an error (no write goes on after the caller has moved on)."""

    def __init__(self, cache: FeatureCache) -> None:
        self.cache = cache
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="feature-cache") if cache.root is not None else None
        self._written: deque[Future] = deque()

    def put(self, key: str, arr: np.ndarray, dtype=np.float32) -> None:
        if self._pool is None:
            return
        while self._written and self._written[0].done():
            self._written.popleft().result()  # raises the first failed write's error
        self._written.append(self._pool.submit(self.cache.put, key, arr, dtype))

    def __enter__(self) -> _CacheWriter:
        return self

    def __exit__(self, *exc) -> None:
        if self._pool is None:
            return
        self._pool.shutdown(wait=True)
        if exc[0] is None:
            for written in self._written:
                written.result()
