"""The Fisher object pruners talk to: the block-diagonal inverse ``F⁻¹`` of one (sub-)step, however it is stored.

A pruner asks it for the diagonal ``[F⁻¹]_qq``, products ``F⁻¹v``, the Newton step ``F⁻¹ḡ`` (WoodTaylor), the
inverse blocks slice by slice (the OBS update), and the :class:`~wf_pipeline.fisher.plan.FisherPlan` it was built
under; in the manner of SparseML's ``EmpiricalBlockFisherInverse`` (``diag``, ``mul``). How the blocks are held is
its own business, decided by the plan (:func:`build_fisher`):

* in memory (:class:`InMemoryFisher`): one gradient pass folded into Gram blocks accumulated in segments, blocks
  float32 cannot hold promoted to float64 (:mod:`wf_pipeline.fisher.segmented`), inverted in place; or the
  rank-one Woodbury recursion (``route: woodbury``, a slow reference, always in float64);
* streamed (:class:`StreamedFisher`): block groups streamed through the budget, spilled to disk or recomputed,
  with the per-weight vectors kept (:mod:`wf_pipeline.fisher.streamed`).

Both prune the same weights: each streamed group sees the same gradient chunks in the same order as the in-memory
blocks (tests/test_streamed_fisher.py and tests/test_memory_budget.py hold them to float32 rounding).
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.conditioning import InverseHealth
from wf_pipeline.fisher.gradients import GradientStats, fold_timed, iter_gradient_chunks
from wf_pipeline.fisher.inverse import BlockFisherInverse, WoodburyAccumulator, accumulation_dtype
from wf_pipeline.fisher.layout import BlockLayout
from wf_pipeline.fisher.plan import FisherPlan
from wf_pipeline.fisher.segmented import SegmentedGramAccumulator
from wf_pipeline.fisher.streamed import FisherJob, GroupedInverse, collect_grouped_inverse

ROUTES = ("fast", "woodbury")


class FisherInverse(ABC):
    """``F⁻¹`` of one step: diagonal, products, Newton step and blocks; close it (or use ``with``) when done."""

    plan: FisherPlan
    grad_mean: Tensor | None  # ḡ in :attr:`dtype` (WoodTaylor only)
    timings: dict[str, float]  # seconds per engine phase (revisits at the update add theirs)

    @property
    @abstractmethod
    def dtype(self) -> torch.dtype: ...

    @property
    @abstractmethod
    def num_samples(self) -> int:
        """Gradients in the statistics (all processes)."""

    @property
    @abstractmethod
    def health(self) -> InverseHealth | None:
        """Promotions to float64 and repairs (None: nothing to report)."""

    @abstractmethod
    def diag(self) -> Tensor:
        """``[F⁻¹]_qq`` for every weight, flat ``(d,)``."""

    @abstractmethod
    def newton(self) -> Tensor:
        """``F⁻¹ḡ`` (the Newton step; built with the mean gradient only)."""

    @abstractmethod
    def inverse_slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]:
        """``(lo, hi, inverse)`` over consecutive weight ranges covering every weight; drop each before the next."""

    def matvec(self, v: Tensor) -> Tensor:
        """``F⁻¹v`` for a flat ``v`` (a streamed inverse revisits its groups: before the update only)."""
        out = torch.empty_like(v)
        for lo, hi, inverse in self.inverse_slices():
            out[lo:hi] = inverse.matvec(v[lo:hi])
            del inverse
        return out

    @abstractmethod
    def close(self) -> None:
        """Let go of what lives outside memory (spill files)."""

    def __enter__(self) -> FisherInverse:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class InMemoryFisher(FisherInverse):
    """Every inverse block in one tensor."""

    def __init__(self, inverse: BlockFisherInverse, plan: FisherPlan, grad_mean: Tensor | None = None,
                 timings: dict[str, float] | None = None) -> None:
        self.inverse, self.plan, self.grad_mean = inverse, plan, grad_mean
        self.timings = {} if timings is None else timings
        self._newton: Tensor | None = None

    @property
    def dtype(self) -> torch.dtype:
        return self.inverse.blocks.dtype

    @property
    def num_samples(self) -> int:
        return self.inverse.num_samples

    @property
    def health(self) -> InverseHealth:
        return self.inverse.health

    def diag(self) -> Tensor:
        return self.inverse.diag()

    def newton(self) -> Tensor:
        if self._newton is None:
            if self.grad_mean is None:
                raise ValueError("this Fisher was built without the mean gradient")
            self._newton = self.inverse.matvec(self.grad_mean)
        return self._newton

    def matvec(self, v: Tensor) -> Tensor:
        return self.inverse.matvec(v)

    def inverse_slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]:
        yield 0, self.inverse.dim, self.inverse

    def close(self) -> None:
        return None  # nothing outside memory


class StreamedFisher(FisherInverse):
    """Per-weight vectors kept; the blocks revisited group by group (read back from disk or recomputed)."""

    def __init__(self, grouped: GroupedInverse) -> None:
        self.grouped, self.plan, self.grad_mean = grouped, grouped.plan, grouped.grad_mean
        self.timings = grouped.job.timings

    @property
    def dtype(self) -> torch.dtype:
        return self.grouped.dtype

    @property
    def num_samples(self) -> int:
        return self.grouped.num_samples

    @property
    def health(self) -> InverseHealth | None:
        return self.grouped.health

    def diag(self) -> Tensor:
        return self.grouped.diag

    def newton(self) -> Tensor:
        if self.grouped.newton is None:
            raise ValueError("this Fisher was built without the mean gradient")
        return self.grouped.newton

    def inverse_slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]:
        return self.grouped.inverse_slices()

    def close(self) -> None:
        self.grouped.close()


def statistics_dtype(route: str, num_grads: int, block_size: int, dtype: torch.dtype) -> torch.dtype:
    """The Gram precision of a step: the recipe's, or float64 for rank-deficient fast blocks (N < B in float32)."""
    return dtype if route == "woodbury" else accumulation_dtype(num_grads, block_size, dtype)


def check_route(route: str, distributed: bool) -> None:
    """Refuse, before any work, a route that cannot run here."""
    if route not in ROUTES:
        raise ValueError(f"unknown route {route!r}; expected one of {ROUTES}")
    if distributed and route == "woodbury":
        raise WFError(
            "pruning.woodfisher.route 'woodbury' cannot sum Fisher statistics across processes",
            hint="use route: fast for multi-process runs (both routes build the same inverse)",
        )


def build_fisher(job: FisherJob, plan: FisherPlan, *, route: str = "fast", with_grad_mean: bool = False,
                 max_jitter: float | None = None) -> FisherInverse:
    """Collect the statistics the way `plan` says and invert them (timings go to ``job.timings``).

    A repair beyond ``max_jitter · damp`` raises :class:`~wf_pipeline.fisher.conditioning.FisherAccuracyError`.
    """
    check_route(route, job.reduce_fn is not None)
    if plan.streamed or plan.representation != "gram":
        if route == "woodbury":
            raise WFError(
                f"pruning.woodfisher.route 'woodbury' keeps every block in memory, which does not fit the budget "
                f"({plan.summary()})",
                hint="use route: fast (the same inverse, streamed through the budget) or raise memory_budget_gb",
            )
        grouped = collect_grouped_inverse(job, plan, with_grad_mean=with_grad_mean)
        if grouped.health is not None and max_jitter is not None:
            try:
                grouped.health.require(max_jitter)
            except BaseException:
                grouped.close()
                raise
        return StreamedFisher(grouped)
    return _in_memory(job, plan, route, with_grad_mean, max_jitter)


def _in_memory(job: FisherJob, plan: FisherPlan, route: str, with_grad_mean: bool,
               max_jitter: float | None) -> InMemoryFisher:
    layout = BlockLayout([p.numel() for p in job.params.values()], job.block_size)
    device = next(iter(job.params.values())).device
    acc: SegmentedGramAccumulator | WoodburyAccumulator
    if route == "woodbury":  # the recursion is unstable in float32: always run it in float64
        acc = WoodburyAccumulator(layout, job.damp, job.num_grads, dtype=job.stat_dtype, device=device,
                                  working_dtype=torch.float64, rtol=job.rtol)
    else:  # blocks float32 cannot hold to rtol are accumulated in float64 (segments: a planned bound)
        acc = SegmentedGramAccumulator(layout, dtype=job.stat_dtype, device=device, damp=job.damp, rtol=job.rtol,
                                       track_mean=with_grad_mean, blocks_per_segment=plan.segment_blocks or None)
    stats = GradientStats()
    chunks = iter_gradient_chunks(
        job.model, job.params, job.batches, num_grads=job.num_grads, grad_batch_size=job.grad_batch_size,
        chunk_size=plan.chunk_size, loss_fn=job.loss_fn, masks=job.masks, fisher_type=job.fisher_type,
        generator=job.generator, progress=job.progress, layout=layout, nonfinite=job.nonfinite, stats=stats,
        reuse_output=True,  # each chunk is folded in before the next is computed
    )
    fold_timed(chunks, acc.add_blocked, job.add_time, ("accumulate",))
    job.engine, job.skipped = stats.engine, job.skipped + stats.skipped
    t0 = time.perf_counter()
    if job.reduce_fn is not None:
        acc.reduce(job.reduce_fn)
    inverse = acc.inverse(job.damp, progress=job.progress, max_jitter=max_jitter)
    job.add_time("inverse", time.perf_counter() - t0)
    grad_mean = acc.mean_gradient().to(inverse.blocks.dtype) if with_grad_mean else None
    return InMemoryFisher(inverse, plan, grad_mean, job.timings)
