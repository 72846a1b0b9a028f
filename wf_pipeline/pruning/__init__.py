"""Pruning: weight selection, masks, OBS scoring/updates and the pruning methods."""
from wf_pipeline.pruning.masks import MaskHandle, MaskSet
from wf_pipeline.pruning.methods import METHODS, PruneReport, PruneSettings, prune_step
from wf_pipeline.pruning.obs import ObsResult, obs_prune, obs_scores, obs_update
from wf_pipeline.pruning.ranking import choose_pruned
from wf_pipeline.pruning.selection import select_prunable

__all__ = [
    "METHODS",
    "MaskHandle",
    "MaskSet",
    "ObsResult",
    "PruneReport",
    "PruneSettings",
    "choose_pruned",
    "obs_prune",
    "obs_scores",
    "obs_update",
    "prune_step",
    "select_prunable",
]
