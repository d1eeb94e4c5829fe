"""Batch prediction on Ray Data (`headstart predict-batch`) against the plain single-process loop of `headstart
predict`, same bundle and runtime, one run: images/s of each, Ray's startup overhead apart, and the same job on a
two-node cluster simulated on this machine (ray.cluster_utils.Cluster, one CPU per node).

The images (``--photos``): the shared hymenoptera validation photos repeated (``--repeat``, 20 by default: 3060
paths), or the three full-size camera JPEGs of ../shared/photos/camera repeated (``camera``: 100 times by default,
300 paths), the photos users' archives hold. ``--baseline REV`` also runs the local Ray job with the code of commit
REV (a git worktree, same bundle and photos, in the same run), e.g. the commit before a change of the decoding.

    .venv/bin/python benchmarks/batch_predict.py [--model BUNDLE] [--photos hymenoptera|camera] [--repeat N]
        [--baseline REV] [--no-two-nodes]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, code_of, machine_line

PHOTOS = {
    "hymenoptera": sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg")),
    "camera": sorted((SHARED / "photos" / "camera").glob("*.jpg")),
}
#: the job a baseline commit runs: the same two calls as ray_job, printing (total seconds, startup seconds)
BASELINE_JOB = """
import sys, time
from pathlib import Path
import ray
from headstart.service.batch import predict_batch
model, listing, probe, out = sys.argv[1:5]
started = time.perf_counter()
predict_batch(model, probe, Path(out) / "probe", part_size=8, progress=False)
startup = time.perf_counter() - started
t0 = time.perf_counter()
summary = predict_batch(model, listing, Path(out) / "job", part_size=500, progress=False)
print(time.perf_counter() - t0, startup, summary["errors"])
ray.shutdown()
"""


def single_process(model: str, paths: list[str]) -> float:
    """images/s of `headstart predict`'s loop: read, decode, preprocess, classify, one image at a time."""
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.preprocess import decode_for

    bundle = load_bundle(model)
    started = time.perf_counter()
    for path in paths:
        classify_images(bundle, [decode_for(Path(path), bundle.spec)], 5)
    return len(paths) / (time.perf_counter() - started)


def ray_job(model: str, listing: str, probe: str, out: Path, **kw) -> tuple[float, float, dict]:
    """(total seconds, startup seconds (Ray up, actors loaded, first part written), summary) of one predict-batch."""
    import ray

    from headstart.service.batch import predict_batch

    started = time.perf_counter()
    probe = predict_batch(model, probe, out / "probe", part_size=8, progress=False, **kw)  # startup + 8 images
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    summary = predict_batch(model, listing, out / "job", part_size=500, progress=False, **kw)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds, startup, {**summary, "probe_images": probe["images"]}


def two_nodes(model: str, listing: str, probe: str, tmp: Path, images: int) -> tuple[float, float, dict]:
    """The job on a two-node cluster simulated on this machine (one CPU per node): (img/s, startup, summary)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        seconds, startup, summary = ray_job(
            model, listing, probe, tmp / "two", actors=2, cpus_per_actor=0.5, ray_address=cluster.address
        )
    finally:
        cluster.shutdown()
    return images / seconds, startup, summary


def baseline(rev: str, model: str, listing: str, probe: str, tmp: Path) -> tuple[float, float, int]:
    """(seconds, startup seconds, errors) of the local Ray job run by the code of commit ``rev`` (:func:`code_of`;
    Ray's workers inherit the environment)."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_JOB, model, listing, probe, str(tmp / "baseline-out")],
        **code_of(rev, tmp),
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return float(out[-3]), float(out[-2]), int(out[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: train and export the hymenoptera MobileNetV2)")
    parser.add_argument("--photos", default="hymenoptera", choices=list(PHOTOS))
    parser.add_argument("--repeat", type=int, help="times each photo is listed (default: 20 hymenoptera, 100 camera)")
    parser.add_argument("--baseline", metavar="REV", help="also run the local job with the code of this commit")
    parser.add_argument("--no-two-nodes", dest="two_nodes", action="store_false")
    args = parser.parse_args()
    repeat = args.repeat or (20 if args.photos == "hymenoptera" else 100)
    print(machine_line())
    busy = check_idle()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = args.model
        else:
            from serve_load import make_bundle

            model = make_bundle(tmp)
        photos = [str(p) for p in PHOTOS[args.photos]]
        paths = photos * repeat
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths) + "\n")
        (Path(tmp) / "probe.txt").write_text("\n".join((photos * 8)[:8]) + "\n")
        base = single_process(model, paths)
        print(
            f"single process (`headstart predict` loop, batch 1): {base:.1f} img/s over {len(paths)} images", flush=True
        )
        seconds, startup, summary = ray_job(model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp) / "local")
        local = len(paths) / seconds
        print(
            f"Ray, local ({summary['actors']} actor(s)): {local:.1f} img/s ({local / base:.2f}x single process), "
            f"startup {startup:.1f} s, errors {summary['errors']}",
            flush=True,
        )
        result = {"photos": args.photos, "single_process_ips": round(base, 1), "ray_local_ips": round(local, 1)}
        if args.baseline:
            seconds0, startup0, errors0 = baseline(
                args.baseline, model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp)
            )
            before = len(paths) / seconds0
            result |= {
                "baseline": args.baseline,
                "baseline_ips": round(before, 1),
                "vs_baseline": round(local / before, 2),
            }
            print(
                f"Ray, local, with the code of {args.baseline}: {before:.1f} img/s, startup {startup0:.1f} s, errors "
                f"{errors0}; now {local / before:.2f}x that",
                flush=True,
            )
        if args.two_nodes:
            two, startup2, summary2 = two_nodes(
                model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp), len(paths)
            )
            result["ray_two_node_ips"] = round(two, 1)
            print(
                f"Ray, two simulated nodes on the same 2 cores ({summary2['actors']} actors on "
                f"{len(summary2['nodes'])} nodes): {two:.1f} img/s ({two / base:.2f}x), startup {startup2:.1f} s, "
                f"errors {summary2['errors']}"
            )
        print(json.dumps({**result, "ratio_local": round(local / base, 2), "startup_s": round(startup, 1)}))
    print(f"target: Ray on this machine >= 0.9x the single process; other CPU use before the run: {busy:.0%}")


if __name__ == "__main__":
    main()
