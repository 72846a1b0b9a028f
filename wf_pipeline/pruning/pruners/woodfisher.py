"""WoodFisher and WoodTaylor: OBS pruning with a block-diagonal inverse of the empirical Fisher.

Statistics are the block inverse ``F⁻¹`` (and, for WoodTaylor, the mean gradient ḡ); the maths of the
scores and of the exact joint update lives in :mod:`wf_pipeline.pruning.obs`.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.inverse import (
    BlockFisherInverse,
    BlockGramAccumulator,
    BlockLayout,
    WoodburyAccumulator,
    accumulation_dtype,
)
from wf_pipeline.pruning.obs import obs_scores, obs_update, woodtaylor_scores
from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.statistics import accumulate_gradients, total_gradient_count


@dataclass
class InverseFisherStats:
    inverse: BlockFisherInverse
    grad_mean: Tensor | None = None  # WoodTaylor's first-order term, in the inverse's dtype


class WoodFisherPruner(FlatPruner[InverseFisherStats]):
    """OBS with ``ρ_q = w_q² / (2 [F⁻¹]_qq)`` and the exact joint (or the paper's summed) update."""

    name = "woodfisher"
    needs_gradients = True
    uses_gradient_mean = False

    def collect(self, view: PruneView, ctx: StepContext) -> InverseFisherStats:
        settings = self.settings
        if ctx.reduce_fn is not None and settings.route == "woodbury":
            raise WFError(
                "pruning.woodfisher.route 'woodbury' cannot sum Fisher statistics across processes",
                hint="use route: fast for multi-process runs (both routes build the same inverse)",
            )
        layout = BlockLayout(view.sizes, settings.block_size)
        total = total_gradient_count(settings, ctx.reduce_fn, view.device)
        acc: BlockGramAccumulator | WoodburyAccumulator
        if settings.route == "woodbury":
            acc = WoodburyAccumulator(layout, settings.damp, total, dtype=settings.torch_dtype, device=view.device)
        else:
            dtype = accumulation_dtype(total, layout.block_size, settings.torch_dtype)
            acc = BlockGramAccumulator(layout, dtype=dtype, device=view.device)
        accumulate_gradients(acc, view, ctx, settings, layout=layout)
        ctx.num_grads += acc.num_samples  # summed over ranks
        t0 = time.perf_counter()
        inverse = acc.inverse(settings.damp, progress=ctx.progress)
        ctx.add_time("inverse", time.perf_counter() - t0)
        dtype = inverse.blocks.dtype
        grad_mean = acc.mean_gradient().to(dtype) if self.uses_gradient_mean else None
        ctx.extra["fisher_dtype"] = str(dtype).replace("torch.", "")
        ctx.extra["repaired_blocks"] = ctx.extra.get("repaired_blocks", 0) + inverse.repaired_blocks
        ctx.extra["num_blocks"] = layout.num_blocks
        ctx.extra["route"] = settings.route
        return InverseFisherStats(inverse, grad_mean)

    def score(self, view: PruneView, stats: InverseFisherStats) -> Tensor:
        weights = view.flat_weights(stats.inverse.blocks.dtype)
        return obs_scores(weights, stats.inverse.diag())

    def update(self, view: PruneView, stats: InverseFisherStats, chosen: Tensor) -> Update:
        pruned = ~view.flat_kept() | chosen
        weights = view.flat_weights(stats.inverse.blocks.dtype)
        updated, predicted = obs_update(stats.inverse, weights, pruned, update=self.settings.update,
                                        grad_mean=stats.grad_mean)
        view.write_back(~pruned, updated)
        return Update(predicted_loss_increase=predicted)


class WoodTaylorPruner(WoodFisherPruner):
    """WoodFisher plus the first-order term: scores ``(w − F⁻¹ḡ)_q² / (2 [F⁻¹]_qq)`` and the Newton step."""

    name = "woodtaylor"
    uses_gradient_mean = True

    def score(self, view: PruneView, stats: InverseFisherStats) -> Tensor:
        assert stats.grad_mean is not None
        inverse = stats.inverse
        weights = view.flat_weights(inverse.blocks.dtype)
        return woodtaylor_scores(weights, inverse.diag(), inverse.matvec(stats.grad_mean))

