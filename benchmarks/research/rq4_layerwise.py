"""RQ4: does WoodFisher set per-layer sparsities by itself, without hand tuning?

At equal total sparsity, WoodFisher prunes the bundled ResNet-20 one-shot with three allocations of
the sparsity over layers: its own global ranking (the scores decide each layer's share), uniform (every
layer at the target) and a hand-tuned allocation as practitioners write it (the input convolution and
the classifier kept dense, every other layer at the uniform sparsity that meets the total). The same
Fisher statistics serve all three, so only the allocation differs. Accuracy is reported as pruned and
after BatchNorm recalibration; the plot shows the per-layer sparsity WoodFisher chose.

    python benchmarks/research/rq4_layerwise.py           # full: 3 targets, 2 seeds, N = 1000
    python benchmarks/research/rq4_layerwise.py --quick   # 1 target, 1 seed, N = 64
"""
from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from benchmarks.research.common import log, markdown_table, mean_std, new_figure, pm, save_outputs, study_parser  # noqa: E402
from benchmarks.research.oneshot_core import (  # noqa: E402
    Selection,
    accuracy_with_and_without_bn,
    collect_statistics,
    fisher_draw,
    prune_copy,
)

# torch only after benchmarks.research.common, whose wf_pipeline import sets OMP_WAIT_POLICY first
# isort: split
import torch  # noqa: E402

from wf_pipeline.data import build_data  # noqa: E402
from wf_pipeline.models import load_default_model  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig  # noqa: E402
from wf_pipeline.training.epoch import evaluate  # noqa: E402

STRATEGIES = ("global", "uniform", "hand-tuned")
LABELS = {"global": "WoodFisher global ranking (automatic)", "uniform": "uniform per layer",
          "hand-tuned": "hand-tuned (conv1, fc dense; rest uniform)"}


def hand_tuned_counts(names: list[str], sizes: list[int], target: float) -> list[int]:
    """First and last layer dense, the same sparsity everywhere else, total zeros = target · all weights."""
    dense = {names[0], names[-1]}
    total = round(target * sum(sizes))
    rest = sum(n for name, n in zip(names, sizes, strict=True) if name not in dense)
    if total > rest:
        raise ValueError(f"target {target:.0%} cannot be met with {sorted(dense)} dense")
    counts = [0 if name in dense else int(total * n / rest) for name, n in zip(names, sizes, strict=True)]
    for i in sorted((i for i, name in enumerate(names) if name not in dense), key=lambda i: -sizes[i]):
        if sum(counts) >= total:
            break
        counts[i] += 1  # largest layers absorb the rounding remainder
    return counts


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--damp", type=float, default=1e-3, help="dampening λ (the default recipe's)")
    args = parser.parse_args()
    started = time.perf_counter()
    if args.quick:
        targets, seeds, num_grads, test_subset, bn = [0.7], [0], 64, 300, 2
    else:
        targets, seeds, num_grads, test_subset, bn = [0.7, 0.8, 0.9], [0, 1], 1000, 2000, 10
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_subset), seed=0)
    model = load_default_model()
    dense, _ = evaluate(model, data.test_batches(), torch.device("cpu"))
    selection = Selection()
    params = selection.params(model)
    names, sizes = list(params), [p.numel() for p in params.values()]
    rows: list[dict[str, Any]] = []
    for seed in seeds:
        stats = collect_statistics(model, selection, fisher_draw(data, seed), num_grads=num_grads, damp=args.damp)
        for target in targets:
            for strategy in STRATEGIES:
                kwargs: dict[str, Any] = {"ranking": "uniform"} if strategy == "uniform" else {}
                if strategy == "hand-tuned":
                    kwargs["counts"] = hand_tuned_counts(names, sizes, target)
                pruned, info = prune_copy(model, "woodfisher", stats, target, selection, damp=args.damp, **kwargs)
                plain, recal = accuracy_with_and_without_bn(pruned, data, bn)
                rows.append({"strategy": strategy, "target": target, "seed": seed, "accuracy": plain,
                             "accuracy_bn": recal, "achieved_sparsity": info["achieved_sparsity"],
                             "per_layer_sparsity": info["per_layer_sparsity"]})
                log(f"  seed {seed} {strategy} @ {target:.0%}: {plain:.4f} / BN {recal:.4f} "
                    f"(total {info['achieved_sparsity']:.4f})")

    header = ["allocation", *[f"{t:.0%} as pruned" for t in targets], *[f"{t:.0%} BN recal." for t in targets]]
    body = []
    for strategy in STRATEGIES:
        sel = lambda t, s=strategy: [r for r in rows if r["strategy"] == s and r["target"] == t]  # noqa: E731
        body.append([LABELS[strategy], *[pm([r["accuracy"] for r in sel(t)]) for t in targets],
                     *[pm([r["accuracy_bn"] for r in sel(t)]) for t in targets]])
    top = targets[-1]
    chosen = [r for r in rows if r["strategy"] == "global" and r["target"] == top]
    per_layer = {n: mean_std([r["per_layer_sparsity"][n] for r in chosen])[0] for n in names}
    spread = (min(per_layer.values()), max(per_layer.values()))
    markdown = (f"ResNet-20 (dense {100 * dense:.2f}% on {test_subset:,} test images), "
                f"one-shot WoodFisher (N = {num_grads}, "
                f"block 128, λ = {args.damp:g}) at equal total sparsity, "
                f"mean ± std over {len(seeds)} Fisher draws (%). "
                f"At {top:.0%} the global ranking gave layers {spread[0]:.1%} to {spread[1]:.1%} sparsity "
                f"(first layer {per_layer[names[0]]:.1%}, classifier {per_layer[names[-1]]:.1%}).\n\n"
                + markdown_table(header, body))

    fig, axes = new_figure(ncols=2, size=(6.0, 3.8))
    ax = axes[0][0]
    ax.bar(range(len(names)), [per_layer[n] for n in names], color="tab:blue", label="WoodFisher global ranking")
    ax.axhline(top, color="grey", linestyle="--", label=f"uniform {top:.0%}")
    hand = hand_tuned_counts(names, sizes, top)
    ax.plot(range(len(names)), [c / n for c, n in zip(hand, sizes, strict=True)], "k_", markersize=12,
            label="hand-tuned")
    ax.set_xticks(range(len(names)), [n.removesuffix(".weight") for n in names], rotation=90, fontsize=6)
    ax.set_ylabel("sparsity of layer")
    ax.set_title(f"Per-layer sparsity at {top:.0%} total (ResNet-20)", fontsize=9)
    ax.legend(fontsize=7)
    ax = axes[0][1]
    for strategy in STRATEGIES:
        stats_ = [mean_std([r["accuracy_bn"] for r in rows if r["strategy"] == strategy and r["target"] == t])
                  for t in targets]
        ax.errorbar(targets, [m for m, _ in stats_], yerr=[s for _, s in stats_], marker="o", capsize=3,
                    label=LABELS[strategy])
    ax.axhline(dense, color="grey", linestyle="--", label="dense")
    ax.set_xlabel("total sparsity")
    ax.set_ylabel("test accuracy (BN recalibrated)")
    ax.set_title("Allocation of sparsity over layers", fontsize=9)
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    def mean_of(key: str, s: str, t: float) -> float:
        return mean_std([r[key] for r in rows if r["strategy"] == s and r["target"] == t])[0]

    summary = {s: {f"{t:g}": {"accuracy": mean_of("accuracy", s, t), "accuracy_bn": mean_of("accuracy_bn", s, t)}
                   for t in targets} for s in STRATEGIES}
    payload = {"quick": args.quick, "dense_accuracy": dense, "targets": targets, "seeds": seeds, "num_grads": num_grads,
               "summary": summary, "woodfisher_per_layer_sparsity": per_layer,
               "layer_sizes": dict(zip(names, sizes, strict=True)),
               "rows": [{k: v for k, v in r.items() if k != "per_layer_sparsity"} for r in rows]}
    save_outputs(args.out, "rq4_layerwise", markdown, payload, fig, started)


if __name__ == "__main__":
    main()
