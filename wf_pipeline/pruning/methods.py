"""One pruning step with any method: WoodFisher, WoodTaylor, magnitude, uniform magnitude, diagonal Fisher.

:func:`prune_step` is the single entry point used by the one-shot sweep and the gradual schedule.
It prunes the selected parameters in place to a target sparsity, keeps already-pruned weights
pruned, updates the :class:`MaskSet` and leaves every pruned weight exactly zero.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.ranking import choose_pruned

if TYPE_CHECKING:
    from wf_pipeline.recipe.schema import PruningConfig

METHODS = ("woodfisher", "woodtaylor", "magnitude", "magnitude_uniform", "diag_fisher")
SECOND_ORDER_METHODS = ("woodfisher", "woodtaylor", "diag_fisher")
Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
ReduceFn = Callable[[Tensor], None]


@dataclass(frozen=True)
class PruneSettings:
    """How one pruning step is computed (mirrors ``pruning`` + ``pruning.woodfisher`` in a recipe).

    In a multi-process run each rank computes its own share of the gradients: pass ``num_grads``
    already divided by the world size together with a ``reduce_fn`` that sums across ranks.
    """

    method: str
    ranking: str = "global"
    num_grads: int = 1000
    grad_batch_size: int = 1
    block_size: int = 128
    damp: float = 1e-5
    update: str = "joint"
    fisher_type: str = "empirical"
    recompute_steps: int = 1
    chunk_size: int = 100
    dtype: str = "float32"
    route: str = "fast"

    def __post_init__(self) -> None:
        choices = {
            "method": METHODS,
            "ranking": ("global", "uniform"),
            "update": ("joint", "independent", "none"),
            "fisher_type": ("empirical", "true"),
            "dtype": ("float32", "float64"),
            "route": ("fast", "woodbury"),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"PruneSettings.{name}={getattr(self, name)!r}; expected one of {allowed}")
        for name in ("num_grads", "grad_batch_size", "block_size", "recompute_steps", "chunk_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"PruneSettings.{name} must be >= 1, got {getattr(self, name)}")
        if not self.damp > 0:
            raise ValueError(f"PruneSettings.damp must be > 0, got {self.damp}")

    @property
    def effective_ranking(self) -> str:
        return "uniform" if self.method == "magnitude_uniform" else self.ranking

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.float64 if self.dtype == "float64" else torch.float32

    @classmethod
    def from_config(cls, cfg: "PruningConfig") -> "PruneSettings":
        if cfg.method == "none":
            raise WFError(
                "pruning.method is 'none': there is no pruning step to configure",
                hint="set pruning.method to woodfisher, woodtaylor, magnitude, magnitude_uniform or diag_fisher",
            )
        wf = cfg.woodfisher
        return cls(
            method=cfg.method,
            ranking=cfg.ranking,
            num_grads=wf.num_grads,
            grad_batch_size=wf.grad_batch_size,
            block_size=wf.block_size,
            damp=wf.damp,
            update=wf.update,
            fisher_type=wf.fisher_type,
            recompute_steps=wf.recompute_steps,
            chunk_size=wf.chunk_size,
            dtype=wf.dtype,
            route=wf.route,
        )


@dataclass
class PruneReport:
    """What a pruning step did. ``timings`` are seconds: gradients, inverse, obs, total (and, for the
    gradient-based methods, accumulate: the part of inverse spent folding gradients into statistics)."""

    target_sparsity: float
    achieved_sparsity: float
    per_layer_sparsity: dict[str, float]
    timings: dict[str, float]
    num_grads: int
    predicted_loss_increase: float | None
    method: str = ""
    newly_pruned: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def flat_weights(params: dict[str, nn.Parameter], dtype: torch.dtype | None = None) -> Tensor:
    """The selected weights concatenated into one flat vector (a copy)."""
    flat = torch.cat([p.detach().reshape(-1) for p in params.values()])
    return flat if dtype is None else flat.to(dtype)


def flat_kept(masks: MaskSet, params: dict[str, nn.Parameter]) -> Tensor:
    missing = [name for name in params if name not in masks.masks]
    if missing:
        raise KeyError(f"MaskSet has no mask for {missing}")
    return torch.cat([masks.masks[n].to(p.device).reshape(-1) for n, p in params.items()])


@torch.no_grad()
def write_back(params: dict[str, nn.Parameter], masks: MaskSet, weights: Tensor | None, kept: Tensor) -> None:
    """Store new weights (optional) and masks; pruned weights become exactly zero."""
    offset = 0
    for name, param in params.items():
        n = param.numel()
        old = masks.masks[name]
        mask = kept[offset : offset + n].view_as(param)
        masks.masks[name] = mask.to(old.device).clone()
        if weights is not None:
            param.copy_(weights[offset : offset + n].view_as(param).to(param.dtype))
        param.masked_fill_(~mask.to(param.device), 0)
        offset += n


def magnitude_scores(weights: Tensor) -> Tensor:
    return weights.abs()


def prune_step(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    masks: MaskSet,
    target_sparsity: float,
    settings: PruneSettings,
    batches: Batches | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    reduce_fn: ReduceFn | None = None,
    progress: Progress | None = None,
    generator: torch.Generator | None = None,
) -> PruneReport:
    """Prune `params` in place until ``target_sparsity`` of all their weights are zero.

    Already-pruned weights (mask False) stay pruned and count towards the target. For woodfisher and
    woodtaylor the OBS update is applied to the surviving weights. `batches()` must return a fresh
    iterable of (inputs, labels) from the Fisher pool (cycled if it runs short); it is unused by the
    magnitude methods. `reduce_fn` (multi-process) sums each accumulated statistic in place across
    ranks, so all ranks prune identical weights; each rank then passes ``settings.num_grads`` already
    divided by the world size. Per (sub-)step it is called, on every rank in the same order, first on a
    float64 scalar holding this rank's ``num_grads`` (to learn the total N before accumulating), then
    on the statistics: the block Gram sums, the gradient sum and the float64 sample count (diagonal
    Fisher: the squared-gradient sum instead of the Gram). The model is in eval mode while gradients
    are computed, then every submodule's mode is restored.
    """
    if not 0.0 <= target_sparsity < 1.0:
        raise ValueError(f"target sparsity must be in [0, 1), got {target_sparsity}")
    if not params:
        raise ValueError("no parameters to prune")
    started = time.perf_counter()
    timings = {"gradients": 0.0, "inverse": 0.0, "obs": 0.0}
    sizes = [p.numel() for p in params.values()]
    kept = flat_kept(masks, params)
    zeros_before = int((~kept).sum())
    num_grads_used = 0
    predicted: float | None = None
    extra: dict[str, Any] = {}

    if settings.method in ("magnitude", "magnitude_uniform"):
        t0 = time.perf_counter()
        weights = flat_weights(params)
        new = choose_pruned(magnitude_scores(weights), kept, sizes, target_sparsity, settings.effective_ranking)
        write_back(params, masks, None, kept & ~new)
        timings["obs"] = time.perf_counter() - t0
    else:
        if batches is None:
            raise ValueError(f"method {settings.method!r} needs `batches` to compute gradients")
        from wf_pipeline.pruning.second_order import second_order_prune

        result = second_order_prune(
            model, params, masks, target_sparsity, settings, batches, loss_fn, reduce_fn, progress, generator
        )
        for key, value in result.timings.items():
            timings[key] = timings.get(key, 0.0) + value
        num_grads_used = result.num_grads
        predicted = result.predicted_loss_increase
        extra = result.extra

    timings["total"] = time.perf_counter() - started
    kept_after = flat_kept(masks, params)
    zeros_after = int((~kept_after).sum())
    return PruneReport(
        target_sparsity=float(target_sparsity),
        achieved_sparsity=zeros_after / kept_after.numel(),
        per_layer_sparsity={n: float((~masks.masks[n]).sum()) / masks.masks[n].numel() for n in params},
        timings=timings,
        num_grads=num_grads_used,
        predicted_loss_increase=predicted,
        method=settings.method,
        newly_pruned=zeros_after - zeros_before,
        extra=extra,
    )
