"""The WoodFisher pruners' memory plan: make it, record it, and collect statistics the way it says.

Every WoodFisher/WoodTaylor (sub-)step plans first (:mod:`wf_pipeline.fisher.plan`) within
``pruning.woodfisher.memory_budget_gb`` (default: half the memory available when the step starts). A
plan that keeps one group of Gram blocks in memory runs the in-memory route unchanged; any other plan
(low-rank rows, or several groups streamed through the budget) runs :mod:`wf_pipeline.fisher.streamed`.
The plan goes to the step's report (``extra["fisher_plan"]``, one-line ``extra["fisher_plan_summary"]``).
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.conditioning import record_health
from wf_pipeline.fisher.plan import FisherPlan, default_budget_bytes
from wf_pipeline.fisher.streamed import FisherJob, GroupedInverse, collect_grouped_inverse, plan_fisher_step
from wf_pipeline.pruning.pruners.base import PruneView, StepContext
from wf_pipeline.pruning.settings import PruneSettings

# Engine phases booked into the step's timings (the step's convention: "inverse" includes "accumulate").
_PHASES = {"gradients": ("gradients",), "accumulate": ("accumulate", "inverse"), "inverse": ("inverse",),
           "spill": ("spill",)}


def budget_bytes(settings: PruneSettings, device: torch.device) -> int:
    if settings.memory_budget_gb is not None:
        return int(settings.memory_budget_gb * 1e9)
    return default_budget_bytes(str(device))


def make_job(view: PruneView, ctx: StepContext, settings: PruneSettings, stat_dtype: torch.dtype) -> FisherJob:
    if ctx.batches is None:
        raise WFError("this pruning method needs Fisher data", hint="pass `batches` (the Fisher pool) to prune_step")
    return FisherJob(
        model=ctx.model, params=view.params, masks=view.masks.masks, batches=ctx.batches,
        num_grads=settings.num_grads, block_size=settings.block_size, damp=settings.damp, stat_dtype=stat_dtype,
        rtol=settings.inverse_rtol,
        grad_batch_size=settings.grad_batch_size, fisher_type=settings.fisher_type, loss_fn=ctx.loss_fn,
        generator=ctx.generator, progress=ctx.progress, reduce_fn=ctx.reduce_fn, nonfinite=settings.nonfinite,
    )


def plan_step(view: PruneView, ctx: StepContext, settings: PruneSettings, job: FisherJob, *,
              vectors: int, allow_lowrank: bool = True) -> FisherPlan:
    """Plan within the budget, record the plan, and let the step's data replay the probe's batch."""
    plan = plan_fisher_step(job, budget_bytes(settings, view.device), max_chunk=settings.chunk_size, vectors=vectors,
                            spill_root=ctx.spill_dir, allow_lowrank=allow_lowrank)
    ctx.batches = job.batches  # the probe drew the first batch; the wrapper replays it
    ctx.extra["fisher_plan"] = {k: v for k, v in plan.to_dict().items() if k != "groups"} | {"groups": len(plan.groups)}
    ctx.extra["fisher_plan_summary"] = plan.summary()
    return plan


@contextmanager
def booked(job: FisherJob, ctx: StepContext, *, outside_obs: bool = False) -> Iterator[None]:
    """Move the engine's timings into the step's; with `outside_obs`, take them out of the step's obs time."""
    before = dict(job.timings)
    try:
        yield
    finally:
        moved = 0.0
        for phase, targets in _PHASES.items():
            seconds = job.timings.get(phase, 0.0) - before.get(phase, 0.0)
            if seconds:
                for target in targets:
                    ctx.add_time(target, seconds)
                moved += seconds
        if outside_obs and moved:
            # The update revisits groups inside the step's obs timer: its gradient passes and disk reads
            # are booked under their own phases, so obs keeps the OBS arithmetic alone.
            ctx.add_time("obs", -moved)


def collect_streamed(job: FisherJob, plan: FisherPlan, ctx: StepContext, *, with_grad_mean: bool) -> GroupedInverse:
    with booked(job, ctx):
        grouped = collect_grouped_inverse(job, plan, with_grad_mean=with_grad_mean)
    ctx.num_grads += grouped.num_samples
    ctx.extra["gradient_engine"] = job.engine
    if job.skipped:
        ctx.extra["nonfinite_skipped"] = ctx.extra.get("nonfinite_skipped", 0) + job.skipped
    ctx.extra["fisher_dtype"] = str(grouped.dtype).replace("torch.", "")
    if grouped.health is not None:  # promotions and repairs: counts, jitter, warning lines
        record_health(ctx.extra, grouped.health)
    return grouped
