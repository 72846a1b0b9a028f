"""WoodFisher and WoodTaylor: OBS pruning with a block-diagonal inverse of the empirical Fisher.

Statistics are the block inverse ``F⁻¹`` (and, for WoodTaylor, the mean gradient ḡ); the maths of the
scores and of the exact joint update lives in :mod:`wf_pipeline.pruning.obs`. Each collection is planned
within ``pruning.woodfisher.memory_budget_gb`` first (:mod:`wf_pipeline.pruning.pruners.planned`): when the
whole inverse does not fit, its blocks are streamed through the budget in groups, scores use the kept
diagonal, and the update revisits the groups (the same weights and updates as in memory).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.conditioning import record_health
from wf_pipeline.fisher.inverse import BlockFisherInverse, BlockLayout, WoodburyAccumulator, accumulation_dtype
from wf_pipeline.fisher.segmented import SegmentedGramAccumulator
from wf_pipeline.fisher.streamed import GroupedInverse
from wf_pipeline.pruning.obs import (
    newton_step_scale,
    obs_scores,
    obs_update,
    obs_update_grouped,
    woodtaylor_scores,
)
from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.planned import booked, collect_streamed, make_job, plan_step
from wf_pipeline.pruning.pruners.statistics import accumulate_gradients, total_gradient_count


@dataclass
class InverseFisherStats:
    inverse: BlockFisherInverse
    grad_mean: Tensor | None = None  # WoodTaylor's first-order term, in the inverse's dtype
    newton_scale: Tensor | None = None  # WoodTaylor: per-weight η capping the Newton step (see obs.py)


@dataclass
class StreamedFisherStats:
    """A planned collection that did not keep the whole inverse: per-weight vectors, groups revisited at update."""

    grouped: GroupedInverse
    ctx: StepContext  # the update's revisits book their time here
    newton_scale: Tensor | None = None  # WoodTaylor: per-weight η capping the Newton step (see obs.py)


Stats = InverseFisherStats | StreamedFisherStats


class WoodFisherPruner(FlatPruner[Stats]):
    """OBS with ``ρ_q = w_q² / (2 [F⁻¹]_qq)`` and the exact joint (or the paper's summed) update."""

    name = "woodfisher"
    needs_gradients = True
    uses_gradient_mean = False

    def collect(self, view: PruneView, ctx: StepContext) -> Stats:
        settings = self.settings
        if ctx.reduce_fn is not None and settings.route == "woodbury":
            raise WFError(
                "pruning.woodfisher.route 'woodbury' cannot sum Fisher statistics across processes",
                hint="use route: fast for multi-process runs (both routes build the same inverse)",
            )
        layout = BlockLayout(view.sizes, settings.block_size)
        total = total_gradient_count(settings, ctx.reduce_fn, view.device)
        woodbury = settings.route == "woodbury"
        dtype = settings.torch_dtype if woodbury else accumulation_dtype(total, layout.block_size, settings.torch_dtype)
        job = make_job(view, ctx, settings, dtype)
        plan = plan_step(view, ctx, settings, job, vectors=3 if self.uses_gradient_mean else 1,
                         allow_lowrank=not woodbury)
        ctx.extra["num_blocks"] = layout.num_blocks
        ctx.extra["route"] = settings.route
        if plan.streamed or plan.representation != "gram":
            if woodbury:
                raise WFError(
                    f"pruning.woodfisher.route 'woodbury' keeps every block in memory, which does not fit the budget "
                    f"({plan.summary()})",
                    hint="use route: fast (the same inverse, streamed through the budget) or raise memory_budget_gb",
                )
            grouped = collect_streamed(job, plan, ctx, with_grad_mean=self.uses_gradient_mean)
            if grouped.health is not None:
                grouped.health.require(settings.max_repair_jitter)
            streamed_scale = None
            if grouped.newton is not None:
                streamed_scale = newton_step_scale(grouped.newton, view.flat_weights(grouped.dtype), view.sizes,
                                                   settings.newton_step_cap)
            return StreamedFisherStats(grouped, ctx, streamed_scale)
        acc: SegmentedGramAccumulator | WoodburyAccumulator
        if woodbury:  # the recursion is unstable in float32: always run it in float64
            acc = WoodburyAccumulator(layout, settings.damp, total, dtype=dtype, device=view.device,
                                      working_dtype=torch.float64, rtol=settings.inverse_rtol)
        else:  # blocks float32 cannot hold to inverse_rtol are accumulated in float64 (segments: a planned bound)
            acc = SegmentedGramAccumulator(layout, dtype=dtype, device=view.device, damp=settings.damp,
                                           rtol=settings.inverse_rtol, track_mean=self.uses_gradient_mean,
                                           blocks_per_segment=plan.segment_blocks or None)
        accumulate_gradients(acc, view, ctx, settings.replace(chunk_size=plan.chunk_size), layout=layout)
        ctx.num_grads += acc.num_samples  # summed over ranks
        t0 = time.perf_counter()
        inverse = acc.inverse(settings.damp, progress=ctx.progress, max_jitter=settings.max_repair_jitter)
        ctx.add_time("inverse", time.perf_counter() - t0)
        dtype = inverse.blocks.dtype
        grad_mean = acc.mean_gradient().to(dtype) if self.uses_gradient_mean else None
        scale = None
        if grad_mean is not None:
            scale = newton_step_scale(inverse.matvec(grad_mean), view.flat_weights(dtype), view.sizes,
                                      settings.newton_step_cap)
        ctx.extra["fisher_dtype"] = str(dtype).replace("torch.", "")
        record_health(ctx.extra, inverse.health)  # promotions and repairs: counts, jitter, warning lines
        return InverseFisherStats(inverse, grad_mean, scale)

    def score(self, view: PruneView, stats: Stats) -> Tensor:
        if isinstance(stats, StreamedFisherStats):
            grouped = stats.grouped
            return obs_scores(view.flat_weights(grouped.dtype), grouped.diag)
        weights = view.flat_weights(stats.inverse.blocks.dtype)
        return obs_scores(weights, stats.inverse.diag())

    def update(self, view: PruneView, stats: Stats, chosen: Tensor) -> Update:
        pruned = ~view.flat_kept() | chosen
        if isinstance(stats, StreamedFisherStats):
            grouped = stats.grouped
            with grouped, booked(grouped.job, stats.ctx, outside_obs=True):
                updated, predicted = obs_update_grouped(grouped, view.flat_weights(grouped.dtype), pruned,
                                                        update=self.settings.update,
                                                        use_grad_mean=self.uses_gradient_mean,
                                                        newton_scale=stats.newton_scale)
            view.write_back(~pruned, updated)
            return Update(predicted_loss_increase=predicted)
        weights = view.flat_weights(stats.inverse.blocks.dtype)
        updated, predicted = obs_update(stats.inverse, weights, pruned, update=self.settings.update,
                                        grad_mean=stats.grad_mean, newton_scale=stats.newton_scale)
        view.write_back(~pruned, updated)
        return Update(predicted_loss_increase=predicted)


class WoodTaylorPruner(WoodFisherPruner):
    """WoodFisher plus the first-order term: scores ``(w − F⁻¹ḡ)_q² / (2 [F⁻¹]_qq)`` and the Newton step."""

    name = "woodtaylor"
    uses_gradient_mean = True

    def score(self, view: PruneView, stats: Stats) -> Tensor:
        if isinstance(stats, StreamedFisherStats):
            grouped = stats.grouped
            assert grouped.newton is not None and stats.newton_scale is not None
            newton = grouped.newton * stats.newton_scale
            return woodtaylor_scores(view.flat_weights(grouped.dtype), grouped.diag, newton)
        assert stats.grad_mean is not None and stats.newton_scale is not None
        inverse = stats.inverse
        weights = view.flat_weights(inverse.blocks.dtype)
        return woodtaylor_scores(weights, inverse.diag(), inverse.matvec(stats.grad_mean) * stats.newton_scale)

