"""The epoch loop every training phase runs: seeded batches, validation, best state, early stopping, resume.

One loop for the head on cached features (any task) and for fine-tuning unfrozen stages. After each epoch the whole
state (model, optimizer, schedule, random generators, best state, history) goes to the run's checkpoint, so an
interrupted run resumes at the epoch it reached and ends exactly as an uninterrupted one would. A phase that finished
keeps its result in the checkpoint and is not run again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from headstart import runs, tracking

log = logging.getLogger("headstart")


@dataclass(frozen=True)
class Schedule:
    """How a phase runs: ``monitor`` (a key of the validation row) selects the best epoch, ``mode`` says whether
    lower (min) or higher (max) is better, by more than ``min_delta``. Early stopping after ``patience`` epochs
    without improvement (None: never); ``select="last"`` keeps the final state instead of the best."""

    phase: str
    epochs: int
    batch_size: int
    seed: int
    monitor: str
    mode: str = "min"
    min_delta: float = 0.0
    patience: int | None = None
    eval_every: int = 1
    select: str = "best"


@dataclass
class Phase:
    """What a task gives the loop. ``step(indices, epoch)`` (epoch counted from 0) trains on one batch and returns
    the sums to average over the epoch's rows (``None`` skips the batch); ``evaluate()`` returns the validation row;
    ``epoch_row`` makes the history row from the epoch number, the averaged sums and the validation row (if
    measured)."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    num_samples: int
    step: Callable[[torch.Tensor, int], dict[str, float] | None]
    evaluate: Callable[[], dict[str, float]]
    epoch_row: Callable[[int, dict[str, float], dict[str, float] | None], dict]
    scheduler: object | None = None
    keep: Callable[[], dict[str, torch.Tensor]] | None = None  # the state that counts as "the model"
    restore: Callable[[dict[str, torch.Tensor]], None] | None = None


@dataclass
class FitResult:
    best: dict[str, torch.Tensor]
    history: list[dict]
    summary: dict = field(default_factory=dict)


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> float:
    """One training step's update: the gradients of ``loss`` (the old ones cleared first), then the optimizer's
    step; returns the loss as a number."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def _improved(score: float, best: float, schedule: Schedule) -> bool:
    if schedule.mode == "min":
        return score < best - schedule.min_delta
    return score > best + schedule.min_delta


def _snapshot(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in state.items()}


def train_head(job, head: nn.Module, optimizer, num_samples: int, step, evaluate, epoch_row, **selection):
    """The head phase every task runs on its cached features: ``--epochs`` of the loop with the learning rate on a
    cosine decay, the epoch kept as ``selection`` says (:class:`Schedule`'s ``monitor``, ``mode``, ``min_delta``,
    ``patience``...), its state loaded into ``head``, the history and the summary recorded in ``job``. Returns the
    loop's :class:`FitResult`."""
    cfg = job.cfg
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    phase = Phase(head, optimizer, num_samples, step, evaluate, epoch_row, scheduler=scheduler)
    schedule = Schedule("head", cfg.epochs, cfg.batch_size, cfg.seed, **selection)
    result = fit(phase, schedule, job.checkpoint, cfg.progress)
    head.load_state_dict(result.best)
    head.eval()
    job.history += result.history
    job.training_report["head"] = result.summary
    return result


def fit(phase: Phase, schedule: Schedule, checkpoint: Path | None, progress: bool = True) -> FitResult:
    """Run ``phase`` for ``schedule``; resumable from ``checkpoint``. Returns the selected state and history."""
    keep = phase.keep or phase.model.state_dict
    gen = torch.Generator().manual_seed(schedule.seed)
    worst = float("inf") if schedule.mode == "min" else float("-inf")
    state = {"epoch": 0, "best_score": worst, "best_epoch": 0, "stale": 0, "history": [], "stopped": False}
    best = _snapshot(keep())
    saved = _load_phase(checkpoint, schedule.phase)
    if saved is not None:
        best, state = _resume(phase, saved, gen)
        log.info("resuming %s training after epoch %d", schedule.phase, state["epoch"])
    bar = tqdm(
        total=schedule.epochs,
        initial=state["epoch"],
        desc=schedule.phase,
        unit="epoch",
        disable=not progress,
        leave=False,
    )
    while state["epoch"] < schedule.epochs and not state["stopped"]:
        epoch = state["epoch"] + 1
        sums = _train_epoch(phase, schedule, torch.randperm(phase.num_samples, generator=gen), state["epoch"])
        if phase.scheduler is not None:
            phase.scheduler.step()
        val = None
        if epoch % schedule.eval_every == 0 or epoch == schedule.epochs:
            phase.model.eval()
            val = phase.evaluate()
            if _record_score(state, val[schedule.monitor], epoch, schedule):
                best = _snapshot(keep())
            bar.set_postfix({k: f"{v:.4f}" for k, v in val.items()})
        state["epoch"] = epoch
        state["history"].append(phase.epoch_row(epoch, sums, val))
        tracking.log_epoch(state["history"][-1])
        if checkpoint is not None:
            _save_phase(checkpoint, schedule.phase, _phase_state(phase, keep, gen, best, state))
        bar.update(1)
    bar.close()
    if schedule.select == "last":
        best, state["best_epoch"] = _snapshot(keep()), state["epoch"]
    summary = {
        "epochs_run": state["epoch"],
        "best_epoch": state["best_epoch"],
        f"best_{schedule.monitor}": state["best_score"],
        "early_stopped": state["stopped"],
    }
    return FitResult(best, state["history"], summary)


def _record_score(state: dict, score: float, epoch: int, schedule: Schedule) -> bool:
    """Note an epoch's validation score in ``state`` (best so far, epochs without improvement, early stop); whether
    it is the new best."""
    if _improved(score, state["best_score"], schedule):
        state.update(best_score=score, best_epoch=epoch, stale=0)
        return True
    state["stale"] += schedule.eval_every
    state["stopped"] = schedule.patience is not None and state["stale"] >= schedule.patience
    return False


def _phase_state(phase: Phase, keep: Callable, gen: torch.Generator, best: dict, state: dict) -> dict:
    """Everything an interrupted phase needs to continue exactly where it was (the checkpoint's entry)."""
    return {
        "model": keep(),
        "optimizer": phase.optimizer.state_dict(),
        "scheduler": phase.scheduler.state_dict() if phase.scheduler is not None else None,
        "generator": gen.get_state(),
        "torch_rng": torch.get_rng_state(),
        "best": best,
        "state": state,
    }


def _resume(phase: Phase, saved: dict, gen: torch.Generator) -> tuple[dict, dict]:
    """Put back what :func:`_phase_state` saved; returns the best state and the loop's state."""
    (phase.restore or phase.model.load_state_dict)(saved["model"])
    phase.optimizer.load_state_dict(saved["optimizer"])
    if phase.scheduler is not None:
        phase.scheduler.load_state_dict(saved["scheduler"])
    gen.set_state(saved["generator"])
    torch.set_rng_state(saved["torch_rng"])
    return saved["best"], saved["state"]


def _train_epoch(phase: Phase, schedule: Schedule, order: torch.Tensor, epoch: int) -> dict[str, float]:
    phase.model.train()
    sums: dict[str, float] = {}
    for start in range(0, len(order), schedule.batch_size):
        stats = phase.step(order[start : start + schedule.batch_size], epoch)
        for k, v in (stats or {}).items():
            sums[k] = sums.get(k, 0.0) + v
    return sums


def _load_phase(checkpoint: Path | None, name: str) -> dict | None:
    if checkpoint is None or not checkpoint.exists():
        return None
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    return saved.get("phases", {}).get(name)


def _save_phase(checkpoint: Path, name: str, data: dict) -> None:
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True) if checkpoint.exists() else {}
    saved.setdefault("phases", {})[name] = _to_cpu(data)
    runs.save_torch(checkpoint, saved)


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj
