"""RQ3: does second-order information give better accuracy after gradual pruning? And generalisation?

The default recipe (recipes/default.yaml: ResNet-20 on Fashion-MNIST, cubic schedule, conv1 and fc
dense) runs its whole pruning stage with WoodFisher, with global magnitude and with K-FAC OBS (the
gradual second-order baseline), changing nothing but the method, at 90/95/98% and over seeds (the
recipe's seed: data order and Fisher draws). To fit the studies' one-hour budget the fine-tuning
budget is reduced by default (the table says by how much); ``--full`` runs the default recipe's own
budget (its 1,800 optimizer steps, schedule and N) over 3 seeds and writes ``rq3_gradual_full.*``
beside the reduced study. Every method gets exactly the same.

Validation split: 5,000 training images are held out before anything runs (a fixed draw, the same
for every run): fine-tuning and the Fisher pool use only the rest, so the split is disjoint from the
test set, from the training data and from the Fisher samples. Every choice the study makes is made on
it, never on test accuracy: with ``--grid KEY=V1,V2`` (a recipe override, e.g. the damping
``pruning.woodfisher.damp``) each value is run, and per method and target the value with the best mean
validation accuracy over seeds is reported; a ``pruning.woodfisher.*`` grid applies to the methods that
use those settings (WoodFisher, K-FAC), any other key to every method (the table counts the
configurations each method was given). The final models are evaluated on the validation split, on
the whole test set and on a fixed subset of the training images they were trained on (no
augmentation) for the train/test gap.

``--work-dir DIR`` writes each (method, target, seed, configuration) as its own JSON file there and
reuses the files it finds, so the study can be split over processes (each with ``--methods``,
``--targets`` or ``--seeds`` a part of the grid) and resumed; a last call over the whole grid assembles
the table.

    python benchmarks/research/rq3_gradual.py           # 3 targets x 2 seeds x 3 methods, reduced budget
    python benchmarks/research/rq3_gradual.py --quick   # 90% only, 1 seed, a few optimizer steps
    python benchmarks/research/rq3_gradual.py --work-dir /tmp/rq3 --methods kfac --seeds 1   # one part
    python benchmarks/research/rq3_gradual.py --full --work-dir results/rq3_full_cells --targets 0.98 --seeds 0
"""
from __future__ import annotations

import dataclasses
import itertools
import multiprocessing
import re
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
    CellStore,
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

from wf_pipeline.data import DataBundle, build_data  # noqa: E402
from wf_pipeline.data.loaders import TensorBatches  # noqa: E402
from wf_pipeline.data.sources import TensorSplit  # noqa: E402
from wf_pipeline.models import build_model  # noqa: E402
from wf_pipeline.recipe.loader import load_recipe, parse_override  # noqa: E402
from wf_pipeline.recipe.schema import DataConfig  # noqa: E402
from wf_pipeline.runtime.device import seed_everything  # noqa: E402
from wf_pipeline.runtime.rundir import RunDir  # noqa: E402
from wf_pipeline.training.epoch import evaluate  # noqa: E402
from wf_pipeline.training.gradual import run_pruning_stage  # noqa: E402

METHODS = ("magnitude", "woodfisher", "kfac")
LABELS = {"magnitude": "global magnitude", "woodfisher": "WoodFisher", "kfac": "K-FAC OBS"}
USES_FISHER_SETTINGS = ("woodfisher", "kfac")  # the methods pruning.woodfisher.* settings apply to
FULL = {"finetune.epochs": 4, "finetune.steps_per_epoch": 60, "pruning.schedule.end_epoch": 2,
        "pruning.woodfisher.num_grads": 500, "data.test_subset": 1000}
QUICK = {"finetune.epochs": 2, "finetune.steps_per_epoch": 8, "pruning.schedule.end_epoch": 1,
         "pruning.woodfisher.num_grads": 64, "data.test_subset": 200}
VALIDATION_IMAGES, VALIDATION_SEED = 5000, 1234
QUICK_VALIDATION_IMAGES = 500


@dataclasses.dataclass
class Carved:
    """A run's data with a validation split held out of the training set, and the indices of each part
    (into the full training split)."""

    data: DataBundle
    validation: TensorSplit
    validation_idx: torch.Tensor
    train_idx: torch.Tensor
    fisher_idx: torch.Tensor


def carve_validation(data: DataBundle, size: int, seed: int = VALIDATION_SEED) -> Carved:
    """Hold out `size` training images (a draw fixed by `seed`, the same for every run and method).

    Fine-tuning (the bundle's training split) and the Fisher pool are drawn from the rest only; the
    pool is drawn as :func:`wf_pipeline.data.build_data` draws it (``data.fisher_pool`` images, seed + 2).
    """
    train = data.train_split
    assert train is not None and not data.cfg.fisher_samples_per_class
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed))
    validation_idx, train_idx = order[:size].sort().values, order[size:].sort().values
    pool = data.cfg.fisher_pool
    if pool is not None and pool < len(train_idx):
        draw = torch.randperm(len(train_idx), generator=torch.Generator().manual_seed(data.seed + 2))[:pool]
        fisher_idx = train_idx[draw.sort().values]
    else:
        fisher_idx = train_idx

    def split(idx: torch.Tensor) -> TensorSplit:
        return TensorSplit(train.images[idx], train.labels[idx])

    carved = dataclasses.replace(data, train_split=split(train_idx), fisher_split=split(fisher_idx))
    return Carved(carved, split(validation_idx), validation_idx, train_idx, fisher_idx)


def final_evaluation(model: torch.nn.Module, carved: Carved, test_images: int | None,
                     train_images: int) -> dict[str, float]:
    """Accuracy on the validation split, the test set and a fixed subset of the training images the run used
    (no augmentation)."""
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=test_images), seed=0)
    assert data.preprocess is not None
    train = carved.data.train_split
    assert train is not None
    idx = torch.randperm(len(train), generator=torch.Generator().manual_seed(123))[:train_images]
    device = torch.device("cpu")
    model.eval()

    def accuracy(split: TensorSplit) -> float:
        return evaluate(model, TensorBatches(split.images, split.labels, data.preprocess, 500), device)[0]  # type: ignore[arg-type]

    return {"validation_accuracy": accuracy(carved.validation),
            "train_accuracy": accuracy(TensorSplit(train.images[idx], train.labels[idx])),
            "test_accuracy": evaluate(model, data.test_batches(), device)[0]}


FULL_GRID: dict[str, list[Any]] = {"targets": [0.9, 0.95, 0.98], "seeds": [0, 1], "methods": list(METHODS)}
FULL_BUDGET_GRID: dict[str, list[Any]] = {**FULL_GRID, "seeds": [0, 1, 2]}
# the settings the reduced budget changes; --full takes them from the default recipe itself
BUDGET_FIELDS = ("finetune.epochs", "finetune.steps_per_epoch", "pruning.schedule.end_epoch",
                 "pruning.woodfisher.num_grads")


def recipe_budget() -> dict[str, Any]:
    """The default recipe's own fine-tuning budget, schedule and N (what ``--full`` runs)."""
    return recipe_values(list(BUDGET_FIELDS), {})


def configurations(method: str, grid: dict[str, list[str]],
                   base: dict[str, Any] | None = None) -> list[dict[str, str]]:
    """Every assignment of the grid's values that applies to `method` (one empty one without a grid).

    A value equal to the recipe's own (`base`: key -> the value the runs get without the grid) is left out
    of the assignment, so the recipe's setting is the "default" run, shared with runs without that grid.
    """
    keys = [k for k in grid if not k.startswith("pruning.woodfisher.") or method in USES_FISHER_SETTINGS]
    out: list[dict[str, str]] = []
    for values in itertools.product(*(grid[k] for k in keys)):
        config = {k: v for k, v in zip(keys, values, strict=True) if not _same_value(v, (base or {}).get(k))}
        if config not in out:
            out.append(config)
    return out


def _same_value(given: str, current: Any) -> bool:
    """Whether the grid's text `given` names the value `current`, read as ``--set`` reads it (YAML: true, 0.01),
    numbers compared as numbers (YAML reads 1e-3 as text)."""
    if current is None:
        return False
    value = parse_override(f"grid={given}")[1]
    if value == current:
        return True
    try:
        return float(given) == float(current)
    except (TypeError, ValueError):
        return False


def recipe_values(keys: list[str], overrides: dict[str, Any]) -> dict[str, Any]:
    """What each dotted recipe key is in the default recipe with the study's budget `overrides`."""
    recipe = load_recipe(REPO / "recipes" / "default.yaml", [f"{k}={v}" for k, v in overrides.items()])[0]
    values: dict[str, Any] = {}
    for key in keys:
        value: Any = recipe
        for part in key.split("."):
            value = getattr(value, part, None)
        values[key] = value
    return values


def config_name(config: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in config.items()) or "default"


def after_step(report: Any) -> float | None:
    """A pruning step's test accuracy right after it (a record or a dict, as metrics hold them)."""
    return report.get("test_accuracy_after") if isinstance(report, dict) else getattr(report, "test_accuracy_after",
                                                                                        None)


def run_one(method: str, target: float, seed: int, config: dict[str, str], budget: dict[str, Any], root: Path,
            sizes: tuple[int | None, int, int], units: UnitLog | CellStore,
            threads: int | None = None) -> dict[str, Any]:
    """One gradual-pruning run and its final evaluation, logged to `units` (a resumed run reuses it)."""
    key = f"{method}|{target:g}|{seed}|{config_name(config)}"
    if key in units.done:
        return units.done[key]
    set_threads(threads)
    overrides = [f"{k}={v}" for k, v in {**budget, **config}.items()]
    # the accuracy right after each pruning step (recipes monitor nothing by default; it changes no weight)
    overrides += ["evaluation.monitor=pruning_steps"]
    overrides += [f"pruning.method={method}", f"pruning.final_sparsity={target}", f"seed={seed}",
                  f"output.root={root}", f"output.run_name={method}-{int(target * 1000)}-{seed}"]
    recipe, _ = load_recipe(REPO / "recipes" / "default.yaml", overrides)
    seed_everything(recipe.seed, recipe.deterministic)
    test_images, train_images, validation_images = sizes
    carved = carve_validation(build_data(recipe.data, recipe.seed), validation_images)
    model = build_model(recipe.model)
    run = RunDir(root / f"{recipe.run_name()}-{re.sub(r'[^A-Za-z0-9.=-]+', '_', config_name(config))}")
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    result = run_pruning_stage(recipe, run, model, carved.data, torch.device("cpu"))
    acc = final_evaluation(result.model, carved, test_images, train_images)
    row = {"method": method, "target": target, "seed": seed, "config": config, "sparsity": result.metrics.sparsity,
           **acc, "gap": acc["train_accuracy"] - acc["test_accuracy"],
           "accuracy_after_steps": [after_step(r) for r in result.metrics.prune_reports or []],
           # where each method put the sparsity (global ranking sets it per layer): for the "why" of the table
           "per_layer_sparsity": dict(result.metrics.per_layer_sparsity or {}),
           "wall_s": time.perf_counter() - started}
    units.add(key, row)
    log(f"  {method} -> {target:.0%} seed {seed} [{config_name(config)}]: validation {acc['validation_accuracy']:.4f}, "
        f"test {acc['test_accuracy']:.4f}, train {acc['train_accuracy']:.4f} ({row['wall_s']:.0f} s)")
    return row


def choose(rows: list[dict[str, Any]], method: str, target: float) -> tuple[dict[str, str], int]:
    """The configuration of `method` at `target` with the best mean validation accuracy over seeds (never test),
    and how many were tried. Only configurations run with as many seeds as the most-run one compete (a partly
    run grid cannot win on fewer seeds)."""
    mine = [r for r in rows if r["method"] == method and r["target"] == target]
    names = {config_name(r["config"]): r["config"] for r in mine}
    seeds = {n: len({r["seed"] for r in mine if config_name(r["config"]) == n}) for n in names}
    complete = [n for n in names if seeds[n] == max(seeds.values())]
    best = max(complete, key=lambda n: (mean_std([r["validation_accuracy"] for r in mine
                                                  if config_name(r["config"]) == n])[0], n))
    return names[best], len(names)


def chosen_rows(rows: list[dict[str, Any]], targets: list[float]) -> list[dict[str, Any]]:
    """Per method and target only the runs of the configuration chosen on the validation split."""
    out = []
    for target in targets:
        for method in METHODS:
            if any(r["method"] == method and r["target"] == target for r in rows):
                config, _ = choose(rows, method, target)
                out += [r for r in rows if r["method"] == method and r["target"] == target and r["config"] == config]
    return out


def table(rows: list[dict[str, Any]], targets: list[float], dense: dict[str, float]) -> str:
    body: list[list[Any]] = [["dense", "0%", pm([dense["validation_accuracy"]]), pm([dense["test_accuracy"]]),
                              pm([dense["train_accuracy"]]),
                              f"{100 * (dense['train_accuracy'] - dense['test_accuracy']):+.2f}", "", ""]]
    for target in targets:
        for method in METHODS:
            sel = [r for r in rows if r["method"] == method and r["target"] == target]
            if sel:
                config, tried = choose(rows, method, target)
                sel = [r for r in sel if r["config"] == config]
                body.append([LABELS[method], f"{target:.0%}", pm([r["validation_accuracy"] for r in sel]),
                             pm([r["test_accuracy"] for r in sel]), pm([r["train_accuracy"] for r in sel]),
                             pm([r["gap"] for r in sel]), len(sel),
                             f"{config_name(config)} (of {tried})" if tried > 1 else "—"])
    header = ["method", "target", "validation accuracy (%)", "test accuracy (%)", "train accuracy (%)",
              "train − test (points)", "seeds", "chosen on validation"]
    return markdown_table(header, body)


def ablation_table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    """Every configuration each method was run with (the grid), validation and test accuracy: empty without one."""
    body: list[list[Any]] = []
    for target in targets:
        for method in METHODS:
            mine = [r for r in rows if r["method"] == method and r["target"] == target]
            names = list(dict.fromkeys(config_name(r["config"]) for r in mine))
            if len(names) < 2:
                continue
            chosen = config_name(choose(rows, method, target)[0])
            for name in names:
                sel = [r for r in mine if config_name(r["config"]) == name]
                body.append([LABELS[method], f"{target:.0%}", name + (" (chosen)" if name == chosen else ""),
                             pm([r["validation_accuracy"] for r in sel]), pm([r["test_accuracy"] for r in sel]),
                             len(sel)])
    if not body:
        return ""
    header = ["method", "target", "configuration", "validation accuracy (%)", "test accuracy (%)", "seeds"]
    return "\n\nEvery configuration tried (chosen on validation accuracy only):\n\n" + markdown_table(header, body)


def after_steps_table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    """Mean test accuracy right after each pruning step (the monitored test images, before fine-tuning resumes)
    and at the end, for the chosen runs: how much each step costs and how much fine-tuning wins back."""
    chosen = chosen_rows(rows, targets)
    steps = max((len(r.get("accuracy_after_steps") or []) for r in chosen), default=0)
    if not steps:
        return ""
    body: list[list[Any]] = []
    for target in targets:
        for method in METHODS:
            sel = [r for r in chosen if r["method"] == method and r["target"] == target]
            if sel:
                cells = [pm([r["accuracy_after_steps"][k] for r in sel
                             if len(r.get("accuracy_after_steps") or []) > k
                             and r["accuracy_after_steps"][k] is not None]) for k in range(steps)]
                body.append([LABELS[method], f"{target:.0%}", *cells, pm([r["test_accuracy"] for r in sel])])
    header = ["method", "target", *[f"after step {k + 1}" for k in range(steps)], "final (all test images)"]
    return ("\n\nTest accuracy (%) right after each pruning step (the run's monitored test images), then at the "
            "end of fine-tuning:\n\n" + markdown_table(header, body))


def allocation_table(rows: list[dict[str, Any]], targets: list[float]) -> str:
    """Mean sparsity (%) global ranking gave each layer, per method and target (chosen runs that recorded it)."""
    chosen = [r for r in chosen_rows(rows, targets) if r.get("per_layer_sparsity")]
    columns = [(m, t) for t in targets for m in METHODS
               if any(r["method"] == m and r["target"] == t for r in chosen)]
    if not columns:
        return ""
    layers = list(dict.fromkeys(name for r in chosen for name in r["per_layer_sparsity"]))
    body = [[name, *[pm([r["per_layer_sparsity"][name] for r in chosen
                         if r["method"] == m and r["target"] == t and name in r["per_layer_sparsity"]])
                     for m, t in columns]] for name in layers]
    header = ["layer", *[f"{LABELS[m]} {t:.0%}" for m, t in columns]]
    return ("\n\nSparsity (%) of each layer as global ranking set it (mean ± std over the runs that recorded "
            "it):\n\n" + markdown_table(header, body))


def plot(rows: list[dict[str, Any]], targets: list[float], dense: dict[str, float]) -> Any:
    fig, axes = new_figure(ncols=2, size=(5.0, 3.6))
    for key, ax, title in (("test_accuracy", axes[0][0], "test accuracy after gradual pruning"),
                           ("gap", axes[0][1], "train − test accuracy (generalisation gap)")):
        for method in METHODS:
            if not any(r["method"] == method for r in rows):
                continue
            stats = [mean_std([r[key] for r in rows if r["method"] == method and r["target"] == t]) for t in targets]
            ax.errorbar(targets, [m for m, _ in stats], yerr=[s for _, s in stats], marker="o", capsize=3,
                        label=LABELS[method])
        gap = dense["train_accuracy"] - dense["test_accuracy"]
        ax.axhline(dense["test_accuracy"] if key == "test_accuracy" else gap, color="grey", linestyle="--",
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
    parser.add_argument("--methods", nargs="+", choices=METHODS, help="a subset of the methods (output marked reduced)")
    parser.add_argument("--grid", nargs="+", default=[], metavar="KEY=V1,V2",
                        help="recipe settings to choose on the validation split, "
                             "e.g. pruning.woodfisher.damp=1e-3,1e-5")
    parser.add_argument("--full", action="store_true",
                        help="the default recipe's whole budget (1,800 optimizer steps) over 3 seeds: hours; "
                             "writes rq3_gradual_full.*; split it with --work-dir")
    parser.add_argument("--no-run", action="store_true",
                        help="with --work-dir: assemble the table from the runs already there, run nothing (the "
                             "output names the missing ones)")
    parser.add_argument("--work-dir", type=Path,
                        help="one JSON file per finished run here, reused when present (split the study over "
                             "processes, resume it)")
    args = parser.parse_args()
    started = time.perf_counter()
    sizes: tuple[int | None, int, int]
    full_grid = FULL_BUDGET_GRID if args.full else FULL_GRID
    if args.quick:
        targets, seeds, methods, budget = [0.9], [0], list(METHODS), QUICK
        sizes = (500, 500, QUICK_VALIDATION_IMAGES)
    else:
        targets, seeds, methods = full_grid["targets"], full_grid["seeds"], full_grid["methods"]
        budget = recipe_budget() if args.full else FULL
        sizes = (None, 5000, VALIDATION_IMAGES)
    targets, seeds, methods = args.targets or targets, args.seeds or seeds, args.methods or methods
    grid = {key: values.split(",") for key, values in (item.split("=", 1) for item in args.grid)}
    base = recipe_values(list(grid), budget)  # a grid value equal to the recipe's is its default run
    config = {"quick": args.quick, "budget": budget, "sizes": sizes, "validation_seed": VALIDATION_SEED}
    units: UnitLog | CellStore = (CellStore(args.work_dir, config) if args.work_dir
                                  else UnitLog(args.out, "rq3_gradual", config, args.resume))
    resumed = len(units.done)
    if "dense" not in units.done:  # accuracy of the dense model, logged like a run
        recipe = load_recipe(REPO / "recipes" / "default.yaml", [f"{k}={v}" for k, v in budget.items()])[0]
        carved = carve_validation(build_data(recipe.data, recipe.seed), sizes[2])
        units.done["dense"] = final_evaluation(build_model(recipe.model), carved, sizes[0], sizes[1])
        units.add("dense", units.done["dense"])
    dense = units.done["dense"]
    jobs = [(method, target, seed, cfg) for target in targets for seed in seeds for method in METHODS
            if method in methods for cfg in configurations(method, grid, base)]
    todo = [job for job in jobs if f"{job[0]}|{job[1]:g}|{job[2]}|{config_name(job[3])}" not in units.done]
    missing = []
    if args.no_run:  # assemble what the work folder holds; name what is missing
        missing = [f"{LABELS[m]} {t:.0%} seed {s_} [{config_name(c)}]" for m, t, s_, c in todo]
        jobs = [job for job in jobs if job not in todo]
        todo = []
        if missing:
            log(f"[no-run] {len(missing)} runs of the grid are missing: {'; '.join(missing)}")
    workers = min(args.workers, len(todo))
    with tempfile.TemporaryDirectory(prefix="wf-rq3-") as tmp:
        if workers > 1:
            # spawn: fresh interpreters, no forked OpenMP state; every run is deterministic whatever the order.
            with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                futures = [pool.submit(run_one, m, t, s, c, budget, Path(tmp), sizes, units, 1) for m, t, s, c in jobs]
                rows = [f.result() for f in futures]
        else:
            rows = [run_one(m, t, s, c, budget, Path(tmp), sizes, units) for m, t, s, c in jobs]
    steps = budget["finetune.epochs"] * budget["finetune.steps_per_epoch"]
    reduced = None if args.quick else reduction(full_grid, {"targets": targets, "seeds": seeds, "methods": methods})
    if missing:
        not_run = f"{len(missing)} runs of the grid not run yet: " + "; ".join(missing)
        reduced = f"{reduced}; {not_run}" if reduced else not_run
    tried = {m: len(configurations(m, grid, base)) for m in methods}
    kind = "the default recipe's own budget" if args.full else "reduced budget for the studies"
    note = (f"Gradual pruning with recipes/default.yaml, only the method changed; {kind}: "
            f"{budget['finetune.epochs']} fine-tuning epochs of {budget['finetune.steps_per_epoch']} steps "
            f"({steps} optimizer steps; the default recipe has 1,800), "
            f"pruning steps at epochs 0..{budget['pruning.schedule.end_epoch']:g}, "
            f"N = {budget['pruning.woodfisher.num_grads']} gradients per WoodFisher and K-FAC step. Validation: "
            f"{sizes[2]:,} training images held out of fine-tuning and the Fisher pool; "
            + (f"configurations chosen on it ({', '.join(f'{LABELS[m]} {n}' for m, n in tried.items())}); "
               if grid else "no setting was tuned (the recipe's, as given); ")
            + f"test accuracy on {'all 10,000' if sizes[0] is None else f'{sizes[0]:,}'} test images, train "
            f"accuracy on {sizes[1]:,} fixed training images of the runs' own (no augmentation); mean ± std over "
            f"seeds." + (f" **Reduced run**: {reduced}." if reduced else "") + "\n\n")
    chosen = chosen_rows(rows, targets)

    def mean_of(key: str, m: str, t: float) -> float:
        return mean_std([r[key] for r in chosen if r["method"] == m and r["target"] == t])[0]

    present = [m for m in METHODS if m in methods]
    summary = {f"{m}_{int(round(t * 100))}": mean_of("test_accuracy", m, t) for m in present for t in targets}
    summary.update({f"{m}_gap_{int(round(t * 100))}": mean_of("gap", m, t) for m in present for t in targets})
    summary.update({f"{m}_validation_{int(round(t * 100))}": mean_of("validation_accuracy", m, t)
                    for m in present for t in targets})
    payload = {"quick": args.quick, "reduced": reduced, "resumed_units": resumed, "budget": budget, "targets": targets,
               "seeds": seeds, "methods": present, "grid": grid, "validation_images": sizes[2],
               "dense": dense, "summary": summary, "chosen": {f"{r['method']}|{r['target']:g}": r["config"]
                                                               for r in chosen},
               "rows": rows}
    details = ablation_table(rows, targets) + after_steps_table(rows, targets) + allocation_table(rows, targets)
    save_outputs(args.out, "rq3_gradual_full" if args.full else "rq3_gradual", note + table(rows, targets, dense)
                 + (details if args.full else ""),
                 payload | {"full_budget": args.full}, plot(chosen, targets, dense), started)
    units.finish()


if __name__ == "__main__":
    main()
