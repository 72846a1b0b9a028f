"""Block-diagonal inverse Fisher: every route against torch.linalg.inv of the dampened Fisher."""
from __future__ import annotations

import pytest
import torch

from wf_pipeline.fisher.inverse import (
    BlockFisherInverse,
    BlockGramAccumulator,
    BlockLayout,
    DiagonalAccumulator,
    accumulation_dtype,
    WoodburyAccumulator,
    low_rank_inverse,
)

SIZES = [23, 16, 9]  # with B=8: layer 0 has a short last block (7), layer 2 too (1)
B = 8


def reference_inverse(grads: torch.Tensor, sizes: list[int], block: int, damp: float) -> torch.Tensor:
    """Dense d×d inverse of the block-diagonal damp·I + GᵀG/N, built the slow obvious way."""
    n, d = grads.shape
    fisher = torch.zeros(d, d, dtype=torch.float64)
    offset = 0
    for size in sizes:
        for start in range(0, size, block):
            idx = slice(offset + start, offset + min(start + block, size))
            g = grads[:, idx].double()
            fisher[idx, idx] = g.T @ g / n
        offset += size
    fisher += damp * torch.eye(d, dtype=torch.float64)
    return torch.linalg.inv(fisher)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_grads(n: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    scales = torch.rand(sum(SIZES), generator=g) * 2  # uneven coordinate scales
    return (torch.randn(n, sum(SIZES), generator=g) * scales).to(dtype)


def test_layout_pad_unpad_roundtrip() -> None:
    layout = BlockLayout(SIZES, B)
    assert layout.num_blocks == 3 + 2 + 2
    assert [layout.block_length(i) for i in range(layout.num_blocks)] == [8, 8, 7, 8, 8, 8, 1]
    v = torch.arange(float(sum(SIZES)))
    padded = layout.pad(v)
    assert padded.shape == (7, 8)
    assert torch.equal(layout.unpad(padded), v)
    assert int(layout.valid().sum()) == sum(SIZES)
    assert float(padded[~layout.valid()].abs().sum()) == 0.0


@pytest.mark.parametrize("damp", [1e-3, 1e-1])
@pytest.mark.parametrize("n", [5, 30])  # N < B and N > B
@pytest.mark.parametrize("route", ["fast", "woodbury", "lowrank"])
def test_routes_match_dense_inverse_fp64(route: str, n: int, damp: float) -> None:
    grads = make_grads(n)
    chunks = list(grads.split(7))  # several chunks of uneven length
    inv = BlockFisherInverse.from_gradients(chunks, B, damp, route=route, sizes=SIZES)
    ref = reference_inverse(grads, SIZES, B, damp)
    assert rel_err(inv.dense(), ref) <= 1e-4
    assert rel_err(inv.diag(), torch.diagonal(ref)) <= 1e-4
    v = torch.randn(sum(SIZES), dtype=torch.float64)
    assert rel_err(inv.matvec(v), ref @ v) <= 1e-4
    vs = torch.randn(3, sum(SIZES), dtype=torch.float64)
    assert rel_err(inv.matvec(vs), vs @ ref.T) <= 1e-4
    assert inv.block(6).shape == (1, 1) and inv.block(2).shape == (7, 7)


def test_paper_dampening_fp64_routes_agree() -> None:
    """λ = 1e-5 (the paper's) with N < B: the matrix is badly conditioned; fp64 routes still agree."""
    grads = make_grads(5)
    ref = reference_inverse(grads, SIZES, B, 1e-5)
    for route in ("fast", "woodbury", "lowrank"):
        inv = BlockFisherInverse.from_gradients(grads, B, 1e-5, route=route, sizes=SIZES)
        assert rel_err(inv.dense(), ref) <= 1e-4, route


def test_fp32_against_fp64_reference_at_paper_dampening() -> None:
    """fp32 with λ=1e-5. N > B: the fp32 fast route stays within 1e-4 of the fp64 reference.
    N < B: rounding the rank-deficient Gram to fp32 costs ~1e-3..1e-2 relative error (a known limit),
    so the accumulation precision policy switches that case to fp64, which restores ≤1e-4."""
    grads = make_grads(40, seed=3).float()
    ref = reference_inverse(grads, SIZES, B, 1e-5)
    fast32 = BlockFisherInverse.from_gradients(grads, B, 1e-5, route="fast", sizes=SIZES)
    assert fast32.blocks.dtype == torch.float32
    assert rel_err(fast32.dense(), ref) <= 1e-4

    few = make_grads(5, seed=3).float()
    ref_few = reference_inverse(few, SIZES, B, 1e-5)
    naive = BlockFisherInverse.from_gradients(few, B, 1e-5, route="fast", sizes=SIZES)
    naive_err = rel_err(naive.dense(), ref_few)
    assert accumulation_dtype(5, B, torch.float32) == torch.float64
    assert accumulation_dtype(40, B, torch.float32) == torch.float32
    policy = BlockFisherInverse.from_gradients(few, B, 1e-5, route="fast", sizes=SIZES,
                                               dtype=accumulation_dtype(5, B, torch.float32))
    policy_err = rel_err(policy.dense(), ref_few)
    assert policy_err <= 1e-4 and policy_err < naive_err, (policy_err, naive_err)


def test_accumulator_reduce_sums_statistics() -> None:
    """Two 'ranks' each accumulating half the gradients, then summed, equal one accumulator."""
    layout = BlockLayout(SIZES, B)
    grads = make_grads(20, seed=5)
    whole = BlockGramAccumulator(layout, dtype=torch.float64)
    whole.add(grads)
    rank0, rank1 = BlockGramAccumulator(layout, dtype=torch.float64), BlockGramAccumulator(layout, dtype=torch.float64)
    rank0.add(grads[:12])
    rank1.add(grads[12:])
    others = iter([rank1.gram, rank1.grad_sum, rank1.count])
    rank0.reduce(lambda t: t.add_(next(others)))
    assert torch.allclose(rank0.gram, whole.gram) and torch.allclose(rank0.mean_gradient(), grads.mean(0))
    assert rank0.num_samples == 20
    ref = reference_inverse(grads, SIZES, B, 1e-2)
    assert rel_err(rank0.inverse(1e-2).dense(), ref) <= 1e-6


def test_woodbury_checks_count_and_refuses_reduce() -> None:
    layout = BlockLayout(SIZES, B)
    acc = WoodburyAccumulator(layout, 1e-2, num_samples=4, dtype=torch.float64)
    acc.add(make_grads(3))
    with pytest.raises(ValueError):
        acc.inverse()
    with pytest.raises(ValueError):
        acc.add(make_grads(2))
    with pytest.raises(ValueError):
        acc.reduce(lambda t: None)


def test_low_rank_function_directly() -> None:
    grads = make_grads(3, seed=9)
    layout = BlockLayout(SIZES, B)
    inv = low_rank_inverse(grads, layout, 1e-3)
    assert rel_err(inv.dense(), reference_inverse(grads, SIZES, B, 1e-3)) <= 1e-6


def test_diagonal_accumulator() -> None:
    grads = make_grads(11, seed=2)
    acc = DiagonalAccumulator(sum(SIZES), dtype=torch.float64)
    for part in grads.split(4):
        acc.add(part)
    assert torch.allclose(acc.fisher_diag(1e-3), 1e-3 + grads.square().mean(0))


def test_indefinite_blocks_are_repaired_and_counted() -> None:
    """A block made indefinite (as fp32 rounding can do at tiny λ) is retried in fp64 with jitter;
    the healthy blocks are inverted exactly and the repair is reported."""
    layout = BlockLayout([3 * B], B)
    acc = BlockGramAccumulator(layout, dtype=torch.float32)
    grads = make_grads(20, seed=11)[:, : 3 * B].float()
    acc.add(grads)
    acc.gram[1] -= 5.0 * torch.eye(B)  # far below -λ: indefinite even in fp64
    inv = acc.inverse(1e-2)
    assert inv.repaired_blocks == 1
    assert torch.isfinite(inv.blocks).all()
    healthy = reference_inverse(grads, [3 * B], B, 1e-2)
    for k in (0, 2):
        idx = slice(k * B, (k + 1) * B)
        assert rel_err(inv.block(k), healthy[idx, idx]) <= 1e-4
    assert torch.linalg.eigvalsh(inv.block(1).double()).min() > 0, "repaired block is a valid SPD inverse"
