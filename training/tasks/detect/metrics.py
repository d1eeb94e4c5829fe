"""Evaluation of detectors: mAP@0.5 and mAP@0.5:0.95 from torchmetrics (pycocotools underneath), on boxes in
original-image pixels, with the service's own decoding and NMS; and the detector's plots."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from headstart.plots import image_grid, pyplot, save_figure
from headstart.service.contract import Model
from headstart.service.inference import outputs_of_files
from headstart.service.localize import DEFAULTS, LocalizeParams, geometry, nms, trained_boxes
from headstart.service.preprocess import PreprocessSpec, decode_image, original_size
from headstart.tasks.detect.data import DetSample

#: Settings of the mAP evaluation (as Ultralytics and the COCO tools use them): keep nearly every box.
EVAL_PARAMS = LocalizeParams(conf=0.001, iou=0.6, max_detections=100)


def predictions_in_pixels(
    boxes: np.ndarray,
    scores: np.ndarray,
    sizes: list[tuple[int, int]],
    spec: PreprocessSpec,
    params: LocalizeParams = EVAL_PARAMS,
) -> list[dict]:
    """Decoded head outputs per image → {"boxes" (M, 4) original pixels, "scores", "labels"} after NMS."""
    out = []
    for b, s, size in zip(boxes, scores, sizes, strict=True):
        cand_boxes, cand_scores, cand_cls = trained_boxes(b, s, params)
        cand_boxes = geometry(size, spec).to_original(cand_boxes)
        keep = nms(cand_boxes, cand_scores, cand_cls, params.iou, params.max_detections)
        out.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": cand_cls[keep]})
    return out


def ground_truth_in_pixels(samples: list[DetSample], sizes: list[tuple[int, int]]) -> list[dict]:
    out = []
    for s, (w, h) in zip(samples, sizes, strict=True):
        cx, cy, bw, bh = s.boxes.T
        boxes = np.stack([(cx - bw / 2) * w, (cy - bh / 2) * h, (cx + bw / 2) * w, (cy + bh / 2) * h], 1)
        out.append({"boxes": boxes.reshape(-1, 4), "labels": s.classes})
    return out


def mean_average_precision(preds: list[dict], truth: list[dict], labels: list[str]) -> dict:
    """mAP@0.5, mAP@0.5:0.95, mAP@0.5:0.95 of small / medium / large objects (COCO's areas: below 32², up to 96²,
    above, in original pixels) and per-class AP (torchmetrics' COCO evaluation with the pycocotools backend).

    ``per_class`` covers the classes present in the ground truth, with their number of boxes.
    """
    from torchmetrics.detection import MeanAveragePrecision

    def tensors(items: list[dict], with_scores: bool) -> list[dict]:
        return [
            {
                "boxes": torch.as_tensor(np.asarray(d["boxes"], np.float32)).reshape(-1, 4),
                "labels": torch.as_tensor(np.asarray(d["labels"], np.int64)).reshape(-1),
                **({"scores": torch.as_tensor(np.asarray(d["scores"], np.float32)).reshape(-1)} if with_scores else {}),
            }
            for d in items
        ]

    p, t = tensors(preds, True), tensors(truth, False)
    coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    coco.update(p, t)
    res = coco.compute()
    at50 = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True, backend="pycocotools"
    )
    at50.update(p, t)
    res50 = at50.compute()
    counts = np.bincount(
        np.concatenate([np.asarray(d["labels"], np.int64) for d in truth] or [[]]).astype(np.int64),
        minlength=len(labels),
    )
    per_class = {}
    classes = res["classes"].reshape(-1).tolist()
    for i, k in enumerate(classes):
        if counts[int(k)] == 0:  # predicted but absent from the ground truth: no AP (pycocotools says -1)
            continue
        per_class[labels[int(k)]] = {
            "boxes": int(counts[int(k)]),
            "ap50": float(res50["map_per_class"].reshape(-1)[i]),
            "ap50_95": float(res["map_per_class"].reshape(-1)[i]),
        }
    sizes = {f"map_{k}": float(res[f"map_{k}"]) for k in ("small", "medium", "large")}  # -1: no such objects
    return {"map50": float(res["map_50"]), "map50_95": float(res["map"]), **sizes, "per_class": per_class}


def decode_head(
    head: nn.Module, maps: np.ndarray, input_size: int, batch: int = 64, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Cached features (grid maps (N, C, H, W), or the pyramid's flattened levels (N, F)) → decoded boxes
    (N, M, 4) and scores (N, M, K), as the exported model computes them; ``head`` is a GridHead or PyramidHead."""
    boxes, scores = [], []
    with torch.no_grad():
        for start in range(0, len(maps), batch):
            raw = head(torch.from_numpy(maps[start : start + batch]).to(device).float())
            b, s = head.decode(raw, input_size)
            boxes.append(b.cpu().numpy())
            scores.append(s.cpu().numpy())
    return np.concatenate(boxes), np.concatenate(scores)


@torch.inference_mode()
def evaluate_detector(
    model: Model,
    samples: list[DetSample],
    batch_size: int | None = None,
    decode: Callable[[str | Path], Image.Image] | None = None,
) -> tuple[dict, list[dict], list[dict]]:
    """mAP of a detector (a run's, :class:`training.predict.RunModel`, or a bundle's on its runtime) on samples
    (images preprocessed as the service does; ``decode`` as :func:`service.ahead.load_batches`); returns metrics,
    predictions, truth. ``batch_size`` images go through the model at once; by default as many pixels as an export's
    checks run (:data:`training.onnx_io.CHECK_BATCH_PIXELS`: one image of 512 px; 16 had taken 0.3 GB more)."""
    from headstart.onnx_io import CHECK_BATCH_PIXELS, batch_for

    sizes: list[tuple[int, int]] = []
    batch = batch_size or batch_for(model.spec, CHECK_BATCH_PIXELS)
    outputs = outputs_of_files(model.run, [s.path for s in samples], model.spec, batch, sizes, decode)
    named = dict(zip(model.output_names, outputs, strict=True))
    preds = predictions_in_pixels(named["boxes"], named["scores"], sizes, model.spec)
    truth = ground_truth_in_pixels(samples, sizes)
    metrics = mean_average_precision(preds, truth, model.labels)
    metrics.update(num_images=len(samples), num_boxes=int(sum(len(s.classes) for s in samples)))
    return metrics, preds, truth


def plot_detection_curves(history: list[dict], path: Path) -> None:
    """Training loss (and its parts) per epoch, validation mAP where it was measured."""
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [h["epoch"] for h in history]
    for key in ("train_loss", "coord", "objectness", "class", "box"):
        if history and key in history[0]:
            ax1.plot(epochs, [h[key] for h in history], label=key)
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("loss per image")
    ax1.set_yscale("log")
    ax1.legend()
    ax1.grid(alpha=0.3)
    for key, label in (("val_map50", "mAP@0.5"), ("val_map50_95", "mAP@0.5:0.95")):
        points = [(h["epoch"], h[key]) for h in history if key in h]
        if points:
            ax2.plot(*zip(*points, strict=True), marker="o", label=label)
    ax2.set_xlabel("epoch")
    ax2.set_ylabel("validation")
    ax2.legend()
    ax2.grid(alpha=0.3)
    save_figure(fig, path, dpi=100, tight=True)


#: Shorter side a plotted image is decoded at, at least (a JPEG at a reduced DCT scale, any other reduced after).
PLOT_SIDE = 512


def plot_detections(
    paths: Sequence[Path],
    preds: Sequence[dict],
    truth: Sequence[dict],
    labels: Sequence[str],
    path: Path,
    conf: float = DEFAULTS.conf,
    max_images: int = 12,
) -> None:
    """Validation images with ground truth (white, dashed) and predictions above ``conf`` (red, labelled)."""
    n = min(len(paths), max_images)
    cols = 4
    rows = max(1, int(np.ceil(n / cols)))
    fig, axes = image_grid(rows, cols, (4, 3.4), title_lines=1, fontsize=8)
    from matplotlib.patches import Rectangle

    for ax, p, pred, gt in zip(axes.ravel(), paths[:n], preds[:n], truth[:n], strict=False):
        img = decode_image(p, min_side=PLOT_SIDE)  # a cell is about 320 px: a large photo need not be held whole
        width, height = original_size(img)
        ax.imshow(img, extent=(-0.5, width - 0.5, height - 0.5, -0.5))  # the boxes are in the stored pixels
        for x1, y1, x2, y2 in gt["boxes"]:
            ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="white", linestyle="--", lw=1.2))
        for (x1, y1, x2, y2), s, k in zip(pred["boxes"], pred["scores"], pred["labels"], strict=True):
            if s >= conf:
                ax.add_patch(Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, color="red", lw=1.5))
                ax.text(
                    x1,
                    y1,
                    f"{labels[k]} {s:.2f}",
                    color="white",
                    fontsize=7,
                    va="bottom",
                    bbox={"facecolor": "red", "alpha": 0.7, "pad": 1, "lw": 0},
                )
        ax.set_title(Path(p).name, fontsize=8)
    save_figure(fig, path, dpi=80)
