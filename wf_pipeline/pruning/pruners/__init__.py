"""Pruning methods, one class each, all behind one interface (see :mod:`.base`)."""
from wf_pipeline.pruning.pruners.base import FlatPruner, Pruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.registry import PRUNERS, build_pruner

__all__ = ["PRUNERS", "FlatPruner", "PruneView", "Pruner", "StepContext", "Update", "build_pruner"]
