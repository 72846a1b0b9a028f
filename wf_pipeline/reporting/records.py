"""Run-directory JSON read back into the typed results that wrote it.

``validation/validation.json`` is ``ValidationResult.to_dict()`` and ``export/export.json`` holds
``ExportResult.to_dict()`` records: the report reads them back into those same dataclasses (nested ones
included: latency, gates, parity), so it uses attributes that mypy checks, not string keys, and a renamed
field is an error in the gate, not an empty report cell. :func:`from_dict` rebuilds any such dataclass
from its field types; keys a writer adds beside the fields (``passed``, ``status``, ``size_ratio``) are
left aside.
"""
from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from wf_pipeline.deploy.export import ExportResult
from wf_pipeline.deploy.validate import ValidationResult

T = TypeVar("T")


class RecordError(ValueError):
    """A JSON record that does not fit its dataclass: names the field and what was found."""


def from_dict(cls: type[T], data: Any, *, strict: bool = False, where: str = "") -> T:
    """`cls` (a dataclass) rebuilt from `data` (its ``to_dict()``, after a JSON round trip).

    Values are converted by the field's type (nested dataclasses, lists, dicts, ``X | None``, ``Path``).
    A field missing from `data` takes its default; with ``strict=True`` (or without a default) a missing
    field is a :class:`RecordError`, so a writer that renames a key fails here.
    """
    where = where or cls.__name__
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls!r} is not a dataclass")
    if not isinstance(data, dict):
        raise RecordError(f"{where}: expected an object, found {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if f.name not in data:
            has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
            if strict or not has_default:
                raise RecordError(f"{where}.{f.name}: missing")
            continue
        values[f.name] = _convert(hints[f.name], data[f.name], f"{where}.{f.name}", strict)
    return cls(**values)


def _convert(hint: Any, value: Any, where: str, strict: bool) -> Any:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for member in (a for a in args if a is not type(None)):
            try:
                return _convert(member, value, where, strict)
            except RecordError as exc:
                errors.append(str(exc))
        raise RecordError(errors[0] if len(errors) == 1 else f"{where}: fits none of {hint} ({'; '.join(errors)})")
    if isinstance(hint, type) and dataclasses.is_dataclass(hint):
        return from_dict(hint, value, strict=strict, where=where)
    if origin is list:
        if not isinstance(value, list):
            raise RecordError(f"{where}: expected a list, found {type(value).__name__}")
        return [_convert(args[0], item, f"{where}[{i}]", strict) for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecordError(f"{where}: expected an object, found {type(value).__name__}")
        return {k: _convert(args[1], v, f"{where}[{k!r}]", strict) for k, v in value.items()}
    if origin is typing.Literal:
        if value not in args:
            raise RecordError(f"{where}: {value!r} is not one of {args}")
        return value
    if hint is Path:
        if not isinstance(value, str):
            raise RecordError(f"{where}: expected a path, found {type(value).__name__}")
        return Path(value)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecordError(f"{where}: expected a number, found {type(value).__name__}")
        return float(value)
    if hint in (int, str, bool):
        if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
            raise RecordError(f"{where}: expected {hint.__name__}, found {type(value).__name__}")
        return value
    raise RecordError(f"{where}: cannot read a {hint!r} from JSON")  # a field type this reader does not know


@dataclass
class ExportRecord:
    """export/export.json: the pruned model's export and the dense baseline's, as exported."""

    pruned: ExportResult
    dense_baseline: ExportResult | None = None
    shipped: str | None = None  # the file that ships (the INT8 one when quantized)
    shipped_format: str | None = None  # "fp32" | "int8-qdq"
    extra: dict[str, Any] = field(default_factory=dict)  # other records (e.g. "quantized"), as written


def read_validation(data: Any) -> ValidationResult:
    """validation/validation.json (``ValidationResult.to_dict()``) as a ValidationResult."""
    return from_dict(ValidationResult, data, where="validation.json")


def read_export(data: Any) -> ExportRecord:
    """export/export.json as an ExportRecord."""
    if not isinstance(data, dict):
        raise RecordError(f"export.json: expected an object, found {type(data).__name__}")
    pruned = from_dict(ExportResult, data.get("pruned"), where="export.json pruned")
    baseline = data.get("dense_baseline")
    dense = None if baseline is None else from_dict(ExportResult, baseline, where="export.json dense_baseline")
    known = {"pruned", "dense_baseline", "shipped", "shipped_format"}
    return ExportRecord(pruned, dense, _optional_str(data.get("shipped")), _optional_str(data.get("shipped_format")),
                        {k: v for k, v in data.items() if k not in known})


def _optional_str(value: Any) -> str | None:
    return value if isinstance(value, str) else None
