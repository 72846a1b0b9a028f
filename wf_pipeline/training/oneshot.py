"""One-shot sweep: prune the pretrained model at several sparsities with several methods, no fine-tuning."""
from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from wf_pipeline.data import DataBundle
from wf_pipeline.pruning import PruneSettings, prune_step
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.schema import PruningConfig
from wf_pipeline.runtime.atomic_io import atomic_path, write_json, write_text
from wf_pipeline.training.epoch import evaluate, test_images


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device,
                          max_batches: int = 20) -> None:
    """Re-estimate BatchNorm running statistics for the pruned weights (a cumulative average over batches)."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return
    was_training = model.training
    for bn in bns:
        bn.reset_running_stats()
        bn.momentum = None  # None = exact cumulative average
    model.train()
    for i, (x, _) in enumerate(batches):
        if i >= max_batches:
            break
        model(x.to(device))
    model.train(was_training)


@dataclass
class SweepResult:
    dense_accuracy: float
    results: list[dict[str, Any]] = field(default_factory=list)
    test_images: str = "the test images"  # which ones every accuracy of the sweep is measured on

    def to_dict(self) -> dict[str, Any]:
        return {"dense_accuracy": self.dense_accuracy, "results": self.results, "test_images": self.test_images}

    def accuracy(self, method: str, sparsity: float) -> float:
        return next(r["accuracy"] for r in self.results
                    if r["method"] == method and abs(r["sparsity"] - sparsity) < 1e-9)


def run_oneshot_sweep(
    model: nn.Module,
    data: DataBundle,
    pruning: PruningConfig,
    sparsities: list[float],
    methods: list[str],
    device: torch.device,
    *,
    recalibrate_bn: bool = False,
    progress: Callable[[str], None] | None = None,
    seed: int = 0,
    spill_dir: Path | None = None,
) -> SweepResult:
    """Each (method, sparsity) starts from a fresh copy of the pretrained model.

    WoodFisher statistics beyond the memory budget may be spilled under `spill_dir` (the run directory).
    """
    model = model.to(device)
    dense_acc, _ = evaluate(model, data.test_batches(), device)
    sweep = SweepResult(dense_acc, test_images=test_images(data))
    fisher_batches = data.fisher_batches(batch_size=max(pruning.woodfisher.grad_batch_size, 64))
    for method in methods:
        for sparsity in sparsities:
            pruned = copy.deepcopy(model)
            params = select_prunable(pruned, pruning.layers, pruning.skip, pruning.min_layer_params)
            masks = MaskSet.dense(params)
            settings = PruneSettings.from_config(pruning.model_copy(update={"method": method}))
            started = time.perf_counter()
            report = prune_step(pruned, params, masks, sparsity, settings, fisher_batches,
                                generator=torch.Generator().manual_seed(seed), spill_dir=spill_dir)
            seconds = time.perf_counter() - started
            if recalibrate_bn:
                recalibrate_batchnorm(pruned, data.train_batches(0), device)
            accuracy, loss = evaluate(pruned, data.test_batches(), device)
            sweep.results.append({"method": method, "sparsity": sparsity, "accuracy": accuracy, "loss": loss,
                                  "achieved_sparsity": report.achieved_sparsity, "prune_seconds": seconds,
                                  "per_layer_sparsity": report.per_layer_sparsity})
            plan = report.details.fisher_plan_summary
            if plan:
                sweep.results[-1]["fisher_plan"] = report.details.fisher_plan
            notices = report.notices()  # repairs and skips: in oneshot.json, oneshot.md and on the terminal
            if notices:
                sweep.results[-1]["warnings"] = notices
            if progress:
                for line in notices:
                    progress(f"warning: {method} @ {sparsity:.0%}: {line}")
                progress(f"{method} @ {sparsity:.0%}: test accuracy {accuracy:.4f} on {sweep.test_images} "
                         f"({seconds:.1f} s)")
                if plan and sparsity == sparsities[0]:
                    progress(plan)
    return sweep


def sweep_markdown(sweep: SweepResult) -> str:
    sparsities = sorted({r["sparsity"] for r in sweep.results})
    methods = list(dict.fromkeys(r["method"] for r in sweep.results))
    lines = [f"Dense test accuracy: {sweep.dense_accuracy:.2%}; every accuracy is on {sweep.test_images}", "",
             "| method | " + " | ".join(f"{s:.0%}" for s in sparsities) + " |",
             "|---|" + "---|" * len(sparsities)]
    for method in methods:
        cells = [f"{sweep.accuracy(method, s):.2%}" for s in sparsities]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    notices = [f"- {r['method']} @ {r['sparsity']:.0%}: {line}"
               for r in sweep.results for line in r.get("warnings", [])]
    if notices:
        lines += ["", "Repairs and skips:", *notices]
    return "\n".join(lines) + "\n"


def write_sweep(sweep: SweepResult, out_dir: Path) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "oneshot.json", "markdown": out_dir / "oneshot.md", "plot": out_dir / "oneshot.png"}
    write_json(paths["json"], sweep.to_dict())
    write_text(paths["markdown"], sweep_markdown(sweep))
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in dict.fromkeys(r["method"] for r in sweep.results):
        rows = sorted((r for r in sweep.results if r["method"] == method), key=lambda r: r["sparsity"])
        ax.plot([r["sparsity"] for r in rows], [r["accuracy"] for r in rows], marker="o", label=method)
    ax.axhline(sweep.dense_accuracy, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("sparsity")
    ax.set_ylabel("test accuracy")
    ax.set_title("One-shot pruning (no fine-tuning)")
    ax.legend()
    ax.grid(alpha=0.3)
    with atomic_path(paths["plot"]) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    return paths
