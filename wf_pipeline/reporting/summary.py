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
    if result.parity is not None:
        p = result.parity
        lines.append(
            f"- parity vs PyTorch on {p.samples} samples ({p.source}): max |logit diff| {p.max_abs_diff:.3g}, "
            f"mean {p.mean_abs_diff:.3g}, top-1 agreement {_pct(p.top1_agreement)}"
        )
    lines += compute_table(result.baseline_structure, result.structure)
    lines += ["", "## Gates", "", *gate_table(result.gates), ""]
    lines += [
        "## Latency (ONNX Runtime, ms per batch)",
        "",
        f"{result.settings.warmup} warm-up and {result.settings.repeats} timed runs per model, "
        "pruned and dense runs interleaved.",
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
    env = result.environment
    lines += ["", f"onnxruntime {env.get('onnxruntime')} on {env.get('processor')}, {env.get('cpu_count')} CPUs."]
    if result.notes:
        lines += ["", "Notes:", *[f"- {note}" for note in result.notes]]
    return "\n".join(lines) + "\n"
