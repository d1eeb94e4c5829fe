"""Hostile input round 3 against a real `bentoml serve`: the figures of the README's Reliability section.

With a classifier bundle (``--model``, a directory or a store tag), prints:
- the time to answer each decode bomb of ``tests/images.py:work_bombs`` on /classify (all refused), and a batch of
  all of them;
- the server's memory (all processes) while 4 clients at once send the largest images accepted in the costliest
  formats and the ones refused for their memory;
- /readyz latency (median and worst of 20) alone, while 1 MB of 1-byte chunks is streamed at the server, while 40
  clients hold declared-but-unsent bodies, and while 300 connections hold half-sent headers; how long the server
  takes to close those connections;
- the size of /localize_image's answer to a 24 KB 1-bit 8000 x 8000 PNG.

    .venv/bin/python benchmarks/hostile_http.py --model BUNDLE_OR_TAG
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from _common import ROOT, check_idle, machine_line, rss_mib, running_server
from PIL import Image

sys.path.insert(0, str(ROOT))
from tests.bad_requests import BOUNDARY
from tests.images import BEE, encode, largest_uploads, work_bombs
from tests.test_hostile_input import connect, raw_post, read_response


def readyz(url: str, n: int = 20) -> tuple[float, float]:
    times = []
    with httpx.Client(base_url=url, timeout=60) as http:
        for _ in range(n):
            start = time.perf_counter()
            http.get("/readyz")
            times.append(time.perf_counter() - start)
            time.sleep(0.02)
    return statistics.median(times) * 1e3, max(times) * 1e3


def post(http: httpx.Client, data: bytes, route: str = "/classify") -> httpx.Response:
    return http.post(route, files={"image": ("x", data, "application/octet-stream")})


def bombs(url: str) -> None:
    print("decode bombs on /classify (each refused with 400):")
    with httpx.Client(base_url=url, timeout=300) as http:
        for name, (data, _, _) in work_bombs().items():
            start = time.perf_counter()
            code = post(http, data).status_code
            print(f"  {name:<30} {len(data):>9} bytes  {code}  {(time.perf_counter() - start) * 1e3:7.1f} ms")
        files = [("images", (n, d, "application/octet-stream")) for n, (d, _, _) in work_bombs().items()]
        start = time.perf_counter()
        items = http.post("/classify_batch", files=files).json()
        print(
            f"  all {len(items)} in one /classify_batch: {sum(bool(i['error']) for i in items)} errors in "
            f"{(time.perf_counter() - start) * 1e3:.0f} ms"
        )


def memory(url: str, pid: int) -> None:
    accepted, refused = largest_uploads()
    peak, stop = [0.0], threading.Event()

    def sample():
        while not stop.is_set():
            peak[0] = max(peak[0], rss_mib(pid))
            time.sleep(0.02)

    def client(k: int) -> list[int]:
        with httpx.Client(base_url=url, timeout=300) as http:
            return [post(http, d).status_code for d in accepted + refused]

    with httpx.Client(base_url=url, timeout=60) as http:
        post(http, BEE.read_bytes())
    base = rss_mib(pid)
    sampler = threading.Thread(target=sample)
    sampler.start()
    start = time.perf_counter()
    with ThreadPoolExecutor(4) as pool:
        codes = list(pool.map(client, range(4)))
    stop.set()
    sampler.join()
    print(
        f"4 clients at once, each 3 large accepted + 2 refused images: answers {codes[0]} (all clients alike: "
        f"{all(c == codes[0] for c in codes)}), {time.perf_counter() - start:.1f} s; server RSS {base:.0f} MiB "
        f"before, peak {peak[0]:.0f} MiB (+{peak[0] - base:.0f})"
    )


def latency_under_attacks(url: str) -> None:
    print(f"/readyz ms (median, worst of 20): alone {readyz(url)[0]:.1f}, {readyz(url)[1]:.1f}")
    ctype = f"Content-Type: multipart/form-data; boundary={BOUNDARY}"
    # 1-byte chunks
    framing = b"".join(b"1\r\n" + bytes([b]) + b"\r\n" for b in b"x" * (1 << 20))
    with connect(url) as sock:
        sock.sendall(raw_post("/classify", b"", ctype, "Transfer-Encoding: chunked"))

        def stream():
            with contextlib.suppress(OSError):
                sock.sendall(framing)

        threading.Thread(target=stream, daemon=True).start()
        med, worst = readyz(url)
        start = time.perf_counter()
        answer = read_response(sock)
    print(
        f"  1 MB of 1-byte chunks: answered {answer.split(b' ', 2)[1].decode()} "
        f"(closed {time.perf_counter() - start:.2f} s after the health checks); /readyz {med:.1f}, {worst:.1f}"
    )
    # declared bodies never sent
    head = raw_post("/classify", b"", ctype, f"Content-Length: {32 << 20}")
    idle = [connect(url) for _ in range(40)]
    start = time.perf_counter()
    for sock in idle:
        sock.sendall(head + b"-" * 120)
    med, worst = readyz(url)
    with httpx.Client(base_url=url, timeout=60) as http:
        served = [post(http, BEE.read_bytes()).status_code for _ in range(5)]
    answers = {read_response(s).split(b" ", 2)[1].decode() for s in idle}
    for sock in idle:
        sock.close()
    print(
        f"  40 clients declaring 32 MiB, sending 120 bytes: /readyz {med:.1f}, {worst:.1f}; /classify meanwhile "
        f"{served}; they got {answers} after {time.perf_counter() - start:.1f} s"
    )
    # half-sent headers
    socks = [connect(url) for _ in range(300)]
    start = time.perf_counter()
    for k, sock in enumerate(socks):
        if k % 2:
            sock.sendall(b"POST /classify HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    med, worst = readyz(url)
    closed = [read_response(s) == b"" for s in socks]
    elapsed = time.perf_counter() - start
    for sock in socks:
        sock.close()
    print(
        f"  300 connections, half with half a header, half silent: /readyz {med:.1f}, {worst:.1f}; "
        f"{sum(closed)} closed by the server within {elapsed:.1f} s"
    )


def drawn(url: str) -> None:
    data = encode(Image.new("1", (8000, 8000), 1), "PNG")
    with httpx.Client(base_url=url, timeout=120) as http:
        resp = post(http, data, "/localize_image")
    size = Image.open(io.BytesIO(resp.content)).size
    print(
        f"/localize_image of a {len(data) / 1e3:.0f} KB 1-bit 8000x8000 PNG: {resp.status_code}, "
        f"{len(resp.content) / 1e3:.0f} KB JPEG of {size[0]}x{size[1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    print(machine_line(torch=False))
    check_idle()
    with (
        tempfile.TemporaryDirectory() as tmp,
        running_server(args.model, Path(tmp), HEADSTART_DEVICE="cpu") as (
            url,
            proc,
            _,
        ),
    ):
        bombs(url)
        memory(url, proc.pid)
        latency_under_attacks(url)
        drawn(url)


if __name__ == "__main__":
    main()
