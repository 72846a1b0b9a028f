"""Blocks promoted to float64 stay within the memory plan, and give the same inverse and pruning as in memory.

Gradients far larger than the damping (inputs scaled up, λ = 1e-5) make the accuracy check move most
Fisher blocks to float64, as ResNet-50's default random init does at 224 px. The statistics' memory is
measured by counting every tensor storage allocated while a group's statistics are built (a dispatch
mode that sees each operator's outputs and drops storages once they are freed), not estimated.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from tests.test_streamed_fisher import (
    DAMP,
    RECOMPUTE,
    SPILL_INVERSES,
    SPILL_ROWS,
    _assert_same,
    _budgeted_prune,
    _in_memory_prune,
    _model,
)
from wf_pipeline.fisher import streamed
from wf_pipeline.fisher.inverse import BlockGramAccumulator, BlockLayout
from wf_pipeline.fisher.plan import SLICE_BLOCKS, SLICE_COPIES, FisherPlan, PlanInputs, make_plan
from wf_pipeline.fisher.segmented import SegmentedGramAccumulator, segment_workset_bytes

SCALE = 10.0  # input scale at which all but a few blocks of the test model need float64 at λ = 1e-5


class AllocationTracker(TorchDispatchMode):
    """Bytes of tensor storage allocated under the mode and still alive after each operator; the peak."""

    def __init__(self) -> None:
        super().__init__()
        self.live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}  # an output on an input's storage (a view, in place) is not new
        for key, (ref, nbytes) in list(self.live.items()):
            if ref.expired():
                del self.live[key]
                self.current -= nbytes
        for tensor in pytree.tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if storage.nbytes() and key not in self.live and key not in inputs:
                    self.live[key] = (StorageWeakRef(storage), storage.nbytes())
                    self.current += storage.nbytes()
        self.peak = max(self.peak, self.current)
        return out


def test_tracker_counts_live_storages() -> None:
    outside = torch.zeros(10_000)
    with AllocationTracker() as tracker:
        a = torch.zeros(1000, dtype=torch.float64)
        b = a.double()  # no copy
        c = torch.empty(500)
        del c
        d = a[:10] * 2
        outside[:5] += 1  # a view and an in-place change of a tensor made outside: nothing new
    assert tracker.peak == 8000 + 2000 and tracker.current == 8000 + 80 and b is a and d.numel() == 10


def _rows(layout: BlockLayout, scale: torch.Tensor, counts: list[int]) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return [torch.randn(n, layout.dim, generator=gen) * scale for n in counts]


def test_segments_give_the_inverse_of_one_accumulator_bitwise() -> None:
    """Per block the same chunks in the same order: the same float64 promotions and the same bits, whether the
    segments are filled together or one after another (gradient rows read back from disk)."""
    layout = BlockLayout([300, 64, 65, 7, 200], 16)
    gen = torch.Generator().manual_seed(1)
    scale = torch.rand(layout.dim, generator=gen).pow(6) * 0.3  # blocks promoted at the first chunk, later, never
    chunks = _rows(layout, scale, [8, 8, 8, 5])
    whole = BlockGramAccumulator(layout, damp=DAMP)
    together = SegmentedGramAccumulator(layout, damp=DAMP, blocks_per_segment=3)
    for chunk in chunks:
        whole.add(chunk)
        together.add(chunk)
    one_by_one = SegmentedGramAccumulator(layout, damp=DAMP, blocks_per_segment=4)
    for index, (s, e) in enumerate(one_by_one.bounds):
        for chunk in chunks:
            one_by_one.add_segment(index, layout.to_blocked(chunk)[s:e])
        one_by_one.finish(index, DAMP)
    means = [acc.mean_gradient() for acc in (whole, together, one_by_one)]
    inverses = [acc.inverse(DAMP) for acc in (whole, together, one_by_one)]
    promoted = inverses[0].health.promoted_blocks
    assert 0 < promoted < layout.num_blocks and inverses[0].health.working_dtype == "float32+float64"
    for mean, inverse in zip(means[1:], inverses[1:], strict=True):
        assert torch.equal(inverse.blocks, inverses[0].blocks) and torch.equal(mean, means[0])
        assert inverse.health == inverses[0].health


def test_non_finite_sums_name_blocks_of_the_whole_layout() -> None:
    from wf_pipeline.fisher.conditioning import FisherStatisticsError

    layout = BlockLayout([64, 64, 64], 16)  # 12 blocks: layer 2 holds blocks 8-11
    acc = SegmentedGramAccumulator(layout, damp=DAMP, blocks_per_segment=5)
    rows = torch.randn(4, layout.dim)
    rows[1, 140] = float("inf")  # block 8, in the second segment
    acc.add(rows)
    with pytest.raises(FisherStatisticsError, match="in 1 of 12 blocks \\(selected layer index 2\\)"):
        acc.inverse(DAMP)


def test_segments_one_at_a_time_hold_one_segment_in_float64() -> None:
    """Rows read back a segment at a time: the float32 buffer and one segment's transients, whatever the share of
    blocks in float64; one accumulator over the group holds float32 and float64 copies of every promoted block
    (and segments filled together by a pass are counted for that too)."""
    B, K, S = 32, 96, 8
    layout = BlockLayout([B * K], B)
    gen = torch.Generator().manual_seed(3)
    rate = torch.rand(K, generator=gen).repeat_interleave(B) * 3  # blocks promoted in waves, chunk after chunk
    blocked = [layout.to_blocked(torch.randn(16, layout.dim, generator=gen) * 10 ** (rate * t - 3)) for t in range(6)]
    peaks, results = {}, {}
    for name in ("one", "together", "separate", "one by one"):
        with AllocationTracker() as tracker:
            if name == "one":
                acc: BlockGramAccumulator | SegmentedGramAccumulator = BlockGramAccumulator(layout, damp=DAMP)
            else:
                acc = SegmentedGramAccumulator(layout, damp=DAMP, blocks_per_segment=S, shared=name != "separate")
            if name == "one by one":
                assert isinstance(acc, SegmentedGramAccumulator)
                for index, (s, e) in enumerate(acc.bounds):
                    for rows in blocked:
                        acc.add_segment(index, rows[s:e])
                    acc.finish(index, DAMP)
            else:
                for rows in blocked:
                    acc.add_blocked(rows)
            if name == "separate":
                assert isinstance(acc, SegmentedGramAccumulator)
                parts, health = acc.segment_inverses(DAMP)
                results[name] = torch.cat([part for _, _, part in parts])
                del parts
            else:
                inverse = acc.inverse(DAMP)
                results[name], health = inverse.blocks, inverse.health
                del inverse
        peaks[name] = tracker.peak
        assert health.promoted_blocks > K // 2
        del acc
    assert all(torch.equal(blocks, results["one"]) for blocks in results.values())
    float32, float64 = 4 * B * B * K, 8 * B * B * K
    # what the plan counts beside them: one segment's transients and a slice of batched-solve temporaries
    beside = segment_workset_bytes(B, S, 16) + SLICE_COPIES * 8 * B * B * min(SLICE_BLOCKS, S)
    assert peaks["one by one"] <= float32 + beside
    assert peaks["separate"] - float32 <= float64 + beside  # (less the copy joining the parts, made for the test)
    assert peaks["together"] <= float32 + float64 + beside
    assert peaks["one"] > float32 + float64


def _collect_peaks(monkeypatch) -> list[tuple[int, int, int]]:
    """(start, stop, peak bytes) of each group's statistics as built, tracked around `_GroupSource.group_stats`."""
    peaks: list[tuple[int, int, int]] = []
    original = streamed._GroupSource.group_stats

    def tracked(self, group, with_mean):
        with AllocationTracker() as tracker:
            result = original(self, group, with_mean)
        peaks.append((group.start, group.stop, tracker.peak))
        return result

    monkeypatch.setattr(streamed._GroupSource, "group_stats", tracked)
    return peaks


def _allowance(plan: FisherPlan, inputs: PlanInputs) -> int:
    """What the plan's collect phase allows one group's statistics, less what is allocated before they are built."""
    vectors = inputs.vectors * 8 * inputs.dim
    return plan.phase_bytes["collect"] - plan.cache_bytes - vectors


@pytest.mark.parametrize("mode", [SPILL_ROWS, SPILL_INVERSES, RECOMPUTE])
def test_most_blocks_in_float64_stay_within_the_plan_and_equal_the_in_memory_step(tmp_path: Path, mode: str,
                                                                                  monkeypatch) -> None:
    peaks = _collect_peaks(monkeypatch)
    reference, budgeted = _model(), _model()
    plan, predicted, masks = _budgeted_prune(budgeted, "woodfisher", 64, 64, 16, 0.7,
                                             None if mode == RECOMPUTE else tmp_path / "run", mode, scale=SCALE)
    assert len(plan.groups) >= 3 and plan.representation == "gram"
    health = plan_health.pop()
    assert health.promoted_blocks >= 0.95 * health.num_blocks  # most blocks in float64
    assert ("one segment at a time" in plan.precision) == (mode == SPILL_ROWS)
    assert "float64" in plan.summary() and plan.to_dict()["precision"] == plan.precision
    inputs = plan_inputs.pop()
    B = plan.block_size
    for start, stop, peak in peaks:
        assert peak <= _allowance(plan, inputs), (start, stop, peak)
        if mode == SPILL_ROWS:  # one segment's float64 blocks at a time, not the group's
            assert peak < 4 * B * B * (stop - start) + 8 * B * B * 2 * plan.segment_blocks + 2 * 10**6
    # The same pruning as with everything in memory.
    report, ref_masks = _in_memory_prune(reference, "woodfisher", 64, 64, plan.chunk_size, 0.7, scale=SCALE)
    assert report.details.fisher_health is not None
    assert report.details.fisher_health.promoted_blocks == health.promoted_blocks
    _assert_same(reference, budgeted, ref_masks, masks)
    assert predicted == pytest.approx(report.predicted_loss_increase, rel=1e-6)


plan_health: list = []
plan_inputs: list = []


@pytest.fixture(autouse=True)
def _record_health_and_inputs(monkeypatch):
    """Keep the streamed step's merged inverse health and its measured plan inputs for the test to check."""
    plan_health.clear()
    plan_inputs.clear()
    original_collect = streamed.collect_grouped_inverse
    original_measure = streamed.measure_plan_inputs

    def collect(job, plan, **kwargs):
        grouped = original_collect(job, plan, **kwargs)
        plan_health.append(grouped.health)
        return grouped

    def measure(job, **kwargs):
        inputs = original_measure(job, **kwargs)
        plan_inputs.append(inputs)
        return inputs

    import tests.test_streamed_fisher as helpers

    monkeypatch.setattr(helpers, "collect_grouped_inverse", collect)
    monkeypatch.setattr(helpers, "measure_plan_inputs", measure)


def test_plan_counts_float64_where_a_pass_fills_a_group() -> None:
    """Promotable float32 Gram blocks: 8·B² more per block of a group a pass fills; spilled rows need one segment."""
    base: dict[str, Any] = dict(sizes=[4096, 4096], num_grads=256, block_size=64, stat_bytes=4,
                                activation_bytes=1000, input_bytes=400,
                                max_chunk=32, spill_free_bytes=10**12)
    plain, promotable = PlanInputs(**base), PlanInputs(**base, promotable=True)
    ample = 10**9
    a, b = make_plan(plain, ample), make_plan(promotable, ample)
    assert a.revisit == b.revisit == "none" and a.segment_blocks == b.segment_blocks
    extra = b.phase_bytes["collect"] - a.phase_bytes["collect"]
    blocks = 128
    workset = segment_workset_bytes(64, min(b.segment_blocks, blocks), a.chunk_size)
    assert extra == pytest.approx(1.05 * (8 * 64 * 64 * blocks + workset), abs=2)
    assert a.precision == "float32" and "every block also in float64" in b.precision
    assert "float64" in b.summary()
    # A budget that holds the float32 statistics in one pass but not their float64 copies: rows go to disk and
    # the groups are built a segment at a time, with the same float32 groups as without promotion.
    tight = a.peak_bytes + 10**5
    c = make_plan(promotable, tight)
    assert c.gradient_spill and "one segment at a time" in c.precision and c.peak_bytes <= tight
