"""Gradient-based pruning steps: WoodFisher, WoodTaylor and the diagonal-Fisher baseline.

Each (sub-)step: stream gradients of the selected weights into Fisher statistics, optionally sum
them across processes, build the (block-diagonal or diagonal) inverse, score the surviving weights,
prune to the (sub-)target and apply the OBS update. ``recompute_steps > 1`` splits the sparsity
increase into equal sub-steps, each with fresh gradients and a fresh inverse.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.gradients import iter_gradient_chunks
from wf_pipeline.fisher.inverse import (
    BlockGramAccumulator,
    BlockLayout,
    DiagonalAccumulator,
    WoodburyAccumulator,
    accumulation_dtype,
)
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.methods import Batches, Progress, PruneSettings, ReduceFn, flat_kept, flat_weights, write_back
from wf_pipeline.pruning.obs import diag_fisher_scores, obs_scores, obs_update, woodtaylor_scores
from wf_pipeline.pruning.ranking import choose_pruned

Accumulator = BlockGramAccumulator | WoodburyAccumulator | DiagonalAccumulator


@dataclass
class SecondOrderResult:
    # "inverse" includes "accumulate" (folding gradient chunks into the Fisher statistics).
    timings: dict[str, float] = field(
        default_factory=lambda: {"gradients": 0.0, "inverse": 0.0, "obs": 0.0, "accumulate": 0.0}
    )
    num_grads: int = 0
    predicted_loss_increase: float | None = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout); every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def total_gradient_count(settings: PruneSettings, reduce_fn: ReduceFn | None, device: torch.device) -> int:
    """N over all processes: this rank's ``num_grads`` summed with `reduce_fn` (all ranks must call it)."""
    if reduce_fn is None:
        return settings.num_grads
    count = torch.tensor(float(settings.num_grads), dtype=torch.float64, device=device)
    reduce_fn(count)
    return int(round(float(count)))


def make_accumulator(settings: PruneSettings, layout: BlockLayout, total: int, device: torch.device) -> Accumulator:
    dtype = settings.torch_dtype
    if settings.method == "diag_fisher":
        return DiagonalAccumulator(layout.dim, dtype=dtype, device=device)
    if settings.route == "woodbury":
        return WoodburyAccumulator(layout, settings.damp, total, dtype=dtype, device=device)
    return BlockGramAccumulator(layout, dtype=accumulation_dtype(total, layout.block_size, dtype), device=device)


def _accumulate(
    acc: Accumulator,
    model: nn.Module,
    params: dict[str, nn.Parameter],
    masks: MaskSet,
    settings: PruneSettings,
    batches: Batches,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    progress: Progress | None,
    generator: torch.Generator | None,
    timings: dict[str, float],
) -> None:
    chunks = iter_gradient_chunks(
        model,
        params,
        batches,
        num_grads=settings.num_grads,
        grad_batch_size=settings.grad_batch_size,
        chunk_size=settings.chunk_size,
        loss_fn=loss_fn,
        masks=masks.masks,
        fisher_type=settings.fisher_type,
        generator=generator,
        progress=progress,
        layout=None if isinstance(acc, DiagonalAccumulator) else acc.layout,
    )
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        t1 = time.perf_counter()
        timings["gradients"] += t1 - t0
        if chunk is None:
            return
        if isinstance(acc, DiagonalAccumulator):
            acc.add(chunk)
        else:
            acc.add_blocked(chunk)
        elapsed = time.perf_counter() - t1
        timings["inverse"] += elapsed
        timings["accumulate"] += elapsed


def second_order_prune(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    masks: MaskSet,
    target_sparsity: float,
    settings: PruneSettings,
    batches: Batches,
    loss_fn: Callable[[Tensor, Tensor], Tensor],
    reduce_fn: ReduceFn | None,
    progress: Progress | None,
    generator: torch.Generator | None,
) -> SecondOrderResult:
    """Prune `params` in place to `target_sparsity` with a gradient-based method (see module doc)."""
    if reduce_fn is not None and settings.route == "woodbury" and settings.method != "diag_fisher":
        raise WFError(
            "pruning.woodfisher.route 'woodbury' cannot sum Fisher statistics across processes",
            hint="use route: fast for multi-process runs (both routes build the same inverse)",
        )
    result = SecondOrderResult()
    timings = result.timings
    sizes = [p.numel() for p in params.values()]
    layout = BlockLayout(sizes, settings.block_size)
    device = next(iter(params.values())).device
    kept = flat_kept(masks, params)
    start = float((~kept).sum()) / kept.numel()
    if round(target_sparsity * kept.numel()) <= int((~kept).sum()):
        return result  # already at or beyond the target: nothing to prune, nothing revived

    steps = settings.recompute_steps
    predictions: list[float | None] = []
    with eval_mode(model):
        for step in range(1, steps + 1):
            sub_target = start + (target_sparsity - start) * step / steps
            total = total_gradient_count(settings, reduce_fn, device)
            acc = make_accumulator(settings, layout, total, device)
            _accumulate(acc, model, params, masks, settings, batches, loss_fn, progress, generator, timings)
            result.num_grads += acc.num_samples

            t0 = time.perf_counter()
            if reduce_fn is not None:
                acc.reduce(reduce_fn)
            inverse = None if isinstance(acc, DiagonalAccumulator) else acc.inverse(settings.damp, progress=progress)
            t1 = time.perf_counter()
            timings["inverse"] += t1 - t0

            kept = flat_kept(masks, params)
            if inverse is None:
                assert isinstance(acc, DiagonalAccumulator)
                weights = flat_weights(params, acc.dtype)
                scores = diag_fisher_scores(weights, acc.fisher_diag(settings.damp))
                new = choose_pruned(scores, kept, sizes, sub_target, settings.effective_ranking)
                write_back(params, masks, None, kept & ~new)
                predictions.append(float(scores[new].sum()))
            else:
                dtype = inverse.blocks.dtype
                weights = flat_weights(params, dtype)
                grad_mean = acc.mean_gradient().to(dtype) if settings.method == "woodtaylor" else None
                if grad_mean is None:
                    scores = obs_scores(weights, inverse.diag())
                else:
                    scores = woodtaylor_scores(weights, inverse.diag(), inverse.matvec(grad_mean))
                new = choose_pruned(scores, kept, sizes, sub_target, settings.effective_ranking)
                pruned = ~kept | new
                updated, predicted = obs_update(inverse, weights, pruned, update=settings.update, grad_mean=grad_mean)
                write_back(params, masks, updated, ~pruned)
                predictions.append(predicted)
                result.extra["fisher_dtype"] = str(dtype).replace("torch.", "")
                result.extra["repaired_blocks"] = result.extra.get("repaired_blocks", 0) + inverse.repaired_blocks
                result.extra["num_blocks"] = layout.num_blocks
            del acc, inverse
            timings["obs"] += time.perf_counter() - t1

    result.predicted_loss_increase = None if any(p is None for p in predictions) else float(sum(predictions))  # type: ignore[arg-type]
    result.extra.update({"sub_steps": steps, "route": settings.route if settings.method != "diag_fisher" else "diagonal"})
    return result
