"""RQ3: does second-order information give better accuracy after gradual pruning? And generalisation?

The default recipe (recipes/default.yaml: ResNet-20 on Fashion-MNIST, cubic schedule, conv1 and fc
dense) runs its whole pruning stage with WoodFisher and with global magnitude, changing nothing but
the method, at 90/95/98% and over seeds (the recipe's seed: data order and Fisher draws). To fit the
studies' one-hour budget the fine-tuning budget is reduced (the table says by how much); both methods
get exactly the same. The final models are evaluated on the whole test set and on a fixed subset of
training images (no augmentation) for the train/test gap.

    python benchmarks/research/rq3_gradual.py           # full: 3 targets x 2 seeds x 2 methods
    python benchmarks/research/rq3_gradual.py --quick   # 90% only, 1 seed, a few optimizer steps
"""
from __future__ import annotations

import multiprocessing
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks._shared import set_threads  # noqa: E402
from benchmarks.research.common import (  # noqa: E402
    REPO,
    UnitLog,
    log,
    markdown_table,
    mean_std,
    new_figure,
    pm,
    reduction,
    save_outputs,
    study_parser,
)

# torch only after benchmarks.research.common, whose wf_pipeline import sets OMP_WAIT_POLICY first
# isort: split
import torch  # noqa: E402

from wf_pipeline.data import build_data  # noqa: E402
from wf_pipeline.data.loaders import TensorBatches  # noqa: E402
from wf_pipeline.models import build_model  # noqa: E402
from wf_pipeline.recipe.loader import load_recipe  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig  # noqa: E402
from wf_pipeline.runtime.device import seed_everything  # noqa: E402
from wf_pipeline.runtime.rundir import RunDir  # noqa: E402
from wf_pipeline.training.epoch import evaluate  # noqa: E402
from wf_pipeline.training.gradual import run_pruning_stage  # noqa: E402

METHODS = ("magnitude", "woodfisher")
LABELS = {"magnitude": "global magnitude", "woodfisher": "WoodFisher"}
FULL = {"finetune.epochs": 4, "finetune.steps_per_epoch": 60, "pruning.schedule.end_epoch": 2,
        "pruning.woodfisher.num_grads": 500, "data.test_subset": 1000}
QUICK = {"finetune.epochs": 2, "finetune.steps_per_epoch": 8, "pruning.schedule.end_epoch": 1,
         "pruning.woodfisher.num_grads": 64, "data.test_subset": 200}


def final_evaluation(model: torch.nn.Module, test_images: int | None, train_images: int) -> tuple[float, float]:
    """(train accuracy on a fixed training subset without augmentation, test accuracy)."""
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_images), seed=0)
    split = data.train_split
    assert split is not None and data.preprocess is not None
    idx = torch.randperm(len(split), generator=torch.Generator().manual_seed(123))[:train_images]
    train = TensorBatches(split.images[idx], split.labels[idx], data.preprocess, 500)
    device = torch.device("cpu")
    model.eval()
    return evaluate(model, train, device)[0], evaluate(model, data.test_batches(), device)[0]


FULL_GRID: dict[str, list[Any]] = {"targets": [0.9, 0.95, 0.98], "seeds": [0, 1]}


def run_one(method: str, target: float, seed: int, budget: dict[str, Any], root: Path,
            eval_sizes: tuple[int | None, int], units: UnitLog, threads: int | None = None) -> dict[str, Any]:
    """One gradual-pruning run and its final evaluation, logged to `units` (a resumed run reuses it)."""
    key = f"{method}|{target:g}|{seed}"
    if key in units.done:
        return units.done[key]
    set_threads(threads)
    overrides = [f"{k}={v}" for k, v in budget.items()]
    overrides += [f"pruning.method={method}", f"pruning.final_sparsity={target}", f"seed={seed}",
                  f"output.root={root}", f"output.run_name={method}-{int(target * 1000)}-{seed}"]
    recipe, _ = load_recipe(REPO / "recipes" / "default.yaml", overrides)
    seed_everything(recipe.seed, recipe.deterministic)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model)
    run = RunDir(root / recipe.run_name())
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = run_pruning_stage(recipe, run, model, data, torch.device("cpu"))
    train_acc, test_acc = final_evaluation(result.model, *eval_sizes)
    row = {"method": method, "target": target, "seed": seed, "sparsity": result.metrics.sparsity,
           "train_accuracy": train_acc, "test_accuracy": test_acc, "gap": train_acc - test_acc,
           "accuracy_after_steps": [r.get("test_accuracy_after") for r in result.metrics.prune_reports or []],
           "wall_s": time.perf_counter() - started}
    units.add(key, row)
    log(f"  {method} -> {target:.0%} seed {seed}: test {test_acc:.4f}, train {train_acc:.4f} ({row['wall_s']:.0f} s)")
    return row


def table(rows: list[dict[str, Any]], targets: list[float], dense: tuple[float, float]) -> str:
    body: list[list[Any]] = [["dense", "0%", pm([dense[1]]), pm([dense[0]]), f"{100 * (dense[0] - dense[1]):+.2f}", ""]]
    for target in targets:
        for method in METHODS:
            sel = [r for r in rows if r["method"] == method and r["target"] == target]
            if sel:
                body.append([LABELS[method], f"{target:.0%}", pm([r["test_accuracy"] for r in sel]),
                             pm([r["train_accuracy"] for r in sel]), pm([r["gap"] for r in sel]), len(sel)])
    header = ["method", "target", "test accuracy (%)", "train accuracy (%)", "train − test (points)", "seeds"]
    return markdown_table(header, body)


def plot(rows: list[dict[str, Any]], targets: list[float], dense: tuple[float, float]) -> Any:
    fig, axes = new_figure(ncols=2, size=(5.0, 3.6))
    for key, ax, title in (("test_accuracy", axes[0][0], "test accuracy after gradual pruning"),
                           ("gap", axes[0][1], "train − test accuracy (generalisation gap)")):
        for method in METHODS:
            stats = [mean_std([r[key] for r in rows if r["method"] == method and r["target"] == t]) for t in targets]
            ax.errorbar(targets, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=LABELS[method])
        ax.axhline(dense[1] if key == "test_accuracy" else dense[0] - dense[1], color="grey", linestyle="--",
                   label="dense")
        ax.set_xlabel("target sparsity")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--workers", type=int, default=2,
                        help="runs in parallel, one thread each (small models use 2 cores better this way)")
    parser.add_argument("--targets", nargs="+", type=float, help="a subset of the targets (output marked reduced)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="other seeds (output marked reduced if not the full run's)")
    args = parser.parse_args()
    started = time.perf_counter()
    eval_sizes: tuple[int | None, int]
    if args.quick:
        targets, seeds, budget, eval_sizes = [0.9], [0], QUICK, (500, 500)
    else:
        targets, seeds, budget, eval_sizes = FULL_GRID["targets"], FULL_GRID["seeds"], FULL, (None, 5000)
    targets, seeds = args.targets or targets, args.seeds or seeds
    config = {"quick": args.quick, "budget": budget, "eval_sizes": eval_sizes}
    units = UnitLog(args.out, "rq3_gradual", config, args.resume)
    resumed = len(units.done)
    if "dense" not in units.done:  # (train, test) accuracy of the dense model, logged like a run
        dense_model = build_model(load_recipe(REPO / "recipes" / "default.yaml", [])[0].model)
        units.done["dense"] = list(final_evaluation(dense_model, *eval_sizes))
        units.add("dense", units.done["dense"])
    dense = (units.done["dense"][0], units.done["dense"][1])
    jobs = [(method, target, seed) for target in targets for seed in seeds for method in METHODS]
    workers = min(args.workers, sum(f"{m}|{t:g}|{s}" not in units.done for m, t, s in jobs))
    with tempfile.TemporaryDirectory(prefix="wf-rq3-") as tmp:
        if workers > 1:
            # spawn: fresh interpreters, no forked OpenMP state; every run is deterministic whatever the order.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_one, m, t, s, budget, Path(tmp), eval_sizes, units, 1) for m, t, s in jobs]
                rows = [f.result() for f in futures]
        else:
            rows = [run_one(m, t, s, budget, Path(tmp), eval_sizes, units) for m, t, s in jobs]
    steps = budget["finetune.epochs"] * budget["finetune.steps_per_epoch"]
    reduced = None if args.quick else reduction(FULL_GRID, {"targets": targets, "seeds": seeds})
    note = (f"Gradual pruning with recipes/default.yaml, only the method changed; reduced budget for the studies: "
            f"{budget['finetune.epochs']} fine-tuning epochs of {budget['finetune.steps_per_epoch']} steps "
            f"({steps} optimizer "
            f"steps; the default recipe has 1,800), pruning steps at epochs 0..{budget['pruning.schedule.end_epoch']}, "
            f"N = {budget['pruning.woodfisher.num_grads']} gradients per WoodFisher step. Test accuracy on "
            f"{'all 10,000' if eval_sizes[0] is None else f'{eval_sizes[0]:,}'} test images, train accuracy on "
            f"{eval_sizes[1]:,} fixed training images (no augmentation); mean ± std over seeds."
            + (f" **Reduced run**: {reduced}." if reduced else "") + "\n\n")
    def mean_of(key: str, m: str, t: float) -> float:
        return mean_std([r[key] for r in rows if r["method"] == m and r["target"] == t])[0]

    summary = {f"{m}_{int(round(t * 100))}": mean_of("test_accuracy", m, t) for m in METHODS for t in targets}
    summary.update({f"{m}_gap_{int(round(t * 100))}": mean_of("gap", m, t) for m in METHODS for t in targets})
    payload = {"quick": args.quick, "reduced": reduced, "resumed_units": resumed, "budget": budget, "targets": targets,
               "seeds": seeds,
               "dense": {"train_accuracy": dense[0], "test_accuracy": dense[1]}, "summary": summary, "rows": rows}
    save_outputs(args.out, "rq3_gradual", note + table(rows, targets, dense), payload, plot(rows, targets, dense),
                 started)
    units.finish()


if __name__ == "__main__":
    main()
