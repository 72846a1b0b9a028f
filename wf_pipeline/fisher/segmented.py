"""Gram blocks accumulated in segments, so blocks promoted to float64 stay within a known memory bound.

:class:`~wf_pipeline.fisher.inverse.BlockGramAccumulator` moves every block that float32 cannot hold to
``inverse_rtol`` into float64 as it goes (ResNet-50 with its default random init, whose logits explode in
eval mode, promotes ~3/4 of its blocks at λ = 1e-5). Over a whole layer group its transients scale with the
group: promoted rows are copied, the float64 store is re-concatenated at every promotion, the float32 rows
are compacted by copy, and the result is assembled in a new buffer. Here consecutive segments of at most
:data:`SEGMENT_BYTES` (float64) each get their own accumulator, so those transients are one segment's at a
time (:func:`segment_workset_bytes`). Storage, per block, beside those transients:

* ``shared`` (default): the float32 sums of every segment live in one buffer that becomes the inverse in
  place, plus ``8·B²`` per block promoted to float64 while its segment is open. Filled one segment after
  another (:meth:`SegmentedGramAccumulator.add_segment`, then :meth:`~SegmentedGramAccumulator.finish`;
  gradient rows read back from disk) that is ``4·B²`` per block plus one open segment, whatever the share
  of promoted blocks; filled all at once by a gradient pass, up to ``12·B²``.
* separate (``shared=False``, filled by a pass): each segment has its own buffer, whose float32 rows of
  promoted blocks are dropped once a quarter of the segment has moved, so at most ``8·B²`` per block (every
  block in float64); the inverse comes as one tensor per segment (:meth:`segment_inverses`).

Every block sees the same chunks in the same order and makes the same precision decisions as in one
accumulator, so the inverse is the same, bit for bit.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from wf_pipeline.fisher.conditioning import DEFAULT_RTOL, InverseHealth
from wf_pipeline.fisher.inverse import (
    BlockFisherInverse,
    BlockGramAccumulator,
    _dtype_name,
    checked_mean,
)
from wf_pipeline.fisher.layout import BlockLayout, non_finite_error

SEGMENT_BYTES = 32 * 2**20  # float64 bytes of one segment's blocks at most
SEGMENT_BUDGET_SHARE = 64  # and at most this share of the memory budget (small budgets: small segments)
# One open segment beyond its share of the float32 buffer, in float64 copies of its blocks: the promoted
# store, the promoted rows' copies, the store re-concatenated (2 at once), a compaction copy of the float32
# rows, the inverse assembled outside the buffer (2 at once). Measured 3.4 with promotions in waves, the
# segment's Cholesky factors included (which the plan also counts as slice temporaries).
SEGMENT_WORKSET_COPIES = 4

ReduceFn = Callable[[Tensor], None]
Progress = Callable[[str, int, int], None]


def sub_layout(layout: BlockLayout, start: int, stop: int) -> tuple[BlockLayout, int, int]:
    """The layout of blocks ``[start, stop)`` alone, and the flat range ``[f0, f1)`` of their weights.

    Blocks never cross a layer boundary, so the range's weights are contiguous in the flat vector and
    its own layout pads exactly the same coordinates.
    """
    B = layout.block_size
    sizes: list[int] = []
    f0 = f1 = -1
    for layer, (k0, k1) in enumerate(zip(layout.block_offsets, layout.block_offsets[1:], strict=False)):
        b0, b1 = max(start, k0), min(stop, k1)
        if b0 >= b1:
            continue
        lo = layout.flat_offsets[layer] + (b0 - k0) * B
        hi = layout.flat_offsets[layer] + min(layout.sizes[layer], (b1 - k0) * B)
        f0 = lo if f0 < 0 else f0
        f1 = hi
        sizes.append(hi - lo)
    if not sizes:
        raise ValueError(f"empty block range [{start}, {stop})")
    return BlockLayout(sizes, B), f0, f1


def segment_blocks(block_size: int, budget_bytes: int | None = None) -> int:
    """Blocks per segment: :data:`SEGMENT_BYTES` of float64 blocks, or 1/:data:`SEGMENT_BUDGET_SHARE` of a budget."""
    nbytes = SEGMENT_BYTES if budget_bytes is None else min(SEGMENT_BYTES, budget_bytes // SEGMENT_BUDGET_SHARE)
    return max(1, nbytes // (8 * block_size * block_size))


def segment_workset_bytes(block_size: int, blocks: int, chunk: int, grad_bytes: int = 4) -> int:
    """Bytes one open segment of `blocks` may hold beyond its float32 share: float64 copies of its blocks, and
    of a chunk's rows (the rows of promoted blocks are multiplied in float64: ``n·B`` numbers, plus a gathered copy).
    """
    return blocks * (SEGMENT_WORKSET_COPIES * 8 * block_size * block_size + chunk * block_size * (8 + grad_bytes))


class SegmentedGramAccumulator:
    """``Σ g gᵀ`` per block in segments of :func:`segment_blocks`; the same inverse as one accumulator.

    Interface of :class:`~wf_pipeline.fisher.inverse.BlockGramAccumulator` (``add``, ``add_blocked``,
    ``reduce``, ``inverse``, ``mean_gradient``, ``num_samples``), plus :meth:`add_segment` and
    :meth:`finish` to fill and invert one segment at a time.
    """

    def __init__(self, layout: BlockLayout, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 damp: float | None = None, rtol: float = DEFAULT_RTOL, track_mean: bool = True,
                 blocks_per_segment: int | None = None, shared: bool = True) -> None:
        K, B = layout.num_blocks, layout.block_size
        self.layout, self.dtype, self.damp, self.rtol, self.track_mean = layout, dtype, damp, float(rtol), track_mean
        self.device = torch.device(device)
        # shared: the float32 sums of every segment, then the inverse in place (else one buffer per segment)
        self.blocks: Tensor | None = torch.zeros(K, B, B, dtype=dtype, device=device) if shared else None
        self._parts: dict[int, Tensor] = {}  # inverted segments, without a shared buffer
        step = blocks_per_segment or segment_blocks(B)
        self.bounds = [(s, min(s + step, K)) for s in range(0, K, step)]
        self._open: dict[int, BlockGramAccumulator] = {}
        self._done: set[int] = set()
        self._health: list[InverseHealth] = []
        self._num_samples: int | None = None
        self.count = torch.zeros((), dtype=torch.float64, device=device)  # gradients folded in (reduced: all ranks')
        self._sums: dict[int, Tensor] = {}  # finished segments' gradient sums (WoodTaylor's mean)

    @property
    def num_segments(self) -> int:
        return len(self.bounds)

    def segment(self, index: int) -> BlockGramAccumulator:
        """The open accumulator of segment `index` (created on first use, over its view of the shared buffer)."""
        if index in self._done:
            raise ValueError(f"segment {index} is already inverted")
        acc = self._open.get(index)
        if acc is None:
            s, e = self.bounds[index]
            layout, _, _ = sub_layout(self.layout, s, e)
            acc = self._open[index] = BlockGramAccumulator(
                layout, dtype=self.dtype, device=self.device, damp=self.damp, rtol=self.rtol,
                track_mean=self.track_mean, out=None if self.blocks is None else self.blocks[s:e])
        return acc

    # ----------------------------------------------------------------- adding
    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``."""
        self.add_blocked(self.layout.to_blocked(chunk.to(dtype=self.dtype, device=self.device)))

    def add_blocked(self, blocked: Tensor) -> None:
        """Fold in block-major gradient rows ``(K, n, B)`` into every segment."""
        K, B = self.layout.num_blocks, self.layout.block_size
        if blocked.dim() != 3 or blocked.shape[0] != K or blocked.shape[2] != B:
            raise ValueError(f"expected block-major rows (K={K}, n, B={B})")
        for index, (s, e) in enumerate(self.bounds):
            self.segment(index).add_blocked(blocked[s:e])
        self.count += blocked.shape[1]

    def add_segment(self, index: int, blocked: Tensor) -> None:
        """Fold in the rows ``(e − s, n, B)`` of segment `index`'s blocks alone (every segment gets the same rows)."""
        self.segment(index).add_blocked(blocked)
        if index == 0:
            self.count += blocked.shape[1]

    def reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum every open segment across processes (all ranks must call it; see BlockGramAccumulator.reduce)."""
        for index in range(self.num_segments):
            if index not in self._done:
                self.segment(index).reduce(reduce_fn)
        if 0 not in self._done:
            self.count.copy_(self.segment(0).count)

    @property
    def num_samples(self) -> int:
        return int(round(float(self.count)))

    def mean_gradient(self) -> Tensor:
        if not self.track_mean:
            raise ValueError("this accumulator was built with track_mean=False")
        parts = [self._sums[i] if i in self._done else self.segment(i).grad_sum for i in range(self.num_segments)]
        return checked_mean(torch.cat(parts), self.num_samples)

    # ----------------------------------------------------------------- inverting
    def finish(self, index: int, damp: float, reduce_fn: ReduceFn | None = None) -> None:
        """Invert segment `index` (into its part of the shared buffer) and let its accumulator go
        (after `reduce_fn`)."""
        acc = self.segment(index)
        if reduce_fn is not None:
            acc.reduce(reduce_fn)
        s, e = self.bounds[index]
        self._check_finite([index])
        if self.track_mean:
            self._sums[index] = acc.grad_sum
        n = acc.num_samples
        if self._num_samples is not None and n != self._num_samples:
            raise ValueError(f"segment {index} has {n} gradients, others {self._num_samples}")
        self._num_samples = n
        self.count.fill_(n)  # (summed over ranks where `reduce_fn` was given)
        inverse = acc.inverse(damp)
        del self._open[index], acc
        if self.blocks is None:
            self._parts[index] = inverse.blocks
        elif inverse.blocks.data_ptr() != self.blocks[s:e].data_ptr():  # compacted: assembled outside the buffer
            self.blocks[s:e] = inverse.blocks
        self._health.append(inverse.health)
        self._done.add(index)

    def _check_finite(self, indices: list[int]) -> None:
        """NaN/Inf sums raise, naming the blocks in the whole layout (a segment's own block ids are local)."""
        bad = [self._open[index].split.nonfinite_blocks() + self.bounds[index][0] for index in indices]
        if bad and (ids := torch.cat(bad)).numel():
            raise non_finite_error(self.layout, ids)

    def _finish_all(self, damp: float, progress: Progress | None) -> InverseHealth:
        self._check_finite([i for i in range(self.num_segments) if i in self._open])
        for index, (_, e) in enumerate(self.bounds):
            if index not in self._done:
                self.finish(index, damp)
            if progress is not None:
                progress("inverse", e, self.layout.num_blocks)
        if self._num_samples is None:
            raise ValueError("no gradients accumulated")
        health = merge_health(self._health, self.dtype, damp, self.rtol)
        self._health = []
        return health

    def inverse(self, damp: float, progress: Progress | None = None,
                max_jitter: float | None = None) -> BlockFisherInverse:
        """Invert every segment not yet inverted; the shared buffer becomes the inverse (see
        BlockGramAccumulator.inverse)."""
        if self.blocks is None:
            raise ValueError("without a shared buffer the inverse comes per segment: use segment_inverses()")
        health = self._finish_all(damp, progress)
        assert self._num_samples is not None
        result = BlockFisherInverse(self.layout, self.blocks, damp, self._num_samples, health=health)
        if max_jitter is not None:
            health.require(max_jitter)
        return result

    def segment_inverses(self, damp: float) -> tuple[list[tuple[int, int, Tensor]], InverseHealth]:
        """Invert every segment not yet inverted: ``(start, stop, blocks)`` per segment (one entry with a shared
        buffer), and the merged health."""
        health = self._finish_all(damp, None)
        if self.blocks is not None:
            return [(0, self.layout.num_blocks, self.blocks)], health
        return [(s, e, self._parts.pop(i)) for i, (s, e) in enumerate(self.bounds)], health


def merge_health(parts: list[InverseHealth], dtype: torch.dtype, damp: float, rtol: float) -> InverseHealth:
    """One inverse's health from its segments' (the working dtype as one accumulator would name it)."""
    health = InverseHealth(damp=float(damp), rtol=rtol)
    for part in parts:
        health = health.merge(part)
    name = _dtype_name(dtype)
    health.working_dtype = f"{name}+float64" if health.promoted_blocks else name
    health.route = "fast"
    return health
