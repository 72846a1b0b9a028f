"""Magnitude pruning, the data-free baseline: score = |w|, no weight update."""
from __future__ import annotations

from torch import Tensor

from wf_pipeline.pruning.pruners.base import FlatPruner, PruneView, StepContext, Update


class MagnitudePruner(FlatPruner[None]):
    """Global magnitude: the smallest |w| over all selected layers go first (``ranking`` from settings)."""

    name = "magnitude"

    def collect(self, view: PruneView, ctx: StepContext) -> None:
        return None

    def score(self, view: PruneView, stats: None) -> Tensor:
        return view.flat_weights().abs()

    def update(self, view: PruneView, stats: None, chosen: Tensor) -> Update:
        view.write_back(view.flat_kept() & ~chosen)
        return Update(predicted_loss_increase=None)


class UniformMagnitudePruner(MagnitudePruner):
    """Magnitude with every layer pruned to the same sparsity."""

    name = "magnitude_uniform"

    @property
    def ranking(self) -> str:
        return "uniform"
