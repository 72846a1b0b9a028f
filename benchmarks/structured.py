"""Structured pruning of the bundled ResNet-20 (Fashion-MNIST): WoodFisher group OBS vs the baselines.

Every method runs the whole pruning stage of ``recipes/structured.yaml`` (50% of the channels removed,
the default recipe's fine-tuning budget: same epochs, steps, learning rate and schedule), the
removed channels are cut out (Torch-Pruning surgery, checked lossless) and each model is exported to
ONNX. The script prints, in one run:

* test accuracy (full test set) of the dense model and of each method, and the drop vs dense;
* ONNX Runtime p50 latency at batch 1 and 32 of every model, all sessions timed interleaved
  (alternating single runs, order flipped each round), and the ratio to dense;
* conv/linear MACs ("FLOPs") and parameters read from each ONNX file.

Targets (issue 8): WoodFisher latency <= 0.5x dense at batch 32; WoodFisher accuracy >= every
baseline; WoodFisher drop vs dense <= 1.5 points. The last stdout line is one JSON object.

    python benchmarks/structured.py                 # full run (all four methods, full budget)
    python benchmarks/structured.py --quick         # tiny budget, test subset (a minute or two, quiet)
    python benchmarks/structured.py --work-dir D    # keep each model in D; a rerun reuses finished ones
    python benchmarks/structured.py --readme README.md          # also write the README table
    python benchmarks/structured.py --from-json run.json --readme README.md   # table from a saved run
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

import wf_pipeline  # noqa: F401  - first: it sets OMP_WAIT_POLICY before torch loads
from benchmarks._shared import cpu_model, interleaved_p50, load_average, set_threads
from wf_pipeline.data import build_data
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.models import build_model
from wf_pipeline.pruning.structured import remove_pruned_channels
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.runtime.atomic_io import write_text
from wf_pipeline.runtime.device import resolve_device, seed_everything
from wf_pipeline.runtime.progress import NullReporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.epoch import evaluate
from wf_pipeline.training.gradual import run_pruning_stage

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "structured.yaml"
METHODS = ["woodfisher", "magnitude", "taylor", "group_norm"]
LABELS = {"dense": "dense", "woodfisher": "WoodFisher (group OBS)", "magnitude": "L1 filter norm",
          "taylor": "Taylor (Torch-Pruning)", "group_norm": "group norm (Torch-Pruning)"}
QUICK = ["finetune.epochs=2", "finetune.steps_per_epoch=8", "pruning.schedule.end_epoch=1",
         "pruning.woodfisher.num_grads=64", "data.test_subset=1000"]
TARGETS = {"latency_ratio_b32": 0.5, "max_drop": 0.015}
BEGIN, END = "<!-- structured-benchmark:begin -->", "<!-- structured-benchmark:end -->"


class PrintReporter(NullReporter):
    def __init__(self, prefix: str, verbose: bool) -> None:
        self.prefix, self.verbose = prefix, verbose

    def message(self, text: str) -> None:
        if self.verbose:
            print(f"  [{self.prefix}] {text}", flush=True)


def prune_one(method: str, overrides: list[str], root: Path, verbose: bool,
              resume: bool = False) -> tuple[dict[str, Any], Path]:
    """The structured recipe's pruning stage with `method`, surgery, ONNX export; the row and the file.

    With `resume` an interrupted stage in `root` continues from its last checkpoint."""
    # the accuracy right after each pruning step is part of the row (recipes measure only the ends by default)
    recipe, _ = load_recipe(RECIPE, ["evaluation.monitor=pruning_steps", *overrides, f"pruning.method={method}",
                                     f"output.root={root}", f"output.run_name={method}"])
    seed_everything(recipe.seed, recipe.deterministic)
    device = resolve_device(recipe.device)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model).to(device)
    run = RunDir(root / recipe.run_name())
    resumed = resume and (run.checkpoints / "gradual_state.pt").exists()
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    stage = run_pruning_stage(recipe, run, model, data, device, reporter=PrintReporter(method, verbose),
                              resume=resume)
    wall = time.perf_counter() - started
    surgery = remove_pruned_channels(stage.model, stage.masks.masks, data.sample_input(2))
    path = root / f"{method}.onnx"
    exported = export_onnx(stage.model.cpu().eval(), data.sample_input(2), path, sparse_storage=False)
    m = stage.metrics
    assert m.prune_reports is not None and m.timings is not None
    row = {
        "method": method,
        "accuracy": m.final_accuracy,
        "dense_accuracy": m.initial_accuracy,
        "channel_sparsity": m.sparsity,
        "macs": exported.structure["macs"],
        "params": exported.structure["params"],
        "channels_after": surgery.channels_after,
        "surgery_max_output_change": surgery.max_output_change,
        "accuracy_after_each_step": [r.test_accuracy_after for r in m.prune_reports],
        "wall_s": wall,  # of this process only when resumed
        "resumed": resumed,
        "prune_s": m.timings["prune_s"],
        "finetune_s": m.timings["finetune_s"],
    }
    return row, path


def dense_model_file(overrides: list[str], root: Path) -> tuple[dict[str, Any], Path]:
    recipe, _ = load_recipe(RECIPE, overrides)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model).eval()
    accuracy, _ = evaluate(model, data.test_batches(), torch.device("cpu"))
    exported = export_onnx(model, data.sample_input(2), root / "dense.onnx", sparse_storage=False)
    return {"method": "dense", "accuracy": accuracy, "macs": exported.structure["macs"],
            "params": exported.structure["params"]}, exported.path


def cached(work: Path, name: str, overrides: list[str]) -> tuple[dict[str, Any], Path] | None:
    """A model finished by an earlier run in `work` with the same overrides (its row and ONNX file)."""
    row_file, onnx = work / f"{name}.json", work / f"{name}.onnx"
    if not (row_file.exists() and onnx.exists()):
        return None
    saved = json.loads(row_file.read_text())
    return (saved["row"], onnx) if saved.get("overrides") == overrides else None


def save(work: Path, row: dict[str, Any], overrides: list[str]) -> None:
    write_text(work / f"{row['method']}.json", json.dumps({"overrides": overrides, "row": row}, default=float))


def measure_latency(files: dict[str, Path], quick: bool) -> dict[str, dict[int, float]]:
    """p50 milliseconds per model at batch 1 and 32, all models interleaved in one loop per batch size."""
    # Enough rounds that the p50 ratio settles (80 rounds at batch 32 moved it by +-0.05 between runs).
    repeats = {1: 40, 32: 15} if quick else {1: 600, 32: 240}
    return interleaved_p50(files, (1, 28, 28), repeats, warmup=5 if quick else 20)


def table(summary: dict[str, Any]) -> str:
    """The README table (markdown) from a benchmark summary."""
    rows = summary["results"]
    dense = next(r for r in rows if r["method"] == "dense")
    lines = ["| model | test accuracy | vs dense | p50 batch 1 | vs dense | p50 batch 32 | vs dense | MACs | params |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["latency_ms"]
        drop = "" if r is dense else f"{(r['accuracy'] - dense['accuracy']) * 100:+.2f} pt"
        lines.append(
            f"| {LABELS[r['method']]} | {r['accuracy'] * 100:.2f}% | {drop} | {lat['1']:.3f} ms | "
            f"{r['latency_ratio']['1']:.2f}x | {lat['32']:.2f} ms | {r['latency_ratio']['32']:.2f}x | "
            f"{r['macs'] / 1e6:.2f} M ({r['macs'] / dense['macs']:.2f}x) | "
            f"{r['params'] / 1e3:.1f} k ({r['params'] / dense['params']:.2f}x) |")
    return "\n".join(lines)


def verdict(summary: dict[str, Any]) -> str:
    """One sentence on the issue's targets, from the summary's figures."""
    t = summary.get("targets")
    if t is None:
        return "WoodFisher was not part of this run: the targets are not checked."
    def said(ok: bool) -> str:
        return "met" if ok else "**not met**"
    return (f"Targets: WoodFisher's batch-32 latency is {t['latency_b32_ratio']:.2f}x dense (target <= 0.5: "
            f"{said(t['latency_target_met'])}), its accuracy is {t['drop_points']:.2f} points below dense "
            f"(target <= 1.5: {said(t['drop_target_met'])}), and it is "
            f"{'at least as accurate as' if t['beats_every_baseline'] else '**less accurate than**'} every baseline "
            f"(target: {said(t['beats_every_baseline'])}).")


def budget(summary: dict[str, Any]) -> str:
    """How the run differs from the recipe (the full fine-tuning budget only when there are no overrides)."""
    if not summary["overrides"]:
        return "the full budget of `recipes/structured.yaml`"
    kind = "quick run" if summary["quick"] else "reduced run"
    return f"a {kind}, NOT the recipe's budget: " + ", ".join(f"`{o}`" for o in summary["overrides"])


def load_note(summary: dict[str, Any]) -> str:
    load = summary.get("latency_load_1min")
    return "" if load is None else f", load average {load:.1f} while timing"


def write_readme(path: Path, summary: dict[str, Any]) -> None:
    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    how = (f"*`benchmarks/structured.py` with {budget(summary)} ({summary['machine']}, {summary['threads']} torch "
           f"threads, ONNX Runtime 1 thread; latency measured interleaved in one process"
           f"{load_note(summary)}"
           f"{'; ' + summary['note'] if summary.get('note') else ''}). Generated by the benchmark from its JSON: "
           f"do not edit by hand.*")
    write_text(path, f"{head}{BEGIN}\n{table(summary)}\n\n{verdict(summary)}\n\n{how}\n{END}{tail}")


def read_summary(path: Path) -> dict[str, Any]:
    """A saved summary: a JSON file, or a run's log whose last line is the JSON object."""
    text = path.read_text().strip()
    try:
        return dict(json.loads(text))
    except json.JSONDecodeError:
        return dict(json.loads(text.splitlines()[-1]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budget and test subset (about a minute per method)")
    parser.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="extra recipe overrides")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--note", default="", help="a remark kept in the JSON and the README (e.g. machine load)")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--work-dir", type=Path, help="keep every model and its row here; a rerun with the same "
                        "settings reuses the finished ones (latency is always measured again, interleaved)")
    parser.add_argument("--readme", type=Path, help="write the results table between the markers of this file")
    parser.add_argument("--from-json", type=Path, help="skip the run: read a saved summary (a JSON file, or a "
                        "run's output whose last line is the JSON)")
    args = parser.parse_args()

    if args.from_json:
        summary = read_summary(args.from_json)
        print(table(summary))
        if args.readme:
            write_readme(args.readme, summary)
        return
    set_threads(args.threads)
    overrides = [*(QUICK if args.quick else []), *args.overrides]
    machine = f"{os.cpu_count()} cores, {cpu_model()}"
    print(f"structured pruning benchmark ({'quick' if args.quick else 'full'}): {RECIPE.name}, "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads, {machine}", flush=True)
    rows: list[dict[str, Any]] = []
    files: dict[str, Path] = {}
    with tempfile.TemporaryDirectory(prefix="wf-bench-structured-") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for method in ["dense", *args.methods]:
            hit = cached(work, method, overrides)
            if hit is not None:
                row, files[method] = hit
                print(f"{method:>11}: reusing the model finished earlier in {work}", flush=True)
            elif method == "dense":
                row, files[method] = dense_model_file(overrides, work)
            else:
                row, files[method] = prune_one(method, overrides, work, args.verbose, resume=args.work_dir is not None)
            save(work, row, overrides)
            rows.append(row)
            if method != "dense":
                dense = rows[0]
                print(f"{method:>11}: test accuracy {row['accuracy']:.4f} (dense {dense['accuracy']:.4f}), "
                      f"channels removed {row['channel_sparsity']:.1%}, MACs {row['macs'] / dense['macs']:.3f}x, "
                      f"wall {row['wall_s']:.0f}s (prune {row['prune_s']:.0f}s, fine-tune {row['finetune_s']:.0f}s)",
                      flush=True)
        load_before = load_average()
        latency = measure_latency(files, args.quick)
        latency_load = max(load_before, load_average())
    for row in rows:
        row["latency_ms"] = {str(b): latency[row["method"]][b] for b in (1, 32)}
        row["latency_ratio"] = {str(b): latency[row["method"]][b] / latency["dense"][b] for b in (1, 32)}

    summary = {"benchmark": "structured", "quick": args.quick, "recipe": RECIPE.name,
               "overrides": overrides, "threads": torch.get_num_threads(), "machine": machine,
               "note": args.note, "latency_load_1min": latency_load, "results": rows}
    print()
    print(table(summary))
    if "woodfisher" in args.methods:
        dense = rows[0]
        wf = next(r for r in rows if r["method"] == "woodfisher")
        baselines = [r for r in rows if r["method"] not in ("dense", "woodfisher")]
        checks = {
            "latency_b32_ratio": wf["latency_ratio"]["32"],
            "latency_target_met": wf["latency_ratio"]["32"] <= TARGETS["latency_ratio_b32"],
            "drop_points": (dense["accuracy"] - wf["accuracy"]) * 100,
            "drop_target_met": dense["accuracy"] - wf["accuracy"] <= TARGETS["max_drop"],
            "beats_every_baseline": all(wf["accuracy"] >= r["accuracy"] for r in baselines),
        }
        summary["targets"] = checks
        print("\n" + verdict(summary))
    if args.readme:
        write_readme(args.readme, summary)
    print(json.dumps(summary, default=float))


if __name__ == "__main__":
    main()
