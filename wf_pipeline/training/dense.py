"""`wf-pipeline train`: dense training of the recipe's model, e.g. to make the bundled pretrained default."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from wf_pipeline.data import build_data
from wf_pipeline.models import build_model
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.reporting.metrics import EpochRecord, RunMetrics
from wf_pipeline.runtime.atomic_io import torch_save, write_json
from wf_pipeline.runtime.device import resolve_device, seed_everything
from wf_pipeline.runtime.progress import NullReporter, Reporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.epoch import evaluate, test_images, train_epoch
from wf_pipeline.training.optimizer import build_optimizer


def run_dense_training(recipe: Recipe, run: RunDir, *, save_to: Path | None = None,
                       reporter: Reporter | None = None) -> RunMetrics:
    reporter = reporter or NullReporter()
    seed_everything(recipe.seed, recipe.deterministic)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model).to(device)
    cfg = recipe.train
    optimizer = build_optimizer(model, cfg.optimizer)
    steps = len(data.train_batches(0, max_batches=cfg.steps_per_epoch))  # type: ignore[arg-type]
    state_path = run.checkpoints / "train_state.pt"
    start_epoch = 0
    if state_path.exists():  # resume: model, optimizer and the epoch counter; data order derives from (seed, epoch)
        state = torch.load(state_path, map_location=device, weights_only=True)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = int(state["epoch"]) + 1
        torch.set_rng_state(state["rng"])
    started = time.time()
    accuracy = 0.0
    for epoch in range(start_epoch, cfg.epochs):
        task = f"train epoch {epoch + 1}/{cfg.epochs}"
        reporter.start(task, steps)

        def show_loss(step: int, total: int, loss: float, task: str = task) -> None:
            reporter.advance(task, step, f"loss {loss:.3f}")

        stats = train_epoch(
            model, data.train_batches(epoch, max_batches=cfg.steps_per_epoch), optimizer, cfg,
            epoch=epoch, steps_per_epoch=steps, device=device, progress=show_loss,
        )
        reporter.finish(task)
        accuracy, test_loss = evaluate(model, data.test_batches(), device)
        record = EpochRecord(epoch=epoch, train_loss=stats.loss, train_accuracy=stats.accuracy,
                             test_accuracy=accuracy, test_loss=test_loss, sparsity=0.0,
                             lr=optimizer.param_groups[0]["lr"], elapsed_s=time.time() - started)
        run.append_history(record.to_dict())
        reporter.message(f"epoch {epoch + 1}: train loss {stats.loss:.4f}, test accuracy {accuracy:.4f} "
                         f"on {test_images(data)}")
        torch_save(state_path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": epoch,
                                "rng": torch.get_rng_state()})
    if cfg.epochs == 0 or start_epoch >= cfg.epochs:
        accuracy, _ = evaluate(model, data.test_batches(), device)
    weights = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    torch_save(run.file("checkpoints", "final.pt"), weights)
    metrics = RunMetrics(final_accuracy=accuracy, dense_accuracy=accuracy, sparsity=0.0, epochs=cfg.epochs,
                         num_params=sum(p.numel() for p in model.parameters()), train_seconds=time.time() - started)
    run.write_metrics(metrics.to_dict())
    if save_to is not None:
        torch_save(save_to, weights)
        write_json(save_to.with_suffix(".json"), {"recipe": recipe.name, "model": recipe.model.model_dump(),
                                                  "dataset": recipe.data.dataset, "test_accuracy": accuracy,
                                                  "epochs": cfg.epochs, "seed": recipe.seed})
    return metrics
