"""Classification: an image folder (a class per subfolder) → a head on pooled frozen features.

What differs from the engine's job: pooled feature vectors, cross-entropy with optional class weights and label
smoothing, the best epoch by validation loss, optional fine-tuning of the last backbone stages, and accuracy, F1,
calibration, confusion matrix and worst predictions as metrics.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from models import Classifier, ClassifierHead, HeadConfig, PixelNormalize
from service.preprocess import decode_image
from training import runs
from training.augment import augmented_views, build_augmentation
from training.config import ClassifyConfig
from training.data import DatasetError, scan_image_folder
from training.engine import FeatureLayout, Job
from training.evaluate import plot_training_curves, write_evaluation
from training.loop import Phase, Schedule, fit
from training.onnx_io import ExportError, ort_probs
from training.predict import predict_paths

log = logging.getLogger("headstart")


def class_weights(train_labels: np.ndarray, num_classes: int, mode: str) -> tuple[torch.Tensor | None, dict]:
    """Inverse-frequency weights when asked for (``on``), or (``auto``) when the largest class is 1.5x the smallest."""
    counts = np.bincount(train_labels, minlength=num_classes).astype(np.float64)
    imbalance = float(counts.max() / max(counts.min(), 1))
    use = mode == "on" or (mode == "auto" and imbalance > 1.5)
    info = {"counts": counts.astype(int).tolist(), "imbalance_ratio": round(imbalance, 3), "weighted_loss": use}
    if not use:
        return None, info
    weights = counts.sum() / (num_classes * np.maximum(counts, 1))
    info["weights"] = [round(float(w), 4) for w in weights]
    log.info("classes are unbalanced (ratio %.2f): using class-weighted loss %s", imbalance, info["weights"])
    return torch.tensor(weights, dtype=torch.float32), info


class ClassifyTask:
    name = "classify"
    config = ClassifyConfig
    headline = ("accuracy", "macro_f1", "calibration_error")
    manifest_metrics = ("accuracy", "macro_f1", "calibration_error", "num_images")
    int8 = True  # export --int8: a static int8 model, kept only if it loses at most 1 accuracy point

    def scan(self, cfg: ClassifyConfig, report=None):
        report = report or scan_image_folder(cfg.data_dir, val_fraction=cfg.val_fraction, seed=cfg.seed)
        if not report.splits.get("val"):
            raise DatasetError(
                f"{report.root} has no validation images. Add a val/ folder next to train/, or put the class "
                "folders directly in the data folder to get an automatic split (--val-fraction)."
            )
        return report

    def data_record(self, cfg, report) -> dict:
        return {"root": str(Path(cfg.data_dir).resolve()), "split": report.split_source}

    def split_row(self, sample) -> list:
        return [sample.label]

    def input_spec(self, cfg, backbone):
        return backbone.preprocess

    def augmentation(self, preset, spec):
        return build_augmentation(preset, spec)

    def view_recipe(self, cfg, report) -> dict:
        return {}

    def feature_net(self, cfg, backbone):
        return backbone.features

    def layout(self, backbone, net, spec) -> FeatureLayout:
        return FeatureLayout(shape=(backbone.num_features,), pool=True, feature_map=backbone.extra["feature_map"],
                             channels=(backbone.num_features,))  # fmt: skip

    def make_views(self, job: Job, train: bool):
        pipeline, views = (job.pipeline, job.views) if train else (None, 1)
        return lambda img, sample, seed: (augmented_views(img, pipeline, job.spec, views, seed), {})

    def head_config(self, cfg, layout, labels) -> HeadConfig:
        return HeadConfig(layout.channels[0], len(labels), cfg.hidden, cfg.dropout, cfg.activation)

    def fit(self, job: Job, head_cfg: HeadConfig) -> ClassifierHead:
        cfg, device = job.cfg, job.device
        train_y = np.array([s.label for s in job.train.samples])
        weights, job.training["class_weights"] = class_weights(train_y, len(job.labels), cfg.class_weights)
        weights = None if weights is None else weights.to(device)
        head = ClassifierHead(head_cfg).to(device)
        x = torch.from_numpy(job.train.values.reshape(-1, head_cfg.in_features)).to(device)
        y = torch.from_numpy(np.repeat(train_y, job.views)).to(device)
        val_x = torch.from_numpy(job.val.values[:, 0]).to(device)
        val_y = torch.tensor([s.label for s in job.val.samples]).to(device)
        loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
        opt = torch.optim.AdamW(head.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

        def step(idx: torch.Tensor, epoch: int) -> dict | None:
            if len(idx) < 2 and cfg.hidden:  # BatchNorm1d needs 2 samples
                return None
            idx = idx.to(device)
            logits = head(x[idx])
            loss = loss_fn(logits, y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item() * len(idx), "correct": int((logits.argmax(1) == y[idx]).sum()), "seen": len(idx)}

        @torch.no_grad()
        def evaluate() -> dict:
            logits = head(val_x)
            return {"val_loss": float(nn.functional.cross_entropy(logits, val_y)),
                    "val_accuracy": float((logits.argmax(1) == val_y).float().mean())}  # fmt: skip

        def row(epoch: int, sums: dict, val: dict | None) -> dict:
            seen = max(sums.get("seen", 0), 1)
            return {"epoch": epoch, "phase": "head", "train_loss": sums.get("loss", 0.0) / seen,
                    "train_accuracy": sums.get("correct", 0) / seen, **(val or {})}  # fmt: skip

        phase = Phase(head, opt, len(y), step, evaluate, row,
                      scheduler=torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs))  # fmt: skip
        schedule = Schedule("head", cfg.epochs, cfg.batch_size, cfg.seed, monitor="val_loss", mode="min",
                            min_delta=1e-4, patience=cfg.patience)  # fmt: skip
        result = fit(phase, schedule, job.checkpoint, cfg.progress)
        head.load_state_dict(result.best)
        head.eval()
        job.history += result.history
        job.training["head"] = result.summary
        job.training["finetune"] = self._finetune(job, head, weights) if cfg.unfreeze else None
        return head

    def _finetune(self, job: Job, head: ClassifierHead, weights: torch.Tensor | None) -> dict:
        """Fine-tune the last ``--unfreeze`` backbone stages with the head, augmenting on the fly."""
        cfg, spec, device = job.cfg, job.spec, job.device
        unfrozen = job.backbone.freeze(cfg.unfreeze)
        model = Classifier(PixelNormalize(spec.mean, spec.std), job.backbone.features, head).to(device)
        tail = [p for p in job.backbone.features.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(
            [{"params": tail, "lr": cfg.finetune_lr}, {"params": head.parameters(), "lr": cfg.finetune_lr * 10}],
            weight_decay=cfg.weight_decay,
        )
        loss_fn = nn.CrossEntropyLoss(weight=weights, label_smoothing=cfg.label_smoothing)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        train, val = job.train.samples, job.val.samples
        pipeline = job.pipeline or build_augmentation("light", spec)
        targets = torch.tensor([s.label for s in train]).to(device)
        val_targets = np.array([s.label for s in val])

        def step(idx: torch.Tensor, epoch: int) -> dict:
            idx = idx.tolist()
            pixels = np.concatenate([
                augmented_views(decode_image(train[i].path), pipeline, spec, 1, cfg.seed * 100003 + epoch * 7919 + i)
                for i in idx
            ])  # fmt: skip
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=job.bf16):
                logits = model.logits(torch.from_numpy(pixels).to(device))
            loss = loss_fn(logits.float(), targets[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            return {"loss": loss.item() * len(idx), "seen": len(idx)}

        def evaluate() -> dict:
            probs = predict_paths(model, [s.path for s in val], spec)
            return {"val_loss": float(-np.log(np.clip(probs[np.arange(len(val)), val_targets], 1e-12, 1)).mean()),
                    "val_accuracy": float((probs.argmax(1) == val_targets).mean())}  # fmt: skip

        offset = len(job.history)

        def row(epoch: int, sums: dict, val: dict | None) -> dict:
            return {"epoch": offset + epoch, "phase": "finetune",
                    "train_loss": sums.get("loss", 0.0) / max(sums.get("seen", 0), 1), **(val or {})}  # fmt: skip

        phase = Phase(model, opt, len(train), step, evaluate, row,
                      keep=lambda: {k: v for k, v in model.state_dict().items() if k in trainable},
                      restore=lambda state: model.load_state_dict(state, strict=False))  # fmt: skip
        schedule = Schedule("finetune", cfg.finetune_epochs, min(32, cfg.batch_size), cfg.seed + 1,
                            monitor="val_loss", mode="min")  # fmt: skip
        result = fit(phase, schedule, job.checkpoint, cfg.progress)
        model.load_state_dict(result.best, strict=False)
        model.eval()
        job.history += result.history
        runs.save_safetensors(job.run_dir / runs.BACKBONE_TAIL, job.backbone.stage_state_dict(unfrozen))
        return {"unfrozen_stages": unfrozen, **result.summary}

    def evaluate(self, job: Job, head: ClassifierHead) -> dict:
        val, spec = job.val.samples, job.spec
        if job.cfg.unfreeze:
            model = Classifier(PixelNormalize(spec.mean, spec.std), job.backbone.features, head).eval()
            probs = predict_paths(model, [s.path for s in val], spec)
        else:
            with torch.no_grad():
                probs = torch.softmax(head(torch.from_numpy(job.val.values[:, 0]).to(job.device)), dim=1).cpu().numpy()
        targets = np.array([s.label for s in val])
        metrics = write_evaluation(job.run_dir, probs, targets, job.labels, [s.path for s in val], spec)
        plot_training_curves(job.history, job.run_dir / "training_curves.png")
        return metrics

    def build_model(self, record, spec, features, head_state) -> Classifier:
        head = ClassifierHead(HeadConfig(**record.head))
        head.load_state_dict(head_state)
        return Classifier(PixelNormalize(spec.mean, spec.std), features, head)

    # ---------------------------------------------------------------- export

    def outputs(self, num_classes: int, fmap: list[int], head: dict) -> list[dict]:
        return [
            {"name": "probabilities", "shape": ["batch", num_classes], "what": "class probabilities"},
            {"name": "class_map", "shape": ["batch", num_classes, *fmap],
             "what": "per-cell class probabilities (class activation map) on the feature grid"},
        ]  # fmt: skip

    def verify(self, model, session, paths, targets, spec) -> tuple[dict, np.ndarray]:
        """ONNX Runtime against PyTorch on the run's validation images: 100% top-1 agreement, |Δp| at most 1e-3.
        Returns the record for the manifest and ONNX Runtime's probabilities."""
        torch_probs = predict_paths(model, paths, spec)
        onnx_probs = ort_probs(session, paths, spec)
        max_diff = float(np.abs(torch_probs - onnx_probs).max())
        agreement = float((torch_probs.argmax(1) == onnx_probs.argmax(1)).mean())
        log.info("ONNX Runtime vs PyTorch on %d validation images: max |Δp| %.2e, top-1 agreement %.2f%%",
                 len(paths), max_diff, 100 * agreement)  # fmt: skip
        if agreement < 1.0 or max_diff > 1e-3:
            raise ExportError(
                f"ONNX Runtime disagrees with PyTorch (top-1 agreement {agreement:.2%}, max |Δp| {max_diff:.2e}); "
                "the export is not trustworthy and was not written."
            )
        accuracy = float((onnx_probs.argmax(1) == targets).mean())
        return {"images": len(paths), "max_abs_prob_diff": max_diff, "top1_agreement": agreement,
                "onnx_accuracy": accuracy}, onnx_probs  # fmt: skip

    def int8_quality(self, run, reference: np.ndarray, session, paths, targets) -> dict:
        """The int8 model against the fp32 one (``reference``: its probabilities) on the validation images."""
        q_probs = ort_probs(session, paths, run.spec)
        fp32, int8 = float((reference.argmax(1) == targets).mean()), float((q_probs.argmax(1) == targets).mean())
        return {"metric": "accuracy", "accuracy_fp32": fp32, "accuracy_int8": int8, "drop": fp32 - int8,
                "top1_agreement": float((q_probs.argmax(1) == reference.argmax(1)).mean()),
                "max_abs_prob_diff": float(np.abs(q_probs - reference).max())}  # fmt: skip

    def precision_gate(self, reference: list[np.ndarray], got: list[np.ndarray], targets: np.ndarray) -> dict:
        """A runtime/precision may serve if it agrees with the reference on >= 99% of the validation images and
        loses at most 1 accuracy point."""
        ref, probs = reference[0], got[0]
        agreement = float((ref.argmax(1) == probs.argmax(1)).mean())
        accuracy, ref_accuracy = float((probs.argmax(1) == targets).mean()), float((ref.argmax(1) == targets).mean())
        drop = ref_accuracy - accuracy
        return {"images": len(ref), "top1_agreement": agreement, "accuracy": accuracy, "accuracy_drop": drop,
                "max_abs_prob_diff": float(np.abs(ref - probs).max()),
                "allowed": agreement >= 0.99 and drop <= 0.01}  # fmt: skip
