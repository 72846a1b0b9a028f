"""Collecting Fisher statistics: stream per-sample gradients of the selected weights into an accumulator.

Used by the diagonal Fisher (the block inverse collects its own: :mod:`wf_pipeline.fisher.engine`). The
gradient count is summed across processes first (so each rank normalises by the total N), every chunk is
folded into the accumulator as it is produced (no N×d buffer), and the statistics are summed across
processes at the end.
"""
from __future__ import annotations

import time
from typing import Protocol

import torch
from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.gradients import GradientStats, fold_timed, iter_gradient_chunks
from wf_pipeline.pruning.pruners.base import PruneView, ReduceFn, StepContext
from wf_pipeline.pruning.settings import PruneSettings


class Accumulator(Protocol):
    count: Tensor

    @property
    def num_samples(self) -> int: ...

    def add(self, chunk: Tensor) -> None: ...

    def reduce(self, reduce_fn: ReduceFn) -> None: ...


def total_gradient_count(settings: PruneSettings, reduce_fn: ReduceFn | None, device: torch.device) -> int:
    """N over all processes: this rank's ``num_grads`` summed with `reduce_fn` (all ranks must call it)."""
    if reduce_fn is None:
        return settings.num_grads
    count = torch.tensor(float(settings.num_grads), dtype=torch.float64, device=device)
    reduce_fn(count)
    return int(round(float(count)))


def accumulate_gradients(acc: Accumulator, view: PruneView, ctx: StepContext, settings: PruneSettings) -> None:
    """Fold ``settings.num_grads`` flat gradient rows into `acc`, then sum it across processes.

    Time goes to ``gradients`` (computing them) and ``accumulate`` + ``inverse`` (folding them in). (The
    block-diagonal Fisher collects its own: :mod:`wf_pipeline.fisher.engine`.)
    """
    if ctx.batches is None:
        raise WFError("this pruning method needs Fisher data", hint="pass `batches` (the Fisher pool) to prune_step")
    stats = GradientStats()
    chunks = iter_gradient_chunks(
        ctx.model,
        view.params,
        ctx.batches,
        num_grads=settings.num_grads,
        grad_batch_size=settings.grad_batch_size,
        chunk_size=settings.chunk_size,
        loss_fn=ctx.loss_fn,
        masks=view.masks.masks,
        fisher_type=settings.fisher_type,
        generator=ctx.generator,
        progress=ctx.progress,
        nonfinite=settings.nonfinite,
        stats=stats,
        reuse_output=True,  # each chunk is folded in before the next is computed
    )
    fold_timed(chunks, acc.add, ctx.add_time, ("inverse", "accumulate"))
    ctx.details.gradient_engine = stats.engine
    ctx.details.add_skipped(stats.skipped)
    if ctx.reduce_fn is not None:
        t0 = time.perf_counter()
        acc.reduce(ctx.reduce_fn)
        ctx.add_time("inverse", time.perf_counter() - t0)
