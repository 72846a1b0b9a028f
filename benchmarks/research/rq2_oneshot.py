"""RQ2: does a more faithful inverse-Hessian give better one-shot compression?

Every method (WoodFisher, WoodTaylor, K-FAC-based OBS, diagonal Fisher, global and uniform magnitude)
prunes the bundled ResNet-20 and MobileNetV1 (both Fashion-MNIST) once, with no fine-tuning, at each
target sparsity; test accuracy is measured as pruned and after BatchNorm recalibration (running
statistics re-estimated on training batches). Seeds are Fisher sample draws (which N images of the
Fisher pool the gradients see), so the data-free magnitude methods have one value per point.
All weights of every conv/linear layer are pruned (global ranking unless stated).

WoodFisher and K-FAC are each run with both OBS update rules on the same blocks of 128 weights: joint
(the constrained solve over a block's pruned weights, WoodFisher's default) and independent (the summed
single-weight updates), so the two curvatures are compared under the same rule; K-FAC with independent
updates over the whole layer (the K-FAC pruning literature's rule) is kept beside them.

    python benchmarks/research/rq2_oneshot.py           # full: 2 models, 6 sparsities, 3 seeds, N = 1000,
                                                        # 1,000 test images
    python benchmarks/research/rq2_oneshot.py --quick   # ResNet-20 only, 70%, 1 seed, N = 64, 300 test images
"""
from __future__ import annotations

import multiprocessing
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks._shared import set_threads  # noqa: E402
from benchmarks.research.common import (  # noqa: E402
    LABELS,
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
from benchmarks.research.oneshot_core import (  # noqa: E402
    DATA_FREE,
    Selection,
    Statistics,
    accuracy_with_and_without_bn,
    collect_statistics,
    fisher_draw,
    prune_copy,
)

# torch only after benchmarks.research.common, whose wf_pipeline import sets OMP_WAIT_POLICY first
# isort: split
import torch  # noqa: E402

from wf_pipeline.data import build_data  # noqa: E402
from wf_pipeline.models import build_model  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig, ModelConfig  # noqa: E402
from wf_pipeline.training.epoch import evaluate  # noqa: E402

MODELS = {
    "ResNet-20": ModelConfig(name="resnet20", num_classes=10, in_channels=1, weights="builtin:resnet20-fmnist"),
    "MobileNetV1-0.25": ModelConfig(name="mobilenetv1", num_classes=10, in_channels=1,
                                    weights="builtin:mobilenetv1-fmnist",
                                    kwargs={"width_mult": 0.25, "small_input": True}),
}
METHODS = ["woodfisher", "woodfisher_independent", "kfac_joint", "kfac_independent", "kfac", "woodtaylor",
           "diag_fisher", "magnitude", "magnitude_uniform"]
FULL: dict[str, list[Any]] = {"models": list(MODELS), "sparsities": [0.3, 0.5, 0.7, 0.8, 0.9, 0.95], "seeds": [0, 1, 2]}


def sweep_seed(label: str, seed: int, first_seed: bool, sparsities: list[float], num_grads: int, test_subset: int,
               damp: float, bn_batches: int, units: UnitLog, threads: int | None = None) -> dict[str, Any]:
    """One model and one Fisher draw: every method at every sparsity (data-free methods only with the first seed).

    Sparsity-major, each pruned model logged to `units` as it is measured (a resumed run skips those).
    """
    set_threads(threads)
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_subset), seed=0)
    model = build_model(MODELS[label]).eval()
    dense, _ = evaluate(model, data.test_batches(), torch.device("cpu"))
    log(f"{label}: dense test accuracy {dense:.4f} on {len(data.test_split)} images")  # type: ignore[arg-type]
    selection = Selection()
    rows: list[dict[str, Any]] = []
    stats: Statistics | None = None
    for sparsity in sparsities:
        for method in METHODS:
            if method in DATA_FREE and not first_seed:
                continue
            key = f"{label}|{seed}|{method}|{sparsity:g}"
            if key in units.done:
                rows.append(units.done[key])
                continue
            if stats is None and method not in DATA_FREE:
                stats = collect_statistics(model, selection, fisher_draw(data, seed), num_grads=num_grads, damp=damp,
                                           kfac=True)
            pruned, info = prune_copy(model, method, stats, sparsity, selection, damp=damp)
            plain, recal = accuracy_with_and_without_bn(pruned, data, bn_batches)
            row = {"model": label, "method": method, "seed": seed, "sparsity": sparsity, "accuracy": plain,
                   "accuracy_bn": recal, "achieved_sparsity": info["achieved_sparsity"]}
            rows.append(row)
            units.add(key, row)
            log(f"  {label} seed {seed} {method} @ {sparsity:.0%}: {plain:.4f} / BN-recalibrated {recal:.4f}")
    return {"model": label, "dense_accuracy": dense, "rows": rows, "seconds": stats.seconds if stats else {},
            "test_images": len(data.test_split)}  # type: ignore[arg-type]


def sweep(models: list[str], seeds: list[int], workers: int, **kwargs: Any) -> list[dict[str, Any]]:
    """All (model, seed) sweeps, in parallel worker processes when asked, merged per model."""
    jobs = [(label, seed, seed == seeds[0]) for label in models for seed in seeds]
    if workers > 1:
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = [f.result() for f in [pool.submit(sweep_seed, *job, threads=1, **kwargs) for job in jobs]]
    else:
        parts = [sweep_seed(*job, **kwargs) for job in jobs]
    results = []
    for label in models:
        mine = [p for p in parts if p["model"] == label]
        seconds: dict[str, float] = {}
        for part in mine:
            for key, value in part["seconds"].items():
                seconds[key] = seconds.get(key, 0.0) + value
        results.append({"model": label, "dense_accuracy": mine[0]["dense_accuracy"],
                        "test_images": mine[0]["test_images"],
                        "rows": [r for p in mine for r in p["rows"]], "seconds": seconds})
    return results


def cell(rows: list[dict[str, Any]], key: str) -> str:
    return pm([r[key] for r in rows])


def tables(results: list[dict[str, Any]], sparsities: list[float]) -> str:
    parts = []
    for res in results:
        for key, title in (("accuracy", "as pruned"), ("accuracy_bn", "after BatchNorm recalibration")):
            header = ["method", *[f"{s:.0%}" for s in sparsities]]
            body = []
            for method in METHODS:
                cells = [cell([r for r in res["rows"] if r["method"] == method and r["sparsity"] == s], key)
                         for s in sparsities]
                body.append([LABELS[method], *cells])
            parts.append(f"**{res['model']}**, {title} (dense {100 * res['dense_accuracy']:.2f}%, "
                         f"{res['test_images']:,} test images; mean ± std over seeds, %):\n\n"
                         + markdown_table(header, body))
    return "\n".join(parts)


def summarise(results: list[dict[str, Any]], sparsities: list[float]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for res in results:
        per: dict[str, Any] = {}
        for method in METHODS:
            for key in ("accuracy", "accuracy_bn"):
                per.setdefault(method, {})[key] = {
                    f"{s:g}": mean_std([r[key] for r in res["rows"] if r["method"] == method and r["sparsity"] == s])[0]
                    for s in sparsities}
        out[res["model"]] = {"dense_accuracy": res["dense_accuracy"], "mean": per}
    return out


def plot(results: list[dict[str, Any]], sparsities: list[float]) -> Any:
    fig, axes = new_figure(ncols=2, nrows=len(results), size=(5.0, 3.6))
    for row, res in enumerate(results):
        for col, (key, title) in enumerate((("accuracy", "as pruned"), ("accuracy_bn", "BN recalibrated"))):
            ax = axes[row][col]
            for method in METHODS:
                means, stds = [], []
                for s in sparsities:
                    m, sd = mean_std([r[key] for r in res["rows"] if r["method"] == method and r["sparsity"] == s])
                    means.append(m)
                    stds.append(sd)
                ax.errorbar(sparsities, means, yerr=stds, marker="o", capsize=3, label=LABELS[method])
            ax.axhline(res["dense_accuracy"], color="grey", linestyle="--", label="dense")
            ax.set_title(f"{res['model']}: one-shot, {title}", fontsize=9)
            ax.set_xlabel("sparsity")
            ax.set_ylabel("test accuracy")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    return fig


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), help="a subset of the models (default: all)")
    parser.add_argument("--sparsities", nargs="+", type=float,
                        help="a subset of the sparsities (output marked reduced)")
    parser.add_argument("--seeds", nargs="+", type=int,
                        help="other Fisher draws (output marked reduced if not the full run's)")
    parser.add_argument("--workers", type=int, default=2, help="(model, seed) sweeps in parallel, one thread each")
    parser.add_argument("--damp", type=float, default=1e-3,
                        help="dampening λ of every Fisher (the default recipe's; the paper used 1e-5)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        models, sparsities, seeds, num_grads, test_subset, bn = ["ResNet-20"], [0.7], [0], 64, 300, 2
    else:
        models, sparsities, seeds = FULL["models"], FULL["sparsities"], FULL["seeds"]
        num_grads, test_subset, bn = 1000, 1000, 5
    models, sparsities, seeds = args.models or models, args.sparsities or sparsities, args.seeds or seeds
    units = UnitLog(args.out, "rq2_oneshot", {"quick": args.quick, "num_grads": num_grads, "test_subset": test_subset,
                                              "damp": args.damp, "bn": bn}, args.resume)
    results = sweep(models, seeds, args.workers, sparsities=sparsities, num_grads=num_grads, test_subset=test_subset,
                    damp=args.damp, bn_batches=bn, units=units)
    reduced = None if args.quick else reduction(FULL, {"models": models, "sparsities": sparsities, "seeds": seeds})
    markdown = (f"One-shot pruning, no fine-tuning; N = {num_grads} gradients per seed (block 128, λ = {args.damp:g}); "
                f"seeds: {len(seeds)}; BatchNorm recalibration on {bn} training batches of 128."
                + (f" **Reduced run**: {reduced}." if reduced else "") + "\n\n" + tables(results, sparsities))
    payload = {"quick": args.quick, "reduced": reduced, "resumed_units": len(units.done), "models": models,
               "num_grads": num_grads, "seeds": seeds, "sparsities": sparsities, "damp": args.damp,
               "summary": summarise(results, sparsities), "results": results}
    save_outputs(args.out, "rq2_oneshot", markdown, payload, plot(results, sparsities), started)
    units.finish()


if __name__ == "__main__":
    main()
