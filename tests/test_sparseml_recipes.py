"""SparseML recipes as published (fixtures follow the layout of neuralmagic/sparseml's torchvision tutorial
recipes, its recipe cards and its M-FAC research recipes), converted through the real CLI.

- Recipes over torchvision parameter names convert without edits given `--base` with that model, and the
  pruning stage accepts what they became (its groups, schedules and steps).
- Recipes over SparseML's own zoo names (`sections.*`) fail against a torchvision model with one message
  naming every parameter it lacks, and convert against a `module:factory` model that has them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import run_cli
from wf_pipeline.models import build_model
from wf_pipeline.models.catalog import model_params
from wf_pipeline.models.zoo import set_trust_recipe_code
from wf_pipeline.pruning import PruneSettings
from wf_pipeline.pruning.schedule import pruning_epochs
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.recipe.sparseml import load_sparseml_text
from wf_pipeline.training.gradual.plan import build_groups, plan_events

FIXTURES = Path(__file__).parent / "fixtures" / "sparseml"

# recipe, base, {group name: number of conv/linear weights it prunes}, pruning steps per group
CONVERTIBLE = [
    ("tv_resnet50_global.yaml", "base_tv_resnet50.yaml", {"all": 53}, 11),  # every conv, not fc
    ("tv_mobilenetv2_restarts.yaml", "base_tv_mobilenet_v2.yaml", {"all": 52}, 19),  # every 0.5 epoch over 9
    (
        "tv_densenet_hold.yaml",
        "base_tv_densenet121.yaml",
        {"pruning_modifiers[0]": 120, "finetuning_modifiers[0]": 1},
        21,
    ),
    ("zoo_resnet50_card.md", "base_zoo_resnet50.yaml", {"all": 16}, 16),  # 0 to 6 every 0.4 epochs
    (
        "zoo_resnet50_three_targets.md",
        "base_zoo_resnet50.yaml",
        {"pruning_modifiers[0]": 4, "pruning_modifiers[1]": 3, "pruning_modifiers[2]": 3},
        15,
    ),
    (
        "zoo_mobilenet_sparsity_map.md",
        "base_zoo_mobilenet.yaml",
        {
            "pruning_modifiers[0].final_sparsity[0]": 3,
            "pruning_modifiers[0].final_sparsity[1]": 3,
            "pruning_modifiers[0].final_sparsity[2]": 3,
        },
        2,
    ),
    ("transfer_hold_masks.md", "base_tv_resnet50.yaml", {}, None),
    ("magnitude_oneshot.md", "base_tv_resnet50.yaml", {"all": 54}, 2),
]


@pytest.mark.parametrize(("recipe", "base", "groups", "steps"), CONVERTIBLE, ids=[c[0] for c in CONVERTIBLE])
def test_published_style_recipes_convert_without_edits_and_the_stage_takes_them(
    recipe: str,
    base: str,
    groups: dict[str, int],
    steps: int | None,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    out = tmp_path / "converted.yaml"
    trust = ["--trust-recipe-code"] if "zoo" in base else []  # the zoo models are 'module:factory' code
    result = run_cli(
        capsys,
        monkeypatch,
        "recipe",
        "convert",
        str(FIXTURES / recipe),
        "--base",
        str(FIXTURES / base),
        "-o",
        str(out),
        *trust,
    )
    assert result.code == 0, result.err
    text = out.read_text()
    assert text.startswith("# Translated from the SparseML recipe")
    converted = Recipe.model_validate(yaml.safe_load(text))  # the written file is a valid wf-pipeline recipe
    set_trust_recipe_code(bool(trust))
    try:
        assert converted == load_recipe(FIXTURES / recipe, base_path=FIXTURES / base, model_catalog=model_params)[0]
    finally:
        set_trust_recipe_code(False)
    check = run_cli(capsys, monkeypatch, "recipe", "check", str(out), *trust)
    assert check.code == 0, check.err

    if converted.pruning.method == "none":
        assert groups == {}
        return
    model = build_model(converted.model, load=False, trust_code=True)
    planned = build_groups(model, converted.pruning, PruneSettings.from_config(converted.pruning))
    assert {g.name: len(g.params) for g in planned} == groups
    for group in planned:
        if steps is not None and group.final_sparsity > 0:
            assert len(pruning_epochs(group.schedule)) == steps, group.name
    events = plan_events(planned, steps_per_epoch=10)
    assert [e.step for e in events] == sorted(e.step for e in events)


def test_fractional_frequency_becomes_exact_optimizer_steps() -> None:
    set_trust_recipe_code(True)
    try:
        recipe, _ = load_recipe(
            FIXTURES / "zoo_resnet50_card.md", base_path=FIXTURES / "base_zoo_resnet50.yaml", model_catalog=model_params
        )
    finally:
        set_trust_recipe_code(False)
    assert recipe.pruning.schedule.frequency == 0.4
    model = build_model(recipe.model, load=False, trust_code=True)
    planned = build_groups(model, recipe.pruning, PruneSettings.from_config(recipe.pruning))
    events = plan_events(planned, steps_per_epoch=10)
    assert [e.step for e in events] == list(range(0, 61, 4))  # every 0.4 epochs = 4 of 10 steps, no rounding
    assert events[0].target == pytest.approx(0.05) and events[-1].target == pytest.approx(0.85)


@pytest.mark.parametrize("recipe", ["zoo_resnet50_card.md", "zoo_resnet50_three_targets.md"])
def test_zoo_recipes_fail_against_torchvision_with_one_message_naming_what_is_missing(
    recipe: str,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run_cli(
        capsys,
        monkeypatch,
        "recipe",
        "convert",
        str(FIXTURES / recipe),
        "--base",
        str(FIXTURES / "base_tv_resnet50.yaml"),
    )
    assert result.code == 2
    lines = [line for line in result.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in result.err
    for name in _zoo_names(recipe):
        assert name in lines[0]
    assert "match no parameter of model resnet50 (from the --base recipe)" in lines[0]
    assert "module:factory" in lines[0]


def _zoo_names(recipe: str) -> list[str]:
    raw = load_sparseml_text((FIXTURES / recipe).read_text())
    return [name for mod in raw["pruning_modifiers"] for name in mod["params"]]


def test_a_factory_base_needs_trust_to_be_checked(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cli(
        capsys,
        monkeypatch,
        "recipe",
        "convert",
        str(FIXTURES / "zoo_resnet50_card.md"),
        "--base",
        str(FIXTURES / "base_zoo_resnet50.yaml"),
    )
    assert result.code == 2 and "--trust-recipe-code" in result.err


def test_without_base_the_zoo_card_fails_against_the_bundled_model(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(FIXTURES / "zoo_resnet50_card.md"))
    assert result.code == 2
    assert "match no parameter of model resnet20 (the bundled default (no --base recipe given))" in result.err
    assert "pass --base" in result.err


@pytest.mark.parametrize(
    ("recipe", "words"),
    [
        (
            "pruned_quantized_card.md",
            ["2 problems", "CosineAnnealingWarmRestarts", "mask_type"],
        ),
        ("mfac_oneshot.md", ["MFACPruningModifier", "use !OBSPruningModifier"]),
    ],
)
def test_recipes_that_do_more_than_we_can_are_refused_in_one_line(
    recipe: str,
    words: list[str],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    result = run_cli(
        capsys,
        monkeypatch,
        "recipe",
        "convert",
        str(FIXTURES / recipe),
        "--base",
        str(FIXTURES / "base_tv_resnet50.yaml"),
    )
    assert result.code == 2
    (line,) = [line for line in result.err.splitlines() if line.startswith("error:")]
    for word in words:
        assert word in line


def test_convert_header_and_overrides(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    result = run_cli(
        capsys,
        monkeypatch,
        "recipe",
        "convert",
        str(FIXTURES / "tv_densenet_hold.yaml"),
        "--base",
        str(FIXTURES / "base_tv_densenet121.yaml"),
        "--set",
        "finetune.steps_per_epoch=3",
    )
    assert result.code == 0, result.err
    header = result.out.split("\n\n")[0]
    assert "# Runs on model densenet121 (from the --base recipe)" in result.out
    assert (
        "#   finetuning_modifiers[0] !ConstantPruningModifier.params = '__ALL_PRUNABLE__' -> pruning.groups[1]"
        in result.out
    )
    assert "# --set overrides applied after the translation: finetune.steps_per_epoch=3" in result.out
    assert all(line.startswith("#") for line in header.splitlines())
    assert yaml.safe_load(result.out)["finetune"]["steps_per_epoch"] == 3


@pytest.mark.slow
def test_compress_runs_a_converted_recipe_end_to_end(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    result = run_cli(
        capsys,
        monkeypatch,
        "compress",
        str(FIXTURES / "zoo_mobilenet_sparsity_map.md"),
        "--base",
        str(FIXTURES / "base_zoo_mobilenet.yaml"),
        "--set",
        "finetune.steps_per_epoch=2",
        "--set",
        f"output.root={tmp_path}",
        "--set",
        "validate.repeats=2",
        "--set",
        "validate.warmup=0",
        "--set",
        "validate.parity_samples=16",
        "--trust-recipe-code",
    )
    assert result.code == 0, result.err
    history = [
        yaml.safe_load(line)
        for line in (tmp_path / "sparseml-zoo-mobilenet" / "history.jsonl").read_text().splitlines()
    ]
    prunes = [(h["group"], h["target_sparsity"]) for h in history if h["kind"] == "prune"]
    assert prunes[-3:] == [
        ("pruning_modifiers[0].final_sparsity[0]", 0.9),
        ("pruning_modifiers[0].final_sparsity[1]", 0.95),
        ("pruning_modifiers[0].final_sparsity[2]", 0.97),
    ]


def test_loading_a_sparseml_recipe_from_python_needs_the_model_catalog() -> None:
    from wf_pipeline.errors import RecipeError

    with pytest.raises(RecipeError, match="needs the model's parameter names") as info:
        load_recipe(FIXTURES / "gmp_cosine.yaml")
    assert info.value.hint and "model_params" in info.value.hint
    recipe, notes = load_recipe(
        FIXTURES / "gmp_cosine.yaml", ["finetune.steps_per_epoch=2"], model_catalog=model_params
    )
    assert recipe.finetune.steps_per_epoch == 2 and notes[0].startswith("runs on model resnet20")
