"""The run directory artifacts/<run-name>/: resolved recipe, environment, logs, metrics, checkpoints."""
from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from wf_pipeline import __version__
from wf_pipeline.atomic_io import write_json, write_yaml
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import Recipe


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def environment_info(seed: int) -> dict[str, Any]:
    import numpy
    import onnx
    import onnxruntime
    import torch
    import torchvision

    return {
        "wf_pipeline": __version__,
        "git_commit": _git_commit(),
        "seed": seed,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": numpy.__version__,
        "cuda_available": torch.cuda.is_available(),
        "torch_threads": torch.get_num_threads(),
    }


@dataclass
class RunDir:
    path: Path

    def file(self, *parts: str) -> Path:
        return self.path.joinpath(*parts)

    @property
    def checkpoints(self) -> Path:
        return self.path / "checkpoints"

    def append_history(self, record: dict[str, Any]) -> None:
        # A line-per-event log; history is rebuilt from the checkpoint on resume, so appends suffice.
        with open(self.path / "history.jsonl", "a", encoding="utf-8") as fh:
            fh.write(json.dumps(record, default=float) + "\n")

    def read_history(self) -> list[dict[str, Any]]:
        path = self.path / "history.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def rewrite_history(self, records: list[dict[str, Any]]) -> None:
        from wf_pipeline.atomic_io import write_text

        write_text(self.path / "history.jsonl", "".join(json.dumps(r, default=float) + "\n" for r in records))

    def write_metrics(self, metrics: dict[str, Any]) -> None:
        write_json(self.path / "metrics.json", metrics)

    def logger(self) -> logging.Logger:
        log = logging.getLogger(f"wf_pipeline.run.{self.path.name}")
        if not any(isinstance(h, logging.FileHandler) for h in log.handlers):
            handler = logging.FileHandler(self.path / "log.txt", encoding="utf-8")
            handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
            log.addHandler(handler)
            log.setLevel(logging.INFO)
            log.propagate = False
        return log


def open_run_dir(recipe: Recipe, *, resume: bool = False, overwrite: bool = False, kind: str = "compress") -> RunDir:
    """Create artifacts/<run-name>/ atomically (a temp folder renamed into place), or reopen it to resume."""
    root = Path(recipe.output.root)
    final = root / recipe.run_name()
    if final.exists():
        if resume:
            return RunDir(final)
        if not overwrite:
            raise WFError(f"output: run directory {final} already exists",
                          "pass --resume to continue it, --overwrite to replace it, or --set output.run_name=NEW")
    elif resume:
        raise WFError(f"--resume: no run directory {final} to resume", "run without --resume to start it")
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=root))
    try:
        write_yaml(staging / "recipe.yaml", recipe.to_dict())
        write_json(staging / "environment.json", {**environment_info(recipe.seed), "kind": kind})
        (staging / "checkpoints").mkdir()
        if final.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{final.name}.old.", dir=root))
            os.replace(final, trash / final.name)
            shutil.rmtree(trash, ignore_errors=True)
        os.replace(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return RunDir(final)
