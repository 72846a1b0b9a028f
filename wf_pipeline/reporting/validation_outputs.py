"""The files of a validation run: validation.json, junit.xml (one testcase per gate) and validation.md.

Whoever validates (the `validate` command, the compress pipeline) measures with
`wf_pipeline.deploy.validate.validate_model` and hands the result here to be written.
"""
from __future__ import annotations

from pathlib import Path

from wf_pipeline.deploy.validate import ValidationResult
from wf_pipeline.errors import WFError
from wf_pipeline.reporting.junit import gates_to_junit
from wf_pipeline.reporting.summary import validation_markdown
from wf_pipeline.runtime import atomic_io


def write_validation_outputs(result: ValidationResult, out_dir: Path) -> dict[str, Path]:
    """validation.json (raw per-run latencies included), junit.xml (one testcase per gate), validation.md."""
    out_dir = Path(out_dir)
    paths = {
        "json": out_dir / "validation.json",
        "junit": out_dir / "junit.xml",
        "markdown": out_dir / "validation.md",
    }
    try:
        atomic_io.write_json(paths["json"], result.to_dict())
        atomic_io.write_text(paths["junit"], gates_to_junit(result))
        atomic_io.write_text(paths["markdown"], validation_markdown(result))
    except OSError as exc:
        raise WFError(f"cannot write validation outputs to {out_dir}: {exc.strerror or exc}") from exc
    return paths
