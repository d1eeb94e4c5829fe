"""Training a YOLO-style grid head on a frozen backbone's feature map, and its mAP evaluation.

The pipeline mirrors classification: every training image is augmented ``views`` times with box-aware
albumentations transforms (letterbox to the input size, then scale/translate, flip and colour), the frozen backbone
turns each view into a feature map once (cached on disk, keyed by image bytes, boxes, recipe and seed), and the grid
head trains for many epochs on the cached maps. Validation images get the service's own letterbox preprocessing, and
mAP@0.5 and mAP@0.5:0.95 come from torchmetrics (pycocotools underneath), on boxes in original-image pixels.

Loss (YOLOv1, with the usual later refinements): each ground-truth box is assigned to the cell holding its centre and,
within the cell, to the free predictor whose anchor shape (from the training boxes) fits it best;
``lambda_coord`` (5) × squared error on (x, y, √w, √h) of assigned predictors, binary cross-entropy on objectness
(weighted ``lambda_noobj`` = 0.5 for unassigned predictors), cross-entropy on the class of assigned predictors.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import albumentations as A
import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from models.backbone import build_backbone
from models.heads import GridHead, GridHeadConfig
from models.wrapper import Detector, PixelNormalize
from service.localize import LocalizeParams, geometry, nms, trained_boxes
from service.preprocess import PAD_VALUE, PreprocessSpec, decode_image, preprocess
from training import runs
from training.augment import _CV2_INTERPOLATION, PRESETS
from training.detect_data import DetectionReport, DetSample, scan_yolo_dataset
from training.features import (
    FeatureCache,
    _item_key,
    _item_seed,
    cache_namespace,
    cpu_has_bf16,
    default_cache_dir,
    pooled_features_fn,
)

log = logging.getLogger("headstart.detect")

#: Settings of the mAP evaluation (as Ultralytics and the COCO tools use them): keep nearly every box.
EVAL_PARAMS = LocalizeParams(conf=0.001, iou=0.6, max_detections=100)


@dataclass
class DetectConfig:
    data_dir: str
    out: str
    backbone: str = "resnet50"
    pretrained: bool = True
    weights: str | None = None
    input_size: int = 320
    val_fraction: float = 0.2
    augment: str = "heavy"
    views: int = 8
    boxes_per_cell: int = 2
    hidden: int = 256
    dropout: float = 0.1
    epochs: int = 60
    patience: int = 15
    select: str = "best"  # best: the epoch with the best val mAP@0.5 (early stopping); last: the final epoch
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 5e-4
    lambda_coord: float = 5.0
    lambda_noobj: float = 0.5
    eval_every: int = 5
    precision: str = "auto"
    seed: int = 0
    cache_dir: str | None = None
    no_cache: bool = False
    overwrite: bool = False
    resume: bool = False  # not supported for detection: training the grid head takes minutes, rerun instead
    progress: bool = True
    extract_batch_size: int = 8

    def validate(self) -> None:
        if self.augment not in PRESETS:
            raise ValueError(f"Invalid --augment {self.augment!r}. Use one of {', '.join(PRESETS)}.")
        if self.input_size < 64 or self.input_size % 32:
            raise ValueError(f"--input-size must be a multiple of 32, at least 64; got {self.input_size}.")
        if (
            self.views < 1
            or self.epochs < 1
            or self.batch_size < 1
            or self.patience < 1
            or self.eval_every < 1
        ):
            raise ValueError("--views, --epochs, --batch-size and --patience must be at least 1.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Invalid --precision {self.precision!r}. Use auto, fp32 or bf16.")
        if self.select not in ("best", "last"):
            raise ValueError(f"Invalid select {self.select!r}: best or last.")
        if self.resume:
            raise ValueError("--resume is for classification runs; rerun a detection run with --overwrite.")


# ---------------------------------------------------------------- augmentation


def build_detection_augmentation(preset: str, spec: PreprocessSpec) -> A.Compose | None:
    """Box-aware training pipeline ending in a letterboxed ``input_size`` square; ``None`` for "none"."""
    if preset not in PRESETS:
        raise ValueError(f"Invalid augmentation preset {preset!r}. Only {', '.join(PRESETS)} are supported.")
    if preset == "none":
        return None
    size = spec.input_size
    interp = _CV2_INTERPOLATION[spec.interpolation]
    transforms = [
        A.LongestMaxSize(max_size=size, interpolation=interp),
        A.PadIfNeeded(size, size, position="center", border_mode=cv2.BORDER_CONSTANT, fill=PAD_VALUE),
    ]
    if preset == "light":
        transforms += [A.HorizontalFlip(p=0.5), A.ColorJitter(0.2, 0.2, 0.2, 0.02, p=0.5)]
    else:
        transforms += [
            A.Affine(
                scale=(0.7, 1.3),
                translate_percent=(-0.15, 0.15),
                interpolation=interp,
                border_mode=cv2.BORDER_CONSTANT,
                fill=PAD_VALUE,
                p=0.8,
            ),
            A.HorizontalFlip(p=0.5),
            A.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.4, hue=0.03, p=0.8),
            A.OneOf([A.GaussianBlur(blur_limit=(3, 5)), A.GaussNoise(std_range=(0.02, 0.06))], p=0.2),
        ]
    return A.Compose(
        transforms,
        bbox_params=A.BboxParams(
            format="yolo", label_fields=["classes"], min_visibility=0.3, clip=True, filter_invalid_bboxes=True
        ),
    )


def detection_recipe(preset: str, pipeline: A.Compose | None, spec: PreprocessSpec) -> dict:
    return {"preset": preset, "task": "detect", "preprocess": spec.to_dict(),
            "pipeline": None if pipeline is None else A.to_dict(pipeline)}  # fmt: skip


def letterbox_targets(sample: DetSample, size: tuple[int, int], spec: PreprocessSpec) -> np.ndarray:
    """A sample's boxes mapped like the service's letterbox: (M, 5) class, cx, cy, w, h normalised to the input."""
    geom = geometry(size, spec)
    w, h = size
    cx, cy, bw, bh = sample.boxes.T
    x1 = ((cx - bw / 2) * w * geom.scale_x - geom.offset_x) / spec.input_size
    x2 = ((cx + bw / 2) * w * geom.scale_x - geom.offset_x) / spec.input_size
    y1 = ((cy - bh / 2) * h * geom.scale_y - geom.offset_y) / spec.input_size
    y2 = ((cy + bh / 2) * h * geom.scale_y - geom.offset_y) / spec.input_size
    return np.stack([sample.classes.astype(np.float32), (x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], 1)


def detection_views(
    img: Image.Image,
    sample: DetSample,
    pipeline: A.Compose | None,
    spec: PreprocessSpec,
    views: int,
    seed: int,
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``views`` augmented versions of an image: pixels (V, 3, S, S) and per view (M, 5) targets."""
    if pipeline is None:
        targets = letterbox_targets(sample, img.size, spec)
        return np.repeat(preprocess(img, spec)[None], views, axis=0), [targets] * views
    pipeline.set_random_seed(seed)
    arr = np.asarray(img.convert("RGB"), dtype=np.uint8)
    out = np.empty((views, 3, spec.input_size, spec.input_size), np.float32)
    targets = []
    for v in range(views):
        res = pipeline(image=arr, bboxes=sample.boxes, classes=sample.classes)
        out[v] = res["image"].transpose(2, 0, 1)
        boxes = np.asarray(res["bboxes"], np.float32).reshape(-1, 4)
        targets.append(np.concatenate([np.asarray(res["classes"], np.float32).reshape(-1, 1), boxes], 1))
    return out, targets


# ---------------------------------------------------------------- features


def _sample_key(namespace: str, sample: DetSample, views: int, seed: int) -> str:
    """The classifier cache's per-image key, with the image's boxes in it (cached targets depend on them)."""
    boxes = hashlib.sha256(sample.classes.tobytes() + sample.boxes.tobytes()).hexdigest()
    return _item_key(f"{namespace}:{boxes}", sample, views, seed)


def extract_detection_features(
    run_model, samples: list[DetSample], *, spec: PreprocessSpec, pipeline, views: int, grid: tuple[int, int],
    channels: int, cache: FeatureCache, namespace: str, seed: int, batch_size: int, desc: str, progress: bool,
) -> tuple[np.ndarray, list[np.ndarray], list[tuple[int, int]]]:  # fmt: skip
    """Feature maps (N·V, C, H, W) float16, targets per view, and each image's (width, height); cached per image."""
    maps = np.empty((len(samples) * views, channels, *grid), np.float16)
    targets: list[np.ndarray] = [np.zeros((0, 5), np.float32)] * (len(samples) * views)
    sizes: list[tuple[int, int]] = [(0, 0)] * len(samples)
    bar = tqdm(total=len(samples) * views, desc=desc, unit="img", disable=not progress, leave=False)
    for i, sample in enumerate(samples):
        key = _sample_key(namespace, sample, views, seed)
        cached = cache.get(key + "-maps", (views, channels, *grid), np.float16)
        meta = cache.get(key + "-targets", None)
        if cached is None or meta is None:
            img = decode_image(sample.path)
            pixels, view_targets = detection_views(
                img, sample, pipeline, spec, views, _item_seed(seed, sample)
            )
            cached = np.concatenate(
                [run_model(pixels[k : k + batch_size]) for k in range(0, views, batch_size)]
            ).astype(np.float16)
            rows = [
                np.concatenate([np.full((len(t), 1), v, np.float32), t], 1)
                for v, t in enumerate(view_targets)
            ]
            meta = np.concatenate([np.array([[-1, img.width, img.height, 0, 0, 0]], np.float32), *rows])
            cache.put(key + "-maps", cached, np.float16)
            cache.put(key + "-targets", meta)
        maps[i * views : (i + 1) * views] = cached
        sizes[i] = (int(meta[0, 1]), int(meta[0, 2]))
        rows = meta[1:]
        for v in range(views):
            targets[i * views + v] = rows[rows[:, 0] == v][:, 1:]
        bar.update(views)
    bar.close()
    return maps, targets, sizes


# ---------------------------------------------------------------- targets and loss


def anchor_shapes(targets: list[np.ndarray], boxes_per_cell: int) -> np.ndarray:
    """One typical (w, h) per predictor: training boxes sorted by aspect ratio, split evenly, median of each."""
    wh = np.concatenate([t[:, 3:5] for t in targets if len(t)])
    order = np.argsort(wh[:, 1] / np.maximum(wh[:, 0], 1e-6))
    return np.stack([np.median(wh[part], axis=0) for part in np.array_split(order, boxes_per_cell)])


def _shape_iou(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    inter = np.minimum(wh[0], anchors[:, 0]) * np.minimum(wh[1], anchors[:, 1])
    return inter / (wh[0] * wh[1] + anchors[:, 0] * anchors[:, 1] - inter)


def build_targets(
    targets: list[np.ndarray], grid: tuple[int, int], anchors: np.ndarray
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """Per view: objectness mask (N, H, W, B), box targets (x, y offsets in the cell, √w, √h), class targets.

    Returns the number of boxes dropped because every predictor of their cell was taken.
    """
    s_h, s_w = grid
    b = len(anchors)
    obj = np.zeros((len(targets), s_h, s_w, b), bool)
    tbox = np.zeros((len(targets), s_h, s_w, b, 4), np.float32)
    tcls = np.zeros((len(targets), s_h, s_w, b), np.int64)
    dropped = 0
    for n, t in enumerate(targets):
        for cls, cx, cy, w, h in t[np.argsort(-(t[:, 3] * t[:, 4]))] if len(t) else []:
            col, row = min(int(cx * s_w), s_w - 1), min(int(cy * s_h), s_h - 1)
            for k in np.argsort(-_shape_iou(np.array([w, h]), anchors)):
                if not obj[n, row, col, k]:
                    obj[n, row, col, k] = True
                    tbox[n, row, col, k] = (cx * s_w - col, cy * s_h - row, np.sqrt(w), np.sqrt(h))
                    tcls[n, row, col, k] = int(cls)
                    break
            else:
                dropped += 1
    return torch.from_numpy(obj), torch.from_numpy(tbox), torch.from_numpy(tcls), dropped


def yolo_loss(
    raw: torch.Tensor, obj: torch.Tensor, tbox: torch.Tensor, tcls: torch.Tensor,
    lambda_coord: float = 5.0, lambda_noobj: float = 0.5,
) -> tuple[torch.Tensor, dict]:  # fmt: skip
    """Raw grid predictions (N, H, W, B, 5 + K) against targets from :func:`build_targets`; mean over images."""
    n = raw.shape[0]
    pred = torch.sigmoid(raw[..., :4])
    coord = ((pred - tbox) ** 2).sum(-1)[obj].sum()
    bce = F.binary_cross_entropy_with_logits(raw[..., 4], obj.float(), reduction="none")
    objectness = bce[obj].sum() + lambda_noobj * bce[~obj].sum()
    classes = F.cross_entropy(raw[obj][:, 5:], tcls[obj], reduction="sum") if obj.any() else raw.sum() * 0
    total = (lambda_coord * coord + objectness + classes) / n
    return total, {
        "coord": coord.item() / n,
        "objectness": objectness.item() / n,
        "class": classes.item() / n,
    }


# ---------------------------------------------------------------- evaluation


def predictions_in_pixels(
    boxes: np.ndarray, scores: np.ndarray, sizes: list[tuple[int, int]], spec: PreprocessSpec,
    params: LocalizeParams = EVAL_PARAMS,
) -> list[dict]:  # fmt: skip
    """Decoded head outputs per image → {"boxes" (M, 4) original pixels, "scores", "labels"} after NMS."""
    out = []
    for b, s, size in zip(boxes, scores, sizes, strict=True):
        cand_boxes, cand_scores, cand_cls = trained_boxes(b, s, params)
        cand_boxes = geometry(size, spec).to_original(cand_boxes)
        keep = nms(cand_boxes, cand_scores, cand_cls, params.iou)[: params.max_detections]
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
    """mAP@0.5, mAP@0.5:0.95 and per-class AP (torchmetrics' COCO evaluation with the pycocotools backend).

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
    return {"map50": float(res["map_50"]), "map50_95": float(res["map"]), "per_class": per_class}


# ---------------------------------------------------------------- training


def _use_bf16(precision: str) -> bool:
    return precision == "bf16" or (precision == "auto" and cpu_has_bf16())


def fit_grid_head(
    head: GridHead, train_maps: np.ndarray, targets: tuple, val_maps: np.ndarray, measure_val, cfg: DetectConfig,
) -> tuple[dict, list[dict], dict]:  # fmt: skip
    """Adam with cosine decay; mAP@0.5 on validation every ``eval_every`` epochs selects the best state."""
    obj, tbox, tcls = targets
    gen = torch.Generator().manual_seed(cfg.seed)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    maps = torch.from_numpy(train_maps)
    history, best, best_score, best_epoch, stale = [], copy.deepcopy(head.state_dict()), -1.0, 0, 0
    for epoch in range(1, cfg.epochs + 1):
        head.train()
        order = torch.randperm(len(maps), generator=gen)
        total, parts_sum = 0.0, {"coord": 0.0, "objectness": 0.0, "class": 0.0}
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            loss, parts = yolo_loss(head(maps[idx].float()), obj[idx], tbox[idx], tcls[idx], cfg.lambda_coord,
                                    cfg.lambda_noobj)  # fmt: skip
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            for k in parts_sum:
                parts_sum[k] += parts[k] * len(idx)
        sched.step()
        row = {
            "epoch": epoch,
            "train_loss": total / len(maps),
            **{k: v / len(maps) for k, v in parts_sum.items()},
        }
        if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
            head.eval()
            metrics = measure_val(head, val_maps)
            row.update(val_map50=metrics["map50"], val_map50_95=metrics["map50_95"])
            log.info("epoch %d: loss %.3f val mAP@0.5 %.4f mAP@0.5:0.95 %.4f", epoch, row["train_loss"],
                     metrics["map50"], metrics["map50_95"])  # fmt: skip
            if metrics["map50"] > best_score:
                best, best_score, best_epoch, stale = (
                    copy.deepcopy(head.state_dict()),
                    metrics["map50"],
                    epoch,
                    0,
                )
            elif cfg.select == "best":
                stale += cfg.eval_every
                if stale >= cfg.patience:
                    history.append(row)
                    break
        history.append(row)
    if cfg.select == "last":
        best, best_epoch = copy.deepcopy(head.state_dict()), history[-1]["epoch"]
    return (
        best,
        history,
        {"epochs_run": history[-1]["epoch"], "best_epoch": best_epoch, "best_val_map50": best_score},
    )


def decode_head(
    head: GridHead, maps: np.ndarray, input_size: int, batch: int = 64
) -> tuple[np.ndarray, np.ndarray]:
    boxes, scores = [], []
    with torch.no_grad():
        for start in range(0, len(maps), batch):
            b, s = head.decode(head(torch.from_numpy(maps[start : start + batch]).float()), input_size)
            boxes.append(b.numpy())
            scores.append(s.numpy())
    return np.concatenate(boxes), np.concatenate(scores)


def train_detector(cfg: DetectConfig, report: DetectionReport | None = None) -> Path:
    """The whole detection training job; returns the run directory. ``report`` overrides the data split."""
    from training.evaluate import plot_detection_curves, plot_detections
    from training.train import _prepare_run_dir, backbone_record, seconds_record

    cfg.validate()
    t0 = time.perf_counter()
    run_dir = Path(cfg.out)
    _prepare_run_dir(cfg, run_dir)
    torch.manual_seed(cfg.seed)
    report = report or scan_yolo_dataset(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    log.info("%s", report.format())
    labels = report.labels
    train_set, val_set = report.splits["train"], report.splits["val"]

    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    backbone.freeze(0)
    base = backbone.preprocess
    spec = PreprocessSpec(input_size=cfg.input_size, resize=cfg.input_size, interpolation=base.interpolation,
                          mean=base.mean, std=base.std, fit="pad")  # fmt: skip
    net = nn.Sequential(PixelNormalize(spec.mean, spec.std), backbone.features).eval()
    with torch.no_grad():
        grid = tuple(net(torch.zeros(1, 3, spec.input_size, spec.input_size)).shape[2:])
    pipeline = build_detection_augmentation(cfg.augment, spec)
    views = 1 if pipeline is None else cfg.views
    recipe = detection_recipe(cfg.augment, pipeline, spec)
    bf16 = _use_bf16(cfg.precision)
    head_cfg = GridHeadConfig(backbone.num_features, len(labels), cfg.boxes_per_cell, cfg.hidden, cfg.dropout)

    config = {
        "headstart_run": 1,
        "task": "detect",
        "options": asdict(cfg),
        "backbone": backbone_record(backbone, cfg.pretrained, cfg.weights, list(grid)),
        "head": head_cfg.to_dict(),
        "data": {"root": str(report.root), "yaml": str(report.yaml_path), "split": report.split_source},
        "features": {"views": views, "train_precision": "bf16" if bf16 else "fp32", "val_precision": "fp32"},
        "versions": {"torch": str(torch.__version__)},
    }
    runs.write_yaml(run_dir / runs.CONFIG, config)
    runs.write_json(run_dir / runs.LABELS, labels)
    runs.write_json(run_dir / runs.PREPROCESS, spec.to_dict())
    runs.write_json(run_dir / runs.AUGMENTATION, json.loads(json.dumps(recipe, default=str)))
    runs.write_json(run_dir / runs.DATA_REPORT, report.to_dict())
    runs.write_json(run_dir / runs.SPLITS, {
        split: [[str(s.path.resolve()), len(s.classes)] for s in items] for split, items in report.splits.items()
    })  # fmt: skip

    t_feat = time.perf_counter()
    cache = FeatureCache(None if cfg.no_cache else (cfg.cache_dir or default_cache_dir()))
    ns = dict(task="detect", backbone=backbone.name, weights=backbone.weights_sha256, spec=spec.to_dict())
    common = dict(spec=spec, grid=grid, channels=backbone.num_features, cache=cache, seed=cfg.seed,
                  batch_size=cfg.extract_batch_size, progress=cfg.progress)  # fmt: skip
    train_maps, train_targets, _ = extract_detection_features(
        pooled_features_fn(net, bf16, pool=False), train_set, pipeline=pipeline, views=views, desc="train features",
        namespace=cache_namespace(**ns, recipe=json.dumps(recipe, sort_keys=True, default=str), bf16=bf16), **common,
    )  # fmt: skip
    val_maps, _, val_sizes = extract_detection_features(
        pooled_features_fn(net, False, pool=False), val_set, pipeline=None, views=1, desc="val features",
        namespace=cache_namespace(**ns, recipe="eval", bf16=False), **common,
    )  # fmt: skip
    feature_seconds = time.perf_counter() - t_feat

    t_head = time.perf_counter()
    anchors = anchor_shapes(train_targets, cfg.boxes_per_cell)
    *targets, dropped = build_targets(train_targets, grid, anchors)
    truth = ground_truth_in_pixels(val_set, val_sizes)

    def measure_val(h: GridHead, maps: np.ndarray) -> dict:
        boxes, scores = decode_head(h, maps, spec.input_size)
        return mean_average_precision(predictions_in_pixels(boxes, scores, val_sizes, spec), truth, labels)

    head = GridHead(head_cfg)
    best, history, summary = fit_grid_head(head, train_maps, tuple(targets), val_maps, measure_val, cfg)
    head.load_state_dict(best)
    head.eval()
    head_seconds = time.perf_counter() - t_head

    boxes, scores = decode_head(head, val_maps, spec.input_size)
    preds = predictions_in_pixels(boxes, scores, val_sizes, spec)
    evaluation = mean_average_precision(preds, truth, labels)
    plot_detection_curves(history, run_dir / "training_curves.png")
    plot_detections([s.path for s in val_set], preds, truth, labels, run_dir / "val_predictions.png")
    runs.save_safetensors(run_dir / runs.HEAD, head.state_dict(), metadata={"labels": json.dumps(labels)})
    # random weights cannot be rebuilt later: keep them with the run
    if not cfg.pretrained and not cfg.weights:
        runs.save_safetensors(run_dir / runs.BACKBONE_TAIL, backbone.features.state_dict())
    runs.write_json(run_dir / runs.HISTORY, history)
    metrics = {
        "split": "val",
        "task": "detect",
        **evaluation,
        "num_images": len(val_set),
        "num_boxes": int(sum(len(s.classes) for s in val_set)),
        "training": {
            "head": summary,
            "anchors": anchors.round(4).tolist(),
            "boxes_dropped_cell_full": dropped,
            "views": views,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "feature_cache_recomputed_corrupt": cache.recomputed_corrupt,
            "seconds": seconds_record(feature_seconds, head_seconds, t0),
        },
    }
    runs.finish_run(run_dir, metrics)
    log.info("done in %.1fs: val mAP@0.5 %.4f, mAP@0.5:0.95 %.4f (%d images) -> %s", time.perf_counter() - t0,
             evaluation["map50"], evaluation["map50_95"], len(val_set), run_dir)  # fmt: skip
    return run_dir


def build_detector(config: dict, spec: PreprocessSpec, features: nn.Module, head_state: dict) -> Detector:
    head = GridHead(GridHeadConfig.from_dict(config["head"]))
    head.load_state_dict(head_state)
    return Detector(PixelNormalize(spec.mean, spec.std), features, head, spec.input_size).eval()


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
