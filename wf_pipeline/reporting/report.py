"""The run report: one self-contained HTML file (charts embedded as base64 PNG) plus report.md.

It reads whatever the run directory holds (the run-directory contract is in README.md: "Run directory"
under Usage; the report in docs/deployment.md) and leaves out, with a note, any piece that is missing
or unreadable: a report of a half-finished run is still useful. metrics.json, validation.json and
export.json are read back into the typed results that wrote them (RunMetrics with its PruneStepRecord
prune reports and SurgeryResult channel surgery, ValidationResult, ExportResult: see records.py), so
every cell comes from a checked attribute. Both formats are rendered from the same list of blocks, so
they never disagree.
"""
from __future__ import annotations

import base64
import html
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from wf_pipeline.deploy.model_stats import LayerStats, ModelStats
from wf_pipeline.deploy.validate import ValidationResult
from wf_pipeline.errors import WFError
from wf_pipeline.pruning.structured.surgery import SurgeryResult
from wf_pipeline.reporting import charts
from wf_pipeline.reporting.metrics import EpochRecord, PruneRecord, PruneStepRecord, RunMetrics
from wf_pipeline.reporting.records import ExportRecord, RecordError, from_dict, read_export, read_validation
from wf_pipeline.runtime import atomic_io

ASSETS_DIR = "report_files"


@dataclass
class Paragraph:
    text: str


@dataclass
class Table:
    headers: list[str]
    rows: list[list[str]]


@dataclass
class Image:
    name: str  # file name under report_files/ for the Markdown version
    png: bytes
    alt: str


@dataclass
class Section:
    title: str
    blocks: list[Paragraph | Table | Image] = field(default_factory=list)


@dataclass
class RunData:
    """Everything read from a run directory; None where a file is absent or unreadable."""

    path: Path
    recipe: dict[str, Any] | None = None
    environment: dict[str, Any] | None = None
    metrics: RunMetrics | None = None
    history: list[EpochRecord | PruneRecord] = field(default_factory=list)
    oneshot: dict[str, Any] | None = None
    validation: ValidationResult | None = None
    export: ExportRecord | None = None
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- reading


def _read_json(run: RunData, relative: str) -> Any:
    path = run.path / relative
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        run.notes.append(f"could not read {relative}: {exc}")
        return None


def _read_history(run: RunData) -> list[dict[str, Any]]:
    path = run.path / "history.jsonl"
    if not path.is_file():
        return []
    records, bad = [], 0
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            bad += 1  # a run killed mid-write leaves a partial last line
            continue
        if isinstance(record, dict):
            records.append(record)
    if bad:
        run.notes.append(f"history.jsonl: skipped {bad} unreadable line(s)")
    return records


def _typed_history(run: RunData, records: list[dict[str, Any]]) -> list[EpochRecord | PruneRecord]:
    """history.jsonl lines as EpochRecord / PruneRecord (other kinds are not shown; misfits are noted)."""
    kinds: dict[Any, type[EpochRecord] | type[PruneRecord]] = {"epoch": EpochRecord, "prune": PruneRecord}
    typed: list[EpochRecord | PruneRecord] = []
    misfits = []
    for record in records:
        cls = kinds.get(record.get("kind"))
        if cls is None:
            continue
        try:
            typed.append(from_dict(cls, record, where=f"history.jsonl {record.get('kind')} record"))
        except RecordError as exc:
            misfits.append(str(exc))
    if misfits:
        run.notes.append(f"history.jsonl: left out {len(misfits)} record(s) ({misfits[0]})")
    return typed


def _read_metrics(run: RunData) -> RunMetrics | None:
    data = _read_json(run, "metrics.json")
    if data is None:
        return None
    if not isinstance(data, dict):
        run.notes.append(f"metrics.json holds a {type(data).__name__}, not an object: left out")
        return None
    metrics = RunMetrics.from_dict(data)
    for key in metrics.ignored_keys:
        run.notes.append(f"metrics.json: {key} has an unexpected value ({data[key]!r:.60}): left out")
    return metrics


def load_run(run_dir: Path) -> RunData:
    run = RunData(Path(run_dir))
    recipe_path = run.path / "recipe.yaml"
    if recipe_path.is_file():
        try:
            run.recipe = yaml.safe_load(recipe_path.read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError) as exc:
            run.notes.append(f"could not read recipe.yaml: {exc}")
    run.environment = _read_json(run, "environment.json")
    run.metrics = _read_metrics(run)
    run.history = _typed_history(run, _read_history(run))
    run.oneshot = _read_json(run, "oneshot/oneshot.json")
    validation = _read_json(run, "validation/validation.json")
    try:
        run.validation = None if validation is None else read_validation(validation)
    except RecordError as exc:
        run.notes.append(f"validation/validation.json left out: {exc}")
    export = _read_json(run, "export/export.json")
    try:
        run.export = None if export is None else read_export(export)
    except RecordError as exc:
        run.notes.append(f"export/export.json left out: {exc}")
    return run


# ---------------------------------------------------------------------------------------------- formatting


def _pct(value: Any) -> str:
    return f"{100 * float(value):.2f}%" if isinstance(value, (int, float)) else "n/a"


def _num(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return str(value) if value is not None else "n/a"
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def _size(num_bytes: Any) -> str:
    if not isinstance(num_bytes, (int, float)):
        return "n/a"
    return f"{num_bytes / 1e6:.3f} MB" if num_bytes >= 100_000 else f"{num_bytes / 1e3:.1f} kB"


# ---------------------------------------------------------------------------------------------- sections


def _summary_section(run: RunData) -> Section:
    section = Section("Key metrics")
    rows: list[list[str]] = []
    m = run.metrics or RunMetrics()
    recipe = run.recipe or {}
    pruning = recipe.get("pruning") or {}
    if pruning:
        rows.append(["pruning method", str(pruning.get("method", "n/a"))])
        groups = pruning.get("groups") or []
        rows.append(["target sparsity", ", ".join(f"{g.get('name') or f'group{i}'} {_pct(g.get('final_sparsity'))}"
                                                  for i, g in enumerate(groups))
                     if groups else _pct(pruning.get("final_sparsity"))])
    if m.dense_accuracy is not None:
        rows.append(["dense test accuracy (PyTorch)", _pct(m.dense_accuracy)])
    if m.final_accuracy is not None:
        rows.append(["final test accuracy (PyTorch)", _pct(m.final_accuracy)])
    # Every row describes the shipped model: after channel surgery, its parameters, and channels removed
    # (its weights are dense: the file's weight sparsity below is about zeros, not about removed channels).
    channel = m.structure == "channel"
    if m.sparsity is not None:
        rows.append(["channels removed" if channel else "achieved sparsity (masks)", _pct(m.sparsity)])
    if m.num_params is not None:
        before = _surgery(run, m).params_before if channel and m.channel_surgery else None
        rows.append(["parameters (shipped model)",
                     _num(m.num_params) + (f" (dense {_num(before)})" if channel and before else "")])
    v = run.validation
    if v is not None:
        rows.append(["test accuracy in ONNX Runtime", _pct(v.accuracy)])
        if v.baseline_accuracy is not None:
            rows.append(["dense baseline accuracy in ONNX Runtime", _pct(v.baseline_accuracy)])
        rows.append(["weight sparsity read from the ONNX file", _pct(v.sparsity)])
        rows.append(["ONNX file size", _size(v.file_bytes)])
        if v.baseline_file_bytes:
            rows.append(["dense baseline file size", _size(v.baseline_file_bytes)])
        if v.quantized:
            rows.append(["shipped format", "INT8 (ONNX QDQ)"])
            rows.append(["test accuracy of its FP32 source in ONNX Runtime", _pct(v.fp32_accuracy)])
        if v.parity is not None:
            rows.append(["max |logit diff| vs PyTorch", _num(v.parity.max_abs_diff, 3)])
            rows.append(["top-1 agreement with PyTorch", _pct(v.parity.top1_agreement)])
        agreement = v.int8_agreement
        if agreement is not None:
            rows.append([f"INT8 top-1 agreement with {agreement.reference}", _pct(agreement.top1_agreement)])
            rows.append(["INT8 mean |logit error| relative to FP32", _pct(agreement.relative_error)])
        for lat in v.latency:
            text = f"{lat.pruned.p50:.3f} ms"
            if lat.ratio_p50 is not None:
                text += f" (ratio to dense {lat.ratio_p50:.3f})"
            if lat.fp32_ratio_p50 is not None:
                text += f"; its FP32 source {lat.fp32_ratio_p50:.3f}"
            rows.append([f"ORT p50 latency, batch {lat.batch_size}", text])
    if m.total_seconds is not None:
        rows.append(["total time", f"{m.total_seconds:.1f} s"])
    if rows:
        section.blocks.append(Table(["metric", "value"], rows))
    else:
        section.blocks.append(Paragraph("No metrics.json or validation results in this run directory."))
    return section


def _surgery(run: RunData, m: RunMetrics) -> SurgeryResult:
    """metrics.json's channel_surgery as the SurgeryResult that wrote it (empty, with a note, if it does not fit)."""
    try:
        return from_dict(SurgeryResult, m.channel_surgery, where="metrics.json channel_surgery")
    except RecordError as exc:
        run.notes.append(f"metrics.json channel_surgery left out: {exc}")
        return SurgeryResult()


def _gates_section(run: RunData) -> Section | None:
    v = run.validation
    if v is None:
        return None
    gates = v.gates
    section = Section("Deployment gates")
    failed = [g.name for g in v.failed_gates]
    verdict = "all gates passed" if not failed else "FAILED: " + ", ".join(failed)
    section.blocks.append(Paragraph(f"Verdict: **{verdict}**"))
    if gates:
        rows = [[g.name, g.status.upper(), _num(g.value, 6), _num(g.threshold, 6), g.message] for g in gates]
        section.blocks.append(Table(["gate", "status", "value", "threshold", "detail"], rows))
    else:
        section.blocks.append(Paragraph("No gates were configured."))
    return section


def layer_collapse_note(layers: list[str], shown: int = 6) -> str | None:
    """What to tell the user when pruning emptied whole layers, or None when it did not.

    Global ranking may prune every weight of a layer ("layer collapse"): the layer then passes on only
    its bias, which cuts the network there unless a skip connection runs around it. The ranking is left
    as asked; the run says so.
    """
    if not layers:
        return None
    names = ", ".join(layers[:shown]) + (f", ... ({len(layers)} in all)" if len(layers) > shown else "")
    return (f"{len(layers)} layer(s) pruned to 100% sparsity (layer collapse: such a layer passes on only its "
            f"bias, so no signal flows through it): {names}. To keep every layer, use pruning.ranking: uniform, "
            "a lower final_sparsity, or leave these layers out with pruning.skip")


def _sparsity_section(run: RunData) -> Section | None:
    torch_sparsity = run.metrics.per_layer_sparsity if run.metrics else None
    onnx_sparsity = None
    if run.export:
        onnx_sparsity = run.export.pruned.onnx_per_layer_sparsity or None
        torch_sparsity = torch_sparsity or run.export.pruned.torch_per_layer_sparsity
    if not onnx_sparsity and run.validation:
        onnx_sparsity = run.validation.per_initializer_sparsity or None
    if not torch_sparsity:
        if not onnx_sparsity:
            return None
        torch_sparsity = {}
    section = Section("Per-layer sparsity")
    chart = charts.per_layer_sparsity_chart(torch_sparsity, onnx_sparsity)
    section.blocks.append(Image("per_layer_sparsity.png", chart, "per-layer sparsity"))
    collapsed = layer_collapse_note([n for n, v in torch_sparsity.items() if isinstance(v, (int, float)) and v >= 1.0])
    if collapsed:
        section.blocks.append(Paragraph(f"**Warning**: {collapsed}."))
    if run.export:
        verdict = "match" if run.export.pruned.sparsity_matches else "DO NOT match"
        section.blocks.append(Paragraph(f"The zeros in the exported ONNX file {verdict} the PyTorch masks."))
    onnx_sparsity = onnx_sparsity or {}
    names = list(dict.fromkeys([*torch_sparsity, *onnx_sparsity]))
    section.blocks.append(Table(["layer", "PyTorch", "ONNX file"],
                                [[n, _pct(torch_sparsity.get(n)), _pct(onnx_sparsity.get(n))] for n in names]))
    return section


def _oneshot_section(run: RunData) -> Section | None:
    oneshot = run.oneshot or {}
    results = oneshot.get("results")
    if not results:
        return None
    usable = [r for r in results if isinstance(r, dict) and "sparsity" in r and "accuracy" in r]
    if not usable:
        run.notes.append("oneshot/oneshot.json has no (sparsity, accuracy) results")
        return None
    section = Section("Accuracy vs sparsity (one-shot sweep)")
    dense = oneshot.get("dense_accuracy")
    section.blocks.append(Image("accuracy_vs_sparsity.png", charts.accuracy_vs_sparsity_chart(usable, dense),
                                "accuracy vs sparsity"))
    sparsities = sorted({r["sparsity"] for r in usable})
    methods = list(dict.fromkeys(str(r.get("method", "?")) for r in usable))
    rows = []
    for method in methods:
        cells = {r["sparsity"]: r["accuracy"] for r in usable if str(r.get("method", "?")) == method}
        rows.append([method, *[_pct(cells.get(s)) for s in sparsities]])
    section.blocks.append(Table(["method", *[_pct(s) for s in sparsities]], rows))
    return section


def _training_section(run: RunData) -> Section | None:
    epochs = [r for r in run.history if isinstance(r, EpochRecord)]
    prunes = [r for r in run.history if isinstance(r, PruneRecord)]
    steps = (run.metrics.prune_reports if run.metrics else None) or []
    if not epochs and not prunes and not steps:
        return None
    section = Section("Training and pruning")
    if epochs or prunes:
        section.blocks.append(Image("training_curves.png", charts.training_curves_chart(epochs, prunes),
                                    "training and pruning curves"))
    if prunes:
        rows = [
            [_num(p.epoch), _pct(p.target_sparsity), _pct(p.achieved_sparsity),
             _pct(p.test_accuracy_after) if p.test_accuracy_after is not None else "not measured",
             _num(p.timings.get("total"), 3) if p.timings else "n/a"]
            for p in prunes
        ]
        section.blocks.append(Table(["epoch", "target", "achieved", "accuracy right after", "seconds"], rows))
    notices = [f"epoch {_num(p.epoch)}{f' ({p.group})' if p.group else ''}: {line}"
               for p in prunes for line in p.warnings]
    if notices:
        section.blocks.append(Paragraph("**Repairs and skips** (the pruning steps went on with them): "
                                        + "; ".join(notices)))
    if steps:
        section.blocks.append(Table(["step", "method", "newly pruned", "Fisher gradients", "predicted loss increase",
                                     "curvature"], [_step_row(step) for step in steps]))
    return section


def _step_row(step: PruneStepRecord) -> list[str]:
    """One pruning step of metrics.json: what it pruned and how its curvature was computed."""
    d = step.details
    curvature = [part for part in (d.route, d.fisher_dtype) if part]
    if d.gradient_engine:
        curvature.append(f"{d.gradient_engine} gradients")
    if d.repaired_blocks:
        of = f" of {d.fisher_health.num_blocks}" if d.fisher_health else ""
        curvature.append(f"{d.repaired_blocks}{of} blocks repaired")
    if d.nonfinite_skipped:
        curvature.append(f"{d.nonfinite_skipped} non-finite gradients skipped")
    return [f"epoch {_num(step.epoch)}{f' ({step.group})' if step.group else ''}", step.method or "n/a",
            _num(step.newly_pruned), _num(step.num_grads) if step.num_grads else "n/a",
            _num(step.predicted_loss_increase, 3), ", ".join(curvature) or "n/a"]


def _latency_section(run: RunData) -> Section | None:
    validation = run.validation
    latency = [lat for lat in validation.latency if lat.pruned.runs_ms] if validation else []
    if validation is None or not latency:
        return None
    section = Section("Latency in ONNX Runtime")
    settings = validation.settings
    section.blocks.append(Paragraph(
        f"{settings.warmup} warm-up and {settings.repeats} timed runs per model; "
        "pruned and dense runs interleaved so machine drift affects both equally."))
    section.blocks.append(Image("latency.png", charts.latency_distribution_chart(latency), "latency distribution"))
    rows = []
    three_way = any(lat.fp32 for lat in latency)  # a quantized run: its FP32 source was timed too
    for lat in latency:
        pruned, dense = lat.pruned, lat.dense
        fp32 = [_num(lat.fp32.p50 if lat.fp32 else None, 4), _num(lat.fp32_ratio_p50, 4)] if three_way else []
        rows.append([str(lat.batch_size), str(lat.threads),
                     *[_num(getattr(pruned, k), 4) for k in ("p50", "p90", "p99")],
                     *[_num(getattr(dense, k) if dense else None, 4) for k in ("p50", "p90", "p99")],
                     _num(lat.ratio_p50, 4), *fp32])
    shipped = "shipped INT8" if three_way else "pruned"
    headers = ["batch", "threads", f"{shipped} p50 ms", "p90", "p99", "dense p50 ms", "p90", "p99", "ratio",
               *(["pruned FP32 p50 ms", "FP32 ratio"] if three_way else [])]
    section.blocks.append(Table(headers, rows))
    env = validation.environment
    if env:
        section.blocks.append(Paragraph(f"onnxruntime {env.get('onnxruntime')} on {env.get('processor')}, "
                                        f"{env.get('cpu_count')} CPUs."))
    return section


def _export_section(run: RunData) -> Section | None:
    if run.export is None:
        return None
    e = run.export.pruned
    ratio = e.file_bytes / e.dense_file_bytes if e.dense_file_bytes else None
    rows = [
        ["file", str(e.path)],
        ["opset", _num(e.opset)],
        ["passes onnx.checker full check", str(e.onnx_full_check)],
        ["storage", f"{e.storage_format} ({len(e.compact_weights)} weights)" if e.storage_format else "dense"],
        ["file size", _size(e.file_bytes) + (f" ({ratio:.3f} x dense storage)" if ratio is not None else "")],
        ["dense-storage twin size", _size(e.dense_file_bytes)],
        ["layer tensors without a PyTorch name", ", ".join(e.generated_names) or "none"],
        ["max |diff| ORT vs PyTorch (sample input)", _num(e.torch_max_abs_diff, 3)],
        ["max |diff| compact vs dense storage in ORT", _num(e.sparse_vs_dense_max_abs_diff, 3)],
    ]
    section = Section("ONNX export")
    section.blocks.append(Table(["item", "value"], rows))
    notes = [*e.notes, *e.sparsity_notes]
    if notes:
        section.blocks.append(Paragraph("Notes: " + "; ".join(str(n) for n in notes)))
    return section


def _evaluations_section(run: RunData) -> Section | None:
    """Every test-set evaluation of the run: when, which model, in which runtime, on which test images."""
    m = run.metrics
    stage = m.evaluations if m is not None and m.evaluations is not None else None
    v = run.validation
    if stage is None and v is None:
        return None
    rows: list[list[str]] = []
    for entry in stage or []:
        rows.append([str(entry.get("label", entry.get("kind", "?"))), str(entry.get("runtime", "PyTorch")),
                     str(entry.get("test_images", "n/a")), _pct(entry.get("accuracy")), _num(entry.get("seconds"), 3)])
    if v is not None and v.test_samples:
        images = f"all {v.test_samples:,} test images"
        rows.append(["validation: the shipped ONNX model", "ONNX Runtime", images, _pct(v.accuracy), "n/a"])
        if v.baseline_accuracy is not None:
            rows.append(["validation: the dense baseline ONNX model", "ONNX Runtime", images,
                         _pct(v.baseline_accuracy), "n/a"])
        if v.fp32_accuracy is not None:
            rows.append(["validation: the FP32 source of the INT8 model", "ONNX Runtime", images,
                         _pct(v.fp32_accuracy), "n/a"])
    if v is not None and v.parity is not None:
        where = (f"the first {v.parity.samples:,} test images" if v.parity.source == "test data"
                 else f"{v.parity.samples:,} {v.parity.source}")
        rows.append([f"validation: logits against {v.parity.reference} (parity)", "ONNX Runtime", where,
                     f"top-1 agreement {_pct(v.parity.top1_agreement)}", "n/a"])
    section = Section("Evaluations")
    monitor = ((run.recipe or {}).get("evaluation") or {}).get("monitor")
    text = ("Every test-set evaluation of the run, in order: which model, in which runtime, on which test images. "
            "The pruning stage measures its starting and final models on the whole test set")
    if monitor == "none":
        text += ("; `evaluation.monitor: none`, so nothing in between (no decision of the run reads those "
                 "accuracies; `pruning_steps`, `epochs` or `all` add them, on the first "
                 "`evaluation.monitor_samples` test images)")
    elif monitor is not None:
        text += f"; `evaluation.monitor: {monitor}` adds the evaluations in between"
    if stage is None:
        text += ". This run's metrics.json lists none of the stage's evaluations (a run made before they were listed)"
    section.blocks.append(Paragraph(text + ". The deployment gates use the ONNX Runtime accuracies."))
    section.blocks.append(Table(["when", "runtime", "test images", "accuracy", "seconds"], rows))
    return section


STAGE_TIMINGS = (("prune_s", "prune"), ("finetune_s", "fine-tune"), ("eval_s", "evaluate"),
                 ("export_s", "export"), ("validate_s", "validate"))


def _time_split_section(run: RunData) -> Section | None:
    timings = run.metrics.timings if run.metrics else None
    if not timings:
        return None
    stages = [(label, float(timings[key])) for key, label in STAGE_TIMINGS if key in timings]
    if not stages:
        return None
    counted = sum(seconds for _, seconds in stages)
    total = run.metrics.total_seconds if run.metrics else None
    if total is not None and total >= counted:
        stages.append(("other", total - counted))
    else:
        total = counted
    section = Section("Time split")
    section.blocks.append(Paragraph(
        "Wall time of the run by stage. Evaluate is the pruning stage's test-set evaluation in PyTorch (the "
        "starting model, the final one and any that evaluation.monitor adds; see Evaluations), validate includes "
        "the ONNX Runtime evaluations; other is set-up, data loading and checkpoints."))
    section.blocks.append(Image("time_split.png", charts.time_split_chart(stages), "time split by stage"))
    rows = [[label, f"{seconds:.1f} s", f"{100 * seconds / total:.1f}%" if total else "n/a"]
            for label, seconds in stages]
    rows.append(["total", f"{total:.1f} s", "100.0%"])
    section.blocks.append(Table(["stage", "seconds", "share"], rows))
    return section


def _arrow(dense: Any, pruned: Any) -> str:
    return f"{_num(dense)} → {_num(pruned)}" if dense is not None else _num(pruned)


def _ratio(dense: Any, pruned: Any) -> str:
    ok = isinstance(dense, (int, float)) and isinstance(pruned, (int, float)) and dense
    return f"{pruned / dense:.3f}" if ok else "n/a"


def _structure_section(run: RunData) -> Section | None:
    if run.export is None:
        return None
    e, dense_export = run.export.pruned, run.export.dense_baseline
    if not e.structure:
        return None
    pruned = from_dict(ModelStats, e.structure, where="export.json pruned.structure")
    if not pruned.layers:
        return None
    dense = (from_dict(ModelStats, dense_export.structure, where="export.json dense_baseline.structure")
             if dense_export and dense_export.structure else None)
    section = Section("Dense vs pruned: channels, parameters, compute")
    totals = [
        ["parameters", dense.params if dense else None, pruned.params],
        ["non-zero parameters", dense.nonzero_params if dense else None, pruned.nonzero_params],
        ["MACs per sample", dense.macs if dense else None, pruned.macs],
        ["FLOPs per sample (2 × MACs)",
         *[2 * v if isinstance(v, int) else None for v in (dense.macs if dense else None, pruned.macs)]],
        ["non-zero MACs per sample", dense.nonzero_macs if dense else None, pruned.nonzero_macs],
        ["ONNX file bytes", dense_export.file_bytes if dense_export else None, e.file_bytes],
    ]
    rows = [[str(label), _num(d), _num(p), _ratio(d, p)] for label, d, p in totals]
    for lat in run.validation.latency if run.validation else []:
        dense_p50 = lat.dense.p50 if lat.dense else None
        rows.append([f"ORT p50 latency, batch {lat.batch_size} (ms)", _num(dense_p50), _num(lat.pruned.p50),
                     _ratio(dense_p50, lat.pruned.p50)])
    section.blocks.append(Table(["", "dense", "pruned", "pruned / dense"], rows))

    dense_layers = {layer.name: layer for layer in (dense.layers if dense else [])}
    pruned_layers = {layer.name: layer for layer in pruned.layers}
    names = list(dict.fromkeys([*dense_layers, *pruned_layers]))

    def out_channels(layers: dict[str, LayerStats], name: str) -> int | None:
        return layers[name].out_channels if name in layers else None

    narrower = [n for n in names if n in dense_layers
                and out_channels(pruned_layers, n) != dense_layers[n].out_channels]
    if not dense_layers:
        summary = "No dense baseline structure in export.json: the pruned model only."
    elif narrower:
        summary = f"{len(narrower)} of {len(names)} layers have fewer output channels than in the dense model."
    else:
        summary = ("No layer lost channels: the sparsity is unstructured, so shapes, parameters and MACs are the "
                   "dense model's and only the non-zero counts fall.")
    section.blocks.append(Paragraph(summary + " Counts are read from the two ONNX files (BatchNorm folded into the "
                                    "convolutions; MACs of conv and linear layers per input sample)."))
    if narrower:
        section.blocks.append(Image("channels_per_layer.png", charts.channels_per_layer_chart(
            names, [out_channels(dense_layers, n) for n in names],
            [out_channels(pruned_layers, n) for n in names]), "channels per layer, dense vs pruned"))
    table = []
    for name in names:
        d, p = dense_layers.get(name), pruned_layers.get(name)
        dense_out, dense_params, dense_macs = (d.out_channels, d.params, d.macs) if d else (None, None, None)
        if p is None:
            table.append([name, _arrow(dense_out, 0), _arrow(dense_params, 0), "0", _arrow(dense_macs, 0), "0"])
            continue
        table.append([name, _arrow(dense_out, p.out_channels), _arrow(dense_params, p.params),
                      _num(p.nonzero_params), _arrow(dense_macs, p.macs), _num(p.nonzero_macs)])
    headers = ["layer", "out channels", "parameters", "non-zero parameters", "MACs", "non-zero MACs"]
    section.blocks.append(Table(headers, table))
    return section


def _environment_section(run: RunData) -> Section | None:
    env = run.environment
    if not env:
        return None
    keys = ("wf_pipeline", "git_commit", "seed", "torch", "onnx", "onnxruntime", "python", "platform", "cpu_count")
    rows = [[key, str(env[key])] for key in keys if key in env]
    return Section("Environment", [Table(["item", "value"], rows)]) if rows else None


def build_sections(run: RunData) -> list[Section]:
    builders = [
        ("gates", _gates_section, "validation/validation.json missing: no gate results or latency"),
        ("sparsity", _sparsity_section, "no per-layer sparsity (metrics.json / export/export.json missing)"),
        ("oneshot", _oneshot_section, "no oneshot/oneshot.json: accuracy-vs-sparsity chart left out"),
        ("training", _training_section, "no history.jsonl records: training curves left out"),
        ("evaluations", _evaluations_section, None),
        ("latency", _latency_section, None),
        ("structure", _structure_section, None),
        ("time split", _time_split_section, "no stage timings in metrics.json: time split left out"),
        ("export", _export_section, "export/export.json missing: export details left out"),
        ("environment", _environment_section, "environment.json missing"),
    ]
    sections = [_summary_section(run)]
    for _, builder, missing_note in builders:
        try:
            section = builder(run)
        except (KeyError, TypeError, ValueError) as exc:  # a malformed file must not sink the whole report
            run.notes.append(f"{builder.__name__.strip('_').replace('_section', '')} section left out: {exc!r}")
            continue
        if section is not None:
            sections.append(section)
        elif missing_note:
            run.notes.append(missing_note)
    return sections


# ---------------------------------------------------------------------------------------------- rendering

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.6em 0;font-size:.9em}
th,td{border:1px solid #ccc;padding:.3em .6em;text-align:left}
th{background:#f4f4f4}img{max-width:100%;height:auto}.passed{color:#1a7f37;font-weight:600}
.failed{color:#cf222e;font-weight:600}.skipped{color:#9a6700;font-weight:600}.notes{color:#555;font-size:.9em}
"""


def _inline_markdown_to_html(text: str) -> str:
    """Escape, then turn **bold** and `code` into tags (the only markup the blocks use)."""
    parts = html.escape(text).split("**")
    text = "".join(f"<strong>{p}</strong>" if i % 2 else p for i, p in enumerate(parts))
    parts = text.split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _cell_html(text: str) -> str:
    cls = {"PASSED": "passed", "FAILED": "failed", "SKIPPED": "skipped"}.get(text)
    return f'<td class="{cls}">{html.escape(text)}</td>' if cls else f"<td>{html.escape(text)}</td>"


def render_html(title: str, sections: list[Section], notes: list[str]) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{html.escape(title)}</title>",
           f"<style>{_CSS}</style></head><body>", f"<h1>{html.escape(title)}</h1>"]
    for section in sections:
        out.append(f"<h2>{html.escape(section.title)}</h2>")
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out.append(f"<p>{_inline_markdown_to_html(block.text)}</p>")
            elif isinstance(block, Table):
                head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
                body = "".join("<tr>" + "".join(_cell_html(c) for c in row) + "</tr>" for row in block.rows)
                out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
            elif isinstance(block, Image):
                data = base64.b64encode(block.png).decode("ascii")
                out.append(f'<p><img alt="{html.escape(block.alt)}" src="data:image/png;base64,{data}"></p>')
    if notes:
        items = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        out.append(f'<h2>Left out</h2><ul class="notes">{items}</ul>')
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def _md_cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render_markdown(title: str, sections: list[Section], notes: list[str]) -> str:
    out = [f"# {title}", ""]
    for section in sections:
        out += [f"## {section.title}", ""]
        for block in section.blocks:
            if isinstance(block, Paragraph):
                out += [block.text, ""]
            elif isinstance(block, Table):
                out.append("| " + " | ".join(_md_cell(h) for h in block.headers) + " |")
                out.append("|" + "---|" * len(block.headers))
                out += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in block.rows]
                out.append("")
            elif isinstance(block, Image):
                out += [f"![{block.alt}]({ASSETS_DIR}/{block.name})", ""]
    if notes:
        out += ["## Left out", "", *[f"- {n}" for n in notes], ""]
    return "\n".join(out)


def write_report(run_dir: Path) -> Path:
    """Write <run_dir>/report.html (self-contained) and report.md (+ report_files/*.png); return the HTML path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise WFError(f"run directory not found: {run_dir}", hint="give a folder under artifacts/")
    run = load_run(run_dir)
    sections = build_sections(run)
    name = (run.recipe or {}).get("name") or run_dir.name
    title = f"wf-pipeline report: {name}"
    generated = time.strftime("%Y-%m-%d %H:%M:%S")
    sections[0].blocks.insert(0, Paragraph(f"Run directory `{run_dir}`, report generated {generated}."))
    html_path = run_dir / "report.html"
    try:
        for section in sections:
            for block in section.blocks:
                if isinstance(block, Image):
                    atomic_io.write_bytes(run_dir / ASSETS_DIR / block.name, block.png)
        atomic_io.write_text(run_dir / "report.md", render_markdown(title, sections, run.notes))
        atomic_io.write_text(html_path, render_html(title, sections, run.notes))
    except OSError as exc:
        raise WFError(f"cannot write the report into {run_dir}: {exc.strerror or exc}",
                      hint="check that the run directory is writable") from exc
    return html_path
