"""Fisher statistics: gradients of the selected weights and the block-diagonal inverse Fisher."""
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
