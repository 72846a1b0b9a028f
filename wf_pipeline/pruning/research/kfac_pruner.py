"""K-FAC-based OBS pruning (research baseline, needs the ``research`` extra): the maths in :mod:`.kfac`.

Statistics are the layers' Kronecker factors from curvlinops over ``num_grads`` Fisher-pool samples
(``fisher_type`` empirical: the data's labels, as WoodFisher; true: labels sampled from the model);
scores are the OBS statistic of the exactly dampened K-FAC inverse; the update sums the single-weight
OBS updates. Single-process only: the factors are not summed across ranks.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch
from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update
from wf_pipeline.pruning.research.kfac import (
    KroneckerEigen,
    kfac_factors,
    kfac_independent_update,
    kfac_scores,
    require_curvlinops,
    take_finite_samples,
)
from wf_pipeline.pruning.settings import PruneSettings


@dataclass
class KFACStats:
    factors: dict[str, KroneckerEigen]
    scores: Tensor | None = None


class KFACPruner(FlatPruner[KFACStats]):
    name = "kfac"
    needs_gradients = True

    def __init__(self, settings: PruneSettings) -> None:
        super().__init__(settings)
        require_curvlinops()  # fail at set-up with one line, not in the middle of a run

    def collect(self, view: PruneView, ctx: StepContext) -> KFACStats:
        if ctx.reduce_fn is not None:
            raise WFError("pruning method 'kfac' runs in a single process only",
                          hint="run without torchrun, or use woodfisher")
        if ctx.batches is None:
            raise WFError("pruning method 'kfac' needs Fisher data",
                          hint="pass `batches` (the Fisher pool) to prune_step")
        t0 = time.perf_counter()
        samples, skipped = take_finite_samples(ctx.model, ctx.batches, self.settings.num_grads, view.device,
                                               self.settings.nonfinite)
        ctx.details.add_skipped(skipped)
        fisher_type = "true" if self.settings.fisher_type == "true" else "empirical"
        with torch.enable_grad():
            factors = kfac_factors(ctx.model, view.params, samples, fisher_type)
        ctx.add_time("inverse", time.perf_counter() - t0)
        ctx.num_grads += self.settings.num_grads
        ctx.details.route = "kfac"
        return KFACStats(factors)

    def score(self, view: PruneView, stats: KFACStats) -> Tensor:
        stats.scores = kfac_scores(view.params, stats.factors, self.settings.damp)
        return stats.scores

    def update(self, view: PruneView, stats: KFACStats, chosen: Tensor) -> Update:
        kept = view.flat_kept() & ~chosen
        weights, predicted = kfac_independent_update(view.params, stats.factors, ~kept, self.settings.damp)
        view.write_back(kept, weights)
        return Update(predicted_loss_increase=predicted)
