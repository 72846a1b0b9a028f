"""The `wf-pipeline` command line. Thin: parses arguments, renders progress, maps outcomes to exit codes.

Exit codes: 0 ok, 1 a deployment gate failed, 2 bad input (one line), 3 a crash (a bug; the traceback
goes to the run's log.txt), 130 interrupted. `wf-torchrun` keeps them for multi-process runs.
"""
from __future__ import annotations

import os
import sys
import time
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from typer.exceptions import TyperException

from wf_pipeline.errors import EXIT_CRASH, EXIT_INTERRUPTED, RunAlreadyFinished, WFError

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False, no_args_is_help=True,
                  help="WoodFisher pruning -> sparse ONNX -> ONNX Runtime verification.")
recipe_app = typer.Typer(no_args_is_help=True, help="Check, show and convert recipes.")
app.add_typer(recipe_app, name="recipe")
console = Console(stderr=False)
err_console = Console(stderr=True)

SetOption = Annotated[list[str] | None, typer.Option("--set", "-s", help="override a field: KEY=VALUE (repeatable)")]
RecipeArg = Annotated[Path, typer.Argument(help="recipe YAML (ours or SparseML's)")]


BaseOption = Annotated[Path | None, typer.Option(
    "--base", help="for a SparseML recipe: our recipe that supplies model, data, export and validate")]
TrustOption = Annotated[bool, typer.Option(
    "--trust-recipe-code",
    help="allow a recipe's model.name 'module.path:factory' to import and run that code (off by default)")]


def _trust(allowed: bool) -> None:
    from wf_pipeline.models.zoo import set_trust_recipe_code

    set_trust_recipe_code(allowed)


BudgetOption = Annotated[float | None, typer.Option(
    "--memory-budget", metavar="GB",
    help="memory one WoodFisher step may use (sets pruning.woodfisher.memory_budget_gb)")]


def _with_budget(overrides: list[str] | None, budget: float | None) -> list[str] | None:
    return overrides if budget is None else [*(overrides or []), f"pruning.woodfisher.memory_budget_gb={budget}"]


def _load(path: Path, overrides: list[str] | None, base: Path | None = None, *, prunes: bool = False):
    """The validated recipe; `prunes`: the command prunes, so the recipe must name its model's weights."""
    from rich.markup import escape

    from wf_pipeline.models.catalog import model_params
    from wf_pipeline.recipe.loader import load_recipe

    recipe, notes = load_recipe(path, overrides or [], base, require_weights=prunes, model_catalog=model_params)
    for note in notes:
        err_console.print(f"[dim]note: {escape(note)}[/dim]")
    return recipe


@app.command()
def compress(
    recipe_path: RecipeArg,
    overrides: SetOption = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue the run from its last checkpoint")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="replace an existing run directory")] = False,
    base: BaseOption = None,
    trust_recipe_code: TrustOption = False,
    memory_budget: BudgetOption = None,
) -> None:
    """Prune the recipe's model with fine-tuning, export sparse ONNX, validate it in ONNX Runtime, write a report."""
    from wf_pipeline.cli_progress import RichReporter
    from wf_pipeline.runtime.progress import NullReporter
    from wf_pipeline.stages import run_compress

    _trust(trust_recipe_code)
    recipe = _load(recipe_path, _with_budget(overrides, memory_budget), base, prunes=True)
    if _rank() != 0:  # under torchrun only rank 0 draws progress
        run_compress(recipe, resume=resume, overwrite=overwrite, reporter=NullReporter())
        return
    with RichReporter(console) as reporter:
        outcome = run_compress(recipe, resume=resume, overwrite=overwrite, reporter=reporter)
    m = outcome.metrics
    pruned_accuracy = m.final_accuracy if m.final_accuracy is not None else float("nan")
    console.print(f"[bold]dense accuracy[/bold] {m.dense_accuracy:.4f}  [bold]pruned accuracy[/bold] "
                  f"{pruned_accuracy:.4f} (both on the whole test set)  [bold]sparsity[/bold] {m.sparsity or 0:.3f}")
    console.print(f"run directory: {outcome.run_dir}\nreport: {outcome.report}")
    if outcome.gates_passed is False:
        err_console.print(f"[red]deployment gates failed: {', '.join(outcome.failed_gates)}[/red]")
        raise typer.Exit(1)


@app.command()
def train(
    recipe_path: RecipeArg,
    overrides: SetOption = None,
    save_to: Annotated[Path | None, typer.Option(
        help="also write the final state_dict here (+ a .json with its accuracy)")] = None,
    resume: Annotated[bool, typer.Option("--resume")] = False,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    trust_recipe_code: TrustOption = False,
) -> None:
    """Train the recipe's model densely (train section), e.g. to make a pretrained checkpoint."""
    from wf_pipeline.cli_progress import RichReporter
    from wf_pipeline.stages import run_train

    _trust(trust_recipe_code)
    recipe = _load(recipe_path, overrides)
    with RichReporter(console) as reporter:
        outcome = run_train(recipe, resume=resume, overwrite=overwrite, save_to=save_to, reporter=reporter)
    console.print(f"test accuracy {outcome.metrics.final_accuracy:.4f} on the whole test set; "
                  f"run directory {outcome.run_dir}")


def _split_floats(values: list[str]) -> list[float]:
    out = []
    for value in values:
        for part in value.replace(",", " ").split():
            try:
                number = float(part)
            except ValueError:
                raise WFError(f"--sparsity: {part!r} is not a number", "e.g. --sparsity 0.5 0.7 0.9") from None
            if not 0.0 <= number < 1.0:
                raise WFError(f"--sparsity: {number} is outside [0, 1)", "give fractions such as 0.9")
            out.append(number)
    return out


@app.command()
def oneshot(
    recipe_path: RecipeArg,
    # typer reads a list default as the option's default values and never mutates it
    sparsity: Annotated[list[str], typer.Option(
        help="target sparsities, e.g. --sparsity 0.5 0.7 0.9")] = ["0.5", "0.7", "0.9"],  # noqa: B006
    method: Annotated[list[str], typer.Option(
        help="methods, e.g. --method woodfisher magnitude")] = ["woodfisher", "magnitude"],  # noqa: B006
    recalibrate_bn: Annotated[bool, typer.Option(
        "--recalibrate-bn", help="re-estimate BatchNorm statistics after pruning")] = False,
    overrides: SetOption = None,
    overwrite: Annotated[bool, typer.Option("--overwrite")] = False,
    trust_recipe_code: TrustOption = False,
    memory_budget: BudgetOption = None,
) -> None:
    """Prune the pretrained model at each sparsity with each method (no fine-tuning); write JSON, Markdown, a plot."""
    from wf_pipeline.pruning.settings import METHODS
    from wf_pipeline.stages import run_oneshot
    from wf_pipeline.training.oneshot import sweep_markdown

    methods = [m for value in method for m in value.replace(",", " ").split()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise WFError(f"--method: unknown method {unknown[0]!r}", f"choose from {', '.join(METHODS)}")
    sparsities = _split_floats(sparsity)
    _trust(trust_recipe_code)
    recipe = _load(recipe_path, _with_budget(overrides, memory_budget), prunes=True)
    outcome = run_oneshot(recipe, sparsities, methods, recalibrate_bn=recalibrate_bn, overwrite=overwrite,
                          progress=console.print)
    console.print(sweep_markdown(outcome.sweep))
    console.print(f"wrote {outcome.files['json']}, {outcome.files['markdown']}, {outcome.files['plot']}")


@app.command()
def validate(
    model_path: Annotated[Path, typer.Argument(help="the ONNX model to verify")],
    recipe_path: Annotated[Path, typer.Option("--recipe", help="recipe: test data, validation settings and gates")],
    baseline: Annotated[Path | None, typer.Option(help="dense ONNX model to compare against")] = None,
    checkpoint: Annotated[Path | None, typer.Option(
        help="PyTorch state_dict of the same model, for parity checks")] = None,
    fp32: Annotated[Path | None, typer.Option(
        "--fp32", help="an INT8 model's FP32 source (export/model.fp32.onnx): agreement, parity, latency")] = None,
    out: Annotated[Path | None, typer.Option(help="where to write validation.json, junit.xml, validation.md")] = None,
    min_accuracy: Annotated[float | None, typer.Option()] = None,
    max_accuracy_drop: Annotated[float | None, typer.Option()] = None,
    max_latency_ms: Annotated[float | None, typer.Option()] = None,
    max_latency_ratio: Annotated[float | None, typer.Option()] = None,
    min_sparsity: Annotated[float | None, typer.Option()] = None,
    max_parity_error: Annotated[float | None, typer.Option()] = None,
    min_top1_agreement: Annotated[float | None, typer.Option()] = None,
    min_int8_agreement: Annotated[float | None, typer.Option()] = None,
    max_int8_logit_error: Annotated[float | None, typer.Option()] = None,
    overrides: SetOption = None,
    trust_recipe_code: TrustOption = False,
) -> None:
    """Verify an ONNX model in ONNX Runtime and gate on accuracy, latency, sparsity and parity.

    Exit 0 pass, 1 gate failed, 2 bad input.
    """
    from wf_pipeline.cli_progress import RichReporter
    from wf_pipeline.recipe.loader import validate_recipe
    from wf_pipeline.stages import run_validate

    _trust(trust_recipe_code)
    recipe = _load(recipe_path, overrides)
    flags = {"min_accuracy": min_accuracy, "max_accuracy_drop": max_accuracy_drop, "max_latency_ms": max_latency_ms,
             "max_latency_ratio": max_latency_ratio, "min_sparsity": min_sparsity, "max_parity_error": max_parity_error,
             "min_top1_agreement": min_top1_agreement, "min_int8_agreement": min_int8_agreement,
             "max_int8_logit_error": max_int8_logit_error}
    gates_raw = {**recipe.validate_.gates.model_dump(), **{k: v for k, v in flags.items() if v is not None}}
    # Whether the model is INT8 is read from the file itself: the recipe's own quantize switch does not apply.
    as_given = {"validate": {**recipe.validate_.model_dump(), "gates": gates_raw},
                "export": {**recipe.export.model_dump(), "enabled": True},
                "quantize": {**recipe.quantize.model_dump(), "enabled": True}}
    gates = validate_recipe(recipe.to_dict() | as_given, "command-line gates").validate_.gates
    with RichReporter(console) as reporter:
        outcome = run_validate(recipe, model_path, baseline=baseline, checkpoint=checkpoint, out=out, gates=gates,
                               reporter=reporter, fp32=fp32)
    for gate in outcome.result.gates:
        status = {True: "[green]PASS[/green]", None: "[yellow]SKIP[/yellow]", False: "[red]FAIL[/red]"}[gate.passed]
        console.print(f"{status} {gate.message}")
    console.print(f"wrote {outcome.out_dir}")
    if not outcome.result.passed:
        raise typer.Exit(1)


@app.command()
def report(run_dir: Annotated[Path, typer.Argument(help="a run directory under artifacts/")]) -> None:
    """Write the HTML report of a run (also done at the end of compress)."""
    from wf_pipeline.reporting.report import write_report
    from wf_pipeline.runtime.rundir import require_run_folder

    require_run_folder(run_dir, "report", "give a run folder that compress made, e.g. artifacts/<run-name>")
    console.print(f"wrote {write_report(run_dir)}")


@recipe_app.command("check")
def recipe_check(recipe_path: RecipeArg, overrides: SetOption = None, base: BaseOption = None,
                 trust_recipe_code: TrustOption = False) -> None:
    """Validate a recipe: schema, files, model, layer selection, data."""
    from wf_pipeline.preflight import check_recipe

    _trust(trust_recipe_code)
    recipe = _load(recipe_path, overrides, base, prunes=True)
    for note in check_recipe(recipe):
        console.print(note)
    console.print(f"[green]ok[/green]: {recipe_path}")


@recipe_app.command("show")
def recipe_show(recipe_path: RecipeArg, overrides: SetOption = None, base: BaseOption = None) -> None:
    """Print the fully resolved recipe (defaults filled in, overrides applied)."""
    import yaml

    recipe = _load(recipe_path, overrides, base)
    console.print(yaml.safe_dump(recipe.to_dict(), sort_keys=False), end="", markup=False, highlight=False)


@recipe_app.command("convert")
def recipe_convert(
    recipe_path: RecipeArg,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="write the translated recipe here")] = None,
    overrides: SetOption = None,
    base: BaseOption = None,
    trust_recipe_code: TrustOption = False,
) -> None:
    """Translate a SparseML recipe into a wf-pipeline recipe."""
    import yaml

    from wf_pipeline.models.catalog import model_params
    from wf_pipeline.recipe.loader import recipe_header
    from wf_pipeline.runtime.atomic_io import write_text

    _trust(trust_recipe_code)  # the translation builds the base recipe's model to check parameter names
    recipe = _load(recipe_path, overrides, base)
    header = recipe_header(recipe_path, base, overrides, model_params)
    text = header + yaml.safe_dump(recipe.to_dict(), sort_keys=False)
    if output:
        if output.is_dir():
            raise WFError(f"--output: {output} is a folder", f"give a file name, e.g. {output / 'recipe.yaml'}")
        try:
            write_text(output, text)
        except OSError as exc:
            raise WFError(f"--output: cannot write {output}: {exc.strerror or exc}",
                          "give a writable file path") from None
        console.print(f"wrote {output}")
    else:
        console.print(text, end="", markup=False, highlight=False, soft_wrap=True)  # no wrapping: it is YAML


_MULTI_VALUE_OPTIONS = {"--sparsity", "--method"}


def _expand_multi_value_options(argv: list[str]) -> list[str]:
    """Let `--sparsity 0.5 0.7 0.9` mean three values, as users expect (click takes one per flag)."""
    out: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in _MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current and not arg.startswith("-"):
            out.extend([current, arg])
            continue
        if current and arg.startswith("-") and out[-2:-1] != [current]:
            out.append(current)  # flag with no values: let click report it
        current = None
        out.append(arg)
    if current and (not out or out[-2:-1] != [current]):
        out.append(current)
    return out


def _rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


# How long a rank other than 0 waits before giving up on rank 0 reporting the input error they share.
_RANK_0_REPORT_WAIT_S = 30.0


def _report_prefix(exit_code: int) -> str | None:
    """Under torchrun every rank raises the same input error and rank 0 reports it: "" on rank 0, None
    (say nothing) on a rank that ends with 0. A rank that fails first waits, since its exit would make
    the agent kill rank 0 before rank 0 printed its line: once rank 0 has reported and exited, the
    agent ends this wait with SIGTERM. A rank still alive after the wait had an error of its own, and
    reports it under its rank."""
    if _rank() == 0:
        return ""
    if exit_code == 0:
        return None
    time.sleep(_RANK_0_REPORT_WAIT_S)
    return f"rank {_rank()}: "


def _one_line(text: str) -> str:
    # One line, whatever the terminal width: CI logs and tests grep it.
    return " ".join(text.split())


def _report_crash(exc: BaseException) -> None:
    """A bug, not bad input: the traceback goes to the run's log.txt (or here when there is no run)."""
    from wf_pipeline.runtime.rundir import opened_runs

    logs = [path for run in reversed(opened_runs()) if (path := run.log_crash(exc)) is not None][:1]
    summary = _one_line(f"{type(exc).__name__}: {exc}")[:300]
    if os.environ.get("WF_DEBUG") or not logs:
        traceback.print_exc()
    where = f"traceback in {logs[0]}" if logs else "traceback above"
    rank = f"rank {_rank()}: " if "WORLD_SIZE" in os.environ else ""
    sys.stderr.write(f"error: {rank}internal error: {summary} ({where}; this is a bug, please report it)\n")


def _report_usage_error(exc: TyperException) -> None:
    """Click's usage errors as one line (its box of usage text and help hint is five)."""
    ctx = getattr(exc, "ctx", None)
    if type(exc).__name__ == "NoArgsIsHelpError":  # a bare command: its help was printed when it was raised
        return
    command = ctx.command_path if ctx is not None else "wf-pipeline"
    sys.stderr.write(_one_line(f"error: {exc.format_message()} (hint: see `{command} --help`)") + "\n")


def main() -> None:
    from wf_pipeline.runtime.rundir import release_all

    argv = _expand_multi_value_options(sys.argv[1:])
    try:
        code = app(args=argv, prog_name="wf-pipeline", standalone_mode=False)
        if isinstance(code, int) and code:  # typer.Exit(n) and Ctrl-C (130) come back as a return value
            sys.exit(code)
    except TyperException as exc:  # a usage error (unknown option, unparsable value): one line, like bad input
        _report_usage_error(exc)
        sys.exit(exc.exit_code)
    except typer.Abort:
        sys.stderr.write("error: aborted\n")
        sys.exit(EXIT_INTERRUPTED)
    except WFError as exc:
        from wf_pipeline.runtime.rundir import discard_refused_runs

        discard_refused_runs(exc)
        if os.environ.get("WF_DEBUG"):
            traceback.print_exc()
        rank = _report_prefix(exc.exit_code)
        if rank is not None:
            hint = f" (hint: {exc.hint})" if exc.hint else ""
            sys.stderr.write(_one_line(f"error: {rank}{exc.message}{hint}") + "\n")
        sys.exit(exc.exit_code)
    except RunAlreadyFinished as exc:
        rank = _report_prefix(exc.exit_code)
        if rank is not None:
            failed = ", ".join(exc.status.get("failed_gates") or [])
            gates = {True: "its gates passed", False: f"its gates failed: {failed}",
                     None: "no gates were checked"}[exc.status.get("gates_passed")]
            sys.stderr.write(_one_line(
                f"{rank}run {exc.run_dir} already finished ({gates}); nothing to resume "
                "(--overwrite runs it again; `wf-pipeline validate` re-checks its model)") + "\n")
        sys.exit(exc.exit_code)
    except Exception as exc:  # noqa: BLE001 - the last resort: anything else is a bug
        _report_crash(exc)
        sys.exit(EXIT_CRASH)
    finally:
        release_all()
        _trust(False)


if __name__ == "__main__":
    main()
