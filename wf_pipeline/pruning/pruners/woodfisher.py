"""WoodFisher and WoodTaylor: OBS pruning with a block-diagonal inverse of the empirical Fisher.

Statistics are the inverse Fisher ``F⁻¹`` of the step (one object, however it is stored:
:mod:`wf_pipeline.fisher.engine`, planned within ``pruning.woodfisher.memory_budget_gb`` by
:mod:`wf_pipeline.pruning.pruners.fisher_step`); the maths of the scores and of the exact joint update
lives in :mod:`wf_pipeline.pruning.obs`. The update takes the inverse slice by slice (it is block-local).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from wf_pipeline.fisher.engine import FisherInverse
from wf_pipeline.pruning.obs import newton_step_scale, obs_scores, obs_update_sliced, woodtaylor_scores
from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.fisher_step import booked, collect_fisher


@dataclass
class InverseFisherStats:
    fisher: FisherInverse
    ctx: StepContext  # the update's revisits book their time here
    newton_scale: Tensor | None = None  # WoodTaylor: per-weight η capping the Newton step (see obs.py)


class WoodFisherPruner(FlatPruner[InverseFisherStats]):
    """OBS with ``ρ_q = w_q² / (2 [F⁻¹]_qq)`` and the exact joint (or the paper's summed) update."""

    name = "woodfisher"
    needs_gradients = True
    uses_gradient_mean = False

    def collect(self, view: PruneView, ctx: StepContext) -> InverseFisherStats:
        fisher = collect_fisher(view, ctx, self.settings, with_grad_mean=self.uses_gradient_mean)
        scale = None
        if self.uses_gradient_mean:
            scale = newton_step_scale(fisher.newton(), view.flat_weights(fisher.dtype), view.sizes,
                                      self.settings.newton_step_cap)
        return InverseFisherStats(fisher, ctx, scale)

    def score(self, view: PruneView, stats: InverseFisherStats) -> Tensor:
        return obs_scores(view.flat_weights(stats.fisher.dtype), stats.fisher.diag())

    def update(self, view: PruneView, stats: InverseFisherStats, chosen: Tensor) -> Update:
        pruned = ~view.flat_kept() | chosen
        fisher = stats.fisher
        with fisher, booked(fisher.timings, stats.ctx, outside_obs=True):
            updated, predicted = obs_update_sliced(fisher, view.flat_weights(fisher.dtype), pruned,
                                                   update=self.settings.update, newton_scale=stats.newton_scale)
        view.write_back(~pruned, updated)
        return Update(predicted_loss_increase=predicted)


class WoodTaylorPruner(WoodFisherPruner):
    """WoodFisher plus the first-order term: scores ``(w − F⁻¹ḡ)_q² / (2 [F⁻¹]_qq)`` and the Newton step."""

    name = "woodtaylor"
    uses_gradient_mean = True

    def score(self, view: PruneView, stats: InverseFisherStats) -> Tensor:
        assert stats.newton_scale is not None
        fisher = stats.fisher
        return woodtaylor_scores(view.flat_weights(fisher.dtype), fisher.diag(), fisher.newton() * stats.newton_scale)
