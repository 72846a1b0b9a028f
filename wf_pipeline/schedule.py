"""Gradual sparsity schedules as plain functions of the epoch (testable alone).

A pruning step happens at the *start* of every epoch returned by :func:`pruning_epochs`: at
``start_epoch`` the model is pruned to ``initial`` sparsity, at ``end_epoch`` to ``final`` exactly, and
in between the target follows the schedule's curve. Between two pruning epochs the target stays at
the last step's value, so ``sparsity_at(epoch)`` is the sparsity in force while that epoch trains.

The cubic curve is Zhu & Gupta's (2017) ``s_f + (s_i - s_f)(1 - t)^3`` with ``t`` the fraction of the
pruning window elapsed: it prunes fast while many redundant weights remain and slowly near the end.
"""
from __future__ import annotations

from wf_pipeline.recipe.schema import ScheduleConfig


def pruning_epochs(cfg: ScheduleConfig) -> list[int]:
    """``start, start+frequency, ...`` up to ``end_epoch``, which is always included."""
    epochs = list(range(cfg.start_epoch, cfg.end_epoch + 1, cfg.frequency))
    if epochs[-1] != cfg.end_epoch:
        epochs.append(cfg.end_epoch)
    return epochs


def schedule_value(fraction: float, kind: str, initial: float, final: float) -> float:
    """The curve itself at ``fraction`` ∈ [0, 1] of the pruning window (clamped outside it)."""
    t = min(max(fraction, 0.0), 1.0)
    if kind == "cubic":
        return final + (initial - final) * (1.0 - t) ** 3
    if kind == "linear":
        return initial + (final - initial) * t
    if kind == "constant":
        return final
    raise ValueError(f"unknown schedule kind {kind!r}; expected cubic, linear or constant")


def sparsity_at(epoch: int, cfg: ScheduleConfig, initial: float, final: float) -> float:
    """Target sparsity in force during `epoch` (0 before the first pruning step)."""
    steps = [e for e in pruning_epochs(cfg) if e <= epoch]
    if not steps:
        return 0.0
    last = steps[-1]
    if last >= cfg.end_epoch:
        return final  # exactly, whatever rounding the curve would give
    span = cfg.end_epoch - cfg.start_epoch
    return schedule_value((last - cfg.start_epoch) / span, cfg.kind, initial, final)


def planned_targets(cfg: ScheduleConfig, initial: float, final: float) -> list[tuple[int, float]]:
    """Every (pruning epoch, target sparsity) pair of the schedule, in order."""
    return [(e, sparsity_at(e, cfg, initial, final)) for e in pruning_epochs(cfg)]
