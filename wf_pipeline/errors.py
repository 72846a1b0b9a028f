"""User-facing errors: the CLI prints them as one line plus a hint and exits with code 2."""
from __future__ import annotations


class WFError(Exception):
    """A known problem caused by the user's input (recipe, file, name), not by a bug."""

    exit_code = 2

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} (hint: {self.hint})" if self.hint else self.message


class RecipeError(WFError):
    """The recipe is invalid: names the field and how to fix it."""


class GateFailure(Exception):
    """One or more deployment gates failed (exit code 1, not a user-input error)."""

    exit_code = 1
