"""The parameters of a model by name: what recipe translations check a recipe's names against.

A plain description (names, sizes, owning layer types, what can be pruned), built from a module by
:meth:`ModelParams.from_module`. It sits below every package, so the recipe loader can take a
:data:`ModelCatalog` from its caller (``wf_pipeline.models.catalog.model_params``) and hand it to the
SparseML translation without either of them importing the models.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ParamInfo:
    numel: int
    module_type: str  # class name of the module that owns it, e.g. "Conv2d", "BatchNorm2d"
    prunable: bool  # a conv/linear weight: what wf-pipeline can prune


@dataclass
class ModelParams:
    """The parameters of the model a recipe will run on, in `named_parameters()` order."""

    description: str  # e.g. "resnet50 (from the --base recipe)"
    params: dict[str, ParamInfo] = field(default_factory=dict)

    @classmethod
    def from_module(cls, model: nn.Module, description: str, prunable_names: Iterable[str]) -> ModelParams:
        """`prunable_names`: the weights the pruning stage can prune (conv/linear weights)."""
        prunable = set(prunable_names)
        owners = {
            id(param): type(module).__name__ for module in model.modules() for param in module.parameters(recurse=False)
        }
        params = {
            name: ParamInfo(param.numel(), owners.get(id(param), "?"), name in prunable)
            for name, param in model.named_parameters()
        }
        return cls(description, params)

    @property
    def prunable(self) -> list[str]:
        return [name for name, info in self.params.items() if info.prunable]


# Builds the ModelParams of a raw recipe's model section; the bool says whether the recipe is the user's.
ModelCatalog = Callable[[dict[str, Any], bool], ModelParams]
