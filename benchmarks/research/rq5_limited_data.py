"""RQ5: how does WoodFisher do with little data?

The limited-data mode (``data.fisher_samples_per_class: k``) builds the Fisher pool from only k
training images per class. For k in 1, 5, 10, 50, 100, 500 the bundled ResNet-20 is pruned one-shot
with WoodFisher using every pool image once (N = 10·k gradients, at most 5,000), and compared with global
magnitude pruning, which needs no data at all. Seeds draw different pools. Accuracy is reported as
pruned (BatchNorm recalibration would itself use training data, which this question rules out).

    python benchmarks/research/rq5_limited_data.py           # full: k up to 500, 2 targets, 2 seeds
    python benchmarks/research/rq5_limited_data.py --quick   # k = 1, 10; 1 target; 1 seed
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.research.common import log, markdown_table, mean_std, new_figure, pm, save_outputs, study_parser  # noqa: E402
from benchmarks.research.oneshot_core import Selection, collect_statistics, prune_copy  # noqa: E402

# torch only after benchmarks.research.common, whose wf_pipeline import sets OMP_WAIT_POLICY first
# isort: split
import torch  # noqa: E402

from wf_pipeline.data import build_data  # noqa: E402
from wf_pipeline.models import load_default_model  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig  # noqa: E402
from wf_pipeline.training.epoch import evaluate  # noqa: E402

MAX_GRADS = 5000


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--damp", type=float, default=1e-3, help="dampening λ (the default recipe's)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        per_class, targets, seeds, test_subset = [1, 10], [0.7], [0], 300
    else:
        per_class, targets, seeds, test_subset = [1, 5, 10, 50, 100, 500], [0.7, 0.8], [0, 1], 2000
    model = load_default_model()
    selection = Selection()
    device = torch.device("cpu")
    base = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_subset), seed=0)
    dense, _ = evaluate(model, base.test_batches(), device)
    magnitude = {t: evaluate(prune_copy(model, "magnitude", None, t, selection)[0], base.test_batches(), device)[0]
                 for t in targets}
    rows: list[dict[str, Any]] = []
    for k in per_class:
        for seed in seeds:
            # The limited-data mode as a recipe sets it; the pool is drawn from the training set by `seed`
            # (the test subset is fixed: it is drawn with data seed 0 in `base`).
            data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_subset,
                                         fisher_pool=60_000, fisher_samples_per_class=k), seed=seed)
            pool = len(data.fisher_split)  # type: ignore[arg-type]
            n = min(pool, MAX_GRADS)
            stats = collect_statistics(model, selection, data.fisher_batches(batch_size=100), num_grads=n,
                                       damp=args.damp)
            for target in targets:
                pruned, _ = prune_copy(model, "woodfisher", stats, target, selection, damp=args.damp)
                acc, _ = evaluate(pruned, base.test_batches(), device)
                rows.append({"per_class": k, "seed": seed, "target": target, "num_grads": n, "accuracy": acc})
                log(f"  {k}/class (N={n}) seed {seed} @ {target:.0%}: WoodFisher {acc:.4f} "
                    f"(magnitude {magnitude[target]:.4f})")

    header = ["samples per class", "N gradients", *[f"WoodFisher {t:.0%}" for t in targets]]

    def accuracies(k: int, t: float) -> list[float]:
        return [r["accuracy"] for r in rows if r["per_class"] == k and r["target"] == t]

    body = [[k, next(r["num_grads"] for r in rows if r["per_class"] == k), *[pm(accuracies(k, t)) for t in targets]]
            for k in per_class]
    body.append(["global magnitude (no data)", 0, *[pm([magnitude[t]]) for t in targets]])
    markdown = (f"ResNet-20 one-shot (dense {100 * dense:.2f}% on {test_subset:,} test images), "
                f"no BatchNorm recalibration, "
                f"WoodFisher block 128, λ = {args.damp:g}; mean ± std over {len(seeds)} pool draws (%).\n\n"
                + markdown_table(header, body))
    fig, axes = new_figure()
    ax = axes[0][0]
    for target in targets:
        stats_ = [mean_std(accuracies(k, target)) for k in per_class]
        line = ax.errorbar(per_class, [m for m, _ in stats_], yerr=[s for _, s in stats_], marker="o", capsize=3,
                           label=f"WoodFisher {target:.0%}")
        ax.axhline(magnitude[target], linestyle=":", color=line[0].get_color(), label=f"magnitude {target:.0%}")
    ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set_xscale("log")
    ax.set_xlabel("Fisher samples per class")
    ax.set_ylabel("test accuracy (one-shot)")
    ax.set_title("RQ5: WoodFisher with limited data (ResNet-20)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    summary = {f"{t:g}": {"magnitude": magnitude[t], **{str(k): mean_std(accuracies(k, t))[0] for k in per_class}}
               for t in targets}
    payload = {"quick": args.quick, "dense_accuracy": dense, "per_class": per_class, "targets": targets, "seeds": seeds,
               "summary": summary, "rows": rows}
    save_outputs(args.out, "rq5_limited_data", markdown, payload, fig, started)


if __name__ == "__main__":
    main()
