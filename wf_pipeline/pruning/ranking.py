"""Turn per-weight scores into the set of weights to prune: global or per-layer (uniform) ranking.

All functions work on flat vectors over the selected parameters, concatenated in order; `sizes`
gives each layer's number of weights. Lower score = pruned first. Already-pruned weights stay pruned
and count towards the target.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def target_zero_counts(sizes: Sequence[int], target_sparsity: float) -> list[int]:
    """Per-layer zero counts for uniform sparsity whose total is exactly ``round(target * sum(sizes))``.

    Each layer gets ``floor(target * n)`` plus one for the layers with the largest remainders
    (largest-remainder rounding), so every layer is within one weight of the target.
    """
    exact = [target_sparsity * n for n in sizes]
    counts = [math.floor(x) for x in exact]
    missing = round(target_sparsity * sum(sizes)) - sum(counts)
    by_remainder = sorted(range(len(sizes)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: max(missing, 0)]:
        counts[i] = min(counts[i] + 1, sizes[i])
    return counts


def _smallest(scores: torch.Tensor, kept: torch.Tensor, count: int) -> torch.Tensor:
    """Bool mask of the `count` kept positions with the smallest scores (stable: ties by position)."""
    chosen = torch.zeros_like(kept)
    if count <= 0:
        return chosen
    candidates = kept.nonzero().squeeze(1)
    count = min(count, candidates.numel())
    order = torch.argsort(scores[candidates], stable=True)[:count]
    chosen[candidates[order]] = True
    return chosen


def choose_pruned(
    scores: torch.Tensor,
    kept: torch.Tensor,
    sizes: Sequence[int],
    target_sparsity: float,
    ranking: str = "global",
) -> torch.Tensor:
    """Bool mask (same shape as `scores`, flat) of the weights newly pruned to reach the target.

    `kept` is the current mask (True = kept); only kept weights are candidates. With ``global``
    ranking the smallest scores over all layers go first; with ``uniform`` each layer reaches the
    target on its own. NaN scores rank last (never chosen before a finite score).
    """
    if scores.shape != kept.shape or scores.dim() != 1:
        raise ValueError("scores and kept must be flat vectors of the same length")
    if sum(sizes) != scores.numel():
        raise ValueError(f"sizes sum to {sum(sizes)} but there are {scores.numel()} scores")
    if not 0.0 <= target_sparsity <= 1.0:
        raise ValueError(f"target sparsity must be in [0, 1], got {target_sparsity}")
    scores = torch.nan_to_num(scores.detach().double(), nan=math.inf)
    if ranking == "global":
        already = int((~kept).sum())
        return _smallest(scores, kept, round(target_sparsity * scores.numel()) - already)
    if ranking == "uniform":
        chosen = torch.zeros_like(kept)
        offset = 0
        for size, zeros in zip(sizes, target_zero_counts(sizes, target_sparsity), strict=True):
            part = slice(offset, offset + size)
            already = int((~kept[part]).sum())
            chosen[part] = _smallest(scores[part], kept[part], zeros - already)
            offset += size
        return chosen
    raise ValueError(f"unknown ranking {ranking!r}; expected 'global' or 'uniform'")
