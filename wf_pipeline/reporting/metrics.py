"""RunMetrics: what a run measured, as the stages hand it to the report and the CLI (metrics.json).

One typed object instead of a dict read back by string keys. `to_dict()` gives exactly the keys
metrics.json has always had, and `from_dict()` reads any metrics.json (older runs, dense-training runs,
keys added later): keys it does not know, or whose value has an unexpected type, are kept in `extra`
and written back unchanged, so a round trip never loses anything.

The pruning stage and the pipeline produce it; reporting reads it. Its prune_reports are typed
:class:`PruneStepRecord` entries built on the pruning step's own report
(:mod:`wf_pipeline.pruning.step_report`); besides that, this module imports nothing from the stages.
"""
from __future__ import annotations

import functools
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Union, get_args, get_origin, get_type_hints

from wf_pipeline.pruning.step_report import (
    PruneReport,
    ReportFormatError,
    StepDetails,
    step_fields_from_dict,
    step_fields_to_dict,
    step_notices,
)

# Keys the pruning stage always writes, null included (e.g. target_sparsity of a grouped recipe).
STAGE_KEYS = (
    "method", "structure", "initial_accuracy", "final_accuracy", "evaluations", "target_sparsity", "sparsity",
    "model_sparsity",
    "pruned_params", "prunable_params", "per_layer_sparsity", "schedule", "prune_reports", "epochs",
    "steps_per_epoch", "world_size", "timings", "resumed", "resumed_from", "notes", "checkpoint",
)


@dataclass
class RunMetrics:
    """Run metrics of `compress` (pruning stage + pipeline) and `train` (dense training).

    None means "not measured in this run"; such keys are left out of metrics.json, except the pruning
    stage's keys, which a run with a stage (``method`` set) always writes.
    """

    dense_accuracy: float | None = None  # PyTorch test accuracy of the starting model
    # --- the pruning stage
    method: str | None = None
    structure: str | None = None  # unstructured | channel
    initial_accuracy: float | None = None
    final_accuracy: float | None = None  # PyTorch test accuracy at the end (whole test set)
    # the stage's test-set evaluations, in order: {kind (start | prune | epoch | end), label, epoch, event,
    # runtime, samples, test_images (in words), accuracy, seconds}; evaluation.monitor decides the ones between
    evaluations: list[dict[str, Any]] | None = None
    target_sparsity: float | None = None  # None with pruning groups (several targets) or method none
    sparsity: float | None = None  # achieved, over the prunable weights (channels with channel structure)
    model_sparsity: float | None = None  # zeros over all parameters
    pruned_params: int | None = None
    prunable_params: int | None = None
    per_layer_sparsity: dict[str, float] | None = None
    schedule: list[dict[str, Any]] | None = None  # {epoch, optimizer_step, target_sparsity[, group]}
    prune_reports: list[PruneStepRecord] | None = None  # one per pruning step, as the pruner reports it
    epochs: int | None = None
    steps_per_epoch: int | None = None
    world_size: int | None = None
    timings: dict[str, float] | None = None  # seconds by stage: prune_s, finetune_s, eval_s, export_s, ...
    resumed: bool | None = None
    resumed_from: list[dict[str, Any]] | None = None
    notes: list[str] | None = None
    checkpoint: str | None = None
    # --- the pipeline
    num_params: int | None = None
    channel_surgery: dict[str, Any] | None = None  # channels cut out before export (channel structure)
    onnx: str | None = None  # the exported model
    gates_passed: bool | None = None  # None when validation did not run
    total_seconds: float | None = None
    # --- dense training
    train_seconds: float | None = None
    # Keys this version does not know, and known keys whose value has an unexpected type: kept as read.
    extra: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RunMetrics:
        """Read a metrics.json mapping. Never raises for content: odd values land in `extra`."""
        hints = _field_types()
        known: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        for key, value in data.items():
            if key in _READERS and key in hints:
                try:
                    known[key] = _READERS[key](value)
                except ReportFormatError:
                    extra[key] = value
            elif key in hints and _matches(value, hints[key]):
                known[key] = value
            else:
                extra[key] = value
        return cls(**known, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The metrics.json mapping: the keys that were measured, in a fixed order, then `extra`."""
        out: dict[str, Any] = {}
        for name in _field_types():
            value = getattr(self, name)
            if value is not None or (name in STAGE_KEYS and self.method is not None):
                out[name] = _WRITERS[name](value) if name in _WRITERS and value is not None else value
        out.update(self.extra)
        return out

    @property
    def ignored_keys(self) -> list[str]:
        """Known keys read with a value of the wrong type (kept in `extra`, not in the typed field)."""
        hints = _field_types()
        return [key for key in self.extra if key in hints]

    def add_timing(self, key: str, seconds: float) -> None:
        """Record a stage's wall time (e.g. export_s) beside the pruning stage's timings."""
        if self.timings is None:
            self.timings = {}
        self.timings[key] = seconds


@dataclass
class PruneStepRecord:
    """One metrics.json prune_reports entry: where a pruning step ran, the accuracy right after it and the
    step's PruneReport less its per-layer sparsity (details under "extra", as PruneReport.to_dict() has them)."""

    epoch: float  # fractional with fractional schedules
    optimizer_step: int | None = None
    event: int | None = None  # the step's index in the stage's plan
    group: str | None = None  # only with several pruning groups
    # on the monitor slice (the whole test set after the last step); None where evaluation.monitor skips it
    test_accuracy_after: float | None = None
    target_sparsity: float | None = None
    achieved_sparsity: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: gradients, inverse, obs, total, ...
    num_grads: int = 0  # gradients in the Fisher statistics (all ranks)
    predicted_loss_increase: float | None = None  # None where the method does not predict it
    method: str = ""
    newly_pruned: int = 0  # weights (or channel entries) pruned by this step
    details: StepDetails = field(default_factory=StepDetails)  # per method: Fisher route, dtype, health, plan
    fully_pruned: list[str] = field(default_factory=list)  # layers left with no weight (layer collapse)

    @classmethod
    def of(cls, report: PruneReport, *, epoch: float, optimizer_step: int | None, event: int | None,
           group: str | None, test_accuracy_after: float | None) -> PruneStepRecord:
        return cls(epoch=epoch, optimizer_step=optimizer_step, event=event, group=group,
                   test_accuracy_after=test_accuracy_after, target_sparsity=report.target_sparsity,
                   achieved_sparsity=report.achieved_sparsity, timings=dict(report.timings),
                   num_grads=report.num_grads, predicted_loss_increase=report.predicted_loss_increase,
                   method=report.method, newly_pruned=report.newly_pruned, details=report.details,
                   fully_pruned=list(report.fully_pruned))

    def to_dict(self) -> dict[str, Any]:
        """The entry as metrics.json has always held it (``group`` only with several pruning groups)."""
        out: dict[str, Any] = {"epoch": self.epoch, "optimizer_step": self.optimizer_step, "event": self.event}
        if self.group is not None:
            out["group"] = self.group
        out.update(test_accuracy_after=self.test_accuracy_after, target_sparsity=self.target_sparsity,
                   achieved_sparsity=self.achieved_sparsity, **step_fields_to_dict(self))
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "prune_reports entry") -> PruneStepRecord:
        """Read an entry back; keys an older run did not write take the fields' defaults (None).

        Raises ReportFormatError (naming the key) for a value of the wrong type or a missing epoch.
        """
        if not isinstance(data, Mapping):
            raise ReportFormatError(f"{where}: expected an object, found {type(data).__name__}")
        hints = get_type_hints(cls)
        values: dict[str, Any] = {}
        for name in ("epoch", "optimizer_step", "event", "group", "test_accuracy_after", "target_sparsity",
                     "achieved_sparsity"):
            if name not in data:
                if name == "epoch":
                    raise ReportFormatError(f"{where}.epoch: missing")
                continue
            if not _matches(data[name], hints[name]):
                raise ReportFormatError(f"{where}.{name}: unexpected value {data[name]!r:.40}")
            values[name] = data[name]
        return cls(**values, **step_fields_from_dict(data, where))

    def notices(self) -> list[str]:
        """The step's repairs and skips, one line each (as PruneReport.notices())."""
        return step_notices(self.details)


def _read_prune_reports(value: Any) -> list[PruneStepRecord] | None:
    if value is None:
        return None
    if not isinstance(value, list):
        raise ReportFormatError(f"prune_reports: expected a list, found {type(value).__name__}")
    return [PruneStepRecord.from_dict(item, f"prune_reports[{i}]") for i, item in enumerate(value)]


# Fields held as typed records: how metrics.json's value is read into them and written back.
_READERS: dict[str, Callable[[Any], Any]] = {"prune_reports": _read_prune_reports}
_WRITERS: dict[str, Callable[[Any], Any]] = {"prune_reports": lambda records: [r.to_dict() for r in records]}


@functools.cache
def _field_types() -> dict[str, Any]:
    """The serialised fields in declaration order, with their resolved types (`extra` excluded)."""
    hints = get_type_hints(RunMetrics)
    return {f.name: hints[f.name] for f in fields(RunMetrics) if f.name != "extra"}


def _matches(value: Any, annotation: Any) -> bool:
    """Whether a JSON value fits a field's annotation (ints count as floats, bools as neither)."""
    origin = get_origin(annotation)
    if origin in (Union, types.UnionType):
        return any(_matches(value, arg) for arg in get_args(annotation))
    if annotation is Any:
        return True
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if origin is list:
        (item,) = get_args(annotation)
        return isinstance(value, list) and all(_matches(v, item) for v in value)
    if origin is dict:
        key_type, value_type = get_args(annotation)
        return isinstance(value, dict) and all(_matches(k, key_type) and _matches(v, value_type)
                                               for k, v in value.items())
    return isinstance(value, annotation)


# ---------------------------------------------------------------------------------------------- history.jsonl


@dataclass
class EpochRecord:
    """One history.jsonl line after an epoch of dense training or fine-tuning.

    The writers fill every measured field; the reader (the report) also takes lines of older or partial
    runs, so only the epoch is required.
    """

    epoch: int
    train_loss: float | None = None
    train_accuracy: float | None = None
    # on the monitor slice during a stage, the whole test set at its end; None where evaluation.monitor skips it
    test_accuracy: float | None = None
    test_loss: float | None = None  # dense training only
    sparsity: float | None = None
    lr: float | None = None
    elapsed_s: float | None = None
    kind: str = "epoch"

    def to_dict(self) -> dict[str, Any]:
        return _history_line(self)


@dataclass
class PruneRecord:
    """One history.jsonl line after a pruning step (one per group and step with pruning groups)."""

    epoch: float  # fractional with fractional schedules
    optimizer_step: int | None = None
    event: int | None = None
    group: str | None = None  # only with several pruning groups
    target_sparsity: float | None = None
    achieved_sparsity: float | None = None
    test_accuracy_after: float | None = None
    timings: dict[str, float] = field(default_factory=dict)  # seconds: gradients, inverse, obs, total, ...
    method: str | None = None
    num_grads: int | None = None
    fisher_plan: dict[str, Any] | None = None  # WoodFisher steps: the memory plan the step ran under
    warnings: list[str] = field(default_factory=list)  # Fisher repairs (float64 retries, added damping)
    kind: str = "prune"

    def to_dict(self) -> dict[str, Any]:
        return _history_line(self)


def _history_line(record: EpochRecord | PruneRecord) -> dict[str, Any]:
    """The JSON object of a history line: `kind` first, fields that were not measured left out."""
    out: dict[str, Any] = {"kind": record.kind}
    for f in fields(record):
        value = getattr(record, f.name)
        if f.name != "kind" and value is not None and value != [] and not (f.name == "timings" and value == {}):
            out[f.name] = value
    return out
