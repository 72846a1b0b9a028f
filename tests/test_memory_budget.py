"""`pruning.woodfisher.memory_budget_gb` end to end: the planned step equals the in-memory one, the plan is recorded."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from tests.cli_helpers import run_cli
from wf_pipeline.fisher.inverse import accumulation_dtype
from wf_pipeline.fisher.plan import FisherPlan, plan_within, smallest_budget
from wf_pipeline.fisher.streamed import FisherJob, measure_plan_inputs
from wf_pipeline.pruning import MaskSet, PruneSettings, prune_step

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(512, 96), nn.ReLU(),
                         nn.Linear(96, 10))


def _batches():
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(192, 1, 8, 8, generator=gen), torch.randint(0, 10, (192,), generator=gen)
    return lambda: [(x[i : i + 32], y[i : i + 32]) for i in range(0, 192, 32)]


def _weights(model: nn.Module) -> dict[str, nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.endswith("weight")}


def _budget_for_passes(num_grads: int, block: int, spill: Path | None, passes: int = 4) -> float:
    """A budget (GB) under which this step needs at least `passes` groups, with chunks of 8 or more (and, with a
    spill folder, one gradient pass whose rows are spilled)."""
    model = _model().eval()
    job = FisherJob(model, _weights(model), None, _batches(), num_grads, block, 1e-5,
                    accumulation_dtype(num_grads, block, torch.float32))
    inputs = measure_plan_inputs(job, max_chunk=16, spill_root=spill)
    low = smallest_budget(inputs)
    def plan_at(budget: int) -> FisherPlan:
        plan = plan_within(inputs, budget)
        assert plan is not None, f"no plan within {budget} bytes (smallest {low})"
        return plan

    high = next(b for b in range(low, 100 * low, max(1, low // 50)) if plan_at(b).revisit == "none")
    for budget in range(high, low, -max(1, low // 200)):  # the roomiest budget that still needs the passes
        plan = plan_at(budget)
        if plan.chunk_size >= 8 and len(plan.groups) >= passes and plan.gradient_spill == (spill is not None):
            return budget / 1e9
    raise AssertionError("no budget forces the passes")


def _prune(method: str, num_grads: int, block: int, budget_gb: float, chunk: int, spill: Path | None,
           sparsity: float = 0.75):
    model = _model()
    params = _weights(model)
    masks = MaskSet.dense(params)
    settings = PruneSettings(method, num_grads=num_grads, block_size=block, damp=1e-5, chunk_size=chunk,
                             memory_budget_gb=budget_gb)
    report = prune_step(model, params, masks, sparsity, settings, _batches(), spill_dir=spill,
                        generator=torch.Generator().manual_seed(3))
    return model, masks, report


@pytest.mark.parametrize("method,num_grads,spill", [
    ("woodfisher", 48, True),  # N >= B: Gram blocks, gradients and inverses spilled to disk
    ("woodfisher", 48, False),  # no spill folder: groups recomputed
    ("woodtaylor", 48, True),
    ("woodfisher", 12, True),  # N < B: stored gradient rows, low-rank form
])
def test_tiny_budget_many_passes_equal_the_in_memory_step(tmp_path: Path, method: str, num_grads: int,
                                                           spill: bool) -> None:
    block = 32
    spill_dir = tmp_path if spill else None
    budget = _budget_for_passes(num_grads, block, spill_dir)
    model, masks, report = _prune(method, num_grads, block, budget, 16, spill_dir)
    plan = report.details.fisher_plan
    assert plan is not None and report.details.fisher_plan_summary is not None
    assert plan["groups"] >= 4 and plan["revisit"] == ("disk" if spill else "recompute")
    if spill:  # one gradient pass, each group built from its rows read back from the run directory
        assert plan["gradient_spill"] and plan["gradient_passes"] == 1
    else:  # a pass per group, and again for the update
        assert not plan["gradient_spill"] and plan["gradient_passes"] >= 7
    assert report.details.fisher_plan_summary.startswith("Fisher plan:")
    assert not list(tmp_path.glob("fisher-spill-*"))  # spill files removed after the step
    # The same step with all statistics in memory at once, with the same gradient chunks.
    ref_model, ref_masks, ref_report = _prune(method, num_grads, block, 100.0, plan["chunk_size"], None)
    ref_plan = ref_report.details.fisher_plan
    assert ref_plan is not None and ref_plan["groups"] == 1 and ref_plan["revisit"] == "none"
    for name in ref_masks.masks:
        assert torch.equal(ref_masks.masks[name], masks.masks[name]), name
    a = torch.cat([p.detach().reshape(-1) for p in _weights(ref_model).values()])
    b = torch.cat([p.detach().reshape(-1) for p in _weights(model).values()])
    assert float((a - b).abs().max()) <= 1e-6 * float(a.abs().max())
    assert report.predicted_loss_increase == pytest.approx(ref_report.predicted_loss_increase, rel=1e-6)
    assert report.num_grads == ref_report.num_grads == num_grads
    # Every phase is timed; revisits are booked under gradients / spill, not under the OBS update.
    assert report.timings["obs"] >= 0 and report.timings["gradients"] > 0
    if spill:
        assert report.timings.get("spill", 0.0) > 0


def test_woodbury_route_refuses_to_stream() -> None:
    from wf_pipeline.errors import WFError

    model = _model()
    params = _weights(model)
    settings = PruneSettings("woodfisher", num_grads=48, block_size=32, route="woodbury",
                             memory_budget_gb=_budget_for_passes(48, 32, None))
    with pytest.raises(WFError, match="route: fast"):
        prune_step(model, params, MaskSet.dense(params), 0.5, settings, _batches())


def test_oneshot_budget_flag_and_too_small_budget(tmp_path: Path, capsys, monkeypatch) -> None:
    args = ["oneshot", str(TINY), "--sparsity", "0.5", "--method", "woodfisher", "--set", f"output.root={tmp_path}"]
    small = run_cli(capsys, monkeypatch, *args, "--memory-budget", "0.0001")
    assert small.code == 2
    assert "memory_budget_gb" in small.err and "smallest budget that works is" in small.err
    assert "Traceback" not in small.err + small.out
    ok = run_cli(capsys, monkeypatch, *args, "--memory-budget", "0.05", "--overwrite")
    assert ok.code == 0, ok.err
    assert "Fisher plan:" in ok.out
    table = json.loads((tmp_path / "tiny-digits-oneshot" / "oneshot" / "oneshot.json").read_text())
    assert table["results"][0]["fisher_plan"]["budget_bytes"] == 50_000_000
    assert not list((tmp_path / "tiny-digits-oneshot").glob("fisher-spill-*"))


def test_compress_records_the_plan_in_history(tmp_path: Path, capsys, monkeypatch) -> None:
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), "--set", f"output.root={tmp_path}",
                     "--set", "export.enabled=false", "--set", "validate.enabled=false",
                     "--set", "finetune.epochs=2", "--set", "pruning.schedule.end_epoch=1", "--memory-budget", "0.04")
    assert result.code == 0, result.err
    run = tmp_path / "tiny-digits"
    prunes = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    prunes = [r for r in prunes if r.get("kind") == "prune"]
    assert prunes and all(r["fisher_plan"]["budget_bytes"] == 40_000_000 for r in prunes)
    assert all(r["fisher_plan"]["groups"] >= 2 and r["fisher_plan"]["gradient_spill"] for r in prunes)
    # the precision assumption is recorded and logged (float32 blocks promoted to float64 a segment at a time)
    assert all("one segment at a time" in r["fisher_plan"]["precision"] for r in prunes)
    log = (run / "log.txt").read_text()
    assert "Fisher plan:" in log and "float32; blocks that need float64 are built one segment at a time" in log
    assert not list(run.glob("fisher-spill-*"))
