"""What every benchmark shares: torch's thread count, the facts of the machine it ran on, progress lines.

Benchmarks run as scripts (``python benchmarks/x.py``), so each puts the repository on ``sys.path`` and
imports this module as ``benchmarks._shared``. Importing it loads nothing heavy (torch is imported only
by :func:`set_threads`), so a script may import it before torch to keep OMP_WAIT_POLICY's default
(see wf_pipeline/__init__.py) in force.
"""
from __future__ import annotations

import math
import os
import platform
import sys
from typing import Any


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads when a count is given (None or 0 keeps torch's default); the count in use."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    return torch.get_num_threads()


def load_average() -> float:
    """The 1-minute load average (NaN where the platform has none): the CPU is shared, timings move with it."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else math.nan


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what the platform module knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def machine() -> dict[str, Any]:
    """Machine facts for a benchmark's JSON: cores, CPU model, load average now, platform and Python."""
    load = load_average()
    return {"cpus": os.cpu_count(), "cpu": cpu_model(), "load_1min": None if math.isnan(load) else load,
            "platform": platform.platform(), "python": platform.python_version()}


def machine_line() -> str:
    """The same facts in words, for a benchmark's first printed line."""
    return f"{os.cpu_count()} cores ({cpu_model()}), load average {load_average():.2f}"


def log(text: str) -> None:
    """A progress line: on stderr, flushed at once, so stdout keeps the results and the JSON last line."""
    print(text, file=sys.stderr, flush=True)


def interleaved_p50(files: dict[str, Any], shape: tuple[int, ...], repeats: dict[int, int],
                    warmup: int = 5) -> dict[str, dict[int, float]]:
    """p50 ms of every ONNX file at every batch size in `repeats` (batch -> timed rounds), all files interleaved
    in one loop per batch size (alternating single runs), 1 intra-op thread, seeded standard-normal inputs."""
    import numpy as np

    from wf_pipeline.deploy.latency import measure_interleaved
    from wf_pipeline.deploy.ort_session import create_session

    sessions = {name: create_session(path, threads=1) for name, path in files.items()}
    out: dict[str, dict[int, float]] = {name: {} for name in files}
    rng = np.random.default_rng(0)
    for batch, rounds in repeats.items():
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        for name, stats in measure_interleaved(sessions, x, warmup=warmup, repeats=rounds).items():
            out[name][batch] = stats.p50
    return out
