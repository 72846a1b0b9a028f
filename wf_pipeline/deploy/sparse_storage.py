"""ONNX sparse-initializer storage: move zero-heavy weights into COO form and read any initializer back.

ONNX's SparseTensorProto allows two index layouts: an [NNZ, rank] coordinate matrix or a linearised
[NNZ] vector of row-major flat positions. Both must be int64 by the spec. The linearised form costs
8 bytes per non-zero instead of 8*rank (32 for a conv weight), and onnxruntime 1.32 accepts it
(densified at load), so it is the form written here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

INDEX_FORMAT = "linear-int64"


@dataclass(frozen=True)
class SparseConversion:
    """What `to_sparse_storage` changed: which initializers became sparse and their zero fractions."""

    sparse_names: list[str]
    zero_fractions: dict[str, float]
    index_format: str = INDEX_FORMAT


def zero_fraction(array: np.ndarray) -> float:
    return float(np.count_nonzero(array == 0)) / array.size if array.size else 0.0


def sparse_tensor_to_array(sparse: onnx.SparseTensorProto) -> np.ndarray:
    """Densify one SparseTensorProto; accepts both linearised and coordinate index layouts."""
    values = numpy_helper.to_array(sparse.values)
    shape = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(shape, dtype=values.dtype)
    if values.size == 0:
        return dense
    indices = numpy_helper.to_array(sparse.indices).astype(np.int64)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    else:
        dense[tuple(indices.T)] = values
    return dense


def initializer_arrays(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """All graph initializers as numpy arrays, dense and sparse alike (sparse ones densified)."""
    arrays = {init.name: numpy_helper.to_array(init) for init in model.graph.initializer}
    for sparse in model.graph.sparse_initializer:
        arrays[sparse.values.name] = sparse_tensor_to_array(sparse)
    return arrays


def weight_zero_fractions(model: onnx.ModelProto, min_rank: int = 2) -> dict[str, float]:
    """Zero fraction of every initializer of rank >= min_rank (conv/linear weights, not biases or BN)."""
    return {
        name: zero_fraction(array)
        for name, array in initializer_arrays(model).items()
        if array.ndim >= min_rank
    }


def overall_weight_sparsity(model: onnx.ModelProto, min_rank: int = 2) -> tuple[float, int, int]:
    """(zero fraction, zeros, total) over all weight initializers of rank >= min_rank."""
    zeros = total = 0
    for array in initializer_arrays(model).values():
        if array.ndim >= min_rank:
            zeros += int(np.count_nonzero(array == 0))
            total += int(array.size)
    return (zeros / total if total else 0.0), zeros, total


def _to_sparse_proto(name: str, array: np.ndarray) -> onnx.SparseTensorProto:
    flat = array.reshape(-1)
    positions = np.flatnonzero(flat).astype(np.int64)
    values = numpy_helper.from_array(np.ascontiguousarray(flat[positions]), name)
    indices = numpy_helper.from_array(positions, "")
    return helper.make_sparse_tensor(values, indices, list(array.shape))


def to_sparse_storage(
    model: onnx.ModelProto, threshold: float, min_rank: int = 2
) -> tuple[onnx.ModelProto, SparseConversion]:
    """Return a copy of `model` whose initializers with zero fraction >= threshold are sparse.

    A tensor is only converted when COO storage is actually smaller than its dense bytes.

    Only floating-point initializers of rank >= min_rank are considered: biases and shape constants
    are tiny and some ops need them as plain tensors.
    """
    sparse_model = onnx.ModelProto()
    sparse_model.CopyFrom(model)
    graph = sparse_model.graph
    keep: list[TensorProto] = []
    converted: list[onnx.SparseTensorProto] = []
    fractions: dict[str, float] = {}
    float_types = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}
    for init in graph.initializer:
        if init.data_type not in float_types or len(init.dims) < min_rank:
            keep.append(init)
            continue
        array = numpy_helper.to_array(init)
        fraction = zero_fraction(array)
        nonzeros = int(np.count_nonzero(array))
        sparse_bytes = nonzeros * (array.itemsize + 8)  # value + int64 linear index per non-zero
        # Between the threshold and ~2/3 zeros (fp32) COO is larger than the dense tensor: keep it dense.
        if array.size and fraction >= threshold and sparse_bytes < array.nbytes:
            converted.append(_to_sparse_proto(init.name, array))
            fractions[init.name] = fraction
        else:
            keep.append(init)
    del graph.initializer[:]
    graph.initializer.extend(keep)
    graph.sparse_initializer.extend(converted)
    names = [s.values.name for s in converted]
    return sparse_model, SparseConversion(sparse_names=names, zero_fractions=fractions)
