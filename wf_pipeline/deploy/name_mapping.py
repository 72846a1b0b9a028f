"""Map ONNX weight initializers back to the PyTorch parameters they came from.

The TorchScript exporter keeps a parameter's name (`fc.weight`) when it exports it unchanged, but with
`do_constant_folding=True` in eval mode it folds BatchNorm into the preceding conv and the folded
weight gets a generated name (`onnx::Conv_27`). The consuming node still carries the module scope in
its name (`/layer1/layer1.0/conv1/Conv`), which is how such weights are traced back. Folding scales
each output row by gamma/sqrt(var+eps), so a zero stays a zero and the zero pattern is a second,
independent check used as the last resort.

Equal constants are stored once: the exporter keeps the first and hands every other layer a copy
through an Identity node. Fully pruned layers hit this (all-zero weights of one shape are equal, and
BatchNorm folding keeps them zero), so a weight is traced through Identity nodes to the initializer
that holds it, and it is the tensor the layer reads (the initializer or its Identity's output) that
is named after the parameter.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx

_WEIGHT_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
_BIAS_OPS = {"Conv": 2, "ConvTranspose": 2, "Gemm": 2}
GENERATED_PREFIX = "onnx::"


@dataclass(frozen=True)
class InitializerMatch:
    initializer: str  # the constant that holds the values (an initializer, or a tensor computed from constants)
    transposed: bool  # MatMul stores a Linear weight as W^T
    how: str  # "name" | "scope" | "zero-pattern"
    read_as: str = ""  # the tensor the layer reads: the initializer, or an Identity's output forwarding it

    @property
    def tensor(self) -> str:
        return self.read_as or self.initializer


def module_paths(param_names: Iterable[str]) -> set[str]:
    """Every module on the way to the given parameters: 'a.b.conv.weight' -> {'a', 'a.b', 'a.b.conv'}.

    Scope resolution needs the intermediate modules, not only the ones that own the parameters.
    """
    paths: set[str] = set()
    for name in param_names:
        parts = name.split(".")[:-1]
        paths.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return paths


def _module_path_from_scope(node_name: str, module_names: set[str]) -> str | None:
    """'/layer2/layer2.0/shortcut/shortcut.0/Conv' -> 'layer2.0.shortcut.0'.

    Each scope segment names a module relative to the current path or to one of its ancestors
    (the root included): `layer2.0` is relative to the root, `shortcut.0` to `layer2.0`. `module_names`
    must hold the intermediate modules too (see `module_paths`).
    """
    path = ""
    for segment in [s for s in node_name.strip("/").split("/")[:-1] if s]:
        prefix = path
        while True:
            candidate = f"{prefix}.{segment}" if prefix else segment
            if candidate in module_names or not prefix:
                break
            prefix = prefix.rpartition(".")[0]
        path = candidate if candidate in module_names else (f"{path}.{segment}" if path else segment)
    return path if path in module_names else None


def _resolve_identity(name: str, producers: dict[str, onnx.NodeProto]) -> str:
    """Follow Identity nodes back to the initializer they forward (the exporter deduplicates constants)."""
    seen = set()
    while name in producers and producers[name].op_type == "Identity" and name not in seen:
        seen.add(name)
        name = producers[name].input[0]
    return name


def _stored_transposed(node: onnx.NodeProto) -> bool:
    """Whether the node's weight input holds W^T of a torch Linear weight (out, in)."""
    if node.op_type == "MatMul":
        return True  # x @ B with B = (in, out)
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return not trans_b
    return False


def _orientations(param_shape: tuple[int, ...], array: np.ndarray) -> list[bool]:
    """Layouts (False = as is, True = transposed) in which `array` has the parameter's shape."""
    found = []
    if tuple(array.shape) == tuple(param_shape):
        found.append(False)
    if array.ndim == 2 and tuple(array.shape[::-1]) == tuple(param_shape):
        found.append(True)
    return found


def map_params_to_initializers(
    model: onnx.ModelProto,
    params: dict[str, np.ndarray],
    arrays: dict[str, np.ndarray],
) -> dict[str, InitializerMatch]:
    """For each torch weight (name -> array) find the ONNX initializer holding it; unmapped names are absent."""
    matches: dict[str, InitializerMatch] = {}
    module_names = module_paths(params)

    producers = {out: node for node in model.graph.node for out in node.output}
    # The exporter keeps a parameter's own name only when it stores the parameter unchanged (possibly as
    # an Identity of an equal parameter's initializer).
    for name, value in params.items():
        if name in arrays and tuple(arrays[name].shape) == tuple(value.shape):
            init = _resolve_identity(name, producers)
            matches[name] = InitializerMatch(init if init in arrays else name, False, "name", name)

    for node in model.graph.node:
        index = _WEIGHT_OPS.get(node.op_type)
        if index is None or len(node.input) <= index:
            continue
        read_as = node.input[index]
        init = _resolve_identity(read_as, producers)
        if init not in arrays:
            continue
        module = _module_path_from_scope(node.name, module_names)
        param = f"{module}.weight" if module else None
        if param is None or param not in params or param in matches:
            continue
        transposed = _stored_transposed(node) and arrays[init].ndim == 2
        stored_shape = arrays[init].shape[::-1] if transposed else arrays[init].shape
        if tuple(stored_shape) == tuple(params[param].shape):
            matches[param] = InitializerMatch(init, transposed, "scope", read_as)

    used = {m.initializer for m in matches.values()}
    for name, value in params.items():
        if name in matches:
            continue
        candidates = []
        for init, array in arrays.items():
            if init in used:
                continue
            for transposed in _orientations(value.shape, array):
                if np.array_equal((array.T if transposed else array) == 0, value == 0):
                    candidates.append((init, transposed))
                    break
        if len(candidates) == 1:
            init, transposed = candidates[0]
            matches[name] = InitializerMatch(init, transposed, "zero-pattern")
            used.add(init)
    return matches


def rename_tensors(model: onnx.ModelProto, renames: dict[str, str]) -> None:
    """Rename initializers and node outputs in place, with every reference to them. Targets in use are skipped."""
    graph = model.graph
    taken = {init.name for init in graph.initializer} | {s.values.name for s in graph.sparse_initializer}
    taken |= {value.name for value in graph.input} | {value.name for value in graph.output}
    taken |= {out for node in graph.node for out in node.output}
    safe = {old: new for old, new in renames.items() if old != new and new not in taken}
    if len(set(safe.values())) != len(safe):
        raise ValueError("rename targets must be unique")
    for init in graph.initializer:
        init.name = safe.get(init.name, init.name)
    for sparse in graph.sparse_initializer:
        sparse.values.name = safe.get(sparse.values.name, sparse.values.name)
    for node in graph.node:
        for names in (node.input, node.output):
            for i, name in enumerate(names):
                if name in safe:
                    names[i] = safe[name]
    for value in [*graph.input, *graph.output, *graph.value_info]:
        value.name = safe.get(value.name, value.name)


def readable_initializer_names(matches: dict[str, InitializerMatch]) -> dict[str, str]:
    """Renames that give generated names (`onnx::Conv_27`) back their parameter's name (`conv1.weight`).

    The tensor each layer reads is renamed: a constant the exporter shares between layers through
    Identity nodes takes the name of the layer that reads it directly, each Identity's output the
    name of its own layer. A tensor read by several layers as it is keeps its name. A transposed copy
    (MatMul's W^T) is named `<param>.T`, as PyTorch writes the transpose, so its name states its layout.
    """
    readers: dict[str, list[tuple[str, bool]]] = {}
    for param, match in matches.items():
        readers.setdefault(match.tensor, []).append((param, match.transposed))
    renames = {}
    for tensor, params in readers.items():
        if len(params) == 1 and tensor.startswith(GENERATED_PREFIX):
            param, transposed = params[0]
            renames[tensor] = f"{param}.T" if transposed else param
    return renames


def readable_bias_names(model: onnx.ModelProto, module_names: set[str]) -> dict[str, str]:
    """Renames for folded biases: BatchNorm folding gives a conv a new bias named `onnx::Conv_28`.

    It becomes `<conv>.bias`, the conv's effective bias after folding (the name
    `torch.nn.utils.fusion.fuse_conv_bn_eval` gives it too). The tensor the conv reads is renamed: when
    the exporter shares one constant between convs (equal folded biases, as untrained BatchNorm gives)
    each conv reads it through its own Identity, whose output is renamed; the shared constant keeps its name.
    """
    owners: dict[str, list[str]] = {}
    for node in model.graph.node:
        index = _BIAS_OPS.get(node.op_type)
        if index is None or len(node.input) <= index or not node.input[index].startswith(GENERATED_PREFIX):
            continue
        module = _module_path_from_scope(node.name, module_names)
        if module is not None:
            owners.setdefault(node.input[index], []).append(f"{module}.bias")
    return {name: targets[0] for name, targets in owners.items() if len(targets) == 1}


def generated_weight_names(model: onnx.ModelProto, constants: set[str]) -> list[str]:
    """Constant weights and biases of Conv/Gemm/MatMul nodes that still carry an exporter-generated name."""
    names = []
    for node in model.graph.node:
        slots = [i for i in (_WEIGHT_OPS.get(node.op_type), _BIAS_OPS.get(node.op_type)) if i is not None]
        names += [node.input[i] for i in slots if len(node.input) > i and node.input[i] in constants]
    return [name for name in dict.fromkeys(names) if name.startswith(GENERATED_PREFIX)]
