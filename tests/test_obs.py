"""OBS scores and updates on a quadratic model with a known block-diagonal Hessian, in fp64."""
from __future__ import annotations

import pytest
import torch

from wf_pipeline.fisher.inverse import BlockFisherInverse, BlockLayout
from wf_pipeline.pruning.obs import (
    NonFiniteWeightsError,
    diag_fisher_scores,
    newton_step_scale,
    obs_prune,
    obs_scores,
    obs_update,
    woodtaylor_scores,
)


@pytest.fixture(autouse=True)
def _float64_default():
    """These checks are exact-arithmetic references: run them in fp64, then restore the default."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)

SIZES = [10, 7]  # B=4: blocks of 4,4,2 | 4,3
B = 4


def block_hessian(seed: int = 0) -> tuple[torch.Tensor, BlockFisherInverse]:
    """A random SPD block-diagonal H (blocks along the layout) and the BlockFisherInverse of it."""
    g = torch.Generator().manual_seed(seed)
    layout = BlockLayout(SIZES, B)
    blocks = torch.zeros(layout.num_blocks, B, B)
    for k in range(layout.num_blocks):
        r = layout.block_length(k)
        a = torch.randn(r, r, generator=g)
        h = a @ a.T + 0.5 * torch.eye(r)
        blocks[k] = torch.eye(B)  # padded coordinates: decoupled
        blocks[k, :r, :r] = torch.linalg.inv(h)
    inverse = BlockFisherInverse(layout, blocks, damp=1.0, num_samples=1)
    hessian = torch.linalg.inv(inverse.dense())
    return hessian, inverse


def loss_increase(hessian: torch.Tensor, delta: torch.Tensor, grad: torch.Tensor | None = None) -> float:
    """ΔL = ḡᵀδ + ½ δᵀHδ for the quadratic model ½(w−w*)ᵀH(w−w*) (ḡ = H(w−w*))."""
    first = 0.0 if grad is None else float(grad @ delta)
    return first + 0.5 * float(delta @ hessian @ delta)


def kkt_solution(hessian: torch.Tensor, w: torch.Tensor, pruned: torch.Tensor, grad: torch.Tensor | None = None):
    """Brute force: minimise ḡᵀδ + ½δᵀHδ s.t. δ_Q = −w_Q via the full KKT system."""
    d = w.numel()
    q = pruned.nonzero().squeeze(1)
    E = torch.zeros(d, q.numel())
    E[q, torch.arange(q.numel())] = 1.0
    kkt = torch.zeros(d + q.numel(), d + q.numel())
    kkt[:d, :d] = hessian
    kkt[:d, d:] = E
    kkt[d:, :d] = E.T
    rhs = torch.cat([-(grad if grad is not None else torch.zeros(d)), -w[q]])
    return torch.linalg.solve(kkt, rhs)[:d]


def test_single_weight_update_and_loss_match_closed_form() -> None:
    hessian, inverse = block_hessian()
    w = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(1))
    M = inverse.dense()
    for q in (0, 5, 9, 12, 16):
        pruned = torch.zeros_like(w, dtype=torch.bool)
        pruned[q] = True
        new_w, predicted = obs_update(inverse, w, pruned, update="joint")
        closed_delta = -w[q] * M[:, q] / M[q, q]
        closed_rho = float(w[q] ** 2 / (2 * M[q, q]))
        assert torch.allclose(new_w - w, closed_delta, atol=1e-10)
        assert new_w[q] == 0.0
        assert predicted == pytest.approx(closed_rho, rel=1e-10)
        assert loss_increase(hessian, new_w - w) == pytest.approx(closed_rho, rel=1e-9)
        assert float(obs_scores(w, inverse.diag())[q]) == pytest.approx(closed_rho, rel=1e-12)
        # independent == joint for a single weight
        new_ind, pred_ind = obs_update(inverse, w, pruned, update="independent")
        assert torch.allclose(new_ind, new_w, atol=1e-10) and pred_ind == pytest.approx(predicted)


def test_joint_update_equals_constrained_least_squares() -> None:
    hessian, inverse = block_hessian(seed=2)
    g = torch.Generator().manual_seed(3)
    w = torch.randn(sum(SIZES), generator=g)
    pruned = torch.rand(sum(SIZES), generator=g) < 0.45
    pruned[[0, 1, 2]] = True  # three in one block
    pruned[8:10] = True  # a whole short block
    new_w, predicted = obs_update(inverse, w, pruned, update="joint")
    delta = kkt_solution(hessian, w, pruned)
    assert torch.allclose(new_w - w, delta, atol=1e-9)
    assert torch.all(new_w[pruned] == 0)
    assert predicted == pytest.approx(loss_increase(hessian, delta), rel=1e-9)
    # the predicted increase is ½ w_Qᵀ (M_QQ)⁻¹ w_Q per block
    M = inverse.dense()
    q = pruned.nonzero().squeeze(1)
    assert predicted == pytest.approx(0.5 * float(w[q] @ torch.linalg.solve(M[q][:, q], w[q])), rel=1e-9)


def test_joint_beats_independent_and_independent_is_sum_of_singles() -> None:
    hessian, inverse = block_hessian(seed=4)
    w = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(5))
    pruned = torch.zeros(sum(SIZES), dtype=torch.bool)
    pruned[[1, 2, 11, 13]] = True
    joint, _ = obs_update(inverse, w, pruned, update="joint")
    independent, pred_ind = obs_update(inverse, w, pruned, update="independent")
    singles = torch.zeros_like(w)
    for q in pruned.nonzero().squeeze(1).tolist():
        one = torch.zeros_like(pruned)
        one[q] = True
        singles += obs_update(inverse, w, one, update="joint")[0] - w
    expected = (w + singles).masked_fill(pruned, 0)
    assert torch.allclose(independent, expected, atol=1e-10)
    assert pred_ind == pytest.approx(float(obs_scores(w, inverse.diag())[pruned].sum()), rel=1e-10)
    assert loss_increase(hessian, joint - w) <= loss_increase(hessian, independent - w) + 1e-12
    none, pred_none = obs_update(inverse, w, pruned, update="none")
    assert pred_none is None and torch.equal(none, w.masked_fill(pruned, 0))


def test_woodtaylor_matches_closed_form_and_kkt() -> None:
    hessian, inverse = block_hessian(seed=6)
    g = torch.Generator().manual_seed(7)
    w = torch.randn(sum(SIZES), generator=g)
    grad = 0.3 * torch.randn(sum(SIZES), generator=g)
    M = inverse.dense()
    newton = M @ grad
    # single weight: ρ_q = (w_q − n_q)² / (2 M_qq) − ½ ḡᵀn, δ = −n − (w_q − n_q) M e_q / M_qq
    q = 6
    pruned = torch.zeros(sum(SIZES), dtype=torch.bool)
    pruned[q] = True
    new_w, predicted = obs_update(inverse, w, pruned, update="joint", grad_mean=grad)
    closed_delta = -newton - (w[q] - newton[q]) * M[:, q] / M[q, q]
    closed_rho = float((w[q] - newton[q]) ** 2 / (2 * M[q, q]) - 0.5 * grad @ newton)
    assert torch.allclose(new_w - w, closed_delta, atol=1e-10)
    assert predicted == pytest.approx(closed_rho, rel=1e-9)
    assert loss_increase(hessian, new_w - w, grad) == pytest.approx(closed_rho, rel=1e-9)
    scores = woodtaylor_scores(w, inverse.diag(), inverse.matvec(grad))
    assert float(scores[q]) - 0.5 * float(grad @ newton) == pytest.approx(closed_rho, rel=1e-9)
    # joint over several weights: the KKT solution of ḡᵀδ + ½δᵀHδ s.t. δ_Q = −w_Q
    pruned[[0, 3, 12, 15, 16]] = True
    new_w, predicted = obs_update(inverse, w, pruned, update="joint", grad_mean=grad)
    delta = kkt_solution(hessian, w, pruned, grad)
    assert torch.allclose(new_w - w, delta, atol=1e-9)
    assert predicted == pytest.approx(loss_increase(hessian, delta, grad), rel=1e-9)


def test_obs_prune_picks_smallest_rho_and_counts_already_pruned() -> None:
    _, inverse = block_hessian(seed=8)
    w = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(9))
    kept = torch.ones(sum(SIZES), dtype=torch.bool)
    kept[4] = False
    w[4] = 0.0
    result = obs_prune(w, inverse, sparsity=0.5, kept=kept)
    assert int(result.pruned.sum()) == round(0.5 * w.numel())
    assert result.pruned[4] and not result.newly_pruned[4]
    rho = obs_scores(w, inverse.diag())
    assert rho[result.newly_pruned].max() <= rho[kept & ~result.pruned].min()
    assert torch.all(result.weights[result.pruned] == 0)
    uniform = obs_prune(w, inverse, sparsity=0.5, ranking="uniform", update="none")
    assert [int(c.sum()) for c in uniform.pruned.split(SIZES)] == [5, 3]  # 5 and 3.5 -> total round(8.5) = 8


# ============================================================ safeguards (issue 11)
def test_obs_update_never_revives_weights_pruned_earlier() -> None:
    """Zeros left out of `pruned` (pruned in an earlier step) stay zero: the compensation used to move them."""
    hessian, inverse = block_hessian(seed=10)
    w = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(11))
    earlier = torch.zeros(sum(SIZES), dtype=torch.bool)
    earlier[[1, 2, 12]] = True
    w[earlier] = 0.0
    now = torch.zeros(sum(SIZES), dtype=torch.bool)
    now[[0, 3, 13]] = True
    for update in ("joint", "independent", "none"):
        new_w, _ = obs_update(inverse, w, now, update=update)
        assert torch.all(new_w[earlier] == 0) and torch.all(new_w[now] == 0), update
    # and the result is the constrained optimum with the old zeros held
    new_w, predicted = obs_update(inverse, w, now, update="joint")
    delta = kkt_solution(hessian, w, now | earlier)
    assert torch.allclose(new_w - w, delta, atol=1e-9)
    assert predicted == pytest.approx(loss_increase(hessian, delta), rel=1e-9)


def test_obs_update_refuses_non_finite_weights_in_or_out() -> None:
    _, inverse = block_hessian(seed=12)
    w = torch.randn(sum(SIZES), generator=torch.Generator().manual_seed(13))
    pruned = torch.zeros(sum(SIZES), dtype=torch.bool)
    pruned[[0, 12]] = True
    bad = w.clone()
    bad[14] = float("nan")
    with pytest.raises(NonFiniteWeightsError, match="layer index 1"):
        obs_update(inverse, bad, pruned)
    broken = BlockFisherInverse(inverse.layout, inverse.blocks.clone(), 1.0, 1)
    broken.blocks[0, 1, 0] = float("inf")  # e.g. an inverse that overflowed
    with pytest.raises(NonFiniteWeightsError, match="OBS update produced"):
        obs_update(broken, w, pruned)


def test_diag_fisher_scores_never_nan() -> None:
    with pytest.raises(NonFiniteWeightsError):
        diag_fisher_scores(torch.tensor([1.0, float("nan")]), torch.tensor([1.0, 1.0]))
    with pytest.raises(NonFiniteWeightsError):
        diag_fisher_scores(torch.tensor([1.0, 2.0]), torch.tensor([float("inf"), 1.0]))


def test_capped_newton_step_solves_the_scaled_problem_and_predicts_the_true_loss() -> None:
    """With the Newton step scaled by η per layer, the update is the KKT solution for gradient ηḡ, and the
    prediction is the loss change of that update under the true quadratic model (gradient ḡ)."""
    hessian, inverse = block_hessian(seed=14)
    g = torch.Generator().manual_seed(15)
    w = torch.randn(sum(SIZES), generator=g)
    grad = 3.0 * torch.randn(sum(SIZES), generator=g)
    newton = inverse.matvec(grad)
    scale = newton_step_scale(newton, w, SIZES, cap=0.05)
    for n_l, w_l, s_l in zip(newton.split(SIZES), w.split(SIZES), scale.split(SIZES), strict=True):
        assert float((n_l * s_l).norm()) == pytest.approx(min(float(n_l.norm()), 0.05 * float(w_l.norm())), rel=1e-9)
        assert torch.all(s_l == s_l[0])  # one η per layer
    pruned = torch.zeros(sum(SIZES), dtype=torch.bool)
    pruned[[0, 3, 9, 12, 15]] = True
    new_w, predicted = obs_update(inverse, w, pruned, grad_mean=grad, newton_scale=scale)
    delta = kkt_solution(hessian, w, pruned, grad * scale)
    assert torch.allclose(new_w - w, delta, atol=1e-9)
    assert predicted == pytest.approx(loss_increase(hessian, delta, grad), rel=1e-9)
    assert torch.equal(newton_step_scale(newton, w, SIZES, cap=0.0), torch.zeros_like(w))
    assert torch.equal(newton_step_scale(newton, w, SIZES, cap=float("inf")), torch.ones_like(w))
    # cap 0 is WoodFisher exactly; the default η = 1 is the uncapped WoodTaylor
    assert torch.allclose(obs_update(inverse, w, pruned, grad_mean=grad, newton_scale=0.0)[0],
                          obs_update(inverse, w, pruned)[0], atol=1e-12)
