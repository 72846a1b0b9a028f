"""wf-pipeline: WoodFisher second-order pruning, sparse ONNX export and ONNX Runtime verification."""
from wf_pipeline.openmp_wait import apply_at_import as _apply_openmp_wait

# Before torch loads: how OpenMP threads wait (passive on a shared CPU, a short spin on an idle one).
OPENMP_WAIT = _apply_openmp_wait()

__version__ = "0.1.0"
