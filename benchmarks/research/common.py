"""Shared plumbing of the research studies: output folder, markdown tables, plots, the JSON last line.

Every study writes ``<out>/<name>.md`` (the table), ``<out>/<name>.png`` (the plot) and
``<out>/<name>.json`` (every figure), and prints the table then one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # scripts run as `python benchmarks/research/x.py`
    sys.path.insert(0, str(REPO))

import wf_pipeline  # noqa: E402,F401  - first: it sets OMP_WAIT_POLICY before torch loads
from benchmarks._shared import log, machine  # noqa: E402  - threads, machine facts, progress: shared by all benchmarks

DEFAULT_OUT = REPO / "results"
# Row names of the one-shot methods in the studies' tables (the update rule in brackets).
LABELS = {
    "woodfisher": "WoodFisher (joint)",
    "woodfisher_independent": "WoodFisher (independent)",
    "kfac_joint": "K-FAC OBS (joint)",
    "kfac_independent": "K-FAC OBS (independent)",
    "kfac": "K-FAC OBS (independent, whole layer)",
    "woodtaylor": "WoodTaylor (joint)",
    "diag_fisher": "diagonal Fisher",
    "magnitude": "global magnitude",
    "magnitude_uniform": "uniform magnitude",
}


def study_parser(doc: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a small version for CI (seconds to a minute)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for the table, plot and JSON")
    parser.add_argument("--resume", action="store_true",
                        help="reuse what a stopped run of this configuration finished (<out>/<name>.partial.jsonl)")
    return parser


class UnitLog:
    """Finished units of a long study (one run, one pruned model), one JSON line each in ``<out>/<name>.partial.jsonl``.

    Lines are appended as units finish, by any worker process (a short ``O_APPEND`` write is atomic), so a
    run that is stopped keeps what it finished and ``--resume`` does only the rest. A line counts only
    for the same `config` (every setting that changes a unit's figures); a torn last line is ignored.
    The file is removed once the study has written its outputs.
    """

    def __init__(self, out: Path, name: str, config: dict[str, Any], resume: bool) -> None:
        self.path = out / f"{name}.partial.jsonl"
        self.config = json.loads(json.dumps(config, default=str))
        self.done: dict[str, Any] = {}
        if resume and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("config") == self.config:
                    self.done[entry["key"]] = entry["value"]
            log(f"[resume] {len(self.done)} finished units reused from {self.path}")
        elif self.path.exists():
            self.path.unlink()

    def add(self, key: str, value: Any) -> None:
        line = json.dumps({"key": key, "config": self.config, "value": value}, default=float) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, line.encode())
        finally:
            os.close(fd)

    def finish(self) -> None:
        self.path.unlink(missing_ok=True)


class CellStore:
    """Finished units of a study, one JSON file each in a work folder (``--work-dir``), reused when present.

    Unlike :class:`UnitLog` the files stay after the study: several processes, each given a part of the
    grid, write their cells into one folder, and a last call over the whole grid only assembles them.
    A file counts only for the same `config`; it is written atomically when its unit is done.
    """

    def __init__(self, folder: Path, config: dict[str, Any]) -> None:
        self.folder = folder
        self.config = json.loads(json.dumps(config, default=str))
        self.done: dict[str, Any] = {}
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(folder.glob("*.json")):
            try:
                entry = json.loads(path.read_text())
            except (json.JSONDecodeError, OSError):
                continue
            if entry.get("config") == self.config:
                self.done[entry["key"]] = entry["value"]
        log(f"[work-dir] {len(self.done)} finished cells reused from {folder}")

    def path(self, key: str) -> Path:
        return self.folder / (re.sub(r"[^A-Za-z0-9.=_-]+", "_", key) + ".json")

    def add(self, key: str, value: Any) -> None:
        from wf_pipeline.runtime.atomic_io import write_json

        write_json(self.path(key), {"key": key, "config": self.config, "value": value})
        self.done[key] = value

    def finish(self) -> None:
        """Cells stay: the folder is the study's record."""


def reduction(full: Mapping[str, Sequence[Any]], used: Mapping[str, Sequence[Any]]) -> str | None:
    """What a run left out of the full configuration, in words (None when it ran all of it)."""
    missing = [f"{key} {', '.join(map(str, used[key]))} of the full {', '.join(map(str, values))}"
               for key, values in full.items() if list(used[key]) != list(values)]
    return "; ".join(missing) or None


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    if not values:
        return math.nan, math.nan
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def pct(value: float, digits: int = 2) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{100 * value:.{digits}f}%"


def pm(values: Sequence[float], digits: int = 2) -> str:
    """Accuracy cell: ``mean ± std`` in percent (just the mean for one value)."""
    mean, std = mean_std(values)
    if math.isnan(mean):
        return "n/a"
    if len(values) == 1:
        return f"{100 * mean:.{digits}f}"
    return f"{100 * mean:.{digits}f} ± {100 * std:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(map(str, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


# Columns that label a row or count something (not a measured result).
LABEL_COLUMNS = frozenset({"block", "method", "target", "allocation", "samples per class", "N gradients", "seeds",
                           "chosen on validation"})
_VALUE = re.compile(r"^([+-]?\d+(?:\.\d+)?)%?(?: ± (\d+(?:\.\d+)?))?$")


@dataclass
class MdTable:
    """One Markdown table of a study's ``<name>.md`` as printed: the paragraph above it, header, cells."""

    caption: str
    header: list[str]
    rows: list[list[str]]

    def col(self, name: str) -> int:
        return self.header.index(name)

    def result_cells(self) -> list[tuple[int, int]]:
        """(row, column) of every measured value: numeric cells outside the label and count columns."""
        return [(r, c) for r, row in enumerate(self.rows) for c, text in enumerate(row)
                if self.header[c] not in LABEL_COLUMNS and parse_value(text) is not None]


def parse_value(text: str) -> tuple[float, float | None] | None:
    """``"93.57 ± 0.06"`` → (93.57, 0.06), ``"0.530"`` → (0.53, None); None for text, ``—``, ``nan``, empty."""
    match = _VALUE.match(text.strip())
    if not match:
        return None
    return float(match.group(1)), (float(match.group(2)) if match.group(2) else None)


def mean_text(text: str) -> str:
    """A cell's mean as printed (``"93.57 ± 0.06"`` → ``"93.57"``)."""
    return text.split(" ± ")[0].strip()


def parse_tables(markdown: str) -> list[MdTable]:
    """Every table of a Markdown text, in order, each with the paragraph just above it as its caption."""
    tables: list[MdTable] = []
    lines = markdown.splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith("|") and i + 1 < len(lines) and re.match(r"^\|(\s*-+\s*\|)+\s*$", lines[i + 1]):
            above = [line for line in lines[:i] if line.strip()]
            caption = above[-1] if above else ""
            header = [c.strip() for c in lines[i].strip().strip("|").split("|")]
            rows = []
            i += 2
            while i < len(lines) and lines[i].startswith("|"):
                rows.append([c.strip() for c in lines[i].strip()[1:-1].split("|")])
                i += 1
            tables.append(MdTable(caption, header, rows))
        else:
            i += 1
    return tables


def new_figure(ncols: int = 1, nrows: int = 1, size: tuple[float, float] = (6.0, 4.0)):  # -> (Figure, axes)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)


def save_outputs(out: Path, name: str, markdown: str, payload: dict[str, Any], figure: Any, started: float) -> None:
    """Write table, plot and JSON atomically, print the table and the JSON last line."""
    import matplotlib.pyplot as plt

    from wf_pipeline.runtime.atomic_io import atomic_path, write_json, write_text

    out.mkdir(parents=True, exist_ok=True)
    # The study's own process plus its finished worker processes.
    usages = map(resource.getrusage, (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    cpu = sum(u.ru_utime + u.ru_stime for u in usages)
    payload = {"study": name, **payload, "seconds": round(time.perf_counter() - started, 1),
               "cpu_seconds": round(cpu, 1), "machine": machine()}
    write_text(out / f"{name}.md", markdown)
    write_json(out / f"{name}.json", payload)
    with atomic_path(out / f"{name}.png") as tmp:
        figure.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    print(markdown)
    print(json.dumps(payload, default=float))
