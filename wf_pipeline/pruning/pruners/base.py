"""One interface for every pruning method: collect statistics → score → choose → update.

A pruner is a small object built from :class:`PruneSettings`. :func:`wf_pipeline.pruning.step.prune_step`
drives it over a :class:`PruneView` (the selected parameters of a model and their masks) without
knowing which method it is:

* ``collect(view, ctx)`` — statistics from the Fisher data (gradients), or nothing for magnitude;
* ``score(view, stats)`` — one score per prunable unit (lower = pruned first);
* ``choose(view, scores, target)`` — the units newly pruned to reach the target sparsity;
* ``update(view, stats, chosen)`` — new weights for what stays, masks for what goes, and the predicted
  loss increase.

Unstructured methods score single weights of a flat vector over the selected parameters;
:class:`FlatPruner` holds that common plumbing, so each method only states its maths.
"""
from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Generic, TypeVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.ranking import choose_pruned
from wf_pipeline.pruning.settings import PruneSettings
from wf_pipeline.pruning.step_report import StepDetails

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
Stats = TypeVar("Stats")


@dataclass
class StepContext:
    """What a pruning step may use besides the weights: the Fisher data and how to share statistics.

    `batches()` returns a fresh iterable of (inputs, labels) from the Fisher pool; `reduce_fn` sums a
    statistic in place across processes (multi-process runs); `timings` collects seconds per phase.
    """

    model: nn.Module
    batches: Batches | None = None
    loss_fn: LossFn = F.cross_entropy
    reduce_fn: ReduceFn | None = None
    progress: Progress | None = None
    generator: torch.Generator | None = None
    timings: dict[str, float] = field(default_factory=lambda: {"gradients": 0.0, "inverse": 0.0, "obs": 0.0})
    num_grads: int = 0  # gradients in the Fisher statistics built so far (all ranks)
    details: StepDetails = field(default_factory=StepDetails)  # what the method records for the step's report
    spill_dir: Path | None = None  # where statistics that do not fit the memory budget may be spilled

    def add_time(self, phase: str, seconds: float) -> None:
        self.timings[phase] = self.timings.get(phase, 0.0) + seconds


@dataclass
class PruneView:
    """The selected parameters (name → parameter, in order) and their masks (True = kept)."""

    params: dict[str, nn.Parameter]
    masks: MaskSet

    @property
    def sizes(self) -> list[int]:
        return [p.numel() for p in self.params.values()]

    @property
    def device(self) -> torch.device:
        return next(iter(self.params.values())).device

    def flat_weights(self, dtype: torch.dtype | None = None) -> Tensor:
        """The selected weights concatenated into one flat vector (a copy)."""
        flat = torch.cat([p.detach().reshape(-1) for p in self.params.values()])
        return flat if dtype is None else flat.to(dtype)

    def flat_kept(self) -> Tensor:
        missing = [name for name in self.params if name not in self.masks.masks]
        if missing:
            raise KeyError(f"MaskSet has no mask for {missing}")
        return torch.cat([self.masks.masks[n].to(p.device).reshape(-1) for n, p in self.params.items()])

    @torch.no_grad()
    def write_back(self, kept: Tensor, weights: Tensor | None = None) -> None:
        """Store new masks and (optionally) new weights; pruned weights become exactly zero."""
        offset = 0
        for name, param in self.params.items():
            n = param.numel()
            old = self.masks.masks[name]
            mask = kept[offset : offset + n].view_as(param)
            self.masks.masks[name] = mask.to(old.device).clone()
            if weights is not None:
                param.copy_(weights[offset : offset + n].view_as(param).to(param.dtype))
            param.masked_fill_(~mask.to(param.device), 0)
            offset += n


@dataclass
class Update:
    """What ``update`` did: the predicted loss increase (None if unknown) and, for channels, how many went."""

    predicted_loss_increase: float | None
    channels_removed: int | None = None  # channel pruners: channels newly removed


class Pruner(ABC, Generic[Stats]):
    """A pruning method. Subclasses set ``name`` and implement the four steps."""

    name: ClassVar[str]
    needs_gradients: ClassVar[bool] = False

    def __init__(self, settings: PruneSettings) -> None:
        self.settings = settings

    @property
    def sub_steps(self) -> int:
        """Fisher recomputations per pruning step (``recompute_steps``; 1 for data-free methods)."""
        return self.settings.recompute_steps if self.needs_gradients else 1

    def held_parameters(self, model: nn.Module, selected: dict[str, nn.Parameter]) -> dict[str, nn.Parameter]:
        """Every parameter whose mask this method sets, given the recipe's selection (unstructured: the
        selection itself; a channel pruner adds the coupled BatchNorm and consumer parameters)."""
        return selected

    def sparsity(self, view: PruneView) -> float:
        """How pruned the view is, in this method's unit (unstructured: the fraction of zero weights)."""
        kept = view.flat_kept()
        return float((~kept).sum()) / kept.numel()

    def reached(self, view: PruneView, target_sparsity: float) -> bool:
        """Whether the view is already at or beyond the target, so the step has nothing to do."""
        kept = view.flat_kept()
        return round(target_sparsity * kept.numel()) <= int((~kept).sum())

    @abstractmethod
    def collect(self, view: PruneView, ctx: StepContext) -> Stats: ...

    @abstractmethod
    def score(self, view: PruneView, stats: Stats) -> Tensor: ...

    @abstractmethod
    def choose(self, view: PruneView, scores: Tensor, target_sparsity: float) -> Tensor: ...

    @abstractmethod
    def update(self, view: PruneView, stats: Stats, chosen: Tensor) -> Update: ...

    def prune(self, view: PruneView, ctx: StepContext, target_sparsity: float) -> Update:
        """One (sub-)step: the four steps in order, timed."""
        stats = self.collect(view, ctx)
        t0 = time.perf_counter()
        chosen = self.choose(view, self.score(view, stats), target_sparsity)
        outcome = self.update(view, stats, chosen)
        ctx.add_time("obs", time.perf_counter() - t0)
        return outcome


class FlatPruner(Pruner[Stats]):
    """Unstructured pruning: scores, choice and update over single weights of the flat vector."""

    def choose(self, view: PruneView, scores: Tensor, target_sparsity: float) -> Tensor:
        return choose_pruned(scores, view.flat_kept(), view.sizes, target_sparsity, self.ranking)

    @property
    def ranking(self) -> str:
        return self.settings.ranking


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode (BatchNorm running statistics, no dropout); every submodule's own mode restored after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training
