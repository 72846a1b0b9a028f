"""What the pruning stage and the pipeline call for ``pruning.structure: channel``.

:func:`build_channel_pruner` traces the model once (Torch-Pruning's dependency graph), builds the
channel space (floors, channel or FLOPs target) and the pruner; the pruner holds the masks of every
parameter a channel removal touches (conv and linear weights and biases, BatchNorm weights and
biases, consumer columns), which the stage adds to its mask set through ``held_parameters``. After
the stage, :func:`remove_pruned_channels` cuts the masked channels out physically (lossless; see
:mod:`.surgery`), before export.
"""
from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.pruning.structured.flops import layer_shapes
from wf_pipeline.pruning.structured.groups import build_channel_graph, channel_masks, check_graph
from wf_pipeline.pruning.structured.pruners import CHANNEL_PRUNERS, ChannelPruner
from wf_pipeline.pruning.structured.space import ChannelSpace
from wf_pipeline.pruning.structured.surgery import SurgeryResult, remove_masked_channels

if TYPE_CHECKING:
    from wf_pipeline.recipe.schema import ChannelConfig


def build_channel_pruner(
    settings: PruneSettings,
    model: nn.Module,
    example_input: Tensor,
    *,
    selected: Collection[str] | None = None,
    layers: Sequence[str] = (".*",),
    skip: Sequence[str] = (),
    target: str = "channels",
    min_keep: float = 0.0,
    min_keep_by_layer: Mapping[str, float] | None = None,
    rank_by: str = "auto",
    round_to: int = 1,
    round_to_by_layer: Mapping[str, int] | None = None,
) -> ChannelPruner:
    """The channel pruner of ``settings.method`` for `model` (unwrapped, on its device).

    Channel groups are prunable when all their producing weights are in `selected` (or, without
    it, match `layers` and not `skip`).
    """
    if settings.method not in CHANNEL_PRUNERS:
        raise WFError(
            f"pruning.method {settings.method!r} has no channel-structured version",
            hint="with pruning.structure: channel use one of " + ", ".join(CHANNEL_PRUNERS),
        )
    sample = example_input[:1].to(next(model.parameters()).device)
    graph = build_channel_graph(model, sample, layers, skip, selected)
    check_graph(graph)
    space = ChannelSpace(graph, layer_shapes(model, sample), target, min_keep, min_keep_by_layer, rank_by, round_to,
                         round_to_by_layer)
    return CHANNEL_PRUNERS[settings.method](settings, space)


def channel_pruner_for_recipe(settings: PruneSettings, cfg: ChannelConfig, model: nn.Module,
                              selected: Collection[str], example_input: Tensor) -> ChannelPruner:
    """:func:`build_channel_pruner` with the recipe's ``pruning.channel`` section."""
    return build_channel_pruner(settings, model, example_input, selected=selected, target=cfg.target,
                                min_keep=cfg.min_keep, min_keep_by_layer=cfg.min_keep_layers, rank_by=cfg.rank_by,
                                round_to=cfg.round_to, round_to_by_layer=cfg.round_to_layers)


@dataclass
class ChannelSetup:
    """A pruner with its parameters and masks, for use outside the pruning stage (benchmarks, tests)."""

    pruner: ChannelPruner
    params: dict[str, nn.Parameter]
    masks: MaskSet

    @property
    def space(self) -> ChannelSpace:
        return self.pruner.space


def setup_channel_pruning(model: nn.Module, example_input: Tensor, settings: PruneSettings,
                          **options: object) -> ChannelSetup:
    """A channel pruner (options as :func:`build_channel_pruner`) and dense masks over what it holds;
    channels whose parameters are all zero already start removed."""
    pruner = build_channel_pruner(settings, model, example_input, **options)  # type: ignore[arg-type]
    params = pruner.params
    masks = MaskSet(channel_masks(pruner.space.graph, {n: p.detach() for n, p in params.items()}))
    return ChannelSetup(pruner, params, masks)


def remove_pruned_channels(model: nn.Module, masks: Mapping[str, Tensor], sample: Tensor) -> SurgeryResult:
    """Physically remove the masked channels of `model` (in place), checking the outputs are unchanged."""
    return remove_masked_channels(model, masks, sample.to(next(model.parameters()).device))
