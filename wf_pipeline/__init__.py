"""wf-pipeline: WoodFisher second-order pruning, sparse ONNX export and ONNX Runtime verification."""
__version__ = "0.1.0"
