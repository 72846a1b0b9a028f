"""RunMetrics: metrics.json keys exactly as before, lossless round trips, odd files read without loss."""
from __future__ import annotations

import json

from wf_pipeline.reporting.metrics import STAGE_KEYS, RunMetrics
from wf_pipeline.reporting.report import load_run, write_report


def _stage_dict() -> dict:
    """The pruning stage's metrics as training/gradual/loop.py builds them (a grouped recipe: no single target)."""
    return {
        "method": "woodfisher", "structure": "unstructured", "initial_accuracy": 0.94, "final_accuracy": 0.91,
        "evaluations": [{"kind": "start", "label": "before pruning", "epoch": 0.0, "event": None, "runtime": "PyTorch",
                         "samples": 100, "test_images": "all 100 test images", "accuracy": 0.94, "seconds": 0.1}],
        "target_sparsity": None, "sparsity": 0.9, "model_sparsity": 0.85, "pruned_params": 900,
        "prunable_params": 1000, "per_layer_sparsity": {"conv.weight": 0.9, "fc.weight": 0.9},
        "schedule": [{"epoch": 0, "optimizer_step": 0, "target_sparsity": 0.5, "group": "convs"}],
        "prune_reports": [{"epoch": 0, "optimizer_step": 0, "event": 0, "group": "convs", "test_accuracy_after": 0.6,
                           "target_sparsity": 0.5, "achieved_sparsity": 0.5, "timings": {"total": 0.4}, "num_grads": 20,
                           "predicted_loss_increase": 0.01, "method": "woodfisher", "newly_pruned": 450,
                           "extra": {"route": "fast", "sub_steps": 1}, "fully_pruned": []}],
        "epochs": 2, "steps_per_epoch": 3,
        "world_size": 1, "timings": {"finetune_s": 1.0, "prune_s": 0.5, "eval_s": 0.25, "total_s": 2.0},
        "resumed": False, "resumed_from": [], "notes": ["a note"], "checkpoint": "checkpoints/gradual_state.pt",
    }


def test_compress_metrics_have_exactly_the_keys_metrics_json_always_had():
    metrics = RunMetrics.from_dict({"dense_accuracy": 0.94, **_stage_dict()})
    metrics.num_params = 1200
    metrics.add_timing("export_s", 1.5)
    metrics.onnx = "export/model.onnx"
    metrics.add_timing("validate_s", 2.5)
    metrics.gates_passed = False
    metrics.total_seconds = 9.0
    data = metrics.to_dict()
    assert list(data) == ["dense_accuracy", *STAGE_KEYS, "num_params", "onnx", "gates_passed", "total_seconds"]
    assert data["target_sparsity"] is None  # a stage key that is null is still written
    assert data["timings"] == {"finetune_s": 1.0, "prune_s": 0.5, "eval_s": 0.25, "total_s": 2.0,
                               "export_s": 1.5, "validate_s": 2.5}
    assert metrics.extra == {} and metrics.ignored_keys == []
    assert data["prune_reports"] == _stage_dict()["prune_reports"]  # typed entries, written as read
    assert RunMetrics.from_dict(json.loads(json.dumps(data))) == metrics


def test_without_export_and_validation_those_keys_are_absent():
    data = RunMetrics.from_dict({"dense_accuracy": 0.9, **_stage_dict(), "total_seconds": 3.0}).to_dict()
    assert set(data) == {"dense_accuracy", *STAGE_KEYS, "total_seconds"}


def test_dense_training_metrics_keys():
    metrics = RunMetrics(final_accuracy=0.9, dense_accuracy=0.9, sparsity=0.0, epochs=3, num_params=10,
                         train_seconds=1.0)
    data = metrics.to_dict()
    assert set(data) == {"final_accuracy", "dense_accuracy", "sparsity", "epochs", "num_params", "train_seconds"}
    assert data["sparsity"] == 0.0  # zero is a measurement, not an absence


def test_unknown_and_mistyped_keys_are_kept_and_written_back():
    raw = {"dense_accuracy": 0.9, "sparsity": "high", "epochs": 2.5, "resumed": 1, "future_key": {"a": [1]},
           "per_layer_sparsity": {"w": "0.5"}}
    metrics = RunMetrics.from_dict(raw)
    assert metrics.dense_accuracy == 0.9
    assert metrics.sparsity is None and metrics.epochs is None and metrics.resumed is None
    assert metrics.per_layer_sparsity is None
    assert metrics.ignored_keys == ["sparsity", "epochs", "resumed", "per_layer_sparsity"]
    assert metrics.extra["future_key"] == {"a": [1]}
    assert metrics.to_dict() == raw


def test_ints_count_as_floats_but_bools_do_not():
    metrics = RunMetrics.from_dict({"dense_accuracy": 1, "final_accuracy": True, "num_params": True})
    assert metrics.dense_accuracy == 1
    assert metrics.final_accuracy is None and metrics.num_params is None
    assert metrics.ignored_keys == ["final_accuracy", "num_params"]


def test_report_reads_typed_metrics_and_notes_mistyped_ones(tmp_path):
    (tmp_path / "metrics.json").write_text(json.dumps({
        "dense_accuracy": 0.94, "final_accuracy": 0.91, "sparsity": "most", "num_params": 5000,
        "total_seconds": 10.0, "timings": {"prune_s": 2.0, "finetune_s": 5.0}}))
    run = load_run(tmp_path)
    assert run.metrics is not None and run.metrics.final_accuracy == 0.91 and run.metrics.sparsity is None
    assert any("metrics.json: sparsity has an unexpected value" in note for note in run.notes)
    text = (write_report(tmp_path).parent / "report.md").read_text()
    assert "| final test accuracy (PyTorch) | 91.00% |" in text
    assert "achieved sparsity" not in text
    assert "| other | 3.0 s | 30.0% |" in text  # time split: 10 s total, 7 s by stage


def test_report_of_a_metrics_file_that_is_not_an_object(tmp_path):
    (tmp_path / "metrics.json").write_text("[1, 2]")
    run = load_run(tmp_path)
    assert run.metrics is None
    assert any("metrics.json holds a list" in note for note in run.notes)
