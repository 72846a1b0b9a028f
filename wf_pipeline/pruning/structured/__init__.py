"""Structured pruning: whole channels removed with group OBS (or a baseline), then cut out physically.

* :mod:`.groups` — coupled channel groups from Torch-Pruning's dependency graph, as index sets;
* :mod:`.group_obs` — the group-OBS cost and update over consumer row blocks (the maths);
* :mod:`.statistics` — the row-block Fisher inverses from per-sample gradients;
* :mod:`.space` / :mod:`.flops` — the channel space, sparsity in channels or MACs, global choice;
* :mod:`.pruners` — WoodFisher, L1 filter norm, Taylor and group-norm pruners (common interface);
* :mod:`.surgery` — lossless physical removal of zeroed channels;
* :mod:`.stage` — what the pruning stage and the pipeline call.
"""
from wf_pipeline.pruning.structured.pruners import CHANNEL_PRUNERS, ChannelPruner
from wf_pipeline.pruning.structured.stage import (
    ChannelSetup,
    build_channel_pruner,
    channel_pruner_for_recipe,
    remove_pruned_channels,
    setup_channel_pruning,
)
from wf_pipeline.pruning.structured.surgery import SurgeryResult

__all__ = [
    "CHANNEL_PRUNERS",
    "ChannelPruner",
    "ChannelSetup",
    "SurgeryResult",
    "build_channel_pruner",
    "channel_pruner_for_recipe",
    "remove_pruned_channels",
    "setup_channel_pruning",
]
