"""Multi-process pruning: 2 CPU processes under torchrun prune the same weights as 1 process."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from wf_pipeline.runtime.distributed import DistContext, all_reduce_sum_, barrier, broadcast_object, init_distributed

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
ENTRY = REPO / "tests" / "gradual_entry.py"
# One WoodFisher step straight to 70% (fp64 statistics, so summation order cannot flip a ranking),
# then one epoch of DDP fine-tuning with the masks held.
ONE_STEP = [
    "pruning.schedule.start_epoch=0", "pruning.schedule.end_epoch=0", "pruning.final_sparsity=0.7",
    "pruning.woodfisher.num_grads=64", "pruning.woodfisher.dtype=float64",
    "finetune.epochs=1", "finetune.steps_per_epoch=2", "data.batch_size=32",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def test_single_process_context_without_torchrun(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    ctx = init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.is_main, ctx.backend) == (0, 1, True, None)
    t = torch.ones(3)
    all_reduce_sum_(t)  # no-ops in a single process
    barrier()
    assert torch.equal(t, torch.ones(3)) and broadcast_object({"a": 1}) == {"a": 1}


def test_work_shares_cover_the_total() -> None:
    for total in (0, 1, 7, 64, 1001):
        shares = [DistContext(rank=r, world_size=3).share(total) for r in range(3)]
        assert sum(shares) == total and max(shares) - min(shares) <= 1


def test_two_processes_prune_the_same_weights_as_one(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    overrides = [arg for item in ONE_STEP for arg in ("--set", item)]
    single = subprocess.run(
        [sys.executable, str(ENTRY), str(TINY), "--root", str(tmp_path / "one"), "--out", str(tmp_path / "one.pt"),
         *overrides], env=env, capture_output=True, timeout=120)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    double = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", str(free_port()), str(ENTRY), str(TINY), "--root", str(tmp_path / "two"),
         "--out", str(tmp_path / "two.pt"), *overrides], env=env, capture_output=True, timeout=180)
    assert double.returncode == 0, double.stderr.decode()[-3000:]

    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)
    assert two["metrics"]["world_size"] == 2 and one["metrics"]["world_size"] == 1
    # the entry script already asserted that rank 1's masks equal rank 0's
    for name, mask in one["masks"].items():
        assert torch.equal(two["masks"][name], mask), f"{name}: the 2-process run pruned other weights"
    report_one, report_two = one["metrics"]["prune_reports"][0], two["metrics"]["prune_reports"][0]
    # each rank computed half; the report counts the gradients of the summed Fisher (all ranks)
    assert report_two["num_grads"] == report_one["num_grads"] == 64
    assert report_two["achieved_sparsity"] == report_one["achieved_sparsity"] == pytest.approx(0.7, abs=1e-5)
    # only the main rank wrote the run's files, once
    history = (tmp_path / "two" / "tiny-digits" / "history.jsonl").read_text().splitlines()
    assert len(history) == 2  # one prune record, one epoch record
