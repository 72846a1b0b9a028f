"""Physical removal of zeroed channels (Torch-Pruning surgery), checked to leave the outputs unchanged.

During gradual pruning a removed channel is only held at zero by masks (see
:mod:`wf_pipeline.pruning.structured.groups`). Once pruning ends, every channel whose member
entries are all masked is cut out of the layers with Torch-Pruning's ``Group.prune()``: conv and
linear weights shrink, BatchNorm statistics shrink, and the network becomes physically smaller.
Because the removed channels carried exactly zero, the outputs do not change; that is verified on a
sample input and a mismatch is an error, not a silent accuracy loss.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from wf_pipeline.pruning.structured.groups import build_channel_graph, removed_channels

# Outputs may differ by rounding only (sums over fewer terms): tolerance relative to the output scale.
PARITY_RTOL = 1e-4


@dataclass
class SurgeryResult:
    """Channels per layer before/after and the largest output change measured."""

    removed_per_group: dict[str, int] = field(default_factory=dict)
    channels_before: dict[str, int] = field(default_factory=dict)
    channels_after: dict[str, int] = field(default_factory=dict)
    params_before: int = 0
    params_after: int = 0
    max_output_change: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "removed_per_group": self.removed_per_group,
            "channels_before": self.channels_before,
            "channels_after": self.channels_after,
            "params_before": self.params_before,
            "params_after": self.params_after,
            "max_output_change": self.max_output_change,
        }


def output_channels(model: nn.Module) -> dict[str, int]:
    """Output channels (features) of every conv and linear layer, by module name."""
    out: dict[str, int] = {}
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            out[name] = int(module.out_channels)
        elif isinstance(module, nn.Linear):
            out[name] = int(module.out_features)
    return out


@torch.no_grad()
def _outputs(model: nn.Module, sample: Tensor) -> Tensor:
    return model(sample).detach().double()


def remove_masked_channels(model: nn.Module, masks: Mapping[str, Tensor], sample: Tensor) -> SurgeryResult:
    """Cut every fully masked channel out of `model` in place; masked entries are zeroed first.

    `masks` (True = kept) are keyed by parameter name of `model`; a channel counts as removed when
    all its members' entries (weights, biases, BatchNorm weight and bias, consumer columns) are
    masked. `sample` is an input batch used to trace the graph and to check the outputs. Raises
    RuntimeError if the outputs change beyond rounding (the model has an operation that maps a
    zero channel to a non-zero value, so the channel was not really removed by its masks).
    """
    was_training = model.training
    model.eval()
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            if name in params:
                params[name].masked_fill_(~mask.to(params[name].device), 0)
    result = SurgeryResult(channels_before=output_channels(model),
                           params_before=sum(p.numel() for p in model.parameters()))
    before = _outputs(model, sample)
    graph = build_channel_graph(model, sample)
    full = {name: masks[name].cpu() for name in masks}
    for group in graph.prunable:
        if any(name not in full for m in group.members for name, _ in m.tensors):
            continue  # not a group the masks were about
        removed = removed_channels(group, full)
        count = int(removed.sum())
        if not count:
            continue
        if count >= group.size:
            raise RuntimeError(f"channel group {group.name}: all {group.size} channels are masked; keep at least one")
        idxs = removed.nonzero().flatten().tolist()
        graph.dependency_graph.get_pruning_group(group.root, group.root_handler, idxs).prune()
        result.removed_per_group[group.name] = count
    after = _outputs(model, sample)
    model.train(was_training)
    scale = float(before.abs().max()) or 1.0
    result.max_output_change = float((after - before).abs().max()) if after.shape == before.shape else float("inf")
    result.channels_after = output_channels(model)
    result.params_after = sum(p.numel() for p in model.parameters())
    if not result.max_output_change <= PARITY_RTOL * scale:
        raise RuntimeError(
            f"removing zeroed channels changed the model's outputs by {result.max_output_change:.3g} "
            f"(output scale {scale:.3g}): some operation maps a zeroed channel to a non-zero value"
        )
    return result
