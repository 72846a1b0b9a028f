"""Translate SparseML recipes (YAML with `!SomeModifier` tags) into a raw wf-pipeline recipe dict.

SparseML's public recipe format: top-level variables (numbers, strings, lists or ``eval(...)``
arithmetic over other variables) and lists of tagged modifiers under ``modifiers:`` or any
``*_modifiers:`` key. We translate the modifiers that have a faithful equivalent in our recipe (epochs,
learning-rate and weight-decay schedules, gradual magnitude or OBS/WoodFisher pruning of one or several
parameter groups, holding existing masks) and refuse everything else. Every problem of a recipe is
reported in one error, each with its modifier, field and fix.

A translation is always made for one model: the base recipe's (``--base``), or the bundled default.
Every parameter name and pattern of the recipe is checked against that model, as SparseML does.

Call sequence (the recipe loader does this)::

    raw = load_sparseml_text(text)            # also loads plain wf-pipeline YAML unchanged
    if is_sparseml_recipe(raw):
        raw, notes = convert_sparseml(raw, base=user_sections_or_None, model=model_catalog)
    recipe = Recipe.model_validate(raw)

``translate_sparseml`` returns the same plus the per-field account written as the header of
``recipe convert``'s output.
"""

from __future__ import annotations

import copy
import hashlib
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import yaml

from wf_pipeline.errors import RecipeError
from wf_pipeline.recipe.param_catalog import ModelCatalog, ModelParams
from wf_pipeline.recipe.sparseml.fields import (
    Context,
    Modifier,
    Problem,
    Record,
    SparseMLRecipeError,
    StopModifier,
    show,
)
from wf_pipeline.recipe.sparseml.lr import (
    LRModifiers,
    compose,
    parse_lr_class,
    parse_lr_function,
    parse_set_lr,
    parse_weight_decay,
)
from wf_pipeline.recipe.sparseml.params import (
    ALL,
    ALL_PRUNABLE,
    describe_names,
    layer_patterns,
    match_entry,
    select_with,
)
from wf_pipeline.recipe.sparseml.quantization import parse_quantization
from wf_pipeline.recipe.sparseml.safe_eval import (
    ExpressionError,
    eval_body,
    evaluate_expression,
    is_eval_string,
    resolve_variables,
)

__all__ = [
    "DEFAULT_BASE",
    "MODIFIER_KEY",
    "SparseMLRecipeError",
    "Translation",
    "UniqueKeyLoader",
    "conversion_header",
    "convert_sparseml",
    "is_sparseml_recipe",
    "load_sparseml_text",
    "translate_sparseml",
]

MODIFIER_KEY = "__modifier__"

# What a SparseML recipe (which only says how to prune and train) runs on unless a base recipe is given.
DEFAULT_BASE: dict[str, Any] = {
    "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1, "weights": "builtin:resnet20-fmnist"},
    "data": {"dataset": "fashion_mnist"},
}

# SparseML's own defaults for optional OBSPruningModifier fields (they differ from ours, and a faithful
# translation keeps the recipe's meaning). fisher_block_size's default changed between releases.
SPARSEML_OBS_DEFAULTS = {"num_grads": 1024, "damp": 1e-7, "num_recomputations": 1}
OBS_BLOCK_DEFAULT_UP_TO_1_4 = 50
OBS_BLOCK_DEFAULT_FROM_1_5 = 1

_EPOCH_TOLERANCE = 1e-6
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
    "ConstantPruningModifier",
    "QuantizationModifier",
)
# Why well-known SparseML modifiers have no translation, to make the error actionable.
_UNSUPPORTED_HINTS = {
    "MFACPruningModifier": "use !OBSPruningModifier (block-diagonal empirical Fisher from fresh gradients, the "
    "WoodFisher method); M-FAC's buffer of recent training gradients has no equivalent",
    "DistillationModifier": "knowledge distillation is not supported; remove the modifier",
    "LayerPruningModifier": "removing whole layers is not supported",
    "StructuredPruningModifier": "wf-pipeline's SparseML translation prunes unstructured weights only",
    "ACDCPruningModifier": "AC/DC alternating pruning is not supported; use !GMPruningModifier",
    "MovementPruningModifier": "movement pruning is not supported; use !GMPruningModifier or !OBSPruningModifier",
    "TrainableParamsModifier": "freezing parameters is not supported; remove the modifier",
}


# =============================================================================================
# Loading


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping naming one key twice (plain YAML keeps the last one silently).

    Every recipe YAML is read with it (ours, SparseML's, ``--base`` and ``--set`` values).
    """

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.get(key)
            except TypeError:
                continue  # an unhashable key: SafeLoader reports it
            if first is not None:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first given at line {first.start_mark.line + 1})",
                    key_node.start_mark)
            seen[key] = key_node
        return super().construct_mapping(node, deep=deep)


class SparseMLLoader(UniqueKeyLoader):
    """UniqueKeyLoader that turns ``!SomeModifier`` mappings into dicts with a ``__modifier__`` key.

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
        raise yaml.constructor.ConstructorError(None, None, f"field name {MODIFIER_KEY!r} is reserved", node.start_mark)
    return {MODIFIER_KEY: tag_suffix, **fields}


SparseMLLoader.add_multi_constructor("!", _construct_modifier)

# A recipe card: optional blank lines and HTML comments (SparseML's cards open with a licence comment),
# then YAML front matter between '---' (or '+++') lines, then Markdown.
_LEADING_COMMENTS = re.compile(r"\A(?:\s*<!--.*?-->)*\s*", re.S)
_FRONT_MATTER = re.compile(r"(?:---|\+\+\+)[ \t]*\r?\n(?P<yaml>.*?)^(?:---|\+\+\+|\.\.\.)[ \t]*\r?$", re.S | re.M)


def recipe_yaml(text: str) -> str:
    """The YAML part of a recipe: the front matter of a recipe card, or the whole text."""
    start = _LEADING_COMMENTS.match(text)
    offset = start.end() if start else 0
    match = _FRONT_MATTER.match(text, offset)
    return match.group("yaml") if match else text


def load_sparseml_text(text: str) -> dict[str, Any]:
    """Parse recipe text: plain YAML, YAML with ``!Modifier`` tags, or a Markdown recipe card.

    For a plain wf-pipeline recipe the result equals ``yaml.safe_load(text)``.
    """
    try:
        raw = yaml.load(recipe_yaml(text), Loader=SparseMLLoader)  # noqa: S506 - SafeLoader subclass
    except yaml.YAMLError as exc:
        raise RecipeError(
            f"cannot parse recipe YAML: {' '.join(str(exc).split())}",
            hint="check indentation, that every *alias has its &anchor, and that each modifier looks like "
            "'- !GMPruningModifier' followed by its fields",
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


# =============================================================================================
# What the modifiers say


@dataclass
class _EpochRange:
    start: float
    end: float
    mod: Modifier


@dataclass
class _Target:
    """One sparsity target over one set of parameters: a pruning modifier, or one entry of its
    ``final_sparsity`` map."""

    mod: Modifier
    entries: list[str]
    initial: float
    final: float
    schedule: dict[str, Any]
    label: str  # group name
    selected: list[str] = field(default_factory=list)
    hold: bool = False  # a ConstantPruningModifier's parameters: existing zeros kept, nothing pruned


@dataclass
class _Pruning:
    mod: Modifier
    method: str
    ranking: str
    woodfisher: dict[str, Any] | None
    start: float
    end: float
    leave_enabled: bool
    targets: list[_Target]


@dataclass
class _Hold:
    mod: Modifier
    entries: list[str]
    start: float
    end: float  # -1: until training ends


@dataclass
class _Parsed:
    epoch_ranges: list[_EpochRange] = field(default_factory=list)
    lr: LRModifiers = field(default_factory=LRModifiers)
    prunings: list[_Pruning] = field(default_factory=list)
    holds: list[_Hold] = field(default_factory=list)
    quantize: dict[str, Any] = field(default_factory=dict)  # the quantize section a QuantizationModifier asks for

    def last_epoch(self) -> float:
        """SparseML trains until the latest end_epoch of any modifier (its manager's max_epochs)."""
        ends = [r.end for r in self.epoch_ranges] + self.lr.ends() + [p.end for p in self.prunings]
        ends += [h.end for h in self.holds if h.end >= 0]
        return max(ends, default=-1.0)


def _parse_epoch_range(mod: Modifier, out: _Parsed) -> None:
    mod.check_fields(required=("start_epoch", "end_epoch"), optional=())
    start, end = mod.epoch("start_epoch"), mod.epoch("end_epoch")
    if end <= max(start, 0):
        raise mod.stop("end_epoch", f"must be after start_epoch ({start}), got {end}", "give a later end_epoch")
    if start > 0:
        mod.ignored(
            "start_epoch",
            f"{start:g}: fine-tuning always starts at epoch 0 (SparseML's training loops "
            "also run from 0 to the last end_epoch)",
        )
    else:
        mod.became("start_epoch", "fine-tuning starts at epoch 0")
    out.epoch_ranges.append(_EpochRange(start, end, mod))


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
_INTER_FUNCS = ("cubic", "linear")


def _entries(mod: Modifier, name: str, value: Any) -> list[str]:
    """A `params` value (or one list of a final_sparsity map) as a list of SparseML entries."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(p, str) for p in value):
        raise mod.stop(
            name,
            f"expected a name, pattern or non-empty list of them, got {value!r}",
            "list parameter names, 're:' patterns or __ALL_PRUNABLE__",
        )
    for entry in value:
        if entry.startswith("re:"):
            try:
                re.compile(entry[3:])
            except re.error as exc:
                raise mod.stop(name, f"invalid regex {entry[3:]!r}: {exc}", "fix the pattern") from None
    return list(dict.fromkeys(value))


def _sparsity(mod: Modifier, name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise mod.stop(name, f"expected a number, got {value!r}", "give a sparsity in [0, 1)") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise mod.stop(name, f"must be in [0, 1), got {value!r}", "give a sparsity in [0, 1)")
    return float(value)


def _frequency(mod: Modifier, start: float, end: float) -> float:
    """SparseML's update_frequency in (possibly fractional) epochs: ours is the same number."""
    frequency = mod.number("update_frequency")
    if start == end:
        mod.ignored("update_frequency", f"one-shot pruning at epoch {start:g}: a single pruning step")
        return 1.0
    if frequency <= 0:
        raise mod.stop(
            "update_frequency",
            f"must be > 0 for gradual pruning, got {frequency}",
            "give the epochs between pruning steps, e.g. 0.5",
        )
    return float(frequency)


def _parse_pruning(mod: Modifier, out: _Parsed) -> None:
    tag = mod.tag
    is_obs = tag == "OBSPruningModifier"
    optional = _COMMON_PRUNING_OPTIONAL + (_OBS_OPTIONAL if is_obs else ("phased",))
    if not is_obs and tag != "GlobalMagnitudePruningModifier":
        optional += ("global_sparsity",)  # accepted by older SparseML GMPruningModifier versions
    mod.check_fields(required=_COMMON_PRUNING_REQUIRED, optional=optional)
    if mod.has("phased"):
        if mod.boolean("phased"):
            mod.problem("phased", "phased pruning (on/off every update) is not supported", "remove it")
        else:
            mod.ignored("phased", "false is SparseML's default")

    mask_type = mod.raw("mask_type", "unstructured")
    if mask_type != "unstructured":
        mod.problem(
            "mask_type",
            f"{mask_type!r} sparsity is not supported; the translation prunes unstructured weights only",
            "use mask_type: unstructured",
        )
    elif mod.has("mask_type"):
        mod.became("mask_type", "unstructured pruning (wf-pipeline's)")
    else:
        mod.defaulted("mask_type", "unstructured (SparseML's default)")
    if mod.raw("init_sparsity") == "__FROM_PARAM__":
        mod.problem(
            "init_sparsity",
            "__FROM_PARAM__ (start from each parameter's current sparsity) is not supported",
            "give a number, e.g. init_sparsity: 0.05",
        )
        init = None
    else:
        init = _sparsity(mod, "init_sparsity", mod.deref(mod.raw("init_sparsity")))

    start, end = mod.epoch("start_epoch"), mod.epoch("end_epoch")
    if start < 0:
        raise mod.stop("start_epoch", f"{start:g}: a pruning schedule needs a start epoch >= 0", "start at epoch 0")
    if end < start:
        raise mod.stop("end_epoch", f"{end:g} is before start_epoch {start:g}", "give an end_epoch >= start_epoch")
    frequency = _frequency(mod, start, end)

    inter_func = mod.string("inter_func", "cubic")
    if inter_func not in _INTER_FUNCS:
        mod.problem("inter_func", f"'{inter_func}' has no wf-pipeline schedule", "use inter_func: cubic or linear")
    if not mod.has("inter_func"):
        mod.defaulted("inter_func", "pruning schedule kind cubic (SparseML's default)")
    leave_enabled = mod.boolean("leave_enabled", True)
    if not mod.has("leave_enabled"):
        mod.defaulted("leave_enabled", "true (SparseML's default): pruned weights stay zero after end_epoch")

    default_global = is_obs or tag == "GlobalMagnitudePruningModifier"
    global_ranking = mod.boolean("global_sparsity", default_global)
    schedule = {"kind": inter_func, "start_epoch": start, "end_epoch": end, "frequency": frequency}

    final_raw = mod.deref(mod.raw("final_sparsity"))
    targets: list[_Target] = []
    if isinstance(final_raw, dict):
        if global_ranking:
            mod.problem(
                "final_sparsity",
                "a map of per-parameter targets with global ranking has no clear meaning",
                "use one final_sparsity, or a layer-wise modifier (!GMPruningModifier) for the map",
            )
        params = mod.raw("params")
        if params not in ([], None, ""):
            mod.problem(
                "params",
                f"must be [] when final_sparsity is a map (SparseML's rule), got {params!r}",
                "set params: [] and list the parameters in the final_sparsity map",
            )
        for index, (sparsity, entries) in enumerate(final_raw.items()):
            value = _sparsity(mod, "final_sparsity", sparsity)
            targets.append(
                _Target(
                    mod,
                    _entries(mod, "final_sparsity", entries),
                    init or 0.0,
                    value,
                    dict(schedule),
                    label=f"{mod.location}.final_sparsity[{index}]",
                )
            )
    else:
        final = _sparsity(mod, "final_sparsity", final_raw)
        targets.append(
            _Target(
                mod, _entries(mod, "params", mod.raw("params")), init or 0.0, final, dict(schedule), label=mod.location
            )
        )
    for target in targets:
        if init is not None and init > target.final:
            mod.problem(
                "init_sparsity",
                f"{init} is above final_sparsity {target.final}",
                "give init_sparsity <= final_sparsity",
            )
    woodfisher = _obs_settings(mod) if is_obs else None
    method = "woodfisher" if is_obs else "magnitude"
    out.prunings.append(
        _Pruning(mod, method, "global" if global_ranking else "uniform", woodfisher, start, end, leave_enabled, targets)
    )


def _sparseml_version(variables: dict[str, Any]) -> tuple[int, int] | None:
    match = re.fullmatch(r"\s*v?(\d+)\.(\d+)(?:\.\d+)?\s*", str(variables.get("version", "")))
    return (int(match.group(1)), int(match.group(2))) if match else None


def _obs_settings(mod: Modifier) -> dict[str, Any]:
    woodfisher: dict[str, Any] = {
        "num_grads": mod.integer("num_grads", SPARSEML_OBS_DEFAULTS["num_grads"]),
        "damp": mod.number("damp", SPARSEML_OBS_DEFAULTS["damp"]),
        "recompute_steps": mod.integer("num_recomputations", SPARSEML_OBS_DEFAULTS["num_recomputations"]),
        "fisher_type": "empirical",
        # SparseML's unstructured OBS update sums the single-weight OBS corrections: our 'independent'.
        "update": "independent",
    }
    for name, ours in (("num_grads", "num_grads"), ("damp", "damp"), ("num_recomputations", "recompute_steps")):
        if not mod.has(name):
            mod.defaulted(name, f"pruning.woodfisher.{ours} = {woodfisher[ours]:g} (SparseML's default)")
    if mod.has("fisher_block_size"):
        woodfisher["block_size"] = mod.integer("fisher_block_size")
    else:
        version = _sparseml_version(mod.ctx.variables)
        if version is not None and version >= (1, 5):
            block, why = OBS_BLOCK_DEFAULT_FROM_1_5, f"SparseML {version[0]}.{version[1]}'s default (1 from 1.5 on)"
        elif version is not None:
            block, why = OBS_BLOCK_DEFAULT_UP_TO_1_4, f"SparseML {version[0]}.{version[1]}'s default (50 up to 1.4)"
        else:
            block, why = (
                OBS_BLOCK_DEFAULT_UP_TO_1_4,
                (
                    "SparseML's default up to 1.4; from 1.5 it is 1 (a diagonal "
                    "Fisher): the recipe has no 'version:', so set fisher_block_size "
                    "if it was written for 1.5 or later"
                ),
            )
            mod.ctx.note(f"{mod.label}: fisher_block_size not set: using 50, {why}")
        woodfisher["block_size"] = block
        mod.defaulted("fisher_block_size", f"pruning.woodfisher.block_size = {block} ({why})")
    mod.ctx.note(
        f"{mod.label}: woodfisher.update 'independent' reproduces SparseML's summed single-weight OBS "
        "update; set it to 'joint' for the exact joint update"
    )
    sampler = mod.raw("grad_sampler_kwargs", None) or {}
    if not isinstance(sampler, dict):
        raise mod.stop(
            "grad_sampler_kwargs", f"expected a mapping, got {sampler!r}", "write grad_sampler_kwargs: {batch_size: 8}"
        )
    for key in sampler:
        if key != "batch_size":
            mod.problem(
                "grad_sampler_kwargs", f"key '{key}' is not supported", "only grad_sampler_kwargs.batch_size maps"
            )
    if "batch_size" in sampler:
        batch = sampler["batch_size"]
        if isinstance(batch, bool) or not isinstance(batch, (int, float)) or batch != int(batch) or batch < 1:
            raise mod.stop(
                "grad_sampler_kwargs",
                f"batch_size must be a positive whole number, got {batch!r}",
                "e.g. batch_size: 8",
            )
        woodfisher["grad_batch_size"] = int(batch)
    else:
        mod.defaulted(
            "grad_sampler_kwargs",
            "pruning.woodfisher.grad_batch_size from the base recipe or its "
            "default (SparseML would use the training batch size)",
        )
    for name, ours in (
        ("num_grads", "num_grads"),
        ("fisher_block_size", "block_size"),
        ("num_recomputations", "recompute_steps"),
    ):
        if woodfisher[ours] < 1:
            mod.problem(name, f"must be >= 1, got {woodfisher[ours]}", "give a whole number >= 1")
    if woodfisher["damp"] <= 0:
        mod.problem("damp", f"must be > 0, got {woodfisher['damp']}", "give a small positive dampening, e.g. 1e-7")
    return woodfisher


def _parse_constant(mod: Modifier, out: _Parsed) -> None:
    """ConstantPruningModifier: keep the zeros its parameters have (masks held), nothing more."""
    mod.check_fields(required=("params",), optional=("start_epoch", "end_epoch", "update_frequency"))
    if mod.has("update_frequency"):
        mod.ignored("update_frequency", "masks are held at every step")
    start = max(mod.epoch("start_epoch", -1.0), 0.0)
    end = mod.epoch("end_epoch", -1.0)
    out.holds.append(_Hold(mod, _entries(mod, "params", mod.raw("params")), start, end))


_PARSERS: dict[str, Callable[[Modifier, Any], None]] = {
    "EpochRangeModifier": _parse_epoch_range,
    "SetLearningRateModifier": lambda mod, out: parse_set_lr(mod, out.lr),
    "LearningRateFunctionModifier": lambda mod, out: parse_lr_function(mod, out.lr),
    "LearningRateModifier": lambda mod, out: parse_lr_class(mod, out.lr),
    "SetWeightDecayModifier": lambda mod, out: parse_weight_decay(mod, out.lr),
    "ConstantPruningModifier": _parse_constant,
    "QuantizationModifier": lambda mod, out: parse_quantization(mod, out.quantize),
    **{tag: _parse_pruning for tag in _PRUNING_TAGS},
}


# =============================================================================================
# Training length


def _compose_epochs(parsed: _Parsed, ctx: Context) -> int | None:
    last = parsed.last_epoch()
    if last < 0:
        return None
    if parsed.epoch_ranges:
        declared = max(r.end for r in parsed.epoch_ranges)
        source = max(parsed.epoch_ranges, key=lambda r: r.end).mod
        if declared + _EPOCH_TOLERANCE < last:
            ctx.note(
                f"EpochRangeModifier ends at {declared:g} but another modifier runs until {last:g}; "
                f"fine-tuning for {last:g} epochs as SparseML would"
            )
    else:
        ctx.note(f"no EpochRangeModifier: fine-tuning until the last modifier ends (epoch {last:g}), as SparseML does")
        source = None
    if abs(last - round(last)) <= _EPOCH_TOLERANCE:
        epochs = int(round(last))
    elif ctx.allow_rounding:
        epochs = math.ceil(last)
        ctx.note(f"rounded the training length {last:g} up to {epochs} epochs")
    else:
        where = source.where("end_epoch") if source is not None else "recipe"
        ctx.problem(
            where,
            f"training ends at epoch {last:g}, not a whole number of epochs",
            "end the last modifier (or an !EpochRangeModifier) on a whole epoch, e.g. 10.0",
        )
        return None
    for item in parsed.epoch_ranges:
        item.mod.became(
            "end_epoch",
            f"finetune.epochs = {epochs}"
            if item.mod is source
            else f"(a later EpochRangeModifier sets finetune.epochs = {epochs})",
        )
    return epochs


# =============================================================================================
# Parameters: SparseML's names and patterns against the model


def _match_target(target: _Target, model: ModelParams, field_name: str, ctx: Context) -> None:
    """Fill `target.selected` (conv/linear weights, model order); record problems and notes."""
    mod = target.mod
    missing: list[str] = []
    selected: set[str] = set()
    for entry in target.entries:
        match = match_entry(entry, model)
        if not match.prunable and not match.other:
            missing.append(entry)
            continue
        if not match.prunable:
            mod.problem(
                field_name,
                f"{entry!r} matches only parameters wf-pipeline never prunes "
                f"({describe_names(match.other)}; it prunes conv/linear weights)",
                "remove it, or name conv/linear weights",
            )
            continue
        if match.other:
            if match.explicit:  # cannot happen for one name, kept for clarity
                continue
            kinds = sorted({model.params[name].module_type for name in match.other})
            ctx.note(
                f"{mod.label}: {entry!r} also matches {len(match.other)} parameter(s) SparseML would prune "
                f"but wf-pipeline does not ({', '.join(kinds)}: {describe_names(match.other, 4)}); wf-pipeline "
                "prunes conv/linear weights only, so they stay dense"
            )
        selected.update(match.prunable)
    if missing:
        ctx.problem(
            mod.where(field_name),
            f"{len(missing)} of {len(target.entries)} parameter names/patterns match no parameter of "
            f"{model.description}: {', '.join(missing)}",
            "pass --base with a wf-pipeline recipe whose model has these parameters (model.name: a "
            "torchvision name or 'module:factory'), or fix the names",
        )
    target.selected = [name for name in model.prunable if name in selected]


def _check_refused_names(mod: Modifier, model: ModelParams) -> None:
    """A refused modifier's `params` are checked against the model too, so the user sees every problem in one
    run instead of meeting a misspelt name only after removing the modifier."""
    if "params" not in mod.fields:
        return
    try:
        entries = _entries(mod, "params", mod.deref(mod.fields["params"]))
    except StopModifier:
        return
    matches = [match_entry(entry, model) for entry in entries]
    missing = [match.entry for match in matches if not match.prunable and not match.other]
    if missing:
        mod.problem("params", f"{len(missing)} of {len(entries)} parameter names/patterns match no parameter of "
                    f"{model.description}: {', '.join(missing)}", "fix the names")


def _check_overlaps(targets: list[_Target], ctx: Context) -> None:
    owner: dict[str, _Target] = {}
    for target in targets:
        clash = [name for name in target.selected if name in owner]
        for name in clash:
            other = owner[name]
            if other.mod is target.mod and not target.hold:
                continue  # the same modifier's map: SparseML keeps a parameter's first sparsity
            ctx.problem(
                f"{other.mod.label} and {target.mod.label}",
                f"both select {describe_names(clash)}",
                "give every parameter to one pruning modifier",
            )
            break
        for name in target.selected:
            owner.setdefault(name, target)
    for target in targets:  # the first entry of a map that names a parameter wins, as in SparseML
        first = [name for name in target.selected if owner[name] is target]
        target.selected = first


# =============================================================================================
# Pruning


def _hold_targets(
    parsed: _Parsed, pruned: dict[str, _Pruning], epochs: int, ctx: Context, model: ModelParams
) -> tuple[list[_Target], set[str]]:
    """ConstantPruningModifiers: accepted where they only hold masks.

    Returns the hold groups (parameters no pruning modifier prunes: their existing zeros are kept) and
    the pruned parameters a ConstantPruningModifier holds once their pruning ends.
    """
    targets: list[_Target] = []
    held_after_pruning: set[str] = set()
    already_held: set[str] = set()
    for hold in parsed.holds:
        mod = hold.mod
        if 0 <= hold.end < epochs:
            mod.problem(
                "end_epoch",
                f"releasing the masks at epoch {hold.end:g} lets pruned weights grow back "
                f"before training ends (epoch {epochs}); wf-pipeline holds masks to the end",
                "remove end_epoch (or set -1)",
            )
            continue
        if mod.has("end_epoch"):
            mod.became("end_epoch", "masks held until export (wf-pipeline never releases them)")
        target = _Target(
            mod,
            hold.entries,
            0.0,
            0.0,
            {"kind": "constant", "start_epoch": 0.0, "end_epoch": 0.0, "frequency": 1.0},
            label=mod.location,
            hold=True,
        )
        _match_target(target, model, "params", ctx)
        early = sorted(
            {pruned[name].mod.label for name in target.selected if name in pruned and hold.start < pruned[name].end}
        )
        if early:
            mod.problem(
                "start_epoch",
                f"holds masks from epoch {hold.start:g} while {', '.join(early)} still prunes the same parameters",
                "start it where those pruning modifiers end (or leave it out)",
            )
            continue
        own = [name for name in target.selected if name not in pruned and name not in already_held]
        already_held.update(own)
        redundant = [name for name in target.selected if name in pruned]
        # masks handed over where pruning ends; a later start would let SparseML's weights regrow in between
        held_after_pruning.update(n for n in redundant if hold.start <= pruned[n].end + _EPOCH_TOLERANCE)
        if redundant:
            ctx.note(
                f"{mod.label}: the masks of {len(redundant)} parameter(s) it holds are kept anyway: "
                "wf-pipeline never releases masks"
            )
        if own and hold.start > 0:
            ctx.note(
                f"{mod.label}: the existing zeros of {describe_names(own, 4)} are held from epoch 0, not from "
                f"epoch {hold.start:g} (the same unless those weights have exact zeros that training before "
                f"epoch {hold.start:g} would fill)"
            )
        target.selected = own
        if mod.has("start_epoch"):
            mod.became(
                "start_epoch",
                "masks held from the start of fine-tuning"
                if not own or hold.start <= 0
                else f"held from epoch 0 (see note), SparseML: {hold.start:g}",
            )
        if own:
            targets.append(target)
        else:
            mod.became("params", "nothing to add: wf-pipeline keeps every pruned weight at zero until export")
    return targets, held_after_pruning


def _check_leave_enabled(prunings: list[_Pruning], held: set[str], epochs: int, ctx: Context) -> None:
    for pruning in prunings:
        mod = pruning.mod
        if pruning.leave_enabled:
            if mod.has("leave_enabled"):
                mod.became("leave_enabled", "pruned weights stay zero until export (always so in wf-pipeline)")
            continue
        released = [n for t in pruning.targets for n in t.selected if n not in held]
        if pruning.end < epochs and released:
            mod.problem(
                "leave_enabled",
                f"false releases the masks at epoch {pruning.end:g}, so pruned weights grow "
                f"back before training ends (epoch {epochs}); wf-pipeline keeps them pruned",
                "set leave_enabled: true, or hold the masks with a !ConstantPruningModifier from end_epoch",
            )
        else:
            mod.ignored(
                "leave_enabled",
                "false changes nothing here: training ends with the pruning, or a "
                "ConstantPruningModifier holds the masks",
            )


def _group_dict(target: _Target, patterns: list[str]) -> dict[str, Any]:
    return {
        "name": target.label,
        "layers": patterns,
        "initial_sparsity": target.initial,
        "final_sparsity": target.final,
        "schedule": dict(target.schedule),
    }


def _merge_same(targets: list[_Target], ranking: str, ctx: Context) -> list[_Target]:
    """Layer-wise targets with the same sparsities and schedule prune as one: merge them (exact)."""
    if ranking != "uniform":
        return targets
    merged: list[_Target] = []
    for target in targets:
        twin = next(
            (
                m
                for m in merged
                if not target.hold
                and not m.hold
                and m.initial == target.initial
                and m.final == target.final
                and m.schedule == target.schedule
            ),
            None,
        )
        if twin is None:
            merged.append(
                _Target(
                    target.mod,
                    list(target.entries),
                    target.initial,
                    target.final,
                    dict(target.schedule),
                    target.label,
                    list(target.selected),
                    target.hold,
                )
            )
            continue
        twin.entries += [e for e in target.entries if e not in twin.entries]
        twin.selected += target.selected
        ctx.note(f"merged {target.label} into {twin.label}: same sparsities and schedule, layer-wise ranking")
    return merged


def _compose_pruning(parsed: _Parsed, model: ModelParams, epochs: int | None, ctx: Context) -> dict[str, Any] | None:
    prunings = parsed.prunings
    targets = [t for p in prunings for t in p.targets]
    for target in targets:
        _match_target(target, model, "final_sparsity" if target.label != target.mod.location else "params", ctx)
    _check_overlaps(targets, ctx)
    pruned = {name: p for p in prunings for t in p.targets for name in t.selected}
    training_end = epochs if epochs is not None else 0
    holds, held_after_pruning = _hold_targets(parsed, pruned, training_end, ctx, model)
    _check_leave_enabled(prunings, held_after_pruning, training_end, ctx)

    if not prunings:
        if not parsed.holds:
            return None
        names = [n for t in holds for n in t.selected]
        patterns = layer_patterns([e for t in holds for e in t.entries], names, model) if names else [".*"]
        for hold in parsed.holds:
            hold.mod.became("params", f"pruning.layers = {patterns} with pruning.method none: existing zeros are held")
        return {"method": "none", "layers": patterns}

    first = prunings[0]
    for other in prunings[1:]:
        aspects: list[tuple[str, Any, Any]] = [
            ("method", first.method, other.method),
            ("ranking", first.ranking, other.ranking),
        ]
        if first.method == other.method:
            aspects.append(("OBS settings", first.woodfisher, other.woodfisher))
        differing = [f"{what} ({a!r} vs {b!r})" for what, a, b in aspects if a != b]
        if differing:
            ctx.problem(
                f"{first.mod.label} and {other.mod.label}",
                f"differ in {', '.join(differing)}; wf-pipeline prunes every group with one method, "
                "one ranking and one set of OBS settings",
                "make them agree, or convert them separately",
            )
    targets = _merge_same(targets, first.ranking, ctx) + holds
    pruning: dict[str, Any] = {"method": first.method, "ranking": first.ranking}
    if first.woodfisher is not None:
        pruning["woodfisher"] = first.woodfisher
    if len(targets) == 1:
        only = targets[0]
        patterns = layer_patterns(only.entries, only.selected, model)
        pruning.update(
            initial_sparsity=only.initial, final_sparsity=only.final, schedule=dict(only.schedule), layers=patterns
        )
        _record_pruning_fields(prunings, {only.label: "pruning"}, first.ranking)
        return pruning
    groups = []
    where: dict[str, str] = {}
    for index, target in enumerate(targets):
        groups.append(_group_dict(target, layer_patterns(target.entries, target.selected, model)))
        where.setdefault(target.label, f"pruning.groups[{index}]")
    pruning["groups"] = groups
    _record_pruning_fields(prunings, where, first.ranking)
    for target in holds:
        target.mod.became("params", f"{where[target.label]}: a group held at sparsity 0 (its existing zeros kept)")
    return pruning


def _record_pruning_fields(prunings: list[_Pruning], where: dict[str, str], ranking: str) -> None:
    for pruning in prunings:
        mod = pruning.mod
        places = [where.get(t.label) for t in pruning.targets]
        merged_into = [p for p in places if p is not None] or ["pruning"]
        place = merged_into[0] if len(set(merged_into)) == 1 else " / ".join(dict.fromkeys(merged_into))
        targets = {
            "params": f"{place}.layers",
            "init_sparsity": f"{place}.initial_sparsity = {pruning.targets[0].initial:g}",
            "final_sparsity": f"{place}.final_sparsity"
            + (f" = {pruning.targets[0].final:g}" if len(pruning.targets) == 1 else " (one group per target)"),
            "start_epoch": f"{place}.schedule.start_epoch = {pruning.start:g}",
            "end_epoch": f"{place}.schedule.end_epoch = {pruning.end:g}",
            "update_frequency": f"{place}.schedule.frequency = {pruning.targets[0].schedule['frequency']:g} epochs "
            "(the stage turns it into optimizer steps, no rounding)",
            "inter_func": f"{place}.schedule.kind = {pruning.targets[0].schedule['kind']}",
            "global_sparsity": f"pruning.ranking = {ranking}",
            "num_grads": "pruning.woodfisher.num_grads",
            "damp": "pruning.woodfisher.damp",
            "fisher_block_size": "pruning.woodfisher.block_size",
            "num_recomputations": "pruning.woodfisher.recompute_steps",
            "grad_sampler_kwargs": "pruning.woodfisher.grad_batch_size",
        }
        for name in mod.unrecorded_fields():
            if name in targets:
                mod.became(name, targets[name])
        if not mod.has("global_sparsity"):
            mod.defaulted(
                "global_sparsity",
                f"pruning.ranking = {ranking} ({'global' if ranking == 'global' else 'layer-wise'} "
                f"for !{mod.tag}, SparseML's default)",
            )
        mod.ctx.records.append(Record(f"{mod.location} !{mod.tag}", "", "became", f"pruning.method = {pruning.method}"))


# =============================================================================================
# Base recipe: model, and its skip / min_layer_params against the recipe's explicit names


def _apply_base_selection(
    pruning: dict[str, Any], base_pruning: dict[str, Any], model: ModelParams, explicit: set[str], ctx: Context
) -> None:
    """Base `pruning.skip` / `min_layer_params` must not change what the SparseML recipe prunes: where they
    drop a parameter the recipe names explicitly, the recipe wins; where they drop one it selects by a
    pattern, the conflict is an error."""
    skip = [p for p in base_pruning.get("skip", []) or [] if isinstance(p, str)]
    minimum = base_pruning.get("min_layer_params", 0) or 0
    if not skip and not minimum:
        return
    groups = pruning.get("groups") or [{"layers": pruning.get("layers", [".*"]), "name": "pruning"}]
    selected = [n for g in groups for n in select_with(g["layers"], [], 0, model)]
    kept = set(select_with([".*"], skip, int(minimum), model))
    dropped = [n for n in selected if n not in kept]
    if not dropped:
        return
    by_pattern = [n for n in dropped if n not in explicit]
    if by_pattern:
        ctx.problem(
            "base recipe pruning.skip / min_layer_params",
            f"would leave {describe_names(by_pattern)} dense, which the SparseML recipe prunes (selected "
            f"by a pattern or __ALL_PRUNABLE__)",
            "remove those entries from the base recipe's pruning.skip / min_layer_params, or leave the "
            "parameters out of the SparseML params",
        )
        return
    conflicting = [p for p in skip if any(re.search(p, n) for n in dropped)]
    pruning["skip"] = [p for p in skip if p not in conflicting]
    if any(model.params[n].numel < minimum for n in dropped):
        pruning["min_layer_params"] = 0
    ctx.note(
        f"the SparseML recipe names {describe_names(dropped)} explicitly: they are pruned although the base "
        f"recipe's pruning.skip {conflicting} / min_layer_params {minimum} would leave them dense"
    )


# =============================================================================================
# Entry points


@dataclass
class Translation:
    raw: dict[str, Any]
    notes: list[str]
    records: list[Record]
    model: str
    variables: dict[str, Any]

    def header(self, source: str = "") -> str:
        """A YAML comment block: what every SparseML field became, was defaulted to, or why it was ignored."""
        lines = [
            f"Translated from the SparseML recipe {source}".rstrip() + " by wf-pipeline recipe convert.",
            f"Runs on {self.model}; every parameter name and pattern was checked against it.",
            "Sections SparseML does not describe (model, data, optimizer name and momentum, export, validate, "
            "...) come from the base recipe or wf-pipeline's defaults.",
        ]
        if self.variables:
            lines += ["", "Recipe variables (after evaluation):"]
            lines += [f"  {name} = {show(value)}" for name, value in self.variables.items()]
        for outcome, title in (
            ("became", "What each SparseML field became:"),
            ("defaulted", "Not set in the SparseML recipe (defaulted):"),
            ("ignored", "Ignored, and why:"),
        ):
            chosen = [r for r in self.records if r.outcome == outcome]
            if chosen:
                lines += ["", title]
                lines += [
                    f"  {r.source}" + ("" if r.value in ("", "(not set)") else f" = {r.value}") + f" -> {r.detail}"
                    for r in chosen
                ]
        notes = [note for note in self.notes if not note.startswith("runs on ")]  # said at the top
        if notes:
            lines += ["", "Notes:"] + [f"  {note}" for note in notes]
        return "".join(f"# {line}".rstrip() + "\n" for line in lines) + "\n"


def _evaluate_values(value: Any, variables: dict[str, Any]) -> Any:
    if is_eval_string(value):
        return evaluate_expression(eval_body(value), variables)
    if isinstance(value, list):
        return [_evaluate_values(item, variables) for item in value]
    if isinstance(value, dict):
        return {_evaluate_values(key, variables): _evaluate_values(item, variables) for key, item in value.items()}
    return value


def _collect_modifiers(raw: dict[str, Any], ctx: Context) -> list[Modifier]:
    modifiers: list[Modifier] = []
    for key, entries in raw.items():
        if not _is_modifier_list_key(key) or entries is None:
            continue
        if not isinstance(entries, list):
            ctx.problem(
                f"recipe '{key}'",
                f"must be a list of modifiers, got {type(entries).__name__}",
                f"write it as '{key}:' followed by lines like '  - !GMPruningModifier'",
            )
            continue
        for index, entry in enumerate(entries):
            location = f"{key}[{index}]"
            if not isinstance(entry, dict) or MODIFIER_KEY not in entry:
                ctx.problem(
                    f"recipe {location}",
                    "is not a tagged modifier",
                    "each entry must start with a tag such as '- !GMPruningModifier'",
                )
                continue
            tag = str(entry[MODIFIER_KEY]).removeprefix("pytorch.")
            evaluated: dict[str, Any] = {}
            for name, value in entry.items():
                if name == MODIFIER_KEY:
                    continue
                try:
                    evaluated[name] = _evaluate_values(value, ctx.variables)
                except ExpressionError as exc:
                    ctx.problem(f"!{tag} ({location}) field '{name}'", exc.message, exc.hint or "fix the expression")
            modifiers.append(Modifier(tag, location, evaluated, ctx))
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


def _section(raw: dict[str, Any], key: str) -> dict[str, Any]:
    value = raw.get(key)
    return value if isinstance(value, dict) else {}


def _explicit_names(parsed: _Parsed) -> set[str]:
    entries = [e for p in parsed.prunings for t in p.targets for e in t.entries]
    entries += [e for h in parsed.holds for e in h.entries]
    return {e for e in entries if not e.startswith("re:") and e not in (ALL_PRUNABLE, ALL)}


def translate_sparseml(
    raw: dict[str, Any],
    *,
    model: ModelParams | ModelCatalog,
    base: dict[str, Any] | None = None,
    allow_rounding: bool = False,
) -> Translation:
    """Translate a loaded SparseML recipe into a raw wf-pipeline recipe dict, notes and a per-field account.

    ``base`` holds the user's own wf-pipeline sections (model, data, export, ...); without one the bundled
    default model and data are used (and said so). The SparseML recipe supplies only ``pruning`` and
    ``finetune`` values, merged over ``base``. ``model`` gives the parameters of the model the recipe will
    run on: a :class:`ModelParams`, or a catalog function that builds them from the base recipe
    (``wf_pipeline.models.catalog.model_params``). With ``allow_rounding`` a training length that is not a
    whole number of epochs is rounded up (noted) instead of refused.
    Raises :class:`SparseMLRecipeError` listing every problem found. The caller validates the result.
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

    from_user = base is not None
    result = copy.deepcopy(base if base is not None else DEFAULT_BASE)
    raw_variables = {key: value for key, value in raw.items() if not _is_modifier_list_key(key)}
    variable_errors: list[ExpressionError] = []
    variables = resolve_variables(raw_variables, variable_errors)
    if len(variable_errors) == 1:
        raise RecipeError(f"SparseML recipe: {variable_errors[0].message}", hint=variable_errors[0].hint)
    if variable_errors:  # every bad variable at once (modifiers that use them would only repeat them)
        raise SparseMLRecipeError([Problem("recipe variables", exc.message, exc.hint or "fix the expression")
                                   for exc in variable_errors])
    ctx = Context(variables=variables, allow_rounding=allow_rounding)
    if not isinstance(model, ModelParams):
        model = model(result, from_user)
    ctx.note(
        f"runs on {model.description}"
        + ("" if from_user else "; pass --base with a wf-pipeline recipe to choose the model and data")
    )

    parsed = _Parsed()
    modifiers = _collect_modifiers(raw, ctx)
    for mod in modifiers:
        parser = _PARSERS.get(mod.tag)
        if parser is None:
            hint = _UNSUPPORTED_HINTS.get(mod.tag, f"supported modifiers: {', '.join(_SUPPORTED_TAGS)}")
            mod.problem(None, "this modifier has no wf-pipeline translation", hint)
            _check_refused_names(mod, model)
            continue
        try:
            parser(mod, parsed)
        except StopModifier:
            pass

    finetune: dict[str, Any] = {}
    epochs = _compose_epochs(parsed, ctx)
    if epochs is not None:
        finetune["epochs"] = epochs
    base_finetune = _section(result, "finetune")
    base_optimizer = _section(base_finetune, "optimizer")
    if epochs is None and parsed.last_epoch() >= 0:
        lr = compose(LRModifiers(), 0, None, ctx)  # the training length is wrong: already a problem
    else:
        lr = compose(parsed.lr, epochs or 0, base_optimizer.get("lr") if from_user else None, ctx)
    if lr.optimizer:
        finetune["optimizer"] = dict(lr.optimizer)
    pruning = _compose_pruning(parsed, model, epochs, ctx)
    base_pruning = _section(result, "pruning")
    if pruning is not None:
        _apply_base_selection(pruning, base_pruning, model, _explicit_names(parsed), ctx)

    for mod in modifiers:  # every field is accounted for in the header
        for name in mod.unrecorded_fields():
            if not any(p.where.startswith(mod.label) for p in ctx.problems):
                mod.became(name, "read (see the notes)")
    if ctx.problems:
        raise SparseMLRecipeError(ctx.problems)

    if finetune:
        section = _merge_into(result, "finetune", finetune, "")
        if lr.schedule is not None:
            section["lr_schedule"] = lr.schedule  # replaced whole: leftovers from base would change its meaning
    if pruning is not None:
        section = _merge_into(result, "pruning", {k: v for k, v in pruning.items() if k != "groups"}, "")
        if "groups" in pruning:
            for unused in ("layers", "initial_sparsity", "final_sparsity", "schedule"):
                section.pop(unused, None)  # not read when groups are given: base leftovers would only mislead
            section["groups"] = pruning["groups"]
        else:
            section["layers"] = pruning["layers"]
            section.pop("groups", None)
    elif isinstance(result.get("pruning"), dict):
        ctx.note("no pruning modifier: keeping the base recipe's pruning section")
    else:
        result["pruning"] = {"method": "none"}
        ctx.note("no pruning modifier: pruning.method set to none (fine-tuning only)")
    if parsed.quantize:
        _merge_into(result, "quantize", parsed.quantize, "")
    shown = {
        name: value for name, value in variables.items() if not isinstance(value, (dict, list)) or len(str(value)) < 200
    }
    return Translation(result, ctx.notes, _in_recipe_order(ctx.records, modifiers), model.description, shown)


def _in_recipe_order(records: list[Record], modifiers: list[Modifier]) -> list[Record]:
    """Records sorted as the recipe is written: by modifier, then by field (defaults after written fields)."""
    position: dict[str, tuple[int, int]] = {}
    for index, mod in enumerate(modifiers):
        position[f"{mod.location} !{mod.tag}"] = (index, -1)
        for order, name in enumerate(mod.fields):
            position[mod.source(name)] = (index, order)

    def key(record: Record) -> tuple[int, int]:
        if record.source in position:
            return position[record.source]
        owner = record.source.rsplit(".", 1)[0]
        return (position.get(owner, (len(modifiers), 0))[0], len(record.source) + 10_000)

    return sorted(records, key=key)


def convert_sparseml(
    raw: dict[str, Any],
    *,
    model: ModelParams | ModelCatalog,
    base: dict[str, Any] | None = None,
    allow_rounding: bool = False,
) -> tuple[dict[str, Any], list[str]]:
    """``translate_sparseml`` returning just (raw wf-pipeline recipe dict, notes)."""
    translation = translate_sparseml(raw, model=model, base=base, allow_rounding=allow_rounding)
    return translation.raw, translation.notes


def conversion_header(
    text: str,
    source: str,
    *,
    model: ModelParams | ModelCatalog,
    base: dict[str, Any] | None = None,
    overrides: list[str] | None = None,
    base_source: str | None = None,
    base_text: str | None = None,
) -> str:
    """The comment block `recipe convert` writes above a translated SparseML recipe ('' for our own recipes):
    the provenance (the source's sha256, the ``--base`` recipe's path and sha256), then the per-field account."""
    if "Modifier" not in text:
        return ""
    raw = load_sparseml_text(text)
    if not is_sparseml_recipe(raw):
        return ""
    header = translate_sparseml(raw, model=model, base=base).header(source)
    first, rest = header.split("\n", 1)
    provenance = [f"# Source sha256: {_sha256(text)}"]
    provenance.append(f"# Base recipe: {base_source} (sha256: {_sha256(base_text or '')})" if base_source is not None
                      else "# Base recipe: none (the bundled default model and data)")
    header = "\n".join([first, *provenance, rest])
    if overrides:
        header = header[:-1] + f"# --set overrides applied after the translation: {', '.join(overrides)}\n\n"
    return header


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
