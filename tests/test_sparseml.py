"""SparseML recipe translation: the safe eval(...) evaluator, the tagged-YAML loader and the converter."""
from __future__ import annotations

import ast
import inspect
import re
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml

from wf_pipeline.errors import RecipeError, WFError
from wf_pipeline.recipe import safe_eval, sparseml
from wf_pipeline.recipe.safe_eval import ExpressionError, evaluate_expression, resolve_variables
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.recipe.sparseml import convert_sparseml, is_sparseml_recipe, load_sparseml_text

FIXTURES = Path(__file__).parent / "fixtures" / "sparseml"


def load_fixture(name: str) -> dict[str, Any]:
    return load_sparseml_text((FIXTURES / name).read_text())


def convert_text(text: str, **kwargs: Any) -> tuple[dict[str, Any], list[str]]:
    return convert_sparseml(load_sparseml_text(textwrap.dedent(text)), **kwargs)


def gmp(**overrides: Any) -> str:
    """A one-modifier GMP recipe whose fields can be overridden (None removes a field)."""
    fields: dict[str, Any] = {
        "params": "__ALL_PRUNABLE__",
        "init_sparsity": 0.05,
        "final_sparsity": 0.8,
        "start_epoch": 0.0,
        "end_epoch": 4.0,
        "update_frequency": 1.0,
    }
    fields.update(overrides)
    lines = "\n".join(f"    {k}: {yaml.safe_dump(v, default_flow_style=True).strip().removesuffix('...').strip()}"
                      for k, v in fields.items() if v is not None)
    return f"modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0.0\n    end_epoch: 6.0\n  - !GMPruningModifier\n{lines}\n"


# ---------------------------------------------------------------------------------------------
# safe_eval


@pytest.mark.parametrize(
    ("expression", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("7 // 2 + 7 % 2", 4),
        ("2 ** 10", 1024),
        ("-n + +3", -7),
        ("n / 4", 2.5),
        ("1 < n <= 10", True),
        ("n == 10 and not flag", True),
        ("flag or 0.5", 0.5),
        ("0.9 if n >= 10 else 0.8", 0.9),
        ("max(1, n - 12)", 1),
        ("min(n, 3.5)", 3.5),
        ("round(n / 3, 2)", 3.33),
        ("abs(-n)", 10),
        ("int(n / 4)", 2),
        ("float(n)", 10.0),
        ("name", "cosine"),
        ("'linear' == name", False),
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
        ("'a' * 10", "arithmetic needs numbers"),
        ("round(n, ndigits=2)", "keyword arguments"),
        ("n / 0", "division by zero"),
        ("(-8) ** 0.5", "not a real number"),
        ("f'{n}'", "f-strings"),
        ("(y := 3)", "assignment expressions"),
        ("1 +", "cannot parse"),
        ("n in params", "comparison In is not allowed"),
        ("1e308 * 10", "not a finite number"),
    ],
)
def test_safe_eval_rejects(expression: str, fragment: str) -> None:
    with pytest.raises(ExpressionError) as info:
        evaluate_expression(expression, {"n": 10, "params": ["a"]})
    assert fragment in str(info.value)
    assert isinstance(info.value, WFError)  # the CLI shows it as one line, exit code 2


def test_safe_eval_refuses_oversized_expressions() -> None:
    with pytest.raises(ExpressionError, match="characters long"):
        evaluate_expression("1+" * 600 + "1", {})
    with pytest.raises(ExpressionError, match="too complex"):
        evaluate_expression("+".join(["n"] * 150), {"n": 1})


def test_safe_eval_module_never_calls_python_eval_or_exec() -> None:
    tree = ast.parse(inspect.getsource(safe_eval))
    called = {
        node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
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
# loading


def test_loader_records_modifier_tags() -> None:
    raw = load_fixture("gmp_cosine.yaml")
    assert [m["__modifier__"] for m in raw["modifiers"]] == [
        "EpochRangeModifier",
        "LearningRateFunctionModifier",
        "GMPruningModifier",
    ]
    assert raw["modifiers"][2]["params"] == "eval(prune_params)"


def test_loader_reads_markdown_front_matter() -> None:
    raw = load_fixture("recipe_card.md")
    assert raw["num_epochs"] == 9.0
    assert raw["modifiers"][2]["__modifier__"] == "MagnitudePruningModifier"


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
    for name in ("gmp_cosine.yaml", "obs_split.yaml", "global_magnitude_steps.yaml", "recipe_card.md"):
        assert is_sparseml_recipe(load_fixture(name)), name
    assert is_sparseml_recipe({"stage_0": {"pruning_modifiers": []}})
    assert not is_sparseml_recipe(Recipe().to_dict())
    assert not is_sparseml_recipe({"pruning": {"final_sparsity": 0.9}})
    assert not is_sparseml_recipe(["modifiers"])


# ---------------------------------------------------------------------------------------------
# conversion of the fixtures


def test_gmp_cosine_recipe() -> None:
    raw, notes = convert_sparseml(load_fixture("gmp_cosine.yaml"))
    assert raw == {
        "finetune": {
            "epochs": 12,
            "optimizer": {"lr": 0.05},
            "lr_schedule": {"kind": "cosine", "warmup_epochs": 0.0, "step_epochs": [], "gamma": 0.1, "final_lr": 0.0005},
        },
        "pruning": {
            "method": "magnitude",
            "initial_sparsity": 0.05,
            "final_sparsity": 0.9,
            "ranking": "uniform",  # GMPruningModifier is layer-wise unless global_sparsity is set
            "schedule": {"kind": "cubic", "start_epoch": 1, "end_epoch": 8, "frequency": 1},
            "layers": [".*"],
        },
    }
    recipe = Recipe.model_validate(raw)
    assert recipe.pruning.schedule.end_epoch == 8 and recipe.finetune.epochs == 12
    assert any("pruning_end_epoch=8.0" in note for note in notes)
    assert any("log_types" in note for note in notes)


def test_obs_recipe_maps_to_woodfisher() -> None:
    raw, notes = convert_sparseml(load_fixture("obs_split.yaml"))
    pruning = raw["pruning"]
    assert pruning["method"] == "woodfisher"
    assert pruning["ranking"] == "global"
    assert (pruning["initial_sparsity"], pruning["final_sparsity"]) == (0.7, 0.95)
    assert pruning["schedule"] == {"kind": "cubic", "start_epoch": 2, "end_epoch": 8, "frequency": 2}
    assert pruning["woodfisher"] == {
        "num_grads": 256,
        "block_size": 64,
        "damp": 1e-7,  # written '1e-7', which YAML 1.1 reads as a string
        "recompute_steps": 2,
        "grad_batch_size": 8,
        "fisher_type": "empirical",
        "update": "independent",
    }
    assert raw["finetune"]["epochs"] == 10
    assert raw["finetune"]["optimizer"] == {"lr": 0.01, "weight_decay": 0.0001}
    assert raw["finetune"]["lr_schedule"]["kind"] == "linear"
    assert raw["finetune"]["lr_schedule"]["warmup_epochs"] == 1.0
    assert raw["finetune"]["lr_schedule"]["final_lr"] == pytest.approx(0.0001)
    assert not any("warmup" in note for note in notes)  # SparseML's warmup starts at 0 like ours: exact
    recipe = Recipe.model_validate(raw)
    assert recipe.pruning.woodfisher.block_size == 64


def test_variables_referencing_variables_and_step_schedule() -> None:
    raw, notes = convert_sparseml(load_fixture("global_magnitude_steps.yaml"))
    # num_epochs = 2 + 6 + 4; pruning_end = round(12 * 8/12) = 8; lr drops at 8 and min(10, 11)
    assert raw["finetune"]["epochs"] == 12  # 'end_epoch: num_epochs' is a bare variable reference
    assert raw["finetune"]["optimizer"]["lr"] == 0.1
    assert raw["finetune"]["lr_schedule"]["kind"] == "step"
    assert raw["finetune"]["lr_schedule"]["step_epochs"] == [8, 10]
    assert raw["finetune"]["lr_schedule"]["gamma"] == 0.1
    pruning = raw["pruning"]
    assert pruning["ranking"] == "global"
    assert pruning["final_sparsity"] == 0.9
    assert pruning["schedule"] == {"kind": "linear", "start_epoch": 2, "end_epoch": 8, "frequency": 1}
    assert pruning["layers"][:2] == [r"^layer1\.0\.conv1\.weight$", r"^layer1\.0\.conv2\.weight$"]
    Recipe.model_validate(raw)
    assert any("explicit parameter names" in note for note in notes)


def test_recipe_card_with_multistep_lr() -> None:
    raw, _ = convert_sparseml(load_fixture("recipe_card.md"))
    assert raw["finetune"]["epochs"] == 9
    assert raw["finetune"]["optimizer"]["lr"] == 0.02
    assert raw["finetune"]["lr_schedule"]["kind"] == "step"
    assert raw["finetune"]["lr_schedule"]["step_epochs"] == [5, 7]
    assert raw["finetune"]["lr_schedule"]["gamma"] == 0.2
    assert raw["pruning"]["ranking"] == "uniform"
    assert raw["pruning"]["final_sparsity"] == 0.8
    Recipe.model_validate(raw)


def test_unknown_modifier_is_named() -> None:
    with pytest.raises(RecipeError) as info:
        convert_sparseml(load_fixture("gmp_quantization.yaml"))
    assert "QuantizationModifier" in info.value.message
    assert "modifiers[2]" in info.value.message
    assert info.value.hint and "quantize" in info.value.hint


# ---------------------------------------------------------------------------------------------
# base recipe merge


def test_base_sections_are_kept_and_sparseml_overrides_pruning_and_finetune() -> None:
    base = {
        "name": "from-sparseml",
        "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1},
        "data": {"dataset": "digits", "batch_size": 32},
        "export": {"opset": 18},
        "finetune": {"epochs": 2, "optimizer": {"name": "adam", "lr": 0.5, "momentum": 0.8}},
        "pruning": {"skip": ["fc"], "woodfisher": {"chunk_size": 10}, "schedule": {"end_epoch": 1}},
    }
    snapshot = yaml.safe_dump(base)
    raw, _ = convert_sparseml(load_fixture("obs_split.yaml"), base=base)
    assert yaml.safe_dump(base) == snapshot  # the caller's base is not mutated
    recipe = Recipe.model_validate(raw)
    assert recipe.name == "from-sparseml"
    assert recipe.model.in_channels == 1 and recipe.data.dataset == "digits" and recipe.export.opset == 18
    assert recipe.finetune.optimizer.name == "adam" and recipe.finetune.optimizer.momentum == 0.8
    assert recipe.finetune.optimizer.lr == 0.01 and recipe.finetune.epochs == 10
    assert recipe.pruning.skip == ["fc"]
    assert recipe.pruning.woodfisher.chunk_size == 10 and recipe.pruning.woodfisher.num_grads == 256
    assert recipe.pruning.schedule.end_epoch == 8


def test_no_learning_rate_modifier_keeps_base_lr() -> None:
    raw, notes = convert_text(gmp(), base={"finetune": {"optimizer": {"lr": 0.3}}})
    recipe = Recipe.model_validate(raw)
    assert recipe.finetune.optimizer.lr == 0.3 and recipe.finetune.epochs == 6
    assert any("no learning-rate modifier" in note for note in notes)


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
    assert recipe.finetune.lr_schedule.kind == "constant" and recipe.finetune.optimizer.lr == 0.01
    raw, notes = convert_text(text, base={"pruning": {"method": "woodfisher", "schedule": {"end_epoch": 2}}})
    assert Recipe.model_validate(raw).pruning.method == "woodfisher"
    assert any("keeping the base recipe's pruning" in note for note in notes)


# ---------------------------------------------------------------------------------------------
# modifier details


def test_obs_defaults_are_sparseml_defaults() -> None:
    text = gmp().replace("!GMPruningModifier", "!OBSPruningModifier")
    raw, notes = convert_text(text)
    woodfisher = raw["pruning"]["woodfisher"]
    assert (woodfisher["num_grads"], woodfisher["damp"], woodfisher["block_size"]) == (1024, 1e-7, 50)
    assert "grad_batch_size" not in woodfisher
    assert raw["pruning"]["ranking"] == "global"  # OBS defaults to global_sparsity: True
    assert sum("SparseML's default" in note for note in notes) == 4
    assert Recipe.model_validate(raw).pruning.woodfisher.grad_batch_size == 1


@pytest.mark.parametrize(("value", "ranking"), [(True, "global"), (False, "uniform"), ("true", "global")])
def test_gmp_global_sparsity(value: Any, ranking: str) -> None:
    raw, _ = convert_text(gmp(global_sparsity=value))
    assert raw["pruning"]["ranking"] == ranking


def test_global_magnitude_modifier_is_global() -> None:
    raw, _ = convert_text(gmp().replace("!GMPruningModifier", "!GlobalMagnitudePruningModifier"))
    assert raw["pruning"]["ranking"] == "global" and raw["pruning"]["method"] == "magnitude"


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
    raw, _ = convert_text(gmp(params=[f"re:{pattern}"]))
    (ours,) = raw["pruning"]["layers"]
    expected = {name for name in PARAM_NAMES if re.match(pattern, name)}
    for matcher in (re.search, re.match, re.fullmatch):
        assert {name for name in PARAM_NAMES if matcher(ours, name)} == expected, matcher.__name__


def test_explicit_and_special_params() -> None:
    raw, _ = convert_text(gmp(params=["fc.weight", "layer1.0.conv1.weight"]))
    layers = raw["pruning"]["layers"]
    assert layers == [r"^fc\.weight$", r"^layer1\.0\.conv1\.weight$"]
    assert {n for n in PARAM_NAMES if any(re.search(p, n) for p in layers)} == {"fc.weight", "layer1.0.conv1.weight"}
    raw, notes = convert_text(gmp(params="__ALL__"))
    assert raw["pruning"]["layers"] == [".*"] and any("__ALL__" in note for note in notes)
    raw, _ = convert_text(gmp(params=["fc.weight", "__ALL_PRUNABLE__"]))
    assert raw["pruning"]["layers"] == [".*"]


def test_fractional_update_frequency_errors_unless_rounding_allowed() -> None:
    with pytest.raises(RecipeError) as info:
        convert_text(gmp(update_frequency=0.5))
    assert "update_frequency" in info.value.message and "GMPruningModifier" in info.value.message
    raw, notes = convert_text(gmp(update_frequency=0.5), allow_rounding=True)
    assert raw["pruning"]["schedule"]["frequency"] == 1
    assert any("5 pruning steps instead of 9" in note for note in notes)


def test_fractional_epochs_error_unless_rounding_allowed() -> None:
    with pytest.raises(RecipeError, match="start_epoch.*not a whole epoch"):
        convert_text(gmp(start_epoch=0.5))
    raw, _ = convert_text(gmp(start_epoch=1.4), allow_rounding=True)
    assert raw["pruning"]["schedule"]["start_epoch"] == 1


def test_numeric_strings_and_variable_references() -> None:
    text = "target: 0.75\nstart: 1\n" + gmp(final_sparsity="target", start_epoch="start", init_sparsity="5e-2")
    raw, _ = convert_text(text)
    assert raw["pruning"]["final_sparsity"] == 0.75
    assert raw["pruning"]["schedule"]["start_epoch"] == 1
    assert raw["pruning"]["initial_sparsity"] == 0.05


def test_same_schedule_pruning_modifiers_merge_params() -> None:
    body = gmp(params=["re:layer1.*"])
    second = body.split("  - !GMPruningModifier\n")[1].replace("re:layer1.*", "re:layer2.*")
    raw, notes = convert_text(body + "  - !GMPruningModifier\n" + second)
    assert raw["pruning"]["layers"] == ["^(?:layer1.*)", "^(?:layer2.*)"]
    assert any("merged the params" in note for note in notes)


def test_different_pruning_targets_are_refused() -> None:
    body = gmp(params=["re:layer1.*"])
    second = body.split("  - !GMPruningModifier\n")[1].replace("final_sparsity: 0.8", "final_sparsity: 0.9")
    with pytest.raises(RecipeError) as info:
        convert_text(body + "  - !GMPruningModifier\n" + second)
    message = info.value.message
    assert "modifiers[1]" in message and "modifiers[2]" in message and "final_sparsity" in message


@pytest.mark.parametrize(
    ("overrides", "field"),
    [
        ({"mask_type": "block4"}, "mask_type"),
        ({"mask_type": "block"}, "mask_type"),
        ({"mask_type": [1, 4]}, "mask_type"),
        ({"mask_type": "2:4"}, "mask_type"),
        ({"inter_func": "inverse_cubic"}, "inter_func"),
        ({"init_sparsity": "__FROM_PARAM__"}, "init_sparsity"),
        ({"final_sparsity": {0.8: ["fc.weight"]}}, "final_sparsity"),
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
    ],
)
def test_pruning_errors_name_the_field(overrides: dict[str, Any], field: str) -> None:
    with pytest.raises(RecipeError) as info:
        convert_text(gmp(**overrides))
    assert f"field '{field}'" in info.value.message
    assert "!GMPruningModifier (modifiers[1])" in info.value.message


def test_obs_structured_mask_and_unknown_sampler_key_are_refused() -> None:
    obs = gmp().replace("!GMPruningModifier", "!OBSPruningModifier")
    with pytest.raises(RecipeError, match=r"OBSPruningModifier.*field 'mask_type'.*'block4'"):
        convert_text(obs + "    mask_type: block4\n")
    with pytest.raises(RecipeError, match=r"grad_sampler_kwargs.*'num_workers'"):
        convert_text(obs + "    grad_sampler_kwargs:\n      num_workers: 4\n")
    with pytest.raises(RecipeError, match=r"field 'fisher_block_size'"):
        convert_text(obs + "    fisher_block_size: 0\n")


def test_unknown_modifier_field_and_lr_function_errors() -> None:
    with pytest.raises(RecipeError) as info:
        convert_text(
            """
            modifiers:
              - !LearningRateFunctionModifier
                start_epoch: 0
                end_epoch: 4
                lr_func: cyclic_linear
                cycle_epochs: 1.0
                init_lr: 0.1
                final_lr: 0.01
            """
        )
    assert "field 'lr_func'" in info.value.message and "cyclic_linear" in info.value.message
    with pytest.raises(RecipeError) as info:
        convert_text("modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 2\n    speed: 3\n")
    assert "field 'speed'" in info.value.message and "EpochRangeModifier" in info.value.message
    with pytest.raises(RecipeError, match=r"!MysteryModifier \(modifiers\[0\]\).*no wf-pipeline translation"):
        convert_text("modifiers:\n  - !MysteryModifier\n    start_epoch: 0\n")


def test_learning_rate_schedules() -> None:
    epoch_range = "  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 6\n"
    step_lr = "  - !LearningRateModifier\n    start_epoch: 0\n    lr_class: StepLR\n    lr_kwargs: {step_size: 2, gamma: 0.5}\n    init_lr: 0.1\n"
    raw, _ = convert_text("modifiers:\n" + epoch_range + step_lr)
    assert raw["finetune"]["lr_schedule"]["step_epochs"] == [2, 4]
    assert raw["finetune"]["lr_schedule"]["gamma"] == 0.5
    exp_lr = step_lr.replace("StepLR", "ExponentialLR").replace("{step_size: 2, gamma: 0.5}", "{gamma: 0.9}")
    raw, _ = convert_text("modifiers:\n" + epoch_range + exp_lr)
    assert raw["finetune"]["lr_schedule"]["step_epochs"] == [1, 2, 3, 4, 5]
    Recipe.model_validate(raw)

    short_cosine = "  - !LearningRateFunctionModifier\n    start_epoch: 0\n    end_epoch: 4\n    lr_func: cosine\n    init_lr: 0.1\n    final_lr: 0.0\n"
    with pytest.raises(RecipeError, match="ends at epoch 4.* lasts 6 epochs"):
        convert_text("modifiers:\n" + epoch_range + short_cosine)

    uneven = "".join(
        f"  - !SetLearningRateModifier\n    start_epoch: {epoch}\n    learning_rate: {lr}\n"
        for epoch, lr in ((0, 0.1), (2, 0.01), (4, 0.005))
    )
    with pytest.raises(RecipeError, match="different factors"):
        convert_text("modifiers:\n" + epoch_range + uneven)


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
    with pytest.raises(RecipeError, match=r"modifiers\[0\] is not a tagged modifier"):
        convert_sparseml({"modifiers": [{"start_epoch": 0}]})
    with pytest.raises(RecipeError, match="must be a list"):
        convert_sparseml({"modifiers": {"start_epoch": 0}})


def test_sparseml_module_never_calls_python_eval_or_exec() -> None:
    tree = ast.parse(inspect.getsource(sparseml))
    called = {
        node.func.id for node in ast.walk(tree) if isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
    }
    assert not called & {"eval", "exec", "compile"}


@pytest.mark.parametrize("name", ["gmp_cosine.yaml", "obs_split.yaml", "global_magnitude_steps.yaml", "recipe_card.md"])
def test_recipe_loader_accepts_sparseml_files(name: str) -> None:
    from wf_pipeline.recipe.loader import load_recipe

    recipe, notes = load_recipe(FIXTURES / name, ["finetune.steps_per_epoch=2"])
    assert recipe.pruning.method in ("magnitude", "woodfisher")
    assert recipe.finetune.steps_per_epoch == 2  # --set overrides still apply after translation
    assert all(isinstance(note, str) for note in notes)


def test_warmup_that_does_not_start_at_zero_is_noted() -> None:
    text = """
        modifiers:
          - !LearningRateFunctionModifier
            start_epoch: 0
            end_epoch: 2
            lr_func: linear
            init_lr: 0.001
            final_lr: 0.1
          - !LearningRateFunctionModifier
            start_epoch: 2
            end_epoch: 6
            lr_func: cosine
            init_lr: 0.1
            final_lr: 0.0
    """
    raw, notes = convert_text(text)
    assert raw["finetune"]["lr_schedule"]["warmup_epochs"] == 2.0
    assert raw["finetune"]["lr_schedule"]["kind"] == "cosine"
    assert any("starts at lr 0.001" in note for note in notes)
    with pytest.raises(RecipeError, match="warmup must rise"):
        convert_text(text.replace("final_lr: 0.1", "final_lr: 0.2"))
