"""Regenerate every research table and plot (RQ1-RQ5) into results/ and the results block of docs/research.md.

Each study runs as its own process (one command, one table, one plot, one JSON: see the scripts);
this script then writes ``<out>/research.md`` — per research question the paper's claim, our measured
answer, where they differ, the table and the plot — and replaces the block of docs/research.md between
``<!-- results:begin -->`` and ``<!-- results:end -->`` with it. Every figure in the block comes from the
studies' JSON files; nothing is typed by hand.

    python benchmarks/run_all.py                 # full run (<= 60 min on 2 cores): results/ and docs/research.md
    python benchmarks/run_all.py --quick         # <= 3 min; writes results-quick/ and leaves docs/research.md alone
    python benchmarks/run_all.py --quick --out /tmp/r --doc /tmp/research.md   # quick, into a copy

The last stdout line is one JSON object: per study its wall time and output files.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.research.common import log, mean_std  # noqa: E402

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
METHOD_NAMES = {"woodfisher": "WoodFisher", "woodtaylor": "WoodTaylor", "kfac": "K-FAC OBS",
                "diag_fisher": "diagonal Fisher", "magnitude": "global magnitude",
                "magnitude_uniform": "uniform magnitude"}
STUDIES: dict[str, tuple[str, str]] = {
    "rq1": ("benchmarks/hessian_quality.py", "rq1_hessian_quality"),
    "rq2": ("benchmarks/research/rq2_oneshot.py", "rq2_oneshot"),
    "rq3": ("benchmarks/research/rq3_gradual.py", "rq3_gradual"),
    "rq4": ("benchmarks/research/rq4_layerwise.py", "rq4_layerwise"),
    "rq5": ("benchmarks/research/rq5_limited_data.py", "rq5_limited_data"),
}


def run_study(key: str, out: Path, quick: bool) -> dict[str, Any]:
    script, name = STUDIES[key]
    cmd = [sys.executable, str(REPO / script), "--out", str(out), *(["--quick"] if quick else [])]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log(f"[run_all] {key}: {' '.join(cmd[1:])}")
    started = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"[run_all] {key} failed with exit code {proc.returncode}")
    last = proc.stdout.strip().splitlines()[-1]
    json.loads(last)  # the study's contract: its last line is one JSON object
    files = [str(out / f"{name}{ext}") for ext in (".md", ".png", ".json")]
    missing = [f for f in files if not Path(f).is_file()]
    if missing:
        raise SystemExit(f"[run_all] {key} did not write {missing}")
    log(f"[run_all] {key} done in {seconds:.0f} s")
    return {"seconds": round(seconds, 1), "files": files}


# ----------------------------------------------------------------------------- the generated text
def load(out: Path, name: str) -> dict[str, Any]:
    return json.loads((out / f"{name}.json").read_text())


def fmt_pct(x: float) -> str:
    return f"{100 * x:.2f}%"


def section_rq1(data: dict[str, Any]) -> tuple[str, str, str]:
    claim = ("WoodFisher's empirical-Fisher inverse approximates the inverse Hessian more faithfully than K-FAC "
             "and the diagonal Fisher, and improves as more gradients N are used.")
    lines, differs = [], []
    for block, methods in data["summary"].items():
        wf, kf, dg = methods["WoodFisher"], methods["K-FAC"], methods["diagonal Fisher"]
        lines.append(f"{block}: inverse error WoodFisher {wf['inv_err']:.3f}, K-FAC {kf['inv_err']:.3f}, diagonal "
                     f"{dg['inv_err']:.3f}, true Fisher {methods['true Fisher']['inv_err']:.3f}; "
                     f"statistic rank correlation "
                     f"{wf['stat_spearman']:.3f} / {kf['stat_spearman']:.3f} / {dg['stat_spearman']:.3f}; "
                     f"loss increase "
                     f"after removing 50% of the block {wf['group50_actual']:.4f} / {kf['group50_actual']:.4f} / "
                     f"{dg['group50_actual']:.4f} (exact Hessian {methods['exact Hessian']['group50_actual']:.4f})")
        if not wf["inv_err"] < dg["inv_err"]:
            differs.append(f"on {block} the diagonal Fisher's inverse is closer than WoodFisher's")
        if not wf["inv_err"] < kf["inv_err"]:
            differs.append(f"on {block} K-FAC's inverse is closer than WoodFisher's "
                           f"({kf['inv_err']:.3f} vs {wf['inv_err']:.3f})")
        if kf["group50_actual"] < wf["group50_actual"]:
            differs.append(f"on {block} removing half the weights with K-FAC's OBS update costs less loss than with "
                           f"WoodFisher's ({kf['group50_actual']:.4f} vs {wf['group50_actual']:.4f})")
    curve = next(b for b in data["blocks"] if b["block"] == data["curve_layer"])["curves"]["WoodFisher"]
    trend = curve[-1]["inv_err"] < curve[0]["inv_err"]
    lines.append(f"WoodFisher's inverse error on {data['curve_layer']} goes from {curve[0]['inv_err']:.3f} at N = "
                 f"{curve[0]['n']:,} to {curve[-1]['inv_err']:.3f} at N = {curve[-1]['n']:,}")
    if not trend:
        differs.append("WoodFisher's inverse error does not fall with N")
    differs.append("WoodFisher approximates the empirical Fisher, so its error does not go to zero: it stays at the "
                   "empirical-vs-Hessian distance, above the true Fisher's")
    return claim, "; ".join(lines) + ".", "; ".join(differs) + "."


def section_rq2(data: dict[str, Any]) -> tuple[str, str, str]:
    claim = ("A more faithful inverse-Hessian gives better one-shot pruning: WoodFisher beats K-FAC, the diagonal "
             "Fisher and magnitude, by a wide margin at high sparsity.")
    measured, differs = [], []
    sparsities = [f"{s:g}" for s in data["sparsities"]]
    for model, res in data["summary"].items():
        mean = res["mean"]
        for key, label in (("accuracy", "as pruned"), ("accuracy_bn", "with BatchNorm recalibration")):
            wins = 0
            for s in sparsities:
                best_other = max(mean[m][key][s] for m in mean if m != "woodfisher")
                wins += mean["woodfisher"][key][s] >= best_other - 0.005
            hard = next((s for s in sparsities if res["dense_accuracy"] - mean["magnitude"][key][s] >= 0.05),
                        sparsities[-1])
            others = ", ".join(f"{METHOD_NAMES[m]} {fmt_pct(mean[m][key][hard])}"
                               for m in ("woodtaylor", "kfac", "diag_fisher", "magnitude", "magnitude_uniform"))
            measured.append(f"{model} {label}: WoodFisher best or within 0.5 points of the best at {wins} of "
                            f"{len(sparsities)} sparsities; at {float(hard):.0%} WoodFisher "
                            f"{fmt_pct(mean['woodfisher'][key][hard])} vs {others}")
            for m in mean:
                if m != "woodfisher" and mean[m][key][hard] > mean["woodfisher"][key][hard] + 0.005:
                    differs.append(f"{METHOD_NAMES[m]} beats WoodFisher on {model} {label} at {float(hard):.0%}")
            lead = mean["woodfisher"][key][hard] - mean["kfac"][key][hard]
            if 0 <= lead < 0.01:
                differs.append(f"on {model} {label} at {float(hard):.0%} WoodFisher leads K-FAC OBS by only "
                               f"{100 * lead:.2f} points, not the paper's wide margin")
    if not differs:
        differs.append("none at the sparsities measured: the ranking of methods matches the paper's")
    return claim, "; ".join(measured) + ".", "; ".join(differs) + "."


def section_rq3(data: dict[str, Any]) -> tuple[str, str, str]:
    claim = ("With the same gradual-pruning budget WoodFisher ends more accurate than global magnitude pruning, "
             "the more so the higher the sparsity, and generalises well.")
    s = data["summary"]
    measured, differs = [], []
    for t in data["targets"]:
        k = int(round(t * 100))
        diff = s[f"woodfisher_{k}"] - s[f"magnitude_{k}"]
        spread = {m: mean_std([r["test_accuracy"] for r in data["rows"] if r["method"] == m and r["target"] == t])[1]
                  for m in ("woodfisher", "magnitude")}
        measured.append(f"{k}%: WoodFisher {fmt_pct(s[f'woodfisher_{k}'])} ± {100 * spread['woodfisher']:.2f} "
                        f"vs magnitude {fmt_pct(s[f'magnitude_{k}'])} ± {100 * spread['magnitude']:.2f} "
                        f"over seeds ({100 * diff:+.2f} points; "
                        f"train−test gap {100 * s[f'woodfisher_gap_{k}']:+.2f} vs "
                        f"{100 * s[f'magnitude_gap_{k}']:+.2f} points)")
        if diff <= 0:
            differs.append(f"at {k}% WoodFisher is not more accurate ({100 * diff:+.2f} points)")
        elif diff <= max(spread.values()):
            differs.append(f"at {k}% WoodFisher's lead ({100 * diff:+.2f} points) is within the spread over seeds")
        gaps = s[f"woodfisher_gap_{k}"], s[f"magnitude_gap_{k}"]
        if gaps[0] > gaps[1] + 0.0025:
            differs.append(f"at {k}% WoodFisher generalises slightly worse: train−test gap {100 * gaps[0]:+.2f} vs "
                           f"{100 * gaps[1]:+.2f} points")
    if len(data["targets"]) < 2:
        differs.append("with one target measured, whether the lead grows with sparsity is not tested here")
    differs.append(f"our fine-tuning budget is reduced ({data['budget']['finetune.epochs']} x "
                   f"{data['budget']['finetune.steps_per_epoch']} steps) and the task easy, "
                   f"so gaps are smaller and noisier "
                   f"than the paper's ImageNet ones")
    return claim, "; ".join(measured) + ".", "; ".join(differs) + "."


def section_rq4(data: dict[str, Any]) -> tuple[str, str, str]:
    claim = ("WoodFisher's global ranking sets per-layer sparsities automatically, as well as or better than a "
             "uniform or hand-tuned allocation.")
    measured, differs = [], []
    for t in data["targets"]:
        row = {s: data["summary"][s][f"{t:g}"]["accuracy_bn"] for s in ("global", "uniform", "hand-tuned")}
        measured.append(f"{t:.0%} (BN recalibrated): global {fmt_pct(row['global'])}, "
                        f"uniform {fmt_pct(row['uniform'])}, "
                        f"hand-tuned {fmt_pct(row['hand-tuned'])}")
        for other in ("uniform", "hand-tuned"):
            if row[other] > row["global"] + 0.005:
                differs.append(f"at {t:.0%} the {other} allocation beats the global ranking")
    layers = data["woodfisher_per_layer_sparsity"]
    first, last = next(iter(layers)), list(layers)[-1]
    measured.append(f"at {data['targets'][-1]:.0%} WoodFisher pruned the first layer to {layers[first]:.1%} and the "
                    f"classifier to {layers[last]:.1%}")
    if not differs:
        differs.append("none: the automatic allocation is at least as good here "
                       "(one-shot; the paper shows it for gradual pruning)")
    return claim, "; ".join(measured) + ".", "; ".join(differs) + "."


def section_rq5(data: dict[str, Any]) -> tuple[str, str, str]:
    claim = "WoodFisher needs little data: with a few samples per class it still beats magnitude pruning."
    measured, differs = [], []
    for t in data["targets"]:
        row = data["summary"][f"{t:g}"]
        ks = [str(k) for k in data["per_class"]]
        beating = [k for k in ks if row[k] > row["magnitude"]]
        measured.append(f"{t:.0%}: WoodFisher from {fmt_pct(row[ks[0]])} ({ks[0]}/class) to {fmt_pct(row[ks[-1]])} "
                        f"({ks[-1]}/class) vs magnitude {fmt_pct(row['magnitude'])}; beats magnitude from "
                        f"{beating[0] + '/class' if beating else 'no k'} on")
        if not beating or beating[0] != ks[0]:
            differs.append(f"at {t:.0%} WoodFisher needs more than {ks[0]} sample per class to beat magnitude")
    if not differs:
        differs.append("none: even one sample per class is enough here")
    return claim, "; ".join(measured) + ".", "; ".join(differs) + "."


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any]], tuple[str, str, str]]]] = {
    "rq1": ("RQ1: how faithful are inverse-Hessian approximations?", section_rq1),
    "rq2": ("RQ2: does a more faithful approximation prune better one-shot?", section_rq2),
    "rq3": ("RQ3: does second-order information help gradual pruning?", section_rq3),
    "rq4": ("RQ4: does WoodFisher set per-layer sparsities by itself?", section_rq4),
    "rq5": ("RQ5: how does WoodFisher do with little data?", section_rq5),
}


def results_block(out: Path, keys: list[str], runs: dict[str, Any], readme_dir: Path) -> str:
    total = sum(r["seconds"] for r in runs.values())
    cpu = [load(out, STUDIES[k][1]).get("cpu_seconds") for k in keys]
    known = [c for c in cpu if c is not None]
    cpu_text = f", {sum(known) / 60:.1f} CPU-min" if len(known) == len(cpu) else ""
    rel = os.path.relpath(out, readme_dir).replace(os.sep, "/")
    quick_keys = [k for k in keys if load(out, STUDIES[k][1]).get("quick")]
    if not quick_keys:
        mode = ""
    elif len(quick_keys) == len(keys):
        mode = " QUICK RUN: tiny budgets for CI, not evidence."
    else:
        mode = f" QUICK RUN for {', '.join(k.upper() for k in quick_keys)} (marked below): not evidence."
    reduced_keys = [k for k in keys if load(out, STUDIES[k][1]).get("reduced")]
    if reduced_keys:
        mode += f" Reduced run for {', '.join(k.upper() for k in reduced_keys)} (marked below: what it left out)."
    parts = ["### Research questions (generated by `benchmarks/run_all.py`)\n",
             (f"**{mode.strip()}** " if mode else "")
             + f"Each study is one command (`--quick` for a small version) writing a table, a plot and a JSON file to "
             f"`{rel}/`; this block is rewritten from those files ({total / 60:.1f} min wall{cpu_text} in all "
             f"on a 2-core machine shared with other jobs; each study's wall time and the load average at its end "
             f"are under its title).\n"]
    for key in keys:
        script, name = STUDIES[key]
        title, builder = SECTIONS[key]
        data = load(out, name)
        claim, measured, differ = builder(data)
        table = (out / f"{name}.md").read_text().strip()
        label = (" (**quick run**: tiny budget, not evidence)" if data.get("quick")
                 else f" (**reduced run**: {data['reduced']})" if data.get("reduced") else "")
        seconds = runs.get(key, {}).get("seconds", data.get("seconds", 0))
        cost = [f"{seconds:.0f} s wall"]
        if data.get("resumed_units"):
            cost = [f"{seconds:.0f} s wall for the last call, which reused {data['resumed_units']} units "
                    f"finished by an "
                    f"earlier, stopped call"]
            walls = [r["wall_s"] for r in data.get("rows", []) if "wall_s" in r]
            if walls:
                cost.append(f"{len(walls)} runs of {min(walls):.0f}–{max(walls):.0f} s wall each")
        if data.get("cpu_seconds") is not None:
            cost.append(f"{data['cpu_seconds']:.0f} CPU-s")
        if (data.get("machine") or {}).get("load_1min") is not None:
            cost.append(f"load average {data['machine']['load_1min']:.1f} at its end")
        parts.append(f"#### {title}\n\n`python {script}`{label} ({', '.join(cost)})\n\n"
                     f"- **Paper's claim:** {claim}\n- **Measured here:** {measured}\n"
                     f"- **Where they differ:** {differ}\n\n"
                     f"{table}\n\n![{key.upper()}]({rel}/{name}.png)\n")
    return "\n".join(parts)


def replace_block(readme: Path, block: str) -> None:
    from wf_pipeline.runtime.atomic_io import write_text

    text = readme.read_text()
    if BEGIN not in text or END not in text:
        raise SystemExit(f"[run_all] {readme} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text(readme, f"{head}{BEGIN}\n{block}\n{END}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="results folder (default results/, or results-quick/ with --quick)")
    parser.add_argument("--doc", "--readme", dest="doc", type=Path,
                        help="Markdown file whose results block to update "
                             "(default docs/research.md for a full run into results/)")
    parser.add_argument("--only", nargs="+", choices=list(STUDIES),
                        help="run only these studies (the block still covers every study with results in --out)")
    parser.add_argument("--no-run", action="store_true", help="only rebuild the block from existing JSON files")
    args = parser.parse_args()
    out = (args.out or REPO / ("results-quick" if args.quick else "results")).resolve()
    readme = args.doc or (REPO / "docs" / "research.md" if not args.quick and args.out is None else None)
    keys = args.only or list(STUDIES)
    started = time.perf_counter()
    runs: dict[str, Any] = {}
    if not args.no_run:
        for key in keys:
            runs[key] = run_study(key, out, args.quick)
    keys = [k for k in STUDIES if k in keys or (out / f"{STUDIES[k][1]}.json").is_file()]
    for key in keys:
        runs.setdefault(key, {"seconds": load(out, STUDIES[key][1]).get("seconds", 0.0)})
    from wf_pipeline.runtime.atomic_io import write_text

    block = results_block(out, keys, runs, out)  # links relative to results/ itself
    write_text(out / "research.md", block)
    if readme is not None:
        block = results_block(out, keys, runs, readme.resolve().parent)
        replace_block(readme, block)
    print(block)
    print(json.dumps({"benchmark": "run_all", "quick": args.quick, "out": str(out),
                      "readme": str(readme) if readme else None,
                      "studies": runs, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
