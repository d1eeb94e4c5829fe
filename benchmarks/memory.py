"""Where a server's memory goes: ONNX Runtime's memory arena, and requests spread over many threads.

Each case runs in a fresh process for ``--seconds`` and prints resident memory (RSS) every few seconds and the
throughput, so the ratios are measured in one run on one machine:

- ``arena`` / ``no-arena``: one thread runs decode + preprocess + ONNX Runtime on random batch sizes 1-32 (as
  adaptive batching produces), with the CPU memory arena on (the default) and off (HEADSTART_MEMORY_ARENA=0).
  Always on ONNX Runtime, whose setting it is (OpenVINO, the default CPU runtime, has no such arena).
- ``spread`` / ``one-thread``: 16 threads send single images, one at a time (as BentoML runs a worker's requests),
  either each running the work itself under a lock (as BentoML's thread pool did) or handing it to one inference
  thread (what the service does now).

``--baseline REV`` runs each case with the code of commit REV as well, right after today's (``_common.code_of``).

    .venv/bin/python benchmarks/memory.py --model BUNDLE [--seconds 40] [--cases arena,...] [--baseline REV]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import SHARED, check_idle, codes, machine_line

ROOT = Path(__file__).resolve().parents[1]
IMAGES = sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))
CASES = ("arena", "no-arena", "spread", "one-thread")


def child(case: str, model: str, seconds: float) -> None:
    import psutil

    sys.path.insert(0, str(ROOT))
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.preprocess import decode_for

    arena_case = case in ("arena", "no-arena")  # the arena is ONNX Runtime's (served on GPUs, or when asked for)
    bundle = load_bundle(
        model,
        runtime="onnxruntime" if arena_case else "auto",
        threads=2 if arena_case else 1,
        memory_arena=case != "no-arena",
    )
    data = [p.read_bytes() for p in IMAGES]
    proc = psutil.Process()
    samples, count, stop = [], [0], time.perf_counter() + seconds
    start_rss = proc.memory_info().rss / 2**20

    def batches() -> None:
        rng = random.Random(0)
        while time.perf_counter() < stop:
            n = rng.randint(1, 32)
            classify_images(bundle, [decode_for(data[(count[0] + i) % len(data)], bundle.spec) for i in range(n)])
            count[0] += n

    worker = ThreadPoolExecutor(1)
    lock = threading.Lock()

    def single(k: int) -> None:
        i = k
        while time.perf_counter() < stop:
            i += 16
            blob = data[i % len(data)]
            if case == "spread":
                with lock:
                    classify_images(bundle, [decode_for(blob, bundle.spec)])
            else:
                worker.submit(lambda b=blob: classify_images(bundle, [decode_for(b, bundle.spec)])).result()
            count[0] += 1

    threads = (
        [threading.Thread(target=batches)]
        if case in ("arena", "no-arena")
        else [threading.Thread(target=single, args=(k,)) for k in range(16)]
    )
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    while time.perf_counter() < stop:
        time.sleep(min(5.0, max(0.0, stop - time.perf_counter())))
        samples.append((round(time.perf_counter() - t0), round(proc.memory_info().rss / 2**20)))
    for t in threads:
        t.join()
    print(
        json.dumps(
            {
                "case": case,
                "start": round(start_rss),
                "samples": samples,
                "images_per_s": count[0] / (time.perf_counter() - t0),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="bundle directory or model-store tag")
    parser.add_argument("--seconds", type=float, default=40)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--baseline", metavar="REV", help="also run each case with the code of this commit")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.seconds)
        return
    cases = args.cases.split(",")
    if not set(cases) <= set(CASES):
        parser.error(f"--cases: choose from {', '.join(CASES)}")
    print(machine_line(torch=False))
    busy = check_idle()
    print(f"other CPU use before: {busy:.0%}; {args.seconds:.0f} s per case, RSS in MiB")
    model = args.model if not Path(args.model).exists() else str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory() as tmp:
        who = codes(args.baseline, Path(tmp))
        results = {}
        for case in cases:
            for name, where in who.items():
                command = [sys.executable, __file__, "--model", model, "--seconds", str(args.seconds), "--child", case]
                out = subprocess.run(command, capture_output=True, text=True, check=True, **(where or {})).stdout
                results[case, name] = r = json.loads(out.strip().splitlines()[-1])
                curve = ", ".join(f"{t}s {m}" for t, m in r["samples"])
                label = f"{case} ({name})" if where else case
                print(f"{label:<11} {r['images_per_s']:6.1f} img/s  RSS at start {r['start']}, then {curve}")
    pairs = [((a, "today"), (b, "today")) for a, b in (("arena", "no-arena"), ("one-thread", "spread"))]
    pairs += [((case, "today"), (case, args.baseline)) for case in dict.fromkeys(cases) if args.baseline]
    for (a, name_a), (b, name_b) in pairs:
        if (a, name_a) in results and (b, name_b) in results:
            ra, rb = results[a, name_a], results[b, name_b]
            print(
                f"{a} / {b + (f' ({name_b})' if name_b != 'today' else '')}: throughput "
                f"{ra['images_per_s'] / rb['images_per_s']:.2f}x, final RSS "
                f"{ra['samples'][-1][1] / rb['samples'][-1][1]:.2f}x"
            )


if __name__ == "__main__":
    main()
