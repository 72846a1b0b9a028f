"""Per-sample (or per-mini-batch) gradients of the selected weights, streamed in chunks.

Each gradient is the loss gradient over a group of ``grad_batch_size`` samples (the mean loss of
the group; 1 = per-sample, the empirical Fisher of the paper). Gradients come out as ``(n, d)``
chunks flattened over the selected parameters in order, masked by the current masks, so no
``N×d`` buffer is ever held. ``torch.func`` (``vmap`` over ``grad``) computes a whole chunk at once;
models it cannot trace fall back to a loop of ordinary autograd.
"""
from __future__ import annotations

from typing import Callable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.inverse import BlockLayout

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
ENGINES = ("auto", "vmap", "loop")


class SampleStream:
    """Regroups the pool's mini-batches into groups of exactly `n` samples, cycling when it runs out."""

    def __init__(self, batches: Batches, device: torch.device) -> None:
        self._batches = batches
        self._device = device
        self._iterator: Iterator[tuple[Tensor, Tensor]] | None = None
        self._pending: list[tuple[Tensor, Tensor]] = []
        self._pending_count = 0

    def _next_batch(self) -> tuple[Tensor, Tensor]:
        for restarted in (False, True):
            if self._iterator is None or restarted:
                self._iterator = iter(self._batches())
            for x, y in self._iterator:
                if len(x) != len(y):
                    raise ValueError(f"Fisher batch has {len(x)} inputs but {len(y)} labels")
                if len(x):
                    return x, y
        raise WFError(
            "the Fisher sample pool is empty",
            hint="raise data.fisher_pool (or data.fisher_samples_per_class) so gradients can be computed",
        )

    def take(self, n: int) -> tuple[Tensor, Tensor]:
        while self._pending_count < n:
            x, y = self._next_batch()
            self._pending.append((x, y))
            self._pending_count += len(x)
        xs = torch.cat([x.to(self._device) for x, _ in self._pending])
        ys = torch.cat([y.to(self._device) for _, y in self._pending])
        self._pending = [(xs[n:], ys[n:])] if len(xs) > n else []
        self._pending_count = len(xs) - n
        return xs[:n], ys[:n]


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module that actually computes (DistributedDataParallel / torch.compile wrappers removed)."""
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


def _names_in(module: nn.Module, params: Mapping[str, nn.Parameter]) -> list[str]:
    """Names of `params` inside `module`, matched by identity (robust to wrapper prefixes)."""
    by_id = {id(p): n for n, p in module.named_parameters()}
    missing = [n for n, p in params.items() if id(p) not in by_id]
    if missing:
        raise ValueError(f"parameters {missing} do not belong to the model")
    return [by_id[id(p)] for p in params.values()]


def sample_model_labels(logits: Tensor, generator: torch.Generator | None) -> Tensor:
    """Labels drawn from ``softmax(logits)`` (the 'true' Fisher), using `generator` if given."""
    probs = torch.softmax(logits.detach().float(), dim=-1)
    device = generator.device if generator is not None else probs.device
    labels = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1)
    return labels.to(logits.device)


class GradientComputer:
    """Computes chunks of flattened, masked per-group gradients of a fixed parameter selection."""

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        loss_fn: LossFn = F.cross_entropy,
        masks: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        engine: str = "auto",
        layout: BlockLayout | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
        self.module = unwrap_model(model)
        self.params = dict(params)
        self.inner_names = _names_in(self.module, self.params)
        self.loss_fn = loss_fn
        self.engine = engine
        first = next(iter(self.params.values()))
        self.device = first.device
        self.dtype = dtype or first.dtype
        self.dim = sum(p.numel() for p in self.params.values())
        if layout is not None and layout.sizes != [p.numel() for p in self.params.values()]:
            raise ValueError("layout sizes do not match the selected parameters")
        self.layout = layout
        self.mask: Tensor | None = None
        if masks is not None:
            flat_mask = torch.cat([masks[n].to(self.device).reshape(-1) for n in self.params])
            # Block-major output (K, n, B) is masked by a (K, 1, B) view; padded coordinates are zero anyway.
            self.mask = flat_mask if layout is None else layout.pad(flat_mask).unsqueeze(1)

    def _loss(self, selected: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.module, selected, (x,), strict=False), y)

    def _vmap_grads(self, selected: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        per_group = vmap(grad(self._loss), in_dims=(None, 0, 0))
        with torch.no_grad():  # torch.func.grad ignores an outer no_grad; the module's own params stay untracked
            return per_group(selected, x, y)

    def _loop_grads(self, selected: dict[str, Tensor], x: Tensor, y: Tensor) -> dict[str, Tensor]:
        leaves = {n: t.detach().requires_grad_(True) for n, t in selected.items()}
        rows: list[tuple[Tensor, ...]] = []
        with torch.enable_grad():
            for xi, yi in zip(x, y):
                rows.append(torch.autograd.grad(self._loss(leaves, xi, yi), list(leaves.values())))
        return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(leaves)}

    def compute(self, x: Tensor, y: Tensor) -> Tensor:
        """Gradients for groups ``x: (n, m, ...)``, ``y: (n, m)`` → flat masked ``(n, d)``."""
        selected = {inner: p.detach() for inner, p in zip(self.inner_names, self.params.values())}
        if self.engine == "loop":
            grads = self._loop_grads(selected, x, y)
        elif self.engine == "vmap":
            grads = self._vmap_grads(selected, x, y)
        else:
            try:
                grads = self._vmap_grads(selected, x, y)
            except (RuntimeError, NotImplementedError):
                # Some modules (data-dependent control flow, unsupported in-place ops) cannot be vmapped.
                self.engine = "loop"
                grads = self._loop_grads(selected, x, y)
            else:
                self.engine = "vmap"
        n = x.shape[0]
        if self.layout is None:
            out = torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        else:
            out = torch.empty(self.layout.num_blocks, n, self.layout.block_size, dtype=self.dtype, device=self.device)
        offset = 0
        for layer, (inner, p) in enumerate(zip(self.inner_names, self.params.values())):
            size = p.numel()
            rows = grads.pop(inner).reshape(n, size)
            if self.layout is None:
                out[:, offset : offset + size] = rows
            else:
                self.layout.write_layer(out, layer, rows)
            offset += size
        if self.mask is not None:
            out.mul_(self.mask)
        return out


def iter_gradient_chunks(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    batches: Batches,
    *,
    num_grads: int,
    grad_batch_size: int = 1,
    chunk_size: int = 100,
    loss_fn: LossFn = F.cross_entropy,
    masks: Mapping[str, Tensor] | None = None,
    fisher_type: str = "empirical",
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    progress: Progress | None = None,
    engine: str = "auto",
    layout: BlockLayout | None = None,
) -> Iterator[Tensor]:
    """Yield ``(n ≤ chunk_size, d)`` gradient chunks, ``num_grads`` rows in all.

    With a `layout`, chunks come block-major, ``(K, n, B)`` with zeros at padded coordinates, ready
    for :meth:`BlockGramAccumulator.add_blocked` without another copy.

    Row i is the gradient of the mean loss over ``grad_batch_size`` consecutive pool samples. With
    ``fisher_type="true"`` labels are drawn from the model's softmax instead of the pool's labels.
    The model's mode is not changed here (the caller puts it in eval mode).
    """
    if fisher_type not in ("empirical", "true"):
        raise ValueError(f"unknown fisher_type {fisher_type!r}")
    if num_grads < 1 or grad_batch_size < 1 or chunk_size < 1:
        raise ValueError("num_grads, grad_batch_size and chunk_size must be >= 1")
    computer = GradientComputer(model, params, loss_fn=loss_fn, masks=masks, dtype=dtype, engine=engine, layout=layout)
    stream = SampleStream(batches, computer.device)
    done = 0
    while done < num_grads:
        n = min(chunk_size, num_grads - done)
        x, y = stream.take(n * grad_batch_size)
        if fisher_type == "true":
            with torch.no_grad():
                y = sample_model_labels(computer.module(x), generator)
        yield computer.compute(x.reshape(n, grad_batch_size, *x.shape[1:]), y.reshape(n, grad_batch_size, *y.shape[1:]))
        done += n
        if progress is not None:
            progress("gradients", done, num_grads)
