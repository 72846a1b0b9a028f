"""How library code reports progress: a tiny callback interface the CLI renders with rich bars."""
from __future__ import annotations

from typing import Any, Protocol


class Reporter(Protocol):
    def start(self, task: str, total: int | None, description: str = "") -> None: ...
    def advance(self, task: str, completed: int, info: str = "") -> None: ...
    def finish(self, task: str) -> None: ...
    def message(self, text: str) -> None: ...


class NullReporter:
    """Default when nobody is watching (library use, tests)."""

    def start(self, task: str, total: int | None, description: str = "") -> None:
        pass

    def advance(self, task: str, completed: int, info: str = "") -> None:
        pass

    def finish(self, task: str) -> None:
        pass

    def message(self, text: str) -> None:
        pass


class RecordingReporter:
    """Keeps every call as (kind, task or text, detail): tests check that long steps report progress."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str, Any]] = []

    def start(self, task: str, total: int | None, description: str = "") -> None:
        self.events.append(("start", task, total))

    def advance(self, task: str, completed: int, info: str = "") -> None:
        self.events.append(("advance", task, completed))

    def finish(self, task: str) -> None:
        self.events.append(("finish", task, None))

    def message(self, text: str) -> None:
        self.events.append(("message", text, None))


class PhaseProgress:
    """Adapts (phase, done, total) callbacks (prune_step, validation) to one reporter task per phase.

    A total of 0 means unknown (e.g. a data loader without a length): the task gets no total."""

    def __init__(self, reporter: Reporter, label: str) -> None:
        self.reporter, self.label = reporter, label
        self.phase: str | None = None

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase != self.phase:
            self.__exit__()
            self.phase = phase
            self.reporter.start(f"{self.label} {phase}", total if total > 0 else None, f"{self.label}: {phase}")
        info = f"{phase} {done}/{total}" if total > 0 else f"{phase} {done}"
        self.reporter.advance(f"{self.label} {phase}", done, info)

    def __enter__(self) -> PhaseProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.phase is not None:
            self.reporter.finish(f"{self.label} {self.phase}")
