"""Run the real `wf-pipeline` entry point in-process and capture its exit code and output."""
from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest

from wf_pipeline.cli import main


@dataclass
class CliResult:
    code: int
    out: str
    err: str


def run_cli(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, *args: str) -> CliResult:
    monkeypatch.setattr(sys, "argv", ["wf-pipeline", *args])
    code = 0
    try:
        main()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    captured = capsys.readouterr()
    return CliResult(code, captured.out, captured.err)
