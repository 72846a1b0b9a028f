"""Runtime settings of one pruning step: the recipe's method and ranking plus its ``woodfisher`` section.

The fields are the schema's own (:class:`WoodFisherConfig`), so a setting is declared and validated in
one place; ``PruneSettings(method="woodfisher", num_grads=200)`` is shorthand for building that section.
"""
from __future__ import annotations

import typing
from typing import Any

import torch

from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import PruningConfig, WoodFisherConfig

# Every pruning method a recipe may name (one pruner class each, see pruners/registry.py).
METHODS: tuple[str, ...] = tuple(
    m for m in typing.get_args(PruningConfig.model_fields["method"].annotation) if m != "none")
RANKINGS: tuple[str, ...] = typing.get_args(PruningConfig.model_fields["ranking"].annotation)


class PruneSettings:
    """How one pruning step is computed. Unknown attributes are read from the ``woodfisher`` section.

    In a multi-process run each rank computes its own share of the gradients: pass ``num_grads``
    already divided by the world size together with a ``reduce_fn`` that sums across ranks.
    """

    __slots__ = ("method", "ranking", "woodfisher")
    method: str
    ranking: str
    woodfisher: WoodFisherConfig

    def __init__(self, method: str, ranking: str = "global", woodfisher: WoodFisherConfig | None = None,
                 **fields: Any) -> None:
        if method not in METHODS:
            raise ValueError(f"PruneSettings.method={method!r}; expected one of {METHODS}")
        if ranking not in RANKINGS:
            raise ValueError(f"PruneSettings.ranking={ranking!r}; expected one of {RANKINGS}")
        base = woodfisher or WoodFisherConfig()
        object.__setattr__(self, "method", method)
        object.__setattr__(self, "ranking", ranking)
        # Validated by the schema (pydantic's ValidationError is a ValueError).
        object.__setattr__(self, "woodfisher", WoodFisherConfig(**{**base.model_dump(), **fields}) if fields else base)

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self.woodfisher, name)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("PruneSettings is immutable; use .replace(...)")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PruneSettings) and (self.method, self.ranking, self.woodfisher) == (
            other.method, other.ranking, other.woodfisher)

    def __repr__(self) -> str:
        return f"PruneSettings(method={self.method!r}, ranking={self.ranking!r}, woodfisher={self.woodfisher!r})"

    def replace(self, **fields: Any) -> PruneSettings:
        """A copy with some fields changed (method, ranking or any ``woodfisher`` field)."""
        method = fields.pop("method", self.method)
        ranking = fields.pop("ranking", self.ranking)
        return PruneSettings(method, ranking, self.woodfisher, **fields)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.woodfisher.dtype == "float64" else torch.float32

    @classmethod
    def from_config(cls, cfg: PruningConfig) -> PruneSettings:
        if not cfg.prunes:
            raise WFError(
                "pruning.method is 'none': there is no pruning step to configure",
                hint="set pruning.method to one of " + ", ".join(METHODS),
            )
        return cls(cfg.method, cfg.ranking, cfg.woodfisher)
