"""Run the gradual pruning stage of a recipe in a fresh process (plain python or torchrun).

Used by the resume-after-SIGKILL and the multi-process tests:

    python tests/gradual_entry.py RECIPE --root DIR [--set k=v ...] [--resume]
        [--pause-after-steps N --marker FILE] --out RESULT.pt

With ``--pause-after-steps N`` the process writes `--marker` after its N-th fine-tuning optimizer step
(counted over the whole run, resumed steps included) and then sleeps, so the parent can SIGKILL it
mid-epoch at a known point. The main rank saves masks, weights and metrics to ``--out``; every rank
checks that its masks equal the main rank's.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

import wf_pipeline  # noqa: F401  - first: it sets OMP_WAIT_POLICY before torch loads
from wf_pipeline.data import build_data
from wf_pipeline.models import build_model
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.runtime.atomic_io import torch_save, write_text
from wf_pipeline.runtime.device import seed_everything
from wf_pipeline.runtime.distributed import barrier, broadcast_object, init_distributed, shutdown
from wf_pipeline.runtime.progress import NullReporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.gradual import run_pruning_stage


class PausingReporter(NullReporter):
    def __init__(self, pause_after: int | None, marker: Path | None) -> None:
        self.pause_after, self.marker, self.steps = pause_after, marker, 0

    def advance(self, task: str, completed: int, info: str = "") -> None:
        if not task.startswith("finetune"):
            return
        self.steps += 1
        if self.pause_after is not None and self.steps >= self.pause_after and self.marker is not None:
            write_text(self.marker, task)
            while True:  # wait here for the parent's SIGKILL
                time.sleep(1)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("recipe")
    parser.add_argument("--root", required=True)
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--pause-after-steps", type=int)
    parser.add_argument("--marker", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()

    torch.set_num_threads(1)  # identical arithmetic in every process, whatever else runs on the machine
    recipe, _ = load_recipe(args.recipe, [*args.overrides, f"output.root={args.root}"])
    dist = init_distributed(recipe.device)
    # A bare run folder (open_run_dir also records library versions, which imports onnx: slow here).
    run = RunDir(Path(args.root) / recipe.run_name())
    if dist.is_main:
        run.checkpoints.mkdir(parents=True, exist_ok=True)
    barrier()
    seed_everything(recipe.seed, recipe.deterministic)
    data = build_data(recipe.data, recipe.seed)
    model = build_model(recipe.model)
    reporter = PausingReporter(args.pause_after_steps, args.marker)
    result = run_pruning_stage(recipe, run, model, data, torch.device("cpu"), dist=dist, reporter=reporter,
                               resume=args.resume)
    masks = {k: v.cpu() for k, v in result.masks.masks.items()}
    main_masks = broadcast_object(masks)
    assert all(torch.equal(main_masks[k], masks[k]) for k in masks), f"rank {dist.rank} pruned other weights"
    if dist.is_main:
        torch_save(args.out, {"masks": masks, "metrics": result.metrics.to_dict(),
                              "state": {k: v.detach().cpu() for k, v in result.model.state_dict().items()}})
    barrier()
    shutdown()


if __name__ == "__main__":
    main()
