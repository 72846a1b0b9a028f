"""Per-sample gradients of conv/linear weights from one batched backward pass (as BackPACK/Opacus do).

For a layer ``y = W·x`` the gradient of sample n's loss with respect to ``W`` is a contraction of
the layer's input with the gradient at its output: ``outer(∂ℓ_n/∂y_n, x_n)`` for Linear, a
correlation of the two for convolutions (computed for all samples by one grouped-convolution
weight gradient, see :func:`conv_grads`). One forward pass
records every selected layer's input; one backward pass of the *summed* per-group losses, asked for
the gradients at the selected layers' outputs only (so it stops there: no input gradient for the
first selected layer or anything before it), delivers ``∂ℓ_n/∂y_n`` for all samples at once, since in
a model whose samples do not interact (BatchNorm on running statistics) sample n's output gradient is
its own loss's.

:func:`layerwise_blocker` says, before anything runs, why a model cannot take this route (its
caller then uses generic ``vmap``); :class:`LayerRecorder` raises :class:`LayerwiseUnsupported`
for what only shows at run time (a weight used outside its module, an input changed in place).
"""
from __future__ import annotations

import copy
import itertools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.grad import conv1d_weight, conv2d_weight, conv3d_weight

# Layers with a per-sample rule; a subclass qualifies only if it keeps the stock forward.
_RULE_TYPES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


class LayerwiseUnsupported(RuntimeError):
    """The model needs the generic per-sample route; the message says why."""


def _has_rule(module: nn.Module) -> bool:
    return any(isinstance(module, t) and type(module).forward is t.forward for t in _RULE_TYPES)


def _mixes_samples(module: nn.Module) -> str | None:
    """Why this module makes one sample's output depend on others (or on chance), else None."""
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        if module.training:
            return "is a BatchNorm layer in training mode (batch statistics couple the samples)"
        if module.running_mean is None:
            return "is a BatchNorm layer without running statistics (batch statistics couple the samples)"
    if isinstance(module, nn.modules.dropout._DropoutNd) and module.training and module.p > 0:
        return "is a Dropout layer in training mode"
    return None


def layerwise_blocker(model: nn.Module, params: Mapping[str, Tensor]) -> str | None:
    """Why `params` of `model` cannot use the layer-wise route, or None if they can.

    Requires every selected parameter to be the ``weight`` of a stock Linear or Conv1d/2d/3d and no
    module that couples samples. Leaf modules from outside ``torch.nn`` are unknown territory (their
    forward could mix samples), so they are refused too; container glue code is trusted, and the
    caller cross-checks the first chunk against plain autograd.
    """
    owners = weight_owners(model, params)
    for name, modules in zip(params, owners, strict=True):
        if not modules:
            return f"parameter {name!r} is not the weight of a Linear or Conv1d/2d/3d layer"
    for mod_name, module in model.named_modules():
        reason = _mixes_samples(module)
        if reason is not None:
            return f"module {mod_name!r} {reason}"
        is_leaf = next(module.children(), None) is None
        if is_leaf and not type(module).__module__.startswith("torch.nn"):
            return f"module {mod_name!r} ({type(module).__name__}) is a custom layer of unknown batch behaviour"
    return None


def weight_owners(model: nn.Module, params: Mapping[str, Tensor]) -> list[list[nn.Module]]:
    """For each parameter, the rule-bearing modules whose ``weight`` it is (several if tied)."""
    by_id: dict[int, list[nn.Module]] = {}
    for module in model.modules():
        weight = getattr(module, "weight", None)
        if _has_rule(module) and isinstance(weight, Tensor):
            by_id.setdefault(id(weight), []).append(module)
    return [by_id.get(id(p), []) for p in params.values()]


# ----------------------------------------------------------------------------- replicas
class FrozenReplica:
    """A copy of a model for one worker thread: its own module objects (so hooks and the forward of
    another thread never touch it), parameters and buffers sharing the original's storage (in-place
    changes show through, nothing is copied) with ``requires_grad=False``, as ``functional_call`` with
    detached parameters would run it."""

    def __init__(self, model: nn.Module) -> None:
        self.original = model
        shared = {id(t): t for t in itertools.chain(model.parameters(), model.buffers())}
        self.module = copy.deepcopy(model, memo=dict(shared))
        self._pairs = list(zip(model.modules(), self.module.modules(), strict=True))
        for _, sub in self._pairs:
            for name, p in sub._parameters.items():
                if p is not None:
                    sub._parameters[name] = nn.Parameter(p.detach(), requires_grad=False)
        self._storage = self._pointers()

    def _pointers(self) -> list[int]:
        return [t.data_ptr() for t in itertools.chain(self.original.parameters(), self.original.buffers())]

    def current(self) -> bool:
        """False once a parameter or buffer of the original was replaced (not just changed in place)."""
        return self._pointers() == self._storage

    def sync_modes(self) -> None:
        """Copy every submodule's train/eval mode from the original."""
        for original, replica in self._pairs:
            replica.training = original.training

    def counterparts(self, modules: Sequence[nn.Module]) -> list[nn.Module]:
        """The replica's modules standing for `modules` of the original."""
        index = {id(o): r for o, r in self._pairs}
        return [index[id(m)] for m in modules]


# ----------------------------------------------------------------------------- recording
@dataclass
class _Call:
    """One forward call of a recorded layer: its input, the autograd edge of its output and, after
    :meth:`LayerRecorder.backward`, its output gradient."""

    module: nn.Module
    inputs: Tensor
    version: int
    edge: GradientEdge
    grad_out: Tensor | None = None


@dataclass
class LayerRecorder:
    """Forward hooks that keep each layer's input and the autograd edge of its output.

    The edge names the autograd node that produced the layer's output as the forward left it, not
    the output tensor, so an in-place op after the layer (``ReLU(inplace=True)``) cannot redirect it.
    """

    modules: Sequence[nn.Module]
    calls: dict[int, list[_Call]] = field(default_factory=dict)
    problem: str | None = None

    def __enter__(self) -> LayerRecorder:
        self._handles = [m.register_forward_hook(self._hook) for m in dict.fromkeys(self.modules)]
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, module: nn.Module, args: tuple[object, ...], output: object) -> None:
        if not torch.is_grad_enabled():
            return  # a call under no_grad contributes nothing to any gradient
        if len(args) != 1 or not isinstance(args[0], Tensor) or not isinstance(output, Tensor):
            self.problem = f"{type(module).__name__} was called with other than one tensor input"
            return
        if output.grad_fn is None:
            self.problem = f"a {type(module).__name__} layer's input does not depend on the model input"
            return
        inputs = args[0]
        call = _Call(module, inputs.detach(), inputs._version, get_gradient_edge(output))
        self.calls.setdefault(id(module), []).append(call)

    def backward(self, loss: Tensor) -> None:
        """Fill every recorded call's output gradient from one backward pass of `loss`.

        Only the gradients at the recorded outputs are asked for, so autograd runs no node that
        leads only to earlier tensors (the first recorded layer's input gradient, the layers before
        it). A call whose output does not reach `loss` keeps ``grad_out = None``.
        """
        calls = [c for module_calls in self.calls.values() for c in module_calls]
        if not calls or not loss.requires_grad:
            return
        grads = torch.autograd.grad(loss, [c.edge for c in calls], allow_unused=True)
        for call, grad_out in zip(calls, grads, strict=True):
            call.grad_out = grad_out

    def take_calls(self, modules: Sequence[nn.Module]) -> list[_Call]:
        """Every recorded call of `modules`, checked (raises :class:`LayerwiseUnsupported`)."""
        if self.problem is not None:
            raise LayerwiseUnsupported(self.problem)
        calls = [c for m in modules for c in self.calls.pop(id(m), [])]
        if not calls:
            raise LayerwiseUnsupported(
                f"the {type(modules[0]).__name__} owning a selected weight was never called: the weight is used"
                " outside its module's forward"
            )
        for call in calls:
            if call.inputs._version != call.version:
                raise LayerwiseUnsupported("a layer's input was modified in place after the layer used it")
        return calls


# ----------------------------------------------------------------------------- per-layer rules
def linear_grads(module: nn.Linear, inputs: Tensor, grad_out: Tensor, groups: int) -> Tensor:
    """``(groups, out·in)``: per-group sums of ``outer(grad_out, input)`` over samples and extra dims."""
    x = inputs.reshape(groups, -1, inputs.shape[-1])
    g = grad_out.reshape(groups, -1, grad_out.shape[-1])
    return torch.bmm(g.transpose(1, 2), x).reshape(groups, -1)


# Weight gradient of a convolution, by the weight's number of dimensions (1-d, 2-d, 3-d convs).
_CONV_WEIGHT_GRAD: dict[int, Callable[..., Tensor]] = {3: conv1d_weight, 4: conv2d_weight, 5: conv3d_weight}


# Below this many output positions per sample (e.g. 7x7 maps) an im2col product beats the grouped
# weight gradient on CPU (ResNet-20, 64 channels at 7x7: 10 ms vs 16-25 ms for 100 samples; at 14x14
# and above the grouped route is 3-9x faster).
UNFOLD_MAX_POSITIONS = 100


def conv_grads(
    module: nn.Conv1d | nn.Conv2d | nn.Conv3d, inputs: Tensor, grad_out: Tensor, groups: int, method: str = "auto"
) -> Tensor:
    """``(groups, weight.numel())``: per-group weight gradients of a (grouped, strided, dilated) conv.

    'grouped': the groups of samples are stacked along the channels and become channel groups of
    one grouped convolution (the samples within a group stay its batch, so they are summed); its
    weight gradient, one backend call, is every group's gradient at once, at about the cost of the
    ordinary batched weight gradient and without an im2col copy. 'unfold' (1-d/2-d): an im2col
    matrix per sample contracted with the output gradient, faster for small feature maps. 'auto'
    picks by the number of output positions.
    """
    padding: tuple[int, ...] | str | int = module.padding
    if module.padding_mode != "zeros" or isinstance(padding, str):
        # Apply the padding the layer's forward applies ('same' may be asymmetric; 'valid' is none).
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        inputs = F.pad(inputs, module._reversed_padding_repeated_twice, mode=mode)
        padding = (0,) * (inputs.dim() - 2)
    if method == "auto":
        small = grad_out[0, 0].numel() < UNFOLD_MAX_POSITIONS
        method = "unfold" if small and not isinstance(module, nn.Conv3d) else "grouped"
    if method == "unfold":
        return _unfold_conv_grads(module, inputs, grad_out, groups, padding)  # type: ignore[arg-type]
    per_group = inputs.shape[0] // groups
    x = inputs.reshape(groups, per_group, *inputs.shape[1:]).transpose(0, 1)
    g = grad_out.reshape(groups, per_group, *grad_out.shape[1:]).transpose(0, 1)
    weight = module.weight
    grad = _CONV_WEIGHT_GRAD[weight.dim()](
        x.reshape(per_group, -1, *x.shape[3:]),
        (groups * weight.shape[0], *weight.shape[1:]),
        g.reshape(per_group, -1, *g.shape[3:]),
        stride=module.stride,
        padding=padding,
        dilation=module.dilation,
        groups=groups * module.groups,
    )
    return grad.reshape(groups, -1)


def _unfold_conv_grads(
    module: nn.Conv1d | nn.Conv2d, inputs: Tensor, grad_out: Tensor, groups: int, padding: tuple[int, ...]
) -> Tensor:
    kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
    if isinstance(module, nn.Conv1d):  # a 1-d conv is a 2-d conv over a height-1 image
        inputs = inputs.unsqueeze(2)
        kernel, dilation, padding, stride = (1, *kernel), (1, *dilation), (0, *padding), (1, *stride)
    cols = F.unfold(inputs, kernel, dilation=dilation, padding=padding, stride=stride)  # (S, Cin·k, L)
    samples, rows, positions = cols.shape
    cols = cols.view(groups, samples // groups, module.groups, rows // module.groups, positions)
    g = grad_out.reshape(groups, samples // groups, module.groups, -1, positions)
    return torch.einsum("nsgol,nsgcl->ngoc", g, cols).reshape(groups, -1)


def _rule(call: _Call, groups: int) -> Tensor:
    assert call.grad_out is not None
    rule = linear_grads if isinstance(call.module, nn.Linear) else conv_grads
    return rule(call.module, call.inputs, call.grad_out, groups)  # type: ignore[arg-type]


def layer_grads(calls: Sequence[_Call], groups: int) -> Tensor | None:
    """``(groups, weight.numel())`` gradients of one weight, summed over its calls; None (all zero)
    when no call's output received a gradient (none reaches the loss)."""
    live = [c for c in calls if c.grad_out is not None]
    if not live:
        return None
    rows = _rule(live[0], groups)
    for call in live[1:]:
        rows.add_(_rule(call, groups))
    return rows
