"""One-shot pruning for the studies: one Fisher draw, every method and sparsity.

In one-shot pruning of a dense model every gradient-based method's statistics depend only on the model
and the Fisher sample, not on the target sparsity. So one pass of N per-sample gradients gives the
block Gram (WoodFisher's inverse and WoodTaylor's mean gradient) and its diagonal (the diagonal Fisher);
one curvlinops pass over the same N samples gives the K-FAC factors. Each (method, sparsity) then
prunes a fresh copy of the model with the product's own functions (``obs_scores``, ``woodtaylor_scores``,
``diag_fisher_scores``, ``choose_pruned``, ``obs_update``), exactly as ``prune_step`` does with
``recompute_steps: 1`` (tests/test_research.py checks that they agree) but without recomputing the
gradients for every point of the sweep.

WoodFisher and K-FAC are compared under the same OBS update rule as well: each curvature's inverse,
restricted to the same diagonal blocks of B consecutive weights (:func:`kfac_block_inverse` for K-FAC),
goes through the product's ``obs_update`` with ``update="joint"`` (the constrained solve over the
block's pruned weights) or ``update="independent"`` (the summed single-weight updates). The K-FAC
literature's rule, independent updates with the whole layer's K-FAC inverse, is kept beside them.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from wf_pipeline.data import DataBundle
from wf_pipeline.data.loaders import TensorBatches
from wf_pipeline.fisher.gradients import iter_gradient_chunks
from wf_pipeline.fisher.inverse import BlockFisherInverse, BlockGramAccumulator, BlockLayout, accumulation_dtype
from wf_pipeline.pruning.obs import diag_fisher_scores, newton_step_scale, obs_scores, obs_update, woodtaylor_scores
from wf_pipeline.pruning.ranking import choose_pruned
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.schema import WoodFisherConfig
from wf_pipeline.training.epoch import evaluate
from wf_pipeline.training.oneshot import recalibrate_batchnorm

DATA_FREE = ("magnitude", "magnitude_uniform")
# Block-local OBS update rule of each method that uses one (the whole-layer K-FAC rule is apart).
BLOCK_RULES = {"woodfisher": "joint", "woodtaylor": "joint", "woodfisher_independent": "independent",
               "kfac_joint": "joint", "kfac_independent": "independent"}
KFAC_METHODS = ("kfac", "kfac_joint", "kfac_independent")
Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]


@dataclass
class Selection:
    """Which weights are pruned: regexes as in a recipe's ``pruning`` section."""

    layers: Sequence[str] = (r".*",)
    skip: Sequence[str] = ()

    def params(self, model: nn.Module) -> dict[str, nn.Parameter]:
        return select_prunable(model, list(self.layers), list(self.skip), 0)


@dataclass
class Statistics:
    """What one Fisher draw of N samples gives every gradient-based method."""

    inverse: BlockFisherInverse | None = None
    grad_mean: Tensor | None = None
    fisher_diag: Tensor | None = None
    kfac: dict | None = None
    kfac_blocks: BlockFisherInverse | None = None  # K-FAC's inverse, restricted to WoodFisher's blocks
    num_grads: int = 0
    seconds: dict[str, float] = field(default_factory=dict)


def fisher_draw(data: DataBundle, seed: int, batch_size: int = 100) -> Batches:
    """The Fisher pool in an order drawn by `seed` (the seed of a study = which samples the Fisher sees)."""
    pool = data.fisher_split
    assert pool is not None and data.preprocess is not None

    def make() -> Iterable[tuple[Tensor, Tensor]]:
        return TensorBatches(pool.images, pool.labels, data.preprocess, batch_size, shuffle=True, seed=seed, epoch=0)  # type: ignore[arg-type]

    return make


def collect_statistics(model: nn.Module, selection: Selection, batches: Batches, *, num_grads: int,
                       block_size: int = 128, damp: float = 1e-5, kfac: bool = False) -> Statistics:
    """One pass of `num_grads` per-sample gradients (+ one K-FAC pass over the same samples if asked)."""
    params = selection.params(model)
    layout = BlockLayout([p.numel() for p in params.values()], block_size)
    stats = Statistics(num_grads=num_grads)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    acc = BlockGramAccumulator(layout, dtype=accumulation_dtype(num_grads, block_size, torch.float32))
    for chunk in iter_gradient_chunks(model, params, batches, num_grads=num_grads, chunk_size=100, layout=layout):
        acc.add_blocked(chunk)
    stats.grad_mean = acc.mean_gradient()
    stats.fisher_diag = damp + layout.unpad(acc.gram.diagonal(dim1=-2, dim2=-1)) / acc.num_samples
    stats.inverse = acc.inverse(damp)
    stats.seconds["woodfisher_statistics"] = time.perf_counter() - t0
    if kfac:
        from wf_pipeline.pruning.research.kfac import kfac_factors, take_finite_samples

        t0 = time.perf_counter()
        samples, _ = take_finite_samples(model, batches, num_grads, torch.device("cpu"))  # the first num_grads
        stats.kfac = kfac_factors(model, params, samples, "empirical")
        stats.seconds["kfac_factors"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        stats.kfac_blocks = kfac_block_inverse(params, stats.kfac, damp, block_size)
        stats.seconds["kfac_blocks"] = time.perf_counter() - t0
    model.train(was_training)
    return stats


def kfac_block_inverse(params: dict[str, nn.Parameter], factors: dict, damp: float,
                       block_size: int) -> BlockFisherInverse:
    """The diagonal ``B × B`` blocks of each layer's dampened K-FAC inverse ``(G ⊗ A + λI)⁻¹``, in WoodFisher's layout.

    Entry ``(o, i), (o', i')`` of the inverse is ``Σ_g Q_G[o,g] Q_G[o',g] C_g[i,i']`` with
    ``C_g = Q_A diag(1 / (s_g s_a + λ)) Q_Aᵀ``; the ``C_g`` of a layer are formed once (``out × in × in``),
    then each block gathers its rows. Padded coordinates get ``1/λ`` on the diagonal, as in a dampened Gram.
    """
    layout = BlockLayout([p.numel() for p in params.values()], block_size)
    blocks = torch.zeros(layout.num_blocks, block_size, block_size, dtype=torch.float64)
    for layer, name in enumerate(params):
        eigen = factors[name]
        n, in_dim = params[name].numel(), eigen.shape[1]
        scale = 1.0 / (eigen.sg.unsqueeze(1) * eigen.sa.unsqueeze(0) + damp)  # (out, in): per (g, a)
        per_g = (eigen.qa.unsqueeze(0) * scale.unsqueeze(1)) @ eigen.qa.T  # C_g, (out, in, in)
        for k in range(layout.blocks_per_layer[layer]):
            flat = torch.arange(k * block_size, min((k + 1) * block_size, n))
            rows, cols = flat // in_dim, flat % in_dim
            qg = eigen.qg[rows]  # (b, out)
            gathered = per_g[:, cols.unsqueeze(1), cols.unsqueeze(0)]  # (out, b, b)
            block = torch.einsum("kg,lg,gkl->kl", qg, qg, gathered)
            b = len(flat)
            index = layout.block_offsets[layer] + k
            blocks[index, :b, :b] = block
            if b < block_size:
                blocks[index, b:, b:] = torch.eye(block_size - b, dtype=torch.float64) / damp
    return BlockFisherInverse(layout, blocks, damp, 0)


def choose_by_counts(scores: Tensor, sizes: Sequence[int], counts: Sequence[int]) -> Tensor:
    """Prune the `counts[i]` lowest-scored weights of layer i (a hand-set per-layer sparsity)."""
    chosen = torch.zeros(scores.numel(), dtype=torch.bool)
    offset = 0
    for size, count in zip(sizes, counts, strict=True):
        if count > 0:
            order = torch.argsort(scores[offset : offset + size].double(), stable=True)[:count]
            chosen[offset + order] = True
        offset += size
    return chosen


@torch.no_grad()
def prune_copy(model: nn.Module, method: str, stats: Statistics | None, sparsity: float, selection: Selection,
               *, damp: float = 1e-5, ranking: str = "global",
               counts: Sequence[int] | None = None) -> tuple[nn.Module, dict]:
    """A pruned copy of `model` (pruned weights exactly zero) and what the step did.

    `counts` (weights to prune per selected layer) overrides `sparsity`/`ranking` (hand-set sparsities).
    """
    pruned_model = copy.deepcopy(model)
    params = selection.params(pruned_model)
    sizes = [p.numel() for p in params.values()]
    kept = torch.ones(sum(sizes), dtype=torch.bool)
    weights = torch.cat([p.detach().reshape(-1) for p in params.values()])
    if method == "magnitude_uniform":
        ranking = "uniform"
    predicted: float | None = None
    newton_scale = None

    if method in DATA_FREE:
        scores = weights.abs()
    else:
        assert stats is not None
        if method in KFAC_METHODS:
            from wf_pipeline.pruning.research.kfac import kfac_scores

            assert stats.kfac is not None, "K-FAC factors were not collected"
            scores = kfac_scores(params, stats.kfac, damp)
        elif method == "diag_fisher":
            assert stats.fisher_diag is not None
            scores = diag_fisher_scores(weights.to(stats.fisher_diag.dtype), stats.fisher_diag)
        else:
            assert stats.inverse is not None and stats.grad_mean is not None
            dtype = stats.inverse.blocks.dtype
            if method == "woodtaylor":  # the Newton step capped as the WoodTaylor pruner caps it
                newton = stats.inverse.matvec(stats.grad_mean.to(dtype))
                newton_scale = newton_step_scale(newton, weights.to(dtype), sizes, WoodFisherConfig().newton_step_cap)
                scores = woodtaylor_scores(weights.to(dtype), stats.inverse.diag(), newton * newton_scale)
            else:
                scores = obs_scores(weights.to(dtype), stats.inverse.diag())
    new = (choose_by_counts(scores, sizes, counts) if counts is not None
           else choose_pruned(scores, kept, sizes, sparsity, ranking))
    pruned = new

    if method in BLOCK_RULES:
        assert stats is not None
        inverse = stats.kfac_blocks if method.startswith("kfac") else stats.inverse
        assert inverse is not None, f"{method}: its block inverse was not collected"
        dtype = inverse.blocks.dtype
        grad_mean = stats.grad_mean.to(dtype) if method == "woodtaylor" and stats.grad_mean is not None else None
        updated, predicted = obs_update(inverse, weights.to(dtype), pruned, update=BLOCK_RULES[method],
                                        grad_mean=grad_mean, newton_scale=newton_scale)
    elif method == "kfac":
        from wf_pipeline.pruning.research.kfac import kfac_independent_update

        assert stats is not None and stats.kfac is not None
        updated, predicted = kfac_independent_update(params, stats.kfac, pruned, damp)
    else:
        updated = weights.masked_fill(pruned, 0)
        if method == "diag_fisher":
            predicted = float(scores[pruned].sum())
    offset = 0
    per_layer = {}
    for (name, param), size in zip(params.items(), sizes, strict=True):
        mask = pruned[offset : offset + size].view_as(param)
        param.copy_(updated[offset : offset + size].view_as(param).to(param.dtype))
        param.masked_fill_(mask, 0)
        per_layer[name] = float(mask.double().mean())
        offset += size
    achieved = float(pruned.double().mean())
    return pruned_model, {"achieved_sparsity": achieved, "per_layer_sparsity": per_layer,
                          "predicted_loss_increase": predicted}


def accuracy_with_and_without_bn(model: nn.Module, data: DataBundle,
                                 recalibrate_batches: int) -> tuple[float, float | None]:
    """Test accuracy as pruned, and after re-estimating BatchNorm statistics (None if the model has no BN)."""
    device = torch.device("cpu")
    plain, _ = evaluate(model, data.test_batches(), device)
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return plain, None
    recalibrate_batchnorm(model, data.train_batches(0), device, max_batches=recalibrate_batches)
    model.eval()
    recalibrated, _ = evaluate(model, data.test_batches(), device)
    return plain, recalibrated
