"""Markdown summary of a validation run (validation.md): verdict first, then the numbers behind it."""
from __future__ import annotations

from wf_pipeline.deploy.validate import ValidationResult


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.2f}%"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _size(num_bytes: int | None) -> str:
    if num_bytes is None:
        return "n/a"
    return f"{num_bytes / 1e6:.3f} MB" if num_bytes >= 100_000 else f"{num_bytes / 1e3:.1f} kB"


def gate_table(gates) -> list[str]:
    lines = ["| gate | status | value | threshold | detail |", "|---|---|---|---|---|"]
    for gate in gates:
        value = "n/a" if gate.value is None else f"{gate.value:.6g}"
        lines.append(f"| `{gate.name}` | **{gate.status.upper()}** | {value} | {gate.threshold:.6g} | {gate.message} |")
    return lines


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{value:,}"


def compute_table(dense: dict | None, pruned: dict | None) -> list[str]:
    """Parameters and MACs (model_stats) of the model beside its dense baseline, when both were read."""
    if not pruned:
        return []
    dense = dense or {}
    lines = ["", "| size and compute | dense | pruned | pruned / dense |", "|---|---|---|---|"]
    for key, label in (("params", "parameters"), ("nonzero_params", "non-zero parameters"),
                       ("macs", "MACs per sample (FLOPs = 2 x MACs)"), ("nonzero_macs", "non-zero MACs per sample")):
        d, p = dense.get(key), pruned.get(key)
        ratio = f"{p / d:.3f}" if isinstance(d, int) and isinstance(p, int) and d else "n/a"
        lines.append(f"| {label} | {_count(d)} | {_count(p)} | {ratio} |")
    return lines


def validation_markdown(result: ValidationResult) -> str:
    failed = [g.name for g in result.failed_gates]
    verdict = "PASSED: all gates passed" if result.passed else f"FAILED: {', '.join(failed)}"
    lines = [
        "# ONNX validation",
        "",
        f"**{verdict}**",
        "",
        f"- model: `{result.model_path}` ({_size(result.file_bytes)}, "
        f"{result.sparse_initializers} weights in compact storage)",
    ]
    if result.baseline_path:
        lines.append(f"- dense baseline: `{result.baseline_path}` ({_size(result.baseline_file_bytes)})")
    lines += [
        f"- weight sparsity (from the file): {_pct(result.sparsity)} "
        f"({result.sparsity_zeros}/{result.sparsity_total} zeros)",
        f"- test accuracy in ONNX Runtime: {_pct(result.accuracy)} on {result.test_samples} samples",
    ]
    if result.baseline_accuracy is not None:
        lines.append(f"- baseline accuracy: {_pct(result.baseline_accuracy)} (drop {_pct(result.accuracy_drop)})")
    if result.quantized:
        lines.append("- format: INT8 (ONNX QDQ, per-channel symmetric INT8 weights)"
                     + (f"; FP32 source `{result.fp32_path}`: test accuracy {_pct(result.fp32_accuracy)}"
                        if result.fp32_path else ""))
    if result.parity is not None:
        p = result.parity
        what = "FP32 model" if result.quantized else "model"
        lines.append(
            f"- parity of the {what} vs PyTorch on {p.samples} samples ({p.source}): max |logit diff| "
            f"{p.max_abs_diff:.3g}, mean {p.mean_abs_diff:.3g}, top-1 agreement {_pct(p.top1_agreement)}"
        )
    if result.int8_agreement is not None:
        a = result.int8_agreement
        lines.append(
            f"- INT8 vs {a.reference} on {a.samples} unseen samples ({a.source}): top-1 agreement "
            f"{_pct(a.top1_agreement)}, mean |logit error| {a.mean_abs_diff:.3g} ({_pct(a.relative_error)} of the "
            f"mean |logit|), max {a.max_abs_diff:.3g}"
        )
    lines += compute_table(result.baseline_structure, result.structure)
    lines += ["", "## Gates", "", *gate_table(result.gates), ""]
    lines += latency_lines(result)
    env = result.environment
    lines += ["", f"onnxruntime {env.get('onnxruntime')} on {env.get('processor')}, {env.get('cpu_count')} CPUs."]
    if result.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in result.notes]]
    return "\n".join(lines) + "\n"


def latency_lines(result: ValidationResult) -> list[str]:
    """The latency table: dense FP32, the shipped model's FP32 source (quantized runs) and the shipped model."""
    runs = f"{result.settings.warmup} warm-up and {result.settings.repeats} timed runs per model"
    if result.quantized and any(lat.fp32 is not None for lat in result.latency):
        lines = [
            "## Latency (ONNX Runtime, ms per batch)", "",
            f"{runs}; dense FP32, pruned FP32 and shipped INT8 runs interleaved.", "",
            "| batch | threads | dense FP32 p50 | pruned FP32 p50 | shipped INT8 p50 | p90 | p99 "
            "| FP32 / dense | INT8 / dense |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for lat in result.latency:
            lines.append(
                f"| {lat.batch_size} | {lat.threads} | {_ms(lat.dense.p50 if lat.dense else None)} "
                f"| {_ms(lat.fp32.p50 if lat.fp32 else None)} | {_ms(lat.pruned.p50)} | {_ms(lat.pruned.p90)} "
                f"| {_ms(lat.pruned.p99)} | {_ratio(lat.fp32_ratio_p50)} | {_ratio(lat.ratio_p50)} |")
        return lines
    lines = [
        "## Latency (ONNX Runtime, ms per batch)",
        "",
        f"{runs}, pruned and dense runs interleaved.",
        "",
        "| batch | threads | pruned p50 | p90 | p99 | dense p50 | p90 | p99 | ratio p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for lat in result.latency:
        dense = lat.dense
        ratio = "n/a" if lat.ratio_p50 is None else f"{lat.ratio_p50:.3f}"
        lines.append(
            f"| {lat.batch_size} | {lat.threads} "
            f"| {_ms(lat.pruned.p50)} | {_ms(lat.pruned.p90)} | {_ms(lat.pruned.p99)} "
            f"| {_ms(dense.p50 if dense else None)} | {_ms(dense.p90 if dense else None)} "
            f"| {_ms(dense.p99 if dense else None)} | {ratio} |"
        )
    return lines


def _ratio(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
