"""Optimal Brain Surgeon scores and weight updates with a block-diagonal inverse Fisher ``M = F⁻¹``.

For the quadratic model ``ΔL(δw) = ḡᵀδw + ½ δwᵀFδw`` and a pruned set Q (constraint ``δw_Q = −w_Q``):

* WoodFisher (ḡ = 0): single weight ``ρ_q = w_q² / (2 M_qq)``, update ``δw = −w_q M e_q / M_qq``.
  Joint exact update per block: ``δw = −M[:,Q] (M_QQ)⁻¹ w_Q``, loss increase ``½ w_Qᵀ (M_QQ)⁻¹ w_Q``.
* WoodTaylor (mean gradient ḡ kept): with the Newton step ``n = M ḡ`` and ``t = w − n``, the
  Lagrangian ``ḡ + Fδw + E_Q μ = 0`` gives ``δw = −n − M[:,Q] (M_QQ)⁻¹ t_Q`` and
  ``ΔL = ½ t_Qᵀ (M_QQ)⁻¹ t_Q − ½ ḡᵀn``; for one weight ``ρ_q = t_q² / (2 M_qq) − ½ ḡᵀn``.
  The last term does not depend on Q, so ranking uses ``t_q² / (2 M_qq)``.

The paper's "independent" update sums single-weight updates: ``δw = −n − M (P t / diag M)``.
Pruned weights end exactly zero. Everything is batched over blocks; the joint update solves
``(P M P + I − P) x = P t`` per block (P = diag of the pruned indicator), whose solution is
``(M_QQ)⁻¹ t_Q`` on Q and 0 elsewhere, for any number of pruned indices per block.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from wf_pipeline.fisher.inverse import BlockFisherInverse
from wf_pipeline.fisher.parallel import map_slices
from wf_pipeline.pruning.ranking import choose_pruned

UPDATES = ("joint", "independent", "none")
# Blocks solved per batched call in the joint update: bounds the temporary copies of M.
SOLVE_SLICE_BLOCKS = 64


@dataclass
class ObsResult:
    """Outcome of OBS pruning of a flat weight vector."""

    weights: Tensor  # (d,) updated weights, exactly zero where pruned
    pruned: Tensor  # (d,) bool, True for every pruned weight (old and new)
    newly_pruned: Tensor  # (d,) bool
    predicted_loss_increase: float | None


def obs_scores(weights: Tensor, inv_diag: Tensor) -> Tensor:
    """``ρ_q = w_q² / (2 [F⁻¹]_qq)``: the loss increase from pruning q alone with the OBS update."""
    return weights.square() / (2 * inv_diag.clamp_min(torch.finfo(inv_diag.dtype).tiny))


def woodtaylor_scores(weights: Tensor, inv_diag: Tensor, newton: Tensor) -> Tensor:
    """``(w_q − [F⁻¹ḡ]_q)² / (2 [F⁻¹]_qq)``: WoodTaylor's score without its q-independent term."""
    return obs_scores(weights - newton, inv_diag)


def diag_fisher_scores(weights: Tensor, fisher_diag: Tensor) -> Tensor:
    """``½ w_q² (λ + mean g_q²)``: loss increase from zeroing q under a diagonal Fisher."""
    return 0.5 * weights.square() * fisher_diag


def _spd_solve(mats: Tensor, rhs: Tensor) -> Tensor:
    """Solve batched SPD systems; systems that fail Cholesky in low precision are redone in fp64 by LU."""
    chol, info = torch.linalg.cholesky_ex(mats)
    x = torch.cholesky_solve(rhs, chol)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        x[bad] = torch.linalg.solve(mats[bad].double(), rhs[bad].double()).to(x.dtype)
    return x


def obs_update(
    inverse: BlockFisherInverse,
    weights: Tensor,
    pruned: Tensor,
    update: str = "joint",
    grad_mean: Tensor | None = None,
) -> tuple[Tensor, float | None]:
    """Updated weights (pruned ones exactly 0) and the predicted loss increase.

    `pruned` marks every pruned weight (already-zero ones may be included: their ``w_q = 0``
    constraint keeps them at zero). With `grad_mean` the WoodTaylor first-order term is used.
    ``update="none"`` only zeroes the pruned weights (no prediction is returned for it).
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; expected one of {UPDATES}")
    layout = inverse.layout
    dtype = inverse.blocks.dtype
    if update == "none":
        return weights.masked_fill(pruned, 0), None

    M = inverse.blocks
    w = layout.pad(weights.to(dtype))
    p = layout.pad(pruned, fill=False)
    if grad_mean is not None:
        g = layout.pad(grad_mean.to(dtype))
        newton = torch.bmm(M, g.unsqueeze(-1)).squeeze(-1)
        free_gain = -0.5 * float((g * newton).sum())  # −½ ḡᵀF⁻¹ḡ: the Newton step's own gain
    else:
        newton = torch.zeros_like(w)
        free_gain = 0.0
    target = torch.where(p, w - newton, torch.zeros_like(w))  # P t
    delta = -newton

    if update == "independent":
        diag = M.diagonal(dim1=-2, dim2=-1)
        scaled = target / diag.clamp_min(torch.finfo(dtype).tiny)
        delta = delta - torch.bmm(M, scaled.unsqueeze(-1)).squeeze(-1)
        predicted = float((target * scaled).sum()) / 2 + free_gain
    else:
        active = p.any(dim=1).nonzero().squeeze(1)  # only blocks with a pruned weight need a solve

        def solve(s: int, e: int) -> float:
            idx = active[s:e]
            m = M[idx]
            mask = p[idx].to(dtype)
            system = m * mask.unsqueeze(2) * mask.unsqueeze(1) + torch.diag_embed(1 - mask)
            x = _spd_solve(system, target[idx].unsqueeze(-1))  # (M_QQ)⁻¹ t_Q, zero off Q
            x = x * mask.unsqueeze(-1)  # exact zeros off Q whatever the rounding
            delta[idx] -= torch.bmm(m, x).squeeze(-1)  # slices own disjoint blocks
            return 0.5 * float((target[idx].unsqueeze(-1) * x).sum())

        predicted = free_gain + sum(map_slices(solve, active.numel(), SOLVE_SLICE_BLOCKS))
    new_weights = layout.unpad(w + delta).masked_fill(pruned, 0).to(weights.dtype)
    return new_weights, predicted


def obs_prune(
    weights: Tensor,
    inverse: BlockFisherInverse,
    sparsity: float,
    kept: Tensor | None = None,
    update: str = "joint",
    grad_mean: Tensor | None = None,
    ranking: str = "global",
    sizes: Sequence[int] | None = None,
) -> ObsResult:
    """OBS-prune a flat weight vector to `sparsity` (fraction of zeros, counting already-pruned ones).

    Scores are WoodFisher's ``ρ`` (or WoodTaylor's with `grad_mean`); `kept` (bool, default all
    True) marks weights still alive; `ranking` is ``global`` or ``uniform`` over `sizes` (default: the
    inverse's layer sizes).
    """
    if weights.shape != (inverse.dim,):
        raise ValueError(f"weights must be flat of length {inverse.dim}, got {tuple(weights.shape)}")
    kept = torch.ones_like(weights, dtype=torch.bool) if kept is None else kept.to(torch.bool)
    dtype = inverse.blocks.dtype
    w = weights.to(dtype)
    diag = inverse.diag()
    if grad_mean is None:
        scores = obs_scores(w, diag)
    else:
        scores = woodtaylor_scores(w, diag, inverse.matvec(grad_mean.to(dtype)))
    new = choose_pruned(scores, kept, list(sizes or inverse.layout.sizes), sparsity, ranking)
    pruned = ~kept | new
    new_weights, predicted = obs_update(inverse, weights, pruned, update=update, grad_mean=grad_mean)
    return ObsResult(new_weights, pruned, new, predicted)
