"""Every bad input of issue 11 fails in seconds with one line and exit code 2, in `recipe check` and in
`compress` (which then leaves no run directory), writes nothing outside the run root and runs no
code from the recipe unless the command line allows it; and a dense (`method: none`) run exports."""
from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from tests.cli_helpers import CliResult, run_cli

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
QUICK = ["finetune.epochs=1", "finetune.steps_per_epoch=1", "pruning.woodfisher.num_grads=16", "data.test_subset=64",
         "validate.repeats=1", "validate.warmup=0", "validate.batch_sizes=[1]", "model.kwargs={width: 4}"]

ALIAS_BOMB = """
name: bomb
model:
  weights: null
  kwargs:
    a: &a [x, x, x, x, x, x, x, x, x, x]
    b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
    c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
    d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
    e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
    f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
    g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
    h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
    i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def sets(*items: str) -> list[str]:
    return [arg for item in items for arg in ("--set", item)]


def assert_one_line_exit_2(result: CliResult, *words: str) -> None:
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, result
    assert len(lines) == 1 and lines[0].startswith("error: "), result.err
    assert "Traceback" not in result.err + result.out
    for word in words:
        assert word in lines[0], (word, lines[0])


def files_under(folder: Path) -> set[Path]:
    return {path for path in folder.rglob("*")}


# (id, --set overrides, words the one-line error must contain). Each also fails `compress` before any run directory.
BAD_OVERRIDES = [
    ("run-name-dotdot", ["output.run_name=.."], ["output.run_name"]),
    ("run-name-dot", ["output.run_name=."], ["output.run_name"]),
    ("recipe-name-dotdot", ["name=.."], ["name"]),
    ("run-name-folder", ["output.run_name=a/b"], ["output.run_name"]),
    ("export-filename-escapes", ["export.filename=../../../x.onnx"], ["export.filename"]),
    ("export-filename-absolute", ["export.filename=/tmp/x.onnx"], ["export.filename"]),
    ("export-filename-baseline", ["export.filename=dense_baseline.onnx"], ["export.filename"]),
    ("in-channels-misfit", ["model.in_channels=3"], ["model.in_channels", "1 channel"]),
    ("num-classes-misfit", ["model.num_classes=5"], ["model.num_classes", "10 classes"]),
    ("damp-inf", ["pruning.woodfisher.damp=.inf"], ["pruning.woodfisher.damp", "finite"]),
    ("damp-nan", ["pruning.woodfisher.damp=.nan"], ["pruning.woodfisher.damp", "finite"]),
    ("lr-inf", ["finetune.optimizer.lr=.inf"], ["finetune.optimizer.lr", "finite"]),
    ("block-size-1e9", ["pruning.woodfisher.block_size=1000000000"], ["pruning.woodfisher.block_size", "GB"]),
    ("block-size-1e9-float", ["pruning.woodfisher.block_size=1.0e+9"], ["pruning.woodfisher.block_size", "GB"]),
    ("user-code-untrusted", ["model.name=os:system", "model.kwargs={command: 'touch PWNED'}"],
     ["model.name", "--trust-recipe-code"]),
]


@pytest.mark.parametrize("case_id,overrides,words", BAD_OVERRIDES, ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_input_fails_check_and_compress_with_nothing_written(tmp_path: Path, capsys, monkeypatch, case_id,
                                                                 overrides, words) -> None:
    monkeypatch.chdir(tmp_path)
    root = tmp_path / "runs" / "artifacts"
    args = sets(f"output.root={root}", *overrides)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "check", str(TINY), *args), *words)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "compress", str(TINY), *args), *words)
    assert not files_under(tmp_path)  # no run directory, nothing beside it, no PWNED


def test_artifacts_being_a_file(tmp_path: Path, capsys, monkeypatch) -> None:
    blocker = tmp_path / "artifacts"
    blocker.write_text("not a folder")
    for root in (blocker, blocker / "sub"):
        for command in (["recipe", "check"], ["compress"]):
            result = run_cli(capsys, monkeypatch, *command, str(TINY), *sets(f"output.root={root}"))
            assert_one_line_exit_2(result, "output.root", "is a file")
    assert files_under(tmp_path) == {blocker} and blocker.read_text() == "not a folder"


def test_imagefolder_with_empty_splits(tmp_path: Path, capsys, monkeypatch) -> None:
    data = tmp_path / "images"
    for split in ("train", "val"):
        (data / split).mkdir(parents=True)
    args = sets(f"output.root={tmp_path / 'artifacts'}", "data.dataset=imagefolder", f"data.root={data}")
    for command in (["recipe", "check"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(TINY), *args), "data.root")
    (data / "train" / "cat").mkdir()  # a class folder without images
    (data / "val" / "cat").mkdir()
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "check", str(TINY), *args), "data.root")
    assert not (tmp_path / "artifacts").exists()


def test_alias_bomb_in_model_kwargs_is_refused_quickly(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(ALIAS_BOMB)  # 10^9 values once expanded
    for command in (["recipe", "show"], ["recipe", "check"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(path)), "expands to more than")
    deep = tmp_path / "deep.yaml"
    deep.write_text("name: deep\nmodel:\n  weights: null\n  kwargs:\n    x: " + "[" * 200 + "]" * 200 + "\n")
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "show", str(deep)), "nested")


def test_empty_and_all_default_recipes_are_refused_with_a_hint(tmp_path: Path, capsys, monkeypatch) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing here\n")
    for command in (["recipe", "check"], ["compress"], ["recipe", "show"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(empty)), "empty", "model")
    named_only = tmp_path / "named.yaml"
    named_only.write_text("name: x\ndata: {dataset: digits}\n")
    for command in (["recipe", "check"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(named_only)), "model.weights", "null")
    # Naming the weights, even as null for a deliberately random start, is enough.
    chosen = tmp_path / "chosen.yaml"
    chosen.write_text("name: x\nmodel: {in_channels: 1, weights: null}\ndata: {dataset: digits}\n")
    assert run_cli(capsys, monkeypatch, "recipe", "check", str(chosen)).code == 0
    assert not (tmp_path / "artifacts").exists()


def test_recipe_code_runs_only_when_trusted(tmp_path: Path, capsys, monkeypatch) -> None:
    (tmp_path / "marking_model.py").write_text(textwrap.dedent("""
        from pathlib import Path
        from wf_pipeline.models.cifar_resnet import resnet20

        def build(num_classes=10, in_channels=1):
            Path("RAN").write_text("factory ran")
            return resnet20(num_classes, in_channels, width=4)
    """))
    monkeypatch.chdir(tmp_path)
    args = ["recipe", "check", str(TINY), *sets("model.name=marking_model:build")]
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, *args), "--trust-recipe-code")
    assert not (tmp_path / "RAN").exists() and "marking_model" not in sys.modules
    trusted = run_cli(capsys, monkeypatch, *args, "--trust-recipe-code")
    sys.modules.pop("marking_model", None)
    assert trusted.code == 0, trusted.err
    assert (tmp_path / "RAN").read_text() == "factory ran"
    # The permission lasts one command only.
    (tmp_path / "RAN").unlink()
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, *args), "--trust-recipe-code")
    assert not (tmp_path / "RAN").exists()


def test_convert_to_a_folder_gives_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    folder = tmp_path / "out"
    folder.mkdir()
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "convert", str(TINY), "-o", str(folder)), "--output")
    assert not any(folder.iterdir())


def _tiny_onnx(path: Path, classes: int, side: int) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(side * side, classes)).eval()
    torch.onnx.export(model, torch.zeros(1, 1, side, side), str(path), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, dynamo=False)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the TorchScript exporter, fine for a 2-layer model
@pytest.mark.parametrize("classes,side,words",
                         [(5, 8, ["5 outputs", "labels up to 9"]), (10, 16, ["1x16x16", "1x8x8"])],
                         ids=["five-classes-vs-ten", "input-shape"])
def test_validate_refuses_a_model_that_does_not_fit_the_data(tmp_path: Path, capsys, monkeypatch, classes, side,
                                                              words) -> None:
    onnx_path = tmp_path / "model.onnx"
    _tiny_onnx(onnx_path, classes, side)
    result = run_cli(capsys, monkeypatch, "validate", str(onnx_path), "--recipe", str(TINY),
                     "--out", str(tmp_path / "validation"))
    assert_one_line_exit_2(result, str(onnx_path), *words)
    assert not (tmp_path / "validation").exists()


DENSE_RUNS = [["pruning.method=none"],
              ["pruning.final_sparsity=0", "pruning.initial_sparsity=0", "pruning.schedule.end_epoch=0"]]


@pytest.mark.parametrize("overrides", DENSE_RUNS,
                         ids=["method-none", "final-sparsity-0"])
def test_dense_run_exports_and_validates(tmp_path: Path, capsys, monkeypatch, overrides) -> None:
    root = tmp_path / "artifacts"
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), *sets(f"output.root={root}", *QUICK, *overrides))
    assert result.code == 0, result.err
    run = root / "tiny-digits"
    assert (run / "export" / "model.onnx").is_file()
    assert json.loads((run / "export" / "export.json").read_text())["pruned"]["sparsity_matches"] is True
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["passed"] is True and validation["sparsity"] < 0.01


def test_every_bundled_recipe_names_its_weights() -> None:
    for path in sorted((REPO / "recipes").glob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        assert "weights" in raw.get("model", {}), path
