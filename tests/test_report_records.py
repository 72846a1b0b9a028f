"""Typed results through the run directory: validation.json, export.json and history.jsonl read back into the
dataclasses that wrote them, and the report's cells come from those fields (a renamed field fails here)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from wf_pipeline.deploy.export import ExportResult
from wf_pipeline.deploy.gates import GateResult
from wf_pipeline.deploy.latency import LatencyStats
from wf_pipeline.deploy.validate import LatencyResult, ParityResult, ValidationResult, ValidationSettings
from wf_pipeline.reporting.metrics import EpochRecord, PruneRecord
from wf_pipeline.reporting.records import RecordError, from_dict, read_export, read_validation
from wf_pipeline.reporting.report import write_report


def _validation() -> ValidationResult:
    shipped = LatencyStats.from_runs([0.411, 0.412, 0.413, 0.414])
    dense = LatencyStats.from_runs([0.821, 0.822, 0.823, 0.824])
    fp32 = LatencyStats.from_runs([0.631, 0.632, 0.633])
    return ValidationResult(
        model_path="export/model.onnx", baseline_path="export/dense_baseline.onnx", file_bytes=123_456,
        baseline_file_bytes=1_096_100, sparsity=0.8974, sparsity_zeros=8974, sparsity_total=10_000,
        baseline_sparsity=0.0, per_initializer_sparsity={"conv.weight": 0.8974}, sparse_initializers=1,
        accuracy=0.9335, baseline_accuracy=0.9383, test_samples=10_000,
        parity=ParityResult(256, "test data", 8.125e-06, 1e-06, 0.996),
        latency=[LatencyResult(1, 1, shipped, dense, shipped.p50 / dense.p50, fp32, fp32.p50 / dense.p50)],
        gates=[GateResult("min_sparsity", True, 0.8974, 0.89, "min_sparsity: 0.8974 >= 0.89"),
               GateResult("max_latency_ms", None, None, 5.0, "max_latency_ms: skipped (no timing)")],
        settings=ValidationSettings(warmup=7, repeats=41), environment={"onnxruntime": "1.32", "cpu_count": 2},
        quantized=True, fp32_path="export/model.fp32.onnx", fp32_accuracy=0.9331,
        int8_agreement=ParityResult(10_000, "test data", 0.25, 0.01, 0.9871, 0.0123, "the FP32 model"))


def _export(path: str, file_bytes: int) -> ExportResult:
    return ExportResult(Path(path), Path(path.replace(".onnx", ".dense.onnx")), True, file_bytes, 1_096_100,
                        {"conv.weight": 0.9}, {"conv.weight": 0.9}, True, 17,
                        onnx_per_layer_sparsity={"conv.weight": 0.9},
                        compact_weights=["conv.weight"], storage_format="bitmask", onnx_full_check=True,
                        torch_max_abs_diff=3.5e-06, sparse_vs_dense_max_abs_diff=0.0,
                        structure={"params": 100, "nonzero_params": 10, "macs": 1000, "nonzero_macs": 100,
                                   "layers": []})


def _json(data: dict[str, Any]) -> Any:
    return json.loads(json.dumps(data))


def test_validation_json_reads_back_into_the_result_that_wrote_it() -> None:
    result = _validation()
    assert from_dict(ValidationResult, _json(result.to_dict()), strict=True) == result
    assert read_validation(_json(result.to_dict())) == result


def test_export_json_reads_back_into_export_results() -> None:
    pruned, dense = _export("export/model.onnx", 164_000), _export("export/dense_baseline.onnx", 1_096_100)
    record = read_export(_json({"shipped": "model.onnx", "shipped_format": "fp32", "pruned": pruned.to_dict(),
                                "dense_baseline": dense.to_dict(), "quantized": {"path": "model.onnx"}}))
    assert record.pruned == pruned and record.dense_baseline == dense
    assert record.shipped_format == "fp32" and record.extra == {"quantized": {"path": "model.onnx"}}
    assert from_dict(ExportResult, _json(pruned.to_dict()), strict=True) == pruned


@pytest.mark.parametrize("field", ["accuracy", "parity", "latency", "gates", "int8_agreement", "fp32_accuracy"])
def test_a_renamed_field_is_an_error_not_an_empty_cell(field: str) -> None:
    data = _json(_validation().to_dict())
    data[field + "_renamed"] = data.pop(field)
    with pytest.raises(RecordError, match=field):
        from_dict(ValidationResult, data, strict=True)


def test_nested_fields_are_checked_by_type() -> None:
    data = _json(_validation().to_dict())
    data["latency"][0]["pruned"]["p50"] = "fast"
    with pytest.raises(RecordError, match=r"latency\[0\]\.pruned\.p50"):
        read_validation(data)
    data = _json(_validation().to_dict())
    del data["parity"]["max_abs_diff"]
    with pytest.raises(RecordError, match=r"parity\.max_abs_diff: missing"):
        read_validation(data)


def test_report_shows_the_typed_fields(tmp_path: Path) -> None:
    """Each value below reaches the report only through its dataclass field: rename one and this fails."""
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "validation.json").write_text(json.dumps(_validation().to_dict()))
    (tmp_path / "export").mkdir()
    pruned, dense = _export("export/model.onnx", 164_000), _export("export/dense_baseline.onnx", 1_096_100)
    (tmp_path / "export" / "export.json").write_text(
        json.dumps({"pruned": pruned.to_dict(), "dense_baseline": dense.to_dict()}))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    for cell in ["| test accuracy in ONNX Runtime | 93.35% |", "| dense baseline accuracy in ONNX Runtime | 93.83% |",
                 "| weight sparsity read from the ONNX file | 89.74% |", "| ONNX file size | 0.123 MB |",
                 "| shipped format | INT8 (ONNX QDQ) |",
                 "| test accuracy of its FP32 source in ONNX Runtime | 93.31% |",
                 "| max \\|logit diff\\| vs PyTorch | 8.12e-06 |", "| top-1 agreement with PyTorch | 99.60% |",
                 "| INT8 top-1 agreement with the FP32 model | 98.71% |",
                 "| INT8 mean \\|logit error\\| relative to FP32 | 1.23% |",
                 "| min_sparsity | PASSED | 0.8974 | 0.89 |", "| max_latency_ms | SKIPPED | n/a | 5 |",
                 "7 warm-up and 41 timed runs", "| storage | bitmask (1 weights) |",
                 "| max \\|diff\\| ORT vs PyTorch (sample input) | 3.5e-06 |", "onnxruntime 1.32"]:
        assert cell in md, cell
    lat = _validation().latency[0]
    assert lat.ratio_p50 is not None and lat.fp32_ratio_p50 is not None
    assert f"| ORT p50 latency, batch 1 | {lat.pruned.p50:.3f} ms (ratio to dense {lat.ratio_p50:.3f}); " \
           f"its FP32 source {lat.fp32_ratio_p50:.3f} |" in md
    assert "left out" not in md.split("## Left out")[0]


def test_an_unreadable_validation_json_is_left_out_with_the_reason(tmp_path: Path) -> None:
    data = _json(_validation().to_dict())
    del data["accuracy"]
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "validation.json").write_text(json.dumps(data))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "validation/validation.json left out: validation.json.accuracy: missing" in md


def test_history_records_round_trip_and_leave_unmeasured_fields_out() -> None:
    prune = PruneRecord(epoch=1.5, optimizer_step=15, event=2, target_sparsity=0.7, achieved_sparsity=0.7,
                        test_accuracy_after=0.61, timings={"total": 0.25}, method="woodfisher", num_grads=64)
    line = _json(prune.to_dict())
    assert line["kind"] == "prune" and "group" not in line and "warnings" not in line and "fisher_plan" not in line
    with pytest.raises(RecordError, match="group: missing"):  # strict: the left-out fields are missing
        from_dict(PruneRecord, line, strict=True)
    assert from_dict(PruneRecord, line) == prune
    epoch = EpochRecord(epoch=3, train_loss=0.5, train_accuracy=0.8, test_accuracy=0.75, sparsity=0.7, lr=0.01)
    assert from_dict(EpochRecord, _json(epoch.to_dict())) == epoch


def test_report_training_table_comes_from_typed_history(tmp_path: Path) -> None:
    lines = [EpochRecord(epoch=0, train_loss=1.0, test_accuracy=0.5, sparsity=0.0).to_dict(),
             PruneRecord(epoch=1.0, target_sparsity=0.625, achieved_sparsity=0.6251, test_accuracy_after=0.4375,
                         timings={"total": 0.125}).to_dict(),
             {"kind": "prune", "epoch": "one"},  # does not fit PruneRecord: noted, left out
             {"kind": "stage", "name": "other kinds are not charted"}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "| 1 | 62.50% | 62.51% | 43.75% | 0.125 |" in md
    assert "history.jsonl: left out 1 record(s) (history.jsonl prune record.epoch: expected a number" in md
