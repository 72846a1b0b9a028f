"""Optimisers, learning-rate schedules, one training epoch and evaluation: shared by dense training and fine-tuning."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from wf_pipeline.recipe.schema import LRScheduleConfig, OptimizerConfig, TrainingConfig

ProgressFn = Callable[[int, int, float], None]  # (step, total_steps, running_loss)


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


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


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
        set_lr(optimizer, cfg.optimizer.lr * lr_factor(cfg.lr_schedule, epoch + step / steps_per_epoch, cfg.epochs, cfg.optimizer.lr))
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
