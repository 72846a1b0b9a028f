"""The memory planner's arithmetic: representation, groups, chunk size, revisits, peaks and the smallest budget."""
from __future__ import annotations

import math
from typing import Any

import pytest
import torch

from wf_pipeline.errors import WFError
from wf_pipeline.fisher import plan as planner
from wf_pipeline.fisher.plan import PlanInputs, agree_min, make_plan, plan_within, smallest_budget

MB = 1_000_000


def _blocks(inputs: PlanInputs) -> list[tuple[int, int]]:
    """(layer, real weights) of every block, in order."""
    out = []
    for layer, size in enumerate(inputs.sizes):
        for start in range(0, size, inputs.block_size):
            out.append((layer, min(inputs.block_size, size - start)))
    return out


def _group_bytes(inputs: PlanInputs, start: int, stop: int, n: int, cache: int, revisit: str,
                 gradient_spill: bool = False, segment: int = 1) -> tuple[int, int]:
    """collect(g) and update(g) from the module doc's table, computed independently of the planner.

    `segment`: the plan's blocks per accumulator segment (spilled Gram rows are read back a segment at a time;
    with `inputs.promotable` a segment's float64 transients, and without `gradient_spill` room for every block
    of the group in float64)."""
    blocks = _blocks(inputs)[start:stop]
    layers = {layer for layer, _ in blocks}
    touched = sum(inputs.sizes[i] for i in layers)
    weights = sum(w for _, w in blocks)
    B, d = inputs.block_size, inputs.dim
    gram = inputs.representation() == "gram"
    per_block = B * B * inputs.stat_bytes if gram else inputs.num_grads * B * inputs.grad_bytes
    stats = per_block * len(blocks)
    vectors = 8 * inputs.vectors * d
    promoted = inputs.stat_bytes if gram and inputs.stat_bytes != inputs.grad_bytes else 0
    activations = int(n * inputs.grad_batch_size * inputs.activation_bytes * 1.5)
    chunk = activations + n * (3 * inputs.grad_bytes + promoted) * touched
    chunk += 8 * inputs.grad_bytes * touched  # the first chunk's check against autograd on two samples
    if gradient_spill:  # rows read back a chunk at a time instead of a gradient pass (Gram: a segment's)
        segment = min(segment, len(_blocks(inputs)))
        chunk = (segment if gram else len(blocks)) * n * B * (inputs.grad_bytes + promoted)
    float64 = 0
    if gram and inputs.promotable:  # one open segment: 4 float64 copies of its blocks and of a chunk's rows
        chunk += min(segment, len(_blocks(inputs))) * (4 * 8 * B * B + n * B * (8 + inputs.grad_bytes))
        # a pass fills every block of the group: in memory beside the whole float32 buffer, streamed instead of it
        float64 = 0 if gradient_spill else (8 if revisit == "none" else 4) * B * B * len(blocks)
    slices = inputs.slice_bytes()
    collect = cache + vectors + stats + float64 + chunk + slices
    rebuilt = chunk + float64 if revisit == "recompute" else 0
    update = cache + vectors + 32 * d + stats + 48 * weights + slices + rebuilt
    return math.ceil(collect * 1.05), math.ceil(update * 1.05)  # with the allocator slack


def _inputs(**kw) -> PlanInputs:
    base: dict[str, Any] = dict(sizes=[1000, 300], num_grads=200, block_size=100, stat_bytes=4, activation_bytes=1000,
                input_bytes=400, max_chunk=50, threads=1)
    return PlanInputs(**(base | kw))


def test_representation_is_the_smaller_of_gram_and_rows() -> None:
    assert _inputs(num_grads=200).representation() == "gram"  # N·4 > B·4
    assert _inputs(num_grads=100).representation() == "gram"  # a tie keeps Gram blocks
    assert _inputs(num_grads=32, stat_bytes=8).representation() == "lowrank"  # N < B: promoted fp64 Gram vs fp32 rows
    assert _inputs(num_grads=150, stat_bytes=8).representation() == "lowrank"  # 150·4 < 100·8
    assert _inputs(num_grads=32, stat_bytes=8, allow_lowrank=False).representation() == "gram"
    assert _inputs(num_grads=32, stat_bytes=8).block_bytes() == 32 * 100 * 4


def test_ample_budget_keeps_everything_in_one_pass_with_exact_peaks() -> None:
    inputs = _inputs()
    plan = make_plan(inputs, 10**9)
    assert (len(plan.groups), plan.revisit, plan.keep_last, plan.chunk_size) == (1, "none", True, 50)
    assert plan.gradient_passes == 1 and not plan.streamed and plan.cache_bytes == 0 and plan.spill_bytes == 0
    stats = 13 * 100 * 100 * 4
    assert plan.stats_bytes == stats and plan.groups[0].weights == 1300
    slices = 13 * 8 * 4 * 100 * 100  # the 13 blocks in one slice of the single worker, 4 fp64 copies each
    chunk = 50 * 1000 * 1.5 + 50 * 12 * 1300 + 32 * 1300
    slack = 1.05  # allocator slack on every phase
    assert plan.phase_bytes == {
        "collect": math.ceil((8 * 1300 + stats + chunk + slices) * slack),
        "rank": math.ceil((8 * 1300 + 64 * 1300 + stats) * slack),
        "update": math.ceil((8 * 1300 + 32 * 1300 + stats + 48 * 1300 + slices) * slack),
    }
    assert plan.peak_bytes == plan.phase_bytes["collect"]


ROWS_AND_INVERSES = 10**12  # free disk for gradient rows and inverses
INVERSES_ONLY = "inverses"  # free disk for the inverses but not the gradient rows as well


@pytest.mark.parametrize("disk", [None, ROWS_AND_INVERSES, INVERSES_ONLY])
@pytest.mark.parametrize("stat_bytes,num_grads,promotable", [(4, 200, False), (4, 200, True), (8, 32, False)])
def test_tight_budget_packs_groups_greedily_within_the_budget(disk, stat_bytes, num_grads, promotable) -> None:
    base = _inputs(sizes=[1000, 300, 2500, 70], stat_bytes=stat_bytes, num_grads=num_grads)
    stats_total = len(_blocks(base)) * base.block_bytes()
    free = int(1.2 * stats_total) if disk == INVERSES_ONLY else disk
    inputs = _inputs(sizes=[1000, 300, 2500, 70], stat_bytes=stat_bytes, num_grads=num_grads, spill_free_bytes=free,
                     promotable=promotable)
    budget = smallest_budget(inputs) + 3 * inputs.block_bytes()
    plan = make_plan(inputs, budget)
    assert len(plan.groups) >= 2 and plan.revisit == ("recompute" if disk is None else "disk")
    assert plan.gradient_spill == (disk == ROWS_AND_INVERSES)
    assert plan.representation == inputs.representation()
    # Groups tile the blocks in order.
    assert plan.groups[0].start == 0 and plan.groups[-1].stop == len(_blocks(inputs))
    assert all(a.stop == b.start for a, b in zip(plan.groups, plan.groups[1:], strict=False))
    assert sum(g.weights for g in plan.groups) == inputs.dim
    assert plan.stats_bytes == sum(g.stats_bytes for g in plan.groups) == stats_total
    # Repeated passes see the same cached samples; one pass that spills its gradients needs no cache.
    assert plan.cache_bytes == (0 if plan.gradient_spill else inputs.num_grads * inputs.input_bytes)
    for i, group in enumerate(plan.groups):
        collect, update = _group_bytes(inputs, group.start, group.stop, plan.chunk_size, plan.cache_bytes,
                                       plan.revisit, plan.gradient_spill, plan.segment_blocks)
        assert collect <= budget and update <= budget
        if i < len(plan.groups) - 1:  # greedy: one more block would not have fitted
            more = _group_bytes(inputs, group.start, group.stop + 1, plan.chunk_size, plan.cache_bytes, plan.revisit,
                                plan.gradient_spill, plan.segment_blocks)
            assert max(more) > budget
    assert plan.peak_bytes <= budget
    revisited = len(plan.groups) - plan.keep_last
    if plan.gradient_spill:
        assert plan.gradient_passes == 1
        # The one pass holds a chunk of every layer's gradients.
        single = 8 * inputs.dim + int(plan.chunk_size * inputs.activation_bytes * 1.5)
        single += (plan.chunk_size * 3 + 8) * inputs.grad_bytes * inputs.dim
        assert plan.phase_bytes["pass"] == math.ceil(single * 1.05)
        rows = inputs.num_grads * len(_blocks(inputs)) * inputs.block_size * inputs.grad_bytes
        assert plan.spill_bytes == rows + stats_total - (plan.groups[-1].stats_bytes if plan.keep_last else 0)
    else:
        assert plan.gradient_passes == len(plan.groups) + (revisited if plan.revisit == "recompute" else 0)
        if plan.revisit == "disk":
            assert plan.spill_bytes == stats_total - (plan.groups[-1].stats_bytes if plan.keep_last else 0)


def test_chunk_choice(monkeypatch) -> None:
    """Chunks of >= 8 first, even if a smaller chunk would keep everything in memory; then the largest chunk."""
    inputs = _inputs(sizes=[1000, 300, 2500, 70], activation_bytes=20_000, max_chunk=64, num_grads=256,
                     spill_free_bytes=10**12)
    assert make_plan(inputs, 10**9).chunk_size == 64  # room for the recipe's chunk: take it
    single = make_plan(inputs, smallest_budget(inputs) * 3)
    assert single.revisit == "none" and len(single.groups) == 1
    # Where only a chunk below 8 would keep everything in memory, the plan streams with chunks of 8
    # instead (one-sample chunks make every pass slow and Gram accumulation memory-bound).
    found = 0
    for budget in range(smallest_budget(inputs), single.budget_bytes, 100_000):
        plan = make_plan(inputs, budget)
        with monkeypatch.context() as patch:
            patch.setattr(planner, "MIN_CHUNK", 1)
            narrow = make_plan(inputs, budget)
        if narrow.revisit == "none" and plan.revisit != "none":
            assert plan.chunk_size >= 8 > narrow.chunk_size and plan.streamed
            found += 1
    assert found
    assert 8 in planner._chunk_candidates(inputs) and min(planner._chunk_candidates(inputs)) == 1


def test_disk_when_there_is_room_else_recompute() -> None:
    sizes = [1000, 300, 2500, 70]
    tight = smallest_budget(_inputs(sizes=sizes))
    assert make_plan(_inputs(sizes=sizes), tight).revisit == "recompute"  # no place to spill
    spilled = make_plan(_inputs(sizes=sizes, spill_free_bytes=10**12), tight)
    assert spilled.revisit == "disk" and spilled.gradient_spill and spilled.gradient_passes == 1
    assert make_plan(_inputs(sizes=sizes, spill_free_bytes=1000), tight).revisit == "recompute"  # disk too small


def test_smallest_budget_is_tight_and_named_in_the_error() -> None:
    inputs = _inputs(sizes=[5000, 4000], spill_free_bytes=10**12)
    need = smallest_budget(inputs)
    assert plan_within(inputs, need) is not None
    assert plan_within(inputs, need - (1 << 20) - 1) is None
    with pytest.raises(WFError) as caught:
        make_plan(inputs, need // 2)
    message = str(caught.value)
    assert "pruning.woodfisher.memory_budget_gb" in message and "\n" not in message
    assert f"{math.ceil(need / 1e7) / 100:.2f} GB" in message


def test_summary_is_one_line_with_the_plan() -> None:
    sizes = [1000, 300, 2500, 70]
    plan = make_plan(_inputs(sizes=sizes, spill_free_bytes=10**12), smallest_budget(_inputs(sizes=sizes)))
    line = plan.summary()
    assert "\n" not in line and f"{len(plan.groups)} groups" in line and f"chunks of {plan.chunk_size}" in line
    assert "Gram blocks" in line and "expected peak" in line and "spilled to disk" in line
    record = plan.to_dict()
    assert record["gradient_passes"] == plan.gradient_passes and record["summary"] == line
    assert len(record["groups"]) == len(plan.groups)


def test_default_budget_is_a_share_of_available_memory(monkeypatch) -> None:
    monkeypatch.setattr(planner, "available_memory_bytes", lambda device="cpu": 12 * 10**9)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert planner.default_budget_bytes() == 6 * 10**9
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "3")
    assert planner.default_budget_bytes() == 2 * 10**9
    monkeypatch.undo()
    with open("/proc/meminfo") as meminfo:
        available = next(int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:"))
    assert abs(planner.available_memory_bytes() - available) < 0.2 * available  # read from MemAvailable


def test_ranks_agree_on_the_smallest_value() -> None:
    values = [7_300_000_000, 5_100_000_000, 9_000_000_000]
    marks: list[torch.Tensor] = []

    def reduce_sum(tensor: torch.Tensor) -> None:  # every rank's marks summed, as dist.all_reduce would
        total = torch.zeros_like(tensor)
        for value in values:
            one = torch.zeros_like(tensor)
            one[max(0, math.floor(math.log2(value) * planner.AGREE_STEPS_PER_DOUBLING))] = 1
            total += one
        marks.append(total)
        tensor.copy_(total)

    agreed = agree_min(values[0], reduce_sum)
    assert 0.98 * min(values) <= agreed <= min(values)


def test_release_free_memory_returns_freed_heap_pages_to_the_os() -> None:
    import ctypes

    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: nothing to trim")
    scratch = torch.empty(1 << 20)  # freeing a 4 MB mmapped block raises glibc's mmap threshold above 4 MB,
    del scratch  # so the pieces below come from the heap, as a gradient pass's activations do
    pieces = [torch.ones(1 << 20) for _ in range(100)]  # 400 MB
    del pieces[:-1]  # the last piece pins the heap's top: free memory below it is not trimmed on free
    before = planner.resident_bytes()
    planner.release_free_memory()
    assert before - planner.resident_bytes() > 200e6
