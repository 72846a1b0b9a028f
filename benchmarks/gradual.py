"""Gradual pruning of the bundled default model: WoodFisher vs global magnitude with the same budget.

For each target sparsity (90% and 95%; 90% only with --quick) both methods run the default recipe's
whole pruning stage (same schedule, fine-tuning steps, learning rates and data), and the script prints
dense, magnitude and WoodFisher test accuracy with wall times. The last line is one JSON object.

    python benchmarks/gradual.py            # full: 4 pruning stages of the default recipe
    python benchmarks/gradual.py --quick    # about a minute: fewer steps, smaller Fisher, test subset
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import wf_pipeline  # noqa: F401  - first: it sets OMP_WAIT_POLICY before torch loads

# isort: split
import torch

from benchmarks._shared import machine_line, set_threads
from wf_pipeline.data import build_data
from wf_pipeline.models import build_model
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.runtime.device import resolve_device, seed_everything
from wf_pipeline.runtime.progress import NullReporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.gradual import run_pruning_stage

REPO = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = REPO / "recipes" / "default.yaml"
QUICK = [
    "finetune.epochs=3", "finetune.steps_per_epoch=25", "pruning.schedule.start_epoch=0",
    "pruning.schedule.end_epoch=2", "pruning.schedule.frequency=1", "pruning.woodfisher.num_grads=200",
    "data.test_subset=2000",
]


class PrintReporter(NullReporter):
    def __init__(self, prefix: str, verbose: bool) -> None:
        self.prefix, self.verbose = prefix, verbose

    def message(self, text: str) -> None:
        if self.verbose:
            print(f"  [{self.prefix}] {text}", flush=True)


def run_one(recipe_path: Path, overrides: list[str], root: Path, verbose: bool) -> dict[str, Any]:
    # the accuracy right after each pruning step is part of the row (the default recipe measures only the ends)
    recipe, _ = load_recipe(recipe_path, ["evaluation.monitor=pruning_steps", *overrides, f"output.root={root}"])
    seed_everything(recipe.seed, recipe.deterministic)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model)
    run = RunDir(root / recipe.run_name())
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    label = f"{recipe.pruning.method}@{recipe.pruning.final_sparsity:.0%}"
    started = time.perf_counter()
    result = run_pruning_stage(recipe, run, model, data, device, reporter=PrintReporter(label, verbose))
    wall = time.perf_counter() - started
    m = result.metrics
    assert m.prune_reports is not None and m.timings is not None and m.per_layer_sparsity is not None
    return {
        "method": recipe.pruning.method,
        "target_sparsity": recipe.pruning.final_sparsity,
        "sparsity": m.sparsity,
        "dense_accuracy": m.initial_accuracy,
        "accuracy": m.final_accuracy,
        "accuracy_after_each_step": [r.test_accuracy_after for r in m.prune_reports],
        "wall_s": wall,
        "prune_s": m.timings["prune_s"],
        "finetune_s": m.timings["finetune_s"],
        "eval_s": m.timings["eval_s"],
        "epochs": recipe.finetune.epochs,
        "steps_per_epoch": recipe.finetune.steps_per_epoch,
        "num_grads": recipe.pruning.woodfisher.num_grads,
        "per_layer_sparsity": {name: round(v, 3) for name, v in m.per_layer_sparsity.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced run (about a minute)")
    parser.add_argument("--recipe", type=Path, default=DEFAULT_RECIPE)
    parser.add_argument("--sparsity", type=float, nargs="+", help="final sparsities (default 0.9 0.95; quick 0.9)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    parser.add_argument("--methods", nargs="+", default=["magnitude", "woodfisher"],
                        choices=["magnitude", "woodfisher", "woodtaylor", "diag_fisher", "magnitude_uniform"])
    parser.add_argument("--verbose", action="store_true", help="print every epoch and pruning step")
    parser.add_argument("--threads", type=int,
                        help="torch intra-op threads (on a busy machine 1 avoids oversubscription)")
    args = parser.parse_args()
    set_threads(args.threads)

    sparsities = args.sparsity or ([0.9] if args.quick else [0.9, 0.95])
    base = [*(QUICK if args.quick else []), *args.overrides]
    print(f"gradual pruning benchmark ({'quick' if args.quick else 'full'}): recipe {args.recipe.name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine_line()}", flush=True)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="wf-bench-gradual-") as tmp:
        for sparsity in sparsities:
            for method in args.methods:
                overrides = [*base, f"pruning.method={method}", f"pruning.final_sparsity={sparsity}",
                             f"output.run_name={method}-{int(round(sparsity * 1000))}"]
                row = run_one(args.recipe, overrides, Path(tmp), args.verbose)
                rows.append(row)
                print(f"{method:>10} -> {row['sparsity']:.2%}: test accuracy {row['accuracy']:.4f} "
                      f"(dense {row['dense_accuracy']:.4f}, {row['accuracy'] - row['dense_accuracy']:+.4f}); "
                      f"wall {row['wall_s']:.1f}s (prune {row['prune_s']:.1f}s, finetune {row['finetune_s']:.1f}s, "
                      f"eval {row['eval_s']:.1f}s)", flush=True)

    dense = rows[0]["dense_accuracy"]
    summary: dict[str, Any] = {"benchmark": "gradual", "quick": args.quick, "recipe": str(args.recipe.name),
                               "threads": torch.get_num_threads(), "overrides": base,
                               "dense_accuracy": dense, "results": rows}
    print(f"\ndense accuracy {dense:.4f}")
    for sparsity in sparsities:
        by = {r["method"]: r for r in rows if r["target_sparsity"] == sparsity}
        if "woodfisher" not in by or "magnitude" not in by:
            for method, row in by.items():
                summary[f"{method}_{int(round(sparsity * 100))}"] = row["accuracy"]
            continue
        wf, mag = by["woodfisher"], by["magnitude"]
        key = f"{int(round(sparsity * 100))}"
        summary[f"woodfisher_{key}"] = wf["accuracy"]
        summary[f"magnitude_{key}"] = mag["accuracy"]
        summary[f"woodfisher_drop_{key}"] = dense - wf["accuracy"]
        summary[f"woodfisher_minus_magnitude_{key}"] = wf["accuracy"] - mag["accuracy"]
        print(f"{sparsity:.0%}: magnitude {mag['accuracy']:.4f}, woodfisher {wf['accuracy']:.4f} "
              f"(woodfisher - dense {wf['accuracy'] - dense:+.4f}; "
              f"woodfisher - magnitude {wf['accuracy'] - mag['accuracy']:+.4f}); "
              f"wall magnitude {mag['wall_s']:.0f}s, woodfisher {wf['wall_s']:.0f}s")
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
