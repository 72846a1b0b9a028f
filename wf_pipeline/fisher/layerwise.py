"""The layer-wise gradient engine: conv/linear weights from one batched backward pass, in passes over threads.

The per-sample products from layer inputs and output gradients live in :mod:`wf_pipeline.fisher.per_sample`.
On CPU each chunk runs in passes of about :data:`CPU_PASS_SAMPLES` samples, spread over worker threads
(default: PyTorch's intra-op thread count), each with its own frozen replica of the model
(:class:`~wf_pipeline.fisher.per_sample.FrozenReplica`, kept by :class:`ReplicaPool`) and one intra-op thread.
"""
from __future__ import annotations

import itertools
import math
import queue
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call, vmap

from wf_pipeline.fisher.engines import RowWriter
from wf_pipeline.fisher.parallel import torch_threads
from wf_pipeline.fisher.per_sample import (
    FrozenReplica,
    LayerRecorder,
    LayerwiseUnsupported,
    layer_grads,
    weight_owners,
)

LossFn = Callable[[Tensor, Tensor], Tensor]
# Samples per forward/backward pass of the layer-wise engine on CPU: a pass's activations stay in cache
# (bundled ResNet-20, one thread: 292 ms per 100 samples in passes of 25, 343 ms in one pass of 100).
CPU_PASS_SAMPLES = 25


class ReplicaPool:
    """Frozen replicas of the model for worker threads, rebuilt when a parameter is replaced."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.replicas: list[FrozenReplica] = []
        self.uncopyable = False

    def take(self, count: int) -> list[FrozenReplica] | None:
        """`count` frozen replicas of the model (None: the model cannot be copied; run on one thread)."""
        if self.uncopyable:
            return None
        replicas = [r for r in self.replicas if r.current()]
        if len(replicas) < len(self.replicas):  # a parameter was replaced: start afresh
            replicas = []
        try:
            while len(replicas) < count:
                replicas.append(FrozenReplica(self.module))
        except Exception:  # noqa: BLE001 - whatever deepcopy refuses runs on one thread, which needs no copy
            self.uncopyable = True
            return None
        self.replicas = replicas
        for replica in replicas[:count]:
            replica.sync_modes()
        return replicas[:count]


class LayerwiseEngine:
    """Per-group gradients of the selected conv/linear weights from batched passes, written by `writer`."""

    name = "layerwise"

    def __init__(self, module: nn.Module, params: Mapping[str, nn.Parameter], loss_fn: LossFn, writer: RowWriter,
                 workers: int | None = None) -> None:
        self.module, self.loss_fn, self.writer = module, loss_fn, writer
        self.owners = weight_owners(module, params)
        self.workers = workers  # worker threads on CPU; None: PyTorch's thread count at each chunk
        self.pool = ReplicaPool(module)
        dtype = next(iter(params.values())).dtype
        self._output_holds_rows = torch.finfo(writer.dtype).max >= torch.finfo(dtype).max

    def into(self, out: Tensor, x: Tensor, y: Tensor) -> bool:
        """Gradients of groups ``x: (n, m, ...)`` into `out`; True when they are known to be finite."""
        if not x.is_floating_point():
            raise LayerwiseUnsupported("the model input is not floating point")
        passes = self.passes(x.shape[0], x.shape[1])
        workers = min(len(passes), self.worker_count())
        replicas = self.pool.take(workers) if workers > 1 else None
        if replicas is None:
            frozen = {name: p.detach() for name, p in self.module.named_parameters()}

            def model(inputs: Tensor) -> Tensor:
                return functional_call(self.module, frozen, (inputs,), strict=False)

            return all([self._slice(model, self.owners, out, x[g0:g1], y[g0:g1], g0) for g0, g1 in passes])
        free: queue.SimpleQueue[FrozenReplica] = queue.SimpleQueue()
        for replica in replicas:
            free.put(replica)

        def run(bounds: tuple[int, int]) -> bool:
            (g0, g1), replica = bounds, free.get()  # never waits: at most `workers` passes run at once
            try:
                owners = [replica.counterparts(modules) for modules in self.owners]
                return self._slice(replica.module, owners, out, x[g0:g1], y[g0:g1], g0)
            finally:
                free.put(replica)

        # Whole passes in parallel, one intra-op thread each: the two cores stay busy where a chunk's many
        # small ops (BatchNorm, ReLU, 7x7 convs) split across intra-op threads left one waiting.
        with torch_threads(1), ThreadPoolExecutor(max_workers=workers) as pool:
            return all(list(pool.map(run, passes)))

    def worker_count(self) -> int:
        if self.writer.device.type != "cpu":
            return 1
        return max(1, self.workers if self.workers is not None else torch.get_num_threads())

    def passes(self, groups: int, group_size: int) -> list[tuple[int, int]]:
        """Ranges of groups, one forward/backward pass each: the whole chunk on GPU, passes of about
        :data:`CPU_PASS_SAMPLES` samples on CPU (as many as a multiple of the workers, so they share evenly)."""
        if self.writer.device.type != "cpu":
            return [(0, groups)]
        count = math.ceil(groups * group_size / CPU_PASS_SAMPLES)
        workers = self.worker_count()
        if count > 1 and workers > 1:
            count = math.ceil(count / workers) * workers
        count = max(1, min(count, groups))
        return list(itertools.pairwise(round(i * groups / count) for i in range(count + 1)))

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

    def _slice(self, module: Callable[[Tensor], Tensor], owners: list[list[nn.Module]], out: Tensor,
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
            self.writer.write_rows(out, layer, g0, g0 + groups, rows)
        # Rows finite => the masked copy in `out` is finite too, if its dtype holds every value of theirs.
        return (not sums or bool(torch.isfinite(torch.stack(sums).sum()))) and self._output_holds_rows
