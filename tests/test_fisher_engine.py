"""The one Fisher object pruners talk to: both storages answer alike, and the slice-wise update is the whole one.

Also guards the layout issue 22 asked for: no class in ``wf_pipeline/fisher/`` over 150 lines, and the WoodFisher
pruner's collect, score and update short and free of storage or route branches.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from tests.test_streamed_fisher import DAMP, SPILL_INVERSES, _batches, _model, _streamed_plan, _weights
from wf_pipeline.fisher.engine import InMemoryFisher, StreamedFisher, build_fisher
from wf_pipeline.fisher.inverse import accumulation_dtype
from wf_pipeline.fisher.streamed import FisherJob, plan_fisher_step
from wf_pipeline.pruning.obs import newton_step_scale, obs_update, obs_update_sliced

ROOT = Path(__file__).resolve().parent.parent


def _job(num_grads: int = 64, block: int = 64) -> FisherJob:
    model = _model()
    params = _weights(model)
    return FisherJob(model, params, None, _batches(), num_grads, block, DAMP,
                     accumulation_dtype(num_grads, block, torch.float32), generator=torch.Generator().manual_seed(5))


def test_in_memory_and_streamed_fisher_answer_alike(tmp_path: Path) -> None:
    streamed_job = _job()
    plan = _streamed_plan(streamed_job, 16, tmp_path / "run", SPILL_INVERSES)
    with build_fisher(streamed_job, plan, with_grad_mean=True) as streamed:
        assert isinstance(streamed, StreamedFisher) and streamed.plan is plan and len(plan.groups) >= 3
        memory_job = _job()
        in_memory_plan = plan_fisher_step(memory_job, 10**11, max_chunk=plan.chunk_size, vectors=3)
        memory = build_fisher(memory_job, in_memory_plan, with_grad_mean=True)
        assert isinstance(memory, InMemoryFisher) and not memory.plan.streamed
        assert memory.num_samples == streamed.num_samples == 64 and memory.dtype == streamed.dtype
        v = torch.randn(memory.inverse.dim, generator=torch.Generator().manual_seed(2), dtype=memory.dtype)
        for a, b in ((memory.diag(), streamed.diag()), (memory.newton(), streamed.newton()),
                     (memory.matvec(v), streamed.matvec(v))):
            assert float((a - b).norm() / b.norm()) <= 1e-6
        assert memory.health is not None and streamed.health is not None
        assert memory.health.promoted_blocks == streamed.health.promoted_blocks
        assert "gradients" in memory.timings and "gradients" in streamed.timings
    assert not any((tmp_path / "run").iterdir())  # closing removed the spill files


@pytest.mark.parametrize("update", ["joint", "independent", "none"])
def test_slice_wise_update_of_the_in_memory_fisher_is_the_whole_update_bit_for_bit(update: str) -> None:
    job = _job()
    fisher = build_fisher(job, plan_fisher_step(job, 10**11, max_chunk=16, vectors=3), with_grad_mean=True)
    assert isinstance(fisher, InMemoryFisher)
    weights = torch.cat([p.detach().reshape(-1) for p in job.params.values()]).to(fisher.dtype)
    pruned = torch.rand(weights.shape, generator=torch.Generator().manual_seed(4)) < 0.5
    sizes = [p.numel() for p in job.params.values()]
    scale = newton_step_scale(fisher.newton(), weights, sizes, 0.5)
    sliced, predicted = obs_update_sliced(fisher, weights, pruned, update=update, newton_scale=scale)
    whole, expected = obs_update(fisher.inverse, weights, pruned, update=update, grad_mean=fisher.grad_mean,
                                 newton_scale=scale)
    assert torch.equal(sliced, whole) and predicted == expected


# ---------------------------------------------------------------------------------------------- layout guards


def _length(node: ast.stmt) -> int:
    assert node.end_lineno is not None
    return node.end_lineno - node.lineno + 1


def _classes(path: Path) -> list[ast.ClassDef]:
    return [node for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))) if isinstance(node, ast.ClassDef)]


def test_no_class_in_the_fisher_package_is_over_150_lines() -> None:
    long = [f"{path.name}:{node.name} ({_length(node)})"
            for path in sorted((ROOT / "wf_pipeline" / "fisher").rglob("*.py")) for node in _classes(path)
            if _length(node) > 150]
    assert not long, f"split these classes (one job each): {long}"


def test_woodfisher_pruner_steps_are_short_and_ask_the_fisher_object() -> None:
    path = ROOT / "wf_pipeline" / "pruning" / "pruners" / "woodfisher.py"
    methods = [node for cls in _classes(path) for node in cls.body
               if isinstance(node, ast.FunctionDef) and node.name in ("collect", "score", "update")]
    assert {m.name for m in methods} == {"collect", "score", "update"}
    assert sum(_length(m) for m in methods) <= 80
    source = path.read_text(encoding="utf-8")
    for word in ("route", "streamed", "segment", "spill", "isinstance", "float64"):
        assert word not in source, f"the WoodFisher pruner mentions {word!r}: that is the Fisher object's business"
