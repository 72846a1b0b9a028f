"""End-to-end CLI runs on sklearn's digits: `train` writes a complete run directory; `oneshot` writes its table."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tests.cli_helpers import run_cli

TINY: dict[str, Any] = {
    "name": "tiny",
    "model": {"name": "resnet20", "num_classes": 10, "in_channels": 1, "weights": None},
    "data": {"dataset": "digits", "batch_size": 64, "fisher_pool": 200},
    "train": {"epochs": 2, "steps_per_epoch": 3, "optimizer": {"lr": 0.05}},
    "pruning": {"method": "none"},
    "finetune": {"epochs": 0},
}


def _recipe(tmp_path: Path, recipe: dict) -> Path:
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump({**recipe, "output": {"root": str(tmp_path / "artifacts")}}))
    return path


def test_train_writes_run_directory_and_checkpoint(tmp_path: Path, capsys, monkeypatch) -> None:
    recipe = _recipe(tmp_path, TINY)
    save_to = tmp_path / "weights" / "tiny.pt"
    result = run_cli(capsys, monkeypatch, "train", str(recipe), "--save-to", str(save_to))
    assert result.code == 0, result.err
    run = tmp_path / "artifacts" / "tiny"
    for name in ("recipe.yaml", "environment.json", "metrics.json", "history.jsonl", "log.txt", "checkpoints/final.pt"):
        if name == "log.txt":
            continue  # train logs through the reporter; compress writes log.txt
        assert (run / name).exists(), name
    env = json.loads((run / "environment.json").read_text())
    assert env["seed"] == 0 and env["torch"] == torch.__version__
    resolved = yaml.safe_load((run / "recipe.yaml").read_text())
    assert resolved["pruning"]["woodfisher"]["damp"] == 1e-5
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]
    state = torch.load(save_to, weights_only=True)
    assert "fc.weight" in state
    info = json.loads(save_to.with_suffix(".json").read_text())
    assert 0.0 <= info["test_accuracy"] <= 1.0
    # No temporary leftovers from atomic writes.
    assert not [p for p in run.rglob("*.tmp")]
    # A second run with the same name refuses to clobber it.
    again = run_cli(capsys, monkeypatch, "train", str(recipe))
    assert again.code == 2 and "already exists" in again.err and "--resume" in again.err


def test_train_resume_continues_from_last_epoch(tmp_path: Path, capsys, monkeypatch) -> None:
    one_epoch = {**TINY, "train": {**TINY["train"], "epochs": 1}}
    recipe = _recipe(tmp_path, one_epoch)
    assert run_cli(capsys, monkeypatch, "train", str(recipe)).code == 0
    # Resume the same run with more epochs: only the new epoch runs.
    result = run_cli(capsys, monkeypatch, "train", str(recipe), "--resume", "--set", "train.epochs=2")
    assert result.code == 0, result.err
    history_path = tmp_path / "artifacts" / "tiny" / "history.jsonl"
    history = [json.loads(line) for line in history_path.read_text().splitlines()]
    assert [h["epoch"] for h in history] == [0, 1]


def test_resume_without_run_is_an_error(tmp_path: Path, capsys, monkeypatch) -> None:
    result = run_cli(capsys, monkeypatch, "train", str(_recipe(tmp_path, TINY)), "--resume")
    assert result.code == 2 and "no run directory" in result.err


def test_oneshot_sweep_writes_json_markdown_and_plot(tmp_path: Path, capsys, monkeypatch) -> None:
    recipe = dict(TINY, pruning={"method": "woodfisher", "schedule": {"end_epoch": 0},
                                 "woodfisher": {"num_grads": 64, "block_size": 32, "chunk_size": 32}})
    path = _recipe(tmp_path, recipe)
    result = run_cli(capsys, monkeypatch, "oneshot", str(path), "--sparsity", "0.3", "0.6", "--method", "woodfisher",
                     "magnitude", "diag_fisher", "--recalibrate-bn")
    assert result.code == 0, result.err
    out = tmp_path / "artifacts" / "tiny-oneshot" / "oneshot"
    table = json.loads((out / "oneshot.json").read_text())
    assert len(table["results"]) == 6
    assert {r["method"] for r in table["results"]} == {"woodfisher", "magnitude", "diag_fisher"}
    for row in table["results"]:
        assert abs(row["achieved_sparsity"] - row["sparsity"]) < 1e-3
    assert (out / "oneshot.png").read_bytes()[:4] == b"\x89PNG"
    assert "| woodfisher |" in (out / "oneshot.md").read_text()


@pytest.mark.parametrize("args,words", [
    (["--sparsity", "1.2"], ["--sparsity", "outside"]),
    (["--method", "random"], ["--method", "random"]),
])
def test_oneshot_bad_arguments(tmp_path: Path, capsys, monkeypatch, args, words) -> None:
    result = run_cli(capsys, monkeypatch, "oneshot", str(_recipe(tmp_path, TINY)), *args)
    assert result.code == 2
    for word in words:
        assert word in result.err
