"""Bounded soak of `bentoml serve` on loopback: mixed good and bad requests at high concurrency for a few minutes.

Every good request must get the same label as when sent alone before the load, every bad one a 4xx; the server's
resident memory is sampled every interval so growth can be told from a leak (warm-up growth levels off, a leak keeps
climbing).

    .venv/bin/python benchmarks/soak.py [--model TAG_OR_BUNDLE] [--minutes 3] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, machine_line, rss_mib, running_server
from serve_load import make_bundle, multipart

GOOD = sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))


def bad_bodies() -> list[tuple[bytes, str]]:
    jpeg = GOOD[0].read_bytes()
    return [
        multipart("a.jpg", b"not an image"),
        multipart("a.jpg", jpeg[: len(jpeg) // 3]),
        multipart("a.jpg", b""),
        (b"{}", "application/json"),
        (b"junk", "multipart/form-data; boundary=zz"),
        multipart("a.jpg", jpeg, top_k=0),
    ]


async def soak(url: str, concurrency: int, seconds: float, pid: int, interval: float, expected: dict) -> dict:
    import aiohttp

    good = [(*multipart(p.name, p.read_bytes()), expected[p.name]) for p in GOOD]
    bad = bad_bodies()
    stats = {"good_ok": 0, "good_wrong": 0, "bad_4xx": 0, "bad_other": 0, "server_errors": 0, "exceptions": 0}
    samples = [(0.0, rss_mib(pid))]
    t0 = time.perf_counter()
    stop = t0 + seconds

    async def worker(k: int, session) -> None:
        i = k
        while time.perf_counter() < stop:
            i += concurrency
            is_bad = i % 5 == 0
            body, ctype, *label = bad[i % len(bad)] if is_bad else good[i % len(good)]
            try:
                async with session.post(f"{url}/classify", data=body, headers={"Content-Type": ctype}) as resp:
                    text = await resp.text()
                    stats["server_errors"] += resp.status >= 500
                    if is_bad:
                        stats["bad_4xx" if 400 <= resp.status < 500 else "bad_other"] += 1
                    elif resp.status == 200 and json.loads(text)["predictions"][0]["label"] == label[0]:
                        stats["good_ok"] += 1
                    else:
                        stats["good_wrong"] += 1
            except Exception:
                stats["exceptions"] += 1

    async def sampler() -> None:
        while time.perf_counter() < stop:
            await asyncio.sleep(interval)
            samples.append((time.perf_counter() - t0, rss_mib(pid)))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=120)) as session:
        await asyncio.gather(sampler(), *(worker(k, session) for k in range(concurrency)))
    stats["seconds"] = time.perf_counter() - t0
    stats["rss"] = samples
    return stats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory or model-store tag (default: train and export one)")
    parser.add_argument("--minutes", type=float, default=3)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--interval", type=float, default=15)
    parser.add_argument(
        "--no-memory-arena",
        action="store_true",
        help="serve with HEADSTART_MEMORY_ARENA=0 (flat memory, lower throughput)",
    )
    args = parser.parse_args()
    print(machine_line(torch=False))
    busy = check_idle()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_bundle(tmp)
        env = {"HEADSTART_MEMORY_ARENA": "0"} if args.no_memory_arena else {}
        with running_server(model, Path(tmp), **env) as (url, server, log):
            import httpx

            # the reference answer for each image: the server's own, one request at a time, before the load
            expected = {
                p.name: httpx.post(
                    f"{url}/classify", files={"image": (p.name, p.read_bytes(), "image/jpeg")}, timeout=30
                ).json()["predictions"][0]["label"]
                for p in GOOD
            }
            stats = asyncio.run(soak(url, args.concurrency, args.minutes * 60, server.pid, args.interval, expected))
            healthy = httpx.get(f"{url}/readyz", timeout=5).status_code == 200
            text = log.read_text()
    total = sum(stats[k] for k in ("good_ok", "good_wrong", "bad_4xx", "bad_other", "exceptions"))
    print(
        f"{total} requests in {stats['seconds']:.0f} s at concurrency {args.concurrency} "
        f"({total / stats['seconds']:.1f} req/s), other CPU use before: {busy:.0%}"
    )
    print(
        f"good: {stats['good_ok']} answered correctly, {stats['good_wrong']} not; bad: {stats['bad_4xx']} got 4xx, "
        f"{stats['bad_other']} did not; 5xx: {stats['server_errors']}; client exceptions: {stats['exceptions']}"
    )
    print("server RSS (MiB) over time: " + ", ".join(f"{t:.0f}s {m:.0f}" for t, m in stats["rss"]))
    first, last = stats["rss"][1][1], stats["rss"][-1][1]
    third = next(m for t, m in stats["rss"] if t >= stats["seconds"] / 3)
    good = stats["good_ok"] + stats["good_wrong"]
    print(
        f"RSS after the first interval {first:.0f} MiB, at the end {last:.0f} MiB ({last - first:+.0f} MiB); "
        f"over the last two thirds {last - third:+.0f} MiB ({(last - third) * 2**20 / max(1, good * 2 / 3):+.0f} "
        f"bytes per good request)"
    )
    print(f"server healthy afterwards: {healthy}; 'status=500' in server log: {text.count('status=500')}")


if __name__ == "__main__":
    main()
