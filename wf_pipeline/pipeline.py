"""`wf-pipeline compress`: the stages end to end — load, prune + fine-tune, export, validate, report."""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from wf_pipeline.atomic_io import torch_save, write_json
from wf_pipeline.data import DataBundle, build_data
from wf_pipeline.device import resolve_device, seed_everything
from wf_pipeline.models import build_model
from wf_pipeline.progress import NullReporter, Reporter
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.reporting.metrics import RunMetrics
from wf_pipeline.rundir import RunDir, open_shared_run_dir
from wf_pipeline.training import evaluate


@dataclass
class CompressOutcome:
    run_dir: Path
    metrics: RunMetrics
    gates_passed: bool | None = None
    failed_gates: list[str] = field(default_factory=list)
    report: Path | None = None


def export_stage(recipe: Recipe, run: RunDir, pruned: torch.nn.Module, dense: torch.nn.Module, data: DataBundle,
                 masks: dict[str, torch.Tensor] | None) -> tuple[Path, Path]:
    """Export the pruned model (sparse storage if asked) and the dense baseline it is judged against."""
    from wf_pipeline.deploy.export import export_onnx

    out = run.file("export")
    sample = data.sample_input(2)
    cfg = recipe.export
    result = export_onnx(pruned.cpu().eval(), sample, out / cfg.filename, opset=cfg.opset, dynamic_batch=cfg.dynamic_batch,
                         sparse_storage=cfg.sparse_storage, sparse_threshold=cfg.sparse_threshold, masks=masks)
    baseline = export_onnx(dense.cpu().eval(), sample, out / "dense_baseline.onnx", opset=cfg.opset,
                           dynamic_batch=cfg.dynamic_batch, sparse_storage=False)
    write_json(out / "export.json", {"pruned": result.to_dict(), "dense_baseline": baseline.to_dict()})
    if not result.sparsity_matches:
        # A bug, not a user error, but the user needs to know where the evidence is.
        raise RuntimeError(f"exported ONNX sparsity does not match the PyTorch masks; see {out / 'export.json'}")
    return result.path, baseline.path


def validate_stage(recipe: Recipe, run: RunDir, onnx_path: Path, baseline_path: Path | None,
                   torch_model: torch.nn.Module, data: DataBundle, reporter: Reporter) -> Any:
    from wf_pipeline.deploy.validate import ValidationSettings, validate_model
    from wf_pipeline.reporting.validation_outputs import write_validation_outputs

    cfg = recipe.validate_
    result = validate_model(onnx_path, torch_model=torch_model.cpu().eval(), test_data=data.test_tensors(),
                            baseline_path=baseline_path, settings=ValidationSettings.from_config(cfg), gates=cfg.gates)
    write_validation_outputs(result, run.file("validation"))
    return result


def run_compress(recipe: Recipe, *, resume: bool = False, overwrite: bool = False,
                 reporter: Reporter | None = None) -> CompressOutcome:
    from wf_pipeline.distributed import barrier, init_distributed, shutdown
    from wf_pipeline.gradual import run_pruning_stage

    reporter = reporter or NullReporter()
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
        dense_accuracy, _ = evaluate(model, data.test_batches(), device)
        reporter.message(f"dense test accuracy: {dense_accuracy:.4f}")
        log.info("dense accuracy %.4f", dense_accuracy)
        stage = run_pruning_stage(recipe, run, model, data, device, dist=dist, reporter=reporter, resume=resume,
                                  initial_accuracy=dense_accuracy)  # already measured above
        metrics = RunMetrics.from_dict({"dense_accuracy": dense_accuracy, **stage.metrics})
        metrics.num_params = sum(p.numel() for p in stage.model.parameters())
        outcome = CompressOutcome(run.path, metrics)
        if dist.is_main:
            pruned = stage.model
            torch_save(run.file("checkpoints", "pruned.pt"), {k: v.detach().cpu() for k, v in pruned.state_dict().items()})
            masks = {k: v.cpu() for k, v in stage.masks.masks.items()}
            if recipe.export.enabled:
                reporter.message("exporting ONNX")
                t0 = time.perf_counter()
                onnx_path, baseline_path = export_stage(recipe, run, pruned, dense, data, masks)
                metrics.add_timing("export_s", time.perf_counter() - t0)
                metrics.onnx = str(onnx_path)
                if recipe.validate_.enabled:
                    reporter.message("validating in ONNX Runtime")
                    t0 = time.perf_counter()
                    result = validate_stage(recipe, run, onnx_path, baseline_path, pruned, data, reporter)
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
