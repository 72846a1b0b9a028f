"""K-FAC-based OBS pruning (research baseline; needs the optional ``research`` extra).

K-FAC approximates each layer's Fisher by a Kronecker product ``F ≈ G ⊗ A``: ``A`` the covariance of
the layer's inputs (patches, for a convolution), ``G`` that of the gradients at its outputs. In the flat
row-major order of a weight ``(out, in...)`` entry ``(o, i), (o', i')`` is ``G[o,o'] A[i,i']``. The
factors come from curvlinops-for-pytorch (``KFACLinearOperator``), not from code of ours.

With the eigendecompositions ``A = Q_A S_A Q_Aᵀ`` and ``G = Q_G S_G Q_Gᵀ`` the exactly dampened inverse
``(G ⊗ A + λI)⁻¹ = (Q_G ⊗ Q_A) diag(1 / (s_g s_a + λ)) (Q_G ⊗ Q_A)ᵀ`` gives, per layer and with no
``d×d`` matrix ever formed:

* the diagonal ``[F⁻¹]_qq = Σ_{g,a} Q_G[o,g]² Q_A[i,a]² / (s_g s_a + λ)``, hence the OBS statistic
  ``ρ_q = w_q² / (2 [F⁻¹]_qq)``;
* products ``F⁻¹ X = Q_G ((Q_Gᵀ X Q_A) / (s_g s_a + λ)) Q_Aᵀ``, hence the OBS update. Pruning many
  weights at once sums the single-weight OBS updates (``update: independent``, as K-FAC pruning does in
  the literature): ``δw = −F⁻¹ u`` with ``u_q = w_q / [F⁻¹]_qq`` on the pruned weights; a joint update
  would need ``[F⁻¹]_QQ`` over whole layers.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from wf_pipeline.errors import WFError

# Our fisher_type names → curvlinops' FisherType values.
CURVLINOPS_FISHER = {"empirical": "empirical", "true": "mc", "type-2": "type-2"}


def require_curvlinops() -> Any:
    """The curvlinops module, or one clear error naming the extra to install."""
    try:
        import curvlinops
    except ImportError as exc:
        raise WFError(
            "pruning method 'kfac' needs curvlinops-for-pytorch, which is not installed",
            hint="pip install 'wf-pipeline[research]' (or pip install curvlinops-for-pytorch==3.0.1)",
        ) from exc
    return curvlinops


@dataclass
class KroneckerEigen:
    """Eigendecomposition of one layer's factors: ``G = qg diag(sg) qgᵀ``, ``A = qa diag(sa) qaᵀ``."""

    qg: Tensor
    sg: Tensor
    qa: Tensor
    sa: Tensor

    @classmethod
    def from_factors(cls, grad_cov: Tensor, input_cov: Tensor) -> KroneckerEigen:
        # fp64: the factors' small eigenvalues matter once multiplied together and dampened.
        sg, qg = torch.linalg.eigh(grad_cov.double())
        sa, qa = torch.linalg.eigh(input_cov.double())
        return cls(qg, sg.clamp_min(0), qa, sa.clamp_min(0))  # covariances are PSD: clip rounding noise

    @property
    def shape(self) -> tuple[int, int]:
        return self.qg.shape[0], self.qa.shape[0]

    def _scale(self, damp: float) -> Tensor:
        return 1.0 / (self.sg.unsqueeze(1) * self.sa.unsqueeze(0) + damp)

    def inverse_diag(self, damp: float) -> Tensor:
        """``[(G ⊗ A + λI)⁻¹]_qq`` as an ``(out, in)`` matrix."""
        return self.qg.square() @ self._scale(damp) @ self.qa.square().T

    def inverse_matmul(self, x: Tensor, damp: float) -> Tensor:
        """``(G ⊗ A + λI)⁻¹ vec(x)`` for ``x`` of shape ``(out, in)`` (row-major vec)."""
        rotated = self.qg.T @ x.double() @ self.qa
        return self.qg @ (rotated * self._scale(damp)) @ self.qa.T

    def dense(self) -> Tensor:
        """``G ⊗ A`` as a matrix (tests and small layers only)."""
        g = (self.qg * self.sg) @ self.qg.T
        a = (self.qa * self.sa) @ self.qa.T
        return torch.kron(g, a)


def owning_modules(model: nn.Module, params: Mapping[str, nn.Parameter]) -> dict[str, str]:
    """Parameter name → name of the Linear/Conv2d module whose ``weight`` it is (K-FAC supports those)."""
    by_id = {id(module.weight): name for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, nn.Conv2d)) and isinstance(getattr(module, "weight", None), Tensor)}
    owners = {}
    for name, param in params.items():
        if id(param) not in by_id:
            raise WFError(f"pruning method 'kfac' cannot prune {name!r}: K-FAC covers only Linear and Conv2d weights",
                          hint="restrict pruning.layers to convolution and linear weights")
        owners[name] = by_id[id(param)]
    return owners


def kfac_factors(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Iterable[tuple[Tensor, Tensor]],
    fisher_type: str = "empirical",
    loss_fn: nn.Module | None = None,
) -> dict[str, KroneckerEigen]:
    """K-FAC factors (eigendecomposed) of every selected weight, from curvlinops.

    `batches` is the (finite) list of Fisher mini-batches; the model should be in eval mode.
    ``fisher_type``: ``empirical`` (the data's labels, as WoodFisher), ``true`` (one label sampled from
    the model per input) or ``type-2`` (the exact expectation over labels).
    """
    cl = require_curvlinops()
    if fisher_type not in CURVLINOPS_FISHER:
        raise ValueError(f"unknown fisher_type {fisher_type!r}; expected one of {tuple(CURVLINOPS_FISHER)}")
    owners = owning_modules(model, params)
    data = [(x, y) for x, y in batches]
    operator = cl.KFACLinearOperator(
        model, loss_fn or nn.CrossEntropyLoss(), list(params.values()), data,
        fisher_type=CURVLINOPS_FISHER[fisher_type], check_deterministic=False,
        num_data=sum(len(y) for _, y in data),
    )
    operator.compute_kronecker_factors()
    state = operator.state_dict()
    factors = {}
    for name, param in params.items():
        module = owners[name]
        grad_cov, input_cov = state["gradient_covariances"][module], state["input_covariances"][module]
        if not (bool(torch.isfinite(grad_cov).all()) and bool(torch.isfinite(input_cov).all())):
            raise WFError(f"K-FAC factors of {name!r} are non-finite (a gradient overflowed)",
                          "check the model's weights and the Fisher data")
        eigen = KroneckerEigen.from_factors(grad_cov, input_cov)
        if eigen.shape[0] * eigen.shape[1] != param.numel():
            raise WFError(f"K-FAC factors of {name!r} have shape {eigen.shape}, "
                          f"which does not match {tuple(param.shape)}")
        factors[name] = eigen
    return factors


def kfac_scores(params: Mapping[str, nn.Parameter], factors: Mapping[str, KroneckerEigen], damp: float) -> Tensor:
    """OBS statistic ``w_q² / (2 [F⁻¹]_qq)`` of every selected weight, flat, in the order of `params`."""
    parts = []
    for name, param in params.items():
        w = param.detach().double().reshape(factors[name].shape)
        parts.append((w.square() / (2 * factors[name].inverse_diag(damp))).reshape(-1))
    return torch.cat(parts)


def kfac_independent_update(
    params: Mapping[str, nn.Parameter], factors: Mapping[str, KroneckerEigen], pruned: Tensor, damp: float
) -> tuple[Tensor, float]:
    """Flat new weights (pruned ones exactly 0) after the summed single-weight OBS updates, and the
    predicted loss increase ``Σ_q w_q² / (2 [F⁻¹]_qq)`` over the pruned weights."""
    out, predicted, offset = [], 0.0, 0
    for name, param in params.items():
        eigen = factors[name]
        n = param.numel()
        w = param.detach().double().reshape(eigen.shape)
        mask = pruned[offset : offset + n].reshape(eigen.shape).to(w.device)
        inv_diag = eigen.inverse_diag(damp)
        u = torch.where(mask, w / inv_diag, torch.zeros_like(w))
        predicted += 0.5 * float((u * w).sum())
        new = (w - eigen.inverse_matmul(u, damp)).masked_fill(mask, 0.0)
        out.append(new.reshape(-1).to(param.dtype))
        offset += n
    return torch.cat(out), predicted


def take_finite_samples(model: nn.Module, batches: Callable[[], Iterable[tuple[Tensor, Tensor]]], count: int,
                        device: torch.device, nonfinite: str = "error",
                        batch_size: int = 128) -> tuple[list[tuple[Tensor, Tensor]], int]:
    """The first `count` Fisher-pool samples whose loss is finite, as mini-batches, and how many were skipped.

    K-FAC's factors are sums over samples, so one non-finite sample poisons them all: as for WoodFisher's
    gradients (``pruning.woodfisher.nonfinite``), such a sample is refused naming it (``error``) or left out
    and replaced by the next (``skip``).
    """
    from wf_pipeline.fisher.gradients import SampleStream

    stream = SampleStream(batches, device)
    kept_x: list[Tensor] = []
    kept_y: list[Tensor] = []
    have = drawn = skipped = 0
    while have < count:
        x, y = stream.take(count - have)
        with torch.no_grad():
            logits = model(x)
            loss = nn.functional.cross_entropy(logits, y, reduction="none")
        finite = torch.isfinite(x).flatten(1).all(1) & torch.isfinite(logits).flatten(1).all(1) & torch.isfinite(loss)
        if not bool(finite.all()):
            first = drawn + int((~finite).nonzero()[0, 0])
            if nonfinite == "error":
                raise WFError(f"K-FAC: Fisher sample {first} gives a non-finite loss (NaN/Inf in data or model)",
                              "clean the data or fix the model, or set pruning.woodfisher.nonfinite: skip to leave "
                              "such samples out")
            skipped += int((~finite).sum())
            if skipped > count:
                raise WFError(f"K-FAC: {skipped} Fisher samples were non-finite before {count} finite ones",
                              "clean the data or fix the model: nearly every sample gives a non-finite loss")
        kept_x.append(x[finite])
        kept_y.append(y[finite])
        have += int(finite.sum())
        drawn += len(y)
    xs, ys = torch.cat(kept_x), torch.cat(kept_y)
    return [(xs[i : i + batch_size], ys[i : i + batch_size]) for i in range(0, count, batch_size)], skipped
