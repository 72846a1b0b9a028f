"""Gate evaluation: pass/fail per gate, skipped with a reason when unmeasured, explicit-but-impossible is an input
error."""
from __future__ import annotations

import math

import pytest

from wf_pipeline.deploy.gates import (
    GateInputs,
    check_gates_evaluable,
    evaluate_gates,
    explicitly_set,
    failed,
)
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import GatesConfig

FULL = GateInputs(
    accuracy=0.90,
    baseline_accuracy=0.92,
    latency_p50_ms=2.0,
    latency_ratios={1: 0.8},
    latency_batch_size=1,
    sparsity=0.9,
    sparsity_zeros=900,
    sparsity_total=1000,
    parity_error=2e-6,
    top1_agreement=1.0,
)


def _by_name(results):
    return {r.name: r for r in results}


def test_all_gates_pass_on_good_values():
    gates = GatesConfig(
        min_accuracy=0.85, max_accuracy_drop=0.03, max_latency_ms=5, max_latency_ratio=1.0,
        min_sparsity=0.9, max_parity_error=1e-4, min_top1_agreement=0.99,
    )
    results = evaluate_gates(gates, FULL)
    assert [r.status for r in results] == ["passed"] * 7
    assert _by_name(results)["max_accuracy_drop"].value == pytest.approx(0.02)


@pytest.mark.parametrize(
    ("field", "threshold"),
    [
        ("min_accuracy", 0.95),
        ("max_accuracy_drop", 0.01),
        ("max_latency_ms", 1.5),
        ("max_latency_ratio", 0.5),
        ("min_sparsity", 0.95),
        ("max_parity_error", 1e-6),
        ("min_top1_agreement", 1.0),
    ],
)
def test_each_gate_fails_and_names_itself(field, threshold):
    inputs = FULL if field != "min_top1_agreement" else GateInputs(**{**FULL.__dict__, "top1_agreement": 0.97})
    results = evaluate_gates(GatesConfig(**{"max_parity_error": None, field: threshold}), inputs)
    assert [r.name for r in failed(results)] == [field]
    assert failed(results)[0].threshold == threshold
    assert failed(results)[0].message.startswith(f"{field}: ")  # a printed message alone names the gate


def test_unmeasured_gates_are_skipped_not_passed():
    gates = GatesConfig(max_latency_ratio=1.2, max_accuracy_drop=0.01, min_top1_agreement=0.99)
    results = _by_name(evaluate_gates(gates, GateInputs(latency_p50_ms=1.0, sparsity=0.5)))
    for name in ("max_latency_ratio", "max_accuracy_drop", "min_top1_agreement", "max_parity_error"):
        assert results[name].passed is None and results[name].status == "skipped"
        assert "skipped" in results[name].message
    assert "baseline" in results["max_latency_ratio"].message
    assert "PyTorch" in results["max_parity_error"].message
    assert failed(results.values()) == []


def test_explicit_gate_that_can_never_run_is_an_input_error():
    with pytest.raises(WFError, match="max_latency_ratio needs a dense baseline"):
        check_gates_evaluable(GatesConfig(max_latency_ratio=1.1), available={"onnx", "test_data"})
    with pytest.raises(WFError, match="max_parity_error needs the PyTorch model"):
        check_gates_evaluable(GatesConfig(max_parity_error=1e-3), available={"onnx"})
    # the default parity gate (1e-4), even when a resolved recipe repeats it, is only skipped
    check_gates_evaluable(GatesConfig(), available={"onnx"})
    check_gates_evaluable(GatesConfig(max_parity_error=1e-4), available={"onnx"})
    assert explicitly_set(GatesConfig(max_parity_error=1e-4, min_sparsity=0.5)) == {"min_sparsity"}


def test_gate_set_by_assignment_counts_as_explicit():
    gates = GatesConfig()
    gates.max_accuracy_drop = 0.02  # how a CLI flag override lands
    with pytest.raises(WFError, match="max_accuracy_drop"):
        check_gates_evaluable(gates, available={"onnx", "test_data"})


def test_sparsity_gate_allows_pruner_rounding_only():
    gates = GatesConfig(min_sparsity=0.9, max_parity_error=None)
    on_target = GateInputs(sparsity=900 / 1001, sparsity_zeros=900, sparsity_total=1001)
    assert evaluate_gates(gates, on_target)[0].passed is True
    short = GateInputs(sparsity=899 / 1001, sparsity_zeros=899, sparsity_total=1001)
    assert evaluate_gates(gates, short)[0].passed is False


def test_nan_measurement_fails_its_gate():
    results = evaluate_gates(GatesConfig(max_parity_error=1e-4), GateInputs(parity_error=math.nan))
    assert results[0].passed is False
