"""The per-sample gradient engines behind :class:`~wf_pipeline.fisher.gradients.GradientComputer`, one class each.

* :class:`LoopEngine` — one autograd pass per group: works for any model, slowest.
* :class:`VmapEngine` — ``torch.func`` (``vmap`` over ``grad``) of the whole model.
* :class:`LayerwiseEngine` — conv/linear weights from one batched backward pass (see
  :mod:`wf_pipeline.fisher.per_sample`), cut into passes spread over worker threads on CPU.

The generic engines return per-group gradients by parameter; :class:`RowWriter` lays any engine's rows out as
the flat ``(n, d)`` or block-major ``(K, n, B)`` output, masked.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from wf_pipeline.fisher.layout import BlockLayout

LossFn = Callable[[Tensor, Tensor], Tensor]


class RowWriter:
    """Writes per-group gradient rows of the selected parameters into the output: flat or block-major, masked."""

    def __init__(self, params: Mapping[str, nn.Parameter], dtype: torch.dtype, layout: BlockLayout | None,
                 masks: Mapping[str, Tensor] | None) -> None:
        first = next(iter(params.values()))
        self.device, self.dtype, self.layout = first.device, dtype, layout
        self.dim = sum(p.numel() for p in params.values())
        self.offsets = [0]
        for p in params.values():
            self.offsets.append(self.offsets[-1] + p.numel())
        if layout is not None and layout.sizes != [p.numel() for p in params.values()]:
            raise ValueError("layout sizes do not match the selected parameters")
        self.mask: Tensor | None = None
        if masks is not None:
            flat_mask = torch.cat([masks[n].to(self.device).reshape(-1) for n in params])
            if not bool(flat_mask.all()):  # an all-kept mask (the first pruning step) costs no pass
                # Block-major output (K, n, B) is masked by a (K, 1, B) view.
                mask = flat_mask.to(dtype)
                self.mask = mask if layout is None else layout.pad(mask).unsqueeze(1)

    def new_output(self, n: int) -> Tensor:
        if self.layout is None:
            return torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        return torch.empty(self.layout.num_blocks, n, self.layout.block_size, dtype=self.dtype, device=self.device)

    def rows_of(self, out: Tensor) -> int:
        return out.shape[0] if self.layout is None else out.shape[1]

    def write_grads(self, out: Tensor, grads: dict[str, Tensor], names: list[str]) -> None:
        """Every parameter's rows (``grads[names[i]]`` for layer i; consumed) into `out`."""
        n = self.rows_of(out)
        for layer, inner in enumerate(names):
            self.write_rows(out, layer, 0, n, grads.pop(inner).reshape(n, -1))

    def write_rows(self, out: Tensor, layer: int, g0: int, g1: int, rows: Tensor | None) -> None:
        """Rows ``g0:g1`` of one layer's gradients (None: zeros), masked, into the flat or block-major
        `out`: one pass that copies, transposes to block-major and masks at once."""
        a, b = self.offsets[layer], self.offsets[layer + 1]
        if self.layout is None:
            dest = out[g0:g1, a:b]
            if rows is None:
                dest.zero_()
            elif self.mask is None:
                dest.copy_(rows)
            else:
                torch.mul(rows, self.mask[a:b], out=dest)
            return
        k0, k1 = self.layout.block_offsets[layer], self.layout.block_offsets[layer + 1]
        dest = out[k0:k1, g0:g1]  # (blocks of this layer, groups, B)
        if rows is None:
            dest.zero_()
            return
        B = self.layout.block_size
        full, rest = divmod(b - a, B)
        mask = None if self.mask is None else self.mask[k0:k1]
        if full:
            block_rows = rows[:, : full * B].reshape(rows.shape[0], full, B).transpose(0, 1)
            if mask is None:
                dest[:full].copy_(block_rows)
            else:
                torch.mul(block_rows, mask[:full], out=dest[:full])
        if rest:
            tail = rows[:, full * B :]
            dest[full, :, :rest] = tail if mask is None else tail * mask[full, :, :rest]
            dest[full, :, rest:] = 0


class _GenericEngine:
    """Gradients of the loss through ``functional_call`` with the selected weights swapped in (by inner name)."""

    def __init__(self, module: nn.Module, params: Mapping[str, nn.Parameter], inner_names: list[str],
                 loss_fn: LossFn) -> None:
        self.module, self.params, self.inner_names, self.loss_fn = module, params, inner_names, loss_fn

    def _loss(self, selected: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.module, selected, (x,), strict=False), y)

    def _selected(self) -> dict[str, Tensor]:
        return {inner: p.detach() for inner, p in zip(self.inner_names, self.params.values(), strict=True)}


class LoopEngine(_GenericEngine):
    """One autograd pass per group."""

    name = "loop"

    def grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        leaves = {n: t.requires_grad_(True) for n, t in self._selected().items()}
        rows: list[tuple[Tensor, ...]] = []
        with torch.enable_grad():
            for xi, yi in zip(x, y, strict=True):
                rows.append(torch.autograd.grad(self._loss(leaves, xi, yi), list(leaves.values())))
        return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(leaves)}


class VmapEngine(_GenericEngine):
    """``vmap`` over ``grad`` of the whole model."""

    name = "vmap"

    def grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        per_group = vmap(grad(self._loss), in_dims=(None, 0, 0))
        with torch.no_grad():  # torch.func.grad ignores an outer no_grad; the module's own params stay untracked
            return per_group(self._selected(), x, y)
