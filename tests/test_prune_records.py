"""Typed prune reports through the run directory: PruneReport / StepDetails (the pruning step's results) and
PruneStepRecord (metrics.json prune_reports) write the JSON keys run folders have always held, read older
files back, and the report's cells come from their fields (a renamed key fails here)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wf_pipeline.fisher.conditioning import InverseHealth
from wf_pipeline.pruning.step_report import PruneReport, ReportFormatError, StepDetails
from wf_pipeline.reporting.metrics import PruneStepRecord, RunMetrics
from wf_pipeline.reporting.report import write_report


def _json(data: Any) -> Any:
    return json.loads(json.dumps(data))


def _health() -> InverseHealth:
    return InverseHealth(damp=1e-5, rtol=1e-3, num_blocks=40, promoted_blocks=3, retried_blocks=1,
                         jittered_blocks=1, max_jitter=0.25, max_error_estimate=4e-4, working_dtype="float32",
                         route="fast")


# A WoodFisher step's metrics.json entry, key for key as the pruning stage has written it (the "extra" object
# was the step's free dict). Reading it and writing it back must give it again: a renamed field fails here.
LEGACY_ENTRY: dict[str, Any] = {
    "epoch": 1.5, "optimizer_step": 15, "event": 2, "group": "convs", "test_accuracy_after": 0.625,
    "target_sparsity": 0.7, "achieved_sparsity": 0.7001, "timings": {"gradients": 0.5, "inverse": 0.25, "obs": 0.125,
                                                                      "accumulate": 0.0625, "total": 1.0},
    "num_grads": 64, "predicted_loss_increase": 0.0125, "method": "woodfisher", "newly_pruned": 700,
    "extra": {
        "fisher_plan": {"budget_bytes": 10**9, "representation": "gram", "groups": 1, "revisit": "none"},
        "fisher_plan_summary": "Fisher plan: 1,000 weights in 2 layers",
        "num_blocks": 40, "route": "fast", "gradient_engine": "vmap", "nonfinite_skipped": 2,
        "fisher_dtype": "float32", "fisher_health": _health().to_dict(), "repaired_blocks": 2,
        "warnings": _health().warnings(), "sub_steps": 2,
    },
    "fully_pruned": ["fc.weight"],
}


def test_a_written_entry_reads_back_and_writes_the_same_json() -> None:
    record = PruneStepRecord.from_dict(_json(LEGACY_ENTRY))
    assert record.details.route == "fast" and record.details.fisher_health == _health()
    assert record.details.repaired_blocks == 2 and record.details.nonfinite_skipped == 2
    assert record.to_dict() == LEGACY_ENTRY
    assert list(record.to_dict()) == list(LEGACY_ENTRY)  # same key order too
    assert PruneStepRecord.from_dict(_json(record.to_dict())) == record


def test_a_renamed_key_no_longer_reads_into_its_field() -> None:
    for key in [k for k in LEGACY_ENTRY if k not in ("epoch", "extra")]:
        data = _json(LEGACY_ENTRY)
        data[key + "_renamed"] = data.pop(key)
        assert PruneStepRecord.from_dict(data).to_dict() != LEGACY_ENTRY, key
    for key in LEGACY_ENTRY["extra"]:
        data = _json(LEGACY_ENTRY)
        data["extra"][key + "_renamed"] = data["extra"].pop(key)
        assert PruneStepRecord.from_dict(data).to_dict() != LEGACY_ENTRY, key
    with pytest.raises(ReportFormatError, match=r"epoch: missing"):
        PruneStepRecord.from_dict({"epoch_renamed": 1.0})


def test_older_entries_read_with_missing_keys_as_none() -> None:
    """A magnitude step of an older run: no method, no details, no layer-collapse list."""
    old = {"epoch": 1, "optimizer_step": 3, "event": 0, "test_accuracy_after": 0.5, "target_sparsity": 0.5,
           "achieved_sparsity": 0.5, "timings": {"total": 0.01}, "num_grads": 0, "predicted_loss_increase": None}
    record = PruneStepRecord.from_dict(old)
    assert record.details == StepDetails() and record.method == "" and record.fully_pruned == []
    assert record.epoch == 1 and isinstance(record.epoch, int)  # a whole number stays as written
    assert record.to_dict() == {**old, "method": "", "newly_pruned": 0, "extra": {}, "fully_pruned": []}
    assert StepDetails.from_dict({"route": "kfac"}) == StepDetails(route="kfac")
    with pytest.raises(ReportFormatError, match=r"extra\.num_blocks: expected int, found str"):
        PruneStepRecord.from_dict({**old, "extra": {"num_blocks": "forty"}})


def test_prune_report_keeps_its_json_keys_and_round_trips() -> None:
    details = StepDetails(route="diagonal", gradient_engine="vmap", sub_steps=1)
    report = PruneReport(target_sparsity=0.5, achieved_sparsity=0.5, per_layer_sparsity={"fc.weight": 0.5},
                         timings={"total": 0.1}, num_grads=32, predicted_loss_increase=0.5, method="diag_fisher",
                         newly_pruned=10, details=details, fully_pruned=[])
    data = _json(report.to_dict())
    assert list(data) == ["target_sparsity", "achieved_sparsity", "per_layer_sparsity", "timings", "num_grads",
                          "predicted_loss_increase", "method", "newly_pruned", "extra", "fully_pruned"]
    assert data["extra"] == {"route": "diagonal", "gradient_engine": "vmap", "sub_steps": 1}  # only what was set
    assert PruneReport.from_dict(data) == report
    assert PruneReport(0.5, 0.5, {}, {}, 0, None).to_dict()["extra"] == {}  # magnitude: nothing recorded


def test_details_fold_sub_steps_and_notices_come_from_fields() -> None:
    details = StepDetails()
    details.add_skipped(0)
    assert details.nonfinite_skipped is None  # the key stays out while nothing was skipped
    details.record_health(_health())
    details.record_health(_health())
    details.add_skipped(3)
    assert details.fisher_health is not None and details.fisher_health.num_blocks == 80
    assert details.repaired_blocks == 4 and details.warnings == details.fisher_health.warnings()
    report = PruneReport(0.5, 0.5, {}, {}, 8, None, details=details)
    assert report.notices() == [*details.warnings, "Fisher gradients: 3 non-finite gradient(s) skipped and replaced "
                                "by other samples (pruning.woodfisher.nonfinite: skip)"]


def test_run_metrics_hold_typed_prune_reports_and_keep_misfits_as_read() -> None:
    raw = {"method": "woodfisher", "prune_reports": [LEGACY_ENTRY]}
    metrics = RunMetrics.from_dict(_json(raw))
    assert metrics.prune_reports is not None and isinstance(metrics.prune_reports[0], PruneStepRecord)
    assert metrics.prune_reports[0].num_grads == 64 and metrics.ignored_keys == []
    assert metrics.to_dict()["prune_reports"] == [LEGACY_ENTRY]
    odd = {"prune_reports": [{"epoch": "one"}]}
    metrics = RunMetrics.from_dict(odd)
    assert metrics.prune_reports is None and metrics.ignored_keys == ["prune_reports"]
    assert metrics.to_dict() == odd


# The steps table of the report, from LEGACY_ENTRY's fields.
STEP_ROW = ("| epoch 1.5 (convs) | woodfisher | 700 | 64 | 0.0125 | fast, float32, vmap gradients, 2 of 40 blocks "
            "repaired, 2 non-finite gradients skipped |")


def _report_with(tmp_path: Path, entry: dict[str, Any]) -> str:
    (tmp_path / "metrics.json").write_text(json.dumps({"method": "woodfisher", "prune_reports": [entry]}))
    write_report(tmp_path)
    return (tmp_path / "report.md").read_text()


def test_report_shows_the_typed_prune_reports(tmp_path: Path) -> None:
    md = _report_with(tmp_path, LEGACY_ENTRY)
    assert "| step | method | newly pruned | Fisher gradients | predicted loss increase | curvature |" in md
    assert STEP_ROW in md


@pytest.mark.parametrize("key", ["epoch", "group", "method", "newly_pruned", "num_grads", "predicted_loss_increase",
                                 "extra.route", "extra.fisher_dtype", "extra.gradient_engine", "extra.repaired_blocks",
                                 "extra.fisher_health", "extra.nonfinite_skipped"])
def test_a_renamed_key_the_report_shows_changes_its_cell(tmp_path: Path, key: str) -> None:
    entry = _json(LEGACY_ENTRY)
    *parents, name = key.split(".")
    where = entry[parents[0]] if parents else entry
    where[name + "_renamed"] = where.pop(name)
    assert STEP_ROW not in _report_with(tmp_path, entry)
