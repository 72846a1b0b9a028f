"""Shared plumbing of the research studies: output folder, markdown tables, plots, the JSON last line.

Every study writes ``<out>/<name>.md`` (the table), ``<out>/<name>.png`` (the plot) and
``<out>/<name>.json`` (every figure), and prints the table then one JSON object as its last line.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # scripts run as `python benchmarks/research/x.py`
    sys.path.insert(0, str(REPO))

import wf_pipeline  # noqa: E402,F401  - first: it sets OMP_WAIT_POLICY before torch loads
from benchmarks._shared import log, machine  # noqa: E402  - threads, machine facts, progress: shared by all benchmarks

DEFAULT_OUT = REPO / "results"


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
