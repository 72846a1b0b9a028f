"""Fisher statistics for group OBS: per-sample gradients of the consumer weights, folded into
row-block Gram matrices (one :class:`BlockGramAccumulator` per consumer layer) and inverted.

Gradients come from :func:`wf_pipeline.fisher.gradients.iter_gradient_chunks` as flat ``(n, d)``
chunks over the consumer weights (masked: removed weights have zero gradient, so their Fisher rows
are ``λ eᵢ`` and they decouple from the weights that stay). Each chunk is split per layer and cut
into the row blocks of :class:`~wf_pipeline.pruning.structured.group_obs.RowBlocks`. Peak memory
is the Gram buffers (``Σ_layers #weights · block size`` numbers) plus one gradient chunk.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wf_pipeline.fisher.gradients import iter_gradient_chunks
from wf_pipeline.fisher.inverse import BlockGramAccumulator, accumulation_dtype
from wf_pipeline.pruning.structured.group_obs import RowBlocks

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]


@dataclass
class RowFisher:
    """Inverse row blocks ``(K, B, B)`` of one consumer layer's Fisher."""

    blocks: RowBlocks
    inverse: Tensor
    damp: float
    num_samples: int


@dataclass
class FisherTimings:
    """Seconds spent computing gradients, folding them into the Grams, and inverting."""

    gradients: float = 0.0
    accumulate: float = 0.0
    inverse: float = 0.0


def row_fisher_inverses(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Batches,
    *,
    num_grads: int,
    block_cap: int,
    damp: float,
    masks: Mapping[str, Tensor] | None = None,
    grad_batch_size: int = 1,
    chunk_size: int = 100,
    fisher_type: str = "empirical",
    dtype: torch.dtype = torch.float32,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    reduce_fn: ReduceFn | None = None,
    total_grads: int | None = None,
    generator: torch.Generator | None = None,
    progress: Progress | None = None,
    timings: FisherTimings | None = None,
) -> dict[str, RowFisher]:
    """Inverse row-block Fisher ``(λI + GᵀG/N)⁻¹`` of every weight in `params` (consumer layers).

    `num_grads` gradients are computed here; with `reduce_fn` (multi-process) the Gram sums and
    counts are summed across ranks, and `total_grads` is N over all ranks (for the precision choice).
    The caller puts the model in eval mode.
    """
    timings = timings if timings is not None else FisherTimings()
    names = list(params)
    layouts = {n: RowBlocks.for_weight(params[n].shape, block_cap) for n in names}
    device = next(iter(params.values())).device
    total = total_grads or num_grads
    accs = {
        n: BlockGramAccumulator(rb.layout(), dtype=accumulation_dtype(total, rb.block_size, dtype), device=device)
        for n, rb in layouts.items()
    }
    sizes = [params[n].numel() for n in names]
    chunks = iter_gradient_chunks(
        model, params, batches, num_grads=num_grads, grad_batch_size=grad_batch_size, chunk_size=chunk_size,
        loss_fn=loss_fn, masks=None if masks is None else {n: masks[n] for n in names},
        fisher_type=fisher_type, generator=generator, dtype=dtype, progress=progress,
    )
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        t1 = time.perf_counter()
        timings.gradients += t1 - t0
        if chunk is None:
            break
        for name, part in zip(names, chunk.split(sizes, dim=1), strict=True):
            accs[name].add(part)
        timings.accumulate += time.perf_counter() - t1
    t0 = time.perf_counter()
    out: dict[str, RowFisher] = {}
    for name in names:
        acc = accs.pop(name)
        if reduce_fn is not None:
            acc.reduce(reduce_fn)
        inverse = acc.inverse(damp)
        out[name] = RowFisher(layouts[name], inverse.blocks, damp, inverse.num_samples)
    timings.inverse += time.perf_counter() - t0
    return out
