"""Every bad input of issues 11 and 20 fails in seconds with one line and exit code 2, in `recipe check` and in
`compress` (which then leaves no run directory, lock file or root), writes nothing outside the run root and runs
no code from the recipe unless the command line allows it; and a dense (`method: none`) run exports.

The cases are tables, one per rule (README, "Bad input"): values (BAD_OVERRIDES), recipe files (BAD_FILES),
usage errors (BAD_USAGE), run folders (RUN_FOLDER_CASES, REPORT_CASES) and SparseML recipes (BAD_SPARSEML);
the tests after them follow hints, and check that repairs, skips and key metrics are visible and right."""
from __future__ import annotations

import json
import shutil
import sys
import textwrap
from collections.abc import Callable
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
    # issue 20, values: every whole number fits 64 bits; regex lists hold no empty pattern; --set keys are names
    ("seed-2-to-the-70", [f"seed={2 ** 70}"], ["seed", "64 bits"]),
    ("seed-below-int64", [f"seed={-2 ** 64}"], ["seed", "64 bits"]),
    ("epochs-2-to-the-64", [f"finetune.epochs={2 ** 64}"], ["finetune.epochs", "64 bits"]),
    ("kwargs-int-2-to-the-70", [f"model.kwargs={{width: {2 ** 70}}}"], ["model.kwargs.width", "64 bits"]),
    ("layers-empty-regex", ["pruning.layers=['']"], ["pruning.layers", "empty regex"]),
    ("layers-blank-regex", ["pruning.layers=['conv', ' ']"], ["pruning.layers", "empty regex"]),
    ("skip-empty-regex", ["pruning.skip=['']"], ["pruning.skip", "empty regex"]),
    ("group-layers-empty-regex", ["pruning.groups=[{layers: [''], final_sparsity: 0.5}]"],
     ["pruning.groups.0.layers", "empty regex"]),
    ("min-keep-layers-empty-key", ["pruning.structure=channel", "pruning.method=magnitude",
                                   "pruning.channel.min_keep_layers={'': 0.5}"], ["min_keep_layers", "empty regex"]),
    ("set-key-double-dot", ["a..b=1"], ["a..b", "not a field path"]),
    ("set-key-leading-dot", [".seed=1"], [".seed", "not a field path"]),
    ("set-key-trailing-dot", ["seed.=1"], ["seed.", "not a field path"]),
    ("set-key-space", ["pruning. final_sparsity=0.5"], ["not a field path"]),
    ("set-value-duplicate-key", ["model.kwargs={width: 4, width: 8}"], ["duplicate key 'width'"]),
    # issue 20, late refusals: made by recipe check, before a run folder or lock exists
    ("weights-unknown-torchvision-name", ["model.weights=ResNet18_Weights.NO_SUCH"],
     ["model.weights", "ResNet18_Weights.NO_SUCH"]),
    ("weights-unknown-torchvision-enum", ["model.weights=NoSuchNet_Weights.DEFAULT"], ["model.weights"]),
    ("memory-budget-below-smallest-plan", ["pruning.woodfisher.memory_budget_gb=0.000001"],
     ["pruning.woodfisher.memory_budget_gb", "smallest budget"]),
    *([] if torch.cuda.is_available() else [("device-cuda-without-gpu", ["device=cuda"], ["device", "no GPU"])]),
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
    torch.onnx.export(model, (torch.zeros(1, 1, side, side),), str(path), input_names=["input"],
                      output_names=["logits"],
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


# ------------------------------------------------------------------ issue 20: recipe files that are not recipes
def _fifo(folder: Path) -> Path:
    import os

    path = folder / "pipe.yaml"
    os.mkfifo(path)
    return path


def _written(name: str, text: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_text(text)
        return folder / name
    return make


def _written_bytes(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


# (id, makes the recipe path in a folder, words). Rule: a recipe is a regular UTF-8 file of at most 1 MB whose
# YAML names no key twice; each is refused by every command that reads a recipe.
BAD_FILES: list[tuple[str, Callable[[Path], Path], list[str]]] = [
    ("dev-zero", lambda folder: Path("/dev/zero"), ["/dev/zero", "not a regular file"]),
    ("dev-null-char-device", lambda folder: Path("/dev/null"), ["not a regular file"]),
    ("named-pipe", _fifo, ["pipe.yaml", "not a regular file"]),
    ("larger-than-1-mb", _written("big.yaml", "name: big\n" + "# padding\n" * 120_000), ["larger than"]),
    ("not-utf8", _written_bytes("latin.yaml", b"name: caf\xe9\n"), ["cannot read recipe"]),
    ("duplicate-top-level-key", _written("dup.yaml", "name: a\nname: b\nmodel: {weights: null}\n"),
     ["duplicate key 'name'", "line 1"]),
    ("duplicate-nested-key", _written("dup2.yaml", "name: a\nmodel:\n  weights: null\n  weights: x.pt\n"),
     ["duplicate key 'weights'"]),
    ("duplicate-key-sparseml", _written("dupsml.yaml", "modifiers:\n  - !GMPruningModifier\n    params: __ALL__\n"
                                        "    params: __ALL__\n    final_sparsity: 0.5\n"),
     ["duplicate key 'params'"]),
]


@pytest.mark.parametrize("case_id,make,words", BAD_FILES, ids=[c[0] for c in BAD_FILES])
def test_recipe_file_that_is_not_a_recipe(tmp_path: Path, capsys, monkeypatch, case_id, make, words) -> None:
    monkeypatch.chdir(tmp_path)
    path = make(tmp_path)
    before = files_under(tmp_path)
    for command in (["recipe", "show"], ["recipe", "check"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(path)), *words)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "check", str(TINY), "--base", str(path)), *words)
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------ issue 20: usage errors are one line too
BAD_USAGE = [
    ("memory-budget-not-a-number", ["compress", str(TINY), "--memory-budget", "abc"], ["--memory-budget"]),
    ("oneshot-memory-budget-not-a-number", ["oneshot", str(TINY), "--memory-budget", "1e"], ["--memory-budget"]),
    ("unknown-option", ["recipe", "check", str(TINY), "--no-such-flag"], ["--no-such-flag"]),
    ("option-without-value", ["compress", str(TINY), "--set"], ["--set"]),
    ("unknown-command", ["compres", str(TINY)], ["compres"]),
    ("missing-argument", ["compress"], ["recipe_path"]),
]


@pytest.mark.parametrize("case_id,args,words", BAD_USAGE, ids=[c[0] for c in BAD_USAGE])
def test_usage_errors_are_one_line(tmp_path: Path, capsys, monkeypatch, case_id, args, words) -> None:
    monkeypatch.chdir(tmp_path)
    result = run_cli(capsys, monkeypatch, *args)
    assert_one_line_exit_2(result, *words)
    assert "--help" in result.err and "╭" not in result.err
    assert not files_under(tmp_path)


# ------------------------------------------------------------------ issue 20: run folders
def _symlink_to_elsewhere(run: Path, elsewhere: Path) -> None:
    run.symlink_to(elsewhere, target_is_directory=True)


def _plain_folder(run: Path, elsewhere: Path) -> None:
    run.mkdir()
    (run / "notes.txt").write_text("mine")


def _run_folder_linked_recipe(run: Path, elsewhere: Path) -> None:
    run.mkdir()
    (elsewhere / "recipe.yaml").write_text("name: x\n")
    (run / "recipe.yaml").symlink_to(elsewhere / "recipe.yaml")
    (run / "environment.json").write_text("{}")


# (id, what is at artifacts/tiny-digits, command-line flags, words). Rule: an existing path at the run
# folder's place must be a real run folder (not a link, holds recipe.yaml + environment.json) for every command.
RUN_FOLDER_CASES = [
    ("symlink-resume", _symlink_to_elsewhere, ["--resume"], ["symbolic link"]),
    ("symlink-overwrite", _symlink_to_elsewhere, ["--overwrite"], ["symbolic link"]),
    ("symlink-plain", _symlink_to_elsewhere, [], ["symbolic link"]),
    ("not-a-run-resume", _plain_folder, ["--resume"], ["not a run folder"]),
    ("not-a-run-overwrite", _plain_folder, ["--overwrite"], ["not a run folder"]),
    ("run-with-linked-recipe-resume", _run_folder_linked_recipe, ["--resume"], ["not a run folder"]),
]


@pytest.mark.parametrize("case_id,make,flags,words", RUN_FOLDER_CASES, ids=[c[0] for c in RUN_FOLDER_CASES])
def test_run_folder_must_be_a_real_run_folder(tmp_path: Path, capsys, monkeypatch, case_id, make, flags,
                                              words) -> None:
    root, elsewhere = tmp_path / "artifacts", tmp_path / "elsewhere"
    root.mkdir()
    elsewhere.mkdir()
    make(root / "tiny-digits", elsewhere)
    before = {path: path.read_bytes() if path.is_file() else None for path in files_under(tmp_path)}
    args = sets(f"output.root={root}")
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "compress", str(TINY), *flags, *args), "tiny-digits", *words)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "check", str(TINY), *args), *words)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "oneshot", str(TINY), "--overwrite",
                                   *sets(f"output.root={root}", "output.run_name=tiny-digits")), *words)
    after = {path: path.read_bytes() if path.is_file() else None for path in files_under(tmp_path)}
    assert after == before  # nothing written through the link, nothing deleted, no lock file


def test_existing_run_and_missing_run_refused_before_anything_exists(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "runs" / "artifacts"
    args = sets(f"output.root={root}")
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "compress", str(TINY), "--resume", *args),
                           "--resume", "no run directory")
    assert not (tmp_path / "runs").exists()  # no empty artifacts/, no lock file
    run = root / "tiny-digits"
    run.mkdir(parents=True)
    for name in ("recipe.yaml", "environment.json"):
        (run / name).write_text("{}")
    before = files_under(tmp_path)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "compress", str(TINY), *args), "already exists", "--resume")
    assert files_under(tmp_path) == before  # no .tiny-digits.lock left behind


REPORT_CASES = [
    ("any-folder", lambda tmp: tmp, ["not a run folder"]),
    ("missing", lambda tmp: tmp / "nope", ["not found"]),
    ("a-file", lambda tmp: (tmp / "f.txt").write_text("x") and tmp / "f.txt", ["not a run folder"]),
    ("symlink-to-run", lambda tmp: _linked_run(tmp), ["symbolic link"]),
]


def _linked_run(tmp: Path) -> Path:
    run = tmp / "real"
    run.mkdir()
    for name in ("recipe.yaml", "environment.json"):
        (run / name).write_text("{}")
    (tmp / "link").symlink_to(run, target_is_directory=True)
    return tmp / "link"


@pytest.mark.parametrize("case_id,make,words", REPORT_CASES, ids=[c[0] for c in REPORT_CASES])
def test_report_writes_only_into_a_run_folder(tmp_path: Path, capsys, monkeypatch, case_id, make, words) -> None:
    target = make(tmp_path)
    before = files_under(tmp_path)
    assert_one_line_exit_2(run_cli(capsys, monkeypatch, "report", str(target)), "report", *words)
    assert files_under(tmp_path) == before


# ------------------------------------------------------------------ issue 20: hints name settings that work
def _hinted_settings(error: str) -> list[str]:
    """The `field: value` settings a one-line error's hint names, as --set items."""
    import re

    hint = error.split("(hint:", 1)[1]
    return [f"{field}={value}" for field, value in re.findall(r"(pruning\.woodfisher\.\w+):? (?:to )?([0-9.e+-]+)",
                                                               hint)]


@pytest.mark.parametrize("command", [["compress"], ["oneshot", "--sparsity", "0.5", "0.8", "--method", "woodfisher"]])
def test_following_the_repair_hint_works_and_a_refused_run_leaves_nothing(tmp_path: Path, capsys, monkeypatch,
                                                                           command) -> None:
    root = tmp_path / "artifacts"
    args = sets(f"output.root={root}", "pruning.woodfisher.damp=1e-16", "validate.repeats=1", "validate.warmup=0",
                "validate.batch_sizes=[1]", "data.test_subset=64")
    refused = run_cli(capsys, monkeypatch, command[0], str(TINY), *args, *command[1:])
    assert_one_line_exit_2(refused, "extra damping", "max_repair_jitter")
    assert not root.exists()  # the run folder, its lock file and the root it made are gone
    hinted = _hinted_settings(refused.err)
    assert {item.split("=")[0] for item in hinted} == {f"pruning.woodfisher.{name}" for name in ("damp",
                                                                                                  "max_repair_jitter")}
    for setting in hinted:  # each alternative the hint names gets through the whole run
        shutil.rmtree(root, ignore_errors=True)
        result = run_cli(capsys, monkeypatch, command[0], str(TINY), *args, "--set", setting, *command[1:])
        assert result.code == 0, (setting, result.err)


# ------------------------------------------------------------------ issue 20: repairs and skips are visible
def test_kfac_applies_the_nonfinite_policy() -> None:
    pytest.importorskip("curvlinops")
    from wf_pipeline.errors import WFError
    from wf_pipeline.pruning import MaskSet, PruneSettings, prune_step
    from wf_pipeline.pruning.selection import select_prunable

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 10)).eval()
    params = select_prunable(model, [".*"], [])
    xs, ys = torch.randn(12, 1, 8, 8), torch.arange(12) % 10
    xs[5, 0, 0, 0] = float("nan")
    before = {n: p.detach().clone() for n, p in params.items()}
    settings = PruneSettings("kfac", num_grads=12, damp=1e-3)
    with pytest.raises(WFError, match=r"sample 5 .*non-finite") as info:
        prune_step(model, params, MaskSet.dense(params), 0.5, settings, lambda: [(xs, ys)])
    assert "pruning.woodfisher.nonfinite: skip" in str(info.value) and "\n" not in str(info.value)
    assert all(torch.equal(p, before[n]) for n, p in params.items())
    report = prune_step(model, params, MaskSet.dense(params), 0.5, settings.replace(nonfinite="skip"),
                        lambda: [(xs, ys)])
    assert report.details.nonfinite_skipped == 1 and all(torch.isfinite(p).all() for p in params.values())
    assert any("1 non-finite gradient(s) skipped" in line for line in report.notices())


def test_repairs_are_in_the_terminal_log_report_and_oneshot(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "artifacts"
    args = sets(f"output.root={root}", "pruning.woodfisher.damp=1e-16", "pruning.woodfisher.max_repair_jitter=1e6",
                "validate.repeats=1", "validate.warmup=0", "validate.batch_sizes=[1]", "data.test_subset=64",
                "evaluation.monitor=all", "evaluation.monitor_samples=32")
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), *args)
    assert result.code == 0, result.err
    terminal = " ".join((result.out + result.err).split())
    assert "warning: Fisher inverse:" in terminal and "extra damping" in terminal
    run = root / "tiny-digits"
    log_lines = [line for line in (run / "log.txt").read_text().splitlines() if "WARNING pruning step" in line]
    assert len(log_lines) >= 2 and all("extra damping" in line for line in log_lines)  # one line per repair
    assert "**Repairs and skips**" in (run / "report.md").read_text()
    # every printed accuracy names its images: the monitored subset while training, all of them at the end
    assert "test accuracy" in terminal and "on the first 32 of 64 test images" in terminal
    assert "on all 64 test images" in terminal and "(both on the whole test set)" in terminal
    oneshot = run_cli(capsys, monkeypatch, "oneshot", str(TINY), *args, "--sparsity", "0.5", "--method", "woodfisher")
    assert oneshot.code == 0, oneshot.err
    shown = " ".join(oneshot.out.split())
    assert "warning: woodfisher @ 50%: Fisher inverse:" in shown and "on all 64 test images" in shown
    sweep = root / "tiny-digits-oneshot" / "oneshot"
    assert "Repairs and skips:" in (sweep / "oneshot.md").read_text()
    assert json.loads((sweep / "oneshot.json").read_text())["results"][0]["warnings"]


def test_structured_report_key_metrics_describe_the_shipped_model(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "artifacts"
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), *sets(
        f"output.root={root}", "pruning.structure=channel", "pruning.method=magnitude", "validate.repeats=1",
        "validate.warmup=0", "validate.batch_sizes=[1]", "data.test_subset=64", "export.sparse_storage=false"))
    assert result.code == 0, result.err
    run = root / "tiny-digits"
    metrics = json.loads((run / "metrics.json").read_text())
    surgery = metrics["channel_surgery"]
    assert metrics["num_params"] == surgery["params_after"] < surgery["params_before"]
    assert not any(".bn" in name for name in metrics["per_layer_sparsity"])  # layers' weights only
    report = (run / "report.md").read_text()
    shipped, dense = surgery["params_after"], surgery["params_before"]
    assert f"| parameters (shipped model) | {shipped:,} (dense {dense:,}) |" in report
    assert "| channels removed |" in report and "achieved sparsity (masks)" not in report


# ------------------------------------------------------------------ issue 20: SparseML leftovers
GM = ("  - !GMPruningModifier\n    params: {params}\n    init_sparsity: 0.05\n    final_sparsity: 0.5\n"
      "    start_epoch: 0\n    end_epoch: 1\n    update_frequency: 0.5\n")
EPOCHS = "modifiers:\n  - !EpochRangeModifier\n    start_epoch: 0\n    end_epoch: 2\n"

# (id, SparseML recipe text, words). Rule: every problem of a recipe is reported at once, each naming its place,
# and a refused modifier's parameter names are checked like any other's.
BAD_SPARSEML = [
    ("refused-modifier-names-checked", EPOCHS + "  - !MovementPruningModifier\n    params: ['layer1.0.conv1.weightt']\n"
     "    start_epoch: 1\n", ["2 problems", "no wf-pipeline translation", "layer1.0.conv1.weightt"]),
    ("every-bad-variable", "a: eval(nope + 1)\nb: eval(alsonope * 2)\n" + EPOCHS + GM.format(params="__ALL_PRUNABLE__"),
     ["2 problems", "'a'", "'b'", "nope", "alsonope"]),
    ("bad-variable-and-names", "a: eval(nope + 1)\n" + EPOCHS + GM.format(params="['re:(?i)nosuchlayer.*']"),
     ["recipe variable 'a'", "nope"]),
    ("regex-flag-matching-nothing", EPOCHS + GM.format(params="['re:(?i)NOSUCH.*']"),
     ["match no parameter", "re:(?i)NOSUCH.*"]),
]


@pytest.mark.parametrize("case_id,text,words", BAD_SPARSEML, ids=[c[0] for c in BAD_SPARSEML])
def test_sparseml_problems_are_all_reported(tmp_path: Path, capsys, monkeypatch, case_id, text, words) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "sparseml.yaml"
    path.write_text(text)
    for command in (["recipe", "check"], ["recipe", "convert"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(path)), *words)
    assert files_under(tmp_path) == {path}


def test_sparseml_regex_flags_select_like_sparseml(tmp_path: Path, capsys, monkeypatch) -> None:
    path = tmp_path / "flags.yaml"
    path.write_text(EPOCHS + GM.format(params="['re:(?i)LAYER1\\..*conv.\\.weight']"))
    result = run_cli(capsys, monkeypatch, "recipe", "convert", str(path))
    assert result.code == 0, result.err
    layers = yaml.safe_load(result.out)["pruning"]["layers"]
    assert layers == ["(?i)^(?:LAYER1\\..*conv.\\.weight).*"]


def test_groups_and_top_level_targets_are_not_mixed(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    groups = "pruning.groups=[{layers: ['^layer1'], final_sparsity: 0.5}]"
    # our recipe: a top-level target beside groups is refused, naming the field and the fix (tiny sets both)
    for command in (["recipe", "check"], ["compress"]):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, *command, str(TINY), "--set", groups),
                               "pruning.initial_sparsity is not used when pruning.groups is given", "remove")
    # SparseML: two pruning modifiers become groups; the converter writes no top-level target beside them,
    # and a --set of one is refused
    path = tmp_path / "two.yaml"
    path.write_text(EPOCHS + GM.format(params="['re:layer1.*']") + GM.format(params="['re:layer2.*']")
                    .replace("0.5\n", "0.7\n", 1))
    converted = run_cli(capsys, monkeypatch, "recipe", "convert", str(path))
    assert converted.code == 0, converted.err
    pruning = yaml.safe_load(converted.out)["pruning"]
    assert len(pruning["groups"]) == 2 and not {"layers", "initial_sparsity", "final_sparsity"} & set(pruning)
    for item in ("pruning.final_sparsity=0.9", "pruning.layers=[conv]"):
        assert_one_line_exit_2(run_cli(capsys, monkeypatch, "recipe", "check", str(path), "--set", item),
                               f"{item.split('=')[0]} is not used when pruning.groups is given")
    assert files_under(tmp_path) == {path}


def test_converted_header_names_source_hash_and_base(tmp_path: Path, capsys, monkeypatch) -> None:
    import hashlib

    path = tmp_path / "sml.yaml"
    path.write_text(EPOCHS + GM.format(params="__ALL_PRUNABLE__"))
    alone = run_cli(capsys, monkeypatch, "recipe", "convert", str(path))
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert f"# Source sha256: {digest}" in alone.out and "# Base recipe: none" in alone.out
    with_base = run_cli(capsys, monkeypatch, "recipe", "convert", str(path), "--base", str(TINY))
    base_digest = hashlib.sha256(TINY.read_bytes()).hexdigest()
    assert f"# Base recipe: {TINY} (sha256: {base_digest})" in with_base.out


def test_following_the_memory_budget_hint_works(tmp_path: Path, capsys, monkeypatch) -> None:
    root = tmp_path / "artifacts"
    args = sets(f"output.root={root}", "export.enabled=false", "validate.enabled=false", "data.test_subset=64")
    refused = run_cli(capsys, monkeypatch, "compress", str(TINY), *args, "--memory-budget", "0.001")
    assert_one_line_exit_2(refused, "pruning.woodfisher.memory_budget_gb", "smallest budget")
    assert not root.exists()  # refused by the check, before the dense model was evaluated or a folder made
    (hinted,) = _hinted_settings(refused.err)
    assert hinted.startswith("pruning.woodfisher.memory_budget_gb=")
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), *args, "--set", hinted)
    assert result.code == 0, result.err
