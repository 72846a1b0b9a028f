"""ONNX Runtime sessions and ONNX file loading with user-facing errors for missing or corrupt files."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import onnx

from wf_pipeline.errors import WFError

if TYPE_CHECKING:
    from onnxruntime import InferenceSession

_CORRUPT_HINT = "re-export the model (wf-pipeline export) or check that the file was copied completely"


def _require_file(path: Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise WFError(f"ONNX model not found: {path}", hint="check the path; export writes <run>/export/model.onnx")
    if not path.is_file():
        raise WFError(f"ONNX model path is not a file: {path}", hint="pass the .onnx file itself, not its folder")
    return path


def load_onnx(path: Path) -> onnx.ModelProto:
    """Parse an ONNX file (weights included); missing, unreadable or corrupt files raise WFError."""
    path = _require_file(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf raises DecodeError or a plain error depending on the backend
        raise WFError(f"cannot read ONNX model {path}: {type(exc).__name__}: {exc}", hint=_CORRUPT_HINT) from exc
    if not model.graph.node:
        raise WFError(f"ONNX model {path} has an empty graph", hint=_CORRUPT_HINT)
    return model


def create_session(path: Path, *, threads: int = 1, optimize: bool = True) -> InferenceSession:
    """An onnxruntime CPU InferenceSession with `threads` intra-op threads (0 = runtime default).

    Inter-op parallelism is off (sequential execution) so latency numbers depend on one knob only.
    """
    import onnxruntime as ort

    path = _require_file(path)
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(0, int(threads))
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = (
        ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize else ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    )
    options.log_severity_level = 3  # errors only; warnings about unused initializers are noise here
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise WFError(
            f"onnxruntime cannot load {path}: {type(exc).__name__}: {str(exc).strip()[:300]}", hint=_CORRUPT_HINT
        ) from exc


def input_name(session: InferenceSession) -> str:
    inputs = session.get_inputs()
    if len(inputs) != 1:
        raise WFError(
            f"expected an ONNX model with one input, found {len(inputs)}: {[i.name for i in inputs]}",
            hint="wf-pipeline validates single-input image classifiers",
        )
    return inputs[0].name


def static_batch_size(session: InferenceSession) -> int | None:
    """The input's batch dimension if it is fixed in the file, None when it is dynamic."""
    dim = session.get_inputs()[0].shape[0]
    return int(dim) if isinstance(dim, int) else None


def input_sample_shape(session: InferenceSession) -> tuple[int, ...] | None:
    """Per-sample input shape (without batch) when every non-batch dimension is fixed, else None."""
    dims = session.get_inputs()[0].shape[1:]
    if all(isinstance(d, int) for d in dims):
        return tuple(int(d) for d in dims)
    return None


def run_logits(session: InferenceSession, batch: np.ndarray) -> np.ndarray:
    """Run one batch, honouring a fixed batch size in the file by chunking and zero padding."""
    name = input_name(session)
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    fixed = static_batch_size(session)
    if fixed is None or batch.shape[0] == fixed:
        return session.run(None, {name: batch})[0]
    outputs = []
    for start in range(0, batch.shape[0], fixed):
        chunk = batch[start : start + fixed]
        real = chunk.shape[0]
        if real < fixed:
            pad = np.zeros((fixed - real, *chunk.shape[1:]), dtype=np.float32)
            chunk = np.concatenate([chunk, pad])
        outputs.append(session.run(None, {name: chunk})[0][:real])
    return np.concatenate(outputs)
