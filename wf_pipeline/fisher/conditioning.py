"""Precision policy for the dampened-Fisher inverse: error estimates, checked inversion, visible repairs.

Every block is ``F = λI + G`` with ``G = (1/N) Σ g gᵀ`` (positive semi-definite). Rounding ``G`` to a
precision with unit roundoff ``u`` perturbs ``F`` by about ``u·‖G‖``, so the inverse's relative error is
about ``u·‖G‖ / λ_min(F)``, and ``λ_min(F)`` is ``λ`` itself whenever the gradients of a block do not
span it (N < B, duplicate or low-rank gradients: the usual case for real networks, whose Fisher blocks
are close to low rank). At the paper's λ = 1e-5 float32 cannot hold such blocks; float64 can, up to
gradients ~1e11·λ. The estimate used everywhere (calibrated against an exact SVD reference on random,
duplicate, low-rank and badly scaled gradients; worst observed ratio of true error to the estimate
with the constant below: about 0.5)::

    perturbation = ERROR_CONSTANT · Σ_parts u_part · sqrt(adds_part + 1) · ‖G_part‖_F   (+ u·λ)
    relative error of the block ≲ perturbation / λ_min(F)

Blocks whose estimate exceeds `rtol` are computed in float64 (see
:class:`~wf_pipeline.fisher.inverse.BlockGramAccumulator`); a block that even float64 cannot hold is
*repaired* by adding jitter ``j`` to its diagonal (its effective damping becomes ``λ + j``), and every
repair is recorded in :class:`InverseHealth`, so callers can warn, and refuse above a threshold.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor

from wf_pipeline.errors import WFError

DEFAULT_RTOL = 1e-3  # relative accuracy every inverse block is held to (Frobenius norm, per block)
DEFAULT_MAX_JITTER = 0.1  # largest repair jitter accepted by default, relative to the damping
ERROR_CONSTANT = 2.0  # see the module doc: a safety factor over the measured worst case
SAFETY = 2.0  # accumulate in low precision only while the estimate stays below rtol / SAFETY
POWER_ITERATIONS = 12
MAX_JITTER_TRIES = 14


class FisherStatisticsError(WFError):
    """The Fisher statistics contain NaN or Inf (a non-finite or float32-overflowing gradient)."""


class FisherAccuracyError(WFError):
    """The inverse cannot be computed to the requested accuracy without more repair than allowed."""


def unit_roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps / 2


@dataclass
class InverseHealth:
    """How an inverse was computed and repaired. ``max_jitter`` is relative to ``damp``."""

    damp: float
    rtol: float
    num_blocks: int = 0
    promoted_blocks: int = 0  # blocks computed in float64 because the requested precision could not hold them
    retried_blocks: int = 0  # blocks whose factorisation failed in their precision, redone in float64 (no jitter)
    jittered_blocks: int = 0  # blocks that needed extra damping to be accurate or to factorise
    max_jitter: float = 0.0
    max_error_estimate: float = 0.0  # largest estimated relative error of a block, after repairs
    working_dtype: str = ""
    route: str = ""

    @property
    def repaired_blocks(self) -> int:
        return self.retried_blocks + self.jittered_blocks

    @property
    def effective_damp_max(self) -> float:
        return self.damp * (1.0 + self.max_jitter)

    def merge(self, other: InverseHealth) -> InverseHealth:
        """Combine the health of two inverses (e.g. the sub-steps of one pruning step)."""
        return InverseHealth(
            damp=self.damp, rtol=self.rtol, num_blocks=self.num_blocks + other.num_blocks,
            promoted_blocks=self.promoted_blocks + other.promoted_blocks,
            retried_blocks=self.retried_blocks + other.retried_blocks,
            jittered_blocks=self.jittered_blocks + other.jittered_blocks,
            max_jitter=max(self.max_jitter, other.max_jitter),
            max_error_estimate=max(self.max_error_estimate, other.max_error_estimate),
            working_dtype=self.working_dtype if self.working_dtype == other.working_dtype else "mixed",
            route=self.route if self.route == other.route else "mixed",
        )

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> InverseHealth:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["repaired_blocks"] = self.repaired_blocks
        out["effective_damp_max"] = self.effective_damp_max
        return out

    def warnings(self) -> list[str]:
        """One line per repair kind (empty when nothing was repaired)."""
        lines = []
        if self.retried_blocks:
            lines.append(f"Fisher inverse: {self.retried_blocks} of {self.num_blocks} blocks failed to factorise "
                         f"in their precision and were redone in float64")
        if self.jittered_blocks:
            lines.append(f"Fisher inverse: {self.jittered_blocks} of {self.num_blocks} blocks needed extra damping "
                         f"up to {self.max_jitter:.3g} x damp (effective damping up to {self.effective_damp_max:.3g} "
                         f"instead of {self.damp:.3g})")
        return lines

    def require(self, max_jitter: float) -> None:
        """Refuse (one line) a block left beyond ``rtol`` or repaired with more than ``max_jitter · damp``."""
        if self.max_error_estimate > self.rtol:
            raise FisherAccuracyError(
                f"route {self.route!r} cannot hold the Fisher inverse to relative accuracy {self.rtol:g} in "
                f"{self.working_dtype} at damp {self.damp:g} (estimated error up to {self.max_error_estimate:.2g})",
                hint="use route: fast (it moves such blocks to float64 and repairs them), "
                     "or raise pruning.woodfisher.damp",
            )
        if self.max_jitter > max_jitter:
            raise FisherAccuracyError(
                f"the Fisher inverse needed extra damping up to {self.max_jitter:.3g} x damp in "
                f"{self.jittered_blocks} of {self.num_blocks} blocks (effective damping {self.effective_damp_max:.3g} "
                f"instead of {self.damp:.3g}): the gradients are too large for this damping even in float64",
                # Later steps see larger gradients and need more (x8 over the tiny recipe's run): the values
                # named keep a margin of 10 or more, so following the hint gets through the run.
                hint=f"raise pruning.woodfisher.damp to {_with_margin(self.effective_damp_max)}, or accept the "
                     f"repair with pruning.woodfisher.max_repair_jitter: {_with_margin(self.max_jitter)} "
                     f"(this step needs {self.effective_damp_max:.2g} or {_round_up(self.max_jitter)}; later steps "
                     "can need more)",
            )


def _with_margin(x: float) -> str:
    """The power of ten at or above 10·x, for a hint whose value must hold for the steps still to come."""
    if not math.isfinite(x) or x <= 0:
        return str(x)
    return f"{10.0 ** math.ceil(math.log10(10 * x)):g}"


def _round_up(x: float) -> str:
    """A short number >= x for a hint."""
    if not math.isfinite(x) or x <= 0:
        return str(x)
    exponent = math.floor(math.log10(x))
    mantissa = math.ceil(x / 10**exponent * 10) / 10
    return f"{mantissa:g}e{exponent}" if exponent else f"{mantissa:g}"


def frobenius_norms(mats: Tensor) -> Tensor:
    """``‖M_k‖_F`` per block in float64, without a float64 copy of the blocks."""
    return torch.linalg.vector_norm(mats, dim=(-2, -1)).double()


def largest_eigenvalue(mats: Tensor) -> Tensor:
    """Estimate of ``λ_max`` of symmetric positive (semi-)definite blocks (power iteration, 4 vectors).

    Started from a fixed pseudo-random block so results are reproducible; accurate to a few percent
    after :data:`POWER_ITERATIONS` steps whenever the top eigenvalue stands out, and within the cluster
    of top eigenvalues otherwise (which is all the error estimate needs).
    """
    if mats.shape[0] == 0:
        return torch.zeros(0, dtype=torch.float64, device=mats.device)
    m = mats.double()
    gen = torch.Generator(device="cpu").manual_seed(0)
    v = torch.randn(m.shape[-1], 4, generator=gen, dtype=torch.float64).to(m.device).expand(m.shape[0], -1, -1)
    for _ in range(POWER_ITERATIONS):
        v = torch.bmm(m, v)
        v = v / torch.linalg.vector_norm(v, dim=1, keepdim=True).clamp_min(torch.finfo(torch.float64).tiny)
    return (v * torch.bmm(m, v)).sum(1).amax(-1)


def invert_checked_(
    mats: Tensor, damp: float, perturbation: Tensor, rtol: float, repair_above: float | None = None
) -> dict[str, Any]:
    """Invert dampened Fisher blocks ``F = λI + G`` in place and estimate each block's relative error.

    `mats` holds ``F`` in its working precision; `perturbation` (per block, float64) is the estimated
    absolute size of the rounding in ``F`` (see the module doc). Blocks whose a priori estimate
    ``perturbation / λ`` exceeds `rtol` are re-estimated with their actual ``λ_min``. Blocks whose
    estimate still exceeds `repair_above` (default `rtol`), or whose Cholesky fails, are redone in
    float64 with the smallest jitter that brings the estimate under `rtol` (grown tenfold while the
    factorisation still fails). A caller that could not promote blocks in advance passes a large
    `repair_above`: an estimate between the two is kept (and reported), since jitter would move the
    block further from the exact inverse than the rounding did. Returns the number of blocks retried in
    float64 (without jitter) and jittered, the largest jitter (relative to λ) and the largest estimate.
    """
    repair_above = rtol if repair_above is None else max(repair_above, rtol)
    k = mats.shape[0]
    stats: dict[str, Any] = {"retried": 0, "jittered": 0, "max_jitter": 0.0, "max_error": 0.0}
    if k == 0:
        return stats
    estimate = perturbation / damp  # λ_min(F) >= λ, so this bounds the estimate a priori
    risky = (estimate > rtol).nonzero().squeeze(1)
    saved = {}  # float64 copies of F for blocks that may need a repair (taken before the in-place inverse)
    keep = (estimate > repair_above).nonzero().squeeze(1)
    if keep.numel():
        saved = dict(zip(keep.tolist(), mats[keep].double().unbind(0), strict=True))
    chol, info = torch.linalg.cholesky_ex(mats)
    good = (info == 0).nonzero().squeeze(1)
    if good.numel() == k:
        torch.cholesky_inverse(chol, out=mats)
    elif good.numel():
        mats[good] = torch.cholesky_inverse(chol[good])

    to_jitter: list[int] = []
    risky_ok = risky[info[risky] == 0]
    if risky_ok.numel():  # refine with the actual λ_min of the factorised blocks
        estimate[risky_ok] = perturbation[risky_ok] * largest_eigenvalue(mats[risky_ok])
        to_jitter += risky_ok[estimate[risky_ok] > repair_above].tolist()
    for block in (info != 0).nonzero().squeeze(1).tolist():  # failed in their precision: retry in float64
        f64 = saved.get(block)
        if f64 is None:
            f64 = saved[block] = mats[block].double()
        chol64, info64 = torch.linalg.cholesky_ex(f64)
        if int(info64) == 0:
            inv64 = torch.cholesky_inverse(chol64)
            estimate[block] = perturbation[block] * largest_eigenvalue(inv64.unsqueeze(0))[0]
            if float(estimate[block]) <= repair_above:
                mats[block] = inv64.to(mats.dtype)
                stats["retried"] += 1
                continue
        to_jitter.append(block)
    for block in to_jitter:
        jitter, inv64 = jittered_inverse(saved[block], damp, float(perturbation[block]), rtol)
        mats[block] = inv64.to(mats.dtype)
        estimate[block] = float(perturbation[block]) / (damp + jitter)
        if jitter > 0:
            stats["jittered"] += 1
            stats["max_jitter"] = max(stats["max_jitter"], jitter / damp)
    stats["max_error"] = float(estimate.max())
    return stats


def jittered_inverse(f64: Tensor, damp: float, perturbation: float, rtol: float) -> tuple[float, Tensor]:
    """Smallest jitter ``j`` with ``perturbation / (λ + j) <= rtol`` (grown while Cholesky fails) and the inverse."""
    jitter = max(0.0, 1.1 * perturbation / rtol - damp)
    eye = torch.eye(f64.shape[-1], dtype=f64.dtype, device=f64.device)
    for _ in range(MAX_JITTER_TRIES):
        chol, info = torch.linalg.cholesky_ex(f64 + jitter * eye)
        if int(info) == 0:
            return jitter, torch.cholesky_inverse(chol)
        jitter = damp if jitter == 0.0 else jitter * 10
    raise FisherAccuracyError(
        f"a Fisher block is not positive definite even with jitter {jitter:.3g} ({jitter / damp:.3g} x damp)",
        hint="the statistics are corrupted or the damping is far too small for the gradient scale; raise "
             "pruning.woodfisher.damp",
    )
