"""Diagonal-Fisher pruning (baseline): ``ρ_q = ½ w_q² (λ + mean g_q²)``, no weight update."""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from wf_pipeline.fisher.inverse import DiagonalAccumulator
from wf_pipeline.pruning.obs import diag_fisher_scores
from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.statistics import accumulate_gradients, total_gradient_count


@dataclass
class DiagonalStats:
    fisher_diag: Tensor  # λ + mean g² per weight
    scores: Tensor | None = None


class DiagonalFisherPruner(FlatPruner[DiagonalStats]):
    name = "diag_fisher"
    needs_gradients = True

    def collect(self, view: PruneView, ctx: StepContext) -> DiagonalStats:
        settings = self.settings
        total_gradient_count(settings, ctx.reduce_fn, view.device)  # every rank joins the same collectives
        acc = DiagonalAccumulator(sum(view.sizes), dtype=settings.torch_dtype, device=view.device)
        accumulate_gradients(acc, view, ctx, settings)
        ctx.num_grads += acc.num_samples  # summed over ranks
        ctx.details.route = "diagonal"
        return DiagonalStats(acc.fisher_diag(settings.damp))

    def score(self, view: PruneView, stats: DiagonalStats) -> Tensor:
        stats.scores = diag_fisher_scores(view.flat_weights(stats.fisher_diag.dtype), stats.fisher_diag)
        return stats.scores

    def update(self, view: PruneView, stats: DiagonalStats, chosen: Tensor) -> Update:
        view.write_back(view.flat_kept() & ~chosen)
        assert stats.scores is not None
        return Update(predicted_loss_increase=float(stats.scores[chosen].sum()))
