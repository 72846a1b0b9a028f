"""Optimisers, learning-rate schedules, one training epoch and evaluation: shared by dense training and fine-tuning."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wf_pipeline.recipe.schema import LRPieceConfig, LRScheduleConfig, OptimizerConfig, TrainingConfig

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, running_loss)


_DECAYED_GROUP = 0  # index of the weight-decayed parameter group in build_optimizer's optimizers


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters, as in the paper's training setups.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def lr_factor(cfg: LRScheduleConfig, progress_epochs: float, total_epochs: float, base_lr: float) -> float:
    """Multiplier on the base learning rate at a (fractional) epoch; a pure function, easy to test."""
    if cfg.warmup_epochs > 0 and progress_epochs < cfg.warmup_epochs:
        return (progress_epochs + 1e-8) / cfg.warmup_epochs
    span = max(total_epochs - cfg.warmup_epochs, 1e-8)
    t = min(max((progress_epochs - cfg.warmup_epochs) / span, 0.0), 1.0)
    floor = cfg.final_lr / base_lr
    if cfg.kind == "constant":
        return 1.0
    if cfg.kind == "cosine":
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
    if cfg.kind == "linear":
        return 1.0 + (floor - 1.0) * t
    if cfg.kind == "step":
        return cfg.gamma ** sum(progress_epochs >= e for e in cfg.step_epochs)
    if cfg.kind == "exponential":
        return cfg.gamma**progress_epochs
    # onecycle: rise for the first 30%, then cosine down
    if t < 0.3:
        return 0.1 + 0.9 * t / 0.3
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * (t - 0.3) / 0.7))


def piece_lr(piece: LRPieceConfig, progress_epochs: float, end_epoch: float) -> float:
    """The rate of one schedule piece at an epoch inside it (`end_epoch` resolves an open-ended piece)."""
    span = max(end_epoch - piece.start_epoch, 1e-8)
    t = min(max((progress_epochs - piece.start_epoch) / span, 0.0), 1.0)
    if piece.kind == "constant":
        return piece.lr
    if piece.kind == "linear":
        return piece.lr + (piece.final_lr - piece.lr) * t
    if piece.kind == "cosine":
        return piece.final_lr + (piece.lr - piece.final_lr) * 0.5 * (1 + math.cos(math.pi * t))
    if piece.kind == "step":
        return piece.lr * piece.gamma ** sum(progress_epochs >= e for e in piece.step_epochs)
    # exponential: continuous, like the single-schedule form
    return piece.lr * piece.gamma ** (min(progress_epochs, end_epoch) - piece.start_epoch)


def piecewise_lr(pieces: list[LRPieceConfig], progress_epochs: float, total_epochs: float) -> float:
    """The rate at an epoch of a piecewise schedule; after the last piece it stays at that piece's end value."""
    current = pieces[0]
    for piece in pieces:
        if progress_epochs >= piece.start_epoch:
            current = piece
    end = current.end_epoch if current.end_epoch is not None else max(float(total_epochs), current.start_epoch)
    return piece_lr(current, progress_epochs, end)


def lr_at(cfg: TrainingConfig, progress_epochs: float) -> float:
    """The learning rate of a training run at a (fractional) epoch, for either form of `lr_schedule`."""
    schedule = cfg.lr_schedule
    if isinstance(schedule, list):
        return piecewise_lr(schedule, progress_epochs, cfg.epochs)
    return cfg.optimizer.lr * lr_factor(schedule, progress_epochs, cfg.epochs, cfg.optimizer.lr)


def weight_decay_at(cfg: TrainingConfig, progress_epochs: float) -> float | None:
    """The weight decay a piecewise schedule sets at an epoch; None when the schedule never changes it."""
    pieces = cfg.lr_schedule
    if not isinstance(pieces, list) or all(piece.weight_decay is None for piece in pieces):
        return None
    current = pieces[0]
    for piece in pieces:
        if progress_epochs >= piece.start_epoch:
            current = piece
    return cfg.optimizer.weight_decay if current.weight_decay is None else current.weight_decay


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    # build_optimizer puts the decayed parameters first; norms and biases (the second group) never decay.
    optimizer.param_groups[_DECAYED_GROUP]["weight_decay"] = weight_decay


@dataclass
class EpochStats:
    loss: float
    accuracy: float
    steps: int


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    cfg: TrainingConfig,
    *,
    epoch: int,
    steps_per_epoch: int,
    device: torch.device,
    start_step: int = 0,
    progress: ProgressFn | None = None,
    after_step: Callable[[int], None] | None = None,
) -> EpochStats:
    """One pass over `batches`, setting the LR per step from the recipe's schedule."""
    model.train()
    total_loss, correct, seen, step = 0.0, 0, 0, start_step
    for x, y in batches:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        at_epoch = epoch + step / steps_per_epoch
        set_lr(optimizer, lr_at(cfg, at_epoch))
        weight_decay = weight_decay_at(cfg, at_epoch)
        if weight_decay is not None:
            set_weight_decay(optimizer, weight_decay)
        logits = model(x)
        loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.grad_clip:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        optimizer.step()
        step += 1
        total_loss += loss.item() * len(y)
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
        if progress:
            progress(step, steps_per_epoch, total_loss / seen)
        if after_step:
            after_step(step)
    return EpochStats(total_loss / max(seen, 1), correct / max(seen, 1), step - start_step)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> tuple[float, float]:
    """(accuracy, mean loss) in eval mode; restores the previous mode."""
    was_training = model.training
    model.eval()
    correct, seen, total_loss = 0, 0, 0.0
    for x, y in batches:
        x, y = x.to(device), y.to(device)
        logits = model(x)
        total_loss += F.cross_entropy(logits, y, reduction="sum").item()
        correct += int((logits.argmax(1) == y).sum())
        seen += len(y)
    model.train(was_training)
    return correct / max(seen, 1), total_loss / max(seen, 1)
