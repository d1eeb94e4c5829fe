"""Inference speed: torch eager fp32 (baseline) vs ONNX Runtime fp32 vs ONNX Runtime static int8, on this CPU.

For ResNet-50 (random weights: speed does not depend on them) and the shared MobileNetV2, each wrapped exactly as
headstart exports it (normalisation + backbone + head, two outputs). Reports images/s at batch 1 and 32, the ratio to
torch eager fp32, and the fraction of this CPU's peak reached, from the model's FLOPs and matmuls measured in the same
run (fp32 with torch, int8 with ONNX Runtime's MatMulInteger). Also the int8/fp32 top-1 agreement on the real
hymenoptera validation images for a trained MobileNetV2 head.

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
from _common import SHARED, check_idle, machine_line

from models import Classifier, ClassifierHead, HeadConfig, PixelNormalize, build_backbone
from service.preprocess import decode_image, preprocess
from training.export import INPUT_NAME, export_onnx, quantize_int8


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
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    return max(2 * 2048**3 / (t * 1e9) for t in _times(lambda: a @ b, 5))


def peak_int8_gops(threads: int) -> float:
    """uint8 x int8 MatMulInteger in ONNX Runtime (the kernel its QDQ convolutions use)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    n = 2048
    graph = helper.make_graph(
        [helper.make_node("MatMulInteger", ["a", "b"], ["c"])],
        "mm",
        [helper.make_tensor_value_info("a", TensorProto.UINT8, [n, n])],
        [helper.make_tensor_value_info("c", TensorProto.INT32, [n, n])],
        [
            helper.make_tensor(
                "b", TensorProto.INT8, [n, n], np.random.randint(-127, 127, n * n).astype(np.int8)
            )
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with tempfile.NamedTemporaryFile(suffix=".onnx") as f:
        onnx.save(model, f.name)
        sess = ort.InferenceSession(f.name, _ort_options(threads), providers=["CPUExecutionProvider"])
    a = np.random.randint(0, 255, (n, n)).astype(np.uint8)
    return max(2 * n**3 / (t * 1e9) for t in _times(lambda: sess.run(None, {"a": a}), 5))


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

    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(machine_line(), f"onnxruntime {ort.__version__}")
    busy = check_idle()
    hym = SHARED / "data" / "hymenoptera"
    calib_paths = sorted((hym / "train").rglob("*.jp*g"))[::4][:64]
    peak32 = peak_fp32_gflops(args.threads)
    peak8 = peak_int8_gops(args.threads)
    print(
        f"measured peak: fp32 matmul {peak32:.0f} GFLOP/s (torch), int8 matmul {peak8:.0f} GOP/s (ONNX Runtime)"
    )

    rows = []
    models = [("resnet50", "resnet50", None), ("mobilenet_v2", "torchvision:mobilenet_v2",
              SHARED / "weights" / "mobilenet_v2_imagenet.pth")]  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        for label, name, weights in models:
            model, spec = build(name, weights)
            gflop = model_gflop(model, spec.input_size)
            fp32_path, int8_path = Path(tmp) / f"{label}.onnx", Path(tmp) / f"{label}.int8.onnx"
            export_onnx(model, fp32_path, spec.input_size)
            quantize_int8(fp32_path, int8_path, calib_paths, spec)
            sessions = {
                v: ort.InferenceSession(
                    str(p), _ort_options(args.threads), providers=["CPUExecutionProvider"]
                )
                for v, p in (("fp32", fp32_path), ("int8", int8_path))
            }
            pixels = np.stack([preprocess(decode_image(p), spec) for p in calib_paths[:32]])

            def torch_fn(x, model=model):
                with torch.inference_mode():
                    return model(torch.from_numpy(x))

            fns = {
                "torch eager fp32": torch_fn,
                "ONNX Runtime fp32": lambda x, s=sessions["fp32"]: s.run(None, {INPUT_NAME: x}),
                "ONNX Runtime int8": lambda x, s=sessions["int8"]: s.run(None, {INPUT_NAME: x}),
            }
            for batch in (1, 32):
                x = pixels[:batch]
                repeats = args.repeats if batch == 32 else 10 * args.repeats
                results = {k: throughput(fn, x, repeats) for k, fn in fns.items()}
                base = results["torch eager fp32"]
                for k, ips in results.items():
                    peak = peak8 if "int8" in k else peak32
                    rows.append((label, batch, k, ips, ips / base, ips * gflop / peak, gflop))
                print(f"  {label} batch {batch}: " + ", ".join(f"{k} {v:.1f} img/s" for k, v in results.items()),
                      flush=True)  # fmt: skip

    print()
    print("| model | batch | runtime | images/s | vs torch eager fp32 | share of peak |")
    print("|---|---|---|---|---|---|")
    for label, batch, k, ips, ratio, share, gflop in rows:
        print(f"| {label} ({gflop:.2f} GFLOP/img) | {batch} | {k} | {ips:.1f} | {ratio:.2f}x | {share:.0%} |")
    r50 = {
        k: r
        for (m, b, k, *_), r in zip(rows, [r[4] for r in rows], strict=True)
        if m == "resnet50" and b == 32
    }
    print()
    print(f"ResNet-50 batch 32: ONNX Runtime fp32 {r50['ONNX Runtime fp32']:.2f}x (target >= 2x), "
          f"int8 {r50['ONNX Runtime int8']:.2f}x (target >= 6x) the torch eager fp32 speed")  # fmt: skip
    print(f"other CPU use before the run: {busy:.0%}, after: {check_idle():.0%}")


if __name__ == "__main__":
    main()
