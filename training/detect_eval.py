"""Evaluation of detectors: mAP@0.5 and mAP@0.5:0.95 from torchmetrics (pycocotools underneath), on boxes in
original-image pixels, with the service's own decoding and NMS."""

from __future__ import annotations

import numpy as np
import torch

from models.heads import GridHead
from models.wrapper import Detector
from service.localize import LocalizeParams, geometry, nms, trained_boxes
from service.preprocess import PreprocessSpec, decode_image, preprocess
from training.detect_data import DetSample

#: Settings of the mAP evaluation (as Ultralytics and the COCO tools use them): keep nearly every box.
EVAL_PARAMS = LocalizeParams(conf=0.001, iou=0.6, max_detections=100)


def predictions_in_pixels(
    boxes: np.ndarray, scores: np.ndarray, sizes: list[tuple[int, int]], spec: PreprocessSpec,
    params: LocalizeParams = EVAL_PARAMS,
) -> list[dict]:  # fmt: skip
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
            {"boxes": torch.as_tensor(np.asarray(d["boxes"], np.float32)).reshape(-1, 4),
             "labels": torch.as_tensor(np.asarray(d["labels"], np.int64)).reshape(-1),
             **({"scores": torch.as_tensor(np.asarray(d["scores"], np.float32)).reshape(-1)} if with_scores else {})}
            for d in items
        ]  # fmt: skip

    p, t = tensors(preds, True), tensors(truth, False)
    coco = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True, backend="pycocotools")
    coco.update(p, t)
    res = coco.compute()
    at50 = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", iou_thresholds=[0.5], class_metrics=True,
                                backend="pycocotools")  # fmt: skip
    at50.update(p, t)
    res50 = at50.compute()
    counts = np.bincount(np.concatenate([np.asarray(d["labels"], np.int64) for d in truth] or [[]]).astype(np.int64),
                         minlength=len(labels))  # fmt: skip
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
    head: GridHead, maps: np.ndarray, input_size: int, batch: int = 64, device: torch.device | str = "cpu"
) -> tuple[np.ndarray, np.ndarray]:
    """Cached feature maps (N, C, H, W) → decoded boxes (N, M, 4) and scores (N, M, K), as the exported model."""
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
    model: Detector, samples: list[DetSample], spec: PreprocessSpec, labels: list[str], batch_size: int = 16
) -> tuple[dict, list[dict], list[dict]]:
    """mAP of a detector on samples (images preprocessed as the service does); returns metrics, predictions, truth."""
    model.eval()
    boxes, scores, sizes = [], [], []
    for start in range(0, len(samples), batch_size):
        images = [decode_image(s.path) for s in samples[start : start + batch_size]]
        sizes += [img.size for img in images]
        _, b, s = model(torch.from_numpy(np.stack([preprocess(img, spec) for img in images])))
        boxes.append(b.numpy())
        scores.append(s.numpy())
    preds = predictions_in_pixels(np.concatenate(boxes), np.concatenate(scores), sizes, spec)
    truth = ground_truth_in_pixels(samples, sizes)
    metrics = mean_average_precision(preds, truth, labels)
    metrics.update(num_images=len(samples), num_boxes=int(sum(len(s.classes) for s in samples)))
    return metrics, preds, truth
