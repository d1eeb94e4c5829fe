"""Batch prediction on Ray Data (`headstart predict-batch`) against `headstart predict` in one process (which
decodes on threads ahead of the model), same bundle and runtime, one run: images/s of each, Ray's startup overhead
apart, and the same job on a two-node cluster simulated on this machine (ray.cluster_utils.Cluster, one CPU per
node).

The images (``--photos``): the shared hymenoptera validation photos repeated (``--repeat``, 20 by default: 3060
paths), or the three full-size camera JPEGs of ../shared/photos/camera repeated (``camera``: 100 times by default,
300 paths), the photos users' archives hold. ``--baseline REV`` also runs the single process and the local Ray job
with the code of commit REV (its files laid out as the package: ``_common.code_of``; same bundle and photos, in the
same run), e.g. the commit before a change of the decoding. The `headstart predict` command itself is timed too, as
a user runs it (a new process, its start and the model's loading included): today's code and the baseline's.

    .venv/bin/python benchmarks/batch_predict.py [--model BUNDLE] [--photos hymenoptera|camera] [--repeat N]
        [--baseline REV] [--no-two-nodes] [--variant fp32|int8]

``--variant int8`` runs the bundle's int8 file (exported with ``--int8``) in every job, the baseline's too.
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
model, listing, probe, out, variant = sys.argv[1:6]
started = time.perf_counter()
predict_batch(model, probe, Path(out) / "probe", part_size=8, progress=False, variant=variant)
startup = time.perf_counter() - started
t0 = time.perf_counter()
summary = predict_batch(model, listing, Path(out) / "job", part_size=500, progress=False, variant=variant)
print(time.perf_counter() - t0, startup, summary["errors"])
ray.shutdown()
"""


#: the Python API's loop as a commit has it (`headstart.load(...).predict`; since 477c959 `headstart predict` prints
#: from it), printing images/s: the single process, today's code or a baseline's
SINGLE_JOB = """
import sys, time
import headstart
model, listing, variant = sys.argv[1:4]
paths = open(listing).read().splitlines()
loaded = headstart.load(model, variant=variant)
loaded.predict(paths[:8])  # the runtime warm, as a server's
started = time.perf_counter()
answers = loaded.predict(paths)
print(len(paths) / (time.perf_counter() - started), sum(a.error is not None for a in answers))
"""


def single_process(
    model: str, listing: str, where: dict | None = None, variant: str = "fp32"
) -> tuple[float, int] | None:
    """(images/s, errors) of `headstart predict`'s loop in a new process (:data:`SINGLE_JOB`): read, decode (ahead,
    on threads, since this change), preprocess, classify; ``where``: :func:`code_of`'s, for a baseline commit.
    ``None`` for a baseline older than ``headstart.load`` (3940dc3, for one), which has no such loop to time."""
    proc = subprocess.run(
        [sys.executable, "-c", SINGLE_JOB, model, listing, variant], **(where or {}), capture_output=True, text=True
    )
    if proc.returncode:
        if where and "module 'headstart' has no attribute 'load'" in proc.stderr:
            return None
        raise RuntimeError(f"the single process failed: {proc.stderr[-2000:]}")
    out = proc.stdout.split()
    return float(out[-2]), int(out[-1])


def command(
    model: str, paths: list[str], where: dict | None = None, variant: str = "fp32"
) -> tuple[float, list[str]] | None:
    """(images/s, each image's best label or error) of `headstart predict MODEL PATHS...` as a user runs it: a new
    process, its whole wall time (start, imports, loading the model included); ``where``: a baseline commit's.
    ``None`` for a baseline whose `python -m headstart predict` does not start (3940dc3's package has no
    ``__main__``; the editable install then finds this checkout's, which imports what that code lacks)."""
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "headstart", "predict", model, *paths, "--json", "--variant", variant],
        **(where or {}),
        capture_output=True,
        text=True,
    )
    seconds = time.perf_counter() - started
    lines = proc.stdout.splitlines()
    if where and proc.returncode and not lines:
        return None
    # exit status 1: some image could not be read (its line says so); a crash exits 1 too, with no line per image
    if proc.returncode not in (0, 1) or len(lines) != len(paths):
        raise RuntimeError(f"headstart predict failed (status {proc.returncode}): {proc.stderr[-2000:]}")
    answers = [json.loads(line) for line in lines]
    return len(paths) / seconds, [a.get("error") or a["predictions"][0]["label"] for a in answers]


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


def two_nodes(
    model: str, listing: str, probe: str, tmp: Path, images: int, variant: str = "fp32"
) -> tuple[float, float, dict]:
    """The job on a two-node cluster simulated on this machine (one CPU per node): (img/s, startup, summary)."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    try:
        seconds, startup, summary = ray_job(
            model,
            listing,
            probe,
            tmp / "two",
            actors=2,
            cpus_per_actor=0.5,
            ray_address=cluster.address,
            variant=variant,
        )
    finally:
        cluster.shutdown()
    return images / seconds, startup, summary


def baseline(
    where: dict, model: str, listing: str, probe: str, tmp: Path, variant: str = "fp32"
) -> tuple[float, float, int]:
    """(seconds, startup seconds, errors) of the local Ray job run by a commit's code (``where``: :func:`code_of`'s;
    Ray's workers inherit the environment)."""
    out = subprocess.run(
        [sys.executable, "-c", BASELINE_JOB, model, listing, probe, str(tmp / "baseline-out"), variant],
        **where,
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
    parser.add_argument("--variant", choices=("fp32", "int8"), default="fp32", help="the bundle's file to run")
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
        where = code_of(args.baseline, Path(tmp)) if args.baseline else None
        base, errors = single_process(model, str(listing), variant=args.variant)
        print(f"single process (`headstart predict`): {base:.1f} img/s over {len(paths)} images, errors {errors}")
        result = {"photos": args.photos, "variant": args.variant, "single_process_ips": round(base, 1)}
        timed = single_process(model, str(listing), where, args.variant) if where else None
        if where and timed is None:
            print(f"single process with the code of {args.baseline}: none (it has no `headstart.load`)", flush=True)
        elif where:
            before, errors0 = timed
            result |= {"baseline_single_process_ips": round(before, 1), "single_vs_baseline": round(base / before, 2)}
            print(
                f"single process with the code of {args.baseline}: {before:.1f} img/s, errors {errors0}; now "
                f"{base / before:.2f}x that",
                flush=True,
            )
        cli, said = command(model, paths, variant=args.variant)
        print(f"`headstart predict` command (new process, start included): {cli:.1f} img/s", flush=True)
        result["command_ips"] = round(cli, 1)
        ran = command(model, paths, where, args.variant) if where else None
        if where and ran is None:
            print(
                f"`headstart predict` command with the code of {args.baseline}: none (its `python -m headstart "
                "predict` does not start)"
            )
        elif where:
            cli0, said0 = ran
            same = sum(a == b for a, b in zip(said, said0, strict=True))
            result |= {"baseline_command_ips": round(cli0, 1), "command_vs_baseline": round(cli / cli0, 2)}
            print(
                f"`headstart predict` command with the code of {args.baseline}: {cli0:.1f} img/s; now "
                f"{cli / cli0:.2f}x that; the same best label (or error) for {same} of {len(said)} images",
                flush=True,
            )
        seconds, startup, summary = ray_job(
            model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp) / "local", variant=args.variant
        )
        local = len(paths) / seconds
        print(
            f"Ray, local ({summary['actors']} actor(s)): {local:.1f} img/s ({local / base:.2f}x single process), "
            f"startup {startup:.1f} s, errors {summary['errors']}",
            flush=True,
        )
        result["ray_local_ips"] = round(local, 1)
        if where:
            seconds0, startup0, errors0 = baseline(
                where, model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp), args.variant
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
                model, str(listing), str(Path(tmp) / "probe.txt"), Path(tmp), len(paths, args.variant)
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
