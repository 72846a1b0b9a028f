"""Sparsity schedules: pruning epochs, cubic/linear/constant values, exact final sparsity."""
from __future__ import annotations

import itertools

import pytest

from wf_pipeline.pruning.schedule import planned_targets, pruning_epochs, schedule_value, sparsity_at, step_of
from wf_pipeline.recipe.schema import ScheduleConfig


def test_pruning_epochs_include_start_and_end() -> None:
    assert pruning_epochs(ScheduleConfig(start_epoch=0, end_epoch=4, frequency=1)) == [0, 1, 2, 3, 4]
    assert pruning_epochs(ScheduleConfig(start_epoch=2, end_epoch=8, frequency=2)) == [2, 4, 6, 8]
    # an end not on the frequency grid is still a pruning epoch, so the final sparsity is reached
    assert pruning_epochs(ScheduleConfig(start_epoch=1, end_epoch=6, frequency=2)) == [1, 3, 5, 6]
    assert pruning_epochs(ScheduleConfig(start_epoch=3, end_epoch=3, frequency=5)) == [3]


def test_cubic_matches_zhu_gupta() -> None:
    cfg = ScheduleConfig(kind="cubic", start_epoch=0, end_epoch=4, frequency=1)
    si, sf = 0.2, 0.9
    for epoch in range(5):
        t = epoch / 4
        assert sparsity_at(epoch, cfg, si, sf) == pytest.approx(sf + (si - sf) * (1 - t) ** 3, abs=1e-12)
    assert sparsity_at(0, cfg, si, sf) == pytest.approx(si)
    assert sparsity_at(4, cfg, si, sf) == sf  # exact, not approximately
    values = [sparsity_at(e, cfg, si, sf) for e in range(5)]
    increments = [b - a for a, b in itertools.pairwise(values)]
    assert all(x > y for x, y in itertools.pairwise(increments))  # prunes fastest first


def test_linear_and_constant() -> None:
    cfg = ScheduleConfig(kind="linear", start_epoch=2, end_epoch=6, frequency=2)
    assert [sparsity_at(e, cfg, 0.5, 0.9) for e in (2, 4, 6)] == pytest.approx([0.5, 0.7, 0.9])
    const = ScheduleConfig(kind="constant", start_epoch=1, end_epoch=3, frequency=1)
    assert [sparsity_at(e, const, 0.1, 0.8) for e in (1, 2, 3)] == [0.8, 0.8, 0.8]


def test_value_holds_between_steps_and_outside_window() -> None:
    cfg = ScheduleConfig(kind="cubic", start_epoch=2, end_epoch=8, frequency=3)  # steps at 2, 5, 8
    assert sparsity_at(0, cfg, 0.3, 0.9) == 0.0 and sparsity_at(1, cfg, 0.3, 0.9) == 0.0
    assert sparsity_at(3, cfg, 0.3, 0.9) == sparsity_at(2, cfg, 0.3, 0.9) == pytest.approx(0.3)
    assert sparsity_at(6, cfg, 0.3, 0.9) == sparsity_at(5, cfg, 0.3, 0.9)
    assert sparsity_at(5, cfg, 0.3, 0.9) == pytest.approx(0.9 - 0.6 * 0.5**3)
    assert sparsity_at(20, cfg, 0.3, 0.9) == 0.9


def test_single_step_goes_straight_to_final() -> None:
    cfg = ScheduleConfig(start_epoch=0, end_epoch=0)
    assert planned_targets(cfg, 0.0, 0.75) == [(0, 0.75)]


def test_planned_targets_monotone_and_bounded() -> None:
    for kind in ("cubic", "linear", "constant"):
        cfg = ScheduleConfig(kind=kind, start_epoch=1, end_epoch=11, frequency=3)
        targets = [t for _, t in planned_targets(cfg, 0.1, 0.95)]
        assert targets == sorted(targets)
        assert targets[-1] == 0.95 and all(0.0 <= t <= 0.95 for t in targets)


def test_schedule_value_rejects_unknown_kind() -> None:
    with pytest.raises(ValueError, match="unknown schedule kind"):
        schedule_value(0.5, "exponential", 0.0, 0.9)


def test_fractional_frequency_is_exact() -> None:
    """SparseML recipes prune every 0.4 or 0.5 epochs: the grid is start + i·f, with no drift."""
    cfg = ScheduleConfig(start_epoch=0, end_epoch=2, frequency=0.4)
    assert pruning_epochs(cfg) == pytest.approx([0, 0.4, 0.8, 1.2, 1.6, 2])
    assert pruning_epochs(ScheduleConfig(start_epoch=0.5, end_epoch=3.0, frequency=0.5))[-1] == 3
    cfg = ScheduleConfig(start_epoch=0.1, end_epoch=0.7, frequency=0.3)  # 0.1+0.3+0.3 is 0.7000000000000001
    assert len(pruning_epochs(cfg)) == 3 and pruning_epochs(cfg)[-1] == 0.7
    assert sparsity_at(0.7, cfg, 0.2, 0.8) == 0.8


def test_step_of_epoch() -> None:
    assert step_of(0, 100) == 0 and step_of(3, 100) == 300
    assert step_of(0.4, 180) == 72  # 0.4 * 180 exactly
    assert step_of(0.4, 7) == 3  # 2.8 -> the first step at or after it
    assert step_of(1.2, 5) == 6  # 1.2 * 5 = 6.000000000000001 must not become 7
