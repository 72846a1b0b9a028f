"""What the pruning stage and the pipeline call for ``pruning.structure: channel``.

:func:`setup_channel_pruning` traces the model once (Torch-Pruning's dependency graph), builds the
channel space (floors, FLOPs target), the parameters and masks a channel removal touches (conv and
linear weights and biases, BatchNorm weights and biases), and the pruner. Channels whose parameters
arrive all zero start removed. After the stage, :func:`remove_pruned_channels` cuts the masked
channels out physically (lossless; see :mod:`.surgery`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

from torch import Tensor, nn

from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.pruning.structured.flops import layer_shapes
from wf_pipeline.pruning.structured.groups import build_channel_graph, channel_masks, check_graph
from wf_pipeline.pruning.structured.pruners import ChannelPruner, build_channel_pruner
from wf_pipeline.pruning.structured.space import ChannelSpace
from wf_pipeline.pruning.structured.surgery import SurgeryResult, remove_masked_channels


@dataclass
class ChannelSetup:
    space: ChannelSpace
    params: dict[str, nn.Parameter]
    masks: MaskSet
    pruner: ChannelPruner


def setup_channel_pruning(
    model: nn.Module,
    example_input: Tensor,
    settings: PruneSettings,
    *,
    layers: Sequence[str] = (".*",),
    skip: Sequence[str] = (),
    target: str = "channels",
    min_keep: float = 0.0,
    min_keep_by_layer: Mapping[str, float] | None = None,
    rank_by: str = "auto",
) -> ChannelSetup:
    """Everything a structured pruning stage needs for `model` (unwrapped, on its device)."""
    sample = example_input[:1].to(next(model.parameters()).device)
    graph = build_channel_graph(model, sample, layers, skip)
    check_graph(graph)
    space = ChannelSpace(graph, layer_shapes(model, sample), target, min_keep, min_keep_by_layer, rank_by)
    named = dict(model.named_parameters())
    params = {name: named[name] for name in graph.parameter_names()}
    masks = MaskSet(channel_masks(graph, {n: p.detach() for n, p in params.items()}))
    return ChannelSetup(space, params, masks, build_channel_pruner(settings, space))


def remove_pruned_channels(model: nn.Module, masks: Mapping[str, Tensor], sample: Tensor) -> SurgeryResult:
    """Physically remove the masked channels of `model` (in place), checking the outputs are unchanged."""
    return remove_masked_channels(model, masks, sample.to(next(model.parameters()).device))
