"""Multi-process runs with torch.distributed: torchrun's environment in, a small context out.

Without torchrun (no ``WORLD_SIZE`` > 1 in the environment) everything degrades to a single process
and every collective below is a no-op, so library code can call them unconditionally.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as torch_dist

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: single process, no process group

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def share(self, total: int) -> int:
        """This rank's part of `total` work items (the first ``total % world_size`` ranks take one more)."""
        base, extra = divmod(total, self.world_size)
        return base + (1 if self.rank < extra else 0)


SINGLE_PROCESS = DistContext()


def _active() -> bool:
    return torch_dist.is_available() and torch_dist.is_initialized() and torch_dist.get_world_size() > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    return int(value) if value not in (None, "") else default


def init_distributed(device_choice: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join torchrun's process group (gloo on CPU, nccl on GPU), or return a single-process context.

    `device_choice` is the recipe's ``device`` (auto | cpu | cuda). Calling it again in a process that
    already joined returns the same context.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    if world_size <= 1 or not torch_dist.is_available():
        return SINGLE_PROCESS
    rank = _env_int("RANK", 0)
    local_rank = _env_int("LOCAL_RANK", 0)
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda and torch_dist.is_nccl_available() else "gloo"
    if not torch_dist.is_initialized():
        if backend == "nccl":
            torch.cuda.set_device(local_rank % max(1, torch.cuda.device_count()))
        torch_dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    else:
        backend = str(torch_dist.get_backend())
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, backend=backend)


def _needs_staging(tensor: torch.Tensor) -> bool:
    # NCCL only moves GPU tensors; small CPU statistics (counts, losses) travel through the GPU.
    return tensor.device.type == "cpu" and torch_dist.get_backend() == "nccl"


def all_reduce_sum_(tensor: torch.Tensor) -> None:
    """Sum `tensor` across processes, in place (no-op in a single process)."""
    if not _active():
        return
    if _needs_staging(tensor):
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch_dist.all_reduce(staged, op=torch_dist.ReduceOp.SUM)
        tensor.copy_(staged)
    else:
        torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)


def barrier() -> None:
    if _active():
        torch_dist.barrier()


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank `src`'s (picklable) `obj` on every rank."""
    if not _active():
        return obj
    holder: list[Any] = [obj]
    torch_dist.broadcast_object_list(holder, src=src)
    return holder[0]


def broadcast_tensor_(tensor: torch.Tensor, src: int = 0) -> None:
    """Overwrite `tensor` on every rank with rank `src`'s values."""
    if not _active():
        return
    if _needs_staging(tensor):
        staged = tensor.to(torch.device("cuda", torch.cuda.current_device()))
        torch_dist.broadcast(staged, src=src)
        tensor.copy_(staged)
    else:
        torch_dist.broadcast(tensor, src=src)


def shutdown() -> None:
    """Leave the process group (safe to call when none was joined)."""
    if torch_dist.is_available() and torch_dist.is_initialized():
        torch_dist.destroy_process_group()
