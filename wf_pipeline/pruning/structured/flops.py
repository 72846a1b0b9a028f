"""Multiply-accumulates and parameters of conv/linear layers as functions of their kept channels.

"FLOPs" in this project means multiply-accumulates of conv and linear layers (the usual convention
of pruning papers and of Torch-Pruning's ``count_ops_and_params``); BatchNorm, activations and
pooling are not counted. Spatial sizes are measured once with forward hooks on an example input, so
the cost of any channel configuration is a cheap formula:

* conv (groups=1): ``out · in · kh·kw · H_out·W_out``; depthwise: ``channels · kh·kw · H_out·W_out``;
* linear: ``out · in`` per output position (1 for a classifier on pooled features).
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn


@dataclass(frozen=True)
class LayerShape:
    name: str
    kind: str  # "conv" | "depthwise" | "linear"
    out_channels: int
    in_channels: int
    kernel: int  # kh·kw (1 for linear)
    positions: int  # output positions per sample (H_out·W_out)
    bias: bool

    def macs(self, out_kept: int, in_kept: int) -> int:
        if self.kind == "depthwise":
            return out_kept * self.kernel * self.positions
        return out_kept * in_kept * self.kernel * self.positions

    def params(self, out_kept: int, in_kept: int) -> int:
        weights = out_kept * self.kernel if self.kind == "depthwise" else out_kept * in_kept * self.kernel
        return weights + (out_kept if self.bias else 0)


def layer_shapes(model: nn.Module, example_input: Tensor) -> dict[str, LayerShape]:
    """Shapes of every conv and linear layer of `model`, with spatial sizes from one forward pass."""
    shapes: dict[str, LayerShape] = {}
    hooks = []

    def record(name: str):  # noqa: ANN202 - a hook
        def hook(module: nn.Module, _inputs: object, output: Tensor) -> None:
            if isinstance(module, nn.modules.conv._ConvNd):
                depthwise = module.groups > 1 and module.groups == module.in_channels == module.out_channels
                kind = "depthwise" if depthwise else "conv"
                shapes[name] = LayerShape(name, kind, module.out_channels, module.in_channels // module.groups,
                                          math.prod(module.kernel_size), math.prod(output.shape[2:]),
                                          module.bias is not None)
            else:
                assert isinstance(module, nn.Linear)
                shapes[name] = LayerShape(name, "linear", module.out_features, module.in_features, 1,
                                          output[0].numel() // module.out_features, module.bias is not None)
        return hook

    for name, module in model.named_modules():
        if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)):
            hooks.append(module.register_forward_hook(record(name)))
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            model(example_input[:1])
    finally:
        for hook in hooks:
            hook.remove()
        for module, training in modes:
            module.training = training
    return shapes


def total_macs(shapes: Mapping[str, LayerShape], out_kept: Mapping[str, int], in_kept: Mapping[str, int]) -> int:
    """MACs of all layers; layers missing from the mappings keep their full width."""
    return sum(s.macs(out_kept.get(n, s.out_channels), in_kept.get(n, s.in_channels)) for n, s in shapes.items())


def total_params(shapes: Mapping[str, LayerShape], out_kept: Mapping[str, int], in_kept: Mapping[str, int]) -> int:
    """Conv/linear parameters (weights and biases) of all layers."""
    return sum(s.params(out_kept.get(n, s.out_channels), in_kept.get(n, s.in_channels)) for n, s in shapes.items())
