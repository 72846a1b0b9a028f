"""Gradual sparsity schedules as plain functions of the (fractional) epoch, testable alone.

A pruning step happens at every epoch returned by :func:`pruning_epochs`: at ``start_epoch`` the model
is pruned to ``initial`` sparsity, at ``end_epoch`` to ``final`` exactly, and in between the target
follows the schedule's curve. Between two pruning epochs the target stays at the last step's value, so
``sparsity_at(epoch)`` is the sparsity in force while that epoch trains. Epochs may be fractional
(``frequency: 0.4`` prunes every 0.4 epochs, as SparseML recipes do); :func:`step_of` turns an epoch
into the optimizer step before which the pruning happens.

The cubic curve is Zhu & Gupta's (2017) ``s_f + (s_i - s_f)(1 - t)^3`` with ``t`` the fraction of the
pruning window elapsed: it prunes fast while many redundant weights remain and slowly near the end.
"""
from __future__ import annotations

import math

from wf_pipeline.recipe.schema import ScheduleConfig

# Epoch arithmetic tolerance: 0.1 + 0.2 must count as 0.3 when it decides a step or the end.
_EPS = 1e-9


def pruning_epochs(cfg: ScheduleConfig) -> list[float]:
    """``start, start+frequency, ...`` up to ``end_epoch``, which is always included.

    Each epoch is ``start + i·frequency`` (not a running sum), so fractional frequencies do not drift.
    """
    start, end, every = float(cfg.start_epoch), float(cfg.end_epoch), float(cfg.frequency)
    count = math.floor((end - start) / every + _EPS)
    epochs = [start + i * every for i in range(count + 1)]
    if end - epochs[-1] > _EPS:
        epochs.append(end)
    else:
        epochs[-1] = end
    return [int(e) if float(e).is_integer() else e for e in epochs]


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


def sparsity_at(epoch: float, cfg: ScheduleConfig, initial: float, final: float) -> float:
    """Target sparsity in force during `epoch` (0 before the first pruning step)."""
    steps = [e for e in pruning_epochs(cfg) if e <= epoch + _EPS]
    if not steps:
        return 0.0
    last = steps[-1]
    if last >= cfg.end_epoch - _EPS:
        return final  # exactly, whatever rounding the curve would give
    span = cfg.end_epoch - cfg.start_epoch
    return schedule_value((last - cfg.start_epoch) / span, cfg.kind, initial, final)


def planned_targets(cfg: ScheduleConfig, initial: float, final: float) -> list[tuple[float, float]]:
    """Every (pruning epoch, target sparsity) pair of the schedule, in order."""
    return [(e, sparsity_at(e, cfg, initial, final)) for e in pruning_epochs(cfg)]


def step_of(epoch: float, steps_per_epoch: int) -> int:
    """The optimizer step before which a pruning scheduled at `epoch` happens: the first step whose
    position ``step / steps_per_epoch`` has reached the epoch (SparseML's rule; exact for whole epochs)."""
    return math.ceil(epoch * steps_per_epoch - _EPS)
