"""Batch prediction on Ray Data (`headstart predict-batch`) against the plain single-process loop of `headstart
predict`, same bundle and runtime, one run: images/s of each, Ray's startup overhead apart, and the same job on a
two-node cluster simulated on this machine (ray.cluster_utils.Cluster, one CPU per node).

The images are the shared hymenoptera validation photos repeated (``--repeat``, 20 by default: 3060 paths).

    .venv/bin/python benchmarks/batch_predict.py [--model BUNDLE] [--repeat 20]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import SHARED, check_idle, machine_line


def single_process(model: str, paths: list[str]) -> float:
    """images/s of `headstart predict`'s loop: read, decode, preprocess, classify, one image at a time."""
    from service.bundle import load_bundle
    from service.inference import classify_images
    from service.preprocess import decode_for

    bundle = load_bundle(model)
    started = time.perf_counter()
    for path in paths:
        classify_images(bundle, [decode_for(Path(path), bundle.spec)], 5)
    return len(paths) / (time.perf_counter() - started)


def ray_job(model: str, listing: str, probe: str, out: Path, **kw) -> tuple[float, float, dict]:
    """(total seconds, startup seconds (Ray up, actors loaded, first part written), summary) of one predict-batch."""
    import ray

    from service.batch import predict_batch

    started = time.perf_counter()
    probe = predict_batch(model, probe, out / "probe", part_size=8, progress=False, **kw)  # startup + 8 images
    startup = time.perf_counter() - started
    t0 = time.perf_counter()
    summary = predict_batch(model, listing, out / "job", part_size=500, progress=False, **kw)
    seconds = time.perf_counter() - t0
    ray.shutdown()
    return seconds, startup, {**summary, "probe_images": probe["images"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="bundle directory (default: train and export the hymenoptera MobileNetV2)")
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    print(machine_line())
    busy = check_idle()
    with tempfile.TemporaryDirectory() as tmp:
        if args.model:
            model = args.model
        else:
            from serve_load import make_bundle

            model = make_bundle(tmp)
        photos = [str(p) for p in sorted((SHARED / "data" / "hymenoptera" / "val").rglob("*.jpg"))]
        paths = photos * args.repeat
        listing = Path(tmp) / "images.txt"
        listing.write_text("\n".join(paths) + "\n")
        (Path(tmp) / "probe.txt").write_text("\n".join(photos[:8]) + "\n")
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
        from ray.cluster_utils import Cluster

        cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        try:
            seconds2, startup2, summary2 = ray_job(
                model,
                str(listing),
                str(Path(tmp) / "probe.txt"),
                Path(tmp) / "two",
                actors=2,
                cpus_per_actor=0.5,
                ray_address=cluster.address,
            )
        finally:
            cluster.shutdown()
        two = len(paths) / seconds2
        print(
            f"Ray, two simulated nodes on the same 2 cores ({summary2['actors']} actors on "
            f"{len(summary2['nodes'])} nodes): {two:.1f} img/s ({two / base:.2f}x), startup {startup2:.1f} s, "
            f"errors {summary2['errors']}"
        )
        print(
            json.dumps(
                {
                    "single_process_ips": round(base, 1),
                    "ray_local_ips": round(local, 1),
                    "ray_two_node_ips": round(two, 1),
                    "ratio_local": round(local / base, 2),
                    "startup_s": round(startup, 1),
                }
            )
        )
    print(f"target: Ray on this machine >= 0.9x the single process; other CPU use before the run: {busy:.0%}")


if __name__ == "__main__":
    main()
