"""Pruning: weight selection, masks, OBS maths, the pruning methods (one pruner class each) and the step driver."""
from wf_pipeline.pruning.masks import MaskHandle, MaskSet
from wf_pipeline.pruning.obs import ObsResult, obs_prune, obs_scores, obs_update
from wf_pipeline.pruning.pruners import PRUNERS, Pruner, PruneView, StepContext, build_pruner
from wf_pipeline.pruning.ranking import choose_pruned
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.pruning.settings import METHODS, PruneSettings
from wf_pipeline.pruning.step import PruneReport, prune_step

__all__ = [
    "METHODS",
    "PRUNERS",
    "MaskHandle",
    "MaskSet",
    "ObsResult",
    "PruneReport",
    "PruneSettings",
    "PruneView",
    "Pruner",
    "StepContext",
    "build_pruner",
    "choose_pruned",
    "obs_prune",
    "obs_scores",
    "obs_update",
    "prune_step",
    "select_prunable",
]
