"""Load a recipe file (ours or SparseML's), apply --set overrides, validate, and explain errors in one line.

The one entry point of SparseML compatibility: this module is the only one outside `wf_pipeline.recipe.sparseml`
that imports it (tests/test_architecture.py checks), so a SparseML recipe is translated here and the
rest of the pipeline only ever sees our recipe.
"""
from __future__ import annotations

import copy
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml
from pydantic import ValidationError

from wf_pipeline.errors import RecipeError
from wf_pipeline.recipe import sparseml
from wf_pipeline.recipe.schema import Recipe

if TYPE_CHECKING:
    from wf_pipeline.recipe.param_catalog import ModelCatalog

# Hints for pydantic's error types: what the user should do about each.
_HINTS = {
    "extra_forbidden": "remove it or check its spelling (`wf-pipeline recipe show` prints every valid field)",
    "missing": "add this field",
    "literal_error": "use one of the allowed values",
    "greater_than": "raise the value",
    "greater_than_equal": "raise the value",
    "less_than": "lower the value",
    "less_than_equal": "lower the value",
    "int_parsing": "give a whole number",
    "int_from_float": "give a whole number",
    "float_parsing": "give a number",
    "bool_parsing": "use true or false",
    "string_type": "give a string",
    "list_type": "give a list, e.g. [a, b]",
    "dict_type": "give a mapping of keys to values",
    "model_type": "give a mapping of this section's fields",
    "string_pattern_mismatch": "use only letters, digits, '.', '_' and '-'",
    "value_error": "fix the value as the message says",
    "finite_number": "give a finite number (not .inf or .nan)",
}

# Bounds on a recipe's size after YAML aliases are expanded: a few anchors nested in each other
# (an "alias bomb") would otherwise make validation and printing take unbounded time and memory.
MAX_VALUES = 100_000
MAX_DEPTH = 64
# A recipe is a small text file: a bigger one (or a device such as /dev/zero) is not a recipe.
MAX_RECIPE_BYTES = 1_000_000
# Whole numbers reach torch and numpy as 64-bit integers.
_INT64 = 2 ** 63
# A --set key: field names joined by single dots.
_OVERRIDE_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*")


def _field_path(loc: tuple[Any, ...]) -> str:
    return ".".join(str(part) for part in loc) or "<recipe>"


def explain_validation_error(exc: ValidationError, source: str) -> RecipeError:
    """Turn pydantic's multi-line report into one line that names the field and the fix (first error)."""
    err = exc.errors(include_url=False)[0]
    field = _field_path(err["loc"])
    message = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    shown = "" if err["type"] in ("missing", "model_type") or isinstance(value, dict) else f" (got {value!r})"
    extra = f"; {len(exc.errors()) - 1} more problem(s) after fixing this" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        message = "unknown field"
    where = "" if field == "<recipe>" else f"{field}: "  # whole-recipe checks name their fields in the message
    return RecipeError(f"{source}: {where}{message}{shown}{extra}",
                       _HINTS.get(err["type"], "see the recipe reference in docs/recipe-reference.md"))


def parse_override(item: str) -> tuple[list[str], Any]:
    """'pruning.final_sparsity=0.95' -> (['pruning', 'final_sparsity'], 0.95); the value is read as YAML."""
    if "=" not in item:
        raise RecipeError(f"--set {item!r}: expected KEY=VALUE", "e.g. --set pruning.final_sparsity=0.95")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not _OVERRIDE_KEY.fullmatch(key):
        raise RecipeError(f"--set {item!r}: {key!r} is not a field path (names joined by single dots)",
                          "e.g. --set pruning.final_sparsity=0.95")
    parts = key.split(".")
    try:
        value = yaml.load(raw, Loader=sparseml.UniqueKeyLoader) if raw.strip() else None  # noqa: S506 - safe loader
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None)
        raise RecipeError(f"--set {item!r}: value is not valid YAML" + (f": {problem}" if problem else ""),
                          "quote strings that contain ':' or '#'") from exc
    return parts, value


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    out = copy.deepcopy(raw)
    for item in overrides:
        parts, value = parse_override(item)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise RecipeError(f"--set {item!r}: {part} is not a section",
                                  "override a leaf field such as pruning.final_sparsity")
            node = child
        node[parts[-1]] = value
    return out


def read_recipe_text(path: Path) -> str:
    """A recipe file's text: a regular file of at most MAX_RECIPE_BYTES of UTF-8 (never a device or pipe)."""
    if not path.exists():
        raise RecipeError(f"recipe file not found: {path}", "check the path (try `ls recipes/`)")
    if path.is_dir():
        raise RecipeError(f"recipe path is a folder: {path}", "give a .yaml recipe file")
    not_regular = RecipeError(f"recipe {path} is not a regular file", "give a .yaml recipe file")
    try:
        if not stat.S_ISREG(path.stat().st_mode):  # before opening: opening a pipe would wait for a writer
            raise not_regular
        with path.open("rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise not_regular
            data = handle.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise RecipeError(f"recipe {path} is larger than {MAX_RECIPE_BYTES:,} bytes", "give a .yaml recipe file")
        return data.decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise RecipeError(f"cannot read recipe {path}: {exc}", "give a UTF-8 YAML file") from exc


def check_whole_numbers(raw: Any, source: str, path: str = "") -> None:
    """Refuse a whole number that does not fit in 64 bits (torch and numpy take no larger), naming its field."""
    if isinstance(raw, dict):
        for key, value in raw.items():
            check_whole_numbers(value, source, f"{path}.{key}" if path else str(key))
    elif isinstance(raw, list):
        for index, value in enumerate(raw):
            check_whole_numbers(value, source, f"{path}.{index}")
    elif isinstance(raw, int) and not isinstance(raw, bool) and not -_INT64 <= raw < _INT64:
        raise RecipeError(f"{source}: {path or '<recipe>'}: {raw} does not fit in 64 bits",
                          f"give a whole number between {-_INT64:,} and {_INT64 - 1:,}")


def check_expansion(raw: Any, source: str) -> None:
    """Refuse a parsed recipe whose values, with every alias expanded, exceed MAX_VALUES or MAX_DEPTH.

    Walks the tree as a consumer would (an alias counts each time it is used), stopping at the bound,
    so the check itself costs at most MAX_VALUES steps.
    """
    count = 0
    stack: list[tuple[Any, int]] = [(raw, 0)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if count > MAX_VALUES:
            raise RecipeError(f"{source}: the recipe expands to more than {MAX_VALUES:,} values (nested YAML aliases?)",
                              "write the values out; a recipe needs no anchors nested in anchors")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{source}: the recipe is nested more than {MAX_DEPTH} levels deep",
                              "flatten it; no recipe field is nested that deep")
        if isinstance(node, dict):
            stack.extend((value, depth + 1) for value in node.values())
            stack.extend((key, depth + 1) for key in node if isinstance(key, (tuple, frozenset)))
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((item, depth + 1) for item in node)


def _safe_load(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=sparseml.UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise RecipeError(f"{source}: not valid YAML{where}: {getattr(exc, 'problem', exc)}",
                          "check indentation and quoting") from exc
    except RecursionError:
        raise RecipeError(f"{source}: the YAML is nested too deeply to read", "flatten it") from None


def parse_recipe_text(text: str, source: str, base: dict[str, Any] | None = None,
                      model_catalog: ModelCatalog | None = None) -> tuple[dict[str, Any], list[str]]:
    """YAML text -> raw dict in our format; SparseML recipes are translated (notes say how).

    `base` supplies the sections a SparseML recipe lacks (model, data, export, validate, ...); without it
    the translation uses the bundled default model and data, and says so. `model_catalog` lists the
    parameters of that model, which the translation checks the recipe's names against
    (``wf_pipeline.models.catalog.model_params``).
    """
    if "Modifier" in text:  # SparseML tags (!GMPruningModifier) are not plain YAML
        try:
            raw = sparseml.load_sparseml_text(text)
        except RecursionError:
            raise RecipeError(f"{source}: the YAML is nested too deeply to read", "flatten it") from None
        check_expansion(raw, source)
        if sparseml.is_sparseml_recipe(raw):
            return sparseml.convert_sparseml(raw, base=base, model=_require_catalog(model_catalog, source))
    raw = _safe_load(text, source)
    check_expansion(raw, source)
    if raw is None or raw == {}:
        raise RecipeError(f"{source}: the recipe is empty",
                          "name at least the model and its weights (see recipes/default.yaml); "
                          "an all-default recipe would prune a randomly initialised ResNet-20")
    if not isinstance(raw, dict):
        raise RecipeError(f"{source}: the recipe must be a mapping of sections (model, data, pruning, ...)",
                          "see recipes/ for examples")
    if sparseml.is_sparseml_recipe(raw):
        return sparseml.convert_sparseml(raw, base=base, model=_require_catalog(model_catalog, source))
    return raw, []


def _require_catalog(catalog: ModelCatalog | None, source: str) -> ModelCatalog:
    if catalog is None:
        raise RecipeError(f"{source} is a SparseML recipe: translating it needs the model's parameter names",
                          "pass model_catalog=wf_pipeline.models.catalog.model_params")
    return catalog


def recipe_header(path: str | Path, base_path: str | Path | None, overrides: list[str] | None,
                  model_catalog: ModelCatalog) -> str:
    """The comment block above a translated SparseML recipe: what each field became ('' for our recipes)."""
    base = base_text = None
    if base_path is not None:
        base_text = read_recipe_text(Path(base_path))
        base, _ = parse_recipe_text(base_text, str(base_path), model_catalog=model_catalog)
    return sparseml.conversion_header(read_recipe_text(Path(path)), str(path), model=model_catalog, base=base,
                                      overrides=overrides, base_source=None if base_path is None else str(base_path),
                                      base_text=base_text)


def validate_recipe(raw: dict[str, Any], source: str) -> Recipe:
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        raise explain_validation_error(exc, source) from None


def check_weights_named(raw: dict[str, Any], source: str) -> None:
    """A recipe that prunes must say which weights it starts from (`model.weights: null` for random ones)."""
    model = raw.get("model")
    if not isinstance(model, dict) or "weights" not in model:
        raise RecipeError(f"{source}: model.weights is not set, so the run would prune a randomly initialised model",
                          "set model.weights to a checkpoint file or builtin:resnet20-fmnist "
                          "(or to null to start from random weights on purpose)")


def load_recipe(path: str | Path, overrides: list[str] | None = None,
                base_path: str | Path | None = None, *, require_weights: bool = False,
                model_catalog: ModelCatalog | None = None) -> tuple[Recipe, list[str]]:
    """Read, translate if needed, override, validate. Returns the recipe and translation notes.

    `base_path` is a wf-pipeline recipe whose sections complete a SparseML recipe; `model_catalog` lists
    the parameters of its model (needed to translate a SparseML recipe, see `parse_recipe_text`). With
    `require_weights` (commands that prune), the recipe must name `model.weights`.
    """
    path = Path(path)
    base = None
    if base_path is not None:
        base, _ = parse_recipe_text(read_recipe_text(Path(base_path)), str(base_path), model_catalog=model_catalog)
    raw, notes = parse_recipe_text(read_recipe_text(path), str(path), base, model_catalog)
    raw = apply_overrides(raw, overrides or [])
    check_expansion(raw, str(path))
    check_whole_numbers(raw, str(path))
    recipe = validate_recipe(raw, str(path))
    if require_weights:
        check_weights_named(raw, str(path))
    return recipe, notes
