"""Learning-rate and weight-decay schedules: pure functions of the (fractional) epoch, easy to test."""
from __future__ import annotations

import math

from wf_pipeline.recipe.schema import LRPieceConfig, LRScheduleConfig, TrainingConfig


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
