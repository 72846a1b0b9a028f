"""Per-sample (or per-mini-batch) gradients of the selected weights, streamed in chunks.

Each gradient is the loss gradient over a group of ``grad_batch_size`` samples (the mean loss of
the group; 1 = per-sample, the empirical Fisher of the paper). Gradients come out as ``(n, d)``
chunks flattened over the selected parameters in order, masked by the current masks, so no
``N×d`` buffer is ever held. Conv/linear weights of models whose samples do not interact take the
layer-wise route (one batched forward/backward, per-sample products from layer inputs and output
gradients: :mod:`wf_pipeline.fisher.per_sample`); other models use ``torch.func`` (``vmap`` over
``grad``), and models it cannot trace a loop of ordinary autograd. No chunk holding NaN or Inf is
ever handed on (see :func:`iter_gradient_chunks`).
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.engines import LoopEngine, RowWriter, VmapEngine
from wf_pipeline.fisher.layerwise import LayerwiseEngine
from wf_pipeline.fisher.layout import BlockLayout
from wf_pipeline.fisher.per_sample import LayerwiseUnsupported, layerwise_blocker

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
ENGINES = ("auto", "layerwise", "vmap", "loop")


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
    # A sample whose logits are not finite gets an arbitrary label: its gradient is non-finite
    # anyway and the finiteness guard names it, instead of multinomial failing on its row.
    probs = torch.where(torch.isfinite(probs).all(-1, keepdim=True), probs, torch.ones_like(probs))
    device = generator.device if generator is not None else probs.device
    labels = torch.multinomial(probs.to(device), 1, generator=generator).squeeze(1)
    return labels.to(logits.device)


class GradientComputer:
    """Computes chunks of flattened, masked per-group gradients of a fixed parameter selection.

    Selects one engine of :mod:`wf_pipeline.fisher.engines` / :mod:`wf_pipeline.fisher.layerwise`: ``layerwise``
    (conv/linear weights from one batched backward pass), ``vmap`` (``torch.func`` over any model), ``loop``
    (one autograd pass per group). ``auto`` picks ``layerwise`` when the model allows it and its first
    chunk agrees with plain autograd on two groups, else ``vmap``, else ``loop``; afterwards
    :attr:`engine` names the engine in use and :attr:`engine_note` why ``layerwise`` was passed over.
    `workers` are the layer-wise engine's threads on CPU (default: PyTorch's intra-op thread count).
    """

    def __init__(
        self,
        model: nn.Module,
        params: Mapping[str, nn.Parameter],
        loss_fn: LossFn = F.cross_entropy,
        masks: Mapping[str, Tensor] | None = None,
        dtype: torch.dtype | None = None,
        engine: str = "auto",
        layout: BlockLayout | None = None,
        workers: int | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"unknown engine {engine!r}; expected one of {ENGINES}")
        self.module = unwrap_model(model)
        self.params = dict(params)
        self.inner_names = _names_in(self.module, self.params)
        self.engine = engine
        self.engine_note: str | None = None
        self._generic_fallback = False  # vmap may hand over to loop (auto only)
        first = next(iter(self.params.values()))
        self.device = first.device
        self.compute_dtype = first.dtype  # the model's; `dtype` is only the output's
        self.writer = RowWriter(self.params, dtype or first.dtype, layout, masks)
        self.dtype, self.layout, self.offsets = self.writer.dtype, layout, self.writer.offsets
        self.loop = LoopEngine(self.module, self.params, self.inner_names, loss_fn)
        self.vmap = VmapEngine(self.module, self.params, self.inner_names, loss_fn)
        self.layerwise = LayerwiseEngine(self.module, self.params, loss_fn, self.writer, workers)
        # True after compute() when every gradient it wrote is known to be finite (False: not known).
        self.known_finite = False

    def new_output(self, n: int) -> Tensor:
        return self.writer.new_output(n)

    def compute(self, x: Tensor, y: Tensor, out: Tensor | None = None) -> Tensor:
        """Gradients for groups ``x: (n, m, ...)``, ``y: (n, m)`` → flat masked ``(n, d)``
        (block-major ``(K, n, B)`` with a layout), written into `out` when given (its shape must match)."""
        if out is None:
            out = self.new_output(x.shape[0])
        self.known_finite = False
        if self.engine == "auto":
            self._auto_first_chunk(out, x, y)
        elif self.engine == "layerwise":
            blocker = layerwise_blocker(self.module, self.params)
            if blocker is not None:
                raise LayerwiseUnsupported(f"engine 'layerwise' cannot run here: {blocker}")
            self.known_finite = self.layerwise.into(out, x, y)
        else:
            self.writer.write_grads(out, self._generic_grads(x, y), self.inner_names)
        return out

    def _generic_grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.engine == "loop":
            return self.loop.grads(x, y)
        if not self._generic_fallback:
            return self.vmap.grads(x, y)
        try:
            grads = self.vmap.grads(x, y)
        except (RuntimeError, NotImplementedError):
            # Some modules (data-dependent control flow, unsupported in-place ops) cannot be vmapped.
            self.engine = "loop"
            return self.loop.grads(x, y)
        self._generic_fallback = False
        return grads

    def _auto_first_chunk(self, out: Tensor, x: Tensor, y: Tensor) -> None:
        reason = layerwise_blocker(self.module, self.params)
        if reason is None:
            try:
                self.known_finite = self.layerwise.into(out, x, y)
                reason = self._cross_check(out, x, y)
            except LayerwiseUnsupported as exc:
                reason = str(exc)
        if reason is None:
            self.engine = "layerwise"
            return
        self.engine_note = reason
        self.engine, self._generic_fallback = "vmap", True
        self.known_finite = False
        self.writer.write_grads(out, self._generic_grads(x, y), self.inner_names)

    def _cross_check(self, out: Tensor, x: Tensor, y: Tensor) -> str | None:
        """Compare two groups of a layer-wise chunk with plain autograd (None: they agree).

        Catches what no structural test can: glue code that mixes samples, a weight also used
        outside its module. The groups with the largest gradients are compared: a well-classified
        sample's tiny gradient is mostly rounding (``softmax − onehot`` cancels), and batch-size-
        dependent kernels alone would make it differ.
        """
        norms = torch.linalg.vector_norm(out, dim=1 if self.layout is None else (0, 2))
        if not bool(torch.isfinite(norms).all()):
            return None  # the finiteness guard reports it
        picks = sorted(norms.topk(min(2, len(norms))).indices.tolist())
        reference = self.new_output(len(picks))
        self.writer.write_grads(reference, self.loop.grads(x[picks], y[picks]), self.inner_names)
        mine = out[picks] if self.layout is None else out[:, picks]
        if not bool(torch.isfinite(reference).all()):
            return None
        tolerance = torch.finfo(self.compute_dtype).eps ** 0.5
        tf32 = torch.backends.cudnn.allow_tf32 or torch.backends.cuda.matmul.allow_tf32
        if self.device.type == "cuda" and self.compute_dtype == torch.float32 and tf32:
            tolerance = 1e-2  # TF32 convolutions and matmuls round to ~1e-3 on their own
        error = float((mine - reference).norm() / reference.norm().clamp_min(torch.finfo(reference.dtype).tiny))
        if error > tolerance:
            return (f"layer-wise gradients differ from plain autograd (relative error {error:.1e} on the first"
                    " chunk's largest gradients): samples interact")
        return None


@dataclass
class GradientStats:
    """Filled in while :func:`iter_gradient_chunks` runs: the engine used and what was left out."""

    engine: str = ""
    engine_note: str | None = None
    skipped: int = 0  # gradients left out as non-finite (nonfinite="skip")


def no_rows(n: int, device: torch.device) -> Tensor:
    return torch.zeros(n, dtype=torch.bool, device=device)


def nonfinite_rows(chunk: Tensor, blocked: bool) -> Tensor:
    """Bool per gradient row: True where the row holds NaN or Inf.

    One reduction (a sum) decides in the usual all-finite case; only a non-finite sum (or an
    overflowing one) pays for the element-wise test.
    """
    rows = chunk.shape[1] if blocked else chunk.shape[0]
    if bool(torch.isfinite(chunk.sum())):
        return no_rows(rows, chunk.device)
    bad = ~torch.isfinite(chunk)
    return bad.any(2).any(0) if blocked else bad.any(1)


def nonfinite_error(
    computer: GradientComputer, chunk: Tensor, bad_rows: Tensor, chunk_index: int, first: int, grad_batch_size: int
) -> WFError:
    """The error naming the chunk, gradient/sample ranges and layers of a non-finite chunk."""
    blocked = computer.layout is not None
    bad = ~torch.isfinite(chunk)
    kind = "NaN" if bool(torch.isnan(chunk).any()) else "Inf"
    if blocked:
        assert computer.layout is not None
        bad_blocks = bad.any(2).any(1).nonzero().flatten()
        bounds = torch.tensor(computer.layout.block_offsets[1:], device=bad_blocks.device)
        layers = torch.searchsorted(bounds, bad_blocks, right=True).unique().tolist()
    else:
        bad_cols = bad.any(0).nonzero().flatten()
        bounds = torch.tensor(computer.offsets[1:], device=bad_cols.device)
        layers = torch.searchsorted(bounds, bad_cols, right=True).unique().tolist()
    names = list(computer.params)
    shown = ", ".join(repr(names[i]) for i in layers[:3]) + (f" and {len(layers) - 3} more" if len(layers) > 3 else "")
    rows = (bad_rows.nonzero().flatten() + first).tolist()
    m = grad_batch_size
    samples = f"Fisher samples {rows[0] * m}-{rows[0] * m + m - 1}" if m > 1 else f"Fisher sample {rows[0]}"
    return WFError(
        f"non-finite gradient ({kind}) in Fisher chunk {chunk_index} (gradients {first}-{first + len(bad_rows) - 1}):"
        f" {len(rows)} gradient(s) affected, the first is gradient {rows[0]} ({samples}, counted in draw order"
        f" from the start of this step), in layer(s) {shown}",
        hint="a Fisher input holds NaN/Inf or the model overflows on it (exploding activations, a half-precision"
        " model): clean the data or fix the model, or set pruning.woodfisher.nonfinite: skip to leave such samples out",
    )


def fold_timed(chunks: Iterator[Tensor], fold: Callable[[Tensor], None],
               add_time: Callable[[str, float], None], fold_labels: tuple[str, ...]) -> None:
    """Fold each gradient chunk into an accumulator as it is computed, booking the time of each side:
    computing a chunk under "gradients", folding it under every label of `fold_labels`."""
    while True:
        t0 = time.perf_counter()
        chunk = next(chunks, None)
        t1 = time.perf_counter()
        add_time("gradients", t1 - t0)
        if chunk is None:
            return
        fold(chunk)
        elapsed = time.perf_counter() - t1
        for label in fold_labels:
            add_time(label, elapsed)


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
    nonfinite: str = "error",
    stats: GradientStats | None = None,
    reuse_output: bool = False,
) -> Iterator[Tensor]:
    """Yield ``(n ≤ chunk_size, d)`` gradient chunks, ``num_grads`` rows in all.

    With a `layout`, chunks come block-major, ``(K, n, B)`` with zeros at padded coordinates, ready
    for :meth:`BlockGramAccumulator.add_blocked` without another copy.

    Row i is the gradient of the mean loss over ``grad_batch_size`` consecutive pool samples. With
    ``fisher_type="true"`` labels are drawn from the model's softmax instead of the pool's labels.
    The model's mode is not changed here (the caller puts it in eval mode).

    A gradient holding NaN or Inf never leaves here: with ``nonfinite="error"`` it raises a
    :class:`WFError` naming the chunk, the samples and the layers; with ``"skip"`` the row is dropped
    and replaced by further samples (counted in ``stats.skipped``), unless non-finite gradients
    outnumber the requested ones, which is an error too.

    With ``reuse_output`` every chunk is written into one buffer, so a chunk is valid only until the
    next is asked for: for callers that fold each chunk in at once. It saves a fresh allocation per
    chunk, which for a large model is a fresh mapping whose page faults (~100 MB per chunk on the
    default ResNet-20) cost about as much as copying the gradients into it.
    """
    if fisher_type not in ("empirical", "true"):
        raise ValueError(f"unknown fisher_type {fisher_type!r}")
    if nonfinite not in ("error", "skip"):
        raise ValueError(f"unknown nonfinite policy {nonfinite!r}; expected 'error' or 'skip'")
    if num_grads < 1 or grad_batch_size < 1 or chunk_size < 1:
        raise ValueError("num_grads, grad_batch_size and chunk_size must be >= 1")
    computer = GradientComputer(model, params, loss_fn=loss_fn, masks=masks, dtype=dtype, engine=engine, layout=layout)
    stats = stats if stats is not None else GradientStats()
    stream = SampleStream(batches, computer.device)
    blocked = layout is not None
    buffer: Tensor | None = None
    done = drawn = chunk_index = 0
    while done < num_grads:
        n = min(chunk_size, num_grads - done)
        x, y = stream.take(n * grad_batch_size)
        if fisher_type == "true":
            with torch.no_grad():
                y = sample_model_labels(computer.module(x), generator)
        groups_x = x.reshape(n, grad_batch_size, *x.shape[1:])
        if reuse_output and (buffer is None or buffer.shape[1 if blocked else 0] != n):
            buffer = computer.new_output(n)
        groups_y = y.reshape(n, grad_batch_size, *y.shape[1:])
        chunk = computer.compute(groups_x, groups_y, buffer if reuse_output else None)
        stats.engine, stats.engine_note = computer.engine, computer.engine_note
        bad = no_rows(n, chunk.device) if computer.known_finite else nonfinite_rows(chunk, blocked)
        if bool(bad.any()):
            if nonfinite == "error":
                raise nonfinite_error(computer, chunk, bad, chunk_index, drawn, grad_batch_size)
            stats.skipped += int(bad.sum())
            if stats.skipped > num_grads:
                raise WFError(
                    f"{stats.skipped} Fisher gradients were non-finite before {num_grads} finite ones were found",
                    hint="the Fisher data or the model is broken (NaN/Inf inputs, overflowing activations)",
                )
            keep = (~bad).nonzero().flatten()
            chunk = chunk[:, keep] if blocked else chunk[keep]
        drawn += n
        chunk_index += 1
        kept = len(bad) - int(bad.sum())
        if kept:
            yield chunk
        done += kept
        if progress is not None and kept:
            progress("gradients", done, num_grads)
