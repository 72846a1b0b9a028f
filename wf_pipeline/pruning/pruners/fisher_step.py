"""The WoodFisher pruners' Fisher: plan it within the step's memory budget, build it, and book what it did.

Every WoodFisher/WoodTaylor (sub-)step plans first (:mod:`wf_pipeline.fisher.plan`) within
``pruning.woodfisher.memory_budget_gb`` (default: half the memory available when the step starts), then
builds the one Fisher object the pruner talks to (:func:`wf_pipeline.fisher.engine.build_fisher`; how it is
stored is the plan's business). The plan goes to the step's report (``details.fisher_plan``, one-line
``details.fisher_plan_summary``), with the gradient engine, the statistics' dtype and the inverse's health.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.engine import FisherInverse, build_fisher, check_route, statistics_dtype
from wf_pipeline.fisher.layout import BlockLayout
from wf_pipeline.fisher.plan import FisherPlan, default_budget_bytes
from wf_pipeline.fisher.streamed import FisherJob, plan_fisher_step
from wf_pipeline.pruning.pruners.base import PruneView, StepContext
from wf_pipeline.pruning.pruners.statistics import total_gradient_count
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
    ctx.details.fisher_plan = {k: v for k, v in plan.to_dict().items() if k != "groups"} | {"groups": len(plan.groups)}
    ctx.details.fisher_plan_summary = plan.summary()
    return plan


def collect_fisher(view: PruneView, ctx: StepContext, settings: PruneSettings, *,
                   with_grad_mean: bool) -> FisherInverse:
    """The step's inverse Fisher of the view's weights, planned within the budget; its record in ``ctx``."""
    route = settings.route
    check_route(route, distributed=ctx.reduce_fn is not None)
    total = total_gradient_count(settings, ctx.reduce_fn, view.device)
    job = make_job(view, ctx, settings, statistics_dtype(route, total, settings.block_size, settings.torch_dtype))
    plan = plan_step(view, ctx, settings, job, vectors=3 if with_grad_mean else 1,
                     allow_lowrank=route != "woodbury")  # the recursion has no low-rank form
    ctx.details.num_blocks = BlockLayout(view.sizes, settings.block_size).num_blocks
    ctx.details.route = route
    with booked(job.timings, ctx):
        fisher = build_fisher(job, plan, route=route, with_grad_mean=with_grad_mean,
                              max_jitter=settings.max_repair_jitter)
    ctx.num_grads += fisher.num_samples  # summed over ranks
    ctx.details.gradient_engine = job.engine
    ctx.details.add_skipped(job.skipped)
    ctx.details.fisher_dtype = str(fisher.dtype).replace("torch.", "")
    if fisher.health is not None:  # promotions and repairs: counts, jitter, warning lines
        ctx.details.record_health(fisher.health)
    return fisher


@contextmanager
def booked(timings: dict[str, float], ctx: StepContext, *, outside_obs: bool = False) -> Iterator[None]:
    """Move what the Fisher engine adds to `timings` into the step's; with `outside_obs`, take it out of obs."""
    before = dict(timings)
    try:
        yield
    finally:
        moved = 0.0
        for phase, targets in _PHASES.items():
            seconds = timings.get(phase, 0.0) - before.get(phase, 0.0)
            if seconds:
                for target in targets:
                    ctx.add_time(target, seconds)
                moved += seconds
        if outside_obs and moved:
            # The update revisits groups inside the step's obs timer: its gradient passes and disk reads
            # are booked under their own phases, so obs keeps the OBS arithmetic alone.
            ctx.add_time("obs", -moved)
