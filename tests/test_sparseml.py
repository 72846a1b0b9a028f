"""SparseML recipe translation: the safe eval(...) evaluator, the tagged-YAML loader and the converter."""

from __future__ import annotations

import ast
import inspect
import math
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from wf_pipeline.errors import RecipeError, WFError
from wf_pipeline.models.catalog import model_params
from wf_pipeline.models.zoo import set_trust_recipe_code
from wf_pipeline.recipe.param_catalog import ModelParams, ParamInfo
from wf_pipeline.recipe.schema import LRScheduleConfig, Recipe
from wf_pipeline.recipe.sparseml import (
    SparseMLRecipeError,
    Translation,
    is_sparseml_recipe,
    load_sparseml_text,
    safe_eval,
)
from wf_pipeline.recipe.sparseml import fields as sparseml_fields
from wf_pipeline.recipe.sparseml import lr as sparseml_lr
from wf_pipeline.recipe.sparseml import params as sparseml_params
from wf_pipeline.recipe.sparseml import translate as sparseml
from wf_pipeline.recipe.sparseml.safe_eval import ExpressionError, evaluate_expression, resolve_variables
from wf_pipeline.training.lr_schedule import lr_at

FIXTURES = Path(__file__).parent / "fixtures" / "sparseml"


def translate_sparseml(raw: dict[str, Any], **kwargs: Any) -> Translation:
    kwargs.setdefault("model", model_params)  # the models package builds the model the recipe runs on
    return sparseml.translate_sparseml(raw, **kwargs)


def convert_sparseml(raw: dict[str, Any], **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    translation = translate_sparseml(raw, **kwargs)
    return translation.raw, translation.notes


def load_fixture(name: str) -> dict[str, Any]:
    return load_sparseml_text((FIXTURES / name).read_text())


def convert_text(text: str, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    return convert_sparseml(load_sparseml_text(textwrap.dedent(text)), **kwargs)


def problems(text: str, **kwargs: Any) -> list[sparseml_fields.Problem]:
    with pytest.raises(SparseMLRecipeError) as info:
        convert_text(text, **kwargs)
    return info.value.problems


def gmp(tag: str = "GMPruningModifier", epochs: float = 6.0, **overrides: Any) -> str:
    """A one-pruning-modifier recipe over the default ResNet-20 whose fields can be overridden (None removes)."""
    fields: dict[str, Any] = {
        "params": "__ALL_PRUNABLE__",
        "init_sparsity": 0.05,
        "final_sparsity": 0.8,
        "start_epoch": 0.0,
        "end_epoch": 4.0,
        "update_frequency": 1.0,
    }
    fields.update(overrides)
    lines = "\n".join(
        f"    {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
        for k, v in fields.items()
        if v is not None
    )
    return (
        f"modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: {epochs}\n"
        f"  - !SetLearningRateModifier\n    start_epoch: 0.0\n    learning_rate: 0.01\n  - !{tag}\n{lines}\n"
    )


@pytest.fixture
def trusted() -> Any:
    """Let tests build the `tests.sparseml_zoo_models:*` factories (user code needs trust)."""
    set_trust_recipe_code(True)
    yield
    set_trust_recipe_code(False)


def params_model(names: list[str], prunable: bool = True) -> ModelParams:
    return ModelParams("model test-net", {name: ParamInfo(100, "Conv2d", prunable) for name in names})


# ---------------------------------------------------------------------------------------------
# safe_eval: what SparseML recipes evaluate, nothing more


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 // 2 + 7 % 2", 4),
        ("2 ** 10", 1024),
        ("-n + +3", -7),
        ("n / 4", 2.5),
        ("max(1, n - 12)", 1),
        ("min(n, 3.5)", 3.5),
        ("round(n / 3, 2)", 3.33),
        ("abs(-n)", 10),
        ("int(n / 4)", 2),
        ("float(n)", 10.0),
        ("name", "cosine"),  # a bare name returns the variable whole, as SparseML's eval(inter_func)
    ],
)
def test_safe_eval_arithmetic(expression: str, expected: Any) -> None:
    assert evaluate_expression(expression, {"n": 10, "flag": False, "name": "cosine"}) == expected


def test_safe_eval_returns_non_numeric_variables_whole() -> None:
    assert evaluate_expression("params", {"params": ["re:.*conv.*"]}) == ["re:.*conv.*"]


@pytest.mark.parametrize(
    ("expression", "fragment"),
    [
        ("__import__('os')", "'__import__' is not allowed"),
        ("__import__('os').system('true')", "attribute access"),
        ("().__class__", "attribute access"),
        ("(1).__class__.__bases__", "attribute access"),
        ("n.real", "attribute access"),
        ("lambda: 1", "lambda"),
        ("(lambda: 1)()", "lambda"),
        ("10**10**10", "exponent"),
        ("2 ** 62 * 2 ** 62", "too large"),
        ("unknown_name + 1", "unknown variable 'unknown_name'"),
        ("__builtins__", "double-underscore"),
        ("open('x')", "function 'open' is not allowed"),
        ("print(1)", "function 'print' is not allowed"),
        ("[x for x in range(3)]", "comprehensions"),
        ("[1, 2]", "list literals"),
        ("{'a': 1}", "dict literals"),
        ("params[0]", "subscripts"),
        ("'a' * 10", "numbers only"),
        ("round(n, ndigits=2)", "keyword arguments"),
        ("n / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("f'{n}'", "f-strings"),
        ("(y := 3)", "assignment expressions"),
        ("1 +", "cannot parse"),
        ("1e308 * 10", "not a finite number"),
        # beyond what SparseML evaluates
        ("1 < n <= 10", "comparisons"),
        ("n == 10", "comparisons"),
        ("n and 2", "and/or"),
        ("not n", "operator Not"),
        ("0.9 if n >= 10 else 0.8", "conditional expressions"),
        ("True + 1", "numbers only"),
        ("flag + 1", "arithmetic needs numbers"),
    ],
)
def test_safe_eval_rejects(expression: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate_expression(expression, {"n": 10, "params": ["a"], "flag": True})
    assert fragment in str(info.value)
    assert isinstance(info.value, WFError)  # the CLI shows it as one line, exit code 2


def test_safe_eval_refuses_oversized_expressions() -> None:
    with pytest.raises(ExpressionError, match="characters long"):
        evaluate_expression("1+" * 600 + "1", {})
    with pytest.raises(ExpressionError, match="too complex"):
        evaluate_expression("+".join(["n"] * 150), {"n": 1})


@pytest.mark.parametrize("module", [safe_eval, sparseml, sparseml_fields, sparseml_lr, sparseml_params])
def test_modules_never_call_python_eval_or_exec(module: Any) -> None:
    tree = ast.parse(inspect.getsource(module))
    called = {node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)}
    assert not called & {"eval", "exec", "compile", "__import__"}


def test_resolve_variables_in_dependency_order() -> None:
    resolved = resolve_variables(
        {
            "end": "eval(start + span)",  # defined before what it uses
            "span": "eval(total - start - 2)",
            "start": 1,
            "total": 12,
            "name": "cosine",
            "params": ["re:.*"],
            "alias": "eval(params)",
        }
    )
    assert resolved == {
        "end": 10,
        "span": 9,
        "start": 1,
        "total": 12,
        "name": "cosine",
        "params": ["re:.*"],
        "alias": ["re:.*"],
    }


def test_resolve_variables_detects_cycles() -> None:
    with pytest.raises(ExpressionError, match=r"cycle: a -> b -> c -> a"):
        resolve_variables({"a": "eval(b + 1)", "b": "eval(c * 2)", "c": "eval(a)"})
    with pytest.raises(ExpressionError, match=r"cycle: x -> x"):
        resolve_variables({"x": "eval(x + 1)"})


def test_resolve_variables_names_the_broken_variable() -> None:
    with pytest.raises(ExpressionError, match=r"recipe variable 'lr': .*unknown variable 'base'"):
        resolve_variables({"lr": "eval(base * 0.1)"})


# ---------------------------------------------------------------------------------------------
# loading, recipe cards included


def test_loader_records_modifier_tags() -> None:
    raw = load_fixture("gmp_cosine.yaml")
    assert [m["__modifier__"] for m in raw["modifiers"]] == [
        "EpochRangeModifier",
        "LearningRateFunctionModifier",
        "GMPruningModifier",
    ]
    assert raw["modifiers"][2]["params"] == "eval(prune_params)"


def test_recipe_card_after_a_licence_comment_parses_like_its_front_matter() -> None:
    text = (FIXTURES / "zoo_resnet50_card.md").read_text()
    assert text.startswith("<!--")
    front = text.split("---\n")[1]
    raw = load_sparseml_text(text)
    assert raw == yaml.load(front, Loader=sparseml.SparseMLLoader)
    assert raw["pruning_update_frequency"] == 0.4
    assert raw["pruning_modifiers"][0]["params"][0] == "sections.0.0.conv1.weight"  # anchors and aliases resolved
    assert raw["training_modifiers"][1]["lr_kwargs"]["milestones"] == [7, 10]


@pytest.mark.parametrize(
    "prefix",
    ["", "\n\n", "<!-- licence -->\n", "<!--\nmulti\nline\n-->\n\n<!-- second -->\n\n", "  <!-- x -->  \n"],
)
def test_front_matter_after_any_leading_comments_and_blank_lines(prefix: str) -> None:
    front = "num_epochs: 3\nmodifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 3\n"
    card = prefix + "---\n" + front + "---\n\n# Title\n\nText with --- in it.\n"
    raw = load_sparseml_text(card)
    assert raw["num_epochs"] == 3 and raw["modifiers"][0]["__modifier__"] == "EpochRangeModifier"


def test_front_matter_errors_point_at_the_yaml() -> None:
    with pytest.raises(RecipeError, match="cannot parse recipe YAML") as info:
        load_sparseml_text("<!-- c -->\n---\nlr: *undefined_anchor\n---\n")
    assert "anchor" in info.value.message and info.value.hint and "&anchor" in info.value.hint


def test_loader_equals_safe_load_for_plain_recipes() -> None:
    text = "name: demo\npruning:\n  final_sparsity: 0.95\n  layers: ['conv.*']\nfinetune:\n  epochs: 3\n"
    assert load_sparseml_text(text) == yaml.safe_load(text)
    assert load_sparseml_text("---\n" + text) == yaml.safe_load(text)


def test_loader_refuses_python_tags_and_bad_yaml() -> None:
    with pytest.raises(RecipeError, match="cannot parse recipe YAML"):
        load_sparseml_text("x: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(RecipeError, match="cannot parse recipe YAML"):
        load_sparseml_text("modifiers:\n  - !GMPruningModifier [1, 2]\n")
    with pytest.raises(RecipeError, match="mapping at the top level"):
        load_sparseml_text("- 1\n- 2\n")


def test_is_sparseml_recipe() -> None:
    for name in (
        "gmp_cosine.yaml",
        "obs_split.yaml",
        "global_magnitude_steps.yaml",
        "recipe_card.md",
        "zoo_resnet50_card.md",
    ):
        assert is_sparseml_recipe(load_fixture(name)), name
    assert is_sparseml_recipe({"stage_0": {"pruning_modifiers": []}})
    assert not is_sparseml_recipe(Recipe().to_dict())
    assert not is_sparseml_recipe({"pruning": {"final_sparsity": 0.9}})
    assert not is_sparseml_recipe(["modifiers"])


# ---------------------------------------------------------------------------------------------
# the model is always stated; names and patterns are checked against it


def test_the_model_is_always_stated() -> None:
    _, notes = convert_sparseml(load_fixture("gmp_cosine.yaml"))
    assert notes[0] == (
        "runs on model resnet20 (the bundled default (no --base recipe given)); pass --base with a "
        "wf-pipeline recipe to choose the model and data"
    )
    raw, notes = convert_sparseml(
        load_fixture("gmp_cosine.yaml"),
        base={"model": {"name": "resnet32", "in_channels": 1}, "data": {"dataset": "digits"}},
    )
    assert notes[0] == "runs on model resnet32 (from the --base recipe)"
    assert raw["model"]["name"] == "resnet32" and raw["data"] == {"dataset": "digits"}


RESNET50_NAMES = [  # a torchvision ResNet-50 recipe: 10 of these 17 names happen to exist in ResNet-20
    "conv1.weight",
    "layer1.0.conv1.weight",
    "layer1.0.conv2.weight",
    "layer1.0.conv3.weight",
    "layer1.0.downsample.0.weight",
    "layer1.1.conv1.weight",
    "layer1.1.conv2.weight",
    "layer1.1.conv3.weight",
    "layer2.0.conv1.weight",
    "layer2.0.conv2.weight",
    "layer2.0.conv3.weight",
    "layer3.0.conv1.weight",
    "layer3.0.conv2.weight",
    "layer3.0.conv3.weight",
    "layer4.0.conv1.weight",
    "layer4.0.conv2.weight",
    "fc.weight",
]


def test_a_recipe_for_another_architecture_fails_naming_what_the_model_lacks() -> None:
    (problem,) = problems(gmp(params=RESNET50_NAMES))
    lacking = [
        "layer1.0.conv3.weight",
        "layer1.0.downsample.0.weight",
        "layer1.1.conv3.weight",
        "layer2.0.conv3.weight",
        "layer3.0.conv3.weight",
        "layer4.0.conv1.weight",
        "layer4.0.conv2.weight",
    ]
    assert problem.where == "!GMPruningModifier (modifiers[2]) field 'params'"
    assert problem.message == (
        f"7 of 17 parameter names/patterns match no parameter of model resnet20 (the bundled "
        f"default (no --base recipe given)): {', '.join(lacking)}"
    )
    assert "--base" in problem.fix and "module:factory" in problem.fix
    # with the right model it converts
    raw, _ = convert_text(gmp(params=RESNET50_NAMES), base={"model": {"name": "resnet50", "in_channels": 1}})
    assert raw["pruning"]["layers"][0] == r"^conv1\.weight$"


@pytest.mark.parametrize("entry", ["re:layer9.*", "re:.*\\.conv7\\.", "layer1.0.conv1.bias", "fc.weight_orig"])
def test_a_name_or_pattern_matching_nothing_is_an_error_naming_it(entry: str) -> None:
    (problem,) = problems(gmp(params=["re:layer1.*", entry]))
    assert problem.message.startswith("1 of 2 parameter names/patterns match no parameter")
    assert problem.message.endswith(f": {entry}")


def test_patterns_that_match_batchnorm_weights_are_noted_not_silently_narrowed() -> None:
    raw, notes = convert_text(gmp(params=["re:layer1\\..*\\.weight"]))
    note = next(n for n in notes if "also matches" in n)
    assert "'re:layer1\\\\..*\\\\.weight' also matches 6 parameter(s) SparseML would prune" in note
    assert "BatchNorm2d: layer1.0.bn1.weight" in note and "stay dense" in note
    assert raw["pruning"]["layers"] == ["^(?:layer1\\..*\\.weight).*"]
    (problem,) = problems(gmp(params=["re:layer1\\.0\\.bn.*", "layer1.0.conv1.weight"]))
    assert "matches only parameters wf-pipeline never prunes (layer1.0.bn1.weight" in problem.message
    (problem,) = problems(gmp(params=["bn1.weight"]))
    assert "'bn1.weight' matches only parameters wf-pipeline never prunes" in problem.message


PARAM_NAMES = [
    "conv1.weight",
    "layer1.0.conv1.weight",
    "layer1.0.conv1.weight_orig",
    "layer1.0.bn1.weight",
    "layer2.1.conv2.weight",
    "fc.weight",
    "fc.bias",
    "xfc.weight",
]


@pytest.mark.parametrize("pattern", [".*conv.*", ".*weight", "layer[12]\\.\\d\\.conv1", "fc\\.weight$", "conv1"])
def test_regex_params_keep_sparseml_re_match_semantics(pattern: str) -> None:
    raw, _ = convert_text(gmp(params=[f"re:{pattern}"]), model=params_model(PARAM_NAMES))
    (ours,) = raw["pruning"]["layers"]
    expected = {name for name in PARAM_NAMES if re.match(pattern, name)}
    for matcher in (re.search, re.match, re.fullmatch):
        assert {name for name in PARAM_NAMES if matcher(ours, name)} == expected, matcher.__name__


def test_explicit_and_special_params() -> None:
    raw, _ = convert_text(gmp(params=["fc.weight", "layer1.0.conv1.weight"]))
    assert raw["pruning"]["layers"] == [r"^fc\.weight$", r"^layer1\.0\.conv1\.weight$"]
    raw, notes = convert_text(gmp(params="__ALL__"))
    assert raw["pruning"]["layers"] == [".*"]
    assert any("'__ALL__' also matches 43 parameter(s)" in note for note in notes)  # 21 BN weights + 22 biases
    raw, _ = convert_text(gmp(params=["fc.weight", "__ALL_PRUNABLE__"]))
    assert raw["pruning"]["layers"] == [".*"]


def test_base_skip_loses_to_names_the_recipe_gives_explicitly() -> None:
    base = {"model": {"name": "resnet20", "in_channels": 1}, "pruning": {"skip": ["^conv1\\.", "^fc\\.", "shortcut"]}}
    raw, notes = convert_text(gmp(params=["conv1.weight", "re:layer1.*"]), base=base)
    assert raw["pruning"]["skip"] == ["^fc\\.", "shortcut"]  # only the entry that dropped conv1.weight goes
    assert any("names conv1.weight explicitly" in note for note in notes)
    recipe = Recipe.model_validate(raw)
    assert recipe.pruning.skip == ["^fc\\.", "shortcut"]


def test_base_skip_or_min_layer_params_dropping_pattern_selected_weights_is_an_error() -> None:
    base = {"model": {"name": "resnet20", "in_channels": 1}, "pruning": {"skip": ["^fc\\."]}}
    (problem,) = problems(gmp(params="__ALL_PRUNABLE__"), base=base)
    assert problem.where == "base recipe pruning.skip / min_layer_params"
    assert "would leave fc.weight dense" in problem.message
    base = {"model": {"name": "resnet20", "in_channels": 1}, "pruning": {"min_layer_params": 1000}}
    (problem,) = problems(gmp(params=["re:.*conv1.*"]), base=base)
    assert "conv1.weight" in problem.message
    raw, notes = convert_text(gmp(params=["conv1.weight", "re:layer3.*"]), base=base)  # conv1: 9 weights, named
    assert raw["pruning"]["min_layer_params"] == 0


# ---------------------------------------------------------------------------------------------
# conversion of the fixtures


def test_gmp_cosine_recipe() -> None:
    raw, notes = convert_sparseml(load_fixture("gmp_cosine.yaml"))
    assert raw["finetune"] == {
        "epochs": 12,
        "optimizer": {"lr": 0.05},
        "lr_schedule": {"kind": "cosine", "final_lr": 0.0005},
    }
    assert raw["pruning"] == {
        "method": "magnitude",
        "ranking": "uniform",  # GMPruningModifier is layer-wise unless global_sparsity is set
        "initial_sparsity": 0.05,
        "final_sparsity": 0.9,
        "schedule": {"kind": "cubic", "start_epoch": 1.0, "end_epoch": 8.0, "frequency": 1.0},
        "layers": [".*"],
    }
    assert raw["model"] == sparseml.DEFAULT_BASE["model"]
    recipe = Recipe.model_validate(raw)
    assert recipe.pruning.schedule.end_epoch == 8 and recipe.finetune.epochs == 12


def test_obs_recipe_maps_to_woodfisher_and_its_warmup_exactly() -> None:
    raw, notes = convert_sparseml(load_fixture("obs_split.yaml"))
    pruning = raw["pruning"]
    assert (pruning["method"], pruning["ranking"]) == ("woodfisher", "global")
    assert (pruning["initial_sparsity"], pruning["final_sparsity"]) == (0.7, 0.95)
    assert pruning["schedule"] == {"kind": "cubic", "start_epoch": 2.0, "end_epoch": 8.0, "frequency": 2.0}
    assert pruning["woodfisher"] == {
        "num_grads": 256,
        "block_size": 64,
        "damp": 1e-7,  # written '1e-7', which YAML 1.1 reads as a string
        "recompute_steps": 2,
        "grad_batch_size": 8,
        "fisher_type": "empirical",
        "update": "independent",
    }
    assert raw["finetune"]["optimizer"] == {"lr": 0.01, "weight_decay": 0.0001}
    assert raw["finetune"]["lr_schedule"] == [  # a warmup from 0, then the decay: two exact pieces
        {"start_epoch": 0, "end_epoch": 1, "kind": "linear", "lr": 0.0, "final_lr": 0.01},
        {"start_epoch": 1, "end_epoch": 10, "kind": "linear", "lr": 0.01, "final_lr": pytest.approx(0.0001)},
    ]
    recipe = Recipe.model_validate(raw)
    assert lr_at(recipe.finetune, 0.5) == pytest.approx(0.005)
    assert lr_at(recipe.finetune, 5.5) == pytest.approx(0.01 + (0.0001 - 0.01) * 0.5)


def test_variables_referencing_variables_and_step_schedule() -> None:
    raw, notes = convert_sparseml(load_fixture("global_magnitude_steps.yaml"))
    # num_epochs = 2 + 6 + 4; pruning_end = round(12 * 8/12) = 8; lr drops at 8 and min(10, 11)
    assert raw["finetune"]["epochs"] == 12  # 'end_epoch: num_epochs' is a bare variable reference
    assert raw["finetune"]["optimizer"]["lr"] == 0.1
    assert raw["finetune"]["lr_schedule"] == {"kind": "step", "step_epochs": [8, 10], "gamma": 0.1}
    pruning = raw["pruning"]
    assert pruning["ranking"] == "global" and pruning["final_sparsity"] == 0.9
    assert pruning["schedule"] == {"kind": "linear", "start_epoch": 2, "end_epoch": 8, "frequency": 1.0}
    assert pruning["layers"][:2] == [r"^layer1\.0\.conv1\.weight$", r"^layer1\.0\.conv2\.weight$"]
    Recipe.model_validate(raw)


def test_recipe_card_with_multistep_lr() -> None:
    raw, _ = convert_sparseml(load_fixture("recipe_card.md"))
    assert raw["finetune"]["epochs"] == 9
    assert raw["finetune"]["optimizer"]["lr"] == 0.02
    assert raw["finetune"]["lr_schedule"] == {"kind": "step", "step_epochs": [5, 7], "gamma": 0.2}
    assert raw["pruning"]["ranking"] == "uniform" and raw["pruning"]["final_sparsity"] == 0.8
    Recipe.model_validate(raw)


def test_pruning_plus_quantization_converts_with_a_note_that_qat_becomes_calibration() -> None:
    raw, header = convert_sparseml(load_fixture("gmp_quantization.yaml"))
    assert raw["quantize"] == {"enabled": True}
    assert raw["pruning"]["final_sparsity"] == 0.85
    assert any("becomes post-training static INT8 calibration" in note for note in header)
    Recipe.model_validate(raw)


def _modifier(text: str) -> str:
    """One more modifier (YAML written flush left) for the end of a gmp() recipe's modifier list."""
    return textwrap.indent(textwrap.dedent(text).lstrip("\n"), "  ")


def test_quantization_modifier_fields_translate_or_are_refused_together() -> None:
    text = gmp() + _modifier("""
      - !QuantizationModifier
        start_epoch: 8.0
        num_calibration_steps: 4
        exclude_module_types: [ReLU, Linear]
    """)
    raw, _ = convert_text(text)
    assert raw["quantize"] == {"enabled": True, "calibration_samples": 256, "calibration_batch_size": 64,
                               "keep_fp32_op_types": ["Gemm", "Relu"]}
    Recipe.model_validate(raw)
    bad = problems(gmp() + _modifier("""
      - !QuantizationModifier
        weight_bits: 4
        exclude_module_types: [Bogus]
        qat_colour: blue
    """))
    assert [p.where for p in bad] == ["!QuantizationModifier (modifiers[3]) field 'qat_colour'"]
    bad = problems(gmp() + _modifier("""
      - !QuantizationModifier
        weight_bits: 4
        exclude_module_types: [Bogus]
    """))
    assert {p.where.split("field ")[-1] for p in bad} == {"'weight_bits'", "'exclude_module_types'"}


def test_unknown_modifier_is_named() -> None:
    with pytest.raises(RecipeError) as info:
        convert_text(gmp() + "\n  - !DistillationModifier\n    hardness: 0.5\n")
    assert "DistillationModifier" in info.value.message and "modifiers[3]" in info.value.message
    assert info.value.hint and "distillation" in info.value.hint


# ---------------------------------------------------------------------------------------------
# fractional update frequencies: exact


@pytest.mark.parametrize("frequency", [0.4, 0.5, 0.25, 1.5])
def test_fractional_update_frequency_is_kept_exactly(frequency: float) -> None:
    raw, notes = convert_text(gmp(update_frequency=frequency, start_epoch=1.0, end_epoch=5.0))
    assert raw["pruning"]["schedule"] == {"kind": "cubic", "start_epoch": 1.0, "end_epoch": 5.0, "frequency": frequency}
    assert not any("round" in note for note in notes)
    assert Recipe.model_validate(raw).pruning.schedule.frequency == frequency


def test_fractional_epochs_are_kept_too() -> None:
    raw, _ = convert_text(gmp(start_epoch=0.5, end_epoch=3.7, update_frequency=0.4))
    assert raw["pruning"]["schedule"]["start_epoch"] == 0.5 and raw["pruning"]["schedule"]["end_epoch"] == 3.7


def test_one_shot_pruning_needs_no_frequency() -> None:
    raw, _ = convert_text(gmp(start_epoch=2.0, end_epoch=2.0, update_frequency=-1.0))
    assert raw["pruning"]["schedule"]["start_epoch"] == raw["pruning"]["schedule"]["end_epoch"] == 2.0


def test_a_training_length_that_is_not_whole_epochs_is_refused_unless_rounding() -> None:
    text = gmp(epochs=6.5)
    (problem,) = problems(text)
    assert "training ends at epoch 6.5" in problem.message and "EpochRangeModifier" in problem.where
    raw, notes = convert_text(text, allow_rounding=True)
    assert raw["finetune"]["epochs"] == 7 and any("rounded the training length 6.5 up to 7" in n for n in notes)


def test_numeric_strings_and_variable_references() -> None:
    text = "target: 0.75\nstart: 1\n" + gmp(final_sparsity="target", start_epoch="start", init_sparsity="5e-2")
    raw, _ = convert_text(text)
    assert raw["pruning"]["final_sparsity"] == 0.75
    assert raw["pruning"]["schedule"]["start_epoch"] == 1
    assert raw["pruning"]["initial_sparsity"] == 0.05


# ---------------------------------------------------------------------------------------------
# several targets: pruning groups


def _second(body: str, **changes: str) -> str:
    second = body.split("  - !GMPruningModifier\n")[1]
    for old, new in changes.items():
        second = second.replace(old.replace("__", " "), new)
    return second


def test_modifiers_with_different_targets_become_groups() -> None:
    body = gmp(params=["re:layer1.*"])
    text = (
        body
        + "  - !GMPruningModifier\n"
        + body.split("  - !GMPruningModifier\n")[1]
        .replace("re:layer1.*", "re:layer2.*")
        .replace("final_sparsity: 0.8", "final_sparsity: 0.9")
        .replace("update_frequency: 1.0", "update_frequency: 0.5")
    )
    raw, _ = convert_text(text)
    assert "layers" not in raw["pruning"] and "final_sparsity" not in raw["pruning"]
    assert raw["pruning"]["groups"] == [
        {
            "name": "modifiers[2]",
            "layers": ["^(?:layer1.*)"],
            "initial_sparsity": 0.05,
            "final_sparsity": 0.8,
            "schedule": {"kind": "cubic", "start_epoch": 0.0, "end_epoch": 4.0, "frequency": 1.0},
        },
        {
            "name": "modifiers[3]",
            "layers": ["^(?:layer2.*)"],
            "initial_sparsity": 0.05,
            "final_sparsity": 0.9,
            "schedule": {"kind": "cubic", "start_epoch": 0.0, "end_epoch": 4.0, "frequency": 0.5},
        },
    ]
    recipe = Recipe.model_validate(raw)
    assert [g.final_sparsity for g in recipe.pruning.groups] == [0.8, 0.9]


def test_same_settings_merge_when_layer_wise_but_not_when_global() -> None:
    body = gmp(params=["re:layer1.*"])
    twin = body.split("  - !GMPruningModifier\n")[1].replace("re:layer1.*", "re:layer2.*")
    raw, notes = convert_text(body + "  - !GMPruningModifier\n" + twin)
    assert raw["pruning"]["layers"] == ["^(?:layer1.*)", "^(?:layer2.*)"]  # layer-wise: the same job as one
    assert any("merged modifiers[3] into modifiers[2]" in note for note in notes)
    glob = body.replace("!GMPruningModifier", "!GlobalMagnitudePruningModifier")
    twin = glob.split("  - !GlobalMagnitudePruningModifier\n")[1].replace("re:layer1.*", "re:layer2.*")
    raw, _ = convert_text(glob + "  - !GlobalMagnitudePruningModifier\n" + twin)
    # each global modifier ranks only its own weights: two groups, not one global ranking over both
    assert [g["layers"] for g in raw["pruning"]["groups"]] == [["^(?:layer1.*)"], ["^(?:layer2.*)"]]


def test_a_parameter_in_two_modifiers_is_an_error() -> None:
    body = gmp(params=["re:layer1.*"])
    second = (
        body.split("  - !GMPruningModifier\n")[1]
        .replace("re:layer1.*", "layer1.0.conv1.weight")
        .replace("final_sparsity: 0.8", "final_sparsity: 0.9")
    )
    (problem,) = problems(body + "  - !GMPruningModifier\n" + second)
    assert problem.where == "!GMPruningModifier (modifiers[2]) and !GMPruningModifier (modifiers[3])"
    assert "both select layer1.0.conv1.weight" in problem.message


def test_modifiers_with_different_methods_are_refused() -> None:
    body = gmp(params=["re:layer1.*"])
    second = body.split("  - !GMPruningModifier\n")[1].replace("re:layer1.*", "re:layer2.*")
    (problem,) = problems(body + "  - !OBSPruningModifier\n" + second + "    fisher_block_size: 50\n")
    assert "differ in method ('magnitude' vs 'woodfisher'), ranking ('uniform' vs 'global');" in problem.message


def test_final_sparsity_map_becomes_one_group_per_target() -> None:
    text = gmp(
        params=[],
        final_sparsity={0.7: ["layer1.0.conv1.weight", "re:layer2.*"], 0.9: ["fc.weight", "layer1.0.conv1.weight"]},
    )
    raw, _ = convert_text(text)
    groups = raw["pruning"]["groups"]
    assert [(g["name"], g["final_sparsity"]) for g in groups] == [
        ("modifiers[2].final_sparsity[0]", 0.7),
        ("modifiers[2].final_sparsity[1]", 0.9),
    ]
    assert groups[0]["layers"] == [r"^layer1\.0\.conv1\.weight$", "^(?:layer2.*)"]
    assert groups[1]["layers"] == [r"^fc\.weight$"]  # layer1.0.conv1.weight keeps its first target, as in SparseML
    Recipe.model_validate(raw)
    (problem,) = problems(gmp(params=["re:x"], final_sparsity={0.7: ["fc.weight"]}))
    assert "must be [] when final_sparsity is a map" in problem.message


# ---------------------------------------------------------------------------------------------
# learning rates: pieces, checked against hand-computed rates


def _rates(raw: dict[str, Any], epochs: list[float]) -> list[float]:
    cfg = Recipe.model_validate(raw).finetune
    return [lr_at(cfg, e) for e in epochs]


def test_warm_restarts_after_a_set_rate() -> None:
    raw, _ = convert_sparseml(
        load_fixture("tv_mobilenetv2_restarts.yaml"), base={"model": {"name": "mobilenet_v2", "in_channels": 1}}
    )
    assert raw["finetune"]["lr_schedule"] == [
        {"start_epoch": 0, "end_epoch": 1, "kind": "constant", "lr": 0.0005},
        {"start_epoch": 1, "end_epoch": 10, "kind": "cosine", "lr": 0.0005, "final_lr": 0.00025},
        {"start_epoch": 10, "end_epoch": 15, "kind": "cosine", "lr": 0.0005, "final_lr": 0.00025},
    ]
    # SparseML: lr = final + (init - final) / 2 * (1 + cos(pi * (e - start) / (end - start)))
    expected = [0.0005, 0.0005, 0.000375, 0.00025 + 0.000125 * (1 + math.cos(math.pi * 8 / 9)), 0.0005, 0.000375]
    assert _rates(raw, [0.0, 0.9, 5.5, 9.0, 10.0, 12.5]) == pytest.approx(expected, rel=1e-12)


def test_a_rate_held_after_a_function_ends_and_a_later_set_rate() -> None:
    text = """
        modifiers:
          - !EpochRangeModifier
            start_epoch: 0
            end_epoch: 10
          - !LearningRateFunctionModifier
            start_epoch: 0
            end_epoch: 4
            lr_func: linear
            init_lr: 0.1
            final_lr: 0.02
          - !SetLearningRateModifier
            start_epoch: 7
            learning_rate: 0.001
    """
    raw, _ = convert_text(text)
    assert raw["finetune"]["lr_schedule"] == [
        {"start_epoch": 0, "end_epoch": 4, "kind": "linear", "lr": 0.1, "final_lr": 0.02},
        {"start_epoch": 4, "end_epoch": 10, "kind": "step", "lr": 0.02, "step_epochs": [7], "gamma": 0.05},
    ]
    assert _rates(raw, [2.0, 4.0, 6.9, 7.0, 9.9]) == pytest.approx([0.06, 0.02, 0.02, 0.001, 0.001])


def test_learning_rate_classes() -> None:
    epoch_range = "  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 6\n"
    step_lr = (
        "  - !LearningRateModifier\n    start_epoch: 0\n    lr_class: StepLR\n"
        "    lr_kwargs: {step_size: 2, gamma: 0.5}\n    init_lr: 0.1\n"
    )
    raw, _ = convert_text("modifiers:\n" + epoch_range + step_lr)
    assert raw["finetune"]["lr_schedule"] == {"kind": "step", "step_epochs": [2, 4], "gamma": 0.5}
    exp_lr = step_lr.replace("StepLR", "ExponentialLR").replace("{step_size: 2, gamma: 0.5}", "{gamma: 0.9}")
    raw, _ = convert_text("modifiers:\n" + epoch_range + exp_lr)
    assert raw["finetune"]["lr_schedule"]["step_epochs"] == [1, 2, 3, 4, 5]
    short = step_lr.replace("start_epoch: 0\n    lr_class", "start_epoch: 0\n    end_epoch: 3\n    lr_class")
    raw, _ = convert_text("modifiers:\n" + epoch_range + short)  # ends at 3: the rate then holds (SparseML too)
    assert _rates(raw, [1.0, 2.0, 2.9, 3.0, 5.9]) == pytest.approx([0.1, 0.05, 0.05, 0.05, 0.05])


def test_learning_rate_problems_name_the_modifiers() -> None:
    epoch_range = "  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 6\n"
    cosine = (
        "  - !LearningRateFunctionModifier\n    start_epoch: {s}\n    end_epoch: {e}\n    lr_func: cosine\n"
        "    init_lr: 0.1\n    final_lr: 0.0\n"
    )
    (problem,) = problems("modifiers:\n" + epoch_range + cosine.format(s=0, e=4) + cosine.format(s=3, e=6))
    assert "both set the learning rate between epochs 3 and 4" in problem.message
    (problem,) = problems("modifiers:\n" + epoch_range + cosine.format(s=2, e=6))
    assert "the learning rate before epoch 2 is not set" in problem.message
    raw, notes = convert_text(
        "modifiers:\n" + epoch_range + cosine.format(s=2, e=6), base={"finetune": {"optimizer": {"lr": 0.3}}}
    )
    assert raw["finetune"]["lr_schedule"][0] == {"start_epoch": 0, "end_epoch": 2, "kind": "constant", "lr": 0.3}
    set_inside = "  - !SetLearningRateModifier\n    start_epoch: 3\n    learning_rate: 0.5\n"
    (problem,) = problems("modifiers:\n" + epoch_range + cosine.format(s=0, e=6) + set_inside)
    assert "set at epoch 3 inside the cosine schedule" in problem.message
    (problem,) = problems("modifiers:\n" + epoch_range + cosine.format(s=0, e=6).replace("cosine", "cyclic_linear"))
    assert problem.where.endswith("field 'lr_func'") and "cyclic_linear" in problem.message


def test_weight_decay_changes_ride_on_the_pieces(trusted: None) -> None:
    raw, _ = convert_sparseml(
        load_fixture("zoo_mobilenet_sparsity_map.md"),
        base={"model": {"name": "tests.sparseml_zoo_models:zoo_mobilenet"}},
    )
    assert raw["finetune"]["lr_schedule"] == [
        {"start_epoch": 0, "end_epoch": 2, "kind": "constant", "lr": 0.0004},
        {"start_epoch": 2, "end_epoch": 3, "kind": "constant", "lr": 0.0004, "weight_decay": 0.0},
    ]
    text = gmp().replace(
        "  - !SetLearningRateModifier\n    start_epoch: 0.0\n    learning_rate: 0.01\n",
        "  - !LearningRateFunctionModifier\n    start_epoch: 0\n    end_epoch: 6\n    lr_func: cosine\n"
        "    init_lr: 0.1\n    final_lr: 0.0\n  - !SetWeightDecayModifier\n    start_epoch: 3\n"
        "    weight_decay: 0.0\n",
    )
    (problem,) = problems(text)
    assert "falls inside the cosine learning-rate schedule" in problem.message


def test_no_learning_rate_modifier_keeps_base_lr() -> None:
    base = {"model": {"name": "resnet20", "in_channels": 1}, "finetune": {"optimizer": {"lr": 0.3}}}
    raw, notes = convert_text(
        gmp().replace("  - !SetLearningRateModifier\n    start_epoch: 0.0\n    learning_rate: 0.01\n", ""), base=base
    )
    recipe = Recipe.model_validate(raw)
    assert recipe.finetune.optimizer.lr == 0.3 and recipe.finetune.epochs == 6
    assert any("no learning-rate modifier" in note for note in notes)


# ---------------------------------------------------------------------------------------------
# ConstantPruningModifier: accepted where it only holds masks


def test_holding_masks_of_a_pruned_model_is_fine_tuning_with_masks_held() -> None:
    raw, _ = convert_sparseml(load_fixture("transfer_hold_masks.md"))
    assert raw["pruning"] == {"method": "none", "layers": [".*"]}
    assert raw["finetune"]["lr_schedule"] == {"kind": "step", "step_epochs": [5], "gamma": 0.1}


def test_holding_masks_after_pruning_adds_a_hold_group_for_unpruned_weights() -> None:
    raw, notes = convert_sparseml(
        load_fixture("tv_densenet_hold.yaml"), base={"model": {"name": "densenet121", "in_channels": 1}}
    )
    pruned, hold = raw["pruning"]["groups"]
    assert pruned["final_sparsity"] == 0.9 and pruned["schedule"]["frequency"] == 0.5
    assert hold == {
        "name": "finetuning_modifiers[0]",
        "layers": [r"^classifier\.weight$"],
        "initial_sparsity": 0.0,
        "final_sparsity": 0.0,
        "schedule": {"kind": "constant", "start_epoch": 0.0, "end_epoch": 0.0, "frequency": 1.0},
    }
    assert any("classifier.weight are held from epoch 0, not from epoch 10" in note for note in notes)
    Recipe.model_validate(raw)


@pytest.mark.parametrize(
    ("constant", "words"),
    [
        (
            "    start_epoch: 4.0\n    end_epoch: 5.0\n    params: __ALL_PRUNABLE__\n",
            ["field 'end_epoch'", "releasing the masks at epoch 5 lets pruned weights grow back"],
        ),
        (
            "    start_epoch: 2.0\n    params: ['re:layer1.*']\n",
            ["field 'start_epoch'", "while !GMPruningModifier (modifiers[2]) still prunes"],
        ),
    ],
)
def test_a_constant_pruning_modifier_that_does_more_than_hold_masks_is_refused(constant: str, words: list[str]) -> None:
    (problem,) = problems(gmp() + "  - !ConstantPruningModifier\n" + constant)
    text = f"{problem.where}: {problem.message}"
    for word in words:
        assert word in text


def test_leave_enabled_false_is_refused_when_weights_would_grow_back() -> None:
    (problem,) = problems(gmp(leave_enabled=False))
    assert (
        problem.where.endswith("field 'leave_enabled'")
        and "grow back before training ends (epoch 6)" in problem.message
    )
    convert_text(gmp(leave_enabled=False, end_epoch=6.0))  # pruning ends with training: nothing regrows
    held = (
        gmp(leave_enabled=False) + "  - !ConstantPruningModifier\n    start_epoch: 4.0\n    params: __ALL_PRUNABLE__\n"
    )
    raw, _ = convert_text(held)  # the masks are held from where pruning ends
    assert raw["pruning"]["layers"] == [".*"]
    late = held.replace(
        "start_epoch: 4.0\n    params: __ALL_PRUNABLE__", "start_epoch: 5.0\n    params: __ALL_PRUNABLE__"
    )
    (problem,) = problems(late)  # between epochs 4 and 5 SparseML would let them regrow
    assert problem.where.endswith("field 'leave_enabled'")


def test_overlapping_constant_pruning_modifiers_hold_each_weight_once() -> None:
    text = gmp(params=["re:layer1.*"])
    for params in ("['re:layer[23].*']", "['re:layer3.*', 'fc.weight']"):
        text += f"  - !ConstantPruningModifier\n    start_epoch: 4.0\n    params: {params}\n"
    raw, _ = convert_text(text)
    pruned, first, second = raw["pruning"]["groups"]
    assert first["layers"] == ["^(?:layer[23].*)"] and first["final_sparsity"] == 0.0
    assert second["layers"] == [r"^fc\.weight$"]  # layer3 is already held by the first
    Recipe.model_validate(raw)


# ---------------------------------------------------------------------------------------------
# OBS details


def test_obs_defaults_are_sparseml_defaults() -> None:
    raw, notes = convert_text(gmp(tag="OBSPruningModifier"))
    woodfisher = raw["pruning"]["woodfisher"]
    assert (woodfisher["num_grads"], woodfisher["damp"], woodfisher["block_size"]) == (1024, 1e-7, 50)
    assert "grad_batch_size" not in woodfisher
    assert raw["pruning"]["ranking"] == "global"  # OBS defaults to global_sparsity: True
    note = next(n for n in notes if "fisher_block_size not set" in n)
    assert "using 50" in note and "from 1.5 it is 1" in note and "version" in note
    assert Recipe.model_validate(raw).pruning.woodfisher.grad_batch_size == 1


@pytest.mark.parametrize(("version", "block"), [("1.4.0", 50), ("1.3", 50), ("1.5.0", 1), ("1.7.1", 1)])
def test_obs_block_size_default_follows_the_recipe_version(version: str, block: int) -> None:
    raw, _ = convert_text(f"version: {version}\n" + gmp(tag="OBSPruningModifier"))
    assert raw["pruning"]["woodfisher"]["block_size"] == block


@pytest.mark.parametrize(("value", "ranking"), [(True, "global"), (False, "uniform"), ("true", "global")])
def test_gmp_global_sparsity(value: Any, ranking: str) -> None:
    raw, _ = convert_text(gmp(global_sparsity=value))
    assert raw["pruning"]["ranking"] == ranking


def test_global_magnitude_modifier_is_global() -> None:
    raw, _ = convert_text(gmp(tag="GlobalMagnitudePruningModifier"))
    assert raw["pruning"]["ranking"] == "global" and raw["pruning"]["method"] == "magnitude"


# ---------------------------------------------------------------------------------------------
# every problem of a recipe in one error


def test_all_problems_are_reported_together_with_place_and_fix() -> None:
    with pytest.raises(SparseMLRecipeError) as info:
        convert_sparseml(load_fixture("pruned_quantized_card.md"))
    found = info.value.problems
    assert [p.where for p in found] == [
        "!LearningRateModifier (training_modifiers[2]) field 'lr_class'",
        "!GMPruningModifier (pruning_modifiers[0]) field 'mask_type'",
    ]
    assert all(p.fix for p in found)
    message = info.value.message
    assert message.startswith("SparseML recipe has 2 problems: (1) !LearningRateModifier")
    assert "-> fix: use mask_type: unstructured" in message and "QuantizationModifier" not in message


def test_several_problems_in_one_modifier_are_all_reported() -> None:
    found = problems(gmp(mask_type="block4", inter_func="inverse_cubic", phased=True, params=["re:nothing.*"]))
    assert sorted(p.where.split("field ")[-1] for p in found) == ["'inter_func'", "'mask_type'", "'params'", "'phased'"]
    found = problems(gmp(prune_bias=True, frobnicate=1))  # unknown fields: every one of them
    assert sorted(p.where.split("field ")[-1] for p in found) == ["'frobnicate'", "'prune_bias'"]


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mask_type": "block4"}, "mask_type"),
        ({"mask_type": "block"}, "mask_type"),
        ({"mask_type": [1, 4]}, "mask_type"),
        ({"mask_type": "2:4"}, "mask_type"),
        ({"inter_func": "inverse_cubic"}, "inter_func"),
        ({"init_sparsity": "__FROM_PARAM__"}, "init_sparsity"),
        ({"final_sparsity": 1.0}, "final_sparsity"),
        ({"init_sparsity": 0.9}, "init_sparsity"),
        ({"end_epoch": None}, "end_epoch"),
        ({"params": []}, "params"),
        ({"params": ["re:("]}, "params"),
        ({"prune_bias": True}, "prune_bias"),
        ({"phased": True}, "phased"),
        ({"start_epoch": -1.0}, "start_epoch"),
        ({"start_epoch": 3.0, "end_epoch": 2.0}, "end_epoch"),
        ({"final_sparsity": "lots"}, "final_sparsity"),
        ({"update_frequency": 0.0}, "update_frequency"),
    ],
)
def test_pruning_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    found = problems(gmp(**overrides))
    assert [p.where for p in found] == [f"!GMPruningModifier (modifiers[2]) field '{field}'"]
    assert found[0].fix


def test_obs_structured_mask_and_unknown_sampler_key_are_refused() -> None:
    obs = gmp(tag="OBSPruningModifier")
    with pytest.raises(RecipeError, match=r"OBSPruningModifier.*field 'mask_type'.*'block4'"):
        convert_text(obs + "    mask_type: block4\n")
    with pytest.raises(RecipeError, match=r"grad_sampler_kwargs.*'num_workers'"):
        convert_text(obs + "    grad_sampler_kwargs:\n      num_workers: 4\n")
    with pytest.raises(RecipeError, match=r"field 'fisher_block_size'"):
        convert_text(obs + "    fisher_block_size: 0\n")


def test_unknown_modifier_field_and_unknown_modifier() -> None:
    with pytest.raises(RecipeError) as info:
        convert_text("modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 2\n    speed: 3\n")
    assert "field 'speed'" in info.value.message and "EpochRangeModifier" in info.value.message
    with pytest.raises(RecipeError, match=r"!MysteryModifier \(modifiers\[0\]\).*no wf-pipeline translation"):
        convert_text("modifiers:\n  - !MysteryModifier\n    start_epoch: 0\n")


def test_expression_errors_inside_modifiers_name_the_field() -> None:
    with pytest.raises(RecipeError) as info:
        convert_text(gmp(final_sparsity="eval(__import__('os').system('echo pwned'))"))
    assert "field 'final_sparsity'" in info.value.message and "attribute access" in info.value.message
    with pytest.raises(RecipeError, match=r"field 'end_epoch'.*unknown variable 'num_epochs'"):
        convert_text(gmp(end_epoch="eval(num_epochs - 1)"))
    with pytest.raises(RecipeError, match="cycle"):
        convert_text("a: eval(b)\nb: eval(a)\n" + gmp())


def test_staged_and_malformed_recipes_are_refused() -> None:
    with pytest.raises(RecipeError, match="staged recipes"):
        convert_sparseml({"stage_a": {"modifiers": []}, "stage_b": {"pruning_modifiers": []}})
    with pytest.raises(RecipeError, match=r"modifiers\[0\].*is not a tagged modifier"):
        convert_sparseml({"modifiers": [{"start_epoch": 0}]})
    with pytest.raises(RecipeError, match="must be a list"):
        convert_sparseml({"modifiers": {"start_epoch": 0}})


# ---------------------------------------------------------------------------------------------
# base recipe merge


def test_base_sections_are_kept_and_sparseml_overrides_pruning_and_finetune() -> None:
    base = {
        "name": "from-sparseml",
        "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1},
        "data": {"dataset": "digits", "batch_size": 32},
        "export": {"opset": 18},
        "finetune": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.5, "momentum": 0.8}},
        "pruning": {"woodfisher": {"chunk_size": 10}, "schedule": {"end_epoch": 1}},
    }
    snapshot = yaml.safe_dump(base)
    raw, _ = convert_sparseml(load_fixture("obs_split.yaml"), base=base)
    assert yaml.safe_dump(base) == snapshot  # the caller's base is not mutated
    recipe = Recipe.model_validate(raw)
    assert recipe.name == "from-sparseml"
    assert recipe.model.in_channels == 1 and recipe.data.dataset == "digits" and recipe.export.opset == 18
    assert recipe.finetune.optimizer.name == "adam" and recipe.finetune.optimizer.momentum == 0.8
    assert recipe.finetune.optimizer.lr == 0.01 and recipe.finetune.epochs == 10
    assert recipe.pruning.woodfisher.chunk_size == 10 and recipe.pruning.woodfisher.num_grads == 256
    assert recipe.pruning.schedule.end_epoch == 8


def test_no_pruning_modifier_means_fine_tuning_only_unless_base_prunes() -> None:
    text = """
        modifiers:
          - !EpochRangeModifier
            start_epoch: 0
            end_epoch: 3
          - !SetLearningRateModifier
            learning_rate: 0.01
    """
    raw, _ = convert_text(text)
    recipe = Recipe.model_validate(raw)
    assert recipe.pruning.method == "none"
    assert isinstance(recipe.finetune.lr_schedule, LRScheduleConfig)
    assert recipe.finetune.lr_schedule.kind == "constant" and recipe.finetune.optimizer.lr == 0.01
    raw, notes = convert_text(text, base={"pruning": {"method": "woodfisher", "schedule": {"end_epoch": 2}}})
    assert Recipe.model_validate(raw).pruning.method == "woodfisher"
    assert any("keeping the base recipe's pruning" in note for note in notes)


# ---------------------------------------------------------------------------------------------
# the header: what every SparseML field became


@pytest.mark.parametrize(
    ("recipe", "base"),
    [
        ("gmp_cosine.yaml", None),
        ("obs_split.yaml", None),
        ("global_magnitude_steps.yaml", None),
        ("recipe_card.md", None),
        ("transfer_hold_masks.md", None),
        ("tv_densenet_hold.yaml", {"model": {"name": "densenet121"}}),
        ("zoo_mobilenet_sparsity_map.md", {"model": {"name": "tests.sparseml_zoo_models:zoo_mobilenet"}}),
    ],
)
def test_header_accounts_for_every_field_of_every_modifier(
    recipe: str, base: dict[str, Any] | None, trusted: None
) -> None:
    raw = load_fixture(recipe)
    header = translate_sparseml(raw, base=base).header(recipe)
    assert all(line.startswith("#") for line in header.strip().splitlines())
    for key, entries in raw.items():
        if not key.endswith("modifiers"):
            continue
        for index, entry in enumerate(entries):
            for name in entry:
                if name != "__modifier__":
                    assert f"{key}[{index}] !{entry['__modifier__']}.{name}" in header, (key, index, name)
    assert "read (see the notes)" not in header  # every field has a specific account


def test_header_lists_what_became_what_was_defaulted_and_what_was_ignored() -> None:
    header = translate_sparseml(load_fixture("gmp_cosine.yaml")).header("gmp_cosine.yaml")
    assert "# Runs on model resnet20 (the bundled default (no --base recipe given))" in header
    assert (
        "#   modifiers[2] !GMPruningModifier.update_frequency = 1.0 -> pruning.schedule.frequency = 1 epochs" in header
    )
    assert "#   modifiers[1] !LearningRateFunctionModifier.init_lr = 0.05 -> finetune.optimizer.lr" in header
    assert "# Not set in the SparseML recipe (defaulted):" in header
    assert "#   modifiers[2] !GMPruningModifier.global_sparsity -> pruning.ranking = uniform" in header
    assert "# Ignored, and why:\n#   modifiers[2] !GMPruningModifier.log_types = '__ALL__' -> logging only" in header
    obs = translate_sparseml(load_sparseml_text(gmp(tag="OBSPruningModifier"))).header()
    assert "!OBSPruningModifier.num_grads -> pruning.woodfisher.num_grads = 1024 (SparseML's default)" in obs
    assert "!OBSPruningModifier.fisher_block_size -> pruning.woodfisher.block_size = 50" in obs
