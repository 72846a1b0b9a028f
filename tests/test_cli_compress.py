"""`wf-pipeline compress` end to end on the tiny digits recipe: prune, export, validate, report, gate exit codes."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET
from pathlib import Path

import onnx

from tests.cli_helpers import run_cli
from wf_pipeline.data import DataBundle

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"


def test_compress_end_to_end_then_validate_and_report(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "artifacts"
    # Every pass over the test set (a PyTorch evaluation or the test tensors validation takes) asks for its batches.
    passes: list[int | None] = []
    real_test_batches = DataBundle.test_batches

    def counted(self: DataBundle, batch_size: int | None = None):  # noqa: ANN202
        passes.append(batch_size)
        return real_test_batches(self, batch_size)

    monkeypatch.setattr(DataBundle, "test_batches", counted)
    # An impossible accuracy gate: the run completes, writes everything, and exits 1 naming the gate.
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), "--set", f"output.root={root}",
                     "--set", "validate.gates.min_accuracy=0.9999")
    assert result.code == 1, result.err
    # The default evaluates as documented (docs/recipes.md): the dense and the final model once each in PyTorch,
    # then one pass in ONNX Runtime for the shipped model and the dense baseline together; the other pass is
    # the pre-flight check's single batch of 2.
    assert sorted(passes, key=str) == [2, None, None, None], passes
    assert "min_accuracy" in result.err
    run = root / "tiny-digits"
    for name in ("recipe.yaml", "environment.json", "metrics.json", "history.jsonl", "log.txt", "report.html",
                 "export/model.onnx", "export/model.dense.onnx", "export/dense_baseline.onnx", "export/export.json",
                 "validation/validation.json", "validation/junit.xml", "validation/validation.md",
                 "checkpoints/pruned.pt"):
        assert (run / name).exists(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert abs(metrics["sparsity"] - 0.8) < 1e-3 and metrics["gates_passed"] is False
    assert {"prune_s", "finetune_s", "eval_s", "export_s", "validate_s"} <= set(metrics["timings"])
    assert "<h2>Time split" in (run / "report.html").read_text()
    assert [e["kind"] for e in metrics["evaluations"]] == ["start", "epoch"]  # evaluation.monitor: none
    assert [e["test_images"] for e in metrics["evaluations"]] == ["all 360 test images"] * 2
    assert metrics["evaluations"][0]["accuracy"] == metrics["dense_accuracy"] == metrics["initial_accuracy"]
    report_md = (run / "report.md").read_text()
    assert "## Evaluations" in report_md and "`evaluation.monitor: none`" in report_md
    for row in ("| before pruning | PyTorch | all 360 test images |",
                "| validation: the shipped ONNX model | ONNX Runtime | all 360 test images |",
                "| validation: the dense baseline ONNX model | ONNX Runtime | all 360 test images |"):
        assert row in report_md, row
    export = json.loads((run / "export" / "export.json").read_text())
    assert export["pruned"]["sparsity_matches"] is True
    # The shipped file passes the full check, stores weights compactly and is smaller than its dense-storage twin.
    onnx.checker.check_model(str(run / "export" / "model.onnx"), full_check=True)
    assert export["pruned"]["compact_weights"] and export["pruned"]["generated_names"] == []
    assert (run / "export" / "model.onnx").stat().st_size < (run / "export" / "model.dense.onnx").stat().st_size
    junit = ET.parse(run / "validation" / "junit.xml").getroot()
    failures = [case.get("name") for case in junit.iter("testcase") if case.find("failure") is not None]
    assert any("min_accuracy" in (name or "") for name in failures)
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["passed"] is False

    # The same model through the standalone gate with budgets it meets: exit 0, parity checked against the checkpoint.
    out = tmp_path / "gate"
    ok = run_cli(capsys, monkeypatch, "validate", str(run / "export" / "model.onnx"), "--recipe", str(TINY),
                 "--baseline", str(run / "export" / "dense_baseline.onnx"),
                 "--checkpoint", str(run / "checkpoints" / "pruned.pt"),
                 "--min-sparsity", "0.79", "--max-parity-error", "1e-4", "--out", str(out))
    assert ok.code == 0, ok.out + ok.err
    assert json.loads((out / "validation.json").read_text())["passed"] is True

    # Resuming a finished run redoes nothing: it says so and exits with the run's recorded outcome (gate failed: 1).
    again = run_cli(capsys, monkeypatch, "compress", str(TINY), "--set", f"output.root={root}", "--resume")
    assert again.code == 1 and "already finished" in again.err and "min_accuracy" in again.err, again.err
    assert json.loads((run / "metrics.json").read_text()) == metrics

    report = run_cli(capsys, monkeypatch, "report", str(run))
    assert report.code == 0 and (run / "report.html").read_text().count("<img") >= 2


def test_validate_rejects_missing_and_corrupt_models(tmp_path: Path, capsys, monkeypatch) -> None:
    missing = run_cli(capsys, monkeypatch, "validate", str(tmp_path / "none.onnx"), "--recipe", str(TINY))
    assert missing.code == 2 and "not found" in missing.err
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(b"\x00garbage" * 10)
    bad = run_cli(capsys, monkeypatch, "validate", str(corrupt), "--recipe", str(TINY))
    assert bad.code == 2 and len(bad.err.strip().splitlines()) == 1
