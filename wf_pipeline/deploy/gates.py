"""Deployment gates: thresholds from the recipe (or CLI flags) checked against measured values.

A gate whose input was not measured (no baseline model, no PyTorch model, no test data) is reported
as skipped with the reason, never passed silently. If the user explicitly set such a gate, it is an
input error instead: a CI job that asks for an accuracy-drop budget but gives no baseline must fail
loudly rather than go green.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import GatesConfig

# What each gate needs besides the ONNX file itself.
GATE_REQUIREMENTS: dict[str, tuple[str, ...]] = {
    "min_accuracy": ("test_data",),
    "max_accuracy_drop": ("test_data", "baseline"),
    "max_latency_ms": (),
    "max_latency_ratio": ("baseline",),
    "min_sparsity": (),
    "max_parity_error": ("torch_model",),
    "min_top1_agreement": ("torch_model",),
    "min_int8_agreement": ("quantized",),
    "max_int8_logit_error": ("quantized",),
}
# Gates that exist only for an INT8 model: left out of an FP32 model's results, not reported as skipped.
INT8_GATES = ("min_int8_agreement", "max_int8_logit_error")

_REQUIREMENT_HINTS = {
    "test_data": "a test set (the recipe's data section)",
    "baseline": "a dense baseline model (--baseline DENSE.onnx)",
    "torch_model": "the PyTorch model (checkpoint) the ONNX file was exported from",
    "quantized": "an INT8 model (quantize.enabled: true) and its FP32 source (--fp32 FP32.onnx or --checkpoint)",
}


@dataclass
class GateResult:
    name: str
    passed: bool | None  # None = skipped (could not be evaluated)
    value: float | None
    threshold: float
    message: str  # starts with the gate's name, so a printed message alone identifies the gate

    @property
    def skipped(self) -> bool:
        return self.passed is None

    @property
    def status(self) -> str:
        return "skipped" if self.passed is None else ("passed" if self.passed else "failed")

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "status": self.status}


@dataclass
class GateInputs:
    """Measured values the gates compare against; None where not measured."""

    accuracy: float | None = None
    baseline_accuracy: float | None = None
    latency_p50_ms: float | None = None  # shipped model, first batch size
    latency_ratios: dict[int, float] = field(default_factory=dict)  # batch size -> shipped p50 / dense p50
    latency_batch_size: int | None = None  # the batch size of latency_p50_ms
    sparsity: float | None = None
    sparsity_zeros: int | None = None
    sparsity_total: int | None = None
    parity_error: float | None = None
    top1_agreement: float | None = None
    int8_agreement: float | None = None  # INT8 top-1 agreement with its FP32 source
    int8_logit_error: float | None = None  # mean |INT8 - FP32 logit| / mean |FP32 logit|

    def worst_latency_ratio(self) -> tuple[int, float] | None:
        """(batch size, ratio) of the slowest batch size relative to dense: the latency gate holds at every one."""
        if not self.latency_ratios:
            return None
        batch = max(self.latency_ratios, key=lambda b: self.latency_ratios[b])
        return batch, self.latency_ratios[batch]


def active_gates(gates: GatesConfig) -> dict[str, float]:
    return {name: float(value) for name, value in gates.model_dump().items() if value is not None}


def explicitly_set(gates: GatesConfig) -> set[str]:
    """Gates the user set to a non-default value (a resolved recipe that repeats a default is not a request)."""
    defaults = {name: info.default for name, info in GatesConfig.model_fields.items()}
    return {
        name
        for name in gates.model_fields_set
        if getattr(gates, name) is not None and getattr(gates, name) != defaults.get(name)
    }


def missing_requirements(gate: str, available: set[str]) -> list[str]:
    return [need for need in GATE_REQUIREMENTS[gate] if need not in available]


def check_gates_evaluable(gates: GatesConfig, available: set[str]) -> None:
    """Raise WFError if an explicitly set gate can never be evaluated with the inputs at hand."""
    problems = []
    for gate in sorted(explicitly_set(gates)):
        missing = missing_requirements(gate, available)
        if missing:
            problems.append(f"{gate} needs {' and '.join(_REQUIREMENT_HINTS[m] for m in missing)}")
    if problems:
        raise WFError(
            "gate(s) cannot be evaluated: " + "; ".join(problems),
            hint="provide the missing input or remove the gate from the recipe/flags",
        )


def _fmt(value: float) -> str:
    return f"{value:.6g}"


def _at_most(name: str, value: float, threshold: float, what: str) -> GateResult:
    passed = value <= threshold
    verb = "<=" if passed else ">"
    return GateResult(name, passed, value, threshold, f"{name}: {what} {_fmt(value)} {verb} {_fmt(threshold)}")


def _at_least(name: str, value: float, threshold: float, what: str) -> GateResult:
    passed = value >= threshold
    verb = ">=" if passed else "<"
    return GateResult(name, passed, value, threshold, f"{name}: {what} {_fmt(value)} {verb} {_fmt(threshold)}")


def _sparsity_gate(threshold: float, inputs: GateInputs) -> GateResult:
    value = inputs.sparsity
    assert value is not None
    result = _at_least("min_sparsity", value, threshold, "weight sparsity")
    # A pruner asked for 90% of 1001 weights zeroes floor(900.9) = 900 of them: 0.8991 is on target.
    if not result.passed and inputs.sparsity_zeros is not None and inputs.sparsity_total:
        if inputs.sparsity_zeros >= math.floor(threshold * inputs.sparsity_total):
            result = GateResult(
                "min_sparsity",
                True,
                value,
                threshold,
                f"min_sparsity: weight sparsity {_fmt(value)} = {inputs.sparsity_zeros}/{inputs.sparsity_total} zeros, "
                f"within rounding of {_fmt(threshold)}",
            )
    return result


def evaluate_gates(gates: GatesConfig, inputs: GateInputs, unavailable_reasons: dict[str, str] | None = None,
                   *, quantized: bool = False) -> list[GateResult]:
    """One GateResult per configured gate (None thresholds are not configured; INT8 gates only for INT8 models)."""
    reasons = unavailable_reasons or {}
    batch = f" at batch {inputs.latency_batch_size}" if inputs.latency_batch_size else ""
    worst = inputs.worst_latency_ratio()
    ratio_what = "p50 latency ratio shipped/dense"
    if worst is not None:
        others = ", ".join(f"batch {b}: {r:.3g}" for b, r in sorted(inputs.latency_ratios.items()) if b != worst[0])
        ratio_what += f" at batch {worst[0]} (the worst{'; ' + others if others else ''})"
    measured: dict[str, float | None] = {
        "min_accuracy": inputs.accuracy,
        "max_accuracy_drop": (
            inputs.baseline_accuracy - inputs.accuracy
            if inputs.accuracy is not None and inputs.baseline_accuracy is not None
            else None
        ),
        "max_latency_ms": inputs.latency_p50_ms,
        "max_latency_ratio": worst[1] if worst is not None else None,
        "min_sparsity": inputs.sparsity,
        "max_parity_error": inputs.parity_error,
        "min_top1_agreement": inputs.top1_agreement,
        "min_int8_agreement": inputs.int8_agreement,
        "max_int8_logit_error": inputs.int8_logit_error,
    }
    results = []
    for name, threshold in active_gates(gates).items():
        if name in INT8_GATES and not quantized:
            continue
        value = measured[name]
        if value is None:
            needs = GATE_REQUIREMENTS[name]
            reason = reasons.get(name) or (
                "not measured: needs " + " and ".join(_REQUIREMENT_HINTS[n] for n in needs) if needs else "not measured"
            )
            results.append(GateResult(name, None, None, threshold, f"{name}: skipped: {reason}"))
        elif name == "min_accuracy":
            results.append(_at_least(name, value, threshold, "test accuracy"))
        elif name == "max_accuracy_drop":
            results.append(_at_most(name, value, threshold, "accuracy drop vs baseline"))
        elif name == "max_latency_ms":
            results.append(_at_most(name, value, threshold, f"p50 latency{batch} (ms)"))
        elif name == "max_latency_ratio":
            results.append(_at_most(name, value, threshold, ratio_what))
        elif name == "min_sparsity":
            results.append(_sparsity_gate(threshold, inputs))
        elif name == "max_parity_error":
            results.append(_at_most(name, value, threshold, "max |logit diff| vs PyTorch"))
        elif name == "min_top1_agreement":
            results.append(_at_least(name, value, threshold, "top-1 agreement with PyTorch"))
        elif name == "min_int8_agreement":
            results.append(_at_least(name, value, threshold, "INT8 top-1 agreement with its FP32 source"))
        elif name == "max_int8_logit_error":
            results.append(_at_most(name, value, threshold, "INT8 mean |logit error| relative to FP32"))
    return results


def failed(results: list[GateResult]) -> list[GateResult]:
    return [r for r in results if r.passed is False]
