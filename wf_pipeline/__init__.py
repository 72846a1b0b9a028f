"""wf-pipeline: WoodFisher second-order pruning, sparse ONNX export and ONNX Runtime verification."""
import os as _os

# GNU OpenMP spin-waits by default: when another process holds a core, 2-thread torch ops ran 10-100x
# slower here. Passive waiting costs little when the machine is idle. Only effective before torch loads.
_os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
