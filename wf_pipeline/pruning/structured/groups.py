"""Coupled channel groups from Torch-Pruning's dependency graph, as index sets over our parameters.

Removing output channel ``r`` of a layer also removes its BatchNorm entries, input channel ``r`` of
every layer that consumes it, and every channel coupled to it: residual additions tie the channels
of all blocks in a stage together, a depthwise convolution ties its input channel to its output
channel. Torch-Pruning (``torch_pruning.DependencyGraph``) traces the model and returns these
coupled sets; this module turns each of its groups into a :class:`ChannelGroup`: for every member
layer, the positions along the parameter dimension that belong to each *root* channel of the group.

A removed channel is held by masks during gradual pruning (the network keeps its shape):

* ``out``       conv (groups=1) / linear: weight rows (dim 0) and bias;
* ``depthwise`` depthwise conv: weight rows (dim 0) and bias (input and output channel at once);
* ``norm``      BatchNorm: weight and bias, so the channel's post-BN output is exactly 0;
* ``in``        conv (groups=1) / linear consumers: weight columns (dim 1).

With all of them zero the channel carries exactly 0 everywhere (ReLU(0) = 0, a sum of zeros is 0),
so :mod:`wf_pipeline.pruning.structured.surgery` can later remove it physically without changing
the outputs. A group is prunable only if every member is one of these kinds, none of its producers
is skipped by the recipe's regexes, and its channels do not reach the model output directly.
"""
from __future__ import annotations

import re
from collections.abc import Collection, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wf_pipeline.errors import WFError

PRODUCER_KINDS = ("out", "depthwise")
# Parameter-free graph nodes that pass channels through unchanged (elementwise ops, views, concat, ...).
_PASS_THROUGH_TYPES = ("ELEMENTWISE", "RESHAPE", "CONCAT", "SPLIT", "SLICE", "EXPAND", "UNBIND", "CUSTOMIZED")


@dataclass(frozen=True)
class Member:
    """One layer's share of a channel group.

    ``positions[i]`` is an index along ``dim`` of each tensor in ``tensors`` (weight first), and
    ``roots[i]`` the group channel it belongs to. Several positions may share a root (a channel
    flattened into several linear inputs); every root has at least one position.
    """

    module: str
    kind: str  # out | in | depthwise | norm
    positions: Tensor
    roots: Tensor
    tensors: tuple[tuple[str, int], ...]  # (parameter name, dimension)

    @property
    def weight(self) -> str:
        return self.tensors[0][0]


@dataclass
class ChannelGroup:
    """Channels removed together. ``size`` root channels; ``reason`` says why it cannot be pruned."""

    name: str
    size: int
    members: tuple[Member, ...]
    reason: str | None = None
    root: nn.Module | None = field(default=None, repr=False)  # Torch-Pruning's root module (surgery)
    root_handler: Any = field(default=None, repr=False)  # and its pruning function

    @property
    def prunable(self) -> bool:
        return self.reason is None

    def members_of(self, *kinds: str) -> list[Member]:
        return [m for m in self.members if m.kind in kinds]


@contextmanager
def _modes_kept(model: nn.Module) -> Iterator[None]:
    """Torch-Pruning's tracer calls ``model.eval()``: give every submodule its own mode back after."""
    modes = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(re.search(p, name) for p in patterns)


def _member_kind(module: Any, is_out: bool) -> tuple[str | None, str | None]:
    """(kind, None) for a member we can mask, (None, reason) for one we cannot, (None, None) to ignore."""
    if isinstance(module, nn.modules.conv._ConvNd):
        if module.transposed:
            return None, "transposed convolutions are not supported"
        if module.groups == 1:
            return ("out" if is_out else "in"), None
        if module.groups == module.in_channels == module.out_channels:
            return "depthwise", None
        return None, f"grouped convolution (groups={module.groups}) is not supported"
    if isinstance(module, nn.Linear):
        return ("out" if is_out else "in"), None
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if not module.affine:
            return None, "BatchNorm without affine parameters cannot zero a channel"
        return "norm", None
    if isinstance(module, nn.Module) and any(True for _ in module.parameters(recurse=False)):
        return None, f"{type(module).__name__} layers are not supported"
    return None, None


def _tensors(name: str, module: nn.Module, kind: str) -> tuple[tuple[str, int], ...]:
    prefix = f"{name}." if name else ""
    if kind == "in":
        return ((prefix + "weight", 1),)
    out = [(prefix + "weight", 0)]
    if getattr(module, "bias", None) is not None:
        out.append((prefix + "bias", 0))
    return tuple(out)


@dataclass
class ChannelGraph:
    """The channel groups of one model instance (the dependency graph refers to its modules)."""

    model: nn.Module
    groups: list[ChannelGroup]
    dependency_graph: Any = field(repr=False)

    @property
    def prunable(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    def parameter_names(self) -> list[str]:
        """Every parameter a channel removal touches (the masks to keep), in the model's order."""
        used = {name for g in self.prunable for m in g.members for name, _ in m.tensors}
        return [n for n, _ in self.model.named_parameters() if n in used]

    def consumers(self) -> list[str]:
        """Weights of the layers that consume a prunable channel (where group OBS compensates)."""
        used = {m.weight for g in self.prunable for m in g.members_of("in")}
        return [n for n, _ in self.model.named_parameters() if n in used]


def build_channel_graph(
    model: nn.Module,
    example_input: Tensor,
    layers: Sequence[str] = (".*",),
    skip: Sequence[str] = (),
    selected: Collection[str] | None = None,
) -> ChannelGraph:
    """Trace `model` with Torch-Pruning and describe its coupled channel groups.

    A group is prunable when each producer's weight name (``<module>.weight``) matches one of
    `layers` and none of `skip` (regexes, ``re.search``) — or, given `selected`, is one of those
    names —, its channels do not reach the model's output (the classifier keeps its classes) and
    every member can be masked (see module doc).
    """
    import torch_pruning as tp

    names = {module: name for name, module in model.named_modules()}
    with _modes_kept(model), torch.enable_grad():
        graph = tp.DependencyGraph().build_dependency(model, example_inputs=example_input, verbose=False)
    pass_through = {getattr(tp.ops.OPTYPE, t) for t in _PASS_THROUGH_TYPES if hasattr(tp.ops.OPTYPE, t)}
    groups: list[ChannelGroup] = []
    for tp_group in graph.get_all_groups(root_module_types=(nn.modules.conv._ConvNd, nn.Linear)):
        root_dep = tp_group[0].dep
        root_module = root_dep.target.module
        size = graph.get_out_channels(root_module)
        members: dict[tuple[str, str], tuple[list[int], list[int], nn.Module]] = {}
        reason: str | None = None
        for item in tp_group:
            node = item.dep.target
            module = node.module
            if node.type == tp.ops.OPTYPE.OUTPUT:
                reason = "its channels are the model's output"
                continue
            if node.type in pass_through:
                continue
            kind, problem = _member_kind(module, graph.is_out_channel_pruning_fn(item.dep.handler))
            if problem:
                reason = reason or f"{names.get(module, '?')}: {problem}"
                continue
            if kind is None:
                continue
            if item.root_idxs is None or any(r is None for r in item.root_idxs):
                reason = reason or f"{names.get(module, '?')}: channel index mapping unknown"
                continue
            if kind in PRODUCER_KINDS and not node.outputs:
                reason = "its channels are the model's output"
            key = (names[module], kind)
            positions, roots, _ = members.setdefault(key, ([], [], module))
            for pos, root in zip(item.idxs, item.root_idxs, strict=True):
                positions.append(int(pos))
                roots.append(int(root))
        built = tuple(
            Member(name, kind, torch.tensor(pos, dtype=torch.long), torch.tensor(roots, dtype=torch.long),
                   _tensors(name, module, kind))
            for (name, kind), (pos, roots, module) in members.items()
        )
        producers = [m for m in built if m.kind in PRODUCER_KINDS]
        if reason is None:
            for m in producers:
                chosen = (m.weight in selected) if selected is not None else (
                    _matches(m.weight, layers) and not _matches(m.weight, skip))
                if not chosen:
                    reason = f"{m.weight} is not selected (pruning.layers / pruning.skip)"
                    break
        if reason is None and not any(m.kind == "in" for m in built):
            reason = "no layer consumes its channels"
        name = names.get(root_module, "?")
        groups.append(ChannelGroup(name, int(size), built, reason, root_module, root_dep.handler))
    return ChannelGraph(model, groups, graph)


# ===================================================================== masks <-> removed channels
def remove_channels_from_masks(masks: dict[str, Tensor], group: ChannelGroup, removed: Tensor) -> None:
    """Set to False (pruned), in place, every mask entry of the channels where `removed` is True."""
    for member in group.members:
        chosen = removed.to(member.roots.device)[member.roots]
        positions = member.positions[chosen]
        if not positions.numel():
            continue
        for name, dim in member.tensors:
            mask = masks[name]
            mask.index_fill_(dim, positions.to(mask.device), False)


def _dead_positions(tensor_mask: Tensor, dim: int) -> Tensor:
    """Bool per index along `dim`: True where every entry of that slice is masked."""
    moved = tensor_mask.movedim(dim, 0)
    return ~moved.reshape(moved.shape[0], -1).any(dim=1)


def removed_channels(group: ChannelGroup, masks: dict[str, Tensor]) -> Tensor:
    """Bool ``(size,)``: True for channels whose every member entry is masked (already removed)."""
    alive = torch.zeros(group.size, dtype=torch.long)
    for member in group.members:
        dead = torch.ones(member.positions.numel(), dtype=torch.bool)
        for name, dim in member.tensors:
            dead &= _dead_positions(masks[name].cpu(), dim)[member.positions]
        alive.index_add_(0, member.roots, (~dead).long())
    return alive == 0


def zero_channels(params: dict[str, Tensor], group: ChannelGroup) -> Tensor:
    """Bool ``(size,)``: channels whose parameters are all exactly zero (a model that arrives pruned)."""
    masks = {name: params[name].detach() != 0 for m in group.members for name, _ in m.tensors}
    return removed_channels(group, masks)


def channel_masks(graph: ChannelGraph, params: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """Masks (True = kept) over :meth:`ChannelGraph.parameter_names`; with `params`, channels whose
    parameters are all zero already start removed (pruning only grows)."""
    named = dict(graph.model.named_parameters())
    masks = {name: torch.ones_like(named[name], dtype=torch.bool) for name in graph.parameter_names()}
    if params is not None:
        for group in graph.prunable:
            remove_channels_from_masks(masks, group, zero_channels(params, group))
    return masks


def check_graph(graph: ChannelGraph) -> None:
    """Raise a user-facing error when nothing in the model can be pruned channel-wise."""
    if graph.prunable:
        return
    reasons = sorted({f"{g.name}: {g.reason}" for g in graph.groups})[:8]
    raise WFError(
        "no channel group of this model can be pruned",
        hint="check pruning.layers / pruning.skip; groups: " + "; ".join(reasons),
    )
