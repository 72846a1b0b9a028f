"""RQ1: how faithful are inverse-Hessian approximations? (WoodFisher, true Fisher, diagonal Fisher, K-FAC)

A small MLP (784-40-20-10, tanh) is trained on Fashion-MNIST in this script (deterministic, seconds).
For each layer block (fc2 and fc3, whole; fc1's 31,360 weights would need a 7.9 GB Hessian and ~10^13
flops of Hessian-vector products, beyond a 2-core machine) the exact Hessian of the mean loss over a fixed
"curvature set" of training images is built with curvlinops-for-pytorch (Hessian-vector products), and every
approximation is compared with it:

* WoodFisher: the empirical Fisher ``(1/N) Σ g gᵀ`` of N per-sample gradients (our
  ``wf_pipeline.fisher`` code: ``GradientComputer`` + ``BlockFisherInverse`` with the block = the layer),
  for N from 10 to the whole curvature set;
* diagonal Fisher: the diagonal of the same empirical Fisher (our ``DiagonalAccumulator``);
* K-FAC: curvlinops' ``KFACLinearOperator`` (type-2, i.e. exact true-Fisher factors) on the same N samples;
* true Fisher: curvlinops' ``GGNLinearOperator`` on the whole set (for softmax cross-entropy the GGN is
  the true Fisher);
* magnitude: the identity curvature (the baseline every pruning paper compares against).

tanh, not ReLU: with ReLU each layer's output is piecewise linear in that layer's weights, so a layer's
Hessian block equals its GGN (= true Fisher) exactly and the comparison would be trivial.

The Hessian of the trained tanh network is slightly indefinite (a few percent of its eigenvalue mass is
negative; the table's note gives it), and OBS assumes a positive semi-definite quadratic model, so the
reference is the exact Hessian's positive part ``H₊`` (negative eigenvalues set to zero). Every matrix
gets the same dampening ``λI`` (default λ = 1e-3, the project's default recipe). Per block and method:

* ``inv err``: ``‖M − M_H‖_F / ‖M_H‖_F`` for the inverses ``M = (C + λI)⁻¹``;
* ``stat ρ``: Spearman rank correlation of the OBS statistic ``w_q² / (2 M_qq)`` with the exact one;
* ``single ρ``: Spearman correlation between each method's predicted loss increase of removing one weight
  (its OBS statistic) and the loss increase actually measured after removing it with that method's own
  OBS update, over a fixed random sample of weights;
* ``group ΔL``: the actual loss increase after each method removes its own lowest-statistic 10/30/50%
  of the block at once with the joint OBS update ``δw = −M[:,Q] (M_QQ)⁻¹ w_Q`` (lower is better), and
  the ratio of its prediction ``½ w_Qᵀ (M_QQ)⁻¹ w_Q`` to that actual increase.

Curves over N (inverse error, statistic correlation and group ΔL at 50%) for the fc2 block go to the plot;
a second table gives those measures at the pipeline's N = 1,000 (the default recipe's) beside the largest N.

    python benchmarks/hessian_quality.py           # full: 10,000-image curvature set, N up to 10,000
    python benchmarks/hessian_quality.py --quick   # ~30 s: 1,000 images, fc2 and fc3 only
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.research.common import log, markdown_table, new_figure, save_outputs, study_parser  # noqa: E402

# torch only after benchmarks.research.common, whose wf_pipeline import sets OMP_WAIT_POLICY first
# isort: split
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402
from torch import Tensor, nn  # noqa: E402

from wf_pipeline.data import build_data  # noqa: E402
from wf_pipeline.fisher.gradients import GradientComputer  # noqa: E402
from wf_pipeline.fisher.inverse import BlockFisherInverse, DiagonalAccumulator  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig  # noqa: E402

GROUP_FRACTIONS = (0.1, 0.3, 0.5)
METHODS = ("WoodFisher", "K-FAC", "diagonal Fisher", "true Fisher", "magnitude")
CURVE_METHODS = ("WoodFisher", "K-FAC", "diagonal Fisher")
PIPELINE_N = 1000  # per-sample gradients per pruning step in recipes/default.yaml


@dataclass(frozen=True)
class Block:
    """Rows ``rows`` (all when None) of the weight of ``model[index]``."""

    label: str
    index: int
    rows: int | None = None


def require_curvlinops() -> Any:
    try:
        import curvlinops
    except ImportError:
        sys.exit("hessian_quality.py needs curvlinops-for-pytorch: pip install 'wf-pipeline[research]'")
    return curvlinops


# ----------------------------------------------------------------------------- data and model
def load_tensors(curvature_size: int, seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Train, curvature-set and test tensors (flattened, normalised, float64)."""
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, fisher_pool=curvature_size), seed=seed)
    prep = data.preprocess
    assert data.train_split is not None and data.test_split is not None and data.fisher_split is not None and prep

    def flat(split: Any) -> tuple[Tensor, Tensor]:
        return prep(split.images).reshape(len(split), -1).double(), split.labels

    return (*flat(data.train_split), *flat(data.fisher_split), *flat(data.test_split))


def train_mlp(x: Tensor, y: Tensor, epochs: int, seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(784, 40), nn.Tanh(), nn.Linear(40, 20), nn.Tanh(), nn.Linear(20, 10)).double()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        order = torch.randperm(len(y), generator=gen)
        for start in range(0, len(y) - 127, 128):
            idx = order[start : start + 128]
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
    return model.eval()


def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).double().mean())


# ----------------------------------------------------------------------------- curvature matrices
def linear_at(model: nn.Sequential, index: int) -> nn.Linear:
    """The MLP's layer at `index` (a block is always a Linear layer)."""
    layer = model[index]
    assert isinstance(layer, nn.Linear), f"layer {index} is {type(layer).__name__}, not Linear"
    return layer


def block_indices(model: nn.Sequential, block: Block) -> Tensor:
    weight = linear_at(model, block.index).weight
    rows = weight.shape[0] if block.rows is None else block.rows
    return torch.arange(rows * weight.shape[1])


def operator_block(operator: Any, numel: int, idx: Tensor, columns_per_call: int = 256) -> Tensor:
    """The ``idx×idx`` sub-matrix of a curvlinops operator over one weight tensor (columns in slices)."""
    out = torch.empty(len(idx), len(idx), dtype=torch.float64)
    for start in range(0, len(idx), columns_per_call):
        cols = idx[start : start + columns_per_call]
        unit = torch.zeros(numel, len(cols), dtype=torch.float64)
        unit[cols, torch.arange(len(cols))] = 1.0
        out[:, start : start + len(cols)] = (operator @ unit)[idx]
    return 0.5 * (out + out.T)


def batches(x: Tensor, y: Tensor, size: int = 2500) -> list[tuple[Tensor, Tensor]]:
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def per_sample_gradients(model: nn.Sequential, block: Block, x: Tensor, y: Tensor, idx: Tensor) -> Tensor:
    """``(n, |idx|)`` per-sample gradients of the block's weights, from our Fisher code."""
    layer = linear_at(model, block.index)
    computer = GradientComputer(model, {"weight": cast(nn.Parameter, layer.weight)}, dtype=torch.float64)
    rows = [computer.compute(x[i : i + 500].unsqueeze(1), y[i : i + 500].unsqueeze(1))[:, idx]
            for i in range(0, len(y), 500)]
    return torch.cat(rows)


def damped_inverse(matrix: Tensor, damp: float) -> Tensor:
    eye = torch.eye(matrix.shape[0], dtype=matrix.dtype)
    return torch.linalg.inv(matrix + damp * eye)


# ----------------------------------------------------------------------------- OBS metrics
class BlockLoss:
    """Mean cross-entropy over the curvature set as a function of one block's weights.

    The input to the block's layer is computed once; each candidate weight only re-runs the suffix.
    """

    def __init__(self, model: nn.Sequential, block: Block, x: Tensor, y: Tensor, idx: Tensor) -> None:
        self.layer = linear_at(model, block.index)
        self.suffix = model[block.index + 1 :]
        self.idx = idx
        self.y = y
        with torch.no_grad():
            self.inputs = model[: block.index](x)
        self.base_weight = self.layer.weight.detach().clone()
        self.base = float(self(self.block_weights().unsqueeze(0))[0])

    def block_weights(self) -> Tensor:
        return self.base_weight.reshape(-1)[self.idx].clone()

    @torch.no_grad()
    def __call__(self, candidates: Tensor, chunk: int = 16) -> Tensor:
        """Loss for each row of ``candidates`` ``(k, |idx|)`` (new values of the block's weights)."""
        out = []
        for start in range(0, len(candidates), chunk):
            part = candidates[start : start + chunk]
            weights = self.base_weight.reshape(1, -1).repeat(len(part), 1)
            weights[:, self.idx] = part
            weights = weights.reshape(len(part), *self.base_weight.shape)
            hidden = torch.einsum("ni,koi->kno", self.inputs, weights) + self.layer.bias
            logits = self.suffix(hidden)
            losses = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.y.repeat(len(part)), reduction="none")
            out.append(losses.reshape(len(part), -1).mean(1))
        return torch.cat(out)


def obs_statistic(w: Tensor, inverse: Tensor) -> Tensor:
    return w.square() / (2 * inverse.diagonal())


def single_weight_removal(w: Tensor, inverse: Tensor, sample: Tensor) -> Tensor:
    """Weights after removing each sampled weight alone with the OBS update (one row per weight)."""
    cols = inverse[:, sample]  # (k, s)
    updated = w.unsqueeze(0) - (w[sample] / inverse[sample, sample]).unsqueeze(1) * cols.T
    updated[torch.arange(len(sample)), sample] = 0.0
    return updated


def group_removal(w: Tensor, inverse: Tensor, pruned: Tensor) -> tuple[Tensor, float]:
    """Joint OBS update for the set ``pruned``: new weights and the predicted loss increase."""
    sub = inverse[pruned][:, pruned]
    solve = torch.linalg.solve(sub, w[pruned])
    updated = w - inverse[:, pruned] @ solve
    updated[pruned] = 0.0
    return updated, 0.5 * float(w[pruned] @ solve)


def spearman(a: Tensor, b: Tensor) -> float:
    value = spearmanr(a.numpy(), b.numpy()).statistic
    return float(value)


def evaluate_method(inverse: Tensor, exact_inverse: Tensor | None, loss: BlockLoss, sample: Tensor,
                    exact_stat: Tensor) -> dict[str, Any]:
    w = loss.block_weights()
    stat = obs_statistic(w, inverse)
    removed = single_weight_removal(w, inverse, sample)
    actual_single = loss(removed) - loss.base
    record: dict[str, Any] = {
        "inv_err": (None if exact_inverse is None
                    else float(torch.linalg.norm(inverse - exact_inverse) / torch.linalg.norm(exact_inverse))),
        "stat_spearman": spearman(stat, exact_stat),
        "single_spearman": spearman(stat[sample], actual_single),
        "single_median_rel_err": float(((stat[sample] - actual_single).abs()
                                        / actual_single.abs().clamp_min(1e-12)).median()),
        "groups": {},
    }
    for fraction in GROUP_FRACTIONS:
        count = max(1, round(fraction * len(w)))
        pruned = torch.zeros(len(w), dtype=torch.bool)
        pruned[stat.argsort()[:count]] = True
        updated, predicted = group_removal(w, inverse, pruned)
        actual = float(loss(updated.unsqueeze(0))[0]) - loss.base
        record["groups"][f"{fraction:g}"] = {"actual": actual, "predicted": predicted,
                                             "ratio": predicted / actual if actual > 0 else math.nan}
    return record


# ----------------------------------------------------------------------------- the study
def positive_part(hessian: Tensor) -> tuple[Tensor, dict[str, float]]:
    """``H₊`` (negative eigenvalues set to 0) and H's spectrum summary."""
    eigvals, eigvecs = torch.linalg.eigh(hessian)
    spectrum = {"min_eig": float(eigvals[0]), "max_eig": float(eigvals[-1]),
                "negative_mass": float(eigvals.clamp_max(0).abs().sum() / eigvals.abs().sum())}
    return (eigvecs * eigvals.clamp_min(0)) @ eigvecs.T, spectrum


def study_block(model: nn.Sequential, block: Block, curv: tuple[Tensor, Tensor], n_grid: list[int],
                damp: float, sample_size: int, seed: int) -> dict[str, Any]:
    cl = require_curvlinops()
    x, y = curv
    layer = linear_at(model, block.index)
    idx = block_indices(model, block)
    numel = layer.weight.numel()
    loss_fn = nn.CrossEntropyLoss()
    # The layers before the block are fixed: curvlinops sees the rest of the network and its inputs
    # (the same block of the same Hessian, without re-running the 784-wide first layer per column).
    suffix = model[block.index :]
    with torch.no_grad():
        inputs = model[: block.index](x)
    data = batches(inputs, y)
    t0 = time.perf_counter()
    hessian = operator_block(
        cl.HessianLinearOperator(suffix, loss_fn, [layer.weight], data, check_deterministic=False), numel, idx)
    true_fisher = operator_block(
        cl.GGNLinearOperator(suffix, loss_fn, [layer.weight], data, check_deterministic=False), numel, idx)
    log(f"  {block.label}: exact Hessian and true Fisher of {len(idx)} weights in {time.perf_counter() - t0:.1f} s")
    hessian, spectrum = positive_part(hessian)
    exact_inverse = damped_inverse(hessian, damp)
    loss = BlockLoss(model, block, x, y, idx)
    w = loss.block_weights()
    exact_stat = obs_statistic(w, exact_inverse)
    sample = torch.randperm(len(idx), generator=torch.Generator().manual_seed(seed))[:sample_size]

    result: dict[str, Any] = {"block": block.label, "weights": len(idx), "damp": damp, "hessian": spectrum,
                              "curves": {}, "methods": {}}
    result["methods"]["exact Hessian"] = evaluate_method(exact_inverse, exact_inverse, loss, sample, exact_stat)
    result["methods"]["true Fisher"] = evaluate_method(damped_inverse(true_fisher, damp), exact_inverse, loss, sample,
                                                       exact_stat)
    identity = torch.eye(len(idx), dtype=torch.float64)
    result["methods"]["magnitude"] = evaluate_method(identity, None, loss, sample, exact_stat)

    grads = per_sample_gradients(model, block, x, y, idx)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed + 1))
    for n in n_grid:
        chosen = order[:n]
        g = grads[chosen]
        woodfisher = BlockFisherInverse.from_gradients(g, block_size=len(idx), damp=damp, dtype=torch.float64).dense()
        diag_acc = DiagonalAccumulator(len(idx), dtype=torch.float64)
        diag_acc.add(g)
        diagonal = torch.diag(1.0 / diag_acc.fisher_diag(damp))
        kfac_op = cl.KFACLinearOperator(suffix, loss_fn, [layer.weight], batches(inputs[chosen], y[chosen]),
                                        fisher_type="type-2", check_deterministic=False)
        kfac = damped_inverse(operator_block(kfac_op, numel, idx), damp)
        for name, inverse in (("WoodFisher", woodfisher), ("diagonal Fisher", diagonal), ("K-FAC", kfac)):
            record = evaluate_method(inverse, exact_inverse, loss, sample, exact_stat)
            result["curves"].setdefault(name, []).append({"n": n, **record})
            if n == n_grid[-1]:
                result["methods"][name] = record
        log(f"  {block.label}: N={n} done ({time.perf_counter() - t0:.1f} s)")
    return result


def block_table(results: list[dict[str, Any]], n_max: int, damp: float) -> str:
    header = ["block", "method", "inv err", "stat ρ", "single ρ", "single median rel err",
              *[f"group ΔL {f:.0%}" for f in GROUP_FRACTIONS], "pred/actual 50%"]
    rows = []
    for res in results:
        for name in ("exact Hessian", *METHODS):
            m = res["methods"][name]
            name = "exact Hessian H₊" if name == "exact Hessian" else name
            groups = m["groups"]
            rows.append([
                f"{res['block']} ({res['weights']})", name,
                "—" if m["inv_err"] is None else f"{m['inv_err']:.3f}",
                f"{m['stat_spearman']:.3f}", f"{m['single_spearman']:.3f}", f"{m['single_median_rel_err']:.2f}",
                *[f"{groups[f'{f:g}']['actual']:.4f}" for f in GROUP_FRACTIONS],
                f"{groups['0.5']['ratio']:.2f}",
            ])
    spectra = "; ".join(f"{r['block']}: eigenvalues {r['hessian']['min_eig']:.2g} to {r['hessian']['max_eig']:.2g}, "
                        f"{r['hessian']['negative_mass']:.1%} of |eigenvalue| mass negative" for r in results)
    note = (f"WoodFisher, K-FAC and diagonal Fisher use N = {n_max:,} samples; the true Fisher and the exact Hessian "
            "use the whole curvature set; magnitude is the identity curvature (no update). Reference: the exact "
            f"Hessian's positive part H₊; every matrix dampened by λ = {damp:g}. Exact Hessians: {spectra}. "
            "ΔL: actual increase of the mean training loss over the curvature set (can be negative: the trained "
            "network is not exactly at a minimum).\n\n")
    return note + markdown_table(header, rows)


def n_table(results: list[dict[str, Any]], n_grid: list[int]) -> str:
    """The sample-based methods at the pipeline's N beside the largest N (the main table's)."""
    ns = sorted({n for n in (PIPELINE_N, n_grid[-1]) if n in n_grid})
    header = ["block", "method", *[f"{metric} N = {n:,}" for metric in ("inv err", "stat ρ", "group ΔL 50%")
                                   for n in ns]]
    rows = []
    for res in results:
        for name in CURVE_METHODS:
            at = {p["n"]: p for p in res["curves"][name]}
            rows.append([f"{res['block']} ({res['weights']})", name,
                         *[f"{at[n]['inv_err']:.3f}" for n in ns], *[f"{at[n]['stat_spearman']:.3f}" for n in ns],
                         *[f"{at[n]['groups']['0.5']['actual']:.4f}" for n in ns]])
    return (f"**At the pipeline's N = {PIPELINE_N:,}** (the default recipe's gradients per pruning step) beside "
            f"N = {n_grid[-1]:,}: the same measures for the methods that use N samples.\n\n"
            + markdown_table(header, rows))


def plot_curves(results: list[dict[str, Any]], layer: str) -> Any:
    fig, axes = new_figure(ncols=3, size=(4.6, 3.6))
    res = next(r for r in results if r["block"] == layer)
    panels = (("inv_err", "relative Frobenius error of inverse", True),
              ("stat_spearman", "Spearman ρ of OBS statistic vs exact", False),
              ("group50", "actual ΔL, 50% of block removed", True))
    for ax, (key, title, log_y) in zip(axes[0], panels, strict=True):
        for name in CURVE_METHODS:
            points = res["curves"][name]
            values = [p["groups"]["0.5"]["actual"] if key == "group50" else p[key] for p in points]
            ax.plot([p["n"] for p in points], values, marker="o", label=name)
        reference = res["methods"]["true Fisher"]
        ref = reference["groups"]["0.5"]["actual"] if key == "group50" else reference[key]
        ax.axhline(ref, color="grey", linestyle="--", label="true Fisher (exact)")
        if key == "group50":
            ax.axhline(res["methods"]["exact Hessian"]["groups"]["0.5"]["actual"], color="black", linestyle=":",
                       label="exact Hessian H₊")
        ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel("N (gradients / samples)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"RQ1: inverse-Hessian approximations vs the exact Hessian, MLP block {layer}", fontsize=10)
    return fig


def main() -> None:
    parser = study_parser(__doc__)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--damp", type=float, default=1e-3, help="dampening λ added to every curvature matrix")
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(args.seed)
    if args.quick:
        curvature_size, n_grid, epochs, sample_size = 1000, [10, 100, 1000], 2, 100
        blocks = [Block("fc2", 2), Block("fc3", 4)]
    else:
        curvature_size, n_grid, epochs, sample_size = 10_000, [10, 30, 100, 300, 1000, 3000, 10_000], 20, 300
        blocks = [Block("fc2", 2), Block("fc3", 4)]
    x_train, y_train, x_curv, y_curv, x_test, y_test = load_tensors(curvature_size, args.seed)
    model = train_mlp(x_train, y_train, epochs, args.seed)
    test_acc = accuracy(model, x_test, y_test)
    log(f"MLP 784-40-20-10 (tanh): test accuracy {test_acc:.4f} after {epochs} epochs")
    results = [study_block(model, b, (x_curv, y_curv), n_grid, args.damp, sample_size, args.seed) for b in blocks]

    markdown = (f"MLP 784-40-20-10 (tanh) trained {epochs} epochs on Fashion-MNIST: test accuracy {test_acc:.2%}. "
                f"Curvature set: {curvature_size:,} training images.\n\n" + block_table(results, n_grid[-1], args.damp)
                + "\n" + n_table(results, n_grid))
    curve_layer = "fc2"
    summary = {}
    for res in results:
        summary[res["block"]] = {name: {"inv_err": m["inv_err"], "stat_spearman": m["stat_spearman"],
                                        "single_spearman": m["single_spearman"],
                                        "group50_actual": m["groups"]["0.5"]["actual"]}
                                 for name, m in res["methods"].items()}
    payload = {"quick": args.quick, "damp": args.damp, "test_accuracy": test_acc, "curvature_size": curvature_size,
               "n_grid": n_grid, "pipeline_n": PIPELINE_N,
               "epochs": epochs, "curve_layer": curve_layer, "summary": summary, "blocks": results}
    save_outputs(args.out, "rq1_hessian_quality", markdown, payload, plot_curves(results, curve_layer), started)


if __name__ == "__main__":
    main()
