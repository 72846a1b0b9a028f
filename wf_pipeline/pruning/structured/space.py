"""The channels a structured run may remove, how pruned a model is, and the global choice of channels.

A :class:`ChannelSpace` lists the prunable channel groups of a model in a fixed order; a score
vector has one entry per channel of those groups, concatenated. Pruning is measured either as the
fraction of those channels removed (``target: channels``) or as the fraction of the model's
conv/linear multiply-accumulates removed (``target: flops``).

The choice is a global ranking (lower score first) across all groups, which sets every layer's
channel count automatically, subject to each group's floor (channels always kept). The ranking key
is the score itself (``rank_by: cost``) or the score divided by the MACs the channel saves alone
(``cost_per_flop``: the cheapest loss per unit of compute saved, the default for a FLOPs target);
the shortest prefix of that order reaching the target is taken. With ``round_to: k`` channels go in
blocks of k (a group's k cheapest removable channels, then the next k, ...; a block's key is the sum
of its channels' scores, or that sum over their MACs), so every kept width stays a multiple of k:
runtime convolution kernels are fastest on such widths. A channel target may then be passed by up to
k − 1 channels. ``round_to_layers`` sets k per group (a regex over a producing weight -> k, the first
pattern that matches wins): ONNX Runtime's blocked (NCHWc) convolutions pad widths to its SIMD block
(16 floats with AVX-512), so a width of 24 runs as slowly as 32, while a narrow stage of 16 channels
still wants to go in smaller steps.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wf_pipeline.pruning.structured.flops import LayerShape, total_macs, total_params
from wf_pipeline.pruning.structured.groups import (
    ChannelGraph,
    ChannelGroup,
    remove_channels_from_masks,
    removed_channels,
)

TARGETS = ("channels", "flops")
RANK_BY = ("auto", "cost", "cost_per_flop")


def _produced_by(group: ChannelGroup, pattern: str) -> bool:
    """True when `pattern` (a regex, ``re.search``) matches the weight of one of `group`'s producers."""
    return any(re.search(pattern, m.weight) for m in group.members if m.kind in ("out", "depthwise"))


def group_floor(group: ChannelGroup, min_keep: float, min_keep_by_layer: Mapping[str, float]) -> int:
    """Channels always kept in `group`: the largest fraction that applies (``min_keep``, or a
    ``min_keep_by_layer`` regex matching one of its producers' weights), at least one channel."""
    fraction = min_keep
    for pattern, value in min_keep_by_layer.items():
        if _produced_by(group, pattern):
            fraction = max(fraction, value)
    return min(group.size, max(1, math.ceil(fraction * group.size - 1e-9)))


def group_round(group: ChannelGroup, round_to: int, round_to_by_layer: Mapping[str, int]) -> int:
    """Block size of `group`'s kept widths: the first ``round_to_by_layer`` regex matching one of its
    producers' weights, else ``round_to``."""
    return next((value for pattern, value in round_to_by_layer.items() if _produced_by(group, pattern)), round_to)


@dataclass
class ChannelSpace:
    graph: ChannelGraph
    shapes: dict[str, LayerShape]
    target: str = "channels"
    min_keep: float = 0.0
    min_keep_by_layer: Mapping[str, float] | None = None
    rank_by: str = "auto"  # auto: cost for a channel target, cost per MAC saved for a FLOPs target
    round_to: int = 1  # kept channel counts move in multiples of this (runtime kernels like multiples of 8)
    round_to_by_layer: Mapping[str, int] | None = None  # per-group block sizes (regex -> k, first match)

    def __post_init__(self) -> None:
        if self.target not in TARGETS:
            raise ValueError(f"unknown target {self.target!r}; expected one of {TARGETS}")
        if self.rank_by not in RANK_BY:
            raise ValueError(f"unknown rank_by {self.rank_by!r}; expected one of {RANK_BY}")
        if self.round_to < 1 or any(k < 1 for k in (self.round_to_by_layer or {}).values()):
            raise ValueError(f"round_to must be >= 1, got {self.round_to} / {self.round_to_by_layer}")
        if self.rank_by == "auto":
            self.rank_by = "cost_per_flop" if self.target == "flops" else "cost"
        self.groups = self.graph.prunable
        self.sizes = [g.size for g in self.groups]
        self.floors = [group_floor(g, self.min_keep, self.min_keep_by_layer or {}) for g in self.groups]
        self.rounds = [group_round(g, self.round_to, self.round_to_by_layer or {}) for g in self.groups]
        self.dense_macs = total_macs(self.shapes, {}, {})

    @property
    def num_channels(self) -> int:
        return sum(self.sizes)

    # ----------------------------------------------------------------- state
    def removed(self, masks: Mapping[str, Tensor]) -> list[Tensor]:
        return [removed_channels(g, dict(masks)) for g in self.groups]

    def split(self, flat: Tensor) -> list[Tensor]:
        return list(flat.split(self.sizes))

    def remove(self, masks: dict[str, Tensor], chosen: Sequence[Tensor]) -> None:
        """Mask (in place) every entry of the chosen channels."""
        for group, picked in zip(self.groups, chosen, strict=True):
            if picked.any():
                remove_channels_from_masks(masks, group, picked.cpu())

    def kept_counts(self, removed: Sequence[Tensor]) -> tuple[dict[str, int], dict[str, int]]:
        """Kept output and input channels of every layer that a removal touches."""
        out_kept: dict[str, int] = {}
        in_kept: dict[str, int] = {}
        for group, gone in zip(self.groups, removed, strict=True):
            for member in group.members:
                shape = self.shapes.get(member.module)
                if shape is None:
                    continue
                count = int(gone.cpu()[member.roots].sum())
                if member.kind in ("out", "depthwise"):
                    out_kept[member.module] = out_kept.get(member.module, shape.out_channels) - count
                if member.kind == "in":
                    in_kept[member.module] = in_kept.get(member.module, shape.in_channels) - count
        return out_kept, in_kept

    def macs(self, removed: Sequence[Tensor]) -> int:
        return total_macs(self.shapes, *self.kept_counts(removed))

    def params(self, removed: Sequence[Tensor]) -> int:
        return total_params(self.shapes, *self.kept_counts(removed))

    def sparsity(self, removed: Sequence[Tensor]) -> float:
        """Fraction of channels removed, or of MACs removed (``target: flops``)."""
        if self.target == "flops":
            return 1.0 - self.macs(removed) / self.dense_macs
        return sum(int(r.sum()) for r in removed) / max(self.num_channels, 1)

    def channel_macs(self, removed: Sequence[Tensor]) -> Tensor:
        """MACs each channel saves if removed alone, in the current configuration (flat, float64)."""
        out_kept, in_kept = self.kept_counts(removed)
        parts = []
        for group in self.groups:
            saved = torch.zeros(group.size, dtype=torch.float64)
            for member in group.members:
                s = self.shapes.get(member.module)
                if s is None:
                    continue
                out_n, in_n = out_kept.get(s.name, s.out_channels), in_kept.get(s.name, s.in_channels)
                if member.kind in ("out", "depthwise"):
                    per = s.macs(out_n, in_n) - s.macs(out_n - 1, in_n)
                elif member.kind == "in":
                    per = s.macs(out_n, in_n) - s.macs(out_n, in_n - 1)
                else:
                    continue
                saved.index_add_(0, member.roots, torch.full((member.roots.numel(),), float(per), dtype=torch.float64))
            parts.append(saved)
        return torch.cat(parts)

    # ----------------------------------------------------------------- choice
    def choose(self, scores: Tensor, removed: Sequence[Tensor], target: float) -> Tensor:
        """Flat bool over all channels: those newly removed to reach `target` (see module doc)."""
        if scores.shape != (self.num_channels,):
            raise ValueError(f"expected {self.num_channels} channel scores, got {tuple(scores.shape)}")
        scores = torch.nan_to_num(scores.detach().double().cpu(), nan=math.inf)
        macs = self.channel_macs(removed) if self.rank_by == "cost_per_flop" else None
        blocks = self._blocks(scores, removed)
        chosen = torch.zeros(self.num_channels, dtype=torch.bool)
        if not blocks:
            return chosen
        keys = torch.tensor([float(scores[b].sum()) for b in blocks], dtype=torch.float64)
        if macs is not None:
            keys = keys / torch.tensor([max(float(macs[b].sum()), 1.0) for b in blocks], dtype=torch.float64)
        ranked = [blocks[i] for i in torch.argsort(keys, stable=True).tolist()]
        for block in ranked[: self._prefix_reaching(ranked, removed, target)]:
            chosen[block] = True
        return chosen

    def _blocks(self, scores: Tensor, removed: Sequence[Tensor]) -> list[Tensor]:
        """Each group's removable channels, cheapest first, cut into blocks of its ``round_to`` channels
        (the first block brings the kept count to a multiple of it) down to the floor.
        A group's blocks are consecutive in its own score order, so a dearer block never goes first."""
        out: list[Tensor] = []
        offset = 0
        for size, floor, r, gone in zip(self.sizes, self.floors, self.rounds, removed, strict=True):
            gone = gone.cpu()
            alive = (~gone).nonzero().flatten()
            kept = alive.numel()
            lowest = min(kept, math.ceil(floor / r) * r if r > 1 else floor)  # fewest channels kept
            order = alive[torch.argsort(scores[offset + alive], stable=True)] + offset
            taken = 0
            first = kept % r if r > 1 else 1
            width = first or r
            while kept - taken - width >= lowest and width > 0:
                out.append(order[taken : taken + width])
                taken += width
                width = r
            offset += size
        return out

    def _prefix_reaching(self, ranked: list[Tensor], removed: Sequence[Tensor], target: float) -> int:
        """Fewest blocks of `ranked` whose removal brings the sparsity to `target` (all if never)."""
        if self.target == "channels":
            need = round(target * self.num_channels) - sum(int(r.sum()) for r in removed)
            count, total = 0, 0
            while total < need and count < len(ranked):
                total += ranked[count].numel()
                count += 1
            return count

        base = torch.cat([r.cpu() for r in removed])

        def reaches(count: int) -> bool:
            flat = base.clone()
            for block in ranked[:count]:
                flat[block] = True
            return self.sparsity(self.split(flat)) >= target - 1e-12

        lo, hi = 0, len(ranked)
        if not reaches(hi):
            return hi
        while lo < hi:  # removing more channels never adds MACs: binary search the prefix
            mid = (lo + hi) // 2
            if reaches(mid):
                hi = mid
            else:
                lo = mid + 1
        return lo
