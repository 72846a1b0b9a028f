"""The jobs the commands run, one function each: `run_compress`, `run_oneshot`, `run_train`, `run_validate`.

Each takes a validated recipe (plus the job's own arguments), checks what can be checked before any
file is written (:func:`wf_pipeline.preflight.check_recipe`), does the whole job and returns a typed
outcome. `cli.py` only parses arguments, calls one of these and maps the outcome to an exit code.

`run_compress` is the product: load → gradual pruning with fine-tuning → export → validate → report.
"""
from __future__ import annotations

import copy
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from wf_pipeline.data import DataBundle, build_data
from wf_pipeline.models import build_model
from wf_pipeline.preflight import check_recipe
from wf_pipeline.recipe.schema import GatesConfig, Recipe
from wf_pipeline.reporting.metrics import RunMetrics
from wf_pipeline.runtime import atomic_io
from wf_pipeline.runtime.atomic_io import torch_save, write_json
from wf_pipeline.runtime.device import resolve_device, seed_everything
from wf_pipeline.runtime.progress import NullReporter, PhaseProgress, Reporter
from wf_pipeline.runtime.rundir import RunDir, open_run_dir, open_shared_run_dir

if TYPE_CHECKING:  # without importing ONNX Runtime at start-up
    from wf_pipeline.deploy.quantize import QuantizeResult
    from wf_pipeline.deploy.validate import ValidationResult
    from wf_pipeline.training.oneshot import SweepResult


# ===================================================================== compress
@dataclass
class CompressOutcome:
    run_dir: Path
    metrics: RunMetrics
    gates_passed: bool | None = None
    failed_gates: list[str] = field(default_factory=list)
    report: Path | None = None


def run_compress(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 reporter: Reporter | None = None) -> CompressOutcome:
    """Prune the recipe's model gradually with fine-tuning, export it, validate it in ONNX Runtime, report.

    Under torchrun every rank calls this; the main rank owns the run directory and writes every file.
    """
    from wf_pipeline.runtime.distributed import barrier, init_distributed, shutdown
    from wf_pipeline.training.gradual import run_pruning_stage

    reporter = reporter or NullReporter()
    check_recipe(recipe, resume=resume, overwrite=overwrite)  # every refusal, before a run directory exists
    dist = init_distributed(recipe.device)
    try:
        # The main rank creates (or reopens) and locks the run directory; the others get a read-only handle.
        run = open_shared_run_dir(recipe, dist, resume=resume, overwrite=overwrite)
        log = run.logger()
        seed_everything(recipe.seed, recipe.deterministic)
        device = resolve_device(recipe.device)
        started = time.time()
        reporter.message(f"run directory: {run.path}")
        data = build_data(recipe.data, recipe.seed)
        model = build_model(recipe.model).to(device)
        dense = copy.deepcopy(model).cpu()
        # The stage measures the dense model (its starting one) once, on the main rank, on the whole test set;
        # a resumed run reads that accuracy from its checkpoint instead of measuring it again.
        stage = run_pruning_stage(recipe, run, model, data, device, dist=dist, reporter=reporter, resume=resume)
        metrics = stage.metrics
        metrics.dense_accuracy = metrics.initial_accuracy
        log.info("dense accuracy %.4f", metrics.dense_accuracy)
        metrics.num_params = sum(p.numel() for p in stage.model.parameters())
        outcome = CompressOutcome(run.path, metrics)
        if dist.is_main:
            pruned = stage.model
            torch_save(run.file("checkpoints", "pruned.pt"),
                       {k: v.detach().cpu() for k, v in pruned.state_dict().items()})
            cpu_masks = {k: v.cpu() for k, v in stage.masks.masks.items()}
            masks: dict[str, torch.Tensor] | None = cpu_masks  # None once the channels are cut out
            from wf_pipeline.reporting.report import layer_collapse_note

            collapsed = layer_collapse_note(stage.masks.fully_pruned())
            if collapsed:
                log.warning(collapsed)
                reporter.message(f"note: {collapsed}")
                metrics.notes = [*(metrics.notes or []), collapsed]
            if recipe.pruning.removes_channels:
                from wf_pipeline.pruning.structured import remove_pruned_channels

                # Cut the zeroed channels out (checked lossless): export sees a physically smaller model.
                metrics.channel_surgery = remove_pruned_channels(pruned, cpu_masks, data.sample_input(2)).to_dict()
                metrics.num_params = sum(p.numel() for p in pruned.parameters())  # the shipped (smaller) model
                masks = None
            if recipe.export.enabled:
                reporter.message("exporting ONNX" + (" and quantizing to INT8" if recipe.quantize.enabled else ""))
                t0 = time.perf_counter()
                files = _export(recipe, run, pruned, dense, data, masks)
                metrics.add_timing("export_s", time.perf_counter() - t0)
                metrics.onnx = str(files.shipped)
                if files.note:
                    log.warning(files.note)
                    reporter.message(f"note: {files.note}")
                    metrics.notes = [*(metrics.notes or []), files.note]
                if recipe.validate_.enabled:
                    reporter.message("validating in ONNX Runtime")
                    t0 = time.perf_counter()
                    gates = recipe.validate_.gates
                    if not files.quantized:  # the FP32 model ships (or nothing was quantized): no INT8 to judge
                        gates = gates.model_copy(update={"min_int8_agreement": None, "max_int8_logit_error": None})
                    result = _validate(recipe, run.file("validation"), files.shipped, files.baseline, pruned, data,
                                       gates, reporter, fp32_path=files.fp32 if files.quantized else None)
                    metrics.add_timing("validate_s", time.perf_counter() - t0)
                    outcome.gates_passed = result.passed
                    outcome.failed_gates = [g.name for g in result.failed_gates]
                    metrics.gates_passed = result.passed
            metrics.total_seconds = time.time() - started
            run.write_metrics(metrics.to_dict())
            from wf_pipeline.reporting.report import write_report

            outcome.report = write_report(run.path)
            run.mark_finished(outcome.gates_passed, outcome.failed_gates)
            log.info("done: %s", {k: v for k, v in metrics.to_dict().items() if not isinstance(v, dict)})
        barrier()
        return outcome
    finally:
        shutdown()


@dataclass
class ExportedFiles:
    """What the export stage wrote: `shipped` is the deployable file (INT8 when quantize is on)."""

    shipped: Path
    fp32: Path  # the pruned FP32 model (the shipped file itself when not quantized)
    baseline: Path  # the dense FP32 model everything is judged against
    quantized: bool
    note: str | None = None  # why a quantized run ships its FP32 model


def fp32_filename(filename: str) -> str:
    """`model.onnx` -> `model.fp32.onnx`: the FP32 source beside a quantized shipped file."""
    return f"{Path(filename).stem}.fp32.onnx"


def _export(recipe: Recipe, run: RunDir, pruned: torch.nn.Module, dense: torch.nn.Module, data: DataBundle,
            masks: dict[str, torch.Tensor] | None) -> ExportedFiles:
    """Export the pruned model (compact storage if asked), quantize it if asked, and the dense baseline."""
    from wf_pipeline.deploy.export import export_onnx

    out = run.file("export")
    sample = data.sample_input(2)
    cfg = recipe.export
    quantize = recipe.quantize.enabled
    fp32_name = fp32_filename(cfg.filename) if quantize else cfg.filename
    result = export_onnx(pruned.cpu().eval(), sample, out / fp32_name, opset=cfg.opset,
                         dynamic_batch=cfg.dynamic_batch, sparse_storage=cfg.sparse_storage,
                         sparse_threshold=cfg.sparse_threshold, masks=masks)
    baseline = export_onnx(dense.cpu().eval(), sample, out / "dense_baseline.onnx", opset=cfg.opset,
                           dynamic_batch=cfg.dynamic_batch, sparse_storage=False)
    if not result.sparsity_matches:
        # A bug, not a user error, but the user needs to know where the evidence is.
        write_json(out / "export.json", {"pruned": result.to_dict(), "dense_baseline": baseline.to_dict()})
        raise RuntimeError(f"exported ONNX sparsity does not match the PyTorch masks; see {out / 'export.json'}")
    record: dict[str, Any] = {"shipped": cfg.filename, "shipped_format": "int8-qdq" if quantize else "fp32",
                              "pruned": result.to_dict(), "dense_baseline": baseline.to_dict()}
    shipped = result.path
    if quantize:
        from wf_pipeline.deploy.quantize import int8_speed, quantize_model

        qcfg = recipe.quantize
        calibration = [x.numpy() for x in data.calibration_batches(qcfg.calibration_samples,
                                                                    qcfg.calibration_batch_size)]
        fp32_plain = result.dense_path or result.path
        quantized = quantize_model(fp32_plain, out / cfg.filename, calibration, qcfg,
                                   choice_file=out / "quantize_choice.json")
        record["quantized"] = {**quantized.to_dict(), "calibration_split": "train"}
        shipped = quantized.path
        if qcfg.ship == "faster":
            speed = int8_speed(quantized.path, fp32_plain, calibration, out / "int8_speed.json")
            record["quantized"]["speed_vs_fp32"] = speed
            if speed["int8_over_fp32"] >= 1.0:
                quantize = False
                record["shipped_format"] = "fp32"
                record["int8_not_shipped"] = _ship_fp32_instead(out, cfg.filename, quantized, result.path, speed)
    write_json(out / "export.json", record)
    return ExportedFiles(shipped=shipped, fp32=result.path, baseline=baseline.path, quantized=quantize,
                         note=record.get("int8_not_shipped"))


def _ship_fp32_instead(out: Path, filename: str, quantized: QuantizeResult, fp32: Path, speed: dict[str, Any]) -> str:
    """INT8 runs slower than its FP32 source here: the FP32 model becomes `filename`, INT8 `<stem>.int8.onnx`."""
    import os

    stem = Path(filename).stem
    for source, target in ((quantized.dense_path, out / f"{stem}.int8.dense.onnx"),
                           (quantized.path, out / f"{stem}.int8.onnx")):
        if source is not None:
            os.replace(source, target)
    atomic_io.write_bytes(out / filename, fp32.read_bytes())
    return (f"the INT8 model ran {speed['int8_over_fp32']:.2f}x as long as its FP32 source on this machine "
            f"(quantize.ship: faster), so the FP32 model ships as {filename}; the INT8 model is {stem}.int8.onnx")


def _validate(recipe: Recipe, out_dir: Path, onnx_path: Path, baseline_path: Path | None,
              torch_model: torch.nn.Module | None, data: DataBundle, gates: GatesConfig,
              reporter: Reporter, fp32_path: Path | None = None) -> ValidationResult:
    from wf_pipeline.deploy.validate import ValidationSettings, validate_model
    from wf_pipeline.reporting.validation_outputs import write_validation_outputs

    with PhaseProgress(reporter, "validate") as progress:
        result = validate_model(onnx_path, torch_model=None if torch_model is None else torch_model.cpu().eval(),
                                test_data=data.test_tensors(), baseline_path=baseline_path,
                                settings=ValidationSettings.from_config(recipe.validate_), gates=gates,
                                progress=progress, fp32_path=fp32_path)
    write_validation_outputs(result, out_dir)
    return result


# ===================================================================== train
@dataclass
class TrainOutcome:
    run_dir: Path
    metrics: RunMetrics


def run_train(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, save_to: Path | None = None,
              reporter: Reporter | None = None) -> TrainOutcome:
    """Train the recipe's model densely (its `train` section), e.g. to make a pretrained checkpoint."""
    from wf_pipeline.training.dense import run_dense_training

    check_recipe(recipe, resume=resume, overwrite=overwrite)
    run = open_run_dir(recipe, resume=resume, overwrite=overwrite, kind="train")
    metrics = run_dense_training(recipe, run, save_to=save_to, reporter=reporter)
    return TrainOutcome(run.path, metrics)


# ===================================================================== one-shot sweep
@dataclass
class OneshotOutcome:
    run_dir: Path
    sweep: SweepResult
    files: dict[str, Path]


def run_oneshot(recipe: Recipe, sparsities: list[float], methods: list[str], *, recalibrate_bn: bool = False,
                overwrite: bool = False, progress: Callable[[str], Any] | None = None) -> OneshotOutcome:
    """Prune the pretrained model once per (method, sparsity), no fine-tuning; write JSON, Markdown and a plot."""
    from wf_pipeline.training.oneshot import run_oneshot_sweep, write_sweep

    if recipe.output.run_name is None:
        output = recipe.output.model_copy(update={"run_name": f"{recipe.name}-oneshot"})
        recipe = recipe.model_copy(update={"output": output})
    check_recipe(recipe, resume=False, overwrite=overwrite)
    run = open_run_dir(recipe, overwrite=overwrite, kind="oneshot")
    seed_everything(recipe.seed, recipe.deterministic)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model)
    sweep = run_oneshot_sweep(model, data, recipe.pruning, sparsities, methods, device, recalibrate_bn=recalibrate_bn,
                              progress=progress, seed=recipe.seed, spill_dir=run.path)
    return OneshotOutcome(run.path, sweep, write_sweep(sweep, run.file("oneshot")))


# ===================================================================== validate
@dataclass
class ValidateOutcome:
    result: ValidationResult
    out_dir: Path


def run_validate(recipe: Recipe, model_path: Path, *, baseline: Path | None = None, checkpoint: Path | None = None,
                 out: Path | None = None, gates: GatesConfig | None = None,
                 reporter: Reporter | None = None, fp32: Path | None = None) -> ValidateOutcome:
    """Verify an ONNX model in ONNX Runtime on the recipe's test data and gate it (recipe gates by default)."""
    from wf_pipeline.errors import WFError

    for path, what in ((model_path, "model"), (baseline, "--baseline"), (checkpoint, "--checkpoint"), (fp32, "--fp32")):
        if path is not None and not path.is_file():
            raise WFError(f"{what}: file not found: {path}", "give an existing file")
    torch_model = None
    if checkpoint is not None:
        torch_model = build_model(recipe.model.model_copy(update={"weights": str(checkpoint)})).eval()
    data = build_data(recipe.data, recipe.seed)
    out_dir = out or model_path.parent / "validation"
    result = _validate(recipe, out_dir, model_path, baseline, torch_model, data, gates or recipe.validate_.gates,
                       reporter or NullReporter(), fp32_path=fp32)
    return ValidateOutcome(result, out_dir)
