"""Structured (channel) pruners on the common pruner interface: collect → score → choose → update.

The units are the channels of a :class:`~wf_pipeline.pruning.structured.space.ChannelSpace` (one
score per channel, groups concatenated); ``choose`` is its global ranking with per-group floors,
``update`` masks and zeroes every entry of the chosen channels (the network keeps its shape until
:mod:`~wf_pipeline.pruning.structured.surgery` removes them after the pruning stage).

* ``woodfisher`` — group OBS over consumer row blocks (:mod:`.group_obs`): cost = loss increase
  of removing the channel with compensation, update = the exact joint OBS update of the consumers.
* ``magnitude`` — L1 filter norm (Li et al. 2017): the L1 norm of the channel's producing filters
  (averaged over the coupled producers of a group), divided by the mean over the group's kept
  channels so that groups of different fan-in rank together (Torch-Pruning's ``mean`` normaliser).
* ``taylor`` — Torch-Pruning's ``GroupTaylorImportance`` (|w·∂L/∂w| summed over the group, mean
  normalised), with the gradient of the mean loss over the Fisher samples.
* ``group_norm`` — Torch-Pruning's ``GroupMagnitudeImportance`` (group L2 norm, mean normalised).

The baselines zero the chosen channels without compensation.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.gradients import SampleStream
from wf_pipeline.pruning.pruners.base import Pruner, PruneView, StepContext, Update
from wf_pipeline.pruning.pruners.statistics import total_gradient_count
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.pruning.structured.group_obs import channel_cost, joint_update, unit_costs
from wf_pipeline.pruning.structured.groups import ChannelGroup
from wf_pipeline.pruning.structured.space import ChannelSpace
from wf_pipeline.pruning.structured.statistics import FisherTimings, RowFisher, row_fisher_inverses


class ChannelPruner(Pruner[Any]):
    """Common plumbing of the channel pruners: sparsity in channels (or MACs), choice, masking."""

    structure: ClassVar[str] = "channel"

    def __init__(self, settings: PruneSettings, space: ChannelSpace) -> None:
        super().__init__(settings)
        self.space = space
        named = dict(space.graph.model.named_parameters())
        # Every parameter a channel removal masks: weights, biases, BatchNorm entries, consumer columns.
        self.params = {name: named[name] for name in space.graph.parameter_names()}

    def held_parameters(self, model: nn.Module, selected: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        return {**selected, **self.params}

    def removed(self, view: PruneView) -> list[Tensor]:
        return self.space.removed(view.masks.masks)

    def sparsity(self, view: PruneView) -> float:
        return self.space.sparsity(self.removed(view))

    def reached(self, view: PruneView, target_sparsity: float) -> bool:
        removed = self.removed(view)
        if self.space.target == "channels":
            return round(target_sparsity * self.space.num_channels) <= sum(int(r.sum()) for r in removed)
        return self.space.sparsity(removed) >= target_sparsity - 1e-12

    def choose(self, view: PruneView, scores: Tensor, target_sparsity: float) -> Tensor:
        return self.space.choose(scores, self.removed(view), target_sparsity)

    def update(self, view: PruneView, stats: Any, chosen: Tensor) -> Update:
        self.remove(view, chosen)
        return Update(predicted_loss_increase=None, channels_removed=int(chosen.sum()))

    @torch.no_grad()
    def remove(self, view: PruneView, chosen: Tensor) -> None:
        """Mask the chosen channels and set every masked entry of the view to exactly zero."""
        self.space.remove(view.masks.masks, self.space.split(chosen))
        for name, param in self.params.items():
            param.masked_fill_(~view.masks.masks[name].to(param.device), 0)

    def normalised(self, scores: list[Tensor], view: PruneView) -> Tensor:
        """Each group's scores divided by their mean over its kept channels (flat, float64)."""
        out = []
        for values, gone in zip(scores, self.removed(view), strict=True):
            values = values.detach().double().cpu()
            alive = values[~gone]
            mean = float(alive.mean()) if alive.numel() else 0.0
            out.append(values / mean if mean > 0 else values)
        return torch.cat(out)


# ===================================================================== WoodFisher (group OBS)
@dataclass
class GroupObsStats:
    fishers: dict[str, RowFisher]
    unit_costs: dict[str, Tensor] = field(default_factory=dict)


class ChannelWoodFisherPruner(ChannelPruner):
    """Group OBS. ``woodfisher.update``: ``joint`` (the exact update of the consumers) or ``none``
    (rank by group-OBS cost, zero without compensating)."""

    name = "woodfisher"
    needs_gradients = True

    def __init__(self, settings: PruneSettings, space: ChannelSpace) -> None:
        super().__init__(settings, space)
        if settings.update not in ("joint", "none"):
            raise WFError(f"pruning.woodfisher.update {settings.update!r} is not available for channel pruning",
                          hint="use joint (exact group-OBS update) or none")

    def collect(self, view: PruneView, ctx: StepContext) -> GroupObsStats:
        if ctx.batches is None:
            raise WFError("structured WoodFisher needs Fisher data",
                          hint="pass `batches` (the Fisher pool) to prune_step")
        s = self.settings
        consumers = {name: self.params[name] for name in self.space.graph.consumers()}
        total = total_gradient_count(s, ctx.reduce_fn, view.device)
        timings = FisherTimings()
        fishers = row_fisher_inverses(
            ctx.model, consumers, ctx.batches, num_grads=s.num_grads, block_cap=s.block_size, damp=s.damp,
            masks=view.masks.masks, grad_batch_size=s.grad_batch_size, chunk_size=s.chunk_size,
            fisher_type=s.fisher_type, dtype=s.torch_dtype, loss_fn=ctx.loss_fn, reduce_fn=ctx.reduce_fn,
            total_grads=total, generator=ctx.generator, progress=ctx.progress, timings=timings,
        )
        ctx.num_grads += next(iter(fishers.values())).num_samples  # summed over ranks
        ctx.add_time("gradients", timings.gradients)
        ctx.add_time("accumulate", timings.accumulate)
        ctx.add_time("inverse", timings.accumulate + timings.inverse)
        ctx.details.num_blocks = sum(f.blocks.num_blocks for f in fishers.values())
        ctx.details.block_sizes = sorted({f.blocks.block_size for f in fishers.values()})
        return GroupObsStats(fishers)

    def score(self, view: PruneView, stats: GroupObsStats) -> Tensor:
        for name, fisher in stats.fishers.items():
            stats.unit_costs[name] = unit_costs(fisher.inverse, self.params[name].detach(), fisher.blocks)
        parts = []
        for group in self.space.groups:
            cost = torch.zeros(group.size, dtype=torch.float64)
            for member in group.members_of("in"):
                part = channel_cost(stats.unit_costs[member.weight], member.positions, member.roots, group.size)
                cost += part.double().cpu()
            parts.append(cost)
        return torch.cat(parts)

    @torch.no_grad()
    def update(self, view: PruneView, stats: GroupObsStats, chosen: Tensor) -> Update:
        masks = view.masks.masks
        before = {name: masks[name].clone() for name in stats.fishers}
        self.space.remove(masks, self.space.split(chosen))
        predicted = 0.0
        for name, fisher in stats.fishers.items() if self.settings.update == "joint" else ():
            kept = masks[name]
            if torch.equal(kept, before[name]):
                continue
            param = self.params[name]
            # Rows whose output channel goes are removed outright (their effect is the next layer's
            # columns, costed there): zero them first so they neither compensate nor add cost.
            row_alive = kept.reshape(kept.shape[0], -1).any(dim=1).view(-1, *([1] * (kept.dim() - 1)))
            weight = param.detach() * row_alive.to(param.device)
            new, cost = joint_update(fisher.inverse, weight, kept.to(fisher.inverse.device), fisher.blocks,
                                     fisher.damp, fisher.num_samples)
            param.copy_(new.to(param.dtype))
            predicted += cost
        self.remove(view, torch.zeros_like(chosen))  # zero every masked entry (producers, BN, consumers)
        if self.settings.update == "none":
            return Update(predicted_loss_increase=None, channels_removed=int(chosen.sum()))
        return Update(predicted_loss_increase=predicted, channels_removed=int(chosen.sum()))


# ===================================================================== baselines
class L1FilterPruner(ChannelPruner):
    name = "magnitude"

    def collect(self, view: PruneView, ctx: StepContext) -> None:
        return None

    def score(self, view: PruneView, stats: None) -> Tensor:
        params = self.params
        scores = []
        for group in self.space.groups:
            total = torch.zeros(group.size, dtype=torch.float64)
            producers = group.members_of("out", "depthwise")
            for member in producers:
                weight = params[member.weight].detach()
                l1 = weight.abs().reshape(weight.shape[0], -1).sum(1).double().cpu()
                total.index_add_(0, member.roots, l1[member.positions])
            scores.append(total / max(len(producers), 1))
        return self.normalised(scores, view)


class TorchPruningImportancePruner(ChannelPruner):
    """A Torch-Pruning importance criterion evaluated on each group's full Torch-Pruning group."""

    importance_factory: ClassVar[Callable[[], Any]]

    def _tp_group(self, group: ChannelGroup) -> Any:
        graph = self.space.graph.dependency_graph
        return graph.get_pruning_group(group.root, group.root_handler, list(range(group.size)))

    def score(self, view: PruneView, stats: Any) -> Tensor:
        importance = type(self).importance_factory()
        scores = []
        for group in self.space.groups:
            value = importance(self._tp_group(group))
            scores.append(torch.zeros(group.size) if value is None else value.detach().double().cpu())
        return torch.cat(scores)


def _group_norm_importance() -> Any:
    import torch_pruning as tp

    return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")


def _taylor_importance() -> Any:
    import torch_pruning as tp

    return tp.importance.GroupTaylorImportance(group_reduction="mean", normalizer="mean")


class GroupNormPruner(TorchPruningImportancePruner):
    name = "group_norm"
    importance_factory = staticmethod(_group_norm_importance)

    def collect(self, view: PruneView, ctx: StepContext) -> None:
        return None


class TaylorPruner(TorchPruningImportancePruner):
    name = "taylor"
    needs_gradients = True
    importance_factory = staticmethod(_taylor_importance)

    def collect(self, view: PruneView, ctx: StepContext) -> None:
        """Leave the gradient of the mean loss over the Fisher samples (all ranks) in ``.grad``."""
        if ctx.batches is None:
            raise WFError("Taylor importance needs Fisher data", hint="pass `batches` (the Fisher pool) to prune_step")
        s = self.settings
        t0 = time.perf_counter()
        params = [p for p in self.space.graph.model.parameters()]
        for p in params:
            p.grad = None
        stream = SampleStream(ctx.batches, view.device)
        remaining = s.num_grads * s.grad_batch_size
        count = 0
        with torch.enable_grad():
            while remaining > 0:
                x, y = stream.take(min(remaining, s.chunk_size * s.grad_batch_size))
                (ctx.loss_fn(ctx.model(x), y) * len(x)).backward()
                remaining -= len(x)
                count += len(x)
        total = torch.tensor(float(count), dtype=torch.float64, device=view.device)
        if ctx.reduce_fn is not None:
            ctx.reduce_fn(total)
            for p in params:
                if p.grad is not None:
                    ctx.reduce_fn(p.grad)
        for p in params:
            if p.grad is not None:
                p.grad.div_(float(total))
        ctx.num_grads += int(float(total))
        ctx.add_time("gradients", time.perf_counter() - t0)
        return None

    def score(self, view: PruneView, stats: None) -> Tensor:
        try:
            return super().score(view, stats)
        finally:
            for p in self.space.graph.model.parameters():
                p.grad = None  # the fine-tuning optimizer must not see these


CHANNEL_PRUNERS: dict[str, type[ChannelPruner]] = {
    cls.name: cls for cls in (ChannelWoodFisherPruner, L1FilterPruner, TaylorPruner, GroupNormPruner)
}
