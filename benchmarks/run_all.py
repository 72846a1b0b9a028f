"""Regenerate every research table and plot (RQ1-RQ5) into results/ and the results block of docs/research.md.

Each study runs as its own process (one command, one table, one plot, one JSON: see the scripts);
this script then writes ``<out>/research.md`` — per research question the paper's claim, our measured
answer, where they differ, the table and the plot — and replaces the block of docs/research.md between
``<!-- results:begin -->`` and ``<!-- results:end -->`` with it. Every figure in the block comes from the
studies' JSON files; nothing is typed by hand.

    python benchmarks/run_all.py                 # full run (<= 60 min on 2 cores): results/, docs/research.md
                                                 # and the research-summary block of README.md
    python benchmarks/run_all.py --quick         # <= 3 min; writes results-quick/ and leaves docs/research.md alone
    python benchmarks/run_all.py --quick --out /tmp/r --doc /tmp/research.md   # quick, into a copy

The last stdout line is one JSON object: per study its wall time and output files.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from benchmarks.research.common import (  # noqa: E402
    LABEL_COLUMNS,
    LABELS,
    MdTable,
    log,
    mean_std,
    mean_text,
    parse_tables,
    parse_value,
)

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"
SUMMARY_BEGIN, SUMMARY_END = "<!-- research-summary:begin -->", "<!-- research-summary:end -->"
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


@dataclass(frozen=True)
class Cited:
    """One table cell a "where they differ" statement quotes: table, row and column index, text as printed."""

    table: int
    row: int
    column: int
    text: str


@dataclass
class Differ:
    """The "where they differ" text of one study, built cell by cell from the tables of its ``<name>.md``.

    Every result cell a comparison looks at is recorded in `examined`; `references` are rows that are
    the yardstick, not a competitor (exact Hessian, true Fisher, dense). Statements quote cells through
    :meth:`cite`, so each number in the text is the table's, as printed (tests/test_research.py checks
    both: every quoted cell is the table's, and no result cell is left unexamined).
    """

    tables: list[MdTable]
    statements: list[tuple[str, list[Cited]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    examined: set[tuple[int, int, int]] = field(default_factory=set)
    references: set[tuple[int, int]] = field(default_factory=set)

    def value(self, t: int, r: int, c: int) -> float | None:
        """The cell's mean, marked examined (None for a cell with no number: ``—``, ``nan``)."""
        parsed = parse_value(self.tables[t].rows[r][c])
        if parsed is None:
            return None
        self.examined.add((t, r, c))
        return parsed[0]

    def std(self, t: int, r: int, c: int) -> float:
        parsed = parse_value(self.tables[t].rows[r][c])
        return parsed[1] or 0.0 if parsed else 0.0

    def cite(self, t: int, r: int, c: int) -> tuple[str, Cited]:
        text = self.tables[t].rows[r][c]
        self.value(t, r, c)
        return mean_text(text), Cited(t, r, c, text)

    def say(self, text: str, cited: list[Cited]) -> None:
        self.statements.append((text, cited))

    def reference(self, t: int, r: int) -> None:
        self.references.add((t, r))

    def text(self) -> str:
        parts = [text for text, _ in self.statements] + self.notes
        total = sum(len(table.result_cells()) for table in self.tables)
        return "; ".join(parts or ["none"]) + f" (checked over all {total} result cells of {len(self.tables)} " \
            f"table{'s' if len(self.tables) > 1 else ''})."


def rows_by(table: MdTable, *columns: str) -> dict[tuple[str, ...], int]:
    """Row index by its label cells (e.g. block and method)."""
    cols = [table.col(c) for c in columns]
    return {tuple(row[c] for c in cols): r for r, row in enumerate(table.rows)}


def versus(d: Differ, t: int, c: int, ours: int, theirs: int, better: str, margin: float = 0.0) -> Cited | None:
    """Compare two rows in one column; the other row's cell when it beats ours by more than `margin`."""
    a, b = d.value(t, ours, c), d.value(t, theirs, c)
    if a is None or b is None:
        return None
    if better == "ratio":  # closer to 1 is better; undefined for a non-positive ratio
        if a <= 0 or b <= 0:
            return None
        a, b = -abs(math.log(a)), -abs(math.log(b))
    elif better == "lower":
        a, b = -a, -b
    if b > a + margin:
        return Cited(t, theirs, c, d.tables[t].rows[theirs][c])
    return None


def beaten(d: Differ, t: int, c: int, ours: int, theirs: int, better: str,
           margin: float = 0.0) -> tuple[tuple[str, Cited], tuple[str, Cited]] | None:
    """:func:`versus`, with both cells cited when `theirs` wins: ``((their text, cell), (our text, cell))``."""
    if versus(d, t, c, ours, theirs, better, margin) is None:
        return None
    return d.cite(t, theirs, c), d.cite(t, ours, c)


RQ1_BETTER = {"inv err": "lower", "stat ρ": "higher", "single ρ": "higher", "single median rel err": "lower",
              "group ΔL 10%": "lower", "group ΔL 30%": "lower", "group ΔL 50%": "lower", "pred/actual 50%": "ratio"}
RQ1_REFERENCES = ("exact Hessian H₊", "true Fisher")


def section_rq1(data: dict[str, Any], tables: list[MdTable]) -> tuple[str, str, Differ]:
    claim = ("WoodFisher's empirical-Fisher inverse approximates the inverse Hessian more faithfully than K-FAC "
             "and the diagonal Fisher, and improves as more gradients N are used.")
    lines = []
    pipeline_n = data.get("pipeline_n", 1000)
    for block, methods in data["summary"].items():
        wf, kf, dg = methods["WoodFisher"], methods["K-FAC"], methods["diagonal Fisher"]
        curves = next(b for b in data["blocks"] if b["block"] == block)["curves"]
        at_n = {name: {p["n"]: p for p in points} for name, points in curves.items()}
        small = (f" (at the pipeline's N = {pipeline_n:,}: {at_n['WoodFisher'][pipeline_n]['inv_err']:.3f} / "
                 f"{at_n['K-FAC'][pipeline_n]['inv_err']:.3f} / {at_n['diagonal Fisher'][pipeline_n]['inv_err']:.3f})"
                 if pipeline_n in at_n["WoodFisher"] and pipeline_n != data["n_grid"][-1] else "")
        lines.append(f"{block}: inverse error at N = {data['n_grid'][-1]:,} WoodFisher {wf['inv_err']:.3f}, K-FAC "
                     f"{kf['inv_err']:.3f}, diagonal {dg['inv_err']:.3f}{small}, true Fisher "
                     f"{methods['true Fisher']['inv_err']:.3f}; statistic rank correlation "
                     f"{wf['stat_spearman']:.3f} / {kf['stat_spearman']:.3f} / {dg['stat_spearman']:.3f}; "
                     f"loss increase "
                     f"after removing 50% of the block {wf['group50_actual']:.4f} / {kf['group50_actual']:.4f} / "
                     f"{dg['group50_actual']:.4f} (exact Hessian {methods['exact Hessian']['group50_actual']:.4f})")
    curve = next(b for b in data["blocks"] if b["block"] == data["curve_layer"])["curves"]["WoodFisher"]
    lines.append(f"WoodFisher's inverse error on {data['curve_layer']} goes from {curve[0]['inv_err']:.3f} at N = "
                 f"{curve[0]['n']:,} to {curve[-1]['inv_err']:.3f} at N = {curve[-1]['n']:,}")

    d = Differ(tables)
    main = tables[0]
    rows = rows_by(main, "block", "method")
    for (_, method), r in rows.items():
        if method in RQ1_REFERENCES:
            d.reference(0, r)
    for block in dict.fromkeys(b for b, _ in rows):
        ours = rows[(block, "WoodFisher")]
        for other in ("K-FAC", "diagonal Fisher", "magnitude"):
            theirs = rows[(block, other)]
            wins = []
            for column, better in RQ1_BETTER.items():
                c = main.col(column)
                cells = beaten(d, 0, c, ours, theirs, better)
                if cells:
                    wins.append((column, *cells))
            if wins:
                d.say(f"on {block} {other} is better than WoodFisher in " + ", ".join(
                    f"{column} ({a} vs {b})" for column, (a, _), (b, _) in wins),
                    [cite for _, (_, x), (_, y) in wins for cite in (x, y)])
    if len(tables) > 1:  # the pipeline's N beside the largest N
        nt = tables[1]
        rows = rows_by(nt, "block", "method")
        ns = sorted({h.rsplit("N = ", 1)[1] for h in nt.header if "N = " in h}, key=lambda n: int(n.replace(",", "")))
        for block in dict.fromkeys(b for b, _ in rows):
            ours = rows[(block, "WoodFisher")]
            for metric, better in (("inv err", "lower"), ("stat ρ", "higher"), ("group ΔL 50%", "lower")):
                first, last = nt.col(f"{metric} N = {ns[0]}"), nt.col(f"{metric} N = {ns[-1]}")
                for other in ("K-FAC", "diagonal Fisher"):
                    d.value(1, rows[(block, other)], last)  # compared in the main table (the same figure)
                    cells = beaten(d, 1, first, ours, rows[(block, other)], better)
                    if cells:
                        (a, x), (b, y) = cells
                        d.say(f"at the pipeline's N = {ns[0]} on {block} {other} is better than WoodFisher in "
                              f"{metric} ({a} vs {b})", [x, y])
                if first != last and versus(d, 1, first, ours, ours, better) is None:
                    a_val, b_val = d.value(1, ours, first), d.value(1, ours, last)
                    if a_val is not None and b_val is not None and not (
                            b_val < a_val if better == "lower" else b_val > a_val):
                        (a, x), (b, y) = d.cite(1, ours, first), d.cite(1, ours, last)
                        d.say(f"on {block} WoodFisher's {metric} does not improve from N = {ns[0]} to "
                              f"N = {ns[-1]} ({a} vs {b})", [x, y])
    d.notes.append("WoodFisher approximates the empirical Fisher (K-FAC here the true Fisher's factors), so its "
                   "error does not go to zero: it stays at the empirical-vs-Hessian distance, above the true Fisher's")
    return claim, "; ".join(lines) + ".", d


def section_rq2(data: dict[str, Any], tables: list[MdTable]) -> tuple[str, str, Differ]:
    claim = ("A more faithful inverse-Hessian gives better one-shot pruning: WoodFisher beats K-FAC, the diagonal "
             "Fisher and magnitude, by a wide margin at high sparsity.")
    measured = []
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
            others = ", ".join(f"{LABELS[m]} {fmt_pct(mean[m][key][hard])}" for m in mean if m != "woodfisher")
            measured.append(f"{model} {label}: WoodFisher (joint) best or within 0.5 points of the best at {wins} of "
                            f"{len(sparsities)} sparsities; at {float(hard):.0%} WoodFisher (joint) "
                            f"{fmt_pct(mean['woodfisher'][key][hard])} vs {others}")

    d = Differ(tables)
    baseline_cells: list[str] = []
    baseline_cited: list[Cited] = []
    pairs: dict[str, list[tuple[str, str, str, list[Cited]]]] = {}
    for t, table in enumerate(tables):
        where = _rq2_table_name(table.caption)
        rows = {method: r for (method, ), r in rows_by(table, "method").items()}
        ours = rows[LABELS["woodfisher"]]
        for c in range(1, len(table.header)):
            column = table.header[c]
            # The product's method against every baseline outside the WoodFisher family.
            beaten = []
            for method, r in rows.items():
                if method.startswith(("WoodFisher", "WoodTaylor")) or method.startswith("K-FAC"):
                    continue
                if versus(d, t, c, ours, r, "higher", margin=0.5):
                    beaten.append((method, d.cite(t, r, c)))
            if beaten:
                b, y = d.cite(t, ours, c)
                baseline_cells.append(f"{where} at {column}: " + ", ".join(f"{m} {a}" for m, (a, _) in beaten)
                                      + f" vs WoodFisher (joint) {b}")
                baseline_cited += [x for _, (_, x) in beaten] + [y]
            # Each curvature under the same update rule, and the other WoodFisher-family rows.
            for name, (mine, theirs) in RQ2_PAIRS.items():
                if mine not in rows or theirs not in rows:
                    continue
                a_val, b_val = d.value(t, rows[mine], c), d.value(t, rows[theirs], c)
                if a_val is None or b_val is None:
                    continue
                diff = a_val - b_val
                verdict = "wide" if diff > 5 else "ahead" if diff > 0.5 else "behind" if diff < -0.5 else "within"
                (a, x), (b, y) = d.cite(t, rows[mine], c), d.cite(t, rows[theirs], c)
                pairs.setdefault(name, []).append((verdict, f"{where} at {column}", f"{a} vs {b}", [x, y]))
    if baseline_cells:
        d.say("a baseline beats WoodFisher (joint) by more than 0.5 points in " + "; ".join(baseline_cells),
              baseline_cited)
    else:
        d.notes.append("no baseline outside the WoodFisher family beats WoodFisher (joint) by more than 0.5 points")
    for name, cells in pairs.items():
        mine, theirs = RQ2_PAIRS[name]
        count = {v: sum(1 for verdict, *_ in cells if verdict == v) for v in ("wide", "ahead", "within", "behind")}
        behind = [(where, text, cited) for verdict, where, text, cited in cells if verdict == "behind"]
        d.say(f"{name}: {mine} ahead of {theirs} by more than 0.5 points in {count['wide'] + count['ahead']} of "
              f"{len(cells)} cells (by more than 5 in {count['wide']}), within 0.5 in {count['within']}, "
              f"behind by more than 0.5 in {count['behind']}"
              + (": " + "; ".join(f"{where} ({text})" for where, text, _ in behind) if behind else ""),
              [c for _, _, cited in behind for c in cited])
    return claim, "; ".join(measured) + ".", d


# (row, row compared with) per line of RQ2's "where they differ": one curvature against the other under
# the same update rule, K-FAC's literature rule against the product, and WoodFisher's variants.
RQ2_PAIRS = {
    "same rule, joint, same 128-weight blocks": ("WoodFisher (joint)", "K-FAC OBS (joint)"),
    "same rule, independent, same blocks": ("WoodFisher (independent)", "K-FAC OBS (independent)"),
    "same rule, independent, K-FAC over the whole layer": ("WoodFisher (independent)",
                                                           "K-FAC OBS (independent, whole layer)"),
    "the product against K-FAC's literature rule": ("WoodFisher (joint)", "K-FAC OBS (independent, whole layer)"),
    "update rule within WoodFisher": ("WoodFisher (joint)", "WoodFisher (independent)"),
    "update rule within K-FAC": ("K-FAC OBS (joint)", "K-FAC OBS (independent)"),
    "first-order term": ("WoodFisher (joint)", "WoodTaylor (joint)"),
}


def _rq2_table_name(caption: str) -> str:
    model = caption.split("**")[1] if caption.startswith("**") else caption.split(",")[0]
    return f"{model} {'with BN recalibration' if 'BatchNorm' in caption else 'as pruned'}"


def section_rq3(data: dict[str, Any], tables: list[MdTable]) -> tuple[str, str, Differ]:
    claim = ("With the same gradual-pruning budget WoodFisher ends more accurate than global magnitude pruning, "
             "the more so the higher the sparsity, and generalises well.")
    s = data["summary"]
    measured = []
    for t in data["targets"]:
        k = int(round(t * 100))
        diff = s[f"woodfisher_{k}"] - s[f"magnitude_{k}"]
        spread = {m: mean_std([r["test_accuracy"] for r in data["rows"] if r["method"] == m and r["target"] == t])[1]
                  for m in ("woodfisher", "magnitude")}
        measured.append(f"{k}%: WoodFisher {fmt_pct(s[f'woodfisher_{k}'])} ± {100 * spread['woodfisher']:.2f} "
                        f"vs magnitude {fmt_pct(s[f'magnitude_{k}'])} ± {100 * spread['magnitude']:.2f} "
                        f"over seeds ({100 * diff:+.2f} points; "
                        f"train−test gap {100 * s[f'woodfisher_gap_{k}']:+.2f} vs "
                        f"{100 * s[f'magnitude_gap_{k}']:+.2f} points"
                        + (f"; K-FAC OBS {fmt_pct(s[f'kfac_{k}'])}" if f"kfac_{k}" in s else "") + ")")

    d = Differ(tables)
    table = tables[0]
    rows = rows_by(table, "method", "target")
    for (method, _), r in rows.items():
        if method == "dense":
            d.reference(0, r)
    test_col = next(c for c, h in enumerate(table.header) if h.startswith("test accuracy"))
    gap_col = next(c for c, h in enumerate(table.header) if h.startswith("train − test"))
    others = [c for c in range(len(table.header)) if c not in (test_col, gap_col)
              and table.header[c] not in LABEL_COLUMNS]
    for target in dict.fromkeys(tg for m, tg in rows if m != "dense"):
        ours = rows[("WoodFisher", target)]
        for (method, tg), r in rows.items():
            if tg != target or method in ("WoodFisher", "dense"):
                continue
            (a, x), (b, y) = d.cite(0, ours, test_col), d.cite(0, r, test_col)
            lead = float(a) - float(b)
            noise = max(d.std(0, ours, test_col), d.std(0, r, test_col))
            shown = [c for c in others if d.value(0, ours, c) is not None and d.value(0, r, c) is not None]
            context = ", ".join(f"{table.header[c]} {d.cite(0, ours, c)[0]} vs {d.cite(0, r, c)[0]}" for c in shown)
            cited = [x, y] + [d.cite(0, row, c)[1] for c in shown for row in (ours, r)]
            if lead <= 0:
                d.say(f"at {target} WoodFisher is not more accurate than {method} ({a} vs {b}; {context})", cited)
            elif lead <= noise:
                d.say(f"at {target} WoodFisher's lead over {method} ({a} vs {b}) is within the spread over seeds "
                      f"(± {noise:.2f}; {context})", cited)
            (g, gx), (h, hy) = d.cite(0, ours, gap_col), d.cite(0, r, gap_col)
            if float(g) > float(h) + 0.25:
                d.say(f"at {target} WoodFisher generalises worse than {method}: train−test gap {g} vs {h} points",
                      [gx, hy])
    if len(data["targets"]) < 2:
        d.notes.append("with one target measured, whether the lead grows with sparsity is not tested here")
    if "validation_images" not in data:
        d.notes.append("this run predates the study's validation split and K-FAC baseline: no setting was tuned in "
                       "it, the damping is the default recipe's (picked on test accuracy)")
    budget = data["budget"]
    d.notes.append(f"fine-tuning budget {budget['finetune.epochs']} x {budget['finetune.steps_per_epoch']} steps "
                   + ("(the default recipe's full budget)" if data.get("full_budget") else
                      "(reduced; the default recipe has 10 x 180)"))
    return claim, "; ".join(measured) + ".", d


def section_rq4(data: dict[str, Any], tables: list[MdTable]) -> tuple[str, str, Differ]:
    claim = ("WoodFisher's global ranking sets per-layer sparsities automatically, as well as or better than a "
             "uniform or hand-tuned allocation.")
    measured = []
    for t in data["targets"]:
        row = {s: data["summary"][s][f"{t:g}"]["accuracy_bn"] for s in ("global", "uniform", "hand-tuned")}
        measured.append(f"{t:.0%} (BN recalibrated): global {fmt_pct(row['global'])}, "
                        f"uniform {fmt_pct(row['uniform'])}, "
                        f"hand-tuned {fmt_pct(row['hand-tuned'])}")
    layers = data["woodfisher_per_layer_sparsity"]
    first, last = next(iter(layers)), list(layers)[-1]
    measured.append(f"at {data['targets'][-1]:.0%} WoodFisher pruned the first layer to {layers[first]:.1%} and the "
                    f"classifier to {layers[last]:.1%}")
    d = Differ(tables)
    table = tables[0]
    rows = rows_by(table, "allocation")
    ours = next(r for label, r in rows.items() if label[0].startswith("WoodFisher global"))
    for (label, ), r in rows.items():
        if r == ours:
            continue
        for c in range(1, len(table.header)):
            cells = beaten(d, 0, c, ours, r, "higher", margin=0.5)
            if cells:
                (a, x), (b, y) = cells
                d.say(f"at {table.header[c]} the {label} allocation beats the global ranking ({a} vs {b})", [x, y])
    d.notes.append("one-shot only; the paper shows the automatic allocation for gradual pruning")
    return claim, "; ".join(measured) + ".", d


def section_rq5(data: dict[str, Any], tables: list[MdTable]) -> tuple[str, str, Differ]:
    claim = "WoodFisher needs little data: with a few samples per class it still beats magnitude pruning."
    measured = []
    for t in data["targets"]:
        row = data["summary"][f"{t:g}"]
        ks = [str(k) for k in data["per_class"]]
        beating = [k for k in ks if row[k] > row["magnitude"]]
        measured.append(f"{t:.0%}: WoodFisher from {fmt_pct(row[ks[0]])} ({ks[0]}/class) to {fmt_pct(row[ks[-1]])} "
                        f"({ks[-1]}/class) vs magnitude {fmt_pct(row['magnitude'])}; beats magnitude from "
                        f"{beating[0] + '/class' if beating else 'no k'} on")
    d = Differ(tables)
    table = tables[0]
    rows = rows_by(table, "samples per class")
    magnitude = next(r for label, r in rows.items() if label[0].startswith("global magnitude"))
    for (k, ), r in rows.items():
        if r == magnitude:
            continue
        for c, header in enumerate(table.header):
            if header in LABEL_COLUMNS:
                continue
            cells = beaten(d, 0, c, r, magnitude, "higher", margin=-1e-9)  # magnitude at least as good
            if cells:
                (b, y), (a, x) = cells
                d.say(f"with {k} samples per class {header} does not beat magnitude ({a} vs {b})", [x, y])
    return claim, "; ".join(measured) + ".", d


SECTIONS: dict[str, tuple[str, Callable[[dict[str, Any], list[MdTable]], tuple[str, str, Differ]]]] = {
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
             f"`{rel}/`; this block is rewritten from those files ({total / 60:.1f} min wall{cpu_text} in all"
             + (" for each study's last call (those marked below reused units of earlier, stopped calls)"
                if any(load(out, STUDIES[k][1]).get("resumed_units") for k in keys) else "")
             + " on a 2-core machine shared with other jobs; each study's wall time and the load average at its end "
             "are under its title).\n"]
    for key in keys:
        script, name = STUDIES[key]
        title, builder = SECTIONS[key]
        data = load(out, name)
        table = (out / f"{name}.md").read_text().strip()
        claim, measured, differ = builder(data, parse_tables(table))
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
                     f"- **Where they differ:** {differ.text()}\n\n"
                     f"{table}\n\n![{key.upper()}]({rel}/{name}.png)\n")
    return "\n".join(parts)


SUMMARY_ROWS = ("WoodFisher (joint)", "WoodFisher (independent)", "K-FAC OBS (joint)", "K-FAC OBS (independent)",
                "global magnitude")
SUMMARY_SPARSITIES = ("70%", "80%", "90%")


def summary_block(out: Path, doc: Path | None = None, summary_dir: Path | None = None) -> str:
    """The README's research summary: RQ2's ResNet-20 cells (copied as printed) and RQ3's gradual result; `doc`
    (linked relative to `summary_dir`) is the page with the whole research block."""
    rq2 = parse_tables((out / "rq2_oneshot.md").read_text())
    resnet = [t for t in rq2 if t.caption.startswith("**ResNet-20**")]
    pruned, recal = (next(t for t in resnet if ("BatchNorm" in t.caption) == bn) for bn in (False, True))
    data = load(out, "rq2_oneshot")
    header = ["ResNet-20, one-shot", *SUMMARY_SPARSITIES, *[f"{s} BN recal." for s in SUMMARY_SPARSITIES]]
    rows = []
    for method in [m for m in SUMMARY_ROWS if m in {r[0] for r in pruned.rows}]:
        cells = [table.rows[[r[0] for r in table.rows].index(method)][table.col(s)]
                 for table in (pruned, recal) for s in SUMMARY_SPARSITIES]
        rows.append("| " + " | ".join([method, *cells]) + " |")
    mode = "quick run, not evidence" if data.get("quick") else data.get("reduced") or "full run"
    full = (out / "rq3_gradual_full.json").is_file()
    lines = [f"<!-- generated by benchmarks/run_all.py from {out.name}/rq2_oneshot.md and rq3_gradual.json"
             f"{' and rq3_gradual_full.json' if full else ''}; do not edit by hand -->",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header), *rows, ""]
    source = (f"[{doc.name}]({os.path.relpath(doc.resolve(), (summary_dir or out).resolve()).replace(os.sep, '/')})"
              if doc is not None else f"`{out.name}/`")
    legend = (f"RQ2 and RQ3 of {source}. Test accuracy (%), mean ± std over {len(data['seeds'])} Fisher draws of "
              f"N = {data['num_grads']:,} "
              f"(λ = {data['damp']:g}; {mode}); \"joint\"/\"independent\": the OBS update rule, the same for "
              f"both curvatures.")
    lines.append(f"{legend} {gradual_sentence(out, 'rq3_gradual')}")
    if full:  # the default recipe's own budget (possibly a part of the grid)
        lines[-1] += " " + gradual_sentence(out, "rq3_gradual_full")
    return "\n".join(lines)


def gradual_sentence(out: Path, name: str) -> str:
    """RQ3's test accuracies per target from `name`.md's table (WoodFisher vs magnitude vs K-FAC), and at how
    many targets WoodFisher leads magnitude by more than the spread over seeds, in one sentence."""
    rq3 = load(out, name)
    table = parse_tables((out / f"{name}.md").read_text())[0]
    test_col = next(c for c, h in enumerate(table.header) if h.startswith("test accuracy"))
    by = {(row[table.col("method")], row[table.col("target")]): row[test_col] for row in table.rows}
    budget = rq3["budget"]
    seeds = len({r["seed"] for r in rq3["rows"]})
    steps = budget["finetune.epochs"] * budget["finetune.steps_per_epoch"]
    targets = list(dict.fromkeys(t for m, t in by if m == "WoodFisher"))
    ahead = []
    for target in targets:
        ours, theirs = parse_value(by[("WoodFisher", target)]), parse_value(by[("global magnitude", target)])
        if ours and theirs and ours[0] - theirs[0] > max(ours[1] or 0.0, theirs[1] or 0.0):
            ahead.append(target)
    gradual = "; ".join(f"{target}: WoodFisher {by[('WoodFisher', target)]} vs global magnitude "
                      f"{by[('global magnitude', target)]}"
                      + (f" vs K-FAC OBS {by[('K-FAC OBS', target)]}" if ("K-FAC OBS", target) in by else "")
                      for target in targets)
    budget_words = ("the default recipe's own budget" if rq3.get("full_budget")
                    else "reduced from the default recipe's 1,800")
    part = f"; a part of the study: {rq3['reduced']}" if rq3.get("full_budget") and rq3.get("reduced") else ""
    return (f"After gradual pruning with fine-tuning (RQ3: {steps:,} optimizer steps, {budget_words}, {seeds} seeds"
            f"{', quick run' if rq3.get('quick') else ''}{part}), test accuracy (%): {gradual}. "
            f"WoodFisher leads global magnitude by more than the spread over seeds at {len(ahead)} of "
            f"{len(targets)} targets{' (' + ', '.join(ahead) + ')' if ahead else ''}.")


def replace_block(readme: Path, block: str, begin: str = BEGIN, end: str = END) -> None:
    from wf_pipeline.runtime.atomic_io import write_text

    text = readme.read_text()
    if begin not in text or end not in text:
        raise SystemExit(f"[run_all] {readme} has no {begin} ... {end} markers")
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    write_text(readme, f"{head}{begin}\n{block}\n{end}{tail}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, help="results folder (default results/, or results-quick/ with --quick)")
    parser.add_argument("--doc", "--readme", dest="doc", type=Path,
                        help="Markdown file whose results block to update "
                             "(default docs/research.md for a full run into results/)")
    parser.add_argument("--summary", type=Path,
                        help="Markdown file whose research-summary block to update (default README.md for a full run "
                             "into results/)")
    parser.add_argument("--only", nargs="+", choices=list(STUDIES),
                        help="run only these studies (the block still covers every study with results in --out)")
    parser.add_argument("--no-run", action="store_true", help="only rebuild the block from existing JSON files")
    args = parser.parse_args()
    out = (args.out or REPO / ("results-quick" if args.quick else "results")).resolve()
    default_run = not args.quick and args.out is None
    readme = args.doc or (REPO / "docs" / "research.md" if default_run else None)
    summary = args.summary or (REPO / "README.md" if default_run else None)
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
    if summary is not None and {"rq2", "rq3"} <= set(keys):
        replace_block(summary, summary_block(out, readme, summary.parent), SUMMARY_BEGIN, SUMMARY_END)
    print(block)
    print(json.dumps({"benchmark": "run_all", "quick": args.quick, "out": str(out),
                      "readme": str(readme) if readme else None,
                      "studies": runs, "seconds": round(time.perf_counter() - started, 1)}))


if __name__ == "__main__":
    main()
