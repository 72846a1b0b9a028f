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

import itertools
import math
import queue
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.inverse import BlockLayout
from wf_pipeline.fisher.parallel import torch_threads
from wf_pipeline.fisher.per_sample import (
    FrozenReplica,
    LayerRecorder,
    LayerwiseUnsupported,
    layer_grads,
    layerwise_blocker,
    weight_owners,
)

Batches = Callable[[], Iterable[tuple[Tensor, Tensor]]]
Progress = Callable[[str, int, int], None]
LossFn = Callable[[Tensor, Tensor], Tensor]
ENGINES = ("auto", "layerwise", "vmap", "loop")
# Samples per forward/backward pass of the layer-wise engine on CPU: a pass's activations stay in cache
# (bundled ResNet-20, one thread: 292 ms per 100 samples in passes of 25, 343 ms in one pass of 100).
CPU_PASS_SAMPLES = 25


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

    Engines: ``layerwise`` (conv/linear weights from one batched backward pass, see
    :mod:`wf_pipeline.fisher.per_sample`), ``vmap`` (``torch.func`` over any model), ``loop`` (one
    autograd pass per group). ``auto`` picks ``layerwise`` when the model allows it and its first
    chunk agrees with plain autograd on two groups, else ``vmap``, else ``loop``; afterwards
    :attr:`engine` names the engine in use and :attr:`engine_note` why ``layerwise`` was passed over.

    On CPU the layer-wise engine runs each chunk in passes of about :data:`CPU_PASS_SAMPLES` samples,
    spread over `workers` threads (default: PyTorch's intra-op thread count), each with its own frozen
    replica of the model (:class:`~wf_pipeline.fisher.per_sample.FrozenReplica`) and one intra-op thread.
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
        self.loss_fn = loss_fn
        self.engine = engine
        self.engine_note: str | None = None
        self._generic_fallback = False  # vmap may hand over to loop (auto only)
        first = next(iter(self.params.values()))
        self.device = first.device
        self.compute_dtype = first.dtype  # the model's; `dtype` is only the output's
        self.dtype = dtype or first.dtype
        self.dim = sum(p.numel() for p in self.params.values())
        self.offsets = [0]
        for p in self.params.values():
            self.offsets.append(self.offsets[-1] + p.numel())
        if layout is not None and layout.sizes != [p.numel() for p in self.params.values()]:
            raise ValueError("layout sizes do not match the selected parameters")
        self.layout = layout
        self.mask: Tensor | None = None
        if masks is not None:
            flat_mask = torch.cat([masks[n].to(self.device).reshape(-1) for n in self.params])
            if not bool(flat_mask.all()):  # an all-kept mask (the first pruning step) costs no pass
                # Block-major output (K, n, B) is masked by a (K, 1, B) view.
                mask = flat_mask.to(self.dtype)
                self.mask = mask if layout is None else layout.pad(mask).unsqueeze(1)
        self._owners = weight_owners(self.module, self.params)
        self.workers = workers  # layer-wise worker threads on CPU; None: PyTorch's thread count at each chunk
        self._replicas: list[FrozenReplica] = []
        self._uncopyable = False
        # True after compute() when every gradient it wrote is known to be finite (False: not known).
        self.known_finite = False
        self._output_holds_rows = torch.finfo(self.dtype).max >= torch.finfo(self.compute_dtype).max

    # ------------------------------------------------------------------ generic engines
    def _loss(self, selected: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.module, selected, (x,), strict=False), y)

    def _selected(self) -> dict[str, Tensor]:
        return {inner: p.detach() for inner, p in zip(self.inner_names, self.params.values(), strict=True)}

    def _vmap_grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        per_group = vmap(grad(self._loss), in_dims=(None, 0, 0))
        with torch.no_grad():  # torch.func.grad ignores an outer no_grad; the module's own params stay untracked
            return per_group(self._selected(), x, y)

    def _loop_grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        leaves = {n: t.requires_grad_(True) for n, t in self._selected().items()}
        rows: list[tuple[Tensor, ...]] = []
        with torch.enable_grad():
            for xi, yi in zip(x, y, strict=True):
                rows.append(torch.autograd.grad(self._loss(leaves, xi, yi), list(leaves.values())))
        return {n: torch.stack([r[i] for r in rows]) for i, n in enumerate(leaves)}

    def _generic_grads(self, x: Tensor, y: Tensor) -> dict[str, Tensor]:
        if self.engine == "loop":
            return self._loop_grads(x, y)
        if not self._generic_fallback:
            return self._vmap_grads(x, y)
        try:
            grads = self._vmap_grads(x, y)
        except (RuntimeError, NotImplementedError):
            # Some modules (data-dependent control flow, unsupported in-place ops) cannot be vmapped.
            self.engine = "loop"
            return self._loop_grads(x, y)
        self._generic_fallback = False
        return grads

    # ------------------------------------------------------------------ layer-wise engine
    def _summed_loss(self, logits: Tensor, y: Tensor, groups: int) -> Tensor:
        """Sum over groups of each group's own loss, so a sample's output gradient is its group's."""
        grouped_logits = logits.reshape(groups, -1, *logits.shape[1:])
        grouped_y = y.reshape(groups, -1, *y.shape[1:])
        if self.loss_fn is F.cross_entropy:  # mean over each group, summed: one fused call
            return F.cross_entropy(logits, y, reduction="sum") / grouped_y.shape[1]
        try:
            return vmap(self.loss_fn)(grouped_logits, grouped_y).sum()
        except (RuntimeError, NotImplementedError):
            return torch.stack([self.loss_fn(a, b) for a, b in zip(grouped_logits, grouped_y, strict=True)]).sum()

    def _layerwise_into(self, out: Tensor, x: Tensor, y: Tensor) -> None:
        if not x.is_floating_point():
            raise LayerwiseUnsupported("the model input is not floating point")
        passes = self._passes(x.shape[0], x.shape[1])
        workers = min(len(passes), self._workers())
        replicas = self._worker_replicas(workers) if workers > 1 else None
        if replicas is None:
            frozen = {name: p.detach() for name, p in self.module.named_parameters()}

            def model(inputs: Tensor) -> Tensor:
                return functional_call(self.module, frozen, (inputs,), strict=False)

            finite = [self._layerwise_slice(model, self._owners, out, x[g0:g1], y[g0:g1], g0) for g0, g1 in passes]
            self.known_finite = all(finite)
            return
        free: queue.SimpleQueue[FrozenReplica] = queue.SimpleQueue()
        for replica in replicas:
            free.put(replica)

        def run(bounds: tuple[int, int]) -> bool:
            (g0, g1), replica = bounds, free.get()  # never waits: at most `workers` passes run at once
            try:
                owners = [replica.counterparts(modules) for modules in self._owners]
                return self._layerwise_slice(replica.module, owners, out, x[g0:g1], y[g0:g1], g0)
            finally:
                free.put(replica)

        # Whole passes in parallel, one intra-op thread each: the two cores stay busy where a chunk's many
        # small ops (BatchNorm, ReLU, 7x7 convs) split across intra-op threads left one waiting.
        with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            self.known_finite = all(list(pool.map(run, passes)))

    def _workers(self) -> int:
        if self.device.type != "cpu":
            return 1
        return max(1, self.workers if self.workers is not None else torch.get_num_threads())

    def _passes(self, groups: int, group_size: int) -> list[tuple[int, int]]:
        """Ranges of groups, one forward/backward pass each: the whole chunk on GPU, passes of about
        :data:`CPU_PASS_SAMPLES` samples on CPU (as many as a multiple of the workers, so they share evenly)."""
        if self.device.type != "cpu":
            return [(0, groups)]
        count = math.ceil(groups * group_size / CPU_PASS_SAMPLES)
        workers = self._workers()
        if count > 1 and workers > 1:
            count = math.ceil(count / workers) * workers
        count = max(1, min(count, groups))
        return list(itertools.pairwise(round(i * groups / count) for i in range(count + 1)))

    def _worker_replicas(self, count: int) -> list[FrozenReplica] | None:
        """`count` frozen replicas of the model (None: the model cannot be copied; run on one thread)."""
        if self._uncopyable:
            return None
        replicas = [r for r in self._replicas if r.current()]
        if len(replicas) < len(self._replicas):  # a parameter was replaced: start afresh
            replicas = []
        try:
            while len(replicas) < count:
                replicas.append(FrozenReplica(self.module))
        except Exception:  # noqa: BLE001 - whatever deepcopy refuses runs on one thread, which needs no copy
            self._uncopyable = True
            return None
        self._replicas = replicas
        for replica in replicas[:count]:
            replica.sync_modes()
        return replicas[:count]

    def _layerwise_slice(self, module: Callable[[Tensor], Tensor], owners: list[list[nn.Module]], out: Tensor,
                         x: Tensor, y: Tensor, g0: int) -> bool:
        """Layer-wise gradients of groups ``x``, ``y`` into rows ``g0:`` of `out`; True when they are all
        finite (a finite sum of each layer's rows, taken while they are in cache; False: not known).
        `module` runs the model with every parameter detached, so the backward from the loss reaches
        each recorded layer's output through the input only (which is tracked)."""
        groups = x.shape[0]
        inputs = x.reshape(-1, *x.shape[2:]).detach().requires_grad_(True)
        recorded = [m for modules in owners for m in modules]
        with LayerRecorder(recorded) as recorder, torch.enable_grad():
            logits = module(inputs)
            loss = self._summed_loss(logits, y.reshape(-1, *y.shape[2:]), groups)
            del logits
            recorder.backward(loss)
        del loss
        sums: list[Tensor] = []
        for layer, modules in enumerate(owners):
            rows = layer_grads(recorder.take_calls(modules), groups)
            if rows is not None:
                sums.append(rows.sum())
            self._write_rows(out, layer, g0, g0 + groups, rows)
        # Rows finite => the masked copy in `out` is finite too, if its dtype holds every value of theirs.
        return (not sums or bool(torch.isfinite(torch.stack(sums).sum()))) and self._output_holds_rows

    def _write_rows(self, out: Tensor, layer: int, g0: int, g1: int, rows: Tensor | None) -> None:
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
        self._write_grads(reference, self._loop_grads(x[picks], y[picks]))
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

    def _auto_first_chunk(self, out: Tensor, x: Tensor, y: Tensor) -> None:
        reason = layerwise_blocker(self.module, self.params)
        if reason is None:
            try:
                self._layerwise_into(out, x, y)
                reason = self._cross_check(out, x, y)
            except LayerwiseUnsupported as exc:
                reason = str(exc)
        if reason is None:
            self.engine = "layerwise"
            return
        self.engine_note = reason
        self.engine, self._generic_fallback = "vmap", True
        self.known_finite = False
        self._write_grads(out, self._generic_grads(x, y))

    # ------------------------------------------------------------------ output
    def new_output(self, n: int) -> Tensor:
        if self.layout is None:
            return torch.empty(n, self.dim, dtype=self.dtype, device=self.device)
        return torch.empty(self.layout.num_blocks, n, self.layout.block_size, dtype=self.dtype, device=self.device)

    def _write_grads(self, out: Tensor, grads: dict[str, Tensor]) -> None:
        n = out.shape[0] if self.layout is None else out.shape[1]
        for layer, inner in enumerate(self.inner_names):
            self._write_rows(out, layer, 0, n, grads.pop(inner).reshape(n, -1))

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
            self._layerwise_into(out, x, y)
        else:
            self._write_grads(out, self._generic_grads(x, y))
        return out


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
