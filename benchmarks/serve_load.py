"""HTTP serving under load vs the same pipeline in process.

Starts `bentoml serve` with a bundle (by default: trains the hymenoptera MobileNetV2 head and exports it), drives
/classify from concurrent clients on 127.0.0.1 with real JPEGs for a bounded time per level, and measures in the same
run the in-process pipeline (decode, preprocess, the same runtime, batch 1) without HTTP. Prints requests/s,
p50/p95/p99 latency and errors per level, and the ratio HTTP / in-process. Targets: zero errors; at concurrency 32
HTTP throughput >= 0.8 of in-process; at concurrency 1 p50 latency within 10 ms of in-process.

Workloads (``--photos``): ``hymenoptera``, its 153 validation photos (about 500 x 375, 100 KB); ``camera``, the three
full-size camera JPEGs of ../shared/photos/camera (3264 x 2448 phone, 2048 x 1536 with EXIF orientation 6, 2048 x
1536 trail camera; 0.4-0.8 MB), repeated: the photos users upload; ``both`` drives each at every level (on the same
server, alternating in four slices of the time) and prints the camera / hymenoptera p50 ratio (target <= 2.5 at
concurrency 1).

    .venv/bin/python benchmarks/serve_load.py [--model TAG_OR_BUNDLE] [--seconds 15] [--levels 1 8 32]
        [--photos hymenoptera|camera|both] [--runtime auto|openvino|onnxruntime]
        (HEADSTART_WORKERS / HEADSTART_THREADS pass through to the server)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, machine_line, rss_mib, running_server, train_hymenoptera

WORKLOADS = {
    "hymenoptera": sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg")),
    "camera": sorted((SHARED / "photos" / "camera").glob("*.jpg")),
}
IMAGES = WORKLOADS["hymenoptera"]


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def make_bundle(tmp: str) -> str:
    from headstart.exporter import export_bundle

    return str(export_bundle(train_hymenoptera(f"{tmp}/run"), f"{tmp}/bundle", store=False).bundle_dir)


def in_process(model: str, seconds: float, runtime: str = "auto", images: list[Path] = IMAGES) -> tuple[float, float]:
    """images/s and p50 latency (ms) of decode + preprocess + inference on ``runtime``, one image at a time."""
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.preprocess import decode_for

    bundle = load_bundle(model, device="cpu", runtime=runtime)
    payloads = [p.read_bytes() for p in images]
    for data in payloads[:5]:
        classify_images(bundle, [decode_for(data, bundle.spec)], 5)
    latencies = []
    end = time.perf_counter() + seconds
    i = 0
    while time.perf_counter() < end:
        start = time.perf_counter()
        classify_images(bundle, [decode_for(payloads[i % len(payloads)], bundle.spec)], 5)
        latencies.append(time.perf_counter() - start)
        i += 1
    return len(latencies) / sum(latencies), 1000 * statistics.median(latencies)


def multipart(name: str, data: bytes, field: str = "image", top_k: int | None = 1) -> tuple[bytes, str]:
    """A ready-made multipart body: the client does no encoding work while the clock runs."""
    boundary = "headstartbenchmarkboundary"
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n{top_k}\r\n' if top_k is not None else ""
    )
    part = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    )
    body = (head + part).encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"


async def drive(
    url: str, concurrency: int, seconds: float, endpoint: str = "classify", images: list[Path] = IMAGES
) -> dict:
    """``concurrency`` clients posting one real JPEG per request to ``endpoint`` for ``seconds``; answers checked."""
    import aiohttp

    batch = endpoint == "classify_batch"
    bodies = [
        (
            *multipart(p.name, p.read_bytes(), "images" if batch else "image", None if batch else 1),
            p.parent.name,
        )
        for p in images
    ]
    latencies: list[float] = []
    errors = 0
    stop = time.perf_counter() + seconds

    async def worker(k: int, session: aiohttp.ClientSession) -> None:
        nonlocal errors
        i = k
        while time.perf_counter() < stop:
            body, ctype, _ = bodies[i % len(bodies)]
            i += concurrency
            start = time.perf_counter()
            try:
                async with session.post(f"{url}/{endpoint}", data=body, headers={"Content-Type": ctype}) as resp:
                    payload = json.loads(await resp.text())
                    if batch and resp.status == 200:
                        payload = payload[0]
                    if resp.status != 200 or payload["predictions"][0]["label"] not in ("ants", "bees"):
                        errors += 1
                        continue
            except Exception:
                errors += 1
                continue
            latencies.append(time.perf_counter() - start)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(k, session) for k in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return summary(latencies, elapsed, errors)


def summary(latencies: list[float], elapsed: float, errors: int) -> dict:
    return {
        "requests": len(latencies),
        "rps": len(latencies) / elapsed,
        "p50": 1000 * percentile(latencies, 50),
        "p95": 1000 * percentile(latencies, 95),
        "p99": 1000 * percentile(latencies, 99),
        "errors": errors,
        "latencies": latencies,
        "elapsed": elapsed,
    }


def drive_workloads(url: str, level: int, seconds: float, endpoint: str, workloads: list[str]) -> dict[str, dict]:
    """Each workload at ``level`` for ``seconds``; several take turns in four slices each, so that the machine's
    drift hits them alike."""
    slices = 1 if len(workloads) == 1 else 4
    parts: dict[str, list[dict]] = {w: [] for w in workloads}
    for _ in range(slices):
        for w in workloads:
            parts[w].append(asyncio.run(drive(url, level, seconds / slices, endpoint, WORKLOADS[w])))
    return {
        w: summary([x for r in rs for x in r["latencies"]], sum(r["elapsed"] for r in rs), sum(r["errors"] for r in rs))
        for w, rs in parts.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory or model-store tag (default: train and export one)")
    parser.add_argument("--seconds", type=float, default=15)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument(
        "--endpoint",
        default="classify",
        choices=["classify", "classify_batch"],
        help="classify_batch: one image per request, merged by adaptive batching",
    )
    parser.add_argument("--photos", default="hymenoptera", choices=[*WORKLOADS, "both"])
    parser.add_argument("--runtime", default="auto", choices=["auto", "openvino", "onnxruntime"])
    args = parser.parse_args()
    workloads = list(WORKLOADS) if args.photos == "both" else [args.photos]
    print(machine_line(torch=False))
    busy = check_idle()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or make_bundle(tmp)
        device = os.environ.get("HEADSTART_DEVICE", "cpu")
        with running_server(model, Path(tmp), HEADSTART_DEVICE=device, HEADSTART_RUNTIME=args.runtime) as (
            url,
            server,
            _,
        ):
            import httpx

            info = httpx.post(f"{url}/info", timeout=10).json()
            print(
                f"model {info['name']}:{info['version']} ({info['backbone']}) on {info['runtime']} "
                f"({info['device']}, {info['precision']}: {info['precision_note']})"
            )
            rss_before = rss_mib(server.pid)
            results: dict[tuple[str, int], dict] = {}
            for level in args.levels:
                for w, r in drive_workloads(url, level, args.seconds, args.endpoint, workloads).items():
                    results[w, level] = r
                    print(
                        f"  {w}, concurrency {level}: {r['rps']:.1f} req/s, p50 {r['p50']:.1f} ms, "
                        f"errors {r['errors']}",
                        flush=True,
                    )
            rss_after = rss_mib(server.pid)
        local = {w: in_process(model, args.seconds / len(workloads), args.runtime, WORKLOADS[w]) for w in workloads}

    for w in workloads:
        ips, p50_local = local[w]
        print()
        print(
            f"{w}: in-process pipeline (decode + preprocess + {info['runtime']}, batch 1): {ips:.1f} img/s, "
            f"p50 {p50_local:.1f} ms"
        )
        print("| concurrency | requests | req/s | p50 ms | p95 ms | p99 ms | errors | HTTP / in-process throughput |")
        print("|---|---|---|---|---|---|---|---|")
        for level in args.levels:
            r = results[w, level]
            print(
                f"| {level} | {r['requests']} | {r['rps']:.1f} | {r['p50']:.1f} | {r['p95']:.1f} | {r['p99']:.1f} | "
                f"{r['errors']} | {r['rps'] / ips:.2f} |"
            )
        if 32 in args.levels:
            print(f"concurrency 32: HTTP / in-process throughput {results[w, 32]['rps'] / ips:.2f} (target >= 0.8)")
        if 1 in args.levels:
            print(
                f"concurrency 1: p50 {results[w, 1]['p50']:.1f} ms vs in-process {p50_local:.1f} ms: "
                f"+{results[w, 1]['p50'] - p50_local:.1f} ms (target <= 10 ms)"
            )
    print()
    errors = sum(r["errors"] for r in results.values())
    print(f"errors: {errors} (target 0)")
    if len(workloads) == 2:
        for level in args.levels:
            ratio = results["camera", level]["p50"] / results["hymenoptera", level]["p50"]
            print(
                f"concurrency {level}: camera / hymenoptera p50 {ratio:.2f}"
                + (" (target <= 2.5)" if level == 1 else "")
            )
    print(f"server RSS before/after load: {rss_before:.0f} / {rss_after:.0f} MiB")
    print(f"other CPU use before the run: {busy:.0%}")


if __name__ == "__main__":
    main()
