"""What a pruning step reports: :class:`PruneReport` (every method) and :class:`StepDetails` (per method).

:func:`wf_pipeline.pruning.step.prune_step` returns a PruneReport; its pruner fills the StepDetails on the
step's context (set fields, not string keys). ``to_dict()`` writes the JSON the run files have always held
(the details under ``"extra"``, only the fields that were set), and ``from_dict()`` reads it back, older
files included: a key that is missing reads as None (or the field's default).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from wf_pipeline.fisher.conditioning import InverseHealth

DETAILS_KEY = "extra"  # the JSON key of PruneReport.details (the report's former free dict)


class ReportFormatError(ValueError):
    """A prune report's JSON value that does not fit its field: names the field and what was found."""


@dataclass
class StepDetails:
    """What the step's method recorded beyond the common fields; None = not recorded by this method."""

    fisher_plan: dict[str, Any] | None = None  # WoodFisher: the memory plan (FisherPlan.to_dict(), groups counted)
    fisher_plan_summary: str | None = None  # WoodFisher: the plan in one log line
    num_blocks: int | None = None  # Fisher blocks of the step (summed over layers for channel pruning)
    block_sizes: list[int] | None = None  # channel pruning: the distinct Fisher block sizes
    route: str | None = None  # how the curvature was computed: a Fisher route, "diagonal" or "kfac"
    gradient_engine: str | None = None  # how the per-sample gradients were computed
    nonfinite_skipped: int | None = None  # non-finite gradients skipped and replaced (set only when some were)
    fisher_dtype: str | None = None  # dtype of the Fisher statistics ("float32", "float64")
    fisher_health: InverseHealth | None = None  # the inverse's promotions and repairs, summed over sub-steps
    repaired_blocks: int | None = None  # fisher_health's repaired blocks (retried + jittered)
    warnings: list[str] | None = None  # one line per kind of repair (empty when nothing was repaired)
    sub_steps: int | None = None  # Fisher recomputations in the step (gradient-based methods)

    def add_skipped(self, count: int) -> None:
        """Count non-finite gradients skipped (the field stays None while none are)."""
        if count:
            self.nonfinite_skipped = (self.nonfinite_skipped or 0) + count

    def record_health(self, health: InverseHealth) -> None:
        """Fold an inverse's health in (summed over sub-steps), with its repaired blocks and warning lines."""
        if self.fisher_health is not None:
            health = self.fisher_health.merge(health)
        self.fisher_health = health
        self.repaired_blocks = health.repaired_blocks
        self.warnings = health.warnings()

    def to_dict(self) -> dict[str, Any]:
        """The JSON object: the fields that were set, under their names."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            out[f.name] = value.to_dict() if isinstance(value, InverseHealth) else _copy(value)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = DETAILS_KEY) -> StepDetails:
        """Read `to_dict()`'s object back; missing keys read as None, unknown keys are left aside."""
        data = _mapping(data, where)
        health = data.get("fisher_health")
        return cls(
            fisher_plan=_optional(data, "fisher_plan", dict, where),
            fisher_plan_summary=_optional(data, "fisher_plan_summary", str, where),
            num_blocks=_optional(data, "num_blocks", int, where),
            block_sizes=_optional_list(data, "block_sizes", int, where),
            route=_optional(data, "route", str, where),
            gradient_engine=_optional(data, "gradient_engine", str, where),
            nonfinite_skipped=_optional(data, "nonfinite_skipped", int, where),
            fisher_dtype=_optional(data, "fisher_dtype", str, where),
            fisher_health=None if health is None else _health(health, f"{where}.fisher_health"),
            repaired_blocks=_optional(data, "repaired_blocks", int, where),
            warnings=_optional_list(data, "warnings", str, where),
            sub_steps=_optional(data, "sub_steps", int, where),
        )


@dataclass
class PruneReport:
    """What a pruning step did. ``timings`` are seconds: gradients, inverse, obs, total (and, for the
    gradient-based methods, accumulate: the part of inverse spent folding gradients into statistics)."""

    target_sparsity: float
    achieved_sparsity: float
    per_layer_sparsity: dict[str, float]
    timings: dict[str, float]
    num_grads: int
    predicted_loss_increase: float | None
    method: str = ""
    newly_pruned: int = 0
    details: StepDetails = field(default_factory=StepDetails)  # JSON key "extra"
    # Layers with every weight pruned after this step (layer collapse: the network is cut there).
    fully_pruned: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """The JSON object, in field order; the details under ``"extra"``."""
        return {
            "target_sparsity": self.target_sparsity,
            "achieved_sparsity": self.achieved_sparsity,
            "per_layer_sparsity": dict(self.per_layer_sparsity),
            **step_fields_to_dict(self),
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "prune report") -> PruneReport:
        data = _mapping(data, where)
        return cls(
            target_sparsity=_required(data, "target_sparsity", float, where),
            achieved_sparsity=_required(data, "achieved_sparsity", float, where),
            per_layer_sparsity=_optional_dict(data, "per_layer_sparsity", float, where) or {},
            **step_fields_from_dict(data, where),
        )

    def notices(self) -> list[str]:
        """What the step repaired or skipped, one line each (Fisher blocks redone in float64 or given extra
        damping, non-finite gradients left out): every command shows them and every run file records them."""
        return step_notices(self.details)


def step_notices(details: StepDetails) -> list[str]:
    """PruneReport.notices() of a step with these details."""
    lines = list(details.warnings or [])
    if details.nonfinite_skipped:
        lines.append(f"Fisher gradients: {details.nonfinite_skipped} non-finite gradient(s) skipped and replaced by "
                     "other samples (pruning.woodfisher.nonfinite: skip)")
    return lines


class StepFields(Protocol):
    """The PruneReport fields after the sparsities, shared with the stage's record of a step (metrics.json)."""

    timings: dict[str, float]
    num_grads: int
    predicted_loss_increase: float | None
    method: str
    newly_pruned: int
    details: StepDetails
    fully_pruned: list[str]


def step_fields_to_dict(report: StepFields) -> dict[str, Any]:
    """timings ... fully_pruned of a report or record, as PruneReport.to_dict() writes them."""
    return {
        "timings": dict(report.timings),
        "num_grads": report.num_grads,
        "predicted_loss_increase": report.predicted_loss_increase,
        "method": report.method,
        "newly_pruned": report.newly_pruned,
        DETAILS_KEY: report.details.to_dict(),
        "fully_pruned": list(report.fully_pruned),
    }


def step_fields_from_dict(data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """timings ... fully_pruned read back as keyword arguments; missing keys take the fields' defaults."""
    return {
        "timings": _optional_dict(data, "timings", float, where) or {},
        "num_grads": _optional(data, "num_grads", int, where) or 0,
        "predicted_loss_increase": _optional(data, "predicted_loss_increase", float, where),
        "method": _optional(data, "method", str, where) or "",
        "newly_pruned": _optional(data, "newly_pruned", int, where) or 0,
        "details": StepDetails.from_dict(data.get(DETAILS_KEY) or {}, f"{where}.{DETAILS_KEY}"),
        "fully_pruned": _optional_list(data, "fully_pruned", str, where) or [],
    }


# ---------------------------------------------------------------------------------------------- JSON checks


def _copy(value: Any) -> Any:
    return dict(value) if isinstance(value, dict) else list(value) if isinstance(value, list) else value


def _mapping(data: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(data, Mapping):
        raise ReportFormatError(f"{where}: expected an object, found {type(data).__name__}")
    return data


def _fits(value: Any, kind: type) -> bool:
    if isinstance(value, bool) and kind is not bool:
        return False
    if kind is float:
        return isinstance(value, (int, float))
    return isinstance(value, kind)


def _check(value: Any, kind: type, where: str) -> Any:
    if not _fits(value, kind):
        raise ReportFormatError(f"{where}: expected {kind.__name__}, found {type(value).__name__}")
    return value  # a whole number stays as written (ints count as floats), so a round trip writes the same JSON


def _required(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    if key not in data:
        raise ReportFormatError(f"{where}.{key}: missing")
    return _check(data[key], kind, f"{where}.{key}")


def _optional(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = data.get(key)
    return None if value is None else _check(value, kind, f"{where}.{key}")


def _optional_list(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = _optional(data, key, list, where)
    return None if value is None else [_check(v, kind, f"{where}.{key}[{i}]") for i, v in enumerate(value)]


def _optional_dict(data: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    value = _optional(data, key, dict, where)
    return None if value is None else {k: _check(v, kind, f"{where}.{key}[{k!r}]") for k, v in value.items()}


def _health(data: Any, where: str) -> InverseHealth:
    data = _mapping(data, where)
    for key in ("damp", "rtol"):
        _required(data, key, float, where)
    try:
        return InverseHealth.from_dict(dict(data))
    except TypeError as exc:
        raise ReportFormatError(f"{where}: {exc}") from exc
