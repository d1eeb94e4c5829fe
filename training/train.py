"""`headstart train`: check the data, cache backbone features, train the head, optionally unfreeze, evaluate."""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn
from tqdm.auto import tqdm

from models import Backbone, Classifier, ClassifierHead, HeadConfig, PixelNormalize, build_backbone
from service.preprocess import decode_image
from training import runs
from training.augment import augmented_views, build_augmentation, recipe, recipe_key
from training.data import DatasetError, DatasetReport, Sample, scan_image_folder
from training.evaluate import plot_training_curves, write_evaluation
from training.features import (
    FeatureCache,
    cache_namespace,
    cpu_has_bf16,
    default_cache_dir,
    extract_features,
    pooled_features_fn,
)
from training.predict import predict_paths

log = logging.getLogger("headstart")

# Options that change the result: a --resume must use the same values.
_RESULT_KEYS = (
    "backbone", "pretrained", "weights", "val_fraction", "augment", "views", "hidden", "dropout", "activation",
    "epochs", "patience", "batch_size", "lr", "weight_decay", "label_smoothing", "class_weights", "unfreeze",
    "finetune_epochs", "finetune_lr", "precision", "seed",
)  # fmt: skip


@dataclass
class TrainConfig:
    data_dir: str
    out: str
    backbone: str = "resnet50"
    pretrained: bool = True
    weights: str | None = None
    val_fraction: float = 0.2
    augment: str = "heavy"
    views: int = 8
    hidden: int = 0
    dropout: float = 0.2
    activation: str = "relu"
    epochs: int = 100
    patience: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    weight_decay: float = 1e-4
    label_smoothing: float = 0.0
    class_weights: str = "auto"  # auto | on | off
    unfreeze: int = 0
    finetune_epochs: int = 5
    finetune_lr: float = 1e-4
    precision: str = "auto"  # auto | fp32 | bf16 (augmented training views only; validation is always fp32)
    seed: int = 0
    cache_dir: str | None = None
    no_cache: bool = False
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    extract_batch_size: int = 8  # small batches keep activations in cache: ~2x faster than 64 on this CPU

    def validate(self) -> None:
        if self.views < 1:
            raise ValueError(f"--views must be at least 1, got {self.views}.")
        if self.class_weights not in ("auto", "on", "off"):
            raise ValueError(f"Invalid --class-weights {self.class_weights!r}. Use auto, on or off.")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ValueError(f"Invalid --precision {self.precision!r}. Use auto, fp32 or bf16.")
        if self.epochs < 1 or self.patience < 1 or self.batch_size < 1:
            raise ValueError("--epochs, --patience and --batch-size must be at least 1.")
        if self.unfreeze < 0 or self.finetune_epochs < 0:
            raise ValueError("--unfreeze and --finetune-epochs must be >= 0.")
        if self.resume and self.overwrite:
            raise ValueError("--resume and --overwrite contradict each other: choose one.")


def _prepare_run_dir(cfg: TrainConfig, run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        if cfg.overwrite:
            shutil.rmtree(run_dir)
        elif cfg.resume:
            old = (
                yaml.safe_load((run_dir / runs.CONFIG).read_text())
                if (run_dir / runs.CONFIG).exists()
                else None
            )
            if old is not None:
                changed = {
                    k: (old["options"].get(k), getattr(cfg, k))
                    for k in _RESULT_KEYS
                    if old["options"].get(k) != getattr(cfg, k)
                }
                if changed:
                    raise runs.RunError(
                        f"--resume with different options than the interrupted run: {changed} (old, new). "
                        "Use the same options, or --overwrite to start again."
                    )
        else:
            raise runs.RunError(
                f"Run directory {run_dir} already exists. Use --resume to continue it or --overwrite to replace it."
            )
    run_dir.mkdir(parents=True, exist_ok=True)


def _class_weights(train_labels: np.ndarray, num_classes: int, mode: str) -> tuple[torch.Tensor | None, dict]:
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    imbalance = float(counts.max() / max(counts.min(), 1))
    use = mode == "on" or (mode == "auto" and imbalance > 1.5)
    info = {
        "counts": counts.astype(int).tolist(),
        "imbalance_ratio": round(imbalance, 3),
        "weighted_loss": use,
    }
    if not use:
        return None, info
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    info["weights"] = [round(float(w), 4) for w in weights]
    return torch.tensor(weights, dtype=torch.float32), info


def fit_head(
    head: ClassifierHead,
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    val_x: torch.Tensor,
    val_y: torch.Tensor,
    cfg: TrainConfig,
    class_weights: torch.Tensor | None,
    checkpoint: Path,
) -> tuple[dict, list[dict], dict]:
    """Train ``head`` on cached features with early stopping on validation loss; resumable from ``checkpoint``.

    Returns the best state dict, the per-epoch history and a summary.
    """
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    gen = torch.Generator().manual_seed(cfg.seed)
    state = {"epoch": 0, "best_loss": float("inf"), "best_epoch": 0, "bad_epochs": 0, "history": []}
    best = {k: v.clone() for k, v in head.state_dict().items()}
    if checkpoint.exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if ck.get("phase") == "head":
            head.load_state_dict(ck["head"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            best = ck["best"]
            state = ck["state"]
            log.info("resuming head training after epoch %d", state["epoch"])
    n = len(train_y)
    bar = tqdm(
        total=cfg.epochs,
        initial=state["epoch"],
        desc="train head",
        unit="epoch",
        disable=not cfg.progress,
        leave=False,
    )
    while state["epoch"] < cfg.epochs and state["bad_epochs"] < cfg.patience:
        head.train()
        perm = torch.randperm(n, generator=gen)
        total, correct, seen = 0.0, 0, 0
        for start in range(0, n, cfg.batch_size):
            idx = perm[start : start + cfg.batch_size]
            if len(idx) < 2 and cfg.hidden:  # BatchNorm1d needs 2 samples
                continue
            logits = head(train_x[idx])
            loss = loss_fn(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            correct += int((logits.argmax(1) == train_y[idx]).sum())
            seen += len(idx)
        sched.step()
        head.eval()
        with torch.no_grad():
            val_logits = head(val_x)
            val_loss = float(nn.functional.cross_entropy(val_logits, val_y))
            val_acc = float((val_logits.argmax(1) == val_y).float().mean())
        state["epoch"] += 1
        state["history"].append({
            "epoch": state["epoch"], "phase": "head", "train_loss": total / max(seen, 1),
            "train_accuracy": correct / max(seen, 1), "val_loss": val_loss, "val_accuracy": val_acc,
        })  # fmt: skip
        if val_loss < state["best_loss"] - 1e-4:
            state.update(best_loss=val_loss, best_epoch=state["epoch"], bad_epochs=0)
            best = {k: v.clone() for k, v in head.state_dict().items()}
        else:
            state["bad_epochs"] += 1
        runs.save_torch(checkpoint, {
            "phase": "head", "head": head.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "best": best, "state": state,
        })  # fmt: skip
        bar.update(1)
        bar.set_postfix(val_loss=f"{val_loss:.4f}", val_acc=f"{val_acc:.3f}")
    bar.close()
    summary = {
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        "best_val_loss": state["best_loss"],
        "early_stopped": state["bad_epochs"] >= cfg.patience,
    }
    return best, state["history"], summary


def finetune(
    backbone: Backbone,
    head: ClassifierHead,
    train: list[Sample],
    val: list[Sample],
    cfg: TrainConfig,
    pipeline,
    class_weights: torch.Tensor | None,
    checkpoint: Path,
    epoch_offset: int,
) -> tuple[list[str], list[dict], dict]:
    """Fine-tune the last ``cfg.unfreeze`` backbone stages with the head, augmenting on the fly."""
    spec = backbone.preprocess
    unfrozen = backbone.freeze(cfg.unfreeze)
    model = Classifier(PixelNormalize(spec.mean, spec.std), backbone.features, head)
    tail = [p for p in backbone.features.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": tail, "lr": cfg.finetune_lr}, {"params": head.parameters(), "lr": cfg.finetune_lr * 10}],
        weight_decay=cfg.weight_decay,
    )
    loss_fn = nn.CrossEntropyLoss(weight=class_weights, label_smoothing=cfg.label_smoothing)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    state = {"epoch": 0, "best_loss": float("inf"), "history": [], "best_epoch": 0}
    best = {k: v.clone() for k, v in model.state_dict().items() if k in trainable}
    if checkpoint.exists():
        ck = torch.load(checkpoint, map_location="cpu", weights_only=True)
        if ck.get("phase") == "finetune":
            model.load_state_dict(ck["model"], strict=False)
            opt.load_state_dict(ck["optimizer"])
            gen.set_state(ck["generator"])
            torch.set_rng_state(ck["torch_rng"])
            best, state = ck["best"], ck["state"]
            log.info("resuming fine-tuning after epoch %d", state["epoch"])
    use_bf16 = _use_bf16(cfg)
    targets = torch.tensor([s.label for s in train])
    val_targets = np.array([s.label for s in val])
    while state["epoch"] < cfg.finetune_epochs:
        model.train()
        perm = torch.randperm(len(train), generator=gen).tolist()
        total, seen = 0.0, 0
        bs = min(32, cfg.batch_size)
        bar = tqdm(
            range(0, len(perm), bs),
            desc=f"finetune {state['epoch'] + 1}/{cfg.finetune_epochs}",
            disable=not cfg.progress,
            leave=False,
        )
        for start in bar:
            idx = perm[start : start + bs]
            pixels = np.concatenate([
                augmented_views(decode_image(train[i].path), pipeline, spec, 1,
                                cfg.seed * 100003 + state["epoch"] * 7919 + i)
                for i in idx
            ])  # fmt: skip
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=use_bf16):
                logits = model.logits(torch.from_numpy(pixels))
            loss = loss_fn(logits.float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            total += loss.item() * len(idx)
            seen += len(idx)
        probs = predict_paths(model, [s.path for s in val], spec)
        val_loss = float(-np.log(np.clip(probs[np.arange(len(val)), val_targets], 1e-12, 1)).mean())
        val_acc = float((probs.argmax(1) == val_targets).mean())
        state["epoch"] += 1
        state["history"].append({
            "epoch": epoch_offset + state["epoch"], "phase": "finetune", "train_loss": total / max(seen, 1),
            "val_loss": val_loss, "val_accuracy": val_acc,
        })  # fmt: skip
        if val_loss < state["best_loss"]:
            state.update(best_loss=val_loss, best_epoch=state["epoch"])
            best = {k: v.clone() for k, v in model.state_dict().items() if k in trainable}
        runs.save_torch(checkpoint, {
            "phase": "finetune", "model": {k: v for k, v in model.state_dict().items() if k in trainable},
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "best": best, "state": state,
        })  # fmt: skip
        log.info("finetune epoch %d: val_loss %.4f val_acc %.3f", state["epoch"], val_loss, val_acc)
    model.load_state_dict(best, strict=False)
    model.eval()
    summary = {"unfrozen_stages": unfrozen, "epochs_run": state["epoch"], "best_epoch": state["best_epoch"],
               "best_val_loss": state["best_loss"]}  # fmt: skip
    return unfrozen, state["history"], summary


def backbone_record(backbone, pretrained: bool, weights: str | None, feature_map: list[int]) -> dict:
    """The backbone as a run's config.yaml records it: enough for `load_run` to rebuild and verify it."""
    return {
        "name": backbone.name,
        "pretrained": pretrained,
        "weights_path": str(Path(weights).resolve()) if weights else None,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "num_features": backbone.num_features,
        "feature_map": list(feature_map),
        "stages": [n for n, _ in backbone.stages],
    }


def seconds_record(features: float, head: float, started: float) -> dict:
    """Where a training run's time went, for metrics.json."""
    return {
        "features": round(features, 2),
        "head": round(head, 2),
        "total": round(time.perf_counter() - started, 2),
    }


def _use_bf16(cfg: TrainConfig) -> bool:
    return cfg.precision == "bf16" or (cfg.precision == "auto" and cpu_has_bf16())


def _check_splits(report: DatasetReport) -> None:
    if not report.splits.get("val"):
        raise DatasetError(
            f"{report.root} has no validation images. Add a val/ folder next to train/, or put the class "
            "folders directly in the data folder to get an automatic split (--val-fraction)."
        )


def train(cfg: TrainConfig) -> Path:
    """Run the whole training job; returns the run directory."""
    cfg.validate()
    t0 = time.perf_counter()
    run_dir = Path(cfg.out)
    _prepare_run_dir(cfg, run_dir)
    torch.manual_seed(cfg.seed)

    report = scan_image_folder(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
    log.info("%s", report.format())
    _check_splits(report)
    labels = report.labels
    train_set, val_set = report.splits["train"], report.splits["val"]

    backbone = build_backbone(cfg.backbone, pretrained=cfg.pretrained, weights=cfg.weights)
    backbone.freeze(0)
    spec = backbone.preprocess
    pipeline = build_augmentation(cfg.augment, spec)
    views = 1 if pipeline is None else cfg.views
    aug_recipe = recipe(cfg.augment, pipeline, spec)
    bf16 = _use_bf16(cfg)
    head_cfg = HeadConfig(backbone.num_features, len(labels), cfg.hidden, cfg.dropout, cfg.activation)

    config = {
        "headstart_run": 1,
        "task": "classify",
        "options": asdict(cfg),
        "backbone": backbone_record(backbone, cfg.pretrained, cfg.weights, backbone.extra["feature_map"]),
        "head": head_cfg.to_dict(),
        "data": {"root": str(Path(cfg.data_dir).resolve()), "split": report.split_source},
        "features": {"views": views, "train_precision": "bf16" if bf16 else "fp32", "val_precision": "fp32"},
        "versions": {"torch": str(torch.__version__)},
    }
    runs.write_yaml(run_dir / runs.CONFIG, config)
    runs.write_json(run_dir / runs.LABELS, labels)
    runs.write_json(run_dir / runs.PREPROCESS, spec.to_dict())
    runs.write_json(run_dir / runs.AUGMENTATION, aug_recipe)
    runs.write_json(run_dir / runs.DATA_REPORT, report.to_dict())
    runs.write_json(
        run_dir / runs.SPLITS,
        {split: [[str(s.path.resolve()), s.label] for s in items] for split, items in report.splits.items()},
    )

    # 1. features, computed once and cached
    t_feat = time.perf_counter()
    cache = FeatureCache(None if cfg.no_cache else (cfg.cache_dir or default_cache_dir()))
    net = nn.Sequential(PixelNormalize(spec.mean, spec.std), backbone.features)
    ns = dict(backbone=backbone.name, weights=backbone.weights_sha256, spec=spec.to_dict())
    train_feats = extract_features(
        pooled_features_fn(net, bf16), train_set, spec=spec, pipeline=pipeline, views=views,
        num_features=backbone.num_features, cache=cache, seed=cfg.seed, batch_size=cfg.extract_batch_size,
        namespace=cache_namespace(**ns, recipe=recipe_key(aug_recipe), bf16=bf16), desc="train features",
        progress=cfg.progress,
    )  # fmt: skip
    val_feats = extract_features(
        pooled_features_fn(net, False), val_set, spec=spec, pipeline=None, views=1,
        num_features=backbone.num_features, cache=cache, batch_size=cfg.extract_batch_size,
        namespace=cache_namespace(**ns, recipe="eval", bf16=False), desc="val features", progress=cfg.progress,
    )[:, 0]  # fmt: skip
    feature_seconds = time.perf_counter() - t_feat

    # 2. head on cached features
    t_head = time.perf_counter()
    train_y_np = np.array([s.label for s in train_set])
    weights, weight_info = _class_weights(train_y_np, len(labels), cfg.class_weights)
    if weight_info["weighted_loss"]:
        log.info("classes are unbalanced (ratio %.2f): using class-weighted loss %s",
                 weight_info["imbalance_ratio"], weight_info["weights"])  # fmt: skip
    head = ClassifierHead(head_cfg)
    best, history, head_summary = fit_head(
        head,
        torch.from_numpy(train_feats.reshape(-1, backbone.num_features)),
        torch.from_numpy(np.repeat(train_y_np, views)),
        torch.from_numpy(val_feats),
        torch.tensor([s.label for s in val_set]),
        cfg,
        weights,
        run_dir / runs.CHECKPOINT,
    )
    head.load_state_dict(best)
    head.eval()
    head_seconds = time.perf_counter() - t_head

    # 3. optional fine-tuning of the last stages
    finetune_summary = None
    if cfg.unfreeze:
        unfrozen, ft_history, finetune_summary = finetune(
            backbone, head, train_set, val_set, cfg, pipeline or build_augmentation("light", spec), weights,
            run_dir / runs.CHECKPOINT, epoch_offset=len(history),
        )  # fmt: skip
        history += ft_history
        runs.save_safetensors(run_dir / runs.BACKBONE_TAIL, backbone.stage_state_dict(unfrozen))
    if not cfg.pretrained and not cfg.weights:
        # random weights cannot be rebuilt later: keep the whole backbone with the run
        runs.save_safetensors(run_dir / runs.BACKBONE_TAIL, backbone.features.state_dict())

    # 4. evaluation on validation images
    model = Classifier(PixelNormalize(spec.mean, spec.std), backbone.features, head).eval()
    if cfg.unfreeze:
        probs = predict_paths(model, [s.path for s in val_set], spec)
    else:
        with torch.no_grad():
            probs = torch.softmax(head(torch.from_numpy(val_feats)), dim=1).numpy()
    val_targets = np.array([s.label for s in val_set])
    metrics = write_evaluation(run_dir, probs, val_targets, labels, [s.path for s in val_set], spec)
    plot_training_curves(history, run_dir / "training_curves.png")
    runs.save_safetensors(run_dir / runs.HEAD, head.state_dict(), metadata={"labels": json.dumps(labels)})
    runs.write_json(run_dir / runs.HISTORY, history)
    metrics = {
        "split": "val",
        **metrics,
        "training": {
            "head": head_summary,
            "finetune": finetune_summary,
            "class_weights": weight_info,
            "views": views,
            "train_images": len(train_set),
            "val_images": len(val_set),
            "feature_cache_recomputed_corrupt": cache.recomputed_corrupt,
            "seconds": seconds_record(feature_seconds, head_seconds, t0),
        },
    }
    runs.finish_run(run_dir, metrics)
    (run_dir / runs.CHECKPOINT).unlink(missing_ok=True)
    log.info(
        "done in %.1fs: val accuracy %.4f (%d images), macro F1 %.4f, calibration error %.4f -> %s",
        time.perf_counter() - t0, metrics["accuracy"], len(val_set), metrics["macro_f1"],
        metrics["calibration_error"], run_dir,
    )  # fmt: skip
    return run_dir
