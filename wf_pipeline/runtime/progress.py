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


class RecordingReporter(NullReporter):
    """Keeps every call: useful in tests to check that long steps report progress."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []

    def start(self, task: str, total: int | None, description: str = "") -> None:
        self.events.append(("start", task))

    def message(self, text: str) -> None:
        self.events.append(("message", text))
