"""Reading the fields of one SparseML modifier, and keeping account of the translation.

A translation collects three things as it reads a recipe: *problems* (everything that stops it, all
reported together at the end, each with its place and its fix), *records* (what every SparseML field
became, was defaulted to, or why it was ignored: the header of a converted recipe) and *notes* (choices
worth telling the user on every run).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

from wf_pipeline.errors import RecipeError

LOGGING_ONLY_FIELDS = frozenset({"log_types", "constant_logging"})

Outcome = Literal["became", "defaulted", "ignored"]


@dataclass(frozen=True)
class Problem:
    """One reason the recipe cannot be translated: where, what, and how to fix it."""

    where: str
    message: str
    fix: str


@dataclass(frozen=True)
class Record:
    """What one SparseML field turned into (or why it was left out)."""

    source: str  # e.g. "pruning_modifiers[0] !GMPruningModifier.update_frequency"
    value: str  # the SparseML value as written after evaluation, or "(not set)"
    outcome: Outcome
    detail: str  # "pruning.schedule.frequency = 0.5", or why it was ignored


class SparseMLRecipeError(RecipeError):
    """Every problem found in a SparseML recipe, reported in one error."""

    def __init__(self, problems: list[Problem]) -> None:
        self.problems = list(problems)
        if len(problems) == 1:
            only = problems[0]
            super().__init__(f"SparseML {only.where}: {only.message}", hint=only.fix)
            return
        listed = "; ".join(f"({n}) {p.where}: {p.message} -> fix: {p.fix}" for n, p in enumerate(problems, 1))
        super().__init__(
            f"SparseML recipe has {len(problems)} problems: {listed}",
            hint="fix every problem listed, then run again",
        )


class StopModifier(Exception):
    """Raised inside a modifier's parser once a problem makes the rest of it meaningless."""


@dataclass
class Context:
    """State shared by everything that reads one recipe."""

    variables: dict[str, Any]
    allow_rounding: bool = False
    notes: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    records: list[Record] = field(default_factory=list)

    def problem(self, where: str, message: str, fix: str) -> None:
        item = Problem(where, message, fix)
        if item not in self.problems:
            self.problems.append(item)

    def note(self, text: str) -> None:
        if text not in self.notes:
            self.notes.append(text)


_MISSING: Any = object()


def show(value: Any) -> str:
    """A SparseML value as the header shows it (short, one line)."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 120 else text[:117] + "..."


class Modifier:
    """One tagged modifier: typed access to its (already evaluated) fields, with our error messages."""

    def __init__(self, tag: str, location: str, fields: dict[str, Any], ctx: Context) -> None:
        self.tag = tag
        self.location = location
        self.fields = fields
        self.ctx = ctx

    @property
    def label(self) -> str:
        return f"!{self.tag} ({self.location})"

    def where(self, field_name: str | None = None) -> str:
        return f"{self.label} field '{field_name}'" if field_name else self.label

    def source(self, field_name: str) -> str:
        return f"{self.location} !{self.tag}.{field_name}"

    # ---------------------------------------------------------------- problems
    def problem(self, field_name: str | None, message: str, fix: str) -> None:
        """Record a problem and go on reading the modifier."""
        self.ctx.problem(self.where(field_name), message, fix)

    def stop(self, field_name: str | None, message: str, fix: str) -> StopModifier:
        """Record a problem and return the exception that abandons this modifier (``raise mod.stop(...)``)."""
        self.problem(field_name, message, fix)
        return StopModifier()

    # ---------------------------------------------------------------- records
    def became(self, field_name: str, detail: str) -> None:
        self._record(field_name, "became", detail)

    def defaulted(self, field_name: str, detail: str) -> None:
        self.ctx.records.append(Record(self.source(field_name), "(not set)", "defaulted", detail))

    def ignored(self, field_name: str, why: str) -> None:
        self._record(field_name, "ignored", why)

    def _record(self, field_name: str, outcome: Outcome, detail: str) -> None:
        value = show(self.fields[field_name]) if field_name in self.fields else "(not set)"
        self.ctx.records.append(Record(self.source(field_name), value, outcome, detail))

    def unrecorded_fields(self) -> list[str]:
        prefix = f"{self.location} !{self.tag}."
        seen = {r.source[len(prefix) :] for r in self.ctx.records if r.source.startswith(prefix)}
        return [name for name in self.fields if name not in seen]

    # ---------------------------------------------------------------- reading
    def check_fields(self, required: Iterable[str], optional: Iterable[str]) -> None:
        """Unknown fields and missing required ones are problems (all of them); logging fields are ignored."""
        required, optional = set(required), set(optional)
        known = required | optional | LOGGING_ONLY_FIELDS
        supported = ", ".join(sorted(required | optional))
        for name in self.fields:
            if name not in known:
                self.problem(
                    name,
                    "is not supported by the wf-pipeline translation",
                    f"remove it; supported fields of !{self.tag}: {supported}",
                )
        missing = sorted(name for name in required if name not in self.fields)
        for name in missing:
            self.problem(name, "is required but missing", f"add '{name}:' to the modifier")
        for name in sorted(LOGGING_ONLY_FIELDS & set(self.fields)):
            self.ignored(name, "logging only")
        if missing or any(name not in known for name in self.fields):
            raise StopModifier()

    def has(self, name: str) -> bool:
        return name in self.fields

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.fields:
            return self.fields[name]
        if default is _MISSING:
            raise self.stop(name, "is required but missing", f"add '{name}:' to the modifier")
        return default

    def deref(self, value: Any) -> Any:
        if isinstance(value, str) and value in self.ctx.variables:
            return self.ctx.variables[value]  # a bare reference to a recipe variable
        return value

    def number(self, name: str, default: Any = _MISSING) -> float:
        value = self.deref(self.raw(name, default))
        if isinstance(value, bool):
            raise self.stop(name, f"expected a number, got {value}", "give a number")
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-7' as a string; SparseML converts it with float()
                value = float(value)
            except ValueError:
                raise self.stop(name, f"expected a number, got {value!r}", "give a number") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.stop(name, f"expected a finite number, got {value!r}", "give a number")
        return value

    def integer(self, name: str, default: Any = _MISSING) -> int:
        value = self.number(name, default)
        if value != int(value):
            raise self.stop(name, f"expected a whole number, got {value}", f"use e.g. {int(value)}")
        return int(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.deref(self.raw(name, default))
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # SparseML's convert_to_bool accepts strings
        if not isinstance(value, bool):
            raise self.stop(name, f"expected true or false, got {value!r}", "use true or false")
        return value

    def string(self, name: str, default: Any = _MISSING) -> str:
        value = self.deref(self.raw(name, default))
        if not isinstance(value, str):
            raise self.stop(name, f"expected a string, got {value!r}", "give a string")
        return value

    def epoch(self, name: str, default: Any = _MISSING) -> float:
        """An epoch boundary; SparseML's -1 ('from the start' / 'until the end') stays -1."""
        value = float(self.number(name, default))
        if value < 0 and value != -1:
            raise self.stop(name, f"negative epoch {value} is not supported", "use an epoch >= 0 (or -1)")
        return value
