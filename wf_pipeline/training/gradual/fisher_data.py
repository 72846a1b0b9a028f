"""Which Fisher samples each pruning step sees: the gradient count and reproducible per-step shuffles."""
from __future__ import annotations

from collections.abc import Callable, Iterable

from wf_pipeline.data.bundle import DataBundle
from wf_pipeline.errors import WFError
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.runtime.distributed import DistContext


def fisher_pool_size(data: DataBundle) -> int:
    if data.fisher_split is not None:
        return len(data.fisher_split)
    return len(data.fisher_indices) if data.fisher_indices is not None else 0


def plan_num_grads(requested: int, grad_batch_size: int, pool: int, world_size: int) -> tuple[int, str | None]:
    """How many gradients to use in total, and a note when the Fisher pool forces a change.

    Per-sample gradients (``grad_batch_size == 1``) of a pool smaller than `requested` would only
    repeat identical rows (the Fisher is unchanged, the work multiplied), so they are capped at the pool
    size. Mini-batch gradients are cycled with a fresh shuffle per pass, so every one is distinct.
    """
    per_rank_pool = pool // world_size if world_size > 1 else pool
    if per_rank_pool < 1:
        raise WFError(
            f"the Fisher pool has {pool} samples, fewer than the {world_size} processes",
            "raise data.fisher_pool or data.fisher_samples_per_class",
        )
    usable = per_rank_pool * world_size
    if grad_batch_size == 1 and requested > usable:
        return usable, (
            f"pruning.woodfisher.num_grads={requested} exceeds the Fisher pool ({pool} samples"
            f"{f' over {world_size} processes' if world_size > 1 else ''}): using {usable} per-sample gradients"
        )
    if requested * grad_batch_size > usable:
        return requested, (
            f"{requested} gradients x {grad_batch_size} samples exceed the Fisher pool ({pool} samples): "
            "the pool is cycled, reshuffled on each pass"
        )
    return requested, None


def fisher_batch_size(settings: PruneSettings) -> int:
    """Samples per Fisher-pool batch: one gradient chunk's worth (prune_step regroups them anyway)."""
    return max(1, settings.grad_batch_size * min(settings.chunk_size, settings.num_grads))


def fisher_batches_for_step(data: DataBundle, step_index: int, batch_size: int, dist: DistContext,
                            calls_per_step: int = 1) -> Callable[[], Iterable]:
    """Fisher-pool batches for pruning step `step_index`, shuffled differently per step but
    reproducibly (a resumed run sees the same samples at the same step).

    prune_step asks the factory for one fresh pass per Fisher (re)computation; skipping the passes of
    the earlier steps gives each step its own shuffles (creating an unread pass costs nothing).
    """
    factory = data.fisher_batches(batch_size, rank=dist.rank, world_size=dist.world_size)
    for _ in range(step_index * calls_per_step):
        factory()
    return factory
