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

WoodTaylor's Newton step ``n = F⁻¹ḡ`` grows like ``λ^-½`` as the damping shrinks (the quadratic
model is flat along the Fisher's near-null directions, where ``F⁻¹`` is ``1/λ``), so it is taken
as a trust-region step: :func:`newton_step_scale` scales it per layer to at most ``cap·‖w_layer‖``
(the research code's update normalisation, applied to the Newton part only: ``cap = 0`` is exactly
WoodFisher). With a scale η the update solves the same constrained problem with gradient ``ηḡ``
(``t = w − ηn``), and the predicted loss increase is that of the true quadratic model (gradient ḡ).
"""
from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch
from torch import Tensor

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.inverse import BlockFisherInverse
from wf_pipeline.fisher.parallel import map_slices
from wf_pipeline.pruning.ranking import choose_pruned

if TYPE_CHECKING:
    from wf_pipeline.fisher.streamed import GroupedInverse

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
    """``½ w_q² (λ + mean g_q²)``: loss increase from zeroing q under a diagonal Fisher (never NaN/Inf)."""
    scores = 0.5 * weights.square() * fisher_diag
    bad = ~torch.isfinite(scores)
    if bool(bad.any()):
        raise NonFiniteWeightsError(
            f"diagonal-Fisher scores are NaN/Inf for {int(bad.sum())} of {scores.numel()} weights",
            hint="the weights or the Fisher statistics are not finite (or overflow): check the model being pruned",
        )
    return scores


class NonFiniteWeightsError(WFError):
    """Weights going into, or coming out of, a pruning update are NaN/Inf."""


def require_finite(weights: Tensor, what: str, sizes: Sequence[int] | None = None) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the layers (by index) where `weights` has NaN/Inf."""
    bad = ~torch.isfinite(weights)
    if not bool(bad.any()):
        return
    layers = [i for i, part in enumerate(bad.split(list(sizes))) if bool(part.any())] if sizes else []
    where = f" (selected layer {'indices' if len(layers) > 1 else 'index'} {', '.join(map(str, layers[:5]))}" \
            f"{', ...' if len(layers) > 5 else ''})" if layers else ""
    raise NonFiniteWeightsError(
        f"{what} contain NaN/Inf in {int(bad.sum())} of {weights.numel()} weights{where}",
        hint="nothing was written to the model; check the model's weights and the Fisher data for non-finite "
             "values (or a float32 overflow)",
    )


def newton_step_scale(newton: Tensor, weights: Tensor, sizes: Sequence[int], cap: float) -> Tensor:
    """Per-weight η (constant per layer): ``η_l = min(1, cap·‖w_l‖ / ‖n_l‖)`` for the Newton step ``n``.

    ``cap = 0`` gives η = 0 (no first-order step: WoodFisher); ``cap = inf`` gives the full step.
    """
    parts = []
    for n_l, w_l in zip(newton.split(list(sizes)), weights.split(list(sizes)), strict=True):
        norm = float(torch.linalg.vector_norm(n_l.double()))
        limit = cap * float(torch.linalg.vector_norm(w_l.double()))
        eta = 1.0 if norm <= limit else (limit / norm if math.isfinite(limit) else 1.0)
        parts.append(torch.full_like(n_l, eta))
    return torch.cat(parts)


def spd_solve(mats: Tensor, rhs: Tensor) -> Tensor:
    """Solve batched SPD systems; systems that fail Cholesky in low precision are redone in fp64 by LU, and
    those singular even in fp64 (a heavily repaired inverse at a tiny damp) get the least-squares solution of
    least norm (the pseudo-inverse's), so a step never fails on a block it can still update."""
    chol, info = torch.linalg.cholesky_ex(mats)
    x = torch.cholesky_solve(rhs, chol)
    bad = (info != 0).nonzero().squeeze(1)
    if bad.numel():
        mats64, rhs64 = mats[bad].double(), rhs[bad].double()
        solved, lu_info = torch.linalg.solve_ex(mats64, rhs64)
        singular = (lu_info != 0) | ~torch.isfinite(solved).flatten(1).all(dim=1)
        if bool(singular.any()):
            solved[singular] = torch.linalg.pinv(mats64[singular], hermitian=True) @ rhs64[singular]
        x[bad] = solved.to(x.dtype)
    return x


def obs_update(
    inverse: BlockFisherInverse,
    weights: Tensor,
    pruned: Tensor,
    update: str = "joint",
    grad_mean: Tensor | None = None,
    newton_scale: Tensor | float | None = None,
) -> tuple[Tensor, float | None]:
    """Updated weights (pruned ones exactly 0) and the predicted loss increase.

    `pruned` marks the weights to prune now. Weights that are exactly zero are held at zero as well
    (added to the constraint set), whether `pruned` lists them or not: they are the ones pruned
    earlier, and the compensating update must not revive them. With `grad_mean` the WoodTaylor
    first-order term is used, its Newton step scaled by `newton_scale` (per weight or scalar; default 1;
    see :func:`newton_step_scale`). ``update="none"`` only zeroes the pruned weights (no prediction).
    Raises :class:`NonFiniteWeightsError`, writing nothing, if the weights in or out are NaN/Inf.
    """
    if update not in UPDATES:
        raise ValueError(f"unknown update {update!r}; expected one of {UPDATES}")
    sizes = inverse.layout.sizes
    require_finite(weights, "the weights to prune", sizes)
    pruned = pruned | (weights == 0)
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
        if newton_scale is not None:
            eta = newton_scale if isinstance(newton_scale, float) else layout.pad(newton_scale.to(dtype))
            newton = newton * eta
            g_step = g * eta  # the gradient of the scaled problem: F·(ηn) = ηḡ
        else:
            g_step = g
    else:
        g = g_step = torch.zeros_like(w)
        newton = torch.zeros_like(w)
    target = torch.where(p, w - newton, torch.zeros_like(w))  # P t
    delta = -newton

    if update == "independent":
        diag = M.diagonal(dim1=-2, dim2=-1)
        scaled = target / diag.clamp_min(torch.finfo(dtype).tiny)
        delta = delta - torch.bmm(M, scaled.unsqueeze(-1)).squeeze(-1)
        # the sum of single-weight predictions ρ_q (each with the shared Newton gain)
        predicted = float((target * scaled).sum()) / 2 + _newton_gain(g, g_step, newton)
    else:
        active = p.any(dim=1).nonzero().squeeze(1)  # only blocks with a pruned weight need a solve
        x_all = torch.zeros_like(w)

        def solve(s: int, e: int) -> None:
            idx = active[s:e]
            m = M[idx]
            mask = p[idx].to(dtype)
            system = m * mask.unsqueeze(2) * mask.unsqueeze(1) + torch.diag_embed(1 - mask)
            x = spd_solve(system, target[idx].unsqueeze(-1))  # (M_QQ)⁻¹ t_Q, zero off Q
            x = x * mask.unsqueeze(-1)  # exact zeros off Q whatever the rounding
            delta[idx] -= torch.bmm(m, x).squeeze(-1)  # slices own disjoint blocks
            x_all[idx] = x.squeeze(-1)

        map_slices(solve, active.numel(), SOLVE_SLICE_BLOCKS)
        # ΔL = ḡᵀδ + ½δᵀFδ with Fδ = −ηḡ − x (x on Q, δ_Q = −w_Q): ΔL = (ḡ − ½ηḡ)ᵀδ + ½ w_Qᵀx
        predicted = float(((g - 0.5 * g_step) * delta).sum()) + 0.5 * float((w * x_all).sum())
    new_weights = layout.unpad(w + delta).masked_fill(pruned, 0).to(weights.dtype)
    require_finite(new_weights, "the OBS update produced weights that", sizes)
    return new_weights, predicted


class SlicedInverse(Protocol):
    """An inverse Fisher handed out slice by slice (:class:`~wf_pipeline.fisher.engine.FisherInverse`)."""

    grad_mean: Tensor | None

    def inverse_slices(self) -> Iterator[tuple[int, int, BlockFisherInverse]]: ...


def obs_update_sliced(
    fisher: SlicedInverse,
    weights: Tensor,
    pruned: Tensor,
    update: str = "joint",
    newton_scale: Tensor | None = None,
) -> tuple[Tensor, float | None]:
    """:func:`obs_update` over an inverse taken slice by slice (the update is block-local): the same result.

    The WoodTaylor term is used when the inverse holds a mean gradient; `newton_scale` (per weight) caps its
    Newton step as :func:`obs_update` does."""
    return _update_slices(fisher.inverse_slices(), fisher.grad_mean, weights, pruned, update, newton_scale)


def obs_update_grouped(
    grouped: GroupedInverse,
    weights: Tensor,
    pruned: Tensor,
    update: str = "joint",
    use_grad_mean: bool = False,
    newton_scale: Tensor | None = None,
) -> tuple[Tensor, float | None]:
    """:func:`obs_update_sliced` over a streamed inverse, its mean gradient used only with `use_grad_mean`."""
    mean = grouped.grad_mean if use_grad_mean else None
    return _update_slices(grouped.inverse_slices(), mean, weights, pruned, update, newton_scale)


def _update_slices(slices: Iterator[tuple[int, int, BlockFisherInverse]], grad_mean: Tensor | None, weights: Tensor,
                   pruned: Tensor, update: str, newton_scale: Tensor | None) -> tuple[Tensor, float | None]:
    out = torch.empty_like(weights)
    predicted: float | None = 0.0
    for lo, hi, inverse in slices:
        mean = None if grad_mean is None else grad_mean[lo:hi]
        scale = None if newton_scale is None or mean is None else newton_scale[lo:hi]
        new, part = obs_update(inverse, weights[lo:hi], pruned[lo:hi], update=update, grad_mean=mean,
                               newton_scale=scale)
        out[lo:hi] = new
        predicted = None if predicted is None or part is None else predicted + part
        del inverse  # it may hold a whole group's blocks: let them go before the next group is read
    return out, predicted


def _newton_gain(g: Tensor, g_step: Tensor, newton: Tensor) -> float:
    """ΔL of the (scaled) Newton step alone, ``−ηn`` under the true model: ``−ḡᵀ(ηn) + ½ ηḡᵀ(ηn)``."""
    return float((-(g * newton) + 0.5 * (g_step * newton)).sum())


def obs_prune(
    weights: Tensor,
    inverse: BlockFisherInverse,
    sparsity: float,
    kept: Tensor | None = None,
    update: str = "joint",
    grad_mean: Tensor | None = None,
    ranking: str = "global",
    sizes: Sequence[int] | None = None,
    newton_cap: float | None = None,
) -> ObsResult:
    """OBS-prune a flat weight vector to `sparsity` (fraction of zeros, counting already-pruned ones).

    Scores are WoodFisher's ``ρ`` (or WoodTaylor's with `grad_mean`, its Newton step capped per layer
    at ``newton_cap·‖w_layer‖`` when given); `kept` (bool, default all True) marks weights still alive;
    `ranking` is ``global`` or ``uniform`` over `sizes` (default: the inverse's layer sizes).
    """
    if weights.shape != (inverse.dim,):
        raise ValueError(f"weights must be flat of length {inverse.dim}, got {tuple(weights.shape)}")
    kept = torch.ones_like(weights, dtype=torch.bool) if kept is None else kept.to(torch.bool)
    dtype = inverse.blocks.dtype
    w = weights.to(dtype)
    diag = inverse.diag()
    scale: Tensor | None = None
    if grad_mean is None:
        scores = obs_scores(w, diag)
    else:
        newton = inverse.matvec(grad_mean.to(dtype))
        if newton_cap is not None:
            scale = newton_step_scale(newton, w, inverse.layout.sizes, newton_cap)
            newton = newton * scale
        scores = woodtaylor_scores(w, diag, newton)
    new = choose_pruned(scores, kept, list(sizes or inverse.layout.sizes), sparsity, ranking)
    pruned = ~kept | new
    new_weights, predicted = obs_update(inverse, weights, pruned, update=update, grad_mean=grad_mean,
                                        newton_scale=scale)
    return ObsResult(new_weights, pruned, new, predicted)
