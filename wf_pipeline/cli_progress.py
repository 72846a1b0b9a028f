"""Rich progress bars for the CLI: renders the library's Reporter callbacks."""
from __future__ import annotations

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class RichReporter:
    def __init__(self, console: Console) -> None:
        self.console = console
        self.progress = Progress(
            TextColumn("[bold blue]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
            console=console, transient=False,
        )
        self.tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def start(self, task: str, total: int | None, description: str = "") -> None:
        if task in self.tasks:
            self.progress.reset(self.tasks[task], total=total)
        else:
            self.tasks[task] = self.progress.add_task(description or task, total=total, info="")

    def advance(self, task: str, completed: int, info: str = "") -> None:
        if task not in self.tasks:
            self.start(task, None)
        self.progress.update(self.tasks[task], completed=completed, info=info)

    def finish(self, task: str) -> None:
        task_id = self.tasks.pop(task, None)
        if task_id is not None:
            total = self.progress.tasks[[t.id for t in self.progress.tasks].index(task_id)].total
            self.progress.update(task_id, completed=total or 0)
            self.progress.remove_task(task_id)

    def message(self, text: str) -> None:
        self.progress.console.print(text)
