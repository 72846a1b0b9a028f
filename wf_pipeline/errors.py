"""User-facing errors and the exit codes the CLI maps them to.

Exit codes (the same for plain and multi-process launches):
0 success, 1 a deployment gate failed, 2 bad input (one line naming the field and the fix),
3 an unexpected crash (a bug: the traceback goes to the run's log.txt), 130 interrupted.
"""
from __future__ import annotations

EXIT_OK = 0
EXIT_GATE_FAILED = 1
EXIT_BAD_INPUT = 2
EXIT_CRASH = 3
EXIT_INTERRUPTED = 130


class WFError(Exception):
    """A known problem caused by the user's input (recipe, file, name), not by a bug."""

    exit_code = EXIT_BAD_INPUT

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class RecipeError(WFError):
    """The recipe is invalid: names the field and how to fix it."""


class RunAlreadyFinished(Exception):
    """`--resume` of a run that already finished: nothing to do. Carries the recorded outcome."""

    def __init__(self, run_dir: str, status: dict) -> None:
        super().__init__(f"run {run_dir} already finished")
        self.run_dir = run_dir
        self.status = status

    @property
    def exit_code(self) -> int:
        return EXIT_GATE_FAILED if self.status.get("gates_passed") is False else EXIT_OK
