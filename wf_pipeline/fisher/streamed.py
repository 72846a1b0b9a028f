"""Carry out a :class:`~wf_pipeline.fisher.plan.FisherPlan`: block groups streamed through a memory budget.

Phase 1 (:func:`collect_grouped_inverse`) makes one gradient pass per group over the same Fisher
samples, builds that group's statistics (Gram blocks inverted in place, or the stored gradient rows of
the low-rank form), keeps the inverse's diagonal — and for WoodTaylor the mean gradient and Newton step
— for every weight, then spills the group to disk, drops it (to recompute later) or, for the last
group, keeps it. Ranking then needs only those vectors. Phase 2 (:meth:`GroupedInverse.inverse_slices`)
revisits the groups one at a time for the OBS update (``pruning.obs.obs_update_grouped``), which is
block-local, so it equals the update with the whole inverse in memory.

Gram groups are accumulated in segments (:mod:`wf_pipeline.fisher.segmented`), so blocks that need float64
stay within the plan: a group built from spilled gradient rows is read, accumulated and inverted one
segment at a time (one segment's float64 blocks in memory, whatever their share); a group filled by a
gradient pass holds a float64 copy of each promoted block until the inverse, which the plan counts.
"""
from __future__ import annotations

import itertools
import os
import shutil
import tempfile
import time
import weakref
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from wf_pipeline.fisher.conditioning import DEFAULT_RTOL, InverseHealth, unit_roundoff
from wf_pipeline.fisher.gradients import (
    GradientStats,
    SampleStream,
    iter_gradient_chunks,
    sample_model_labels,
    unwrap_model,
)
from wf_pipeline.fisher.inverse import BlockFisherInverse, low_rank_block_inverses
from wf_pipeline.fisher.layout import BlockLayout
from wf_pipeline.fisher.plan import (
    LOWRANK_SLICE_BLOCKS,
    BlockGroup,
    FisherPlan,
    PlanInputs,
    agree_min,
    free_disk_bytes,
    make_plan,
    release_free_memory,
    resident_bytes,
)
from wf_pipeline.fisher.segmented import SegmentedGramAccumulator, sub_layout

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]
LossFn = Callable[[Tensor, Tensor], Tensor]


# ===================================================================== block ranges
def low_rank_blocks(rows: Tensor, damp: float, num_samples: int, rtol: float = DEFAULT_RTOL,
                    lengths: list[int] | None = None) -> Tensor:
    """``(1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` per block from block-major rows ``A: (k, n, B)``, in fp64.

    The Fisher is ``λI + AᵀA/N`` with ``N = num_samples``; checked and repaired like every inverse route
    (:func:`~wf_pipeline.fisher.inverse.low_rank_block_inverses`, which also returns the health).
    """
    k, _, B = rows.shape
    return low_rank_block_inverses(rows, lengths or [B] * k, damp, num_samples, torch.float64, rtol)[0]


# ===================================================================== group statistics
@dataclass
class FisherJob:
    """Everything a gradient pass needs, independent of how the statistics are stored."""

    model: nn.Module
    params: dict[str, nn.Parameter]
    masks: Mapping[str, Tensor] | None
    batches: Batches
    num_grads: int  # this process's gradients
    block_size: int
    damp: float
    stat_dtype: torch.dtype  # Gram precision (after promotion)
    rtol: float = DEFAULT_RTOL  # accuracy each inverse block is held to (blocks beyond it go to float64)
    grad_batch_size: int = 1
    fisher_type: str = "empirical"
    loss_fn: LossFn = F.cross_entropy
    generator: torch.Generator | None = None
    progress: Progress | None = None
    reduce_fn: ReduceFn | None = None
    nonfinite: str = "error"  # see iter_gradient_chunks; 'skip' drops, per group, rows non-finite in its layers
    timings: dict[str, float] = field(default_factory=dict)
    engine: str = ""  # the per-sample gradient engine the passes used
    skipped: int = 0  # non-finite gradient rows left out, over all passes

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


class _GroupStats:
    """One group's inverse: inverted Gram blocks (one tensor, or one per accumulator segment), or gradient rows
    formed into blocks on demand."""

    def __init__(self, layout: BlockLayout, damp: float, num_samples: int, blocks: Tensor | None = None,
                 rows: Tensor | None = None, rtol: float = DEFAULT_RTOL,
                 parts: list[tuple[int, int, Tensor]] | None = None) -> None:
        self.layout, self.damp, self.num_samples, self.rtol = layout, damp, num_samples, rtol
        self.blocks, self.rows, self.parts = blocks, rows, parts  # parts: (start, stop, blocks) per segment
        self.repaired_blocks = 0
        self.health: InverseHealth | None = None  # Gram blocks: how they were inverted (the whole group)

    @property
    def payload(self) -> Tensor:
        """The group's statistics (with parts: the first part)."""
        if self.parts is not None:
            return self.parts[0][2]
        return self.blocks if self.blocks is not None else self.rows  # type: ignore[return-value]

    def spill(self, path: Path) -> tuple[torch.Size, torch.dtype]:
        """Write the statistics to `path` (parts one after another: the group's blocks in order); their shape."""
        if self.parts is None:
            _write_tensor(self.payload, path)
            return self.payload.shape, self.payload.dtype
        for i, (_, _, part) in enumerate(self.parts):
            _write_tensor(part, path, append=i > 0)
        first = self.parts[0][2]
        return torch.Size((self.layout.num_blocks, *first.shape[1:])), first.dtype

    def slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]:
        """``(f0, f1, inverse)`` over consecutive block slices (the whole group or its parts for Gram blocks)."""
        if self.blocks is not None:
            yield 0, self.layout.dim, BlockFisherInverse(self.layout, self.blocks, self.damp, self.num_samples,
                                                         health=self.health)
            return
        if self.parts is not None:
            for s, e, part in self.parts:
                layout, f0, f1 = sub_layout(self.layout, s, e)
                yield f0, f1, BlockFisherInverse(layout, part, self.damp, self.num_samples)
            return
        assert self.rows is not None
        for s in range(0, self.layout.num_blocks, LOWRANK_SLICE_BLOCKS):
            e = min(s + LOWRANK_SLICE_BLOCKS, self.layout.num_blocks)
            layout, f0, f1 = sub_layout(self.layout, s, e)
            lengths = [layout.block_length(i) for i in range(layout.num_blocks)]
            blocks, health = low_rank_block_inverses(self.rows[s:e], lengths, self.damp, self.num_samples,
                                                     torch.float64, self.rtol, layout=layout)
            yield f0, f1, BlockFisherInverse(layout, blocks, self.damp, self.num_samples, health=health)


class GroupedInverse:
    """The diagonal of a block-diagonal inverse Fisher for every weight, with its groups revisitable."""

    def __init__(self, plan: FisherPlan, layout: BlockLayout, job: FisherJob, source: _GroupSource,
                 spill_dir: Path | None, with_grad_mean: bool) -> None:
        self.plan, self.layout, self.job, self.source = plan, layout, job, source
        self.spill_dir = spill_dir
        self.dtype = torch.float64 if plan.representation == "lowrank" else job.stat_dtype
        device = next(iter(job.params.values())).device
        self.diag = torch.empty(layout.dim, dtype=self.dtype, device=device)  # [F⁻¹]_qq, filled group by group
        self.grad_mean: Tensor | None = None  # WoodTaylor only
        self.newton: Tensor | None = None  # F⁻¹ḡ, WoodTaylor only
        if with_grad_mean:
            self.grad_mean = torch.empty(layout.dim, dtype=self.dtype, device=device)
            self.newton = torch.empty(layout.dim, dtype=self.dtype, device=device)
        self.num_samples = 0
        self.repaired_blocks = 0
        self.health: InverseHealth | None = None  # every group's inverse, merged (promotions, repairs)
        self._kept: _GroupStats | None = None
        self._spilled: dict[int, tuple[Path, torch.Size, torch.dtype, BlockLayout]] = {}
        # Spill files go even if the step fails between collection and update.
        self._cleanup = weakref.finalize(self, shutil.rmtree, str(spill_dir), True) if spill_dir is not None else None

    def keep_vectors(self, stats: _GroupStats, g0: int, mean: Tensor | None) -> None:
        """Keep a group's per-weight vectors (the inverse's diagonal; WoodTaylor's mean and Newton step)."""
        if stats.health is not None:  # Gram blocks: the whole group's (its slices carry none of their own)
            self.health = stats.health if self.health is None else self.health.merge(stats.health)
        for f0, f1, inverse in stats.slices():
            if stats.health is None:  # low-rank slices, each checked on its own
                self.health = inverse.health if self.health is None else self.health.merge(inverse.health)
            self.diag[g0 + f0 : g0 + f1] = inverse.diag()
            if mean is not None and self.grad_mean is not None and self.newton is not None:
                part = mean[f0:f1].to(self.dtype)
                self.grad_mean[g0 + f0 : g0 + f1] = part
                self.newton[g0 + f0 : g0 + f1] = inverse.matvec(part)

    # ----------------------------------------------------------------- phase 2: update
    def _revisit(self, index: int, group: BlockGroup) -> _GroupStats:
        if self._kept is not None and index == len(self.plan.groups) - 1:
            return self._kept
        if index in self._spilled:
            t0 = time.perf_counter()
            path, shape, dtype, layout = self._spilled[index]
            payload = _read_tensor(path, shape, dtype, self.layout_device)
            self.job.add_time("spill", time.perf_counter() - t0)
            if self.plan.representation == "gram":
                return _GroupStats(layout, self.job.damp, self.num_samples, blocks=payload, rtol=self.job.rtol)
            return _GroupStats(layout, self.job.damp, self.num_samples, rows=payload, rtol=self.job.rtol)
        stats, _ = self.source.group_stats(group, with_mean=False)
        return stats

    @property
    def layout_device(self) -> torch.device:
        return next(iter(self.job.params.values())).device

    def inverse_slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]:
        """``(lo, hi, inverse)`` for consecutive weight ranges covering every weight, one group in memory at a time.

        The OBS update is block-local, so applying it slice by slice (``pruning.obs.obs_update_grouped``)
        equals the update with the whole inverse in memory. The time between a group's first slice and
        the end of its last (the caller's update included) counts as "update". The caller must drop each
        inverse before asking for the next (``del`` its loop variable): the next slice may be the next
        group, read while the last one's blocks would otherwise still be held (twice the planned memory)."""
        order = list(enumerate(self.plan.groups))
        if self._kept is not None:
            order = order[-1:] + order[:-1]  # the kept group first, so it can be let go at once
        for index, group in order:
            stats = self._revisit(index, group)
            t0 = time.perf_counter()
            _, g0, _ = sub_layout(self.layout, group.start, group.stop)
            for f0, f1, inverse in stats.slices():
                yield g0 + f0, g0 + f1, inverse
                del inverse  # it holds the group's blocks: none may outlive the group (see the docstring)
            del stats
            if index == len(self.plan.groups) - 1:
                self._kept = None
            release_free_memory()
            self.job.add_time("update", time.perf_counter() - t0)

    def close(self) -> None:
        """Remove spill files (idempotent)."""
        self._kept = None
        self._spilled.clear()
        if self._cleanup is not None:
            self._cleanup()
            self.spill_dir = None

    def __enter__(self) -> GroupedInverse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


SPILL_PREFIX = "fisher-spill-"


def remove_stale_spills(root: Path) -> None:
    """Remove spill folders left by processes that are gone (a killed run; they can be many GB)."""
    for folder in root.glob(f"{SPILL_PREFIX}*"):
        pid = folder.name[len(SPILL_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _write_tensor(tensor: Tensor, path: Path, append: bool = False) -> None:
    with open(path, "ab" if append else "wb") as out:
        tensor.detach().cpu().contiguous().numpy().tofile(out)


def _read_tensor(path: Path, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> Tensor:
    buffer = torch.empty(shape, dtype=dtype)
    with open(path, "rb") as source:
        source.readinto(buffer.numpy().data.cast("B"))
    return buffer.to(device)


# ===================================================================== planning
def probe_activation_bytes(model: nn.Module, params: Mapping[str, nn.Parameter], sample: Tensor) -> int:
    """Bytes one sample's forward saves for the backward to `params` (unique storages, weights excluded)."""
    module = unwrap_model(model)
    selected = {id(p) for p in params.values()}
    # Only the selected weights are tracked, as in the gradient passes (the rest are constants there).
    leaves = {n: p.detach().requires_grad_(id(p) in selected) for n, p in module.named_parameters()}
    resident = {t.untyped_storage().data_ptr() for t in itertools.chain(module.parameters(), module.buffers())}
    saved: dict[int, int] = {}

    def pack(tensor: Tensor) -> Tensor:
        # Views are counted by their own size (several may share one storage): per-sample bytes, not the batch's.
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in resident:
            saved[ptr] = max(saved.get(ptr, 0), tensor.numel() * tensor.element_size())
        return tensor

    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        functional_call(module, leaves, (sample,), strict=False)
    return sum(saved.values())


def measure_plan_inputs(
    job: FisherJob,
    *,
    max_chunk: int,
    vectors: int = 1,
    spill_root: Path | None = None,
    allow_lowrank: bool = True,
) -> PlanInputs:
    """What the plan needs, measured: one probe forward for the activations, the free disk for spills.

    Replaces ``job.batches`` with a replaying wrapper, so the probe does not change which samples the
    passes see. In a multi-process run (``job.reduce_fn``) every rank must call this: ranks agree on the
    smallest free disk, and Gram blocks are used (gradient rows cannot be summed across ranks).
    """
    peeked = _PeekedBatches(job.batches)
    job.batches = peeked
    first = next(iter(job.params.values()))
    sample = peeked.head[0][:1].to(first.device).clone()
    free_disk = None
    if spill_root is not None:
        spill_root.mkdir(parents=True, exist_ok=True)
        free_disk = free_disk_bytes(spill_root)
        if job.reduce_fn is not None:
            free_disk = agree_min(free_disk, job.reduce_fn, first.device)
    return PlanInputs(
        sizes=[p.numel() for p in job.params.values()],
        num_grads=job.num_grads,
        block_size=job.block_size,
        stat_bytes=torch.empty((), dtype=job.stat_dtype).element_size(),
        grad_bytes=first.element_size(),
        grad_batch_size=job.grad_batch_size,
        activation_bytes=probe_activation_bytes(job.model, job.params, sample),
        input_bytes=sample.numel() * sample.element_size(),
        max_chunk=max_chunk,
        vectors=vectors,
        allow_lowrank=allow_lowrank and job.reduce_fn is None,
        spill_free_bytes=free_disk,
        threads=torch.get_num_threads(),
        # the accuracy check moves blocks to float64 when the Gram precision is below it (fisher.segmented)
        promotable=unit_roundoff(job.stat_dtype) > unit_roundoff(torch.float64),
    )


def plan_fisher_step(
    job: FisherJob,
    budget_bytes: int,
    *,
    max_chunk: int,
    vectors: int = 1,
    spill_root: Path | None = None,
    allow_lowrank: bool = True,
) -> FisherPlan:
    """Measure the inputs and make the plan (WFError naming the smallest budget if none fits).

    In a multi-process run every rank must call this; ranks agree on the smallest budget, so all make the
    same plan (each statistic is summed across ranks group by group).
    """
    inputs = measure_plan_inputs(job, max_chunk=max_chunk, vectors=vectors, spill_root=spill_root,
                                 allow_lowrank=allow_lowrank)
    device = next(iter(job.params.values())).device
    if job.reduce_fn is not None:
        budget_bytes = agree_min(budget_bytes, job.reduce_fn, device)
    plan = make_plan(inputs, budget_bytes)
    plan.spill_root = None if spill_root is None else str(spill_root)
    plan.baseline_bytes = resident_bytes() if device.type == "cpu" else torch.cuda.memory_allocated(device)
    return plan


# ===================================================================== gradient passes
class _PeekedBatches:
    """`batches` with its first batch already drawn (to probe shapes), replayed so the data is unchanged."""

    def __init__(self, batches: Batches) -> None:
        self._batches = batches
        self._first: Iterator[tuple[Tensor, Tensor]] | None = iter(batches())
        self.head = next(self._first)

    def __call__(self) -> Iterable[tuple[Tensor, Tensor]]:
        if self._first is None:
            return self._batches()
        first, self._first = self._first, None
        return itertools.chain([self.head], first)


class SpilledRows:
    """Every group's gradient rows on disk, one file per group, written chunk after chunk by one pass over every
    layer and read back a range of blocks at a time (each chunk's rows are block-major: one contiguous read)."""

    def __init__(self, folder: Path, groups: list[BlockGroup], job: FisherJob) -> None:
        self.job = job
        self.paths = {group.start: folder / f"rows-{group.start}.bin" for group in groups}  # group start -> file
        self.groups = groups
        self.chunk_rows: list[int] = []  # rows in each spilled chunk, in order

    def write(self, chunk: Tensor) -> None:
        """Append each group's blocks of a block-major chunk ``(K, n, B)`` to its file (time booked as spill)."""
        t0 = time.perf_counter()
        for group in self.groups:  # (blocks, n, B) slices along the first dimension: contiguous
            _write_tensor(chunk[group.start : group.stop], self.paths[group.start], append=True)
        self.chunk_rows.append(chunk.shape[1])
        self.job.add_time("spill", time.perf_counter() - t0)

    def read(self, group: BlockGroup, start: int, stop: int) -> Iterator[Tensor]:
        """Blocks ``[start, stop)`` of the group's rows, one chunk at a time as written (so sums run in the same
        order)."""
        B = self.job.block_size
        first = next(iter(self.job.params.values()))
        itemsize = first.element_size()
        offset = 0
        with open(self.paths[group.start], "rb") as source:
            for n in self.chunk_rows:
                t0 = time.perf_counter()
                buffer = torch.empty(stop - start, n, B, dtype=first.dtype)
                source.seek(offset + (start - group.start) * n * B * itemsize)
                source.readinto(buffer.numpy().data.cast("B"))
                offset += (group.stop - group.start) * n * B * itemsize
                self.job.add_time("spill", time.perf_counter() - t0)
                yield buffer.to(first.device)

    def release(self, group: BlockGroup) -> None:
        """Remove the group's file: each is read once, so the disk frees as the groups go."""
        self.paths.pop(group.start).unlink()


class _GroupSource:
    """A group's gradient rows: from a pass restricted to its layers over a fixed set of Fisher samples, or
    read back from the rows one earlier pass over every layer spilled to disk (``plan.gradient_spill``)."""

    def __init__(self, job: FisherJob, plan: FisherPlan, layout: BlockLayout, batches: Batches) -> None:
        self.job, self.plan, self.layout = job, plan, layout
        self.batches = batches
        self.fisher_type = job.fisher_type
        self.names = list(job.params)
        self.passes_done = 0
        self.spilled: SpilledRows | None = None  # every group's rows on disk, with plan.gradient_spill

    def _progress(self) -> Progress:
        job = self.job
        total = job.num_grads * self.plan.gradient_passes
        base = job.num_grads * self.passes_done

        def progress(_: str, done: int, __: int) -> None:
            if job.progress is not None:
                job.progress("gradients", base + done, total)

        return progress

    def _pass(self, params: dict[str, nn.Parameter], layout: BlockLayout) -> Iterator[Tensor]:
        """Block-major gradient chunks of `params` over the N Fisher samples (gradient time booked)."""
        job = self.job
        engine = GradientStats()
        chunks = iter_gradient_chunks(
            job.model, params, self.batches, num_grads=job.num_grads, grad_batch_size=job.grad_batch_size,
            chunk_size=self.plan.chunk_size, loss_fn=job.loss_fn, masks=job.masks, fisher_type=self.fisher_type,
            generator=job.generator, progress=self._progress(), layout=layout, nonfinite=job.nonfinite, stats=engine,
        )
        while True:
            t0 = time.perf_counter()
            chunk = next(chunks, None)
            job.add_time("gradients", time.perf_counter() - t0)
            if chunk is None:
                break
            yield chunk
        release_free_memory()  # the pass's activations, before the statistics are inverted or revisited
        self.passes_done += 1
        job.engine, job.skipped = engine.engine, job.skipped + engine.skipped

    def spill_gradients(self, folder: Path) -> None:
        """One pass over every layer; each group's block rows are appended to its own file, chunk by chunk."""
        self.spilled = SpilledRows(folder, self.plan.groups, self.job)
        for chunk in self._pass(self.job.params, self.layout):
            self.spilled.write(chunk)
            del chunk
        release_free_memory()  # the pass's activations: the groups' statistics come next

    def _is_spilled(self, group: BlockGroup) -> bool:
        return self.spilled is not None and group.start in self.spilled.paths

    def cache_samples(self) -> None:
        """Draw the N·m samples once (and the model's labels for the true Fisher) so every pass sees them."""
        job, n = self.job, self.plan.chunk_size
        m = job.grad_batch_size
        device = next(iter(job.params.values())).device
        x, y = SampleStream(self.batches, device).take(job.num_grads * m)
        if self.fisher_type == "true":
            with torch.no_grad():
                y = torch.cat([sample_model_labels(job.model(x[i : i + n * m]), job.generator)
                               for i in range(0, len(x), n * m)])
            self.fisher_type = "empirical"
        pieces = [(x[i : i + n * m], y[i : i + n * m]) for i in range(0, len(x), n * m)]
        self.batches = lambda: pieces

    def _group_parts(self, group: BlockGroup) -> Iterator[Tensor]:
        """The group's rows ``(blocks, n, B)`` chunk by chunk: read back, or from a pass over its layers."""
        if self.spilled is not None and self._is_spilled(group):
            yield from self.spilled.read(group, group.start, group.stop)
            self.spilled.release(group)
            return
        layers = list(group.layers)
        params = {self.names[i]: self.job.params[self.names[i]] for i in layers}
        touched = BlockLayout([self.layout.sizes[i] for i in layers], self.layout.block_size)
        skip = group.start - self.layout.block_offsets[layers[0]]  # blocks of the first layer before the group
        for chunk in self._pass(params, touched):
            yield chunk[skip : skip + group.stop - group.start]  # a view of this group's blocks

    def _accumulate(self, acc: SegmentedGramAccumulator, group: BlockGroup) -> None:
        """Fold the group's rows into `acc` and invert it. Rows spilled to disk are read a segment at a time and
        each segment is inverted before the next is read, so only one segment's float64 blocks are ever held."""
        job = self.job
        if self.spilled is None or not self._is_spilled(group):
            for part in self._group_parts(group):
                t1 = time.perf_counter()
                acc.add_blocked(part)
                del part
                job.add_time("accumulate", time.perf_counter() - t1)
            if job.reduce_fn is not None:
                acc.reduce(job.reduce_fn)
            return
        for index, (s, e) in enumerate(acc.bounds):
            for part in self.spilled.read(group, group.start + s, group.start + e):
                t1 = time.perf_counter()
                acc.add_segment(index, part)
                del part
                job.add_time("accumulate", time.perf_counter() - t1)
            t0 = time.perf_counter()
            acc.finish(index, job.damp, job.reduce_fn)
            job.add_time("inverse", time.perf_counter() - t0)
        self.spilled.release(group)

    def group_stats(self, group: BlockGroup, with_mean: bool) -> tuple[_GroupStats, Tensor | None]:
        """The group's statistics, inverted (Gram) or stored (low-rank), and its gradient sum."""
        job, B = self.job, self.layout.block_size
        count = group.stop - group.start
        layout, _, _ = sub_layout(self.layout, group.start, group.stop)
        first = next(iter(job.params.values()))
        device = first.device
        if self.plan.representation == "gram":
            # Rows read back a segment at a time share one float32 buffer; a pass fills every segment at once,
            # each in its own buffer (float32 rows of promoted blocks are dropped: at most float64 per block).
            acc = SegmentedGramAccumulator(layout, dtype=job.stat_dtype, device=device, damp=job.damp, rtol=job.rtol,
                                           track_mean=with_mean, blocks_per_segment=self.plan.segment_blocks or None,
                                           shared=self._is_spilled(group))
            self._accumulate(acc, group)
            t0 = time.perf_counter()
            num_samples = acc.num_samples
            mean = acc.mean_gradient() if with_mean else None
            parts, health = acc.segment_inverses(job.damp)
            del acc
            if len(parts) == 1:
                stats = _GroupStats(layout, job.damp, num_samples, blocks=parts[0][2], rtol=job.rtol)
            else:
                stats = _GroupStats(layout, job.damp, num_samples, rtol=job.rtol, parts=parts)
            del parts
            stats.repaired_blocks = health.repaired_blocks
            stats.health = health
            job.add_time("inverse", time.perf_counter() - t0)
            return stats, mean
        rows = torch.empty(count, job.num_grads, B, dtype=first.dtype, device=device)
        grad_sum = torch.zeros(count, B, dtype=torch.float64, device=device) if with_mean else None
        offset = 0
        for part in self._group_parts(group):
            t1 = time.perf_counter()
            rows[:, offset : offset + part.shape[1]] = part
            if grad_sum is not None:
                grad_sum += part.sum(1, dtype=torch.float64)
            offset += part.shape[1]
            del part
            job.add_time("accumulate", time.perf_counter() - t1)
        num_samples = offset
        mean = layout.unpad(grad_sum / num_samples) if grad_sum is not None else None
        return _GroupStats(layout, job.damp, num_samples, rows=rows, rtol=job.rtol), mean


def collect_grouped_inverse(job: FisherJob, plan: FisherPlan, *, with_grad_mean: bool = False) -> GroupedInverse:
    """Phase 1: one pass per group; keeps the inverse's diagonal (and WoodTaylor's vectors) for every weight.

    Spill files go to a fresh folder under ``plan.spill_root``; call :meth:`GroupedInverse.close` (or use
    the result as a context manager) to remove them.
    """
    spill_root = None if plan.spill_root is None else Path(plan.spill_root)
    layout = BlockLayout([p.numel() for p in job.params.values()], job.block_size)
    if plan.dim != layout.dim or plan.block_size != job.block_size:
        raise ValueError("the plan was made for other parameters or another block size")
    source = _GroupSource(job, plan, layout, job.batches)
    spill_dir = None
    if plan.revisit == "disk":
        if spill_root is None:
            raise ValueError("a plan that spills to disk needs plan.spill_root")
        spill_root.mkdir(parents=True, exist_ok=True)
        remove_stale_spills(spill_root)
        spill_dir = Path(tempfile.mkdtemp(prefix=f"{SPILL_PREFIX}{os.getpid()}-", dir=spill_root))
    result = GroupedInverse(plan, layout, job, source, spill_dir, with_grad_mean)
    try:
        if plan.gradient_spill:
            assert spill_dir is not None
            source.spill_gradients(spill_dir)
        elif plan.gradient_passes > 1:
            source.cache_samples()
        last = len(plan.groups) - 1
        for index, group in enumerate(plan.groups):
            stats, mean = source.group_stats(group, with_mean=with_grad_mean)
            result.num_samples = stats.num_samples
            result.repaired_blocks += stats.repaired_blocks
            t0 = time.perf_counter()
            _, g0, _ = sub_layout(layout, group.start, group.stop)
            result.keep_vectors(stats, g0, mean)  # (a function: no loop variable outlives it holding the blocks)
            job.add_time("inverse", time.perf_counter() - t0)
            if job.progress is not None:
                job.progress("inverse", group.stop, layout.num_blocks)
            if index == last and plan.keep_last:
                result._kept = stats
            elif plan.revisit == "disk":
                t0 = time.perf_counter()
                assert spill_dir is not None
                path = spill_dir / f"group-{index}.bin"
                shape, dtype = stats.spill(path)
                result._spilled[index] = (path, shape, dtype, stats.layout)
                job.add_time("spill", time.perf_counter() - t0)
            del stats
            release_free_memory()
    except BaseException:
        result.close()
        raise
    return result
