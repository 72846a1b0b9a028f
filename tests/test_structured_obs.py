"""Group OBS for channels: costs and updates against brute-force constrained solves, and the
row-block Fisher statistics against explicit per-sample gradients."""
from __future__ import annotations

from typing import cast

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wf_pipeline.pruning.structured.group_obs import RowBlocks, channel_cost, joint_update, unit_costs
from wf_pipeline.pruning.structured.statistics import row_fisher_inverses

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest single-threaded


def _block_fisher(grads: torch.Tensor, rb: RowBlocks, damp: float) -> torch.Tensor:
    """Explicit dense ``λI + GᵀG/N`` restricted to the row blocks (fp64), over the flat weight."""
    d = rb.rows * rb.units * rb.unit
    full = grads.T @ grads / grads.shape[0]
    keep = torch.zeros(d, d, dtype=torch.bool)
    index = torch.arange(d)
    row, col = index // (rb.units * rb.unit), (index % (rb.units * rb.unit)) // rb.unit
    block = row * rb.blocks_per_row + col // rb.per_block
    keep = block[:, None] == block[None, :]
    return torch.where(keep, full, torch.zeros(())) + damp * torch.eye(d, dtype=grads.dtype)


def _brute_force(fisher: torch.Tensor, w: torch.Tensor, removed: torch.Tensor) -> tuple[torch.Tensor, float]:
    """min ½ δwᵀFδw s.t. δw_Q = −w_Q, by eliminating Q (explicit solve on the free weights)."""
    q, r = removed, ~removed
    delta = torch.zeros_like(w)
    delta[q] = -w[q]
    delta[r] = -torch.linalg.solve(fisher[r][:, r], fisher[r][:, q] @ delta[q])
    return w + delta, float(0.5 * delta @ fisher @ delta)


def _columns(rb: RowBlocks, channels: list[int]) -> torch.Tensor:
    mask = torch.zeros(rb.rows, rb.units, rb.unit, dtype=torch.bool)
    mask[:, channels] = True
    return mask.reshape(-1)


def _setup(cap: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(3, 5, 3, 3, generator=gen, dtype=torch.float64)  # consumer conv: 5 input channels
    rb = RowBlocks.for_weight(weight.shape, cap)
    grads = torch.randn(40, weight.numel(), generator=gen, dtype=torch.float64)
    damp = 1e-2
    fisher = _block_fisher(grads, rb, damp)
    # Inverse blocks in the layout's (padded) order, as the accumulator would produce them.
    layout = rb.layout()
    padded = layout.pad(grads).transpose(0, 1)  # (K, N, B)
    gram = padded.mT @ padded / grads.shape[0] + damp * torch.eye(rb.block_size, dtype=torch.float64)
    return weight, rb, fisher, torch.linalg.inv(gram), damp


def test_row_blocks_hold_whole_channels():
    rb = RowBlocks.for_weight((3, 5, 3, 3), 18)
    assert (rb.unit, rb.per_block, rb.block_size, rb.blocks_per_row) == (9, 2, 18, 3)
    assert RowBlocks.for_weight((4, 7), 128).per_block == 7  # a short linear row is one block
    assert RowBlocks.for_weight((4, 2, 7, 7), 16).per_block == 1  # a 7x7 channel never splits
    assert RowBlocks.for_weight((8, 16, 3, 3), 128).per_block == 8  # two sub-blocks of 8, not 14 + 2


def test_single_channel_cost_and_update_match_brute_force():
    for cap in (18, 45, 1000):  # several padded sub-blocks per row, and one whole-row block
        weight, rb, fisher, inverse, damp = _setup(cap)
        costs = channel_cost(unit_costs(inverse, weight, rb), torch.arange(5), torch.arange(5), 5)
        for c in range(5):
            removed = _columns(rb, [c])
            expected_w, expected_cost = _brute_force(fisher, weight.reshape(-1), removed)
            assert abs(float(costs[c]) - expected_cost) <= 1e-9 * max(1.0, expected_cost)
            new, predicted = joint_update(inverse, weight, ~removed.view_as(weight), rb, damp, 40)
            torch.testing.assert_close(new.reshape(-1), expected_w, rtol=1e-9, atol=1e-9)
            assert abs(predicted - expected_cost) <= 1e-9 * max(1.0, expected_cost)
            assert (new.reshape(-1)[removed] == 0).all()


def test_joint_removal_of_two_channels_matches_brute_force():
    weight, rb, fisher, inverse, damp = _setup(18, seed=3)
    removed = _columns(rb, [1, 2])  # sub-blocks hold channels {0,1} {2,3} {4}: 1 and 2 lie in different ones
    expected_w, expected_cost = _brute_force(fisher, weight.reshape(-1), removed)
    new, predicted = joint_update(inverse, weight, ~removed.view_as(weight), rb, damp, 40)
    torch.testing.assert_close(new.reshape(-1), expected_w, rtol=1e-9, atol=1e-9)
    assert abs(predicted - expected_cost) <= 1e-9 * expected_cost
    # Two channels in one sub-block: the joint cost is not the sum of the single costs in general.
    removed = _columns(rb, [2, 3])
    _, joint_cost = _brute_force(fisher, weight.reshape(-1), removed)
    singles = channel_cost(unit_costs(inverse, weight, rb), torch.arange(5), torch.arange(5), 5)
    _, predicted = joint_update(inverse, weight, ~removed.view_as(weight), rb, damp, 40)
    assert abs(predicted - joint_cost) <= 1e-9 * joint_cost
    assert abs(joint_cost - float(singles[2] + singles[3])) > 1e-6 * joint_cost


def test_channel_cost_sums_positions_of_a_root():
    costs = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]])
    # root 0 reaches columns 0 and 2, root 1 column 1
    out = channel_cost(costs, torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), 2)
    torch.testing.assert_close(out, torch.tensor([45.0, 18.0]))


class _ConvPair(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 3, padding=1, bias=False)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(torch.relu(self.bn(self.a(x))))
        return self.fc(h.mean((2, 3)))


def test_row_fisher_matches_explicit_per_sample_gradients():
    torch.manual_seed(0)
    model = _ConvPair().double().eval()
    x = torch.randn(12, 1, 6, 6, dtype=torch.float64)
    y = torch.randint(0, 2, (12,))
    params = {"b.weight": cast(nn.Parameter, model.b.weight), "fc.weight": cast(nn.Parameter, model.fc.weight)}
    mask = torch.ones_like(model.b.weight, dtype=torch.bool)
    mask[:, 1] = False  # input channel 1 already removed: zero gradient, decoupled
    with torch.no_grad():
        model.b.weight[:, 1] = 0
    masks = {"b.weight": mask, "fc.weight": torch.ones_like(model.fc.weight, dtype=torch.bool)}
    damp = 1e-3
    result = row_fisher_inverses(model, params, lambda: [(x, y)], num_grads=12, block_cap=18, damp=damp,
                                 masks=masks, chunk_size=5, dtype=torch.float64)
    for name, param in params.items():
        rows = []
        for i in range(12):
            loss = F.cross_entropy(model(x[i : i + 1]), y[i : i + 1])
            (g,) = torch.autograd.grad(loss, [param])
            rows.append((g * masks[name]).reshape(-1))
        grads = torch.stack(rows)
        rb = result[name].blocks
        expected = torch.linalg.inv(_block_fisher(grads, rb, damp))
        layout = rb.layout()
        pos = layout.positions()
        dense = torch.block_diag(*result[name].inverse.unbind(0))[pos][:, pos]
        torch.testing.assert_close(dense, expected, rtol=1e-8, atol=1e-8)
        assert result[name].num_samples == 12
