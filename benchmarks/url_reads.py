"""Images read from URLs: `headstart predict` (the Python API's loop, which the command prints from) on a list of
http URLs, with the reading threads URLs get (``service/ahead.py``'s ``URL_THREADS``) against the threads a list of
files gets (one per CPU), same bundle and photos, one run, rounds alternated.

The server is local (``http.server`` on 127.0.0.1 in a process of its own, a thread per request) and waits
``--latency-ms`` before each answer (default 50 ms: a far server's round trip and first byte; 0: the local speed).
``--threads 4,8,16`` also times other thread counts for URLs. The photos: the shared
hymenoptera validation photos, or the full-size camera JPEGs repeated (``--photos camera``). The figure is a ratio of
images/s measured in the same run; each is the median of ``--rounds`` (3) alternated rounds.

    .venv/bin/python benchmarks/url_reads.py [--model BUNDLE] [--photos hymenoptera|camera] [--latency-ms 50]
        [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, machine_line

PHOTOS = {
    "hymenoptera": (SHARED / "data" / "hymenoptera" / "val", 1),
    "camera": (SHARED / "photos" / "camera", 40),
}


SERVER = """
import http.server, sys, time
root, latency = sys.argv[1], float(sys.argv[2])
class Handler(http.server.SimpleHTTPRequestHandler):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, directory=root, **kwargs)
    def log_message(self, *args):
        pass
    def do_GET(self):
        time.sleep(latency)
        self.path = self.path.split("?")[0]
        return super().do_GET()
server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
server.daemon_threads = True
print(server.server_address[1], flush=True)
server.serve_forever()
"""


def serve(root: Path, latency: float) -> tuple[subprocess.Popen, str]:
    """The server in a process of its own (as a real one is: its work does not share this process's GIL)."""
    child = subprocess.Popen([sys.executable, "-c", SERVER, str(root), str(latency)], stdout=subprocess.PIPE, text=True)
    return child, f"http://127.0.0.1:{child.stdout.readline().strip()}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: train and export the hymenoptera MobileNetV2)")
    parser.add_argument("--photos", default="hymenoptera", choices=list(PHOTOS))
    parser.add_argument("--latency-ms", type=float, default=50.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", default="", help="other reading thread counts to time for URLs, e.g. 4,8")
    args = parser.parse_args()
    print(machine_line(torch=False))
    check_idle()
    import headstart
    from headstart.service import ahead
    from headstart.service.ahead import default_threads

    root, repeat = PHOTOS[args.photos]
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = args.model
        else:
            from serve_load import make_bundle

            model = make_bundle(tmp)
        server, base = serve(root, args.latency_ms / 1000)
        files = sorted(p for p in root.rglob("*.jpg"))
        urls = [f"{base}/{p.relative_to(root)}?copy={i}" for i in range(repeat) for p in files]  # each read again
        loaded = headstart.load(model)
        loaded.predict(urls[:8])  # the runtime warm
        url_threads = ahead.URL_THREADS
        others = [int(n) for n in args.threads.split(",") if n]
        counts = {"url threads": url_threads, "file threads": 0} | {f"{n} threads": n for n in others}
        rates = {label: [] for label in counts}
        for _ in range(args.rounds):
            for label, threads in counts.items():
                ahead.URL_THREADS = threads  # 0: the files' default, one thread per CPU
                started = time.perf_counter()
                answers = loaded.predict(urls)
                rates[label].append(len(urls) / (time.perf_counter() - started))
                errors = sum(a.error is not None for a in answers)
                if errors:
                    raise SystemExit(f"{errors} of {len(urls)} URLs failed: {answers[0].error}")
        ahead.URL_THREADS = url_threads
        server.kill()
    fast, slow = statistics.median(rates["url threads"]), statistics.median(rates["file threads"])
    print(
        f"{len(urls)} URLs of {args.photos} photos, {args.latency_ms:g} ms per request: {url_threads} reading "
        f"threads {fast:.1f} img/s, {default_threads()} (one per CPU) {slow:.1f} img/s: {fast / slow:.2f}x "
        f"(medians of {args.rounds}; each: {[round(r, 1) for r in rates['url threads']]} vs "
        f"{[round(r, 1) for r in rates['file threads']]})"
    )
    for n in others:
        print(f"  {n} reading threads: {statistics.median(rates[f'{n} threads']):.1f} img/s")


if __name__ == "__main__":
    main()
