"""Pruned and quantized: what a deployment engineer ships, against what INT8 alone gives.

For the bundled ResNet-20 and MobileNetV1 (Fashion-MNIST) every pruned model is made by the product
itself (`wf-pipeline compress` with the ready recipes; each run exports its FP32 model and quantizes it to
INT8 in ONNX Runtime), and the dense model is quantized the same way (512 training images). Then, in one
process, the script measures in ONNX Runtime:

* test accuracy (the whole test set) of dense FP32, dense INT8, unstructured WoodFisher 90% FP32/INT8,
  structured WoodFisher FP32/INT8 and Torch-Pruning Taylor FP32/INT8 (same recipe, same channel budget);
* p50 latency at batch 1 and 32, 1 intra-op thread, every file of one model timed interleaved (alternating
  single runs, order flipped each round), as ratios to dense FP32;
* latency only, for torchvision ResNet-18 and MobileNetV2 at 224 px (random weights): dense, 90% magnitude
  unstructured and 50% L1 channels (Torch-Pruning, widths in blocks of 16), each FP32 and INT8.

It also checks the targets of issue 18 (structured + INT8 on ResNet-20 <= 0.35x dense FP32 at batch 32 with
<= 1.0 point drop and on the accuracy-latency Pareto front; INT8 <= 0.3 points below its own FP32 model;
MobileNetV2 structured + INT8 <= 0.30x at batch 1; WoodFisher + INT8 >= Taylor + INT8), draws the
accuracy-latency plot, and prints one JSON object on its last line.

    python benchmarks/deploy.py                  # full: the recipes' own budgets (about an hour per model on 2 cores)
    python benchmarks/deploy.py --quick          # tiny budgets, test subset, ResNet-20 only (under 3 minutes)
    python benchmarks/deploy.py --work-dir D     # keep the runs in D; a rerun resumes or reuses them
    python benchmarks/deploy.py --from-json results/deploy_benchmark.json --readme README.md   # tables only
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402

import wf_pipeline  # noqa: E402,F401  - first: it sets OMP_WAIT_POLICY before torch loads
from benchmarks._shared import interleaved_p50, log, machine, set_threads  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
MOBILENET = ["model.name=mobilenetv1", "model.weights=builtin:mobilenetv1-fmnist",
             "model.kwargs={width_mult: 0.25, small_input: true}"]
# Which compress runs make the pruned models of each small model: (recipe, overrides).
VARIANTS: dict[str, dict[str, tuple[str, list[str]]]] = {
    "resnet20": {
        "unstructured WoodFisher 90%": ("default_int8.yaml", []),
        "structured WoodFisher": ("structured_int8.yaml", []),
        "structured Taylor": ("structured_int8.yaml", ["pruning.method=taylor"]),
        # one step further: every width at 16, the narrowest ORT's fast INT8 kernel takes (the INT8 floor)
        "structured WoodFisher 55%": ("structured_int8.yaml", ["pruning.final_sparsity=0.55"]),
    },
    "mobilenetv1": {
        "unstructured WoodFisher 90%": ("default_int8.yaml",
                                        [*MOBILENET, "pruning.skip=['^features\\.0\\.', '^fc\\.']"]),
        "structured WoodFisher": ("structured_int8.yaml", MOBILENET),
        "structured Taylor": ("structured_int8.yaml", [*MOBILENET, "pruning.method=taylor"]),
    },
}
QUICK = ["finetune.epochs=2", "finetune.steps_per_epoch=6", "pruning.schedule.end_epoch=1",
         "pruning.woodfisher.num_grads=64", "data.test_subset=1000", "validate.enabled=false",
         "quantize.calibration_samples=128"]
TARGETS = {"resnet20_int8_b32_ratio": 0.35, "resnet20_max_drop": 0.010, "int8_cost": 0.003,
           "mobilenetv2_int8_b1_ratio": 0.30}
BEGIN, END = "<!-- deploy:begin -->", "<!-- deploy:end -->"


# ------------------------------------------------------------------------------------------- the runs
def compress(model: str, variant: str, work: Path, quick: bool) -> Path:
    """The export folder of `wf-pipeline compress` for one variant (resumed or reused when already in `work`)."""
    recipe, overrides = VARIANTS[model][variant]
    name = f"{model}-{re.sub(r'[^a-z0-9]+', '-', variant.lower()).strip('-')}"
    run = work / name
    args = [str(Path(sys.executable).parent / "wf-pipeline"), "compress", str(RECIPES / recipe),
            *[a for item in [*overrides, *(QUICK if quick else []), f"output.root={work}",
                             f"output.run_name={name}"] for a in ("--set", item)]]
    if (run / "metrics.json").exists() and (run / "export" / "model.onnx").exists():
        log(f"[deploy] {model} / {variant}: reusing the finished run {run}")
        return run / "export"
    if run.exists():
        args.append("--resume")
    log(f"[deploy] {model} / {variant}: wf-pipeline compress {recipe} {' '.join(overrides)}")
    started = time.perf_counter()
    done = subprocess.run(args, capture_output=True, text=True)
    if done.returncode not in (0, 1) or not (run / "export" / "model.onnx").exists():  # 1: a gate failed, still a model
        raise SystemExit(f"compress failed for {model} / {variant}:\n{done.stderr[-3000:]}")
    log(f"[deploy]   done in {time.perf_counter() - started:.0f} s")
    return run / "export"


def quantize_dense(export: Path, data, quick: bool) -> Path:
    """The dense baseline quantized exactly as the recipes quantize: what a user gets from INT8 alone."""
    from wf_pipeline.deploy.quantize import quantize_model
    from wf_pipeline.recipe.schema import QuantizeConfig

    cfg = QuantizeConfig(enabled=True, calibration_samples=128 if quick else 512)
    calibration = [x.numpy() for x in data.calibration_batches(cfg.calibration_samples, cfg.calibration_batch_size)]
    return quantize_model(export / "dense_baseline.onnx", export / "dense_baseline.int8.onnx", calibration, cfg).path


# ------------------------------------------------------------------------------------------- measurements
def accuracy(path: Path, images: np.ndarray, labels: np.ndarray) -> float:
    from wf_pipeline.deploy.ort_session import create_session, run_logits

    session = create_session(path, threads=0)
    correct = sum(int((run_logits(session, images[i:i + 500]).argmax(1) == labels[i:i + 500]).sum())
                  for i in range(0, len(labels), 500))
    return correct / len(labels)


def small_model(model: str, work: Path, quick: bool) -> dict[str, Any]:
    from wf_pipeline.data import build_data
    from wf_pipeline.recipe.schema import DataConfig

    exports = {variant: compress(model, variant, work, quick) for variant in VARIANTS[model]}
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False, test_subset=1000 if quick else None), 0)
    first = next(iter(exports.values()))
    files = {"dense FP32": first / "dense_baseline.onnx", "dense INT8": quantize_dense(first, data, quick)}
    for variant, export in exports.items():
        files[f"{variant} FP32"] = export / "model.fp32.onnx"
        # quantize.ship: faster ships FP32 where INT8 is slower; the INT8 file then stays beside it
        int8 = export / "model.int8.onnx"
        files[f"{variant} INT8"] = int8 if int8.exists() else export / "model.onnx"
    images, labels = (t.numpy() for t in data.test_tensors())
    log(f"[deploy] {model}: accuracy of {len(files)} files on {len(labels)} test images")
    acc = {name: accuracy(path, images, labels) for name, path in files.items()}
    log(f"[deploy] {model}: latency, interleaved")
    lat = interleaved_p50(files, tuple(images.shape[1:]), {1: 200 if quick else 600, 32: 40 if quick else 240})
    rows = []
    for name, path in files.items():
        rows.append({"model": model, "variant": name, "accuracy": acc[name],
                     "p50_ms": {str(b): v for b, v in lat[name].items()},
                     "ratio": {str(b): lat[name][b] / lat["dense FP32"][b] for b in lat[name]},
                     "file_bytes": path.stat().st_size, "macs": _macs(path)})
    return {"rows": rows, "test_images": int(len(labels))}


def _macs(path: Path) -> int | None:
    import onnx

    from wf_pipeline.deploy.model_stats import model_stats

    return model_stats(onnx.load(str(path))).macs


def large_models(work: Path, quick: bool) -> list[dict[str, Any]]:
    """Latency only at 224 px: torchvision ResNet-18 and MobileNetV2 with random weights."""
    import torch
    import torch_pruning as tp
    import torchvision

    from wf_pipeline.deploy.export import export_onnx
    from wf_pipeline.deploy.quantize import quantize_model
    from wf_pipeline.recipe.schema import QuantizeConfig

    rows = []
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((8, 3, 224, 224)).astype(np.float32) for _ in range(2 if quick else 8)]
    cfg = QuantizeConfig(enabled=True)
    for name in ("resnet18", "mobilenet_v2"):
        torch.manual_seed(0)
        dense = getattr(torchvision.models, name)(weights=None).eval()
        example = torch.zeros(1, 3, 224, 224)
        structured = getattr(torchvision.models, name)(weights=None).eval()
        structured.load_state_dict(dense.state_dict())
        classifier = [m for m in structured.modules() if isinstance(m, torch.nn.Linear)]
        tp.pruner.MagnitudePruner(structured, example, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=classifier, round_to=16).step()
        unstructured = getattr(torchvision.models, name)(weights=None).eval()
        unstructured.load_state_dict(dense.state_dict())
        with torch.no_grad():
            for module in unstructured.modules():
                if isinstance(module, torch.nn.Conv2d | torch.nn.Linear):
                    w = module.weight
                    w.mul_(w.abs() > w.abs().flatten().kthvalue(int(0.9 * w.numel())).values)
        files: dict[str, Path] = {}
        for label, model in (("dense", dense), ("unstructured 90%", unstructured), ("structured 50%", structured)):
            fp32 = export_onnx(model, example, work / f"{name}-{label.split()[0]}.onnx", sparse_storage=False).path
            files[f"{label} FP32"] = fp32
            files[f"{label} INT8"] = quantize_model(fp32, fp32.with_suffix(".int8.onnx"), calibration, cfg).path
        log(f"[deploy] {name} 224 px: latency, interleaved")
        lat = interleaved_p50(files, (3, 224, 224), {1: 10} if quick else {1: 60, 32: 8})
        for label, path in files.items():
            rows.append({"model": name, "variant": label, "accuracy": None,
                         "p50_ms": {str(b): v for b, v in lat[label].items()},
                         "ratio": {str(b): lat[label][b] / lat["dense FP32"][b] for b in lat[label]},
                         "file_bytes": path.stat().st_size, "macs": _macs(path)})
    return rows


# ------------------------------------------------------------------------------------------- verdicts
def pareto_front(rows: list[dict[str, Any]], batch: str) -> set[str]:
    """Variants no other row beats on both accuracy and latency at `batch`."""
    front = set()
    for row in rows:
        beaten = any(other is not row and other["accuracy"] >= row["accuracy"]
                     and other["p50_ms"][batch] <= row["p50_ms"][batch]
                     and (other["accuracy"] > row["accuracy"] or other["p50_ms"][batch] < row["p50_ms"][batch])
                     for other in rows)
        if not beaten:
            front.add(row["variant"])
    return front


def verdicts(summary: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for model in VARIANTS:
        rows = [r for r in summary["rows"] if r["model"] == model]
        if not rows:
            continue
        by = {r["variant"]: r for r in rows}
        dense = by["dense FP32"]["accuracy"]
        wf, wf32, taylor = (by["structured WoodFisher INT8"], by["structured WoodFisher FP32"],
                            by["structured Taylor INT8"])
        out[model] = {
            "structured_int8_b32_ratio": wf["ratio"]["32"],
            "structured_int8_b1_ratio": wf["ratio"]["1"],
            "structured_int8_drop": dense - wf["accuracy"],
            "structured_int8_on_pareto_front_b32": wf["variant"] in pareto_front(rows, "32"),
            "int8_cost_structured": wf32["accuracy"] - wf["accuracy"],
            "int8_cost_unstructured": (by["unstructured WoodFisher 90% FP32"]["accuracy"]
                                       - by["unstructured WoodFisher 90% INT8"]["accuracy"]),
            "woodfisher_int8_vs_taylor_int8": wf["accuracy"] - taylor["accuracy"],
            "macs_woodfisher_vs_taylor": (wf["macs"] / taylor["macs"]) if wf["macs"] and taylor["macs"] else None,
        }
    resnet = out.get("resnet20")
    if resnet:
        resnet["targets_met"] = {
            "b32_ratio": resnet["structured_int8_b32_ratio"] <= TARGETS["resnet20_int8_b32_ratio"],
            "drop": resnet["structured_int8_drop"] <= TARGETS["resnet20_max_drop"],
            "pareto": resnet["structured_int8_on_pareto_front_b32"],
            "int8_cost": resnet["int8_cost_structured"] <= TARGETS["int8_cost"],
            "beats_taylor": resnet["woodfisher_int8_vs_taylor_int8"] >= 0,
        }
    v2 = {r["variant"]: r for r in summary["rows"] if r["model"] == "mobilenet_v2"}
    if v2:
        ratio = v2["structured 50% INT8"]["ratio"]["1"]
        out["mobilenet_v2"] = {"structured_int8_b1_ratio": ratio,
                               "target_met": ratio <= TARGETS["mobilenetv2_int8_b1_ratio"]}
    return out


# ------------------------------------------------------------------------------------------- outputs
def table(summary: dict[str, Any], models: list[str] | None = None) -> str:
    """The results table (rows of `models` only, when given) and the line saying how it was measured."""
    lines = ["| model | variant | test accuracy | p50 batch 1 (vs dense FP32) | p50 batch 32 (vs dense FP32) "
             "| MACs / sample | file |", "|---|---|---|---|---|---|---|"]
    for r in (r for r in summary["rows"] if models is None or r["model"] in models):
        acc = "latency only" if r["accuracy"] is None else f"{100 * r['accuracy']:.2f}%"
        cells = [f"{r['p50_ms'][b]:.3f} ms ({r['ratio'][b]:.2f}x)" if b in r["p50_ms"] else "-" for b in ("1", "32")]
        macs = f"{r['macs'] / 1e6:.1f} M" if r.get("macs") else "n/a"
        lines.append(f"| {r['model']} | {r['variant']} | {acc} | {cells[0]} | {cells[1]} | {macs} "
                     f"| {r['file_bytes'] / 1e3:.0f} kB |")
    m = summary["machine"]
    lines += ["", f"{'Quick run (tiny budgets, 1,000 test images): not a result. ' if summary['quick'] else ''}"
                  f"ONNX Runtime, 1 intra-op thread, files of one model timed interleaved; {m['cpus']} cores "
                  f"({m['cpu']}), load average {m['load_1min']:.2f} at the start, {summary['seconds']:.0f} s in all."]
    return "\n".join(lines)


def plot(summary: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = [m for m in VARIANTS if any(r["model"] == m for r in summary["rows"])]
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for r in (r for r in summary["rows"] if r["model"] == model):
            marker = "s" if r["variant"].endswith("INT8") else "o"
            ax.scatter(r["ratio"]["32"], 100 * r["accuracy"], marker=marker)
            ax.annotate(r["variant"], (r["ratio"]["32"], 100 * r["accuracy"]), fontsize=7,
                        xytext=(4, 2), textcoords="offset points")
        ax.set_xlabel("ONNX Runtime p50 latency at batch 32 / dense FP32")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{model}: accuracy vs latency (squares: INT8)")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def verdict_lines(summary: dict[str, Any]) -> list[str]:
    """Issue 18's targets, each with its measured value, as a sentence per target."""
    v = summary.get("verdicts", {})
    lines = []
    if "resnet20" in v:
        r = v["resnet20"]
        met = r["targets_met"]

        def said(ok: bool) -> str:
            return "met" if ok else "not met"

        lines.append(
            f"Targets on ResNet-20: structured WoodFisher + INT8 runs at {r['structured_int8_b32_ratio']:.2f}x dense "
            f"FP32 at batch 32 (target <= {TARGETS['resnet20_int8_b32_ratio']}: {said(met['b32_ratio'])}), "
            f"{100 * r['structured_int8_drop']:.2f} points below dense (target <= 1.0: {said(met['drop'])}), on the "
            f"accuracy-latency Pareto front ({said(met['pareto'])}); INT8 costs {100 * r['int8_cost_structured']:.2f} "
            f"points against its own FP32 model (target <= 0.3: {said(met['int8_cost'])}); WoodFisher + INT8 is "
            f"{100 * r['woodfisher_int8_vs_taylor_int8']:+.2f} points against Taylor + INT8 at "
            f"{r['macs_woodfisher_vs_taylor']:.2f}x its MACs ({said(met['beats_taylor'])}).")
    if "mobilenet_v2" in v:
        m = v["mobilenet_v2"]
        lines.append(f"MobileNetV2 at 224 px, structured 50% + INT8: {m['structured_int8_b1_ratio']:.2f}x dense FP32 "
                     f"at batch 1 (target <= {TARGETS['mobilenetv2_int8_b1_ratio']}: "
                     f"{'met' if m['target_met'] else 'not met'}).")
    return lines


def write_block(path: Path, summary: dict[str, Any], models: list[str] | None, image: str) -> None:
    """Replace the text between the deploy markers of `path` with the table (of `models`) and the verdicts."""
    from wf_pipeline.runtime.atomic_io import write_text

    text = path.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"{path} has no {BEGIN} ... {END} block")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    block = "\n".join([BEGIN, "<!-- generated by benchmarks/deploy.py; do not edit by hand -->", table(summary, models),
                       "", *verdict_lines(summary), "", f"![accuracy vs latency]({image})", END])
    write_text(path, head + block + tail)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny budgets, ResNet-20 only (under 3 minutes)")
    parser.add_argument("--models", nargs="+", default=None, choices=[*VARIANTS, "large"],
                        help="which parts to run (default: all; --quick: resnet20 and large)")
    parser.add_argument("--work-dir", type=Path, default=None, help="keep runs here; a rerun resumes or reuses them")
    parser.add_argument("--out", type=Path, default=None, help="write the summary JSON here (full runs: results/)")
    parser.add_argument("--from-json", type=Path, default=None, help="only regenerate tables from a saved summary")
    parser.add_argument("--readme", type=Path, default=None,
                        help="write the ResNet-20 table and the verdicts into this README's deploy block")
    parser.add_argument("--doc", type=Path, default=None,
                        help="write the whole table into this page's deploy block (docs/deployment.md)")
    args = parser.parse_args()
    if args.from_json:
        summary = json.loads(args.from_json.read_text())
    else:
        set_threads(2)
        started = time.perf_counter()
        models = args.models or (["resnet20", "large"] if args.quick else [*VARIANTS, "large"])
        work = args.work_dir or Path(tempfile.mkdtemp(prefix="wf-deploy-"))
        work.mkdir(parents=True, exist_ok=True)
        summary = {"quick": args.quick, "machine": machine(), "rows": []}
        for model in models:
            if model == "large":
                summary["rows"] += large_models(work, args.quick)
            else:
                summary["rows"] += small_model(model, work, args.quick)["rows"]
        summary["seconds"] = time.perf_counter() - started
        summary["verdicts"] = verdicts(summary)
        out = args.out or (None if args.quick else REPO / "results" / "deploy_benchmark.json")
        if out is not None:
            out.write_text(json.dumps(summary, indent=1))
            plot(summary, out.with_name("deploy.png"))
    print(table(summary))
    if args.readme:
        write_block(args.readme, summary, ["resnet20"], "results/deploy.png")
    if args.doc:
        write_block(args.doc, summary, None, "../results/deploy.png")
    print(json.dumps({"benchmark": "deploy", "quick": summary["quick"], "seconds": round(summary["seconds"], 1),
                      "load_1min": summary["machine"]["load_1min"], "verdicts": summary["verdicts"],
                      "rows": [{k: r[k] for k in ("model", "variant", "accuracy", "ratio")} for r in summary["rows"]]}))


if __name__ == "__main__":
    main()
