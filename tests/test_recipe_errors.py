"""`wf-pipeline recipe check` rejects bad recipes with one line naming the field, exit code 2, no traceback."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from tests.cli_helpers import run_cli

BASE = {
    "name": "t",
    "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1, "weights": None},
    "data": {"dataset": "digits"},
    "pruning": {"method": "magnitude", "final_sparsity": 0.5, "schedule": {"start_epoch": 0, "end_epoch": 1}},
    "finetune": {"epochs": 2},
}


def _merge(base: dict, patch: dict) -> dict:
    out = {**base}
    for key, value in patch.items():
        out[key] = _merge(out[key], value) if isinstance(value, dict) and isinstance(out.get(key), dict) else value
    return out


# (id, recipe patch or raw text, words the one-line error must contain)
BAD_RECIPES = [
    ("unknown-top-level-key", {"modle": {"name": "resnet20"}}, ["modle", "unknown field"]),
    ("unknown-nested-key", {"pruning": {"finall_sparsity": 0.9}}, ["pruning.finall_sparsity", "unknown field"]),
    ("wrong-type", {"finetune": {"epochs": "ten"}}, ["finetune.epochs", "integer"]),
    ("sparsity-one", {"pruning": {"final_sparsity": 1.0}}, ["pruning.final_sparsity", "less than 1"]),
    ("sparsity-negative", {"pruning": {"initial_sparsity": -0.1}}, ["pruning.initial_sparsity"]),
    ("initial-above-final", {"pruning": {"initial_sparsity": 0.8, "final_sparsity": 0.5}},
     ["initial_sparsity", "final_sparsity"]),
    ("unknown-method", {"pruning": {"method": "woodfisherr"}}, ["pruning.method", "woodfisher"]),
    ("schedule-reversed", {"pruning": {"schedule": {"start_epoch": 3, "end_epoch": 1}}, "finetune": {"epochs": 4}},
     ["end_epoch", "start_epoch"]),
    ("schedule-after-finetune", {"pruning": {"schedule": {"end_epoch": 9}}}, ["end_epoch", "finetune.epochs"]),
    ("damp-zero", {"pruning": {"woodfisher": {"damp": 0}}}, ["pruning.woodfisher.damp", "greater than 0"]),
    ("block-size-zero", {"pruning": {"woodfisher": {"block_size": 0}}}, ["pruning.woodfisher.block_size"]),
    ("bad-regex", {"pruning": {"layers": ["conv("]}}, ["pruning.layers", "regex"]),
    ("empty-layer-selection", {"pruning": {"layers": ["no_such_layer"]}}, ["pruning.layers"]),
    ("skip-everything", {"pruning": {"skip": [".*"]}}, ["pruning"]),
    ("unknown-model-name", {"model": {"name": "resnet9000"}}, ["model.name", "resnet9000"]),
    ("missing-model-file", {"model": {"weights": "nowhere/model.pt"}}, ["model.weights", "nowhere/model.pt"]),
    ("unknown-dataset", {"data": {"dataset": "mnist-ish"}}, ["data.dataset"]),
    ("bad-run-name", {"output": {"run_name": "../escape"}}, ["output.run_name"]),
    ("empty-batch-sizes", {"validate": {"batch_sizes": []}}, ["validate.batch_sizes"]),
    ("bad-device", {"device": "tpu"}, ["device"]),
    ("export-not-onnx", {"export": {"filename": "model.pt"}}, ["export.filename", ".onnx"]),
    ("missing-data-root", {"data": {"dataset": "fashion_mnist", "root": "/no/such/folder"}}, ["data.root"]),
    ("section-not-mapping", {"pruning": 0.9}, ["pruning"]),
    ("bad-optimizer", {"finetune": {"optimizer": {"name": "lion"}}}, ["finetune.optimizer.name"]),
    ("unknown-builtin-weights", {"model": {"weights": "builtin:vgg-imagenet"}}, ["model.weights", "builtin"]),
    ("not-yaml", "model: [unclosed\n", ["not valid YAML", "line"]),
    ("not-a-mapping", "- just\n- a list\n", ["mapping"]),
]


@pytest.mark.parametrize("case_id,patch,words", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_is_rejected_with_one_line(tmp_path: Path, capsys, monkeypatch, case_id, patch, words) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(patch if isinstance(patch, str) else yaml.safe_dump(_merge(BASE, patch)))
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(path))
    assert result.code == 2, result
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert len(lines) == 1, result.err
    assert lines[0].startswith("error: ")
    assert "Traceback" not in result.err + result.out
    for word in words:
        assert word in lines[0], (word, lines[0])


def test_corrupt_weights_file_is_rejected(tmp_path: Path, capsys, monkeypatch) -> None:
    weights = tmp_path / "broken.pt"
    weights.write_bytes(b"this is not a checkpoint")
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_merge(BASE, {"model": {"weights": str(weights)}})))
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(path))
    assert result.code == 2 and "model.weights" in result.err and len(result.err.strip().splitlines()) == 1


def test_checkpoint_for_another_model_is_rejected(tmp_path: Path, capsys, monkeypatch) -> None:
    weights = tmp_path / "linear.pt"
    torch.save({"weight": torch.zeros(3, 3)}, weights)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(_merge(BASE, {"model": {"weights": str(weights)}})))
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(path))
    assert result.code == 2 and "model.weights" in result.err


def test_missing_recipe_file(capsys, monkeypatch, tmp_path: Path) -> None:
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(tmp_path / "absent.yaml"))
    assert result.code == 2 and "recipe file not found" in result.err


@pytest.mark.parametrize("override,words", [
    ("pruning.final_sparsity=1.5", ["pruning.final_sparsity"]),
    ("pruning.final_sparsity", ["KEY=VALUE"]),
    ("pruning.woodfisher.nope=1", ["pruning.woodfisher.nope"]),
    ("pruning.final_sparsity.x=1", ["not a section"]),
])
def test_bad_override_is_rejected(tmp_path: Path, capsys, monkeypatch, override, words) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(path), "--set", override)
    assert result.code == 2, result
    for word in words:
        assert word in result.err


def test_good_recipe_passes_and_show_resolves_overrides(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(BASE))
    assert run_cli(capsys, monkeypatch, "recipe", "check", str(path)).code == 0
    shown = run_cli(capsys, monkeypatch, "recipe", "show", str(path), "--set", "pruning.final_sparsity=0.95",
                    "--set", "pruning.woodfisher.block_size=64")
    assert shown.code == 0
    resolved = yaml.safe_load(shown.out)
    assert resolved["pruning"]["final_sparsity"] == 0.95
    assert resolved["pruning"]["woodfisher"]["block_size"] == 64
    assert resolved["pruning"]["woodfisher"]["damp"] == 1e-5  # paper default filled in
    assert resolved["pruning"]["schedule"]["kind"] == "cubic"


def test_debug_env_shows_traceback(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.setenv("WF_DEBUG", "1")
    result = run_cli(capsys, monkeypatch, "recipe", "check", str(tmp_path / "absent.yaml"))
    assert result.code == 2 and "Traceback" in result.err
