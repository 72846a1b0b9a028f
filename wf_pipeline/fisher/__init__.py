"""Fisher statistics: gradients of the selected weights and the block-diagonal inverse Fisher.

Pruners talk to one object, :class:`~wf_pipeline.fisher.engine.FisherInverse` (diagonal, products, Newton step,
blocks, plan), built by :func:`~wf_pipeline.fisher.engine.build_fisher`; the accumulators below are its parts.
"""
from wf_pipeline.fisher.engine import FisherInverse, build_fisher
from wf_pipeline.fisher.gradients import GradientComputer, SampleStream, iter_gradient_chunks
from wf_pipeline.fisher.inverse import (
    BlockFisherInverse,
    BlockGramAccumulator,
    BlockLayout,
    DiagonalAccumulator,
    WoodburyAccumulator,
    accumulation_dtype,
    low_rank_inverse,
)

__all__ = [
    "FisherInverse",
    "build_fisher",
    "GradientComputer",
    "SampleStream",
    "iter_gradient_chunks",
    "BlockFisherInverse",
    "BlockGramAccumulator",
    "BlockLayout",
    "DiagonalAccumulator",
    "accumulation_dtype",
    "WoodburyAccumulator",
    "low_rank_inverse",
]
