"""Work done ahead on threads and taken in order: images decoded while the model runs on the previous ones.

PIL releases the GIL while it decodes, so threads decode photos in parallel in one process: `headstart predict` on
full-size camera JPEGs went from 62-66 to 98-103 images/s on 2 cores (benchmarks/RESULTS.md, "Large photos").
Torch-free.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image

from .cpu import usable_cpus
from .preprocess import PreprocessSpec, decode_for, original_size, preprocess

T = TypeVar("T")
R = TypeVar("R")

#: at most this many decoding threads, whatever the CPU count: beyond, the model, not the decoding, bounds a process
MAX_THREADS = 8
#: threads that read images when some are URLs: each waits on a server most of its time, not on a CPU
URL_THREADS = 16


def default_threads() -> int:
    """Decoding threads for one process: one per CPU it may use, at most :data:`MAX_THREADS`."""
    return max(1, min(usable_cpus(), MAX_THREADS))


def reading_threads(items: Sequence, threads: int | None = None) -> int:
    """Threads to read and decode ``items`` on: ``threads`` (default :func:`default_threads`), or
    :data:`URL_THREADS` where some are URLs (read one at a time, a list of them took a round trip each)."""
    from .files import is_url

    threads = default_threads() if threads is None else threads
    return max(threads, URL_THREADS) if any(is_url(i) for i in items if isinstance(i, str)) else threads


def in_order(
    fn: Callable[[T], R], items: Iterable[T], threads: int | None = None, ahead: int | None = None
) -> Iterator[Future[R]]:
    """``fn(item)`` for each item, as finished futures in the items' order: ``.result()`` gives the value or raises
    what ``fn`` raised, where the caller takes it, as a plain loop would.

    ``threads`` (default :func:`default_threads`) compute at most ``ahead`` (default 4 per thread) results beyond
    the one the caller holds, so memory is bounded by ``ahead`` results whatever the number of items. With one
    thread, each result is computed on the caller's thread when taken: the plain loop. A caller that stops early
    leaves nothing running (the pending calls are cancelled, the running ones finished).
    """
    threads = default_threads() if threads is None else max(1, threads)
    if threads == 1:
        for item in items:
            future: Future[R] = Future()
            try:
                future.set_result(fn(item))
            except Exception as exc:
                future.set_exception(exc)
            yield future
        return
    ahead = max(1, 4 * threads if ahead is None else ahead)
    pending = iter(items)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="headstart-decode")
    try:
        window: deque[Future[R]] = deque(pool.submit(fn, item) for _, item in zip(range(ahead), pending, strict=False))
        while window:
            future = window.popleft()
            future.exception()  # wait for it, without raising: the caller's .result() raises
            for item in pending:  # one more in flight for the one taken
                window.append(pool.submit(fn, item))
                break
            yield future
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def load_batches(
    paths: Sequence[str | Path],
    spec: PreprocessSpec,
    batch_size: int,
    sizes: list | None = None,
    decode: Callable[[str | Path], Image.Image] | None = None,
) -> Iterator[np.ndarray]:
    """Image files → model input, ``batch_size`` images at a time (decoded with :func:`decode_for` on threads ahead
    of the caller: :func:`in_order`); each image's (width, height) as stored, after EXIF rotation
    (:func:`original_size`), is appended to ``sizes`` when given. ``decode`` (path → image, safe on threads; e.g.
    one that hands out the images a data check decoded) must decode as :func:`decode_for` does at ``spec``."""

    def load(path: str | Path) -> tuple[np.ndarray, tuple[int, int]]:
        img = decode(path) if decode is not None else decode_for(path, spec)
        return preprocess(img, spec), original_size(img)

    batch: list[np.ndarray] = []
    for loaded in in_order(load, paths):
        pixels, size = loaded.result()
        batch.append(pixels)
        if sizes is not None:
            sizes.append(size)
        if len(batch) == batch_size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)
