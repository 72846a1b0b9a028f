"""The pruning methods by name: each recipe ``pruning.method`` maps to exactly one pruner class."""
from __future__ import annotations

from wf_pipeline.pruning.pruners.base import Pruner
from wf_pipeline.pruning.pruners.diagonal import DiagonalFisherPruner
from wf_pipeline.pruning.pruners.kfac import KFACPruner
from wf_pipeline.pruning.pruners.magnitude import MagnitudePruner, UniformMagnitudePruner
from wf_pipeline.pruning.pruners.woodfisher import WoodFisherPruner, WoodTaylorPruner
from wf_pipeline.pruning.settings import METHODS, PruneSettings

PRUNERS: dict[str, type[Pruner]] = {
    cls.name: cls
    for cls in (WoodFisherPruner, WoodTaylorPruner, MagnitudePruner, UniformMagnitudePruner, DiagonalFisherPruner,
                KFACPruner)
}
assert set(PRUNERS) == set(METHODS), "every recipe method needs a pruner class"


def build_pruner(settings: PruneSettings) -> Pruner:
    return PRUNERS[settings.method](settings)
