"""Translate SparseML recipes (YAML with `!SomeModifier` tags) into a raw wf-pipeline recipe dict.

SparseML's public recipe format: top-level variables (numbers, strings, lists or ``eval(...)``
arithmetic over other variables) and lists of tagged modifiers under ``modifiers:`` or any
``*_modifiers:`` key. We translate the modifiers that have a faithful equivalent in our recipe
(epochs, learning rate, weight decay, one gradual magnitude or OBS/WoodFisher pruning schedule) and
refuse everything else with a RecipeError that names the modifier and field.

Call sequence (the recipe loader does this)::

    raw = load_sparseml_text(text)            # also loads plain wf-pipeline YAML unchanged
    if is_sparseml_recipe(raw):
        raw, notes = convert_sparseml(raw, base=user_sections_or_None)
    recipe = Recipe.model_validate(raw)
"""
from __future__ import annotations

import copy
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable

import yaml

from wf_pipeline.errors import RecipeError
from wf_pipeline.recipe.safe_eval import (
    ExpressionError,
    eval_body,
    evaluate_expression,
    is_eval_string,
    resolve_variables,
)

MODIFIER_KEY = "__modifier__"

# SparseML's own defaults for optional OBSPruningModifier fields (they differ from ours, and a
# faithful translation keeps the recipe's meaning).
SPARSEML_OBS_DEFAULTS = {"num_grads": 1024, "damp": 1e-7, "fisher_block_size": 50, "num_recomputations": 1}

_EPOCH_TOLERANCE = 1e-6
_LOGGING_ONLY_FIELDS = frozenset({"log_types", "constant_logging"})
_PRUNING_TAGS = (
    "GMPruningModifier",
    "MagnitudePruningModifier",
    "GlobalMagnitudePruningModifier",
    "OBSPruningModifier",
)
_SUPPORTED_TAGS = (
    "EpochRangeModifier",
    "SetLearningRateModifier",
    "LearningRateFunctionModifier",
    "LearningRateModifier",
    "SetWeightDecayModifier",
    *_PRUNING_TAGS,
)
# Why well-known SparseML modifiers have no translation, to make the error actionable.
_UNSUPPORTED_HINTS = {
    "QuantizationModifier": "wf-pipeline does not quantize; remove the quantization modifier",
    "ConstantPruningModifier": "wf-pipeline has no 'hold the existing sparsity' mode; prune with a "
    "GMPruningModifier/OBSPruningModifier or use a wf-pipeline recipe with pruning.method: none",
    "MFACPruningModifier": "use !OBSPruningModifier (block-diagonal empirical Fisher, the WoodFisher method)",
    "DistillationModifier": "knowledge distillation is not supported; remove the modifier",
    "LayerPruningModifier": "removing whole layers is not supported",
    "StructuredPruningModifier": "wf-pipeline prunes unstructured weights only",
    "ACDCPruningModifier": "AC/DC alternating pruning is not supported; use !GMPruningModifier",
    "MovementPruningModifier": "movement pruning is not supported; use !GMPruningModifier or !OBSPruningModifier",
    "TrainableParamsModifier": "freezing parameters is not supported; remove the modifier",
}


# --------------------------------------------------------------------------------------------
# Loading


class SparseMLLoader(yaml.SafeLoader):
    """SafeLoader that turns ``!SomeModifier`` mappings into dicts with a ``__modifier__`` key.

    Only local ``!`` tags are handled; ``!!python/...`` tags stay refused as in SafeLoader.
    """


def _construct_modifier(loader: SparseMLLoader, tag_suffix: str, node: yaml.Node) -> dict[str, Any]:
    if isinstance(node, yaml.MappingNode):
        fields = loader.construct_mapping(node, deep=True)
    elif isinstance(node, yaml.ScalarNode) and not str(node.value).strip():
        fields = {}  # a modifier written with no fields, e.g. '- !SomeModifier'
    else:
        raise yaml.constructor.ConstructorError(
            None, None, f"!{tag_suffix} must be followed by a mapping of its fields", node.start_mark
        )
    if MODIFIER_KEY in fields:
        raise yaml.constructor.ConstructorError(
            None, None, f"field name {MODIFIER_KEY!r} is reserved", node.start_mark
        )
    return {MODIFIER_KEY: tag_suffix, **fields}


SparseMLLoader.add_multi_constructor("!", _construct_modifier)

# YAML front matter of a Markdown recipe card: '---' (or '+++') ... '---' at the top of the file.
_FRONT_MATTER = re.compile(r"\A\s*(?:---|\+\+\+)[ \t]*\r?\n(?P<yaml>.*?)^(?:---|\+\+\+|\.\.\.)[ \t]*\r?$", re.S | re.M)


def load_sparseml_text(text: str) -> dict[str, Any]:
    """Parse recipe text: plain YAML, YAML with ``!Modifier`` tags, or Markdown with YAML front matter.

    For a plain wf-pipeline recipe the result equals ``yaml.safe_load(text)``.
    """
    match = _FRONT_MATTER.match(text)
    yaml_text = match.group("yaml") if match else text
    try:
        raw = yaml.load(yaml_text, Loader=SparseMLLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"cannot parse recipe YAML: {' '.join(str(exc).split())}",
            hint="check indentation and that each modifier looks like '- !GMPruningModifier' followed by its fields",
        ) from exc
    if not isinstance(raw, dict):
        raise RecipeError(
            f"a recipe must be a YAML mapping at the top level, got {type(raw).__name__}",
            hint="start the file with keys such as 'model:' or, for SparseML, 'modifiers:'",
        )
    return raw


def _is_modifier_list_key(key: Any) -> bool:
    return isinstance(key, str) and (key == "modifiers" or key.endswith("_modifiers"))


def is_sparseml_recipe(raw: Any) -> bool:
    """True when ``raw`` (a loaded recipe) is in SparseML's format rather than ours.

    Our schema has no ``modifiers`` keys, so the test cannot misfire on a valid wf-pipeline recipe.
    """
    if not isinstance(raw, dict):
        return False
    if any(_is_modifier_list_key(key) for key in raw):
        return True
    return any(isinstance(value, dict) and any(_is_modifier_list_key(k) for k in value) for value in raw.values())


# --------------------------------------------------------------------------------------------
# Reading one modifier's fields, with SparseML's loose typing and our error messages

_MISSING: Any = object()


@dataclass
class _Context:
    variables: dict[str, Any]
    allow_rounding: bool
    notes: list[str] = field(default_factory=list)


class _Modifier:
    def __init__(self, tag: str, location: str, fields: dict[str, Any], ctx: _Context) -> None:
        self.tag = tag
        self.location = location
        self.fields = fields
        self.ctx = ctx

    @property
    def label(self) -> str:
        return f"!{self.tag} ({self.location})"

    def error(self, field_name: str | None, message: str, hint: str | None = None) -> RecipeError:
        where = f"{self.label} field '{field_name}'" if field_name else self.label
        return RecipeError(f"SparseML {where}: {message}", hint=hint)

    def check_fields(self, required: Iterable[str], optional: Iterable[str]) -> None:
        required, optional = set(required), set(optional)
        known = required | optional | _LOGGING_ONLY_FIELDS
        for name in self.fields:
            if name not in known:
                raise self.error(
                    name,
                    "is not supported by the wf-pipeline translation",
                    hint=f"remove it; supported fields of !{self.tag}: {', '.join(sorted(required | optional))}",
                )
        for name in sorted(required):
            if name not in self.fields:
                raise self.error(name, "is required but missing", hint=f"add '{name}:' to the modifier")
        for name in sorted(_LOGGING_ONLY_FIELDS & set(self.fields)):
            self.ctx.notes.append(f"{self.label}: ignored logging-only field '{name}'")

    def has(self, name: str) -> bool:
        return name in self.fields

    def raw(self, name: str, default: Any = _MISSING) -> Any:
        if name in self.fields:
            return self.fields[name]
        if default is _MISSING:
            raise self.error(name, "is required but missing", hint=f"add '{name}:' to the modifier")
        return default

    def number(self, name: str, default: Any = _MISSING) -> float:
        value = self.raw(name, default)
        if isinstance(value, str) and value in self.ctx.variables:
            value = self.ctx.variables[value]  # a bare reference to a recipe variable
        if isinstance(value, bool):
            raise self.error(name, f"expected a number, got {value}")
        if isinstance(value, str):
            try:  # YAML 1.1 reads '1e-7' as a string; SparseML converts it with float()
                value = float(value)
            except ValueError:
                raise self.error(name, f"expected a number, got {value!r}") from None
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.error(name, f"expected a finite number, got {value!r}")
        return value

    def integer(self, name: str, default: Any = _MISSING) -> int:
        value = self.number(name, default)
        if value != int(value):
            raise self.error(name, f"expected a whole number, got {value}")
        return int(value)

    def boolean(self, name: str, default: Any = _MISSING) -> bool:
        value = self.raw(name, default)
        if isinstance(value, str) and value in self.ctx.variables:
            value = self.ctx.variables[value]
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"  # SparseML's convert_to_bool accepts strings
        if not isinstance(value, bool):
            raise self.error(name, f"expected true or false, got {value!r}")
        return value

    def string(self, name: str, default: Any = _MISSING) -> str:
        value = self.raw(name, default)
        if not isinstance(value, str):
            raise self.error(name, f"expected a string, got {value!r}")
        return value

    def require_unset(self, name: str, allowed: tuple[Any, ...], why: str) -> None:
        if name in self.fields and self.fields[name] not in allowed:
            raise self.error(name, f"value {self.fields[name]!r} is not supported: {why}", hint=f"remove '{name}'")

    def whole_epoch(self, name: str, value: float) -> int:
        """An epoch boundary as a whole number: exact, or rounded with a note when allowed."""
        if value < 0:
            raise self.error(name, f"negative epoch {value} is not supported", hint="start schedules at epoch 0")
        rounded = round(value)
        if abs(value - rounded) <= _EPOCH_TOLERANCE:
            return int(rounded)
        if not self.ctx.allow_rounding:
            raise self.error(
                name,
                f"{value} is not a whole epoch; wf-pipeline schedules pruning and learning rates per epoch",
                hint="use a whole number of epochs in the SparseML recipe (e.g. 2.0 instead of 2.5)",
            )
        self.ctx.notes.append(f"{self.label}: rounded {name} {value} to epoch {int(rounded)}")
        return int(rounded)


# --------------------------------------------------------------------------------------------
# Typed summaries of the supported modifiers


@dataclass
class _EpochRange:
    start: float
    end: float
    source: _Modifier


@dataclass
class _SetLR:
    epoch: float  # <= 0 means "from the start"
    lr: float
    source: _Modifier


@dataclass
class _LRFunction:
    func: str
    init_lr: float
    final_lr: float
    start: float
    end: float
    source: _Modifier


@dataclass
class _LRClass:
    lr_class: str
    kwargs: dict[str, Any]
    init_lr: float
    start: float
    end: float
    source: _Modifier


@dataclass
class _SetWeightDecay:
    epoch: float
    weight_decay: float
    source: _Modifier


@dataclass
class _Pruning:
    settings: dict[str, Any]  # our pruning section, minus layers
    layers: list[str]
    end_epoch: float
    source: _Modifier


@dataclass
class _Parsed:
    epoch_ranges: list[_EpochRange] = field(default_factory=list)
    set_lrs: list[_SetLR] = field(default_factory=list)
    lr_functions: list[_LRFunction] = field(default_factory=list)
    lr_classes: list[_LRClass] = field(default_factory=list)
    weight_decays: list[_SetWeightDecay] = field(default_factory=list)
    prunings: list[_Pruning] = field(default_factory=list)

    def last_epoch(self) -> float:
        """SparseML trains until the latest end_epoch of any modifier (its manager's max_epochs)."""
        ends = [m.end for m in self.epoch_ranges]
        ends += [m.end for m in self.lr_functions]
        ends += [m.end for m in self.lr_classes if m.end >= 0]
        ends += [p.end_epoch for p in self.prunings]
        return max(ends, default=-1.0)


def _parse_epoch_range(mod: _Modifier, out: _Parsed) -> None:
    mod.check_fields(required=("start_epoch", "end_epoch"), optional=())
    start, end = mod.number("start_epoch"), mod.number("end_epoch")
    if end <= max(start, 0):
        raise mod.error("end_epoch", f"must be after start_epoch ({start}), got {end}")
    if start > 0:
        mod.ctx.notes.append(
            f"{mod.label}: start_epoch {start} ignored; fine-tuning always starts at epoch 0 "
            "(SparseML's training loops also run from 0 to the last end_epoch)"
        )
    out.epoch_ranges.append(_EpochRange(start, end, mod))


def _parse_set_lr(mod: _Modifier, out: _Parsed) -> None:
    mod.check_fields(required=("learning_rate",), optional=("start_epoch", "end_epoch", "param_groups"))
    mod.require_unset("param_groups", (None,), "wf-pipeline uses one learning rate for all parameters")
    if mod.raw("learning_rate") is None:
        mod.ctx.notes.append(f"{mod.label}: learning_rate is null, the modifier does nothing")
        return
    lr = mod.number("learning_rate")
    if lr <= 0:
        raise mod.error("learning_rate", f"must be > 0, got {lr}")
    if mod.has("end_epoch") and mod.number("end_epoch") >= 0:
        mod.ctx.notes.append(f"{mod.label}: end_epoch ignored (SparseML ignores it too)")
    out.set_lrs.append(_SetLR(mod.number("start_epoch", -1.0), lr, mod))


def _parse_lr_function(mod: _Modifier, out: _Parsed) -> None:
    mod.check_fields(
        required=("lr_func", "init_lr", "final_lr", "start_epoch", "end_epoch"),
        optional=("cycle_epochs", "param_groups", "update_frequency"),
    )
    mod.require_unset("param_groups", (None,), "wf-pipeline uses one learning rate for all parameters")
    mod.require_unset("update_frequency", (-1, -1.0), "SparseML requires it to stay -1")
    func = mod.string("lr_func")
    if func not in ("linear", "cosine"):
        raise mod.error(
            "lr_func",
            f"'{func}' has no wf-pipeline equivalent",
            hint="use lr_func: linear or cosine (optionally after a linear warmup modifier)",
        )
    if mod.has("cycle_epochs"):
        cycle = mod.number("cycle_epochs")
        span = mod.number("end_epoch") - mod.number("start_epoch")
        if cycle > 0 and abs(cycle - span) > _EPOCH_TOLERANCE:
            raise mod.error("cycle_epochs", "restarting cycles have no wf-pipeline equivalent", hint="remove it")
    init_lr, final_lr = mod.number("init_lr"), mod.number("final_lr")
    if init_lr < 0 or final_lr < 0:
        raise mod.error("init_lr" if init_lr < 0 else "final_lr", "learning rates must be >= 0")
    start, end = mod.number("start_epoch"), mod.number("end_epoch")
    if end <= max(start, 0):
        raise mod.error("end_epoch", f"must be after start_epoch ({start}), got {end}")
    out.lr_functions.append(_LRFunction(func, init_lr, final_lr, max(start, 0.0), end, mod))


_LR_CLASS_KWARGS = {
    "MultiStepLR": ("milestones", "gamma"),
    "StepLR": ("step_size", "gamma"),
    "ExponentialLR": ("gamma",),
}


def _parse_lr_class(mod: _Modifier, out: _Parsed) -> None:
    mod.check_fields(
        required=("lr_class", "lr_kwargs", "init_lr", "start_epoch"), optional=("end_epoch", "update_frequency")
    )
    mod.require_unset("update_frequency", (-1, -1.0), "SparseML requires it to stay -1")
    lr_class = mod.string("lr_class")
    if lr_class not in _LR_CLASS_KWARGS:
        raise mod.error(
            "lr_class", f"'{lr_class}' has no wf-pipeline equivalent", hint="use MultiStepLR, StepLR or ExponentialLR"
        )
    kwargs = mod.raw("lr_kwargs")
    if not isinstance(kwargs, dict):
        raise mod.error("lr_kwargs", f"expected a mapping, got {kwargs!r}")
    expected = _LR_CLASS_KWARGS[lr_class]
    for key in kwargs:
        if key not in expected:
            raise mod.error("lr_kwargs", f"key '{key}' is not supported for {lr_class}", hint=f"use only {expected}")
    for key in expected:
        if key not in kwargs:
            raise mod.error("lr_kwargs", f"{lr_class} needs '{key}'", hint=f"add lr_kwargs.{key}")
    init_lr = mod.number("init_lr")
    if init_lr <= 0:
        raise mod.error("init_lr", f"must be > 0, got {init_lr}")
    start = mod.number("start_epoch")
    if start > 0:
        raise mod.error(
            "start_epoch", f"{start}: a scheduler that starts mid-training has no wf-pipeline equivalent",
            hint="start it at epoch 0 (or -1)",
        )
    out.lr_classes.append(_LRClass(lr_class, dict(kwargs), init_lr, 0.0, mod.number("end_epoch", -1.0), mod))


def _parse_weight_decay(mod: _Modifier, out: _Parsed) -> None:
    mod.check_fields(required=("weight_decay",), optional=("start_epoch", "param_groups"))
    mod.require_unset("param_groups", (None,), "wf-pipeline uses one weight decay for all parameters")
    start = mod.number("start_epoch", -1.0)
    if start > 0:
        raise mod.error(
            "start_epoch", f"{start}: changing weight decay mid-training has no wf-pipeline equivalent",
            hint="set it from epoch 0 (or -1)",
        )
    decay = mod.number("weight_decay")
    if decay < 0:
        raise mod.error("weight_decay", f"must be >= 0, got {decay}")
    out.weight_decays.append(_SetWeightDecay(start, decay, mod))


_COMMON_PRUNING_REQUIRED = ("init_sparsity", "final_sparsity", "start_epoch", "end_epoch", "update_frequency", "params")
_COMMON_PRUNING_OPTIONAL = ("leave_enabled", "inter_func", "mask_type")
_OBS_OPTIONAL = (
    "global_sparsity",
    "num_grads",
    "damp",
    "fisher_block_size",
    "grad_sampler_kwargs",
    "num_recomputations",
)
_INTER_FUNCS = {"cubic": "cubic", "linear": "linear"}


def _params_to_layers(mod: _Modifier) -> list[str]:
    """SparseML `params` -> our `pruning.layers` regexes over parameter names.

    SparseML matches 're:' patterns with re.match (anchored at the start only) and plain names
    exactly. We emit patterns that behave the same under re.search, re.match and re.fullmatch.
    """
    params = mod.raw("params")
    if isinstance(params, str):
        params = [params]
    if not isinstance(params, list) or not params or not all(isinstance(p, str) for p in params):
        raise mod.error("params", f"expected a name, pattern or non-empty list of them, got {params!r}")
    layers: list[str] = []
    for param in params:
        if param in ("__ALL_PRUNABLE__", "__ALL__"):
            if param == "__ALL__":
                mod.ctx.notes.append(
                    f"{mod.label}: params __ALL__ -> all conv/linear weights (wf-pipeline never prunes "
                    "biases or normalization parameters)"
                )
            pattern = ".*"
        elif param.startswith("re:"):
            body = param[3:]
            try:
                re.compile(body)
            except re.error as exc:
                raise mod.error("params", f"invalid regex {body!r}: {exc}") from None
            open_ended = body.endswith(".*") or (body.endswith("$") and not body.endswith("\\$"))
            pattern = f"^(?:{body})" + ("" if open_ended else ".*")
        else:
            pattern = f"^{re.escape(param)}$"
        if pattern not in layers:
            layers.append(pattern)
    if any(not p.startswith("^(?:") and p != ".*" for p in layers):
        mod.ctx.notes.append(
            f"{mod.label}: explicit parameter names are kept verbatim; they must match the parameter names "
            "of the wf-pipeline model (check with 'wf-pipeline recipe show')"
        )
    return [".*"] if ".*" in layers else layers


def _parse_pruning(mod: _Modifier, out: _Parsed) -> None:
    tag = mod.tag
    is_obs = tag == "OBSPruningModifier"
    optional = _COMMON_PRUNING_OPTIONAL + (("phased",) if not is_obs else ())
    if is_obs:
        optional += _OBS_OPTIONAL
    elif tag != "GlobalMagnitudePruningModifier":
        optional += ("global_sparsity",)  # accepted by older SparseML GMPruningModifier versions
    mod.check_fields(required=_COMMON_PRUNING_REQUIRED, optional=optional)
    if mod.has("phased") and mod.boolean("phased"):
        raise mod.error("phased", "phased pruning (on/off every update) is not supported", hint="remove it")

    mask_type = mod.raw("mask_type", "unstructured")
    if mask_type != "unstructured":
        raise mod.error(
            "mask_type",
            f"{mask_type!r} sparsity is not supported; wf-pipeline prunes unstructured weights only",
            hint="use mask_type: unstructured",
        )
    if mod.raw("init_sparsity") == "__FROM_PARAM__":
        raise mod.error(
            "init_sparsity", "__FROM_PARAM__ (start from each parameter's current sparsity) is not supported",
            hint="give a number, e.g. init_sparsity: 0.05",
        )
    if isinstance(mod.raw("final_sparsity"), dict):
        raise mod.error(
            "final_sparsity", "per-parameter sparsity targets are not supported; wf-pipeline prunes to one target",
            hint="use a single final_sparsity and list the parameters under params",
        )
    init, final = mod.number("init_sparsity"), mod.number("final_sparsity")
    for name, value in (("init_sparsity", init), ("final_sparsity", final)):
        if not 0 <= value < 1:
            raise mod.error(name, f"must be in [0, 1), got {value}")
    if init > final:
        raise mod.error("init_sparsity", f"{init} is above final_sparsity {final}")

    start_raw, end_raw = mod.number("start_epoch"), mod.number("end_epoch")
    start, end = mod.whole_epoch("start_epoch", start_raw), mod.whole_epoch("end_epoch", end_raw)
    if end < start:
        raise mod.error("end_epoch", f"{end_raw} is before start_epoch {start_raw}")
    frequency = _pruning_frequency(mod, start, end)

    inter_func = mod.string("inter_func", "cubic")
    if inter_func not in _INTER_FUNCS:
        raise mod.error(
            "inter_func", f"'{inter_func}' has no wf-pipeline schedule", hint="use inter_func: cubic or linear"
        )
    if mod.has("leave_enabled") and not mod.boolean("leave_enabled"):
        mod.ctx.notes.append(
            f"{mod.label}: leave_enabled false ignored; wf-pipeline keeps pruned weights at zero until export"
        )

    default_global = is_obs or tag == "GlobalMagnitudePruningModifier"
    global_ranking = mod.boolean("global_sparsity", default_global)
    settings: dict[str, Any] = {
        "method": "woodfisher" if is_obs else "magnitude",
        "initial_sparsity": init,
        "final_sparsity": final,
        "ranking": "global" if global_ranking else "uniform",
        "schedule": {"kind": _INTER_FUNCS[inter_func], "start_epoch": start, "end_epoch": end, "frequency": frequency},
    }
    if is_obs:
        settings["woodfisher"] = _obs_settings(mod)
    out.prunings.append(_Pruning(settings, _params_to_layers(mod), end_raw, mod))


def _pruning_frequency(mod: _Modifier, start: int, end: int) -> int:
    """SparseML update_frequency (epochs, may be fractional) -> our whole-epoch frequency."""
    frequency = mod.number("update_frequency")
    if frequency <= 0:
        if start == end:
            return 1  # one-shot: a single pruning step, the frequency is irrelevant
        raise mod.error("update_frequency", f"must be > 0, got {frequency}")
    rounded = round(frequency)
    if abs(frequency - rounded) <= _EPOCH_TOLERANCE and rounded >= 1:
        return int(rounded)
    if start == end:
        return 1
    steps = _pruning_step_count(start, end, frequency)
    if not mod.ctx.allow_rounding:
        raise mod.error(
            "update_frequency",
            f"{frequency} epochs ({steps} pruning steps) is not a whole number of epochs; wf-pipeline prunes at "
            "most once per epoch",
            hint="set update_frequency to a whole number of epochs (1.0 prunes once per epoch)",
        )
    new = max(1, int(rounded))
    new_steps = _pruning_step_count(start, end, new)
    mod.ctx.notes.append(
        f"{mod.label}: rounded update_frequency {frequency} to {new} epoch(s): "
        f"{new_steps} pruning steps instead of {steps}"
    )
    return new


def _pruning_step_count(start: int, end: int, frequency: float) -> int:
    """Pruning steps at start, start+frequency, ... plus end_epoch itself (both tools always prune there)."""
    grid = math.floor((end - start) / frequency + _EPOCH_TOLERANCE) + 1
    last = start + (grid - 1) * frequency
    return grid if abs(last - end) <= _EPOCH_TOLERANCE else grid + 1


def _obs_settings(mod: _Modifier) -> dict[str, Any]:
    for name, default in SPARSEML_OBS_DEFAULTS.items():
        if not mod.has(name):
            mod.ctx.notes.append(f"{mod.label}: {name} not set, using SparseML's default {default}")
    woodfisher: dict[str, Any] = {
        "num_grads": mod.integer("num_grads", SPARSEML_OBS_DEFAULTS["num_grads"]),
        "block_size": mod.integer("fisher_block_size", SPARSEML_OBS_DEFAULTS["fisher_block_size"]),
        "damp": mod.number("damp", SPARSEML_OBS_DEFAULTS["damp"]),
        "recompute_steps": mod.integer("num_recomputations", SPARSEML_OBS_DEFAULTS["num_recomputations"]),
        "fisher_type": "empirical",
        # SparseML's unstructured OBS update sums the single-weight OBS corrections: our 'independent'.
        "update": "independent",
    }
    mod.ctx.notes.append(
        f"{mod.label}: woodfisher.update 'independent' reproduces SparseML's summed single-weight OBS update; "
        "set it to 'joint' for the exact joint update"
    )
    sampler = mod.raw("grad_sampler_kwargs", None) or {}
    if not isinstance(sampler, dict):
        raise mod.error("grad_sampler_kwargs", f"expected a mapping, got {sampler!r}")
    for key in sampler:
        if key != "batch_size":
            raise mod.error(
                "grad_sampler_kwargs", f"key '{key}' is not supported", hint="only grad_sampler_kwargs.batch_size maps"
            )
    if "batch_size" in sampler:
        batch = sampler["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, (int, float)) or batch != int(batch) or batch < 1:
            raise mod.error("grad_sampler_kwargs", f"batch_size must be a positive whole number, got {batch!r}")
        woodfisher["grad_batch_size"] = int(batch)
    else:
        mod.ctx.notes.append(
            f"{mod.label}: grad_sampler_kwargs.batch_size not set (SparseML would use the training batch size); "
            "keeping pruning.woodfisher.grad_batch_size from the base recipe or its default"
        )
    for name in ("num_grads", "block_size", "recompute_steps"):
        if woodfisher[name] < 1:
            field_name = "fisher_block_size" if name == "block_size" else name
            raise mod.error(field_name, f"must be >= 1, got {woodfisher[name]}")
    if woodfisher["damp"] <= 0:
        raise mod.error("damp", f"must be > 0, got {woodfisher['damp']}")
    return woodfisher


_PARSERS = {
    "EpochRangeModifier": _parse_epoch_range,
    "SetLearningRateModifier": _parse_set_lr,
    "LearningRateFunctionModifier": _parse_lr_function,
    "LearningRateModifier": _parse_lr_class,
    "SetWeightDecayModifier": _parse_weight_decay,
    **{tag: _parse_pruning for tag in _PRUNING_TAGS},
}


# --------------------------------------------------------------------------------------------
# Composing our sections from the parsed modifiers


def _same(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _compose_epochs(parsed: _Parsed, ctx: _Context) -> int | None:
    last = parsed.last_epoch()
    if last < 0:
        return None
    if parsed.epoch_ranges:
        declared = max(r.end for r in parsed.epoch_ranges)
        if declared + _EPOCH_TOLERANCE < last:
            ctx.notes.append(
                f"EpochRangeModifier ends at {declared} but another modifier runs until {last}; "
                f"fine-tuning for {last} epochs as SparseML would"
            )
        source = max(parsed.epoch_ranges, key=lambda r: r.end).source
    else:
        ctx.notes.append(f"no EpochRangeModifier: fine-tuning until the last modifier ends (epoch {last})")
        source = None
    if abs(last - round(last)) <= _EPOCH_TOLERANCE:
        return int(round(last))
    if ctx.allow_rounding:
        epochs = math.ceil(last)
        ctx.notes.append(f"rounded the training length {last} up to {epochs} epochs")
        return epochs
    if source is not None:
        raise source.error("end_epoch", f"{last} is not a whole number of epochs", hint="use e.g. 10.0")
    raise RecipeError(
        f"SparseML recipe: training ends at epoch {last}, not a whole number of epochs",
        hint="add '!EpochRangeModifier' with a whole end_epoch, or use whole epochs in the modifiers",
    )


def _lr_schedule(kind: str, **values: Any) -> dict[str, Any]:
    schedule = {"kind": kind, "warmup_epochs": 0.0, "step_epochs": [], "gamma": 0.1, "final_lr": 0.0}
    schedule.update(values)
    return schedule


def _unsupported_lr(parsed: _Parsed, why: str) -> RecipeError:
    names = [m.source.label for m in (*parsed.set_lrs, *parsed.lr_functions, *parsed.lr_classes)]
    return RecipeError(
        f"SparseML learning-rate modifiers {', '.join(names)}: {why}",
        hint="wf-pipeline supports one schedule over all fine-tuning epochs: a constant rate, step decays "
        "(several SetLearningRateModifiers with one ratio, MultiStepLR/StepLR/ExponentialLR), or linear/cosine "
        "decay from epoch 0 to the end, optionally after one linear warmup modifier",
    )


def _compose_lr(parsed: _Parsed, epochs: int | None, ctx: _Context) -> tuple[float | None, dict[str, Any] | None]:
    """Map the learning-rate modifiers onto (optimizer.lr, lr_schedule), or refuse them."""
    if parsed.lr_classes:
        return _compose_lr_class(parsed, epochs, ctx)
    if parsed.lr_functions:
        return _compose_lr_functions(parsed, epochs, ctx)
    if parsed.set_lrs:
        return _compose_set_lrs(parsed, ctx)
    return None, None


def _initial_set_lrs_overridden(parsed: _Parsed, ctx: _Context, by: str) -> None:
    for item in parsed.set_lrs:
        if item.epoch > 0:
            raise _unsupported_lr(parsed, f"a SetLearningRateModifier at epoch {item.epoch} cannot combine with {by}")
        ctx.notes.append(f"{item.source.label}: learning_rate {item.lr} is overridden by {by} from epoch 0")


def _compose_lr_class(parsed: _Parsed, epochs: int | None, ctx: _Context) -> tuple[float, dict[str, Any]]:
    if len(parsed.lr_classes) > 1 or parsed.lr_functions:
        raise _unsupported_lr(parsed, "more than one learning-rate schedule")
    item = parsed.lr_classes[0]
    mod = item.source
    _initial_set_lrs_overridden(parsed, ctx, by=mod.label)
    gamma = _positive_kwarg(mod, item.kwargs, "gamma")
    horizon = epochs if item.end < 0 else item.end
    if item.lr_class == "MultiStepLR":
        milestones = item.kwargs["milestones"]
        if not isinstance(milestones, list) or not milestones:
            raise mod.error("lr_kwargs", f"milestones must be a non-empty list, got {milestones!r}")
        steps = sorted({_kwarg_epoch(mod, "milestones", m) for m in milestones})
    else:
        size = _positive_kwarg(mod, item.kwargs, "step_size") if item.lr_class == "StepLR" else 1.0
        size_epochs = _kwarg_epoch(mod, "step_size", size)
        if horizon is None:
            raise mod.error("end_epoch", "the number of epochs is unknown", hint="add an !EpochRangeModifier")
        steps = list(range(size_epochs, int(math.ceil(horizon)), size_epochs))
        if item.lr_class == "ExponentialLR":
            ctx.notes.append(f"{mod.label}: ExponentialLR decays once per epoch in SparseML -> step decay every epoch")
    if item.end >= 0 and epochs is not None and item.end < epochs:
        ctx.notes.append(f"{mod.label}: the rate stays at its last value after end_epoch {item.end}, as in SparseML")
    if steps and steps[0] <= 0:
        raise mod.error("lr_kwargs", f"milestones must be after epoch 0, got {steps[0]}")
    return item.init_lr, _lr_schedule("step", step_epochs=steps, gamma=gamma)


def _positive_kwarg(mod: _Modifier, kwargs: dict[str, Any], key: str) -> float:
    value = kwargs[key]
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise mod.error("lr_kwargs", f"{key} must be a number, got {value!r}") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise mod.error("lr_kwargs", f"{key} must be a positive number, got {value!r}")
    return float(value)


def _kwarg_epoch(mod: _Modifier, key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise mod.error("lr_kwargs", f"{key} must be epochs (numbers), got {value!r}")
    return mod.whole_epoch(f"lr_kwargs.{key}", float(value))


def _compose_lr_functions(parsed: _Parsed, epochs: int | None, ctx: _Context) -> tuple[float, dict[str, Any]]:
    functions = sorted(parsed.lr_functions, key=lambda f: f.start)
    if len(functions) > 2:
        raise _unsupported_lr(parsed, f"{len(functions)} LearningRateFunctionModifiers")
    main = functions[-1]
    _initial_set_lrs_overridden(parsed, ctx, by=functions[0].source.label)
    if epochs is not None and not _same(main.end, epochs):
        raise _unsupported_lr(
            parsed, f"the schedule ends at epoch {main.end} but fine-tuning lasts {epochs} epochs"
        )
    if len(functions) == 1:
        if main.start > 0:
            raise _unsupported_lr(parsed, f"the schedule starts at epoch {main.start}, not 0")
        if main.init_lr <= 0:
            raise main.source.error("init_lr", "must be > 0 without a warmup modifier")
        return main.init_lr, _lr_schedule(main.func, final_lr=main.final_lr)
    warmup = functions[0]
    if warmup.func != "linear" or warmup.start > 0 or not _same(warmup.end, main.start):
        raise _unsupported_lr(
            parsed, "two schedules are only supported as a linear warmup from epoch 0 followed directly by the decay"
        )
    if not _same(warmup.final_lr, main.init_lr) or warmup.init_lr > main.init_lr:
        raise _unsupported_lr(
            parsed,
            f"the warmup must rise to the decay's init_lr ({main.init_lr}), "
            f"got {warmup.init_lr} -> {warmup.final_lr}",
        )
    if warmup.init_lr > 0:
        ctx.notes.append(
            f"{warmup.source.label}: the warmup starts at lr {warmup.init_lr} in SparseML; "
            "wf-pipeline's linear warmup starts from 0"
        )
    return main.init_lr, _lr_schedule(main.func, warmup_epochs=float(warmup.end), final_lr=main.final_lr)


def _compose_set_lrs(parsed: _Parsed, ctx: _Context) -> tuple[float, dict[str, Any]]:
    changes = sorted(parsed.set_lrs, key=lambda s: s.epoch)
    first = changes[0]
    if first.epoch > 0:
        raise _unsupported_lr(
            parsed, f"the first SetLearningRateModifier starts at epoch {first.epoch}; the starting rate is unknown"
        )
    later = changes[1:]
    if any(c.epoch <= 0 for c in later):
        raise _unsupported_lr(parsed, "several SetLearningRateModifiers all start at epoch 0")
    if not later:
        return first.lr, _lr_schedule("constant")
    ratios = [float(f"{b.lr / a.lr:.12g}") for a, b in zip(changes, later)]  # drop float noise (0.1000...02)
    if not all(math.isclose(r, ratios[0], rel_tol=1e-6) for r in ratios):
        raise _unsupported_lr(parsed, f"the rate changes by different factors ({', '.join(f'{r:g}' for r in ratios)})")
    steps = [c.source.whole_epoch("start_epoch", c.epoch) for c in later]
    ctx.notes.append(f"SetLearningRateModifiers -> step schedule: x{ratios[0]:g} at epochs {steps}")
    return first.lr, _lr_schedule("step", step_epochs=steps, gamma=ratios[0])


def _compose_pruning(parsed: _Parsed, ctx: _Context) -> dict[str, Any] | None:
    if not parsed.prunings:
        return None
    first = parsed.prunings[0]
    layers = list(first.layers)
    for other in parsed.prunings[1:]:
        differing = sorted(
            key
            for key in set(first.settings) | set(other.settings)
            if first.settings.get(key) != other.settings.get(key)
        )
        if differing:
            details = "; ".join(
                f"{key}: {first.settings.get(key)!r} vs {other.settings.get(key)!r}" for key in differing
            )
            raise RecipeError(
                f"SparseML {first.source.label} and {other.source.label} differ ({details}); "
                "wf-pipeline runs one pruning schedule",
                hint="merge them into one modifier with the same method, sparsity and schedule and list all params, "
                "or convert them separately",
            )
        layers += [pattern for pattern in other.layers if pattern not in layers]
        ctx.notes.append(f"merged the params of {other.source.label} into {first.source.label} (same schedule)")
    if ".*" in layers:
        layers = [".*"]
    pruning = copy.deepcopy(first.settings)
    pruning["layers"] = layers
    return pruning


# --------------------------------------------------------------------------------------------
# Entry point


def _evaluate_values(value: Any, variables: dict[str, Any]) -> Any:
    if is_eval_string(value):
        return evaluate_expression(eval_body(value), variables)
    if isinstance(value, list):
        return [_evaluate_values(item, variables) for item in value]
    if isinstance(value, dict):
        return {key: _evaluate_values(item, variables) for key, item in value.items()}
    return value


def _collect_modifiers(raw: dict[str, Any], ctx: _Context) -> list[_Modifier]:
    modifiers: list[_Modifier] = []
    for key, entries in raw.items():
        if not _is_modifier_list_key(key):
            continue
        if entries is None:
            continue
        if not isinstance(entries, list):
            raise RecipeError(
                f"SparseML recipe: '{key}' must be a list of modifiers, got {type(entries).__name__}",
                hint=f"write it as '{key}:' followed by lines like '  - !GMPruningModifier'",
            )
        for index, entry in enumerate(entries):
            location = f"{key}[{index}]"
            if not isinstance(entry, dict) or MODIFIER_KEY not in entry:
                raise RecipeError(
                    f"SparseML recipe: {location} is not a tagged modifier",
                    hint="each entry must start with a tag such as '- !GMPruningModifier'",
                )
            tag = str(entry[MODIFIER_KEY])
            if tag.startswith("pytorch."):
                tag = tag[len("pytorch.") :]
            fields = {name: value for name, value in entry.items() if name != MODIFIER_KEY}
            evaluated: dict[str, Any] = {}
            for name, value in fields.items():
                try:
                    evaluated[name] = _evaluate_values(value, ctx.variables)
                except ExpressionError as exc:
                    raise RecipeError(
                        f"SparseML !{tag} ({location}) field '{name}': {exc.message}", hint=exc.hint
                    ) from exc
            modifiers.append(_Modifier(tag, location, evaluated, ctx))
    return modifiers


def _merge_into(target: dict[str, Any], key: str, values: dict[str, Any], where: str) -> dict[str, Any]:
    section = target.setdefault(key, {})
    if not isinstance(section, dict):
        raise RecipeError(f"base recipe: '{where}{key}' must be a mapping", hint="fix the base recipe")
    for name, value in values.items():
        if isinstance(value, dict) and isinstance(section.get(name), dict):
            _merge_into(section, name, value, f"{where}{key}.")
        else:
            section[name] = copy.deepcopy(value)
    return section


def convert_sparseml(
    raw: dict[str, Any], *, base: dict[str, Any] | None = None, allow_rounding: bool = False
) -> tuple[dict[str, Any], list[str]]:
    """Translate a loaded SparseML recipe into a raw wf-pipeline recipe dict plus translation notes.

    ``base`` holds the user's own wf-pipeline sections (model, data, export, ...); the SparseML
    recipe supplies only ``pruning`` and ``finetune`` values, merged over ``base`` (schema defaults
    fill whatever neither gives). With ``allow_rounding`` fractional epochs and update frequencies
    are rounded to whole epochs (each change recorded in the notes) instead of refused.
    The caller validates the result with ``Recipe.model_validate``.
    """
    if not isinstance(raw, dict):
        raise RecipeError(f"SparseML recipe must be a mapping, got {type(raw).__name__}")
    if base is not None and not isinstance(base, dict):
        raise RecipeError(f"base recipe must be a mapping, got {type(base).__name__}")
    staged = [key for key, value in raw.items() if isinstance(value, dict) and any(map(_is_modifier_list_key, value))]
    if staged:
        raise RecipeError(
            f"SparseML staged recipes are not supported (stages: {', '.join(map(str, staged))})",
            hint="copy the modifiers of one stage into a flat recipe with a top-level 'modifiers:' list",
        )
    if not any(_is_modifier_list_key(key) for key in raw):
        raise RecipeError("not a SparseML recipe: no 'modifiers:' or '*_modifiers:' list", hint="add the modifiers")

    raw_variables = {key: value for key, value in raw.items() if not _is_modifier_list_key(key)}
    try:
        variables = resolve_variables(raw_variables)
    except ExpressionError as exc:
        raise RecipeError(f"SparseML recipe: {exc.message}", hint=exc.hint) from exc
    ctx = _Context(variables=variables, allow_rounding=allow_rounding)
    evaluated = {name: variables[name] for name, value in raw_variables.items() if is_eval_string(value)}
    if evaluated:
        ctx.notes.append("evaluated variables: " + ", ".join(f"{k}={v!r}" for k, v in evaluated.items()))

    parsed = _Parsed()
    for mod in _collect_modifiers(raw, ctx):
        parser = _PARSERS.get(mod.tag)
        if parser is None:
            hint = _UNSUPPORTED_HINTS.get(mod.tag, f"supported modifiers: {', '.join(_SUPPORTED_TAGS)}")
            raise mod.error(None, "this modifier has no wf-pipeline translation", hint=hint)
        parser(mod, parsed)

    result = copy.deepcopy(base) if base else {}
    finetune: dict[str, Any] = {}
    epochs = _compose_epochs(parsed, ctx)
    if epochs is not None:
        finetune["epochs"] = epochs
    lr, schedule = _compose_lr(parsed, epochs, ctx)
    optimizer: dict[str, Any] = {}
    if lr is not None:
        optimizer["lr"] = lr
    else:
        ctx.notes.append(
            "no learning-rate modifier: finetune.optimizer.lr and lr_schedule come from the base recipe or defaults"
        )
    if parsed.weight_decays:
        optimizer["weight_decay"] = parsed.weight_decays[-1].weight_decay
    if optimizer:
        finetune["optimizer"] = optimizer
    if finetune:
        section = _merge_into(result, "finetune", finetune, "")
        if schedule is not None:
            section["lr_schedule"] = schedule  # replaced whole: leftovers from base would change its meaning

    pruning = _compose_pruning(parsed, ctx)
    if pruning is not None:
        _merge_into(result, "pruning", pruning, "")
        result["pruning"]["layers"] = pruning["layers"]
    elif isinstance(result.get("pruning"), dict):
        ctx.notes.append("no pruning modifier: keeping the base recipe's pruning section")
    else:
        result["pruning"] = {"method": "none"}
        ctx.notes.append("no pruning modifier: pruning.method set to none (fine-tuning only)")
    return result, ctx.notes
