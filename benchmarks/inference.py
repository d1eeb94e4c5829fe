"""Inference speed: torch eager fp32 (baseline), ONNX Runtime and OpenVINO on the same fp32 and int8 files, this CPU.

For ResNet-50 (random weights: speed does not depend on them) and the shared MobileNetV2, each wrapped exactly as
headstart exports it (normalisation + backbone + head, two outputs). Reports images/s at batch 1 and 32, the ratio to
torch eager fp32, and the fraction of this CPU's peak reached, from the model's FLOPs and matmuls measured in the same
run (fp32: the best of torch, numpy and ONNX Runtime; int8: the larger of ONNX Runtime's MatMulInteger and 4x the
fp32 figure, VNNI's int8/fp32 ratio). Large convolutions can run as efficiently as a plain matmul, so a share may
come close to 100%. OpenVINO runs each file with full fp32 precision (``INFERENCE_PRECISION_HINT=f32``) and with its
default on this CPU (bf16 on AMX / AVX-512-BF16), whose share is taken of the measured bf16 matmul peak (torch's
oneDNN bf16 GEMM), and int8 of max(int8 figure above, 2x the bf16 peak: AMX's int8/bf16 ratio). Also, on the real
hymenoptera validation images for a trained MobileNetV2 head, what `headstart export` measured for each runtime and
precision (top-1 agreement with ONNX Runtime on the same file, accuracy), and the same agreement for ResNet-50's
variants on 32 real photos.

    .venv/bin/python benchmarks/inference.py [--threads 2]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _common import SHARED, check_idle, machine_line, train_hymenoptera

from headstart.models import Classifier, ClassifierHead, HeadConfig, PixelNormalize, build_backbone
from headstart.onnx_io import INPUT_NAME, export_onnx, quantize_int8
from headstart.service.preprocess import decode_for, preprocess


def throughput(fn, batch: np.ndarray, repeats: int) -> float:
    fn(batch)
    fn(batch)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn(batch)
        times.append(time.perf_counter() - start)
    return len(batch) / statistics.median(times)


def model_gflop(model: torch.nn.Module, size: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model(torch.zeros(1, 3, size, size))
    return counter.get_total_flops() / 1e9


def peak_fp32_gflops(threads: int) -> float:
    """Best fp32 matmul of torch (MKL), numpy and ONNX Runtime (MLAS) at 2048² and 4096²."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n), torch.randn(n, n)
        an, bn = a.numpy(), b.numpy()
        for fn in (lambda a=a, b=b: a @ b, lambda an=an, bn=bn: an @ bn):
            best = max(best, *(2 * n**3 / (t * 1e9) for t in _times(fn, 5)))
        best = max(best, _ort_matmul_peak("MatMul", threads, n))
    return best


def peak_bf16_gflops(threads: int) -> float:
    """Best bf16 matmul of torch (oneDNN; AMX tiles where the CPU has them) at 2048² and 4096²."""
    torch.set_num_threads(threads)
    best = 0.0
    for n in (2048, 4096):
        a, b = torch.randn(n, n, dtype=torch.bfloat16), torch.randn(n, n, dtype=torch.bfloat16)
        best = max(best, *(2 * n**3 / (t * 1e9) for t in _times(lambda a=a, b=b: a @ b, 5)))
    return best


def openvino_fn(path: Path, threads: int, precision: str):
    """OpenVINO on ``path`` with the latency hint: ``precision`` "f32", or None for the CPU's default (bf16 here)."""
    import openvino as ov

    core = ov.Core()
    config = {"PERFORMANCE_HINT": "LATENCY", "INFERENCE_NUM_THREADS": threads}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    compiled = core.compile_model(core.read_model(str(path)), "CPU", config)
    request = compiled.create_infer_request()
    return lambda x: [request.infer({0: x})[compiled.output(0)]]  # every output is computed; keep the first


def peak_int8_gops(threads: int) -> float:
    """uint8 x int8 MatMulInteger in ONNX Runtime (the kernel family its QDQ convolutions use)."""
    return _ort_matmul_peak("MatMulInteger", threads, 4096)


def _ort_matmul_peak(op: str, threads: int, n: int) -> float:
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    integer = op == "MatMulInteger"
    a_type, b_type = (TensorProto.UINT8, TensorProto.INT8) if integer else (TensorProto.FLOAT, TensorProto.FLOAT)
    b_np = np.random.randint(-127, 127, (n, n)).astype(np.int8) if integer else np.random.randn(n, n).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node(op, ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info("a", a_type, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32 if integer else TensorProto.FLOAT, [n, n])],
        [helper.make_tensor("b", b_type, [n, n], b_np.ravel())],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=9)
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        onnx.save(model, f.name)
        sess = ort.InferenceSession(f.name, _ort_options(threads), providers=["CPUExecutionProvider"])
    a = np.random.randint(0, 255, (n, n)).astype(np.uint8) if integer else np.random.randn(n, n).astype(np.float32)
    return max(2 * n**3 / (t * 1e9) for t in _times(lambda: sess.run(None, {"a": a}), 5))


def int8_agreement_on_hymenoptera() -> dict:
    """Train a head on the shared MobileNetV2 (feature cache reused between runs), export with --int8."""
    from headstart.exporter import export_bundle

    with tempfile.TemporaryDirectory() as tmp:
        run_dir = train_hymenoptera(f"{tmp}/run")
        manifest = export_bundle(run_dir, f"{tmp}/bundle", int8=True, store=False).manifest
        return {**manifest.int8, "runtimes": manifest.runtimes}


def _times(fn, repeats: int) -> list[float]:
    fn()
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append(time.perf_counter() - start)
    return out


def _ort_options(threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    return options


def build(name: str, weights: Path | None) -> tuple[Classifier, int]:
    backbone = build_backbone(name, pretrained=False, weights=weights)
    head = ClassifierHead(HeadConfig(backbone.num_features, 2)).eval()
    spec = backbone.preprocess
    return Classifier(PixelNormalize(spec.mean, spec.std), backbone.features, head).eval(), spec


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import openvino as ov

    print(machine_line(), f"onnxruntime {ort.__version__}, openvino {ov.__version__}")
    busy = check_idle()
    hym = SHARED / "data" / "hymenoptera"
    calib_paths = sorted((hym / "train").rglob("*.jp*g"))[::4][:64]
    peak32 = peak_fp32_gflops(args.threads)
    measured8 = peak_int8_gops(args.threads)
    # AVX-512 VNNI does 4 int8 multiply-adds per fp32 FMA lane: the int8 roof is 4x the fp32 one. The measured
    # MatMulInteger often falls short of it (and of ONNX Runtime's own int8 convolutions), so take the larger.
    peak16 = peak_bf16_gflops(args.threads)
    peak8 = max(measured8, 4 * peak32, 2 * peak16)
    print(
        f"fp32 peak: best matmul {peak32:.0f} GFLOP/s; bf16 peak: torch matmul {peak16:.0f} GFLOP/s; int8 peak: "
        f"max(MatMulInteger {measured8:.0f}, 4 x fp32 = {4 * peak32:.0f}, 2 x bf16 = {2 * peak16:.0f}) "
        f"= {peak8:.0f} GOP/s"
    )

    rows, agreement = [], {}
    models = [
        ("resnet50", "resnet50", None),
        ("mobilenet_v2", "torchvision:mobilenet_v2", SHARED / "weights" / "mobilenet_v2_imagenet.pth"),
    ]
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, weights in models:
            model, spec = build(name, weights)
            gflop = model_gflop(model, spec.input_size)
            fp32_path, int8_path = Path(tmp) / f"{label}.onnx", Path(tmp) / f"{label}.int8.onnx"
            export_onnx(model, fp32_path, spec.input_size)
            quantize_int8(fp32_path, int8_path, calib_paths, spec)
            sessions = {
                v: ort.InferenceSession(str(p), _ort_options(args.threads), providers=["CPUExecutionProvider"])
                for v, p in (("fp32", fp32_path), ("int8", int8_path))
            }
            pixels = np.stack([preprocess(decode_for(p, spec), spec) for p in calib_paths[:32]])

            def torch_fn(x, model=model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x))

            fns = {
                "torch eager fp32": torch_fn,
                "ONNX Runtime fp32": lambda x, s=sessions["fp32"]: s.run(None, {INPUT_NAME: x}),
                "ONNX Runtime int8": lambda x, s=sessions["int8"]: s.run(None, {INPUT_NAME: x}),
                "OpenVINO fp32 file, f32": openvino_fn(fp32_path, args.threads, "f32"),
                "OpenVINO fp32 file, bf16 (its default)": openvino_fn(fp32_path, args.threads, None),
                "OpenVINO int8 file": openvino_fn(int8_path, args.threads, None),
            }
            top1 = {k: np.asarray(fn(pixels)[0]).argmax(1) for k, fn in fns.items()}
            for k in fns:
                ref = top1["ONNX Runtime int8" if "int8" in k else "ONNX Runtime fp32"]
                agreement[(label, k)] = float((top1[k] == ref).mean())
            for batch in (1, 32):
                x = pixels[:batch]
                repeats = args.repeats if batch == 32 else 10 * args.repeats
                results = {k: throughput(fn, x, repeats) for k, fn in fns.items()}
                base = results["torch eager fp32"]
                for k, ips in results.items():
                    peak = peak8 if "int8" in k else peak16 if "bf16" in k else peak32
                    rows.append((label, batch, k, ips, ips / base, ips * gflop / peak, gflop))
                print(
                    f"  {label} batch {batch}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in results.items()),
                    flush=True,
                )

    print()
    print(
        "| model | batch | runtime | images/s | vs torch eager fp32 | vs measured peak (its precision) | top-1 "
        "agreement with ONNX Runtime, same file, 32 photos |"
    )
    print("|---|---|---|---|---|---|---|")
    for label, batch, k, ips, ratio, share, gflop in rows:
        print(
            f"| {label} ({gflop:.2f} GFLOP/img) | {batch} | {k} | {ips:.1f} | {ratio:.2f}x | {share:.0%} | "
            f"{agreement[(label, k)]:.0%} |"
        )
    r50 = {k: r for (m, b, k, *_), r in zip(rows, [r[4] for r in rows], strict=True) if m == "resnet50" and b == 32}
    print()
    print(
        f"ResNet-50 batch 32: ONNX Runtime fp32 {r50['ONNX Runtime fp32']:.2f}x (target >= 2x), "
        f"int8 {r50['ONNX Runtime int8']:.2f}x (target >= 6x) the torch eager fp32 speed"
    )
    ov_int8 = r50["OpenVINO int8 file"] / r50["ONNX Runtime int8"]
    ov_fp32 = r50["OpenVINO fp32 file, bf16 (its default)"] / r50["ONNX Runtime fp32"]
    print(
        f"ResNet-50 batch 32, served variants: OpenVINO int8 file {ov_int8:.2f}x ONNX Runtime int8 (target >= 2.5x), "
        f"OpenVINO fp32 file (bf16) {ov_fp32:.2f}x ONNX Runtime fp32 (target >= 4x)"
    )
    info = int8_agreement_on_hymenoptera()
    print(
        f"MobileNetV2 head on hymenoptera val ({info['calibration_images']} calibration images): fp32 accuracy "
        f"{info['accuracy_fp32']:.4f}, int8 {info['accuracy_int8']:.4f}, int8/fp32 top-1 agreement "
        f"{info['top1_agreement']:.2%} (target >= 99%)"
    )
    for variant, checks in info["runtimes"].items():
        for key, row in checks.items():
            print(
                f"  export check, {variant} file on {key} ({row['precision']}): top-1 agreement "
                f"{row['top1_agreement']:.2%} with ONNX Runtime, accuracy {row['accuracy']:.4f}, max |dp| "
                f"{row['max_abs_prob_diff']:.1e}, served: {'yes' if row['allowed'] else 'no'}"
            )
    print(f"other CPU use before the run: {busy:.0%}, after: {check_idle():.0%}")


if __name__ == "__main__":
    main()
