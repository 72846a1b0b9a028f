"""The research studies: their maths against exact references, and `run_all.py --quick` end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks import hessian_quality as hq  # noqa: E402


def tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()


def tiny_data(n: int = 40) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


# ----------------------------------------------------------------------------- RQ1 maths
@pytest.mark.parametrize("index", [0, 2, 4])
def test_curvlinops_block_is_the_exact_hessian_block(index: int) -> None:
    """The Hessian block RQ1 builds from curvlinops (on the network's suffix) equals autograd's."""
    cl = pytest.importorskip("curvlinops")
    model, (x, y) = tiny_mlp(), tiny_data()
    layer = model[index]
    block = hq.Block("b", index)
    idx = hq.block_indices(model, block)
    with torch.no_grad():
        inputs = model[:index](x)
    op = cl.HessianLinearOperator(model[index:], nn.CrossEntropyLoss(), [layer.weight], hq.batches(inputs, y, 16),
                                  check_deterministic=False)
    got = hq.operator_block(op, layer.weight.numel(), idx, columns_per_call=7)

    def loss(w: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, {f"{index}.weight": w.view_as(layer.weight)}, (x,))
        return F.cross_entropy(out, y)

    expected = torch.autograd.functional.hessian(loss, layer.weight.detach().reshape(-1))
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=1e-10)


def test_block_loss_is_the_model_loss() -> None:
    model, (x, y) = tiny_mlp(), tiny_data()
    block = hq.Block("fc2", 2)
    loss = hq.BlockLoss(model, block, x, y, hq.block_indices(model, block))
    with torch.no_grad():
        assert loss.base == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)
        w = loss.block_weights()
        w[3] = 0.0
        model[2].weight.view(-1)[3] = 0.0
        assert float(loss(w.unsqueeze(0))[0]) == pytest.approx(float(F.cross_entropy(model(x), y)), rel=1e-12)


def random_spd(d: int, seed: int) -> torch.Tensor:
    a = torch.randn(d, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(d, dtype=torch.float64)


def constrained_minimum(hessian: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Brute force: minimise ½ δᵀHδ subject to δ_Q = −w_Q by solving the KKT system."""
    d, q = len(w), int(pruned.sum())
    e = torch.eye(d, dtype=torch.float64)[pruned]  # (q, d)
    kkt = torch.zeros(d + q, d + q, dtype=torch.float64)
    kkt[:d, :d], kkt[:d, d:], kkt[d:, :d] = hessian, e.T, e
    rhs = torch.cat([torch.zeros(d, dtype=torch.float64), -w[pruned]])
    delta = torch.linalg.solve(kkt, rhs)[:d]
    return w + delta, float(0.5 * delta @ hessian @ delta)


def test_obs_removals_match_the_constrained_minimum() -> None:
    hessian = random_spd(9, 0)
    inverse = torch.linalg.inv(hessian)
    w = torch.randn(9, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    pruned = torch.zeros(9, dtype=torch.bool)
    pruned[[1, 4, 5]] = True
    got, predicted = hq.group_removal(w, inverse, pruned)
    expected, loss = constrained_minimum(hessian, w, pruned)
    torch.testing.assert_close(got, expected)
    assert predicted == pytest.approx(loss, rel=1e-10)
    singles = hq.single_weight_removal(w, inverse, torch.tensor([4, 7]))
    for row, q in zip(singles, (4, 7)):
        one = torch.zeros(9, dtype=torch.bool)
        one[q] = True
        expected, loss = constrained_minimum(hessian, w, one)
        torch.testing.assert_close(row, expected)
        assert float(hq.obs_statistic(w, inverse)[q]) == pytest.approx(loss, rel=1e-10)
