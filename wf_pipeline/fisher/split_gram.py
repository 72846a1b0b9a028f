"""Gram sums held in two precisions: the working precision, and float64 for the blocks moved out of it.

:class:`~wf_pipeline.fisher.inverse.BlockGramAccumulator` decides *when* a block moves to float64; this store
keeps the two buffers aligned as it does: which rows of the low-precision buffer still hold a live block
(``low_index``, ``stale``), the float64 sums and their block ids (``high``, ``high_index``), and the rounding
each promoted block carried over from its low-precision partial sum (``carried``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from wf_pipeline.fisher.conditioning import frobenius_norms

ReduceFn = Callable[[Tensor], None]
COMPACT_SHARE = 0.25  # stop computing dead low-precision rows once they cost more than a copy


class SplitGram:
    """``(K, B, B)`` Gram sums: rows in `dtype` (`gram`, possibly a caller's buffer) plus rows moved to float64."""

    def __init__(self, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device | str,
                 out: Tensor | None = None) -> None:
        K, B = num_blocks, block_size
        if out is not None and (tuple(out.shape) != (K, B, B) or out.dtype != dtype):
            raise ValueError(f"out must be a ({K}, {B}, {B}) {dtype} buffer")
        self.num_blocks = K
        self.gram = torch.zeros(K, B, B, dtype=dtype, device=device) if out is None else out.zero_()
        self.low_index: Tensor | None = None  # block ids of `gram`'s rows; None: all blocks, in order
        self.stale = torch.zeros(K, dtype=torch.bool, device=device)  # `gram` rows moved to float64 since
        self.high = torch.zeros(0, B, B, dtype=torch.float64, device=device)  # promoted blocks
        self.high_index = torch.zeros(0, dtype=torch.long, device=device)
        self.carried = torch.zeros(K, dtype=torch.float64, device=device)  # rounding carried into float64

    def low_ids(self) -> Tensor:
        """The block id of every row of `gram` (stale rows included until compacted)."""
        if self.low_index is None:
            return torch.arange(self.num_blocks, device=self.gram.device)
        return self.low_index

    @property
    def whole(self) -> bool:
        """`gram` still has a row per block, in order (so it can become the inverse in place)."""
        return self.low_index is None

    def add(self, blocked: Tensor) -> None:
        """Fold block-major rows ``(K, n, B)`` into both buffers: one batched GEMM per precision."""
        if self.low_index is None:
            self.gram.baddbmm_(blocked.mT, blocked)  # rows already moved to float64 are ignored from now on
        elif self.low_index.numel():
            low = blocked.index_select(0, self.low_index)
            self.gram.baddbmm_(low.mT, low)
        if self.high_index.numel():
            all_high = self.high_index.numel() == self.num_blocks and bool(self.high_index.diff().ge(0).all())
            high = blocked.double() if all_high else blocked.index_select(0, self.high_index).double()
            self.high.baddbmm_(high.mT, high)

    def promote(self, rows: Tensor, rounding: float) -> None:
        """Move the `gram` rows `rows` (with their partial sums, whose relative rounding is `rounding`) to float64."""
        ids = self.low_ids()[rows]
        sums = self.gram.index_select(0, rows)
        self.carried[ids] = rounding * frobenius_norms(sums)
        promoted = sums.double()
        del sums
        self.high = promoted if not self.high.numel() else torch.cat([self.high, promoted])
        self.high_index = torch.cat([self.high_index, ids])
        self.stale[rows] = True
        if float(self.stale.float().mean()) > COMPACT_SHARE:
            self.compact()

    def compact(self) -> None:
        """Drop the `gram` rows already moved to float64."""
        keep = ~self.stale
        self.low_index = self.low_ids()[keep]
        self.gram = self.gram[keep]
        self.stale = torch.zeros(self.low_index.numel(), dtype=torch.bool, device=self.gram.device)

    def agree(self, reduce_fn: ReduceFn, rounding: Callable[[int], float]) -> int:
        """Make every rank hold the same blocks in float64, in the same order (this rank's missing ones promoted
        with ``rounding(ranks)``), then sum the carried rounding; the number of ranks. All ranks must call it."""
        flags = torch.zeros(self.num_blocks + 1, dtype=torch.float64, device=self.gram.device)
        flags[self.high_index] = 1.0
        flags[-1] = 1.0  # counts the ranks
        reduce_fn(flags)
        ranks = max(1, int(round(float(flags[-1]))))
        is_high = torch.zeros(self.num_blocks, dtype=torch.bool, device=flags.device)
        is_high[self.high_index] = True
        newly = (flags[:-1] > 0) & ~is_high
        if newly.any():
            self.promote((newly[self.low_ids()] & ~self.stale).nonzero().squeeze(1), rounding(ranks))
        if bool(self.stale.any()):
            self.compact()  # every rank now holds the same low rows, in block order
        order = torch.argsort(self.high_index)  # same block order on every rank
        self.high_index, self.high = self.high_index[order], self.high[order]
        reduce_fn(self.carried)
        return ranks

    def nonfinite_blocks(self) -> Tensor:
        """Ids of the live blocks whose sums hold NaN or Inf."""
        bad = []
        if self.gram.numel():
            low = ~torch.isfinite(frobenius_norms(self.gram)) & ~self.stale  # (rows moved to float64 are dead)
            bad.append(self.low_ids()[low])
        if self.high.numel():
            bad.append(self.high_index[~torch.isfinite(frobenius_norms(self.high))])
        return torch.cat(bad) if bad else torch.zeros(0, dtype=torch.long, device=self.gram.device)
