"""int8 weights in 8 bits against 7 bits, on this CPU: how far each int8 file is from the fp32 model, on both runtimes.

CPUs without VNNI (AVX2; AVX-512 without VNNI) multiply uint8 activations by int8 weights with ``vpmaddubsw``,
which sums pairs of products in 16 bits and saturates; ``headstart export --int8`` holds the weights to 7 bits
(:func:`training.onnx_io.quantize_int8`) so that no CPU can. This quantizes a bundle's fp32 file both ways,
calibrated as the export does (up to 128 of the run's training images), and runs both files and the fp32 file over
the run's validation images on ONNX Runtime and OpenVINO (fp32 precision): per file and runtime, the top-1 agreement
with fp32 (ONNX Runtime), the mean and largest probability difference, the class map's mean difference, the largest
move of the "none of these" score, the accuracy and the images per second (median of --rounds runs over all images).
``--other`` adds the mean probability difference on photos of other things (files or folders; e.g. the shared
``photos/`` and ``photos/camera/``), where a classifier's scores are least settled.

    .venv/bin/python benchmarks/int8_weights.py BUNDLE_DIR RUN_DIR [--rounds 3] [--other PATH...] [--json OUT.json]

On a CPU with VNNI (AVX-512 VNNI, AVX-VNNI, AMX) the 8-bit file does not saturate, and the two files differ only by
the weights' last bit.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
from _common import machine_line


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", type=Path, help="a bundle directory (its model.onnx)")
    parser.add_argument("run", type=Path, help="the run it was exported from (its splits: calibration, validation)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--other", type=Path, nargs="+", default=[], help="photos of other things: files, folders")
    args = parser.parse_args(argv)

    from headstart.exporter import KEEP_FP32, MAX_CALIBRATION_IMAGES, _split_paths
    from headstart.loaded_run import load_run
    from headstart.onnx_io import quantize_int8
    from headstart.service.bundle import MODEL_FP32, read_manifest
    from headstart.service.preprocess import decode_image, preprocess
    from headstart.service.runtime import open_session

    print(machine_line(torch=False))
    manifest = read_manifest(args.bundle)
    run = load_run(args.run)
    calibration, _ = _split_paths(run, "train", MAX_CALIBRATION_IMAGES)
    val, targets = _split_paths(run, "val", 10_000)
    pixels = np.stack([preprocess(decode_image(p), manifest.preprocess) for p in val])
    others = [q for p in args.other for q in (sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p])]
    others = [p for p in others if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".bmp")]
    other_pixels = np.stack([preprocess(decode_image(p), manifest.preprocess) for p in others]) if others else None
    fp32_path = args.bundle / MODEL_FP32
    fp32 = open_session(fp32_path, "onnxruntime", "cpu")
    names = fp32.output_names  # probabilities, class_map[, novelty]
    reference = fp32.run(names, pixels)
    other_reference = fp32.run(names, other_pixels)[0] if others else None
    labels = np.asarray(targets)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {"fp32": fp32_path}
        for bits in (8, 7):
            files[f"int8, {bits}-bit weights"] = path = Path(tmp) / f"int8-{bits}.onnx"
            quantize_int8(fp32_path, path, calibration, manifest.preprocess, keep_fp32=KEEP_FP32, weight_bits=bits)
        for what, path in files.items():
            for runtime in ("onnxruntime", "openvino"):
                session = open_session(path, runtime, "cpu", precision="fp32")
                out = session.run(names, pixels)
                seconds = []
                for _ in range(args.rounds):
                    started = time.perf_counter()
                    session.run(names, pixels)
                    seconds.append(time.perf_counter() - started)
                row = {
                    "file": what,
                    "runtime": runtime,
                    "images": len(val),
                    "top1_agreement": float((out[0].argmax(1) == reference[0].argmax(1)).mean()),
                    "accuracy": float((out[0].argmax(1) == labels).mean()),
                    "mean_abs_prob_diff": float(np.abs(out[0] - reference[0]).mean()),
                    "max_abs_prob_diff": float(np.abs(out[0] - reference[0]).max()),
                    "class_map_mean_abs_diff": float(np.abs(out[1] - reference[1]).mean()) if len(out) > 2 else None,
                    "novelty_max_abs_diff": float(np.abs(out[-1] - reference[-1]).max())
                    if "novelty" in names
                    else None,
                    "images_per_s": len(val) / statistics.median(seconds),
                }
                if others:
                    row["other_images"] = len(others)
                    row["other_mean_abs_prob_diff"] = float(
                        np.abs(session.run(names, other_pixels)[0] - other_reference).mean()
                    )
                rows.append(row)
                cam = row["class_map_mean_abs_diff"]
                novelty = row["novelty_max_abs_diff"]
                print(
                    f"{what:22s} {runtime:11s} top-1 agreement {row['top1_agreement']:.2%}, accuracy "
                    f"{row['accuracy']:.4f}, |dp| mean {row['mean_abs_prob_diff']:.4f} max "
                    f"{row['max_abs_prob_diff']:.3f}"
                    + (f", class map |d| {cam:.4f}" if cam is not None else "")
                    + (f", novelty max |d| {novelty:.3f}" if novelty is not None else "")
                    + f", {row['images_per_s']:.0f} img/s"
                    + (
                        f"; {len(others)} other photos |dp| mean {row['other_mean_abs_prob_diff']:.4f}"
                        if others
                        else ""
                    ),
                    flush=True,
                )
    if args.json:
        args.json.write_text(json.dumps({"machine": machine_line(torch=False), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
