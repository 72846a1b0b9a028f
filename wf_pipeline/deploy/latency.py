"""Latency measurement in ONNX Runtime: warm-up, repeated timed runs, models interleaved.

Timing two models one after the other lets machine drift (thermal state, a neighbour's job) land on
one of them only. Alternating single runs, with the order flipped every round (A B, B A, ...), puts
both models under the same conditions so their ratio is trustworthy even on a busy machine.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

from wf_pipeline.deploy.ort_session import input_name

ProgressFn = Callable[[str, int, int], None]


@dataclass
class LatencyStats:
    runs_ms: list[float]
    p50: float
    p90: float
    p99: float
    mean: float
    min: float
    max: float

    @classmethod
    def from_runs(cls, runs_ms: list[float]) -> LatencyStats:
        if not runs_ms:
            raise ValueError("no timed runs")
        array = np.asarray(runs_ms, dtype=np.float64)
        p50, p90, p99 = np.percentile(array, [50, 90, 99])
        return cls(
            runs_ms=[float(r) for r in runs_ms],
            p50=float(p50),
            p90=float(p90),
            p99=float(p99),
            mean=float(array.mean()),
            min=float(array.min()),
            max=float(array.max()),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _time_once(session, name: str, batch: np.ndarray) -> float:
    start = time.perf_counter_ns()
    session.run(None, {name: batch})
    return (time.perf_counter_ns() - start) / 1e6


def measure_interleaved(
    sessions: dict[str, Any],
    batch: np.ndarray,
    *,
    warmup: int,
    repeats: int,
    progress: ProgressFn | None = None,
    label: str = "latency",
) -> dict[str, LatencyStats]:
    """Per-session latency stats for one input batch; sessions are run alternately, order flipped each round."""
    if repeats < 1:
        raise ValueError("repeats must be >= 1")
    batch = np.ascontiguousarray(batch, dtype=np.float32)
    names = {key: input_name(session) for key, session in sessions.items()}
    keys = list(sessions)
    for _ in range(warmup):
        for key in keys:
            sessions[key].run(None, {names[key]: batch})
    runs: dict[str, list[float]] = {key: [] for key in keys}
    for round_index in range(repeats):
        order = keys if round_index % 2 == 0 else keys[::-1]
        for key in order:
            runs[key].append(_time_once(sessions[key], names[key], batch))
        if progress is not None:
            progress(label, round_index + 1, repeats)
    return {key: LatencyStats.from_runs(values) for key, values in runs.items()}
