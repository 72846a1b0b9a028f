"""Boolean pruning masks (True = kept) and the hooks that keep pruned weights exactly zero.

Masks are keyed by parameter name. A model wrapped in DistributedDataParallel (``module.`` prefix)
or ``torch.compile`` (``_orig_mod.`` prefix) is matched too, so one MaskSet serves every wrapper.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

_WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def _strip_wrappers(name: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name = name[len(prefix):]
                stripped = True
    return name


def resolve_parameters(model: nn.Module, names: Iterable[str]) -> dict[str, nn.Parameter]:
    """Map each mask name to the model's parameter, ignoring DDP/compile wrapper prefixes."""
    by_plain_name = {_strip_wrappers(n): p for n, p in model.named_parameters()}
    resolved: dict[str, nn.Parameter] = {}
    for name in names:
        plain = _strip_wrappers(name)
        if plain not in by_plain_name:
            raise KeyError(f"mask for {name!r} has no matching parameter in the model")
        resolved[name] = by_plain_name[plain]
    return resolved


@dataclass
class MaskHandle:
    """Returned by :meth:`MaskSet.attach`; call :meth:`remove` to detach the optimizer hooks."""

    handles: list[Any] = field(default_factory=list)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


class MaskSet:
    """Per-parameter boolean masks, True where the weight is kept."""

    def __init__(self, masks: Mapping[str, torch.Tensor]) -> None:
        self.masks: dict[str, torch.Tensor] = {name: m.to(torch.bool) for name, m in masks.items()}

    # ----------------------------------------------------------------- construction
    @classmethod
    def dense(cls, params: Mapping[str, torch.Tensor]) -> MaskSet:
        return cls({name: torch.ones_like(p, dtype=torch.bool) for name, p in params.items()})

    @classmethod
    def from_zeros(cls, params: Mapping[str, torch.Tensor]) -> MaskSet:
        return cls({name: p.detach() != 0 for name, p in params.items()})

    # ----------------------------------------------------------------- applying
    @torch.no_grad()
    def apply(self, model: nn.Module) -> None:
        """Set every pruned weight to exactly zero."""
        for name, param in resolve_parameters(model, self.masks).items():
            param.masked_fill_(~self._mask_on(name, param), 0)

    @torch.no_grad()
    def mask_grads(self, model: nn.Module) -> None:
        """Zero the gradient at pruned positions (no-op for parameters without a gradient)."""
        for name, param in resolve_parameters(model, self.masks).items():
            if param.grad is not None:
                param.grad.masked_fill_(~self._mask_on(name, param), 0)

    @torch.no_grad()
    def mask_optimizer_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        """Zero weight-shaped optimizer state (momentum, Adam moments) at pruned positions."""
        for name, param in resolve_parameters(model, self.masks).items():
            state = optimizer.state.get(param)
            if not state:
                continue
            pruned = ~self._mask_on(name, param)
            for value in state.values():
                if torch.is_tensor(value) and value.shape == param.shape:
                    value.masked_fill_(pruned, 0)

    def attach(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> MaskHandle:
        """Keep the masks exact through every ``optimizer.step()``.

        Before the step, gradients are masked; after it, pruned weights and their optimizer state
        (momentum buffers, Adam moments) are zeroed, so neither momentum nor weight decay can revive
        a pruned weight. The hooks read ``self.masks`` at each step, so masks updated in place by a
        later pruning step take effect immediately. Existing state is masked now as well.
        """
        self.apply(model)
        self.mask_optimizer_state(model, optimizer)

        def before_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            self.mask_grads(model)

        def after_step(_opt: torch.optim.Optimizer, _args: Any, _kwargs: Any) -> None:
            self.apply(model)
            self.mask_optimizer_state(model, optimizer)

        return MaskHandle(
            [optimizer.register_step_pre_hook(before_step), optimizer.register_step_post_hook(after_step)]
        )

    def _mask_on(self, name: str, like: torch.Tensor) -> torch.Tensor:
        mask = self.masks[name]
        if mask.device != like.device:
            mask = mask.to(like.device)
            self.masks[name] = mask  # move once, not at every step
        return mask

    # ----------------------------------------------------------------- statistics
    def num_params(self) -> int:
        return sum(m.numel() for m in self.masks.values())

    def num_zeros(self) -> int:
        return sum(int((~m).sum()) for m in self.masks.values())

    def sparsity(self) -> float:
        total = self.num_params()
        return self.num_zeros() / total if total else 0.0

    def per_layer_sparsity(self) -> dict[str, float]:
        return {name: float((~m).sum()) / m.numel() if m.numel() else 0.0 for name, m in self.masks.items()}

    def fully_pruned(self, names: Iterable[str] | None = None) -> list[str]:
        """Tensors (of `names`, default all) with every weight pruned: a layer that only passes its bias on.

        Global ranking can empty a whole layer ("layer collapse"), which cuts the network at that layer.
        """
        chosen = self.masks if names is None else names
        return [name for name in chosen if self.masks[name].numel() and not bool(self.masks[name].any())]

    # ----------------------------------------------------------------- persistence
    def state_dict(self) -> dict[str, Any]:
        return {"masks": {name: m.detach().cpu().clone() for name, m in self.masks.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        masks = state["masks"]
        missing = set(self.masks) - set(masks)
        if missing:
            raise KeyError(f"mask state lacks {sorted(missing)}")
        for name, mask in masks.items():
            if name in self.masks and self.masks[name].shape != mask.shape:
                raise ValueError(f"mask {name!r}: shape {tuple(mask.shape)} != {tuple(self.masks[name].shape)}")
            device = self.masks[name].device if name in self.masks else mask.device
            self.masks[name] = mask.to(device=device, dtype=torch.bool)

    def to(self, device: torch.device | str) -> MaskSet:
        self.masks = {name: m.to(device) for name, m in self.masks.items()}
        return self

    def __repr__(self) -> str:
        return f"MaskSet({len(self.masks)} tensors, sparsity={self.sparsity():.4f})"
