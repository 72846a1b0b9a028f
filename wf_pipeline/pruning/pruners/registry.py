"""The pruning methods by name: each recipe ``pruning.method`` maps to exactly one pruner class
(per ``pruning.structure``; the channel pruners live in :mod:`wf_pipeline.pruning.structured`)."""
from __future__ import annotations

from wf_pipeline.pruning.pruners.base import Pruner
from wf_pipeline.pruning.pruners.diagonal import DiagonalFisherPruner
from wf_pipeline.pruning.pruners.magnitude import MagnitudePruner, UniformMagnitudePruner
from wf_pipeline.pruning.pruners.woodfisher import WoodFisherPruner, WoodTaylorPruner
from wf_pipeline.pruning.research import KFACPruner  # research baseline (optional extra)
from wf_pipeline.pruning.settings import METHODS, PruneSettings
from wf_pipeline.recipe.schema import CHANNEL_ONLY_METHODS

PRUNERS: dict[str, type[Pruner]] = {
    cls.name: cls
    for cls in (WoodFisherPruner, WoodTaylorPruner, MagnitudePruner, UniformMagnitudePruner, DiagonalFisherPruner,
                KFACPruner)
}
assert set(PRUNERS) == set(METHODS) - set(CHANNEL_ONLY_METHODS), "every recipe method needs a pruner class"


def pruner_class(method: str, structure: str = "unstructured") -> type[Pruner]:
    """The class behind a recipe's method and structure (its ``needs_gradients`` without building it)."""
    if structure == "channel":
        from wf_pipeline.pruning.structured.pruners import CHANNEL_PRUNERS

        return CHANNEL_PRUNERS[method]
    return PRUNERS[method]


def build_pruner(settings: PruneSettings) -> Pruner:
    """An unstructured pruner (channel pruners need the model: see ``structured.build_channel_pruner``)."""
    return PRUNERS[settings.method](settings)
