"""Block-diagonal inverse of the dampened empirical Fisher ``F = λI + (1/N) Σ g gᵀ``.

The flat weight vector (selected layers concatenated) is cut into blocks of ``B`` consecutive
weights; blocks never cross a layer boundary, and a layer's short last block is padded with
coordinates whose gradient is always zero (:mod:`wf_pipeline.fisher.layout`). Those padded coordinates
are decoupled (their Fisher row is ``λ eᵢ``) and are dropped by every public accessor.

Three routes build the same matrix:

* ``fast`` — :class:`BlockGramAccumulator`: stream ``GᵀG`` per block with batched GEMMs into one
  ``K×B×B`` buffer, then invert it in place, a slice of blocks at a time, with a batched Cholesky.
  Peak memory ≈ the buffer (``d·B`` numbers) + one gradient chunk.
* ``woodbury`` — :class:`WoodburyAccumulator`: the textbook rank-one Sherman–Morrison recursion
  ``F⁻¹ ← F⁻¹ − (F⁻¹g)(F⁻¹g)ᵀ / (N + gᵀF⁻¹g)``, one gradient at a time, batched over blocks
  (as the WoodFisher research code and SparseML do it). The reference; memory-bound and slow, and
  unstable in float32 at small λ, so :meth:`BlockFisherInverse.from_gradients` and the pruning step
  always run it in float64.
* ``lowrank`` — :func:`low_rank_inverse`: for ``N < B``, ``F⁻¹ = (1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` per
  block from the ``N×B`` gradient slice ``A``; needs all gradients at once (``N·d`` numbers).

Precision (see :mod:`wf_pipeline.fisher.conditioning`): every route holds each block to a relative
accuracy ``rtol`` (default 1e-4). Blocks that float32 cannot hold (small λ next to large or
rank-deficient gradients) are computed in float64; blocks even float64 cannot hold get jitter, which
is recorded in :attr:`BlockFisherInverse.health` (callers warn and, above a threshold, refuse).
NaN/Inf statistics raise :class:`~wf_pipeline.fisher.conditioning.FisherStatisticsError`.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor

from wf_pipeline.fisher.conditioning import (
    DEFAULT_MAX_JITTER,
    DEFAULT_RTOL,
    ERROR_CONSTANT,
    SAFETY,
    FisherStatisticsError,
    InverseHealth,
    frobenius_norms,
    invert_checked_,
    jittered_inverse,
    unit_roundoff,
)
from wf_pipeline.fisher.layout import BlockLayout, non_finite_error
from wf_pipeline.fisher.parallel import map_slices
from wf_pipeline.fisher.split_gram import SplitGram

Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]
ROUTES = ("fast", "woodbury", "lowrank")
# Without a precision plan, blocks are repaired only when they fail to factorise (their estimated
# error is still reported): the estimate is conservative, and jitter changes the matrix.
UNPLANNED_REPAIR_ABOVE = math.inf
# Blocks inverted per batched Cholesky call: ~4 MB of temporaries per slice and worker (measured no slower than 256).
INVERT_SLICE_BLOCKS = 64


def accumulation_dtype(num_samples: int, block_size: int, dtype: torch.dtype) -> torch.dtype:
    """Whole-buffer precision when nothing but N and B is known: fp64 when ``N < B`` in fp32.

    With fewer gradients than the block size every block is rank-deficient, so ``λI + GᵀG/N`` has
    eigenvalues as small as λ next to ones of order ``|g|²``. :class:`BlockGramAccumulator` given the
    damping decides per block from the gradients' actual scale instead (which also covers rank-deficient
    blocks with N ≥ B); this helper remains for callers that must size a buffer up front.
    """
    if dtype == torch.float32 and num_samples < block_size:
        return torch.float64
    return dtype


class BlockFisherInverse:
    """The inverse blocks ``(K, B, B)`` of a block-diagonal dampened Fisher, with flat accessors.

    :attr:`health` records how it was computed: blocks promoted to float64, repairs (float64 retries,
    jitter added to the damping) and the largest estimated relative error of a block.
    """

    def __init__(
        self, layout: BlockLayout, blocks: Tensor, damp: float, num_samples: int, health: InverseHealth | None = None
    ) -> None:
        expected = (layout.num_blocks, layout.block_size, layout.block_size)
        if tuple(blocks.shape) != expected:
            raise ValueError(f"blocks have shape {tuple(blocks.shape)}, expected {expected}")
        self.layout = layout
        self.blocks = blocks
        self.damp = float(damp)
        self.num_samples = int(num_samples)
        self.health = health or InverseHealth(damp=self.damp, rtol=DEFAULT_RTOL, num_blocks=layout.num_blocks,
                                              working_dtype=_dtype_name(blocks.dtype))

    @property
    def repaired_blocks(self) -> int:
        """Blocks that needed a float64 retry or added jitter."""
        return self.health.repaired_blocks

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_gradients(
        cls,
        chunks: Tensor | Iterable[Tensor],
        block_size: int,
        damp: float,
        route: str = "fast",
        sizes: Sequence[int] | None = None,
        dtype: torch.dtype | None = None,
        progress: Progress | None = None,
        rtol: float = DEFAULT_RTOL,
        max_jitter: float | None = DEFAULT_MAX_JITTER,
    ) -> BlockFisherInverse:
        """Inverse of ``damp·I + (1/N) Σ g gᵀ`` (block-diagonal) from gradient rows, each block to `rtol`.

        `chunks` is an ``(N, d)`` tensor or an iterable of ``(n_i, d)`` chunks; `sizes` gives the layer
        lengths along ``d`` (default: one layer). `dtype` (default: the gradients' dtype) is the
        precision of the result; blocks it cannot hold to `rtol` are computed in float64, as the pruning
        step does (the ``woodbury`` route always runs in float64). Raises
        :class:`~wf_pipeline.fisher.conditioning.FisherAccuracyError` when a block needed jitter above
        ``max_jitter · damp`` (``None``: accept any repair; see :attr:`health`), and
        :class:`~wf_pipeline.fisher.conditioning.FisherStatisticsError` for NaN/Inf gradients.
        """
        if route not in ROUTES:
            raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
        if not damp > 0 or not math.isfinite(damp):
            raise ValueError(f"damp must be a positive finite number, got {damp}")
        chunk_list = [chunks] if isinstance(chunks, Tensor) else list(chunks)
        if not chunk_list:
            raise ValueError("no gradients given")
        first = chunk_list[0]
        layout = BlockLayout(sizes if sizes is not None else [first.shape[-1]], block_size)
        dtype = dtype or first.dtype
        if route == "lowrank":
            inverse = low_rank_inverse(torch.cat(chunk_list), layout, damp, dtype=dtype, rtol=rtol)
        else:
            if route == "woodbury":
                total = sum(c.shape[0] for c in chunk_list)
                acc: BlockGramAccumulator | WoodburyAccumulator = WoodburyAccumulator(
                    layout, damp, total, dtype=dtype, device=first.device, working_dtype=torch.float64, rtol=rtol
                )
            else:
                acc = BlockGramAccumulator(layout, dtype=dtype, device=first.device, damp=damp, rtol=rtol)
            for chunk in chunk_list:
                acc.add(chunk)
            inverse = acc.inverse(damp, progress=progress)
        if max_jitter is not None:
            inverse.health.require(max_jitter)
        return inverse

    # ----------------------------------------------------------------- accessors
    @property
    def dim(self) -> int:
        return self.layout.dim

    def diag(self) -> Tensor:
        """``[F⁻¹]_qq`` for every real weight, flat ``(d,)``."""
        return self.layout.unpad(self.blocks.diagonal(dim1=-2, dim2=-1))

    def matvec(self, v: Tensor) -> Tensor:
        """``F⁻¹ v`` for ``v`` of shape ``(d,)`` or ``(m, d)``."""
        vp = self.layout.pad(v.to(self.blocks.dtype))
        if vp.dim() == 2:
            out = torch.bmm(self.blocks, vp.unsqueeze(-1)).squeeze(-1)
        else:
            out = torch.einsum("kbc,mkc->mkb", self.blocks, vp)
        return self.layout.unpad(out).to(v.dtype)

    def block(self, i: int) -> Tensor:
        """Block `i` of ``F⁻¹`` restricted to its real weights (``r×r`` for a short last block)."""
        r = self.layout.block_length(i)
        return self.blocks[i, :r, :r]

    def dense(self) -> Tensor:
        """The full ``d×d`` matrix (tests and small problems only)."""
        full = torch.block_diag(*self.blocks.unbind(0))
        pos = self.layout.positions(self.blocks.device)
        return full[pos][:, pos]

    def to(self, *args: Any, **kwargs: Any) -> BlockFisherInverse:
        return BlockFisherInverse(self.layout, self.blocks.to(*args, **kwargs), self.damp, self.num_samples,
                                  health=self.health)


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ===================================================================== accumulators
class _StatisticsMixin:
    """Gradient sum and sample count, kept alongside every accumulator (WoodTaylor needs the mean).

    With ``track_mean=False`` the sum is not kept (:meth:`mean_gradient` refuses): it is a full pass
    over every chunk, about an eighth of the Gram product's time on the default model.
    """

    grad_sum: Tensor
    count: Tensor
    track_mean: bool

    def _init_stats(self, dim: int, dtype: torch.dtype, device: torch.device | str, track_mean: bool = True) -> None:
        self.grad_sum = torch.zeros(dim, dtype=dtype, device=device)
        self.count = torch.zeros((), dtype=torch.float64, device=device)
        self.track_mean = track_mean

    def _add_stats(self, chunk: Tensor) -> None:
        if self.track_mean:
            self.grad_sum += chunk.sum(0)
        self.count += chunk.shape[0]

    def _add_blocked_stats(self, blocked: Tensor, layout: BlockLayout) -> None:
        if self.track_mean:
            self.grad_sum += layout.unpad(blocked.sum(1))
        self.count += blocked.shape[1]

    @property
    def num_samples(self) -> int:
        return int(round(float(self.count)))

    def mean_gradient(self) -> Tensor:
        if not self.track_mean:
            raise ValueError("this accumulator was built with track_mean=False")
        return checked_mean(self.grad_sum, self.num_samples)


def checked_mean(grad_sum: Tensor, num_samples: int) -> Tensor:
    """``grad_sum / num_samples``; NaN/Inf raise :class:`FisherStatisticsError` instead of reaching the scores."""
    if num_samples == 0:
        raise ValueError("no gradients accumulated")
    mean = grad_sum / num_samples
    if not bool(torch.isfinite(mean).all()):
        raise FisherStatisticsError(
            "the mean gradient contains NaN or Inf",
            hint="a gradient is NaN/Inf or too large for float32: check the model's weights and the Fisher data",
        )
    return mean


def _block_sumsq(blocked: Tensor) -> Tensor:
    """``Σ g²`` over the rows of each block of block-major gradients ``(K, n, B)``, in float64."""
    return torch.linalg.vector_norm(blocked, dim=(1, 2)).double().square()


class BlockGramAccumulator(_StatisticsMixin):
    """Streams ``Σ g gᵀ`` per block (the fast route). Chunks and ranks can be added in any order.

    Given the damping, the accumulator keeps each block in `dtype` only while that precision can hold
    its inverse to ``rtol`` (estimate in :mod:`wf_pipeline.fisher.conditioning`, checked before every
    chunk from the block's running ``‖Σ g gᵀ‖_F``); a block about to exceed it is moved to float64
    with its partial sum (whose rounding is still within budget) and continues there. Without `damp`
    every block stays in `dtype`; :meth:`inverse` checks the result either way and repairs what it must.
    """

    def __init__(
        self,
        layout: BlockLayout,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        damp: float | None = None,
        rtol: float = DEFAULT_RTOL,
        track_mean: bool = True,
        out: Tensor | None = None,
    ) -> None:
        self.layout = layout
        self.dtype = dtype
        self.damp = damp
        self.rtol = float(rtol)
        self.adaptive = damp is not None and unit_roundoff(dtype) > unit_roundoff(torch.float64)
        # the sums (`out`: a caller's buffer, e.g. a view of a larger one, inverted in place), split by precision
        self.split = SplitGram(layout.num_blocks, layout.block_size, dtype, device, out)
        self.adds = 0  # chunks folded in (each rounds the running sums once)
        self.ranks = 1  # processes whose sums were added by reduce()
        self._init_stats(layout.dim, dtype, device, track_mean)

    @property
    def gram(self) -> Tensor:
        """The sums of the blocks held in `dtype` (rows of :attr:`SplitGram.low_index`)."""
        return self.split.gram

    @property
    def high_index(self) -> Tensor:
        """Ids of the blocks held in float64."""
        return self.split.high_index

    # ----------------------------------------------------------------- adding
    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``."""
        self.add_blocked(self.layout.to_blocked(chunk.to(dtype=self.dtype, device=self.gram.device)))

    def add_blocked(self, blocked: Tensor) -> None:
        """Fold in block-major gradient rows ``(K, n, B)``: one batched GEMM per precision."""
        blocked = blocked.to(dtype=self.dtype, device=self.gram.device)
        K, B = self.layout.num_blocks, self.layout.block_size
        if blocked.dim() != 3 or blocked.shape[0] != K or blocked.shape[2] != B:
            raise ValueError(f"expected block-major rows (K={K}, n, B={B})")
        if self.adaptive:
            self._promote_before(blocked)
        self.split.add(blocked)
        self.adds += 1
        self._add_blocked_stats(blocked, self.layout)

    def _rounding(self, ranks: int) -> float:
        """Relative rounding of a `dtype` partial sum so far (``u·sqrt(adds+1)`` per rank)."""
        return unit_roundoff(self.dtype) * math.sqrt(ranks * self.adds + 1)

    def _promote_before(self, blocked: Tensor) -> None:
        """Move to float64 the blocks whose `dtype` sums would exceed the error budget with this chunk."""
        split = self.split
        low = split.low_ids()
        if self.damp is None or not low.numel() or bool(split.stale.all()):
            return
        # ‖S + S_chunk‖_F <= ‖S‖_F + Σ g² over the chunk: one read of the buffer, no copy
        bound = frobenius_norms(split.gram) + _block_sumsq(blocked).index_select(0, low)
        count = float(self.count) + blocked.shape[1]
        # ERROR_CONSTANT·u·sqrt(adds+1)·‖S‖_F/count <= (rtol/SAFETY)·damp  <=>  ‖S‖_F <= limit
        limit = (self.rtol / SAFETY) * self.damp * count / (
            ERROR_CONSTANT * unit_roundoff(self.dtype) * math.sqrt(self.ranks * (self.adds + 1) + 1)
        )
        rows = ((bound > limit) & ~split.stale).nonzero().squeeze(1)
        if rows.numel():
            split.promote(rows, self._rounding(self.ranks))

    def reduce(self, reduce_fn: ReduceFn) -> None:
        """Sum the statistics across processes in place (e.g. ``dist.all_reduce``).

        All ranks must call it. With a damping-aware accumulator the ranks first agree on which blocks
        are in float64 (one extra reduction of a ``K+1`` vector), so their buffers line up.
        """
        if self.adaptive:
            self.ranks = self.split.agree(reduce_fn, self._rounding)
        for stat in (self.split.gram, self.split.high, self.grad_sum, self.count):
            if stat.numel():
                reduce_fn(stat)

    # ----------------------------------------------------------------- inverting
    def inverse(
        self, damp: float, progress: Progress | None = None, max_jitter: float | None = None
    ) -> BlockFisherInverse:
        """Invert ``damp·I + gram/N`` (in place where possible; do not add after), each block to ``rtol``.

        Blocks the estimate cannot certify are checked with their actual smallest eigenvalue and, if
        needed, repaired (float64 retry, then jitter); see :attr:`BlockFisherInverse.health`. With
        `max_jitter`, a repair adding more than ``max_jitter · damp`` raises
        :class:`~wf_pipeline.fisher.conditioning.FisherAccuracyError`.
        """
        n = self.num_samples
        if n == 0:
            raise ValueError("no gradients accumulated")
        if self.damp is not None and damp != self.damp:
            raise ValueError(f"damp {damp} differs from the {self.damp} this accumulator planned its precision for")
        split, K = self.split, self.layout.num_blocks
        in_place = split.whole  # the buffer still has a row per block: reuse it for the result
        if in_place:
            split.gram[split.stale] = 0  # rows moved to float64: invert λI there (trivially), overwritten below
        elif bool(split.stale.any()):
            split.compact()
        # Planned blocks only exceed rtol where even float64 cannot hold them: jitter those. Without a
        # plan, blocks beyond rtol are kept as they are (and reported): jitter would move them further
        # from the exact inverse than the rounding did, unless they fail to factorise at all.
        inverter = _SumsInverter(n, damp, self.rtol, self.rtol if self.damp is not None else UNPLANNED_REPAIR_ABOVE,
                                 math.sqrt(self.ranks * self.adds + 1), split.gram.shape[0] + split.high.shape[0],
                                 progress)
        low_ids, high_ids = split.low_ids(), split.high_index
        results = inverter(split.gram, low_ids, unit_roundoff(self.dtype), None)
        results += inverter(split.high, high_ids, unit_roundoff(torch.float64), split.carried[high_ids])
        bad = [r["non_finite"] for r in results if "non_finite" in r]
        if bad:
            raise non_finite_error(self.layout, torch.cat(bad))
        health = InverseHealth(
            damp=float(damp), rtol=self.rtol, num_blocks=K, promoted_blocks=int(high_ids.numel()),
            retried_blocks=sum(r["retried"] for r in results), jittered_blocks=sum(r["jittered"] for r in results),
            max_jitter=max((r["max_jitter"] for r in results), default=0.0),
            max_error_estimate=max((r["max_error"] for r in results), default=0.0),
            working_dtype=_dtype_name(self.dtype) if not high_ids.numel() else f"{_dtype_name(self.dtype)}+float64",
            route="fast",
        )
        if in_place:
            blocks = split.gram  # inverted in place: the buffer now belongs to the inverse
            if high_ids.numel():
                blocks[high_ids] = split.high.to(self.dtype)
        else:
            blocks = torch.empty(K, self.layout.block_size, self.layout.block_size, dtype=self.dtype,
                                 device=split.gram.device)
            if low_ids.numel():
                blocks[low_ids] = split.gram
            blocks[high_ids] = split.high.to(self.dtype)
        split.gram, split.high = torch.empty(0), torch.empty(0)
        result = BlockFisherInverse(self.layout, blocks, damp, n, health=health)
        if max_jitter is not None:
            health.require(max_jitter)
        return result


class _SumsInverter:
    """Inverts ``damp·I + sums/n`` in place, a slice of blocks at a time, each checked to `rtol` (see
    :func:`~wf_pipeline.fisher.conditioning.invert_checked_`); progress counts over both precisions."""

    def __init__(self, n: int, damp: float, rtol: float, repair_above: float, scale: float, total: int,
                 progress: Progress | None) -> None:
        self.n, self.damp, self.rtol, self.repair_above, self.scale = n, damp, rtol, repair_above, scale
        self.total, self.progress, self.done = total, progress, 0

    def __call__(self, mats: Tensor, ids: Tensor, u: float, carried: Tensor | None) -> list[dict[str, Any]]:
        n, damp = self.n, self.damp

        def one_slice(s: int, e: int) -> dict[str, Any]:
            sums = mats[s:e]
            norms = frobenius_norms(sums)
            finite = torch.isfinite(norms)
            if not bool(finite.all()):
                return {"non_finite": ids[s:e][~finite]}
            perturbation = ERROR_CONSTANT * (u * self.scale * norms / n + u * damp)
            if carried is not None:
                perturbation += ERROR_CONSTANT * carried[s:e] / n
            sums.div_(n).diagonal(dim1=-2, dim2=-1).add_(damp)
            return invert_checked_(sums, damp, perturbation, self.rtol, self.repair_above)

        base, progress = self.done, self.progress
        out = map_slices(one_slice, mats.shape[0], INVERT_SLICE_BLOCKS,
                         on_done=None if progress is None else (lambda e: progress("inverse", base + e, self.total)))
        self.done += mats.shape[0]
        return out


class WoodburyAccumulator(_StatisticsMixin):
    """The rank-one Woodbury (Sherman–Morrison) recursion, batched over blocks (reference route).

    ``num_samples`` (the final N) must be known up front because every update divides by it. The
    recursion runs in `working_dtype` (default `dtype`; the result is stored in `dtype`). It starts from
    ``I/λ`` and cancels ~1/λ-sized terms at every step, so its rounding is ~u/λ in absolute terms: in
    float32 at λ = 1e-5 it is off by 1e-3 at |g| ~ 1 and breaks down by |g| ~ 100 even when F is well
    conditioned, which is why the library always runs it in float64. Its accuracy is checked after the
    fact: the Gram ``Σ g gᵀ`` is kept alongside (in the working precision) and :meth:`inverse` measures the residual
    ``‖X F − I‖`` of every block; with `max_jitter` given (checked mode) a block beyond ``rtol`` is refused
    (the recursion cannot be repaired after the fact).
    """

    def __init__(
        self,
        layout: BlockLayout,
        damp: float,
        num_samples: int,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        working_dtype: torch.dtype | None = None,
        rtol: float = DEFAULT_RTOL,
    ) -> None:
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.layout = layout
        self.dtype = dtype
        self.working_dtype = working_dtype or dtype
        self.damp = float(damp)
        self.rtol = float(rtol)
        self.expected = int(num_samples)
        eye = torch.eye(layout.block_size, dtype=self.working_dtype, device=device) / damp
        self.inv = eye.expand(layout.num_blocks, -1, -1).clone()
        # for the residual (the mean is kept by the recursion itself)
        self.check = BlockGramAccumulator(layout, dtype=self.working_dtype, device=device, track_mean=False)
        self._init_stats(layout.dim, dtype, device)

    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``, one rank-one update each."""
        self.add_blocked(self.layout.to_blocked(chunk.to(dtype=self.dtype, device=self.inv.device)))

    def add_blocked(self, blocked: Tensor) -> None:
        """Fold in block-major gradient rows ``(K, n, B)``, one rank-one update each."""
        blocked = blocked.to(dtype=self.dtype, device=self.inv.device)
        if self.num_samples + blocked.shape[1] > self.expected:
            raise ValueError(f"more than the announced {self.expected} gradients")
        work = blocked.to(self.working_dtype)
        for i in range(work.shape[1]):
            g = work[:, i, :].unsqueeze(-1)  # (K, B, 1)
            u = torch.bmm(self.inv, g)  # F⁻¹g
            denom = self.expected + torch.bmm(g.mT, u)  # (K, 1, 1)
            self.inv.baddbmm_(u, (u / denom).mT, alpha=-1)
        self.check.add_blocked(blocked)
        self._add_blocked_stats(blocked, self.layout)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        raise ValueError("the rank-one Woodbury route cannot be summed across processes; use route 'fast'")

    def inverse(
        self, damp: float | None = None, progress: Progress | None = None, max_jitter: float | None = None
    ) -> BlockFisherInverse:
        if damp is not None and damp != self.damp:
            raise ValueError(f"damp {damp} differs from the recursion's {self.damp}")
        if self.num_samples != self.expected:
            raise ValueError(f"recursion announced N={self.expected} but got {self.num_samples} gradients")
        n = self.expected
        gram = self.check.gram
        finite = torch.isfinite(frobenius_norms(gram)) & torch.isfinite(frobenius_norms(self.inv))
        if not bool(finite.all()):
            raise non_finite_error(self.layout, (~finite).nonzero().squeeze(1))
        # X − F⁻¹ = (XF − I)F⁻¹, so ‖XF − I‖ bounds X's relative error. F comes from the independent
        # Gram: a small residual means both agree (were X right and F's rounding large, the residual
        # would show that rounding instead, and the block is refused: nothing here can tell which).
        estimate = torch.empty(self.layout.num_blocks, dtype=torch.float64, device=gram.device)

        def one_slice(s: int, e: int) -> None:
            f = gram[s:e] / n
            f.diagonal(dim1=-2, dim2=-1).add_(self.damp)
            residual = torch.bmm(self.inv[s:e].double(), f.double())
            residual.diagonal(dim1=-2, dim2=-1).sub_(1.0)
            estimate[s:e] = frobenius_norms(residual)

        map_slices(one_slice, self.layout.num_blocks, INVERT_SLICE_BLOCKS)
        health = InverseHealth(damp=self.damp, rtol=self.rtol, num_blocks=self.layout.num_blocks,
                               max_error_estimate=float(estimate.max()), working_dtype=_dtype_name(self.working_dtype),
                               route="woodbury")
        if max_jitter is not None:
            health.require(max_jitter)  # the recursion cannot be repaired: a block beyond rtol is refused
        if progress is not None:
            progress("inverse", self.layout.num_blocks, self.layout.num_blocks)
        self.check = BlockGramAccumulator(self.layout, dtype=self.working_dtype, device=gram.device,
                                          track_mean=False)  # frees the Gram
        return BlockFisherInverse(self.layout, self.inv.to(self.dtype), self.damp, self.expected, health=health)


def low_rank_inverse(
    grads: Tensor, layout: BlockLayout, damp: float, dtype: torch.dtype | None = None, rtol: float = DEFAULT_RTOL
) -> BlockFisherInverse:
    """``F⁻¹ = (1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` per block from all gradients ``(N, d)`` (cheap when N < B).

    See :func:`low_rank_block_inverses` for the precision policy; `dtype` defaults to the gradients'.
    """
    dtype = dtype or grads.dtype
    lengths = [layout.block_length(k) for k in range(layout.num_blocks)]
    blocks, health = low_rank_block_inverses(layout.to_blocked(grads), lengths, damp, grads.shape[0], dtype, rtol,
                                             layout=layout)
    return BlockFisherInverse(layout, blocks, damp, grads.shape[0], health=health)


def low_rank_block_inverses(
    rows: Tensor,
    lengths: Sequence[int],
    damp: float,
    num_samples: int,
    dtype: torch.dtype = torch.float64,
    rtol: float = DEFAULT_RTOL,
    layout: BlockLayout | None = None,
) -> tuple[Tensor, InverseHealth]:
    """Inverse blocks of ``λI + AᵀA/N`` from block-major rows ``A: (K, n, B)`` (zero-padded), N = `num_samples`.

    The formula ``(1/λ)(I − Aᵀ(NλI + AAᵀ)⁻¹A)`` suits blocks with fewer rows than real weights (n < r,
    `lengths` gives r per block): there ``F`` has the eigenvalue λ and the cancellation in
    ``I − Aᵀ(…)⁻¹A`` costs ~u·‖AᵀA/N‖/λ relative to ‖F⁻¹‖ = 1/λ. With n ≥ r it would cost ~u·κ² (no
    λ-eigenvalue to measure against), so such blocks (e.g. a layer's short last block) are inverted from
    their Gram like the fast route. Blocks `dtype` cannot hold to `rtol` are computed in float64, and
    blocks even float64 cannot hold get jitter on the explicit ``F``; the returned health records it.
    Never raises a raw linear-algebra error; NaN/Inf rows raise
    :class:`~wf_pipeline.fisher.conditioning.FisherStatisticsError`.
    """
    K, n, B = rows.shape
    finite = torch.isfinite(rows).flatten(1).all(1)
    if not bool(finite.all()):
        bad = (~finite).nonzero().squeeze(1)
        if layout is not None:
            raise non_finite_error(layout, bad)
        raise FisherStatisticsError(f"the Fisher gradients contain NaN or Inf in {bad.numel()} of {K} blocks",
                                    hint="a gradient is NaN/Inf or too large for float32")
    out = torch.empty(K, B, B, dtype=dtype, device=rows.device)
    # ‖AᵀA‖_F = ‖AAᵀ‖_F: each block's scale from the small n×n Gram, in float64
    gram_norm = frobenius_norms(torch.bmm(rows.double(), rows.double().mT)) / num_samples
    u_low = unit_roundoff(dtype)
    high = ERROR_CONSTANT * u_low * (gram_norm + damp) / damp > rtol / SAFETY
    high &= u_low > unit_roundoff(torch.float64)
    by_formula = torch.tensor(list(lengths), device=rows.device) > n
    stats: list[dict[str, Any]] = []

    def formula_slice(ids: Tensor, work: torch.dtype) -> Callable[[int, int], None]:
        def run(s: int, e: int) -> None:
            idx = ids[s:e]
            a = rows[idx].to(work)  # (k, n, B)
            eye_n = torch.eye(n, dtype=work, device=a.device)
            chol, info = torch.linalg.cholesky_ex(torch.bmm(a, a.mT) + (num_samples * damp) * eye_n)
            inv = (torch.eye(B, dtype=work, device=a.device) - torch.bmm(a.mT, torch.cholesky_solve(a, chol))) / damp
            perturbation = ERROR_CONSTANT * unit_roundoff(work) * math.sqrt(n + 1) * (gram_norm[idx] + damp)
            estimate = perturbation / damp  # λ_min(F) = λ exactly here (n < r)
            jitters: list[float] = []
            retried = 0
            for pos in ((info != 0) | (estimate > rtol)).nonzero().squeeze(1).tolist():
                g = rows[int(idx[pos])].double()
                f64 = g.mT @ g / num_samples + damp * torch.eye(B, dtype=torch.float64, device=g.device)
                jitter, inv64 = jittered_inverse(f64, damp, float(perturbation[pos]), rtol)
                inv[pos] = inv64.to(work)
                estimate[pos] = float(perturbation[pos]) / (damp + jitter)
                if jitter > 0:
                    jitters.append(jitter / damp)
                else:
                    retried += 1
            out[idx] = inv.to(dtype)
            stats.append({"retried": retried, "jittered": len(jitters), "max_jitter": max(jitters, default=0.0),
                          "max_error": float(estimate.max())})
        return run

    def gram_slice(ids: Tensor, work: torch.dtype) -> Callable[[int, int], None]:
        def run(s: int, e: int) -> None:
            idx = ids[s:e]
            a = rows[idx].to(work)
            mats = torch.bmm(a.mT, a).div_(num_samples)
            mats.diagonal(dim1=-2, dim2=-1).add_(damp)
            perturbation = ERROR_CONSTANT * unit_roundoff(work) * (math.sqrt(2) * gram_norm[idx] + damp)
            stats.append(invert_checked_(mats, damp, perturbation, rtol))
            out[idx] = mats.to(dtype)
        return run

    ids = torch.arange(K, device=rows.device)
    for kind, make in ((by_formula, formula_slice), (~by_formula, gram_slice)):
        for group, work in ((kind & ~high, dtype), (kind & high, torch.float64)):
            members = ids[group]
            if members.numel():
                map_slices(make(members, work), members.numel(), INVERT_SLICE_BLOCKS)
    health = InverseHealth(
        damp=float(damp), rtol=rtol, num_blocks=K, promoted_blocks=int(high.sum()),
        retried_blocks=sum(s["retried"] for s in stats), jittered_blocks=sum(s["jittered"] for s in stats),
        max_jitter=max((s["max_jitter"] for s in stats), default=0.0),
        max_error_estimate=max((s["max_error"] for s in stats), default=0.0), working_dtype=_dtype_name(dtype),
        route="lowrank",
    )
    return out, health


class DiagonalAccumulator(_StatisticsMixin):
    """Σ g² per weight (the diagonal Fisher baseline)."""

    def __init__(self, dim: int, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> None:
        self.dtype = dtype
        self.sq_sum = torch.zeros(dim, dtype=dtype, device=device)
        self._init_stats(dim, dtype, device)

    def add(self, chunk: Tensor) -> None:
        """Fold in gradient rows ``(n, d)``."""
        chunk = chunk.to(dtype=self.dtype, device=self.sq_sum.device)
        self.sq_sum += chunk.square().sum(0)
        self._add_stats(chunk)

    def reduce(self, reduce_fn: ReduceFn) -> None:
        for stat in (self.sq_sum, self.grad_sum, self.count):
            reduce_fn(stat)

    def fisher_diag(self, damp: float) -> Tensor:
        """``damp + mean g²`` per weight; NaN/Inf statistics raise instead of scoring with them."""
        if self.num_samples == 0:
            raise ValueError("no gradients accumulated")
        diag = damp + self.sq_sum / self.num_samples
        bad = ~torch.isfinite(diag)
        if bool(bad.any()):
            raise FisherStatisticsError(
                f"the diagonal Fisher statistics contain NaN or Inf for {int(bad.sum())} of {diag.numel()} weights",
                hint="a gradient is NaN/Inf or too large for float32: check the model's weights and the Fisher data "
                     "for non-finite values",
            )
        return diag
