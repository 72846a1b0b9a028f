"""What the pruning stage will prune, how and when: pruning groups and their events on the step clock.

A recipe prunes one group of parameters (``pruning.layers`` minus ``pruning.skip``) or several
(``pruning.groups``, e.g. converted from SparseML recipes with several pruning modifiers), each with
its own sparsity targets and schedule. Every scheduled pruning becomes a :class:`PruneEvent` at the
optimizer step where its (possibly fractional) epoch begins; events run in step order, groups in
recipe order within a step.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning import Pruner, PruneSettings, select_prunable
from wf_pipeline.pruning import build_pruner as build_flat_pruner
from wf_pipeline.pruning.schedule import planned_targets, step_of
from wf_pipeline.recipe.schema import PruningConfig, ScheduleConfig


@dataclass
class PruneGroup:
    """One target over one set of parameters, pruned by one pruner."""

    name: str
    params: dict[str, nn.Parameter]
    pruner: Pruner
    schedule: ScheduleConfig
    initial_sparsity: float
    final_sparsity: float

    @property
    def settings(self) -> PruneSettings:
        return self.pruner.settings


@dataclass(frozen=True)
class PruneEvent:
    """Prune `group` to `target` before optimizer step `step` (counted over the whole stage)."""

    index: int  # position in the stage's event list (seeds this step's Fisher sample draw)
    step: int
    epoch: float
    group: int
    target: float


def build_groups(model: nn.Module, cfg: PruningConfig, settings: PruneSettings,
                 sample_input: Tensor | None = None) -> list[PruneGroup]:
    """The stage's pruning groups; a parameter may belong to one group only. Channel pruning traces
    the model on `sample_input` (one batch of the data's input shape)."""

    def build_pruner(params: dict[str, nn.Parameter]) -> Pruner:
        if not cfg.removes_channels:
            return build_flat_pruner(settings)
        from wf_pipeline.pruning.structured import channel_pruner_for_recipe

        assert sample_input is not None, "channel pruning needs a sample input to trace the model"
        return channel_pruner_for_recipe(settings, cfg.channel, model, params, sample_input)

    if not cfg.groups:
        params = select_prunable(model, cfg.layers, cfg.skip, cfg.min_layer_params)
        return [PruneGroup("all", params, build_pruner(params), cfg.schedule, cfg.initial_sparsity, cfg.final_sparsity)]
    groups: list[PruneGroup] = []
    owner: dict[str, str] = {}
    for index, spec in enumerate(cfg.groups):
        name = spec.name or f"group{index}"
        where = f"pruning.groups[{index}]"
        try:
            params = select_prunable(model, spec.layers, [*cfg.skip, *spec.skip], cfg.min_layer_params)
        except WFError as exc:
            raise WFError(f"{where}: {exc.message}", exc.hint) from exc
        for pname in params:
            if pname in owner:
                raise WFError(f"{where}.layers: parameter {pname!r} is already in group {owner[pname]!r}",
                              "give every parameter to one group only (narrow the regexes or add skip patterns)")
            owner[pname] = name
        schedule = spec.schedule or cfg.schedule
        groups.append(PruneGroup(name, params, build_pruner(params), schedule, spec.initial_sparsity,
                                 spec.final_sparsity))
    return groups


def plan_events(groups: list[PruneGroup], steps_per_epoch: int) -> list[PruneEvent]:
    """Every pruning of every group, in the order the stage runs them."""
    raw = [
        (step_of(epoch, steps_per_epoch), g, epoch, target)
        for g, group in enumerate(groups)
        for epoch, target in planned_targets(group.schedule, group.initial_sparsity, group.final_sparsity)
    ]
    raw.sort(key=lambda item: (item[0], item[1]))
    # With fewer steps per epoch than pruning steps per epoch, several land on one step: the last wins.
    merged: dict[tuple[int, int], tuple[float, float]] = {}
    for step, g, epoch, target in raw:
        merged[(step, g)] = (epoch, target)
    ordered = sorted(merged.items())
    return [PruneEvent(i, step, epoch, g, target) for i, ((step, g), (epoch, target)) in enumerate(ordered)]
