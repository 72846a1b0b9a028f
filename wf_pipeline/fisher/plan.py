"""Plan a memory-bounded WoodFisher step before any work: representation, passes, chunk size, peak.

Every block of the block-diagonal Fisher is held either as its Gram matrix (``B²`` numbers, inverted
in place) or, when there are fewer gradients than the block size, as the ``N`` gradient rows themselves
(``N·B`` numbers; the inverse follows per block from the low-rank form). Each layer takes the smaller.
When all blocks do not fit the budget at once, consecutive blocks are packed into groups. Where a spill
folder with room is given, one gradient pass writes each group's gradient rows to disk and each group is
then built from its rows read back (``gradient_spill``: a pass costs far more than reading its rows);
otherwise each group gets its own pass over the same Fisher samples (kept in a small cache). Global
ranking needs only the inverse's diagonal, so each group keeps the diagonal and lets its statistics go;
the update phase then revisits the groups, read back from a spill file in the run directory (``disk``)
or computed again from the cached samples (``recompute``). The last group stays in memory through the
ranking when it fits.

Memory model, in bytes the step allocates (the model and the process's own footprint excluded):

==========  ========================================================================================
collect(g)  cache + vectors + stats(g) + float64(g) + chunk(n, g) + slices + segment
rank        cache + vectors + 64·d  (+ stats(last) when the last group is kept)
update(g)   cache + vectors + 32·d + stats(g) + 48·d_g + slices  (+ chunk(n, g) + float64(g) + segment, recomputing)
chunk(n, g) n·m·activations + (3·n + 8)·grad_bytes·(weights of the layers g touches)
==========  ========================================================================================

``stats(g)`` is ``B²·stat_bytes`` per Gram block and ``N·B·grad_bytes`` per low-rank block; ``cache``
holds the ``N·m`` Fisher inputs when there is more than one gradient pass; ``vectors`` are the per-weight
results kept between phases (the inverse's diagonal; WoodTaylor also the Newton step and mean gradient);
``slices`` bounds the batched-solve temporaries (per worker thread, a slice of at most 64 blocks; low-rank
blocks are also formed 256 at a time); ``64·d`` and ``32·d`` cover scoring, ranking and the
full-length vectors of the update (measured ~50 bytes per weight for scores plus ranking); ``activations``
is what one sample's forward saves for the backward, times 1.5 for the backward's own temporaries
(measured 1.0–1.6 on torchvision ResNet-50 and MobileNetV2 at 224 px). Per weight a chunk holds each
sample's gradient up to three times (the per-sample engine's rows, a layer's intermediate, the
block-major copy; measured on ResNet-18), and the first chunk of a pass is checked against plain
autograd on two samples (about eight more gradient copies).

Precision (``promotable``): float32 Gram blocks that float32 cannot hold to ``inverse_rtol`` are moved to
float64 while they are accumulated (``fisher.segmented``), and ``segment`` bounds one open segment's
transients. How many blocks that will be is not known before the gradients are, so the plan takes the
worst case that can occur (the precision check may promote all of them: ResNet-50 with its default random
init promotes ~3/4). Where a gradient pass fills every segment of a group at once, every block may be in
float64: ``float64(g)`` is ``4·B²`` per block beside ``stats(g)`` on the streamed route (a segment drops
the float32 rows of its promoted blocks) and ``8·B²`` on the in-memory one (revisit ``none``: its float32
buffer stays whole, to become the inverse in place). With ``gradient_spill`` each segment is read back,
filled and inverted before the next, so only ``segment`` is needed (``float64(g)`` = 0) and any share of
promoted blocks fits. The plan states its assumption (``precision``).

Every phase gets 5% on top for the allocator (freed memory is not always returned at once).

With ``gradient_spill`` the one pass holds ``vectors + chunk(n, all layers)`` and a group's collect phase
reads its rows back a chunk at a time instead of holding a chunk of gradients (Gram blocks: a segment's
rows at a time).

Choice: chunks of at least 8 gradients before smaller ones (small chunks make every pass slow and Gram
accumulation memory-bound); then one pass with everything kept in memory, else one pass with gradients
spilled, else a pass per group spilled to disk, else recomputed; then the fewest groups, then the largest
chunk (at most the recipe's ``chunk_size``).
"""
from __future__ import annotations

import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.segmented import segment_blocks, segment_workset_bytes

GB = 1e9
DEFAULT_BUDGET_FRACTION = 0.5  # of the memory available when the step starts: room for everyone else
RANK_BYTES_PER_WEIGHT = 64
UPDATE_BYTES_PER_WEIGHT = 32
GROUP_UPDATE_BYTES_PER_WEIGHT = 48
VECTOR_BYTES = 8
ACTIVATION_FACTOR = 1.5
SLICE_BLOCKS = 64  # blocks per batched Cholesky/solve call (fisher.inverse, pruning.obs)
SLICE_COPIES = 4  # matrices per block alive in one slice call (input, factor, result, system)
LOWRANK_SLICE_BLOCKS = 256  # low-rank blocks formed at once from stored gradient rows
ALLOCATOR_SLACK = 0.05  # on top of every phase: fragmentation and allocator caches (measured 3–4% on ResNet-18)
GRADIENT_COPIES = 3  # per sample and weight in a chunk: engine rows, a layer's intermediate, block-major copy
CHECK_COPIES = 8  # per weight: a pass's first chunk is checked on two samples, ~4 copies each (fisher.gradients)
MIN_CHUNK = 8  # smaller chunks make Gram accumulation memory-bound; used only when nothing else fits
SPILL_MARGIN = 1.1  # free disk wanted per spilled byte


@dataclass(frozen=True)
class PlanInputs:
    """What the plan depends on: sizes, counts, bytes per number and per sample."""

    sizes: Sequence[int]  # selected weights per layer, in order
    num_grads: int  # N, over all processes
    block_size: int
    stat_bytes: int  # bytes per Gram number (after any precision promotion)
    grad_bytes: int = 4  # bytes per gradient number
    grad_batch_size: int = 1  # samples averaged into one gradient (m)
    activation_bytes: int = 0  # saved for the backward by one sample's forward (a probe measures it)
    input_bytes: int = 0  # one input sample, for the cache of Fisher samples
    max_chunk: int = 100  # gradients per chunk at most (the recipe's chunk_size)
    vectors: int = 1  # per-weight vectors kept between phases
    allow_lowrank: bool = True  # multi-process runs sum Grams and cannot gather gradient rows
    spill_free_bytes: int | None = None  # free disk where groups may be spilled (None: no spill place)
    threads: int = 1  # concurrent slice workers
    promotable: bool = False  # Gram blocks below float64 that the accuracy check may move to float64 (see doc)
    segment_blocks: int = 0  # blocks per accumulator segment (fisher.segmented); 0: sized from the budget

    def __post_init__(self) -> None:
        if not self.sizes or any(n < 1 for n in self.sizes):
            raise ValueError(f"layer sizes must be positive, got {list(self.sizes)}")
        for name in ("num_grads", "block_size", "stat_bytes", "grad_bytes", "grad_batch_size", "max_chunk", "threads"):
            if getattr(self, name) < 1:
                raise ValueError(f"PlanInputs.{name} must be >= 1, got {getattr(self, name)}")

    @property
    def dim(self) -> int:
        return sum(self.sizes)

    @property
    def blocks_per_layer(self) -> list[int]:
        return [math.ceil(n / self.block_size) for n in self.sizes]

    def representation(self) -> str:
        """``gram`` or ``lowrank`` for a block (the same for every layer: both scale with its blocks)."""
        gram = self.block_size * self.stat_bytes
        rows = self.num_grads * self.grad_bytes
        return "lowrank" if self.allow_lowrank and rows < gram else "gram"

    def block_bytes(self) -> int:
        B = self.block_size
        return B * B * self.stat_bytes if self.representation() == "gram" else self.num_grads * B * self.grad_bytes

    def slice_bytes(self) -> int:
        """Batched-solve temporaries: a slice of blocks per worker; low-rank blocks are formed a slice at a time too."""
        B, N = self.block_size, self.num_grads
        blocks = sum(self.blocks_per_layer)
        per_worker = min(SLICE_BLOCKS, blocks) * VECTOR_BYTES * self.threads
        if self.representation() == "gram":
            return per_worker * SLICE_COPIES * B * B
        formed = min(LOWRANK_SLICE_BLOCKS, blocks) * B * B * VECTOR_BYTES
        return formed + per_worker * (SLICE_COPIES * B * B + 2 * N * B + 2 * N * N)

    def chunk_bytes_per_weight(self, n: int) -> int:
        """Per weight of the layers a pass touches: the chunk's gradient copies, a promoted copy, the first check."""
        promoted = self.stat_bytes if self.representation() == "gram" and self.stat_bytes != self.grad_bytes else 0
        return n * (GRADIENT_COPIES * self.grad_bytes + promoted) + CHECK_COPIES * self.grad_bytes

    def activation_chunk_bytes(self, n: int) -> int:
        return int(n * self.grad_batch_size * self.activation_bytes * ACTIVATION_FACTOR)

    def read_bytes_per_block(self, n: int) -> int:
        """One block's share of a chunk of gradient rows read back from disk (and its promoted copy)."""
        promoted = self.stat_bytes if self.representation() == "gram" and self.stat_bytes != self.grad_bytes else 0
        return n * self.block_size * (self.grad_bytes + promoted)

    def promotes(self) -> bool:
        return self.promotable and self.representation() == "gram"

    def float64_bytes_per_block(self, gradient_spill: bool, in_memory: bool = False) -> int:
        """Room for a block in float64 beside its float32 share while a gradient pass fills its whole group
        (``float64(g)``): the in-memory route keeps the float32 buffer whole (its inverse, in place), the
        streamed one drops promoted rows (fisher.segmented)."""
        if not self.promotes() or gradient_spill:
            return 0
        return (8 if in_memory else 4) * self.block_size**2

    def segment_bytes(self, n: int, gradient_spill: bool) -> int:
        """One open segment's transients (``segment``), and with `gradient_spill` its rows read back (Gram blocks)."""
        if self.representation() != "gram":
            return 0
        blocks = min(self.segment_blocks or segment_blocks(self.block_size), sum(self.blocks_per_layer))
        workset = segment_workset_bytes(self.block_size, blocks, n, self.grad_bytes) if self.promotable else 0
        return workset + (blocks * self.read_bytes_per_block(n) if gradient_spill else 0)

    def precision(self, gradient_spill: bool, in_memory: bool = False) -> str:
        """The plan's assumption on the blocks' precision, for the log line and the history."""
        if self.representation() != "gram":
            return "low-rank blocks formed in float64 a slice at a time"
        name = "float64" if self.stat_bytes == 8 else "float32" if self.stat_bytes == 4 else f"{self.stat_bytes}-byte"
        if not self.promotable:
            return name
        if gradient_spill:
            return f"{name}; blocks that need float64 are built one segment at a time, any share fits"
        also = " also" if in_memory else ""  # (beside the float32 buffer that becomes the inverse in place)
        return f"{name}; counted with every block{also} in float64 while accumulating, any share fits"

    def chunk_bytes(self, n: int, layer_weights: int) -> int:
        return self.activation_chunk_bytes(n) + self.chunk_bytes_per_weight(n) * layer_weights


@dataclass(frozen=True)
class BlockGroup:
    """Consecutive blocks ``[start, stop)`` handled in one pass; ``layers`` are the layers they touch."""

    start: int
    stop: int
    layers: tuple[int, ...]
    stats_bytes: int
    weights: int  # real (unpadded) weights in the group


@dataclass
class FisherPlan:
    """The plan of one WoodFisher step (see the module doc for the memory model)."""

    budget_bytes: int
    representation: str  # gram | lowrank
    chunk_size: int
    groups: list[BlockGroup]
    revisit: str  # none | disk | recompute
    keep_last: bool
    gradient_spill: bool  # one gradient pass; each group's gradient rows go to disk and are read back
    cache_bytes: int
    stats_bytes: int  # all groups together
    spill_bytes: int  # group inverses written for the update (and gradient rows, with gradient_spill)
    phase_bytes: dict[str, int]  # peak of each phase
    num_grads: int
    block_size: int
    num_layers: int
    dim: int
    precision: str = ""  # what the plan assumes of the blocks' precision (float64 promotion, see the module doc)
    segment_blocks: int = 0  # blocks per accumulator segment (fisher.segmented.SegmentedGramAccumulator)
    baseline_bytes: int = 0  # resident before the step (model, libraries); not part of the budget
    spill_root: str | None = None  # where a 'disk' plan writes its spill folder
    notes: list[str] = field(default_factory=list)

    @property
    def peak_bytes(self) -> int:
        return max(self.phase_bytes.values())

    @property
    def gradient_passes(self) -> int:
        """Passes over the Fisher samples: one per group (one in all with gradient_spill), again per recomputed one."""
        if self.gradient_spill:
            return 1
        revisited = len(self.groups) - (1 if self.keep_last else 0)
        return len(self.groups) + (revisited if self.revisit == "recompute" else 0)

    @property
    def streamed(self) -> bool:
        """Anything but one pass with all statistics in memory (the in-memory route)."""
        return len(self.groups) > 1 or not self.keep_last or self.gradient_spill

    def summary(self) -> str:
        """One line for the log: representation, passes, chunk, revisit and the expected peak."""
        kind = "Gram blocks d·B" if self.representation == "gram" else "stored gradients N·d (low-rank)"
        groups = len(self.groups)
        largest = max(g.stats_bytes for g in self.groups)
        kept = len(self.groups) == 1 and self.keep_last
        revisit = {"disk": "revisited from disk", "recompute": "recomputed for the update"}.get(self.revisit, "")
        revisit = "kept in memory" if kept or not revisit else revisit
        if self.gradient_spill:
            revisit = f"built from gradient rows spilled to disk, {revisit}"
        if self.spill_bytes:
            revisit += f" ({_gb(self.spill_bytes)} written)"
        base = f" + {_gb(self.baseline_bytes)} resident" if self.baseline_bytes else ""
        precision = f" ({self.precision})" if self.precision else ""
        return (
            f"Fisher plan: {self.dim:,} weights in {self.num_layers} layers, {kind}{precision}, "
            f"{_gb(self.stats_bytes)} of statistics "
            f"in {groups} group{'s' if groups > 1 else ''} (largest {_gb(largest)}), {self.gradient_passes} gradient "
            f"pass{'es' if self.gradient_passes > 1 else ''} of N={self.num_grads} in chunks of {self.chunk_size}, "
            f"groups {revisit}; expected peak {_gb(self.peak_bytes)} of a {_gb(self.budget_bytes)} budget{base}"
        )

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["groups"] = [{"start": g.start, "stop": g.stop, "layers": len(g.layers), "stats_bytes": g.stats_bytes}
                         for g in self.groups]
        out.update(peak_bytes=self.peak_bytes, gradient_passes=self.gradient_passes, summary=self.summary())
        return out


def _gb(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1e6:.1f} MB"


# ===================================================================== packing
def _pack(inputs: PlanInputs, budget: int, n: int, revisit: str, cache: int,
          gradient_spill: bool = False) -> list[BlockGroup] | None:
    """Greedy: as many consecutive blocks per group as fit both collect(g) and update(g); None if a block never fits.

    With `gradient_spill` a group is built from its rows read back a chunk at a time (``n·B`` numbers per
    block), not from a gradient pass, so its collect phase holds no activations.
    """
    B = inputs.block_size
    per_block = inputs.block_bytes()
    vectors = inputs.vectors * VECTOR_BYTES * inputs.dim
    fixed_collect = cache + vectors + inputs.slice_bytes() + inputs.segment_bytes(n, gradient_spill) + (
        0 if gradient_spill else inputs.activation_chunk_bytes(n))
    fixed_update = cache + vectors + UPDATE_BYTES_PER_WEIGHT * inputs.dim + inputs.slice_bytes()
    grad_per_weight = 0 if gradient_spill else inputs.chunk_bytes_per_weight(n)
    # Gram blocks read back a segment at a time (in segment_bytes); low-rank rows a whole group's chunk at a time
    reads = gradient_spill and inputs.representation() != "gram"
    per_block_collect = per_block + inputs.float64_bytes_per_block(gradient_spill, revisit == "none") + (
        inputs.read_bytes_per_block(n) if reads else 0)
    groups: list[BlockGroup] = []
    start = block = 0
    stats = weights = layer_weights = reading = 0
    layers: list[int] = []

    def close() -> None:
        nonlocal start, stats, weights, layer_weights, layers, reading
        groups.append(BlockGroup(start, block, tuple(layers), stats, weights))
        start, stats, weights, layer_weights, layers, reading = block, 0, 0, 0, [], 0

    for layer, (size, count) in enumerate(zip(inputs.sizes, inputs.blocks_per_layer, strict=True)):
        left = count
        while left:
            touched = layer_weights + (0 if layer in layers else size)
            room_collect = budget - fixed_collect - stats - reading - grad_per_weight * touched
            room_update = budget - fixed_update - stats - GROUP_UPDATE_BYTES_PER_WEIGHT * weights
            per_update = per_block + GROUP_UPDATE_BYTES_PER_WEIGHT * B
            if revisit == "recompute":  # the group is built again by a pass, float64 blocks included
                rebuild = inputs.activation_chunk_bytes(n) + grad_per_weight * touched + inputs.segment_bytes(n, False)
                room_update -= rebuild + inputs.float64_bytes_per_block(False) * (block - start)
                per_update += inputs.float64_bytes_per_block(False)
            fit = min(room_collect // per_block_collect, room_update // per_update, left)
            if fit <= 0:
                if not layers:
                    return None  # not even one block of this layer fits on its own
                close()
                continue
            if layer not in layers:
                layers.append(layer)
                layer_weights += size
            done = count - left  # blocks of this layer already placed
            weights += min(size, (done + fit) * B) - done * B
            stats += fit * per_block
            reading += fit * (per_block_collect - per_block)
            block += fit
            left -= fit
    if layers:
        close()
    return groups


def _chunk_candidates(inputs: PlanInputs) -> list[int]:
    top = min(inputs.max_chunk, inputs.num_grads)
    sizes = {top, min(MIN_CHUNK, top)}
    n = top
    while n > 1:
        n //= 2
        sizes.add(max(n, 1))
    return sorted(sizes, reverse=True)


def _phase_bytes(
    inputs: PlanInputs, groups: list[BlockGroup], n: int, revisit: str, keep_last: bool, cache: int,
    gradient_spill: bool = False,
) -> dict[str, int]:
    vectors = inputs.vectors * VECTOR_BYTES * inputs.dim
    slices = inputs.slice_bytes()

    def chunk(g: BlockGroup) -> int:
        if gradient_spill:  # the group's rows read back a chunk at a time (Gram blocks: in segment_bytes)
            return 0 if inputs.representation() == "gram" else (g.stop - g.start) * inputs.read_bytes_per_block(n)
        return inputs.chunk_bytes(n, sum(inputs.sizes[i] for i in g.layers))

    def float64(g: BlockGroup) -> int:
        return (g.stop - g.start) * inputs.float64_bytes_per_block(gradient_spill, revisit == "none")

    phases = {}
    if gradient_spill:  # the one gradient pass, over every layer, writing rows to disk
        phases["pass"] = vectors + inputs.chunk_bytes(n, inputs.dim)
    segment = inputs.segment_bytes(n, gradient_spill)
    collect = max(cache + vectors + g.stats_bytes + float64(g) + chunk(g) + slices + segment for g in groups)
    rank = cache + vectors + RANK_BYTES_PER_WEIGHT * inputs.dim + (groups[-1].stats_bytes if keep_last else 0)
    def rebuilt(g: BlockGroup) -> int:  # a group recomputed for the update: its pass and float64 blocks again
        if revisit != "recompute" or (keep_last and g is groups[-1]):
            return 0
        return chunk(g) + float64(g) + inputs.segment_bytes(n, False)

    update = max(
        cache + vectors + UPDATE_BYTES_PER_WEIGHT * inputs.dim + g.stats_bytes
        + GROUP_UPDATE_BYTES_PER_WEIGHT * g.weights + slices + rebuilt(g)
        for g in groups
    )
    return phases | {"collect": collect, "rank": rank, "update": update}


def _try(inputs: PlanInputs, budget: int, revisit: str, gradient_spill: bool, wide: bool) -> FisherPlan | None:
    """The plan for one mode with chunks of at least MIN_CHUNK (`wide`) or smaller: fewest groups, largest chunk."""
    best: tuple[int, int, list[BlockGroup], int] | None = None  # (groups, -n, groups, cache)
    candidates = _chunk_candidates(inputs)
    floor = min(MIN_CHUNK, candidates[0])
    for n in candidates:
        if (n >= floor) != wide:
            continue
        usable = int(budget / (1 + ALLOCATOR_SLACK))
        single_pass = inputs.vectors * VECTOR_BYTES * inputs.dim + inputs.chunk_bytes(n, inputs.dim)
        if gradient_spill and single_pass > usable:
            continue  # the single pass over all layers must fit too
        for cache_on in (False, True):
            cache = inputs.num_grads * inputs.grad_batch_size * inputs.input_bytes if cache_on else 0
            groups = _pack(inputs, usable, n, revisit, cache, gradient_spill)
            if groups is None:
                continue
            needs_cache = not gradient_spill and (len(groups) > 1 or revisit == "recompute")
            if needs_cache != cache_on:
                continue
            if revisit == "none" and len(groups) > 1:
                continue
            key = (len(groups), -n)
            if best is None or key < (best[0], best[1]):
                best = (len(groups), -n, groups, cache)
    if best is None:
        return None
    _, neg_n, groups, cache = best
    n = -neg_n
    stats_total = sum(g.stats_bytes for g in groups)
    for keep_last in (True, False):
        if revisit == "none" and not keep_last:
            return None
        phases = {phase: math.ceil(need * (1 + ALLOCATOR_SLACK))
                  for phase, need in _phase_bytes(inputs, groups, n, revisit, keep_last, cache, gradient_spill).items()}
        if max(phases.values()) > budget:
            continue
        spill = stats_total - (groups[-1].stats_bytes if keep_last else 0) if revisit == "disk" else 0
        if gradient_spill:  # (one group too: the pass and the statistics are then never in memory together)
            spill += inputs.num_grads * sum(inputs.blocks_per_layer) * inputs.block_size * inputs.grad_bytes
        if revisit == "disk" and (inputs.spill_free_bytes is None or spill * SPILL_MARGIN > inputs.spill_free_bytes):
            return None
        if revisit != "none" and keep_last and len(groups) == 1 and not gradient_spill:
            continue  # everything kept: that is the 'none' plan
        return FisherPlan(
            budget_bytes=budget, representation=inputs.representation(), chunk_size=n, groups=groups,
            revisit=revisit, keep_last=keep_last, gradient_spill=gradient_spill, cache_bytes=cache,
            stats_bytes=stats_total, spill_bytes=spill,
            phase_bytes=phases, num_grads=inputs.num_grads, block_size=inputs.block_size,
            num_layers=len(inputs.sizes), dim=inputs.dim, precision=inputs.precision(gradient_spill, revisit == "none"),
            segment_blocks=inputs.segment_blocks,
        )
    return None


MODES = (("none", False), ("disk", True), ("disk", False), ("recompute", False))  # (revisit, gradient_spill)


def plan_within(inputs: PlanInputs, budget_bytes: int) -> FisherPlan | None:
    """The plan that fits `budget_bytes`. Chunks of at least MIN_CHUNK gradients come first (smaller ones make
    every pass slow); then, in order: everything in memory in one pass; one pass with gradient rows spilled to
    disk; a pass per group with inverses spilled; a pass per group, recomputed for the update."""
    if not inputs.segment_blocks:
        inputs = replace(inputs, segment_blocks=segment_blocks(inputs.block_size, int(budget_bytes)))
    for wide in (True, False):
        for revisit, gradient_spill in MODES:
            plan = _try(inputs, int(budget_bytes), revisit, gradient_spill, wide)
            if plan is not None:
                return plan
    return None


def smallest_budget(inputs: PlanInputs) -> int:
    """The smallest budget (bytes, to 1 MB) for which some plan exists."""
    hi = 1 << 26
    while plan_within(inputs, hi) is None:
        hi *= 2
        if hi > 1 << 50:  # pragma: no cover - a petabyte: the inputs are absurd
            raise WFError("no memory plan exists for this WoodFisher step", "select fewer layers or lower num_grads")
    lo = 0
    while hi - lo > 1 << 20:
        mid = (lo + hi) // 2
        if plan_within(inputs, mid) is None:
            lo = mid
        else:
            hi = mid
    return hi


def make_plan(
    inputs: PlanInputs, budget_bytes: int, *, field_name: str = "pruning.woodfisher.memory_budget_gb"
) -> FisherPlan:
    """The plan for `budget_bytes`, or a one-line WFError naming the smallest budget that would work."""
    plan = plan_within(inputs, budget_bytes)
    if plan is not None:
        return plan
    need = smallest_budget(inputs)
    spill = "" if inputs.spill_free_bytes is None else f" (with {_gb(inputs.spill_free_bytes)} of free disk for spills)"
    raise WFError(
        f"{field_name}: a budget of {_gb(budget_bytes)} cannot hold this WoodFisher step "
        f"({inputs.dim:,} weights, N={inputs.num_grads}, block size {inputs.block_size}){spill}; "
        f"the smallest budget that works is {math.ceil(need / 1e7) / 100:.2f} GB",
        hint=f"set {field_name}: {math.ceil(need / 1e7) / 100:.2f} or more, or lower num_grads / grad_batch_size, "
        "or prune fewer layers",
    )


# ===================================================================== budget
def available_memory_bytes(device: str = "cpu") -> int:
    """Memory free for new allocations: MemAvailable (Linux) or the GPU's free memory."""
    if device.startswith("cuda"):
        import torch

        free, _ = torch.cuda.mem_get_info(None if device == "cuda" else device)
        return int(free)
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    pages = os.sysconf("SC_AVPHYS_PAGES") if hasattr(os, "sysconf") else 0
    return int(pages * os.sysconf("SC_PAGE_SIZE")) if pages else 8 * 1024**3


def default_budget_bytes(device: str = "cpu") -> int:
    """A safe share of what is free now: half of it, split between the processes of this machine."""
    local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return int(available_memory_bytes(device) * DEFAULT_BUDGET_FRACTION / local)


def resident_bytes() -> int:
    """This process's resident memory now (VmRSS), 0 where unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


_LIBC: Any = None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; nothing elsewhere).

    A gradient pass at 224 px frees hundreds of MB of activations that glibc keeps in its heaps
    (below its mmap threshold), still counted as resident. Without this the next phase, whose
    statistics are allocated afresh, peaks that much above the plan (measured +0.7 GB on MobileNetV2).
    """
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            libc = ctypes.CDLL(None)
            _LIBC = libc if hasattr(libc, "malloc_trim") else False
        except OSError:  # pragma: no cover - no C library to load
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


def free_disk_bytes(folder: Path | str) -> int:
    return int(shutil.disk_usage(folder).free)


AGREE_STEPS_PER_DOUBLING = 64  # agreed values are rounded down to within ~1.1%


def agree_min(value: int, reduce_fn: Callable[[Any], None], device: Any = "cpu") -> int:
    """The smallest `value` over all processes (rounded down ~1%) with only a summing all-reduce.

    Each rank marks the bucket of its value on a log scale; the lowest marked bucket after the sum is
    the minimum. Used so every rank derives the same plan from budgets and free disk measured apart.
    """
    import torch

    buckets = 64 * AGREE_STEPS_PER_DOUBLING  # up to 2**64 bytes
    index = max(0, min(buckets - 1, math.floor(math.log2(max(value, 1)) * AGREE_STEPS_PER_DOUBLING)))
    marks = torch.zeros(buckets, dtype=torch.float64, device=device)
    marks[index] = 1.0
    reduce_fn(marks)
    lowest = int(marks.nonzero()[0].item())
    return int(2 ** (lowest / AGREE_STEPS_PER_DOUBLING))
