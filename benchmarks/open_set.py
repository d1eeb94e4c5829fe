"""Open-set recognition: how well each score tells a model's own classes from images of other things, side by side.

Trains (or takes with --run) the hymenoptera MobileNetV2 classifier, then on the very same frozen features scores
its 153 validation images (its own classes, never in the bank nor fitted by the head) against images of other
things: the shared photos (a cat, a bird, a dragonfly, a hot dog, Grace Hopper, three full-size camera shots) and
the 128 coco128 images (people, streets, animals, food; no insects). Per score: AUROC and the share of other images
let through as "ants" or "bees" at the threshold that keeps 95% of the validation images, for

- MSP: 1 - the top softmax probability (the baseline every classifier has);
- energy: -logsumexp of the logits;
- Mahalanobis: the smallest class-conditional distance with a shared, shrunk covariance (raw and L2-normalised
  features);
- kNN: mean cosine distance to the k nearest training images (k = 1, 5, 10, 50): the served score is k = 5.

Then the served decision itself, through the exported bundle and the service's code on ONNX Runtime and on
OpenVINO (bf16 where the export allowed it): its kept rate on the validation images (the calibration set: 95% by
construction) and, more honest, with the threshold set on one half of them and measured on the other (both ways);
the let-through rate on each set of other images; the bank's size; and the latency of the in-process /classify
pipeline (decode, preprocess, model, answer) with the score against the same model exported without it, measured
alternately in one run (median of rounds), and over HTTP (`bentoml serve`, concurrency 1, p50) unless --no-http.

    .venv/bin/python benchmarks/open_set.py [--run RUN_DIR] [--rounds 7] [--no-http] [--json OUT.json]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import SHARED, check_idle, machine_line, running_server, train_hymenoptera

HYMENOPTERA = SHARED / "data" / "hymenoptera"
PHOTOS = sorted(p for p in (SHARED / "photos").rglob("*") if p.suffix.lower() in (".jpg", ".bmp"))
COCO = sorted((SHARED / "data" / "coco128" / "images" / "train2017").glob("*.jpg"))


def train_run(tmp: Path) -> Path:
    return train_hymenoptera(tmp / "run", cache_dir=str(tmp / "cache"))


def features(model, paths: list[Path], spec) -> tuple[np.ndarray, np.ndarray]:
    """Pooled features (N, C) and logits (N, K) of image files through the run's PyTorch model."""
    import torch

    from headstart.service.inference import outputs_of_files

    @torch.inference_mode()
    def run(pixels: np.ndarray) -> list[np.ndarray]:
        pooled = model.pooled(torch.from_numpy(pixels))
        return [pooled.numpy(), model.head(pooled).numpy()]

    return tuple(outputs_of_files(run, paths, spec))


def normalise(x: np.ndarray) -> np.ndarray:
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def knn(bank: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    return 1 - np.sort(normalise(x) @ normalise(bank).T, axis=1)[:, -k:].mean(axis=1)


def mahalanobis(train: np.ndarray, y: np.ndarray, x: np.ndarray, normalised: bool, shrink: float = 0.5) -> np.ndarray:
    if normalised:
        train, x = normalise(train), normalise(x)
    means = np.stack([train[y == c].mean(axis=0) for c in np.unique(y)])
    centred = train - means[y]
    cov = centred.T @ centred / len(centred)
    cov = (1 - shrink) * cov + shrink * np.trace(cov) / len(cov) * np.eye(len(cov))
    precision = np.linalg.inv(cov)
    return np.min([np.einsum("nc,cd,nd->n", x - m, precision, x - m) for m in means], axis=0)


def msp_and_energy(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    top = logits.max(axis=1, keepdims=True)
    lse = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    probs = np.exp(logits - top) / np.exp(logits - top).sum(axis=1, keepdims=True)
    return 1 - probs.max(axis=1), -lse


def compare_scores(train, train_y, val, val_y, others: dict) -> list[dict]:
    """AUROC and let-through at 95% kept of every score, on every set of other images."""
    from headstart.open_set import calibrate
    from headstart.tasks.classify.metrics import auroc

    (tf, _), (vf, vl) = train, val
    scores = {}
    msp, energy = msp_and_energy(vl)
    scores["MSP"] = (msp, {k: msp_and_energy(o[1])[0] for k, o in others.items()})
    scores["energy"] = (energy, {k: msp_and_energy(o[1])[1] for k, o in others.items()})
    for norm in (False, True):
        name = f"Mahalanobis{' (normalised)' if norm else ''}"
        scores[name] = (
            mahalanobis(tf, train_y, vf, norm),
            {k: mahalanobis(tf, train_y, o[0], norm) for k, o in others.items()},
        )
    for k in (1, 5, 10, 50):
        scores[f"kNN k={k}{' (served)' if k == 5 else ''}"] = (
            knn(tf, vf, k),
            {n: knn(tf, o[0], k) for n, o in others.items()},
        )
    rows = []
    for name, (own, other) in scores.items():
        threshold, _ = calibrate(own, val_y, ["ants", "bees"], 0.95)
        row = {"score": name}
        for set_name, values in other.items():
            row[f"{set_name} AUROC"] = auroc(own, values)
            row[f"{set_name} through"] = float((values <= threshold).mean())
        rows.append(row)
    return rows


def served(bundle_dir: Path, val_paths: list[Path], val_y: np.ndarray, others: dict[str, list[Path]]) -> list[dict]:
    """The served decision, through the bundle and the service's code, on each runtime."""
    from headstart.open_set import calibrate
    from headstart.service.ahead import load_batches
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import scores_and_novelty

    rows = []
    for runtime in ("onnxruntime", "openvino"):
        bundle = load_bundle(bundle_dir, runtime=runtime)
        threshold = bundle.open_set["threshold"]

        def novelty(paths, bundle=bundle):
            return np.concatenate([scores_and_novelty(bundle, px)[1] for px in load_batches(paths, bundle.spec, 32)])

        own = novelty(val_paths)
        halves = [np.arange(len(own)) % 2 == h for h in (0, 1)]
        held_out = []  # the threshold set on one half of the validation images, the kept rate measured on the other
        for fit, test in (halves, halves[::-1]):
            t, _ = calibrate(own[fit], val_y[fit], ["ants", "bees"], 0.95)
            held_out.append(float((own[test] <= t).mean()))
        row = {
            "runtime": f"{runtime} ({bundle.precision})",
            "threshold": threshold,
            "kept (calibration images)": float((own <= threshold).mean()),
            "kept (held-out half)": float(np.mean(held_out)),
        }
        for name, paths in others.items():
            row[f"{name} through"] = float((novelty(paths) <= threshold).mean())
        rows.append(row)
    return rows


def latency(with_score: Path, without: Path, rounds: int) -> dict:
    """Per-image time of the in-process /classify pipeline for both bundles: each round times 60 photos through one
    and then the other (the order swapped every round); the medians over rounds, and the median of the per-round
    ratios."""
    from headstart.service.bundle import load_bundle
    from headstart.service.inference import classify_images
    from headstart.service.preprocess import decode_for

    payloads = [p.read_bytes() for p in sorted((HYMENOPTERA / "val").rglob("*.jpg"))[:60]]
    bundles = {"with": load_bundle(with_score), "without": load_bundle(without)}
    for bundle in bundles.values():
        for data in payloads[:10]:
            classify_images(bundle, [decode_for(data, bundle.spec)])
    times: dict[str, list[float]] = {name: [] for name in bundles}
    for r in range(rounds):
        for name in ("with", "without") if r % 2 == 0 else ("without", "with"):
            started = time.perf_counter()
            for data in payloads:
                classify_images(bundles[name], [decode_for(data, bundles[name].spec)])
            times[name].append((time.perf_counter() - started) / len(payloads) * 1000)
    ratios = [a / b for a, b in zip(times["with"], times["without"], strict=True)]
    return {
        "ms_with": statistics.median(times["with"]),
        "ms_without": statistics.median(times["without"]),
        "ratio": statistics.median(ratios),
        "runtime": f"{bundles['with'].runtime} ({bundles['with'].precision})",
    }


def bank_cost(run, tmp: Path, sizes: tuple[int, ...] = (256, 1024, 4096), rounds: int = 41) -> dict:
    """What the bank's size costs the model itself: the run's model exported with a bank of each size (random unit
    vectors: the cost is reading the bank, whatever it holds) against no bank, on the service's CPU runtime and
    precision, one image at a time: per round 20 runs of each (the order reversed every other round), the median
    over rounds of each bank's extra time (ms)."""
    import torch

    from headstart.models import Classifier, Novelty, NoveltyConfig, feature_bank
    from headstart.onnx_io import export_onnx
    from headstart.service.runtime import choose_runtime, cpu_computes_bf16, open_session

    m, size = run.model, run.spec.input_size
    files = {}
    for n in (0, *sizes):
        novelty = (
            None
            if n == 0
            else Novelty(feature_bank(torch.randn(n, m.head.cfg.in_features)), NoveltyConfig(5, 0.5, 0.95))
        )
        names = ["probabilities", "class_map", *(["novelty"] if novelty is not None else [])]
        files[n] = tmp / f"bank-{n}.onnx"
        export_onnx(Classifier(m.normalize, m.features, m.head, novelty).eval(), files[n], size, output_names=names)
    runtime, _ = choose_runtime("auto", "cpu")
    precision = "bf16" if runtime == "openvino" and cpu_computes_bf16() else "fp32"  # what the service would use
    sessions = {n: open_session(f, runtime, "cpu", precision=precision) for n, f in files.items()}
    wanted = {n: ["probabilities", *(["novelty"] if n else [])] for n in files}
    pixels = np.random.default_rng(0).uniform(0, 255, (1, 3, size, size)).astype(np.float32)
    for n, session in sessions.items():
        for _ in range(20):
            session.run(wanted[n], pixels)
    extra: dict[int, list[float]] = {n: [] for n in sizes}
    alone = []
    for r in range(rounds):
        ms = {}
        for n in files if r % 2 == 0 else reversed(list(files)):
            started = time.perf_counter()
            for _ in range(20):
                sessions[n].run(wanted[n], pixels)
            ms[n] = (time.perf_counter() - started) / 20 * 1000
        alone.append(ms[0])
        for n in sizes:
            extra[n].append(ms[n] - ms[0])
    cost = {f"bank {n}": round(statistics.median(v), 3) for n, v in extra.items()}
    return {"runtime": f"{runtime} ({sessions[0].precision})", **cost, "no bank": round(statistics.median(alone), 3)}


def http_latency(with_score: Path, without: Path, tmp: Path, requests: int = 300) -> dict:
    """p50 of /classify over HTTP at concurrency 1 (ms), both servers up at once (one worker each) and the requests
    alternating between them, so that both see the same machine."""
    import httpx

    payloads = [p.read_bytes() for p in sorted((HYMENOPTERA / "val").rglob("*.jpg"))[:50]]
    for name in ("with", "without"):
        (tmp / name).mkdir(parents=True, exist_ok=True)
    env = {"HEADSTART_WORKERS": "1"}
    with (
        running_server(str(with_score), tmp / "with", **env) as (url_with, _, _),
        running_server(str(without), tmp / "without", **env) as (url_without, _, _),
        httpx.Client(timeout=30) as client,
    ):
        urls = {"with": url_with, "without": url_without}
        for url in urls.values():
            for data in payloads[:10]:
                client.post(f"{url}/classify", files={"image": ("x.jpg", data)}).raise_for_status()
        times: dict[str, list[float]] = {name: [] for name in urls}
        for i in range(requests):
            for name in ("with", "without") if i % 2 == 0 else ("without", "with"):
                started = time.perf_counter()
                resp = client.post(f"{urls[name]}/classify", files={"image": ("x.jpg", payloads[i % len(payloads)])})
                times[name].append((time.perf_counter() - started) * 1000)
                resp.raise_for_status()
    p50 = {name: statistics.median(values) for name, values in times.items()}
    return {
        "http_p50_with": p50["with"],
        "http_p50_without": p50["without"],
        "http_ratio": p50["with"] / p50["without"],
    }


def table(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = [" | ".join(keys), " | ".join("---" for _ in keys)]
    for row in rows:
        lines.append(" | ".join(f"{row[k]:.3f}" if isinstance(row[k], float) else str(row[k]) for k in keys))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", help="a trained hymenoptera run (default: train one, about 30 s)")
    parser.add_argument("--rounds", type=int, default=15, help="alternating latency rounds")
    parser.add_argument("--no-http", dest="http", action="store_false", help="skip the HTTP latency")
    parser.add_argument("--json", help="write every figure here")
    args = parser.parse_args()
    print(machine_line())
    check_idle()
    from headstart.exporter import export_bundle
    from headstart.loaded_run import load_run

    tmp = Path(tempfile.mkdtemp(prefix="open-set-"))
    try:
        run_dir = Path(args.run) if args.run else train_run(tmp)
        run = load_run(run_dir)
        splits = json.loads((run_dir / "splits.json").read_text())
        train_paths, train_y = [Path(p) for p, _ in splits["train"]], np.array([y for _, y in splits["train"]])
        val_paths, val_y = [Path(p) for p, _ in splits["val"]], np.array([y for _, y in splits["val"]])
        others = {"photos": PHOTOS, "coco128": COCO}
        model, spec = run.model.eval(), run.spec
        feats = {name: features(model, paths, spec) for name, paths in (("train", train_paths), ("val", val_paths))}
        other_feats = {name: features(model, paths, spec) for name, paths in others.items()}
        print(
            f"\nown classes: {len(val_paths)} validation images; other things: "
            + ", ".join(f"{k} {len(v)}" for k, v in others.items())
        )
        scores = compare_scores(feats["train"], train_y, feats["val"], val_y, other_feats)
        print(
            "\nscores side by side (the same frozen features; through = share of other images kept as a class at "
            "the threshold keeping 95% of the validation images)\n" + table(scores)
        )
        bundle = export_bundle(run_dir, tmp / "bundle", store=False).bundle_dir
        old_run = tmp / "without"
        shutil.copytree(run_dir, old_run, ignore=shutil.ignore_patterns("bundle", "eval"))
        (old_run / "open_set.safetensors").unlink()
        without = export_bundle(old_run, tmp / "bundle-without", store=False).bundle_dir
        decisions = served(bundle, val_paths, val_y, others)
        print("\nthe served decision\n" + table(decisions))
        manifest = json.loads((bundle / "manifest.json").read_text())
        sizes = {name: (b / "model.onnx").stat().st_size for name, b in (("with", bundle), ("without", without))}
        calibration = manifest["open_set"]["calibration"]
        print(
            f"\nbank: {calibration['bank_vectors']} vectors, {calibration['bank_bytes'] / 1e6:.2f} MB in float16; "
            f"model.onnx {sizes['with'] / 1e6:.2f} MB with it, {sizes['without'] / 1e6:.2f} MB without"
        )
        speed = latency(bundle, without, args.rounds)
        print(
            f"\n/classify in process on {speed['runtime']} (decode, preprocess, model, answer; {args.rounds} "
            f"alternating rounds of 60 photos): {speed['ms_with']:.2f} ms with the score, {speed['ms_without']:.2f} "
            f"ms without (medians); median ratio {speed['ratio']:.3f}"
        )
        cost = bank_cost(run, tmp)
        speed["bank_cost_ms"] = cost
        print(
            f"what the bank costs the model per image on {cost['runtime']} (model alone {cost['no bank']:.2f} ms): "
            + ", ".join(f"{k} vectors +{v:.2f} ms" for k, v in cost.items() if k.startswith("bank "))
        )
        if args.http:
            speed |= http_latency(bundle, without, tmp / "http")
            print(
                f"/classify over HTTP (one worker each, both servers up, requests alternating), concurrency 1, p50 of "
                f"300: {speed['http_p50_with']:.2f} ms with the score, {speed['http_p50_without']:.2f} ms without: "
                f"ratio {speed['http_ratio']:.3f}"
            )
        if args.json:
            speed["onnx_bytes"] = sizes
            Path(args.json).write_text(
                json.dumps({"scores": scores, "served": decisions, "latency": speed, "bank": calibration}, indent=1)
            )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
