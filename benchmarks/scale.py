"""WoodFisher at ImageNet scale: one pruning step on torchvision ResNet-50 and MobileNetV2 at 224 px in a budget.

Each case is one WoodFisher step (N=128 gradients, block size 128, λ=1e-5, all conv/linear weights, 50%
target) on a randomly initialised torchvision model with synthetic 224-px images, run in a fresh
subprocess so peak RSS (the child's own ``ru_maxrss``) belongs to that case alone. Per model it runs the
budgeted step (``pruning.woodfisher.memory_budget_gb``) and, where its plan fits ``--max-in-memory-gb``, the
in-memory step (all statistics in memory at once, one gradient pass), and reports peak RSS, the wall
time (and CPU time) split into gradients / statistics / inverse / update (+ spill I/O), and the plan
(representation, groups, gradient passes, chunk, revisits, expected peak). On a shared machine wall
times drift: the two steps run ``--repeats`` times in ABBA order (budgeted, in-memory, in-memory,
budgeted, ...), and the time ratio is the median of the pairs' ratios (CPU-time ratio alongside). Targets:
ResNet-50 peak RSS <= 8 GB, MobileNetV2 <= 3 GB, budgeted time <= 1.5x the in-memory step where that fits.

``--quick`` (CI, ~1-2 min on a quiet machine): ResNet-18 at 64 px, N=16, block 16, a budget (1.8 GB) that
needs groups: with a spill folder (one gradient pass, rows and inverses on disk) and without (a pass per
group, recomputed for the update), the in-memory step, and a check that the budgeted steps select the
same weights and give weights equal to the in-memory ones within 1e-6.

``--plan-only`` prints each model's plans (budgeted and in memory) from one probe forward, running no step;
``--image-size`` / ``--num-grads`` / ``--block-size`` / ``--budget-gb`` make a reduced run (marked ``reduced`` in
the JSON).

Usage: python benchmarks/scale.py [--quick] [--models resnet50 mobilenet_v2] [--max-in-memory-gb 12] [--repeats 2]
       [--zero-init-residual] [--plan-only] [--image-size PX] [--num-grads N] [--block-size B] [--budget-gb GB]
Last stdout line: one JSON object with every figure.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks._shared import load_average, log

ROOT = Path(__file__).resolve().parent.parent
FULL = {"num_grads": 128, "block_size": 128, "damp": 1e-5, "image_size": 224, "sparsity": 0.5}
BUDGET_GB = {"resnet50": 6.5, "mobilenet_v2": 1.8}  # peak targets 8 and 3 GB, minus ~1 GB of torch + model
TARGET_PEAK_GB = {"resnet50": 8.0, "mobilenet_v2": 3.0}
QUICK = {"model": "resnet18", "num_grads": 16, "block_size": 16, "damp": 1e-5, "image_size": 64, "sparsity": 0.5,
         "budget_gb": 1.8}


# ===================================================================== child: one step
def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """One WoodFisher step as `case` says; returns its figures (run in a fresh process)."""
    import torch
    import torchvision

    import wf_pipeline  # noqa: F401  (sets thread/OpenMP defaults before torch work)
    from wf_pipeline.fisher.plan import resident_bytes
    from wf_pipeline.pruning import MaskSet, PruneSettings, prune_step, select_prunable

    torch.manual_seed(0)
    kwargs = {"zero_init_residual": True} if case.get("zero_init_residual") else {}
    model = torchvision.models.get_model(case["model"], weights=None, num_classes=1000, **kwargs).eval()
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    n, px = case["num_grads"], case["image_size"]
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(n, 3, px, px, generator=gen)
    labels = torch.randint(0, 1000, (n,), generator=gen)
    batches = lambda: [(images[i : i + 32], labels[i : i + 32]) for i in range(0, n, 32)]  # noqa: E731
    settings = PruneSettings("woodfisher", num_grads=n, block_size=case["block_size"], damp=case["damp"],
                             memory_budget_gb=case["budget_gb"], chunk_size=case.get("chunk_size", 100))
    baseline = resident_bytes()
    spill = case.get("spill_dir")
    cpu_before = _cpu_seconds()
    started = time.perf_counter()
    report = prune_step(model, params, masks, case["sparsity"], settings, batches,
                        spill_dir=None if spill is None else Path(spill))
    seconds = time.perf_counter() - started
    t = report.timings
    plan = report.details.fisher_plan
    assert plan is not None  # a WoodFisher step records its plan
    health = report.details.fisher_health  # promoted (float64) and repaired blocks
    out: dict[str, Any] = {
        "model": case["model"], "mode": case["mode"], "weights": sum(p.numel() for p in params.values()),
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        "baseline_rss_gb": baseline / 1e9, "seconds": seconds, "cpu_s": _cpu_seconds() - cpu_before,
        "split_s": {"gradients": t.get("gradients", 0.0), "statistics": t.get("accumulate", 0.0),
                    "inverse": t.get("inverse", 0.0) - t.get("accumulate", 0.0), "update": t.get("obs", 0.0),
                    "spill_io": t.get("spill", 0.0)},
        "plan": {k: plan[k] for k in ("representation", "chunk_size", "revisit", "keep_last", "gradient_spill",
                                      "gradient_passes",
                                      "budget_bytes", "peak_bytes", "baseline_bytes", "stats_bytes", "spill_bytes")}
        | {"groups": plan["groups"], "summary": plan["summary"]},
        "achieved_sparsity": report.achieved_sparsity,
        "fisher_health": None if health is None else health.to_dict(),
    }
    if case.get("save_weights"):
        weights = {n: p.detach().clone() for n, p in params.items()}
        torch.save(weights | {f"mask:{k}": v for k, v in masks.masks.items()}, case["save_weights"])
    return out


def _cpu_seconds() -> float:
    """This process's CPU time (all threads): less sensitive than wall time to other jobs on a shared machine."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def child_main(spec: str) -> None:
    print(json.dumps(run_case(json.loads(spec))))


def spawn(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    """Run one case in a fresh interpreter; its last stdout line is the result."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(case)], capture_output=True, text=True,
                          env=env, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"model": case["model"], "mode": case["mode"], "error": " | ".join(tail)}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def plan_case(case: dict[str, Any]) -> dict[str, Any]:
    """The plan the case's step would make within ``case["budget_gb"]`` (with its spill folder, if any), from one
    probe forward and no gradient pass; ``None`` fields where no plan fits."""
    import torch
    import torchvision

    import wf_pipeline  # noqa: F401
    from wf_pipeline.fisher.inverse import accumulation_dtype
    from wf_pipeline.fisher.plan import plan_within
    from wf_pipeline.fisher.streamed import FisherJob, measure_plan_inputs
    from wf_pipeline.pruning import select_prunable

    model = torchvision.models.get_model(case["model"], weights=None, num_classes=1000).eval()
    params = select_prunable(model, [".*"], [])
    px, n, block = case["image_size"], case["num_grads"], case["block_size"]
    sample = [(torch.randn(1, 3, px, px), torch.zeros(1, dtype=torch.long))]
    job = FisherJob(model, params, None, lambda: sample, n, block, case["damp"],
                    accumulation_dtype(n, block, torch.float32))
    spill = case.get("spill_dir")
    inputs = measure_plan_inputs(job, max_chunk=case.get("chunk_size", 100),
                                 spill_root=None if spill is None else Path(spill))
    plan = plan_within(inputs, int(case["budget_gb"] * 1e9))
    if plan is None:
        return {"fits": False, "in_memory": False, "expected_peak_gb": None, "summary": None, "precision": None}
    return {"fits": True, "in_memory": plan.revisit == "none", "expected_peak_gb": plan.peak_bytes / 1e9,
            "groups": len(plan.groups), "chunk_size": plan.chunk_size, "gradient_spill": plan.gradient_spill,
            "precision": plan.precision, "summary": plan.summary()}


def child_plan(spec: str) -> None:
    print(json.dumps(plan_case(json.loads(spec))))


# ===================================================================== parent
def in_memory_plan(case: dict[str, Any], cap_gb: float) -> dict[str, Any]:
    """Whether all statistics fit in memory at once within `cap_gb`, with the case's chunk (a probe, in a child)."""
    probe = {**case, "mode": "probe", "budget_gb": cap_gb}
    probe.pop("spill_dir", None)
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--child-plan", json.dumps(probe)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        return {"fits": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"fits": out["in_memory"], "expected_peak_gb": out["expected_peak_gb"], "summary": out["summary"]}


def budgeted_plan(case: dict[str, Any]) -> dict[str, Any]:
    """The budgeted step's plan (a probe in a child; nothing is run)."""
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.run([sys.executable, __file__, "--child-plan", json.dumps(case)], capture_output=True,
                          text=True, env=env, cwd=ROOT, timeout=600)
    if proc.returncode != 0:
        return {"fits": False, "error": (proc.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_weights(a: Path, b: Path) -> dict[str, Any]:
    import torch

    x, y = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    same_masks = all(torch.equal(x[k], y[k]) for k in x if k.startswith("mask:"))
    wa = torch.cat([x[k].reshape(-1) for k in x if not k.startswith("mask:")])
    wb = torch.cat([y[k].reshape(-1) for k in y if not k.startswith("mask:")])
    return {"same_weights_selected": same_masks, "max_rel_diff": float((wa - wb).abs().max() / wa.abs().max())}


def model_case(name: str, tmp: str, args: argparse.Namespace) -> dict[str, Any]:
    """The full case of one model, with the command line's overrides (a reduced run) and init."""
    case = {**FULL, "model": name, "budget_gb": BUDGET_GB.get(name, 4.0), "spill_dir": tmp}
    case.update(reduced_overrides(args))
    if args.zero_init_residual and name.startswith(("resnet", "resnext", "wide_resnet")):
        case["zero_init_residual"] = True
    return case


def reduced_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """--image-size / --num-grads / --budget-gb given on the command line (the run is then a reduced one)."""
    given = {"image_size": args.image_size, "num_grads": args.num_grads, "block_size": args.block_size,
             "budget_gb": args.budget_gb}
    return {k: v for k, v in given.items() if v is not None}


def full_case(name: str, tmp: str, args: argparse.Namespace, results: list[dict[str, Any]]) -> dict[str, Any]:
    """One model: the budgeted step, then, where the in-memory step fits, `--repeats` pairs in ABBA order.

    The machine is shared, so wall times drift with other jobs: pairs alternate which step runs first
    (budgeted, in-memory, in-memory, budgeted, ...) and each pair gives one ratio; the summary has the median
    of the wall-time ratios and the ratio of summed CPU times (less sensitive to load).
    """
    case = model_case(name, tmp, args)
    budgeted = spawn({**case, "mode": "budgeted"}, args.timeout)
    results.append(budgeted)
    log(f"{name} budgeted: {budgeted}")
    entry: dict[str, Any] = {}
    if "error" in budgeted:
        return entry
    target = TARGET_PEAK_GB.get(name)
    case["chunk_size"] = budgeted["plan"]["chunk_size"]  # the in-memory step with the same chunks
    fit = entry["in_memory_plan"] = in_memory_plan(case, args.max_in_memory_gb)
    pairs: list[tuple[dict[str, Any], dict[str, Any]]] = []
    if fit["fits"]:
        for repeat in range(args.repeats):
            order = ("budgeted", "in-memory") if repeat % 2 == 0 else ("in-memory", "budgeted")
            pair: dict[str, dict[str, Any]] = {}
            for mode in order:
                if mode == "budgeted" and repeat == 0:
                    pair[mode] = budgeted  # the first budgeted run opens the first pair
                    continue
                extra = {"budget_gb": args.max_in_memory_gb} if mode == "in-memory" else {}
                row = pair[mode] = spawn({**case, **extra, "mode": mode, "repeat": repeat}, args.timeout)
                results.append(row)
                log(f"{name} {mode} (repeat {repeat}): {row}")
            if any("error" in row for row in pair.values()):
                break
            pairs.append((pair["budgeted"], pair["in-memory"]))
    budgeted_rows = [budgeted] + [b for b, _ in pairs[1:]]
    entry["peak_rss_gb"] = max(row["peak_rss_gb"] for row in budgeted_rows)
    entry["peak_target_gb"] = target
    entry["peak_target_met"] = None if target is None else entry["peak_rss_gb"] <= target
    if pairs:
        walls = sorted(b["seconds"] / m["seconds"] for b, m in pairs)
        entry["in_memory_peak_rss_gb"] = max(m["peak_rss_gb"] for _, m in pairs)
        entry["time_ratios_per_pair"] = [b["seconds"] / m["seconds"] for b, m in pairs]
        entry["time_ratio_vs_in_memory"] = walls[len(walls) // 2] if len(walls) % 2 else \
            (walls[len(walls) // 2 - 1] + walls[len(walls) // 2]) / 2
        entry["cpu_ratio_vs_in_memory"] = sum(b["cpu_s"] for b, _ in pairs) / sum(m["cpu_s"] for _, m in pairs)
        entry["time_target_met"] = entry["time_ratio_vs_in_memory"] <= 1.5
    return entry


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="ResNet-18 at 64 px, tiny budget, both revisit modes")
    parser.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet50"])
    parser.add_argument("--max-in-memory-gb", type=float, default=12.0,
                        help="run the in-memory step only if its plan needs at most this budget")
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per case")
    parser.add_argument("--repeats", type=int, default=2,
                        help="budgeted/in-memory pairs per model where the in-memory step fits (ABBA order)")
    parser.add_argument("--zero-init-residual", action="store_true",
                        help="ResNets with torchvision's zero_init_residual=True: with the default random init and "
                        "BatchNorm in eval mode ResNet-50's logits explode (loss ~70), and most Fisher blocks need "
                        "float64 (the plan builds them a segment at a time from the spilled rows)")
    parser.add_argument("--plan-only", action="store_true",
                        help="print each model's budgeted and in-memory plans (one probe forward each), run nothing")
    parser.add_argument("--image-size", type=int, help="reduced run: input size instead of 224")
    parser.add_argument("--num-grads", type=int, help="reduced run: N instead of 128")
    parser.add_argument("--block-size", type=int, help="reduced run: B instead of 128")
    parser.add_argument("--budget-gb", type=float, help="reduced run: the budget for every model")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--child-plan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child_main(args.child)
        return
    if args.child_plan:
        child_plan(args.child_plan)
        return

    results: list[dict[str, Any]] = []
    summary: dict[str, Any] = {}
    scratch = ROOT / "artifacts" if (ROOT / "artifacts").is_dir() else None
    with tempfile.TemporaryDirectory(prefix="scale-bench-", dir=scratch) as tmp:
        if args.quick:
            base = dict(QUICK)
            saved = {}
            for mode, extra in (("budgeted-spill", {"spill_dir": tmp}), ("budgeted-recompute", {}),
                                ("in-memory", {"budget_gb": 8.0})):
                saved[mode] = str(Path(tmp) / f"{mode}.pt")
                if results and "chunk_size" in results[0].get("plan", {}):  # same chunks: fp32 sums in the same order
                    extra["chunk_size"] = results[0]["plan"]["chunk_size"]
                case = {**base, **extra, "mode": mode, "save_weights": saved[mode]}
                results.append(spawn(case, args.timeout))
                log(f"{mode}: {results[-1]}")
            memory = next(r for r in results if r["mode"] == "in-memory")
            for mode in ("budgeted-spill", "budgeted-recompute"):
                row = next(r for r in results if r["mode"] == mode)
                if "error" in row or "error" in memory:
                    continue
                summary[mode] = {**compare_weights(Path(saved[mode]), Path(saved["in-memory"])),
                                 "time_ratio_vs_in_memory": row["seconds"] / memory["seconds"],
                                 "gradient_passes": row["plan"]["gradient_passes"]}
        elif args.plan_only:
            for name in args.models:
                case = model_case(name, tmp, args)
                budgeted = budgeted_plan(case)
                case["chunk_size"] = budgeted.get("chunk_size") or 100  # the in-memory step with the same chunks
                summary[name] = {"budgeted": budgeted, "in_memory": in_memory_plan(case, args.max_in_memory_gb)}
                for kind, plan in summary[name].items():
                    print(f"{name} {kind}: {plan.get('summary') or plan}")
        else:
            for name in args.models:
                summary[name] = full_case(name, tmp, args, results)
    for row in results:
        if "error" in row:
            print(f"{row['model']} {row['mode']}: FAILED {row['error']}")
            continue
        split = ", ".join(f"{k} {v:.1f}s" for k, v in row["split_s"].items())
        print(f"{row['model']:>13} {row['mode']:<19} peak RSS {row['peak_rss_gb']:.2f} GB "
              f"(plan {row['plan']['peak_bytes'] / 1e9:.2f}"
              f" + {row['baseline_rss_gb']:.2f} resident), {row['seconds']:.1f}s ({row['cpu_s']:.0f} CPU-s): {split}")
        print(f"{'':>13} {row['plan']['summary']}")
    print(json.dumps({"benchmark": "scale", "quick": args.quick, "zero_init_residual": args.zero_init_residual,
                      "plan_only": args.plan_only, "reduced": reduced_overrides(args) or None,
                      "threads": os.cpu_count(),
                      "load_avg_1m": load_average(), "summary": summary, "results": results}))


if __name__ == "__main__":
    main()
