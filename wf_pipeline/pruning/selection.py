"""Which weights are pruned: conv/linear weights whose names match the recipe's regexes."""
from __future__ import annotations

import re

from torch import nn

from wf_pipeline.errors import WFError

# Modules whose `.weight` is a prunable dense kernel (biases and norm parameters are never pruned).
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)

_MAX_NAMES_IN_HINT = 30


def prunable_weight_names(model: nn.Module) -> list[str]:
    """Names of every conv/linear weight in `model`, in `named_parameters()` order."""
    weight_ids = {
        id(module.weight)
        for module in model.modules()
        if isinstance(module, PRUNABLE_MODULES) and isinstance(getattr(module, "weight", None), nn.Parameter)
    }
    return [name for name, param in model.named_parameters() if id(param) in weight_ids]


def select_prunable(
    model: nn.Module, layers: list[str], skip: list[str], min_layer_params: int = 0
) -> dict[str, nn.Parameter]:
    """Weights of conv/linear modules matched (``re.search``) by any of `layers` and none of `skip`.

    Layers with fewer than `min_layer_params` weights are left dense. The result keeps the order of
    ``model.named_parameters()``. Raises :class:`WFError` when nothing is selected.
    """
    layer_patterns = [re.compile(p) for p in layers]
    skip_patterns = [re.compile(p) for p in skip]
    candidates = prunable_weight_names(model)
    named = dict(model.named_parameters())
    selected: dict[str, nn.Parameter] = {}
    for name in candidates:
        if not any(p.search(name) for p in layer_patterns):
            continue
        if any(p.search(name) for p in skip_patterns):
            continue
        if named[name].numel() < min_layer_params:
            continue
        selected[name] = named[name]
    if not selected:
        shown = ", ".join(candidates[:_MAX_NAMES_IN_HINT])
        if len(candidates) > _MAX_NAMES_IN_HINT:
            shown += f", ... ({len(candidates)} in all)"
        raise WFError(
            f"no prunable weights selected by pruning.layers={layers} and pruning.skip={skip}"
            f" (min_layer_params={min_layer_params})",
            hint=f"conv/linear weights in this model: {shown or 'none'}",
        )
    return selected
