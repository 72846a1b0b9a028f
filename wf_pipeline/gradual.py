"""The `compress` pruning stage: gradual pruning on a sparsity schedule with fine-tuning in between.

At the start of every scheduled pruning epoch the model gets fresh Fisher gradients, a fresh inverse
and one OBS step (or a baseline's step) to that epoch's target sparsity through
:func:`wf_pipeline.pruning.step.prune_step`; then it fine-tunes for the epoch with the masks held
exactly (optimizer hooks zero pruned weights, their gradients and their momentum at every step).

The stage is resumable. A checkpoint is written atomically at the start, after every pruning step and
after every epoch; it holds the model, optimizer, masks, schedule position, RNG states, data position
and this stage's history records, so a run killed at any moment continues from the last checkpoint
and ends with the same weights as an uninterrupted one (bit-identical on CPU with the same number of
processes and threads: data order derives from (seed, epoch), Fisher sampling from the step index).

Under torchrun every rank runs this function: fine-tuning is DistributedDataParallel over shards of
the training data, each rank computes its share of the Fisher gradients and the statistics are summed
across ranks, so every rank prunes the same weights. Only the main rank writes files.
"""
from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import numpy as np
import torch
from torch import nn

from wf_pipeline.atomic_io import torch_save
from wf_pipeline.data.bundle import DataBundle
from wf_pipeline.device import seed_everything
from wf_pipeline.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_sum_,
    broadcast_object,
    broadcast_tensor_,
)
from wf_pipeline.errors import WFError
from wf_pipeline.progress import NullReporter, Reporter
from wf_pipeline.pruning.masks import MaskHandle, MaskSet
from wf_pipeline.pruning import PruneReport, PruneSettings, build_pruner, prune_step
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.rundir import RunDir
from wf_pipeline.schedule import planned_targets
from wf_pipeline.training import build_optimizer, evaluate, train_epoch

CHECKPOINT_NAME = "gradual_state.pt"
CHECKPOINT_FORMAT = 1
# Recipe sections whose change makes an old checkpoint meaningless for --resume.
_RESUME_SECTIONS = ("seed", "model", "data", "pruning", "finetune")
# Sections where a change is harmless for resuming (loader speed and evaluation only).
_RESUME_IGNORED_DATA_FIELDS = ("num_workers", "eval_batch_size", "root", "download")


@dataclass
class StageResult:
    """What the pruning stage hands to export: the unwrapped model (masks applied, pruned weights
    exact zeros), its masks, and metrics (final_accuracy, sparsity, per_layer_sparsity, prune reports,
    timings, ...)."""

    model: nn.Module
    masks: MaskSet
    metrics: dict[str, Any]


@dataclass
class _Position:
    epoch: int = 0  # the epoch about to be (or being) trained
    pruned: bool = False  # whether the pruning step scheduled at the start of `epoch` is done
    complete: bool = False


@dataclass
class _State:
    """Everything besides tensors that a checkpoint carries."""

    position: _Position = field(default_factory=_Position)
    history_base: int = 0  # history.jsonl records written before this stage (kept on resume)
    history: list[dict[str, Any]] = field(default_factory=list)  # this stage's records
    reports: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    initial_accuracy: float | None = None
    last_accuracy: float | None = None
    elapsed_s: float = 0.0
    timings: dict[str, float] = field(default_factory=lambda: {"finetune_s": 0.0, "prune_s": 0.0, "eval_s": 0.0})
    resumed_from: list[dict[str, Any]] = field(default_factory=list)


# ===================================================================== RNG and recipe fingerprint
def _rng_state() -> dict[str, Any]:
    py_version, py_internal, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()  # type: ignore[misc]
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": [py_version, list(py_internal), py_gauss],
        # numpy arrays are not allowed by torch.load(weights_only=True): store the key as a tensor
        "numpy": [np_name, torch.from_numpy(np.asarray(np_keys, dtype=np.int64)), int(np_pos), int(np_has_gauss), float(np_gauss)],
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fingerprint(recipe: Recipe) -> dict[str, Any]:
    full = recipe.to_dict()
    out = {key: full[key] for key in _RESUME_SECTIONS}
    out["data"] = {k: v for k, v in out["data"].items() if k not in _RESUME_IGNORED_DATA_FIELDS}
    return out


def _diff_paths(old: Any, new: Any, prefix: str = "") -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        paths: list[str] = []
        for key in sorted(set(old) | set(new)):
            paths += _diff_paths(old.get(key), new.get(key), f"{prefix}{key}.")
        return paths
    return [] if old == new else [prefix.rstrip(".")]


# ===================================================================== Fisher data
def fisher_pool_size(data: DataBundle) -> int:
    if data.fisher_split is not None:
        return len(data.fisher_split)
    return len(data.fisher_indices) if data.fisher_indices is not None else 0


def plan_num_grads(requested: int, grad_batch_size: int, pool: int, world_size: int) -> tuple[int, str | None]:
    """How many gradients to use in total, and a note when the Fisher pool forces a change.

    Per-sample gradients (``grad_batch_size == 1``) of a pool smaller than `requested` would only
    repeat identical rows (the Fisher is unchanged, the work multiplied), so they are capped at the pool
    size. Mini-batch gradients are cycled with a fresh shuffle per pass, so every one is distinct.
    """
    per_rank_pool = pool // world_size if world_size > 1 else pool
    if per_rank_pool < 1:
        raise WFError(
            f"the Fisher pool has {pool} samples, fewer than the {world_size} processes",
            "raise data.fisher_pool or data.fisher_samples_per_class",
        )
    usable = per_rank_pool * world_size
    if grad_batch_size == 1 and requested > usable:
        return usable, (
            f"pruning.woodfisher.num_grads={requested} exceeds the Fisher pool ({pool} samples"
            f"{f' over {world_size} processes' if world_size > 1 else ''}): using {usable} per-sample gradients"
        )
    if requested * grad_batch_size > usable:
        return requested, (
            f"{requested} gradients x {grad_batch_size} samples exceed the Fisher pool ({pool} samples): "
            "the pool is cycled, reshuffled on each pass"
        )
    return requested, None


def fisher_batch_size(settings: PruneSettings) -> int:
    """Samples per Fisher-pool batch: one gradient chunk's worth (prune_step regroups them anyway)."""
    return max(1, settings.grad_batch_size * min(settings.chunk_size, settings.num_grads))


def fisher_batches_for_step(data: DataBundle, step_index: int, batch_size: int, dist: DistContext,
                            calls_per_step: int = 1) -> Callable[[], Iterable]:
    """Fisher-pool batches for pruning step `step_index`, shuffled differently per step but
    reproducibly (a resumed run sees the same samples at the same step).

    prune_step asks the factory for one fresh pass per Fisher (re)computation; skipping the passes of
    the earlier steps gives each step its own shuffles (creating an unread pass costs nothing).
    """
    factory = data.fisher_batches(batch_size, rank=dist.rank, world_size=dist.world_size)
    for _ in range(step_index * calls_per_step):
        factory()
    return factory


# ===================================================================== the stage
class _Stage:
    def __init__(self, recipe: Recipe, run: RunDir, model: nn.Module, data: DataBundle, device: torch.device,
                 dist: DistContext, reporter: Reporter) -> None:
        self.recipe, self.run, self.data, self.device, self.dist, self.reporter = recipe, run, data, device, dist, reporter
        self.cfg = recipe.finetune
        self.pcfg = recipe.pruning
        self.method = self.pcfg.method
        self.model = model.to(device)
        p = self.pcfg
        self.params = select_prunable(self.model, p.layers, p.skip, p.min_layer_params)
        # Weights that arrive exactly zero (an already-pruned model) stay pruned: sparsity only grows.
        self.masks = MaskSet.from_zeros(self.params)
        self.masks.to(device)
        self.plan = [] if self.method == "none" else planned_targets(p.schedule, p.initial_sparsity, p.final_sparsity)
        self.targets = dict(self.plan)
        self.optimizer = build_optimizer(self.model, self.cfg.optimizer)
        self.state = _State()
        self.started = time.perf_counter()
        self.settings: PruneSettings | None = None
        if self.method != "none":
            self.settings = self._prune_settings()

    # ------------------------------------------------------------------ setup
    def _prune_settings(self) -> PruneSettings:
        base = PruneSettings.from_config(self.pcfg)
        if not build_pruner(base).needs_gradients:
            return base
        total, note = plan_num_grads(base.num_grads, base.grad_batch_size, fisher_pool_size(self.data), self.dist.world_size)
        if note:
            self._note(note)
        # Each rank computes its share; prune_step normalises by the summed count of all ranks.
        return base.replace(num_grads=max(1, self.dist.share(total)))

    def _note(self, text: str) -> None:
        if text not in self.state.notes:
            self.state.notes.append(text)
        self.reporter.message(text)

    @property
    def checkpoint_path(self):  # noqa: ANN201 - a Path
        return self.run.checkpoints / CHECKPOINT_NAME

    # ------------------------------------------------------------------ checkpoints
    def save(self) -> None:
        if not self.dist.is_main:
            return
        payload = {
            "format": CHECKPOINT_FORMAT,
            "recipe": _fingerprint(self.recipe),
            "world_size": self.dist.world_size,
            "position": dataclasses.asdict(self.state.position),
            "data_position": {"epoch": self.state.position.epoch, "skip_batches": 0,
                              "fisher_steps_done": len(self.state.reports)},
            "model": {k: v.detach().cpu() for k, v in self.model.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "masks": self.masks.state_dict(),
            "rng": _rng_state(),
            "state": {**{k: v for k, v in dataclasses.asdict(self.state).items() if k != "position"},
                      "elapsed_s": self._elapsed()},
        }
        torch_save(self.checkpoint_path, payload)

    def load(self) -> bool:
        """Restore from the run's checkpoint; False when there is none yet (start fresh)."""
        path = self.checkpoint_path
        if not path.exists():
            return False
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a checkpoint we cannot read is a user-facing problem, not a crash
            raise WFError(f"--resume: cannot read checkpoint {path}: {exc}", "start the run again without --resume") from exc
        if payload.get("format") != CHECKPOINT_FORMAT:
            raise WFError(f"--resume: checkpoint {path} has format {payload.get('format')}, expected {CHECKPOINT_FORMAT}",
                          "start the run again without --resume")
        changed = _diff_paths(payload["recipe"], _fingerprint(self.recipe))
        if changed:
            raise WFError(f"--resume: the recipe differs from the one this run started with ({', '.join(changed[:8])})",
                          "resume with the run's original recipe (see its recipe.yaml) or start a new run")
        self.model.load_state_dict(payload["model"])
        self.optimizer.load_state_dict(payload["optimizer"])
        self.masks.load_state_dict(payload["masks"])
        self.masks.to(self.device)
        _set_rng_state(payload["rng"])
        saved = payload["state"]
        self.state = _State(position=_Position(**payload["position"]), **saved)
        self.started = time.perf_counter()  # elapsed_s now holds the time spent before the kill
        self.state.resumed_from.append({"epoch": self.state.position.epoch, "pruned": self.state.position.pruned,
                                        "world_size": self.dist.world_size})
        if payload["world_size"] != self.dist.world_size:
            self._note(f"resumed with {self.dist.world_size} processes; the run started with {payload['world_size']} "
                       "(same schedule and masks logic, but a different data split per step)")
        return True

    def _restore_history(self) -> None:
        """Make history.jsonl = records from before this stage + this stage's records up to the checkpoint."""
        if not self.dist.is_main:
            return
        records = self.run.read_history()
        self.run.rewrite_history(records[: self.state.history_base] + self.state.history)

    def _record(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.dist.is_main:
            self.run.append_history(record)

    def _elapsed(self) -> float:
        return self.state.elapsed_s + (time.perf_counter() - self.started)

    # ------------------------------------------------------------------ collective helpers
    def _evaluate(self) -> float:
        """Test accuracy of the unwrapped model, measured on the main rank and shared with all."""
        t0 = time.perf_counter()
        accuracy = None
        if self.dist.is_main:
            accuracy, _ = evaluate(self.model, self.data.test_batches(), self.device)
        accuracy = float(broadcast_object(accuracy))
        self.state.timings["eval_s"] += time.perf_counter() - t0
        return accuracy

    def _sync_buffers(self) -> None:
        """BatchNorm running statistics drift per rank during DDP training: take the main rank's."""
        if self.dist.enabled:
            for buffer in self.model.buffers():
                broadcast_tensor_(buffer)

    # ------------------------------------------------------------------ steps
    def prune(self, epoch: int, target: float) -> None:
        assert self.settings is not None
        step_index = [e for e, _ in self.plan].index(epoch)
        total_weights = self.masks.num_params()
        if round(target * total_weights) <= self.masks.num_zeros():
            self.reporter.message(f"epoch {epoch}: already at {self.masks.sparsity():.2%} >= target {target:.2%}; no pruning")
            return
        task_base = f"prune {step_index + 1}/{len(self.plan)} -> {target:.1%}"
        current: dict[str, Any] = {"stage": None}

        def progress(stage: str, done: int, total: int) -> None:
            if stage != current["stage"]:
                if current["stage"] is not None:
                    self.reporter.finish(f"{task_base} {current['stage']}")
                current["stage"] = stage
                self.reporter.start(f"{task_base} {stage}", total, f"{task_base}: {stage}")
            self.reporter.advance(f"{task_base} {stage}", done, f"{stage} {done}/{total}")

        t0 = time.perf_counter()
        batches = fisher_batches_for_step(self.data, step_index, fisher_batch_size(self.settings), self.dist,
                                          calls_per_step=self.settings.recompute_steps)
        generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + step_index * 7_919 + self.dist.rank)
        report: PruneReport = prune_step(
            self.model, self.params, self.masks, target, self.settings, batches=batches,
            reduce_fn=all_reduce_sum_ if self.dist.enabled else None, progress=progress, generator=generator,
        )
        if current["stage"] is not None:
            self.reporter.finish(f"{task_base} {current['stage']}")
        # Momentum and Adam moments at newly pruned positions must not push those weights back.
        self.masks.apply(self.model)
        self.masks.mask_optimizer_state(self.model, self.optimizer)
        self.state.timings["prune_s"] += time.perf_counter() - t0
        accuracy = self._evaluate()
        self.state.last_accuracy = accuracy
        entry = {"epoch": epoch, "step": step_index, "test_accuracy_after": accuracy, **report.to_dict()}
        entry.pop("per_layer_sparsity", None)  # kept once, in the final metrics
        self.state.reports.append(entry)
        self._record({"kind": "prune", "epoch": epoch, "target_sparsity": report.target_sparsity,
                      "achieved_sparsity": report.achieved_sparsity, "test_accuracy_after": accuracy,
                      "timings": report.timings, "method": self.method, "num_grads": report.num_grads})
        self.reporter.message(
            f"pruned to {report.achieved_sparsity:.2%} (target {target:.2%}) at epoch {epoch} in "
            f"{report.timings.get('total', 0.0):.1f}s: test accuracy {accuracy:.4f}")

    def finetune_epoch(self, epoch: int, train_model: nn.Module) -> None:
        cfg = self.cfg
        batches = self.data.train_batches(epoch, rank=self.dist.rank, world_size=self.dist.world_size,
                                          max_batches=cfg.steps_per_epoch)
        steps = len(batches)  # type: ignore[arg-type]
        if steps == 0:
            raise WFError(f"fine-tuning has no full batch: {self.data.num_train} training samples over "
                          f"{self.dist.world_size} process(es) at batch size {self.data.cfg.batch_size}",
                          "lower data.batch_size or raise data.train_subset")
        task = f"finetune epoch {epoch + 1}/{cfg.epochs}"
        self.reporter.start(task, steps, task)
        t0 = time.perf_counter()
        stats = train_epoch(train_model, batches, self.optimizer, cfg, epoch=epoch, steps_per_epoch=steps,
                            device=self.device,
                            progress=lambda s, total, loss: self.reporter.advance(task, s, f"loss {loss:.3f}"))
        self.reporter.finish(task)
        self._sync_buffers()
        loss = torch.tensor([stats.loss, stats.accuracy], dtype=torch.float64)
        if self.dist.enabled:
            all_reduce_sum_(loss)
            loss /= self.dist.world_size
        self.state.timings["finetune_s"] += time.perf_counter() - t0
        accuracy = self._evaluate()
        self.state.last_accuracy = accuracy
        self._record({"kind": "epoch", "epoch": epoch, "train_loss": float(loss[0]), "train_accuracy": float(loss[1]),
                      "test_accuracy": accuracy, "sparsity": self.masks.sparsity(),
                      "lr": self.optimizer.param_groups[0]["lr"], "elapsed_s": self._elapsed()})
        self.reporter.message(f"epoch {epoch + 1}/{cfg.epochs}: train loss {float(loss[0]):.4f}, "
                              f"test accuracy {accuracy:.4f}, sparsity {self.masks.sparsity():.2%}")

    # ------------------------------------------------------------------ driver
    def execute(self, resume: bool, initial_accuracy: float | None) -> StageResult:
        resumed = resume and self.load()
        if resumed:
            self._restore_history()
        else:
            seed_everything(self.recipe.seed, self.recipe.deterministic)
            self.state.history_base = len(self.run.read_history()) if self.dist.is_main else 0
            self.state.initial_accuracy = self._evaluate() if initial_accuracy is None else float(initial_accuracy)
            self.state.last_accuracy = self.state.initial_accuracy
            if self.settings is not None and build_pruner(self.settings).needs_gradients:
                self.reporter.message(f"Fisher pool: {fisher_pool_size(self.data)} samples; "
                                      f"{self.settings.num_grads} gradients per process")
            self.save()

        epochs = self.cfg.epochs
        handle: MaskHandle = self.masks.attach(self.model, self.optimizer)
        train_model = self._wrap_ddp()
        overall = "pruning stage"
        total_units = epochs + len(self.plan)
        done_units = self._units_done()
        self.reporter.start(overall, total_units, f"{self.method}: {len(self.plan)} pruning steps, {epochs} epochs")
        self.reporter.advance(overall, done_units)
        try:
            pos = self.state.position
            while not pos.complete:
                epoch = pos.epoch
                if epoch in self.targets and not pos.pruned:
                    self.prune(epoch, self.targets[epoch])
                    pos.pruned = True
                    self.save()
                    done_units += 1
                    self.reporter.advance(overall, done_units)
                if epoch >= epochs:
                    pos.complete = True
                    break
                self.finetune_epoch(epoch, train_model)
                pos.epoch, pos.pruned = epoch + 1, False
                if self.recipe.output.checkpoint_every_epoch or pos.epoch >= epochs:
                    self.save()
                done_units += 1
                self.reporter.advance(overall, done_units)
            self.masks.apply(self.model)
            self.save()
        finally:
            handle.remove()
            self.reporter.finish(overall)
        return StageResult(self.model, self.masks, self._metrics(resumed))

    def _units_done(self) -> int:
        pos = self.state.position
        prune_done = sum(1 for e, _ in self.plan if e < pos.epoch or (e == pos.epoch and pos.pruned))
        return min(pos.epoch, self.cfg.epochs) + prune_done

    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _metrics(self, resumed: bool) -> dict[str, Any]:
        st = self.state
        all_params = sum(p.numel() for p in self.model.parameters())
        all_zeros = sum(int((p == 0).sum()) for p in self.model.parameters())
        return {
            "method": self.method,
            "initial_accuracy": st.initial_accuracy,
            "final_accuracy": st.last_accuracy,
            "target_sparsity": self.pcfg.final_sparsity if self.method != "none" else None,
            "sparsity": self.masks.sparsity(),
            "model_sparsity": all_zeros / max(all_params, 1),
            "pruned_params": self.masks.num_zeros(),
            "prunable_params": self.masks.num_params(),
            "per_layer_sparsity": self.masks.per_layer_sparsity(),
            "schedule": [{"epoch": e, "target_sparsity": t} for e, t in self.plan],
            "prune_reports": st.reports,
            "epochs": self.cfg.epochs,
            "world_size": self.dist.world_size,
            "timings": {**st.timings, "total_s": self._elapsed()},
            "resumed": resumed,
            "resumed_from": st.resumed_from,
            "notes": st.notes,
            "checkpoint": str(self.checkpoint_path),
        }


def run_pruning_stage(recipe: Recipe, run: RunDir, model: nn.Module, data: DataBundle, device: torch.device, *,
                      dist: DistContext = SINGLE_PROCESS, reporter: Reporter | None = None,
                      resume: bool = False, initial_accuracy: float | None = None) -> StageResult:
    """Gradually prune `model` by the recipe's schedule with fine-tuning, resumable from the run dir.

    `model` arrives with its starting (usually pretrained) weights; it is modified in place and
    returned unwrapped. `initial_accuracy` (the caller's measured dense test accuracy) saves the
    stage its own evaluation of the starting model; it is reported as ``metrics["initial_accuracy"]``.
    With ``resume=True`` the stage continues from ``run.checkpoints/gradual_state.pt`` (or starts
    fresh when there is none yet); a finished stage resumes to its result without work, and
    history.jsonl is rewritten to the records before the stage plus the stage's own up to the
    checkpoint (later stages' records are dropped, since they run again).
    Every rank of a torchrun job calls this with the same arguments; only the main rank writes files.
    """
    stage = _Stage(recipe, run, model, data, device, dist, reporter or NullReporter())
    return stage.execute(resume, initial_accuracy)
