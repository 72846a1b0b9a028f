"""Group Optimal Brain Surgeon for whole channels, over row blocks of the consuming layers.

Quadratic model of the loss around the current weights, ``ΔL(δw) = ½ δwᵀ F δw`` with the dampened
empirical Fisher ``F = λI + (1/N) Σ g gᵀ`` and ``M = F⁻¹``. Removing a set Q of weights together
(constraint ``δw_Q = −w_Q``) and letting the others compensate costs, at the optimum,

    ΔL_Q = ½ w_Qᵀ (M_QQ)⁻¹ w_Q,        δw = −M[:,Q] (M_QQ)⁻¹ w_Q        (WoodFisher's group OBS).

**Which weights a channel removal puts in Q.** Removing channel c zeroes its producing filters,
their BatchNorm entries and input channel c of every consuming layer. The channel's values reach
the loss only through the consumers, so once the consumers' columns for c are zero the producers'
weights no longer affect the outputs: the change of the network's function is exactly that of
zeroing the consumer columns. The cost of a channel is therefore the group OBS cost over the
*consumer* weights, with compensation by the consumers' other weights; the producer weights are
removed on top at no further cost (no weight of theirs remains to compensate, and their own
second-order term would double count a change the consumer term already measures).

**Block layout (which F we use).** For a consumer with weight ``(O, I, kh, kw)`` (a linear layer:
``(O, I)`` with ``kh·kw = 1``) every output row o is a Fisher block: the ``I·u`` weights
(``u = kh·kw``) that produce output o, and channel c is the ``u`` columns ``w[o, c, :, :]`` in
every row. F is block-diagonal over rows, so the cost of channel c is the sum over rows and the
update of each row uses only that row's block:

    ΔL_c = Σ_o ½ w_{o,c}ᵀ (M^o_{cc})⁻¹ w_{o,c},       M^o_{cc} the u×u diagonal sub-block of row o.

To bound memory, a row longer than ``block_cap`` weights is split into sub-blocks of ``m`` whole
input channels (``m = max(1, block_cap // u)``): the Fisher between input channels of one row that
fall in different sub-blocks is dropped, so compensation for channel c uses only the other
channels of its own sub-block (the row is split into as few sub-blocks of equal width as the cap
allows). Memory is ``(#weights)·m·u`` numbers instead of ``(#weights)·I·u``.
When one channel reaches a consumer as several column groups (a channel flattened into several
linear inputs) their costs are summed, which is exact when they fall in different sub-blocks.

Ranking uses each channel's own cost ΔL_c (costs are loss increases, comparable across layers);
the chosen channels are then removed jointly with the exact joint update per block
(:func:`wf_pipeline.pruning.obs.obs_update` with ``update="joint"``), already-removed weights kept
in Q so they stay zero.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from wf_pipeline.fisher.inverse import BlockFisherInverse, BlockLayout
from wf_pipeline.pruning.obs import obs_update, spd_solve


@dataclass(frozen=True)
class RowBlocks:
    """How a consumer weight ``(rows, units·unit)`` is cut into Fisher blocks of whole input channels."""

    rows: int  # output rows O
    units: int  # input channels I
    unit: int  # weights per input channel in a row (kh·kw; 1 for linear)
    per_block: int  # input channels per sub-block m

    @classmethod
    def for_weight(cls, shape: tuple[int, ...] | torch.Size, block_cap: int) -> RowBlocks:
        rows, units = int(shape[0]), int(shape[1])
        unit = math.prod(int(s) for s in shape[2:])
        widest = min(units, max(1, block_cap // unit))
        # As few sub-blocks as the cap allows, of equal width (little padding in the last one).
        per_block = math.ceil(units / math.ceil(units / widest))
        return cls(rows, units, unit, per_block)

    @property
    def block_size(self) -> int:
        return self.per_block * self.unit

    @property
    def blocks_per_row(self) -> int:
        return math.ceil(self.units / self.per_block)

    @property
    def num_blocks(self) -> int:
        return self.rows * self.blocks_per_row

    def layout(self) -> BlockLayout:
        """Blocks never cross rows: each row is a 'layer' of the layout, its last block padded."""
        return BlockLayout([self.units * self.unit] * self.rows, self.block_size)


def unit_costs(inverse: Tensor, weight: Tensor, rb: RowBlocks) -> Tensor:
    """``(O, I)``: ``½ w_{o,c}ᵀ (M^o_{cc})⁻¹ w_{o,c}``, the cost of removing input channel c from row o alone.

    `inverse` holds the ``(K, B, B)`` inverse blocks in :meth:`RowBlocks.layout` order.
    """
    layout = rb.layout()
    m, u = rb.per_block, rb.unit
    K = rb.num_blocks
    if tuple(inverse.shape) != (K, rb.block_size, rb.block_size):
        expected = (K, rb.block_size, rb.block_size)
        raise ValueError(f"inverse blocks have shape {tuple(inverse.shape)}, expected {expected}")
    w = layout.pad(weight.reshape(-1).to(inverse.dtype)).view(K, m, u)
    diag_blocks = torch.diagonal(inverse.view(K, m, u, m, u), dim1=1, dim2=3)  # (K, u, u, m)
    sub = diag_blocks.permute(0, 3, 1, 2).reshape(K * m, u, u)
    x = spd_solve(sub, w.reshape(K * m, u, 1)).view(K, m, u)
    cost = 0.5 * (w * x).sum(-1)  # (K, m): padded channels have w = 0, cost 0
    return cost.reshape(rb.rows, rb.blocks_per_row * m)[:, : rb.units]


def channel_cost(costs: Tensor, positions: Tensor, roots: Tensor, size: int) -> Tensor:
    """Per root channel: the sum over rows and over its input positions of `costs` ``(O, I)``."""
    per_position = costs.sum(0)[positions.to(costs.device)]
    out = torch.zeros(size, dtype=costs.dtype, device=costs.device)
    return out.index_add_(0, roots.to(costs.device), per_position)


def joint_update(inverse: Tensor, weight: Tensor, kept: Tensor, rb: RowBlocks, damp: float,
                 num_samples: int) -> tuple[Tensor, float]:
    """New consumer weight (zero wherever `kept` is False) after the joint group-OBS update, and
    the predicted loss increase ``½ Σ_blocks w_Qᵀ (M_QQ)⁻¹ w_Q``."""
    inv = BlockFisherInverse(rb.layout(), inverse, damp, num_samples)
    new, predicted = obs_update(inv, weight.reshape(-1), ~kept.reshape(-1), update="joint")
    return new.view_as(weight), float(predicted or 0.0)
