"""The pruning stage's checkpoint: everything a killed run needs to continue exactly where it was.

One dict in one file (``checkpoints/gradual_state.pt``), written atomically by the main rank at the
start, after every pruning step and after every epoch: model, optimizer, masks, RNG states, the
recipe's fingerprint (a resume with a changed recipe is refused) and :class:`StageState`, the plain
bookkeeping (position on the step clock, this stage's history records, timings).
"""
from __future__ import annotations

import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.runtime.atomic_io import torch_save

CHECKPOINT_NAME = "gradual_state.pt"
CHECKPOINT_FORMAT = 2
# Recipe sections whose change makes an old checkpoint meaningless for --resume.
_RESUME_SECTIONS = ("seed", "model", "data", "pruning", "finetune")
# Data fields whose change is harmless for resuming (loader speed and evaluation only).
_RESUME_IGNORED_DATA_FIELDS = ("num_workers", "eval_batch_size", "root", "download")


@dataclass
class EpochTally:
    """Training loss and accuracy of the epoch in progress, summed over its segments."""

    loss_sum: float = 0.0
    correct: float = 0.0
    seen: int = 0

    def add(self, loss: float, accuracy: float, samples: int) -> None:
        self.loss_sum += loss * samples
        self.correct += accuracy * samples
        self.seen += samples

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.seen, 1)

    @property
    def accuracy(self) -> float:
        return self.correct / max(self.seen, 1)


@dataclass
class StageState:
    """Everything besides tensors that a checkpoint carries."""

    steps_done: int = 0  # fine-tuning optimizer steps taken (the stage's clock)
    events_done: int = 0  # pruning events carried out, in plan order
    steps_per_epoch: int = 0
    epoch_tally: EpochTally = field(default_factory=EpochTally)
    history_base: int = 0  # history.jsonl records written before this stage (kept on resume)
    history: list[dict[str, Any]] = field(default_factory=list)  # this stage's records
    reports: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    initial_accuracy: float | None = None
    last_accuracy: float | None = None
    last_evaluation_full: bool = False
    complete: bool = False
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: {"finetune_s": 0.0, "prune_s": 0.0, "eval_s": 0.0})
    resumed_from: list[dict[str, Any]] = field(default_factory=list)
    # every test-set evaluation so far: kind, label, epoch, event, runtime, samples, test_images, accuracy, seconds
    evaluations: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StageState:
        data = dict(data)
        data["epoch_tally"] = EpochTally(**data.get("epoch_tally", {}))
        return cls(**data)


# ===================================================================== RNG and recipe fingerprint
def rng_state() -> dict[str, Any]:
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        # numpy arrays are not allowed by torch.load(weights_only=True): store the key as a tensor
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss),
                  float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def recipe_fingerprint(recipe: Recipe) -> dict[str, Any]:
    full = recipe.to_dict()
    out = {key: full[key] for key in _RESUME_SECTIONS}
    out["data"] = {k: v for k, v in out["data"].items() if k not in _RESUME_IGNORED_DATA_FIELDS}
    return out


def diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths where two nested dicts differ."""
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new)):
            paths += diff_paths(old.get(key), new.get(key), f"{prefix}{key}.")
        return paths
    return [] if old == new else [prefix.rstrip(".")]


# ===================================================================== save / load
def save_checkpoint(path: Path, recipe: Recipe, world_size: int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, masks: MaskSet, state: StageState) -> None:
    torch_save(path, {
        "format": CHECKPOINT_FORMAT,
        "recipe": recipe_fingerprint(recipe),
        "world_size": world_size,
        "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "optimizer": optimizer.state_dict(),
        "masks": masks.state_dict(),
        "rng": rng_state(),
        "state": asdict(state),
    })


def load_checkpoint(path: Path, recipe: Recipe, model: nn.Module, optimizer: torch.optim.Optimizer,
                    masks: MaskSet) -> tuple[StageState, int] | None:
    """Restore model, optimizer, masks and RNG from `path`; returns (state, world size it was written
    with), or None when there is no checkpoint yet. Refuses a checkpoint of another recipe."""
    if not path.exists():
        return None
    hint = "start the run again without --resume"
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a checkpoint we cannot read is a user-facing problem, not a crash
        raise WFError(f"--resume: cannot read checkpoint {path}: {exc}", hint) from exc
    if payload.get("format") != CHECKPOINT_FORMAT:
        raise WFError(f"--resume: checkpoint {path} has format {payload.get('format')}, expected {CHECKPOINT_FORMAT}"
                      " (written by another version of wf-pipeline)", hint)
    changed = diff_paths(payload["recipe"], recipe_fingerprint(recipe))
    if changed:
        raise WFError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed[:8])})",
                      "resume with the run's original recipe (see its recipe.yaml) or start a new run")
    model.load_state_dict(payload["model"])
    optimizer.load_state_dict(payload["optimizer"])
    masks.load_state_dict(payload["masks"])
    set_rng_state(payload["rng"])
    return StageState.from_dict(payload["state"]), int(payload["world_size"])
