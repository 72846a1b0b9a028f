"""Per-layer channels, parameters and MACs of an exported ONNX model, read from the file itself.

Reading the ONNX file (weights as stored, output sizes from ONNX shape inference) makes the figures
independent of how a model was pruned: a model whose channels were physically removed shows fewer
channels, parameters and MACs; an unstructured-sparse one shows the same shapes with fewer non-zeros.

Conventions: a layer is a Conv, ConvTranspose, Gemm or MatMul node with a constant weight, named by
its weight tensor (the PyTorch parameter name after export). MACs are multiply-accumulates per
input sample of the weight layers (FLOPs ~ 2 x MACs; BatchNorm is folded, activations, pooling and
additions are not counted). Non-zero MACs count only the products with a non-zero weight: what a
sparse kernel would have to do. Parameters are all float constants the graph computes with.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import onnx

from wf_pipeline.deploy.sparse_storage import initializer_arrays

_LAYER_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul")


@dataclass
class LayerStats:
    name: str
    op: str
    in_channels: int
    out_channels: int
    params: int  # weight + bias elements
    nonzero_params: int
    macs: int | None  # per sample; None when the output size is not static
    nonzero_macs: int | None


@dataclass
class ModelStats:
    layers: list[LayerStats]
    params: int
    nonzero_params: int
    macs: int | None
    nonzero_macs: int | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _static_dims(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    """Inferred dims of every value for one sample (None where a dim stays unknown).

    The batch axis is fixed to 1 first: with a symbolic batch, shape inference cannot resolve the
    -1 of an in-graph flatten (`Reshape(x, [batch, C, -1])`).
    """
    single = onnx.ModelProto()
    single.CopyFrom(model)
    for value in single.graph.input:
        input_dims = value.type.tensor_type.shape.dim
        if input_dims and not input_dims[0].HasField("dim_value"):
            input_dims[0].dim_value = 1
    inferred = onnx.shape_inference.infer_shapes(single, data_prop=True)  # data_prop: shapes computed in-graph
    dims: dict[str, list[int | None]] = {}
    for value in [*inferred.graph.input, *inferred.graph.value_info, *inferred.graph.output]:
        tensor = value.type.tensor_type
        if tensor.HasField("shape"):
            dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in tensor.shape.dim]
    return dims


def _per_sample(dims: list[int | None] | None) -> int | None:
    """Elements per sample: the product of all dims after the batch axis (of size 1 here), if static."""
    if not dims:
        return None
    static = [d for d in dims[1:] if d is not None]
    return math.prod(static) if len(static) == len(dims) - 1 else None


def _attribute(node: onnx.NodeProto, name: str, default: int) -> int:
    return next((int(a.i) for a in node.attribute if a.name == name), default)


def _layer(node: onnx.NodeProto, weight: np.ndarray, bias: np.ndarray | None,
           dims: dict[str, list[int | None]]) -> LayerStats | None:
    nonzero = int(np.count_nonzero(weight))
    params = weight.size + (bias.size if bias is not None else 0)
    nonzero_params = nonzero + (int(np.count_nonzero(bias)) if bias is not None else 0)
    out_dims = dims.get(node.output[0])
    if node.op_type == "Conv":
        group = _attribute(node, "group", 1)
        out_channels, in_channels = weight.shape[0], weight.shape[1] * group
        out_size = _per_sample(out_dims)
        positions = out_size // out_channels if out_size is not None else None  # output pixels
    elif node.op_type == "ConvTranspose":
        group = _attribute(node, "group", 1)
        in_channels, out_channels = weight.shape[0], weight.shape[1] * group
        in_size = _per_sample(dims.get(node.input[0]))
        positions = in_size // in_channels if in_size is not None else None  # each input pixel scatters the kernel
    elif node.op_type == "Gemm":
        if weight.ndim != 2:
            return None
        out_channels, in_channels = weight.shape if _attribute(node, "transB", 0) else weight.shape[::-1]
        positions = 1
    else:  # MatMul x @ W, W = (in, out); leading non-batch dims of x are positions
        if weight.ndim != 2:
            return None
        in_channels, out_channels = weight.shape
        size = _per_sample(out_dims)
        positions = size // out_channels if size is not None else None
    macs = None if positions is None else weight.size * positions
    nonzero_macs = None if positions is None else nonzero * positions
    return LayerStats(node.input[1], node.op_type, int(in_channels), int(out_channels), int(params),
                      nonzero_params, macs, nonzero_macs)


def model_stats(model: onnx.ModelProto) -> ModelStats:
    """Per-layer and total channels, parameters and MACs of `model` (see the module docstring)."""
    arrays = initializer_arrays(model)
    dims = _static_dims(model)
    layers = []
    for node in model.graph.node:
        if node.op_type not in _LAYER_OPS or len(node.input) < 2 or node.input[1] not in arrays:
            continue
        bias = arrays.get(node.input[2]) if len(node.input) > 2 and node.op_type != "MatMul" else None
        layer = _layer(node, arrays[node.input[1]], bias, dims)
        if layer is not None:
            layers.append(layer)
    # Quantization scales are not parameters: an INT8 model counts the same parameters as its FP32 source.
    scales = {name for node in model.graph.node if node.op_type in ("QuantizeLinear", "DequantizeLinear")
              for name in node.input[1:]}
    floats = [a for name, a in arrays.items() if np.issubdtype(a.dtype, np.floating) and name not in scales]
    per_layer_macs = [layer.macs for layer in layers if layer.macs is not None]
    per_layer_nonzero = [layer.nonzero_macs for layer in layers if layer.nonzero_macs is not None]
    known = len(per_layer_macs) == len(layers)
    return ModelStats(
        layers=layers,
        params=int(sum(a.size for a in floats)),
        nonzero_params=int(sum(np.count_nonzero(a) for a in floats)),
        macs=int(sum(per_layer_macs)) if known else None,
        nonzero_macs=int(sum(per_layer_nonzero)) if known else None,
    )


def model_stats_dict(model: onnx.ModelProto) -> dict[str, Any] | None:
    """`model_stats(model).to_dict()`, or None for a graph it cannot read (validating any file must not fail on it)."""
    try:
        return model_stats(model).to_dict()
    except Exception:  # noqa: BLE001 - figures for the summary only; the verdict never depends on them
        return None
