"""One pruning step with any method: :func:`prune_step` drives a pruner over the selected parameters.

It is the single entry point of the one-shot sweep and the gradual schedule. It prunes the selected
parameters in place to a target sparsity, keeps already-pruned weights pruned, updates the
:class:`MaskSet` and leaves every pruned weight exactly zero. Which method runs is the pruner's
business (see :mod:`wf_pipeline.pruning.pruners`); this module only splits the step into
``recompute_steps`` sub-steps and reports what happened (:class:`PruneReport`, in :mod:`.step_report`).
"""
from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.pruners import Pruner, PruneView, StepContext, build_pruner
from wf_pipeline.pruning.pruners.base import Batches, Progress, ReduceFn, eval_mode
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.pruning.step_report import PruneReport


def prune_step(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    masks: MaskSet,
    target_sparsity: float,
    settings: PruneSettings | Pruner,
    batches: Batches | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    reduce_fn: ReduceFn | None = None,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
    spill_dir: Path | None = None,
) -> PruneReport:
    """Prune `params` in place until ``target_sparsity`` of all their weights are zero.

    `settings` names the method (or is a ready :class:`Pruner`). Already-pruned weights (mask False)
    stay pruned and count towards the target. `batches()` must return a fresh iterable of (inputs,
    labels) from the Fisher pool (cycled if it runs short); data-free methods ignore it. `reduce_fn`
    (multi-process) sums each accumulated statistic in place across ranks, so all ranks prune identical
    weights; each rank then passes ``settings.num_grads`` already divided by the world size. Per
    (sub-)step it is called, on every rank in the same order, first on a float64 scalar holding this
    rank's ``num_grads`` (to learn the total N before accumulating), then on the statistics: the block
    Gram sums, the gradient sum and the float64 sample count (diagonal Fisher: the squared-gradient sum
    instead of the Gram). The model is in eval mode while gradients are computed, then every
    submodule's mode is restored. WoodFisher/WoodTaylor may spill statistics that exceed their memory
    budget to a temporary folder under `spill_dir` (removed when the step ends); without one they
    recompute them instead.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if not params:
        raise ValueError("no parameters to prune")
    pruner = settings if isinstance(settings, Pruner) else build_pruner(settings)
    started = time.perf_counter()
    view = PruneView(params, masks)
    ctx = StepContext(model, batches, loss_fn, reduce_fn, progress, generator, spill_dir=spill_dir)
    if pruner.needs_gradients:
        ctx.timings["accumulate"] = 0.0
    kept = view.flat_kept()
    zeros_before = int((~kept).sum())
    predictions: list[float | None] = []
    # Nothing to prune (already at or beyond the target): no statistics, nothing revived.
    if not (pruner.needs_gradients and pruner.reached(view, target_sparsity)):
        start = pruner.sparsity(view)
        steps = pruner.sub_steps
        with eval_mode(model):
            for step in range(1, steps + 1):
                sub_target = start + (target_sparsity - start) * step / steps
                predictions.append(pruner.prune(view, ctx, sub_target).predicted_loss_increase)
        if pruner.needs_gradients:
            ctx.details.sub_steps = steps
    elif pruner.needs_gradients:
        predictions.append(0.0)

    ctx.timings["total"] = time.perf_counter() - started
    zeros_after = int((~view.flat_kept()).sum())
    predicted = None if not predictions or any(p is None for p in predictions) else float(sum(predictions))  # type: ignore[arg-type]
    return PruneReport(
        target_sparsity=float(target_sparsity),
        achieved_sparsity=pruner.sparsity(view),
        per_layer_sparsity={n: float((~masks.masks[n]).sum()) / masks.masks[n].numel() for n in params},
        timings=ctx.timings,
        num_grads=ctx.num_grads,
        predicted_loss_increase=predicted,
        method=pruner.name,
        newly_pruned=zeros_after - zeros_before,
        details=ctx.details,
        fully_pruned=masks.fully_pruned(params),
    )
