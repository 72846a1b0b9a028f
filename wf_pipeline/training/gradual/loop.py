"""The `compress` pruning stage: gradual pruning on a sparsity schedule with fine-tuning in between.

The stage runs on a clock of fine-tuning optimizer steps. Before each step it carries out the pruning
events due at that step (:mod:`.plan`: fresh Fisher statistics and one step of the group's pruner,
:func:`wf_pipeline.pruning.step.prune_step`), then trains on, the masks held exactly (optimizer hooks
zero pruned weights, their gradients and their momentum at every step). Pruning can fall inside an
epoch (fractional schedules), so an epoch may be trained in several segments.

The stage measures the test accuracy of its starting model and of its final one, both on the whole
test set. No decision of the stage reads an accuracy, so in between it evaluates only where the recipe
asks (``evaluation.monitor``: after every pruning step, every epoch, both or neither; default neither),
each time on the first ``evaluation.monitor_samples`` test images. Every evaluation is listed, with its
images, in the metrics' ``evaluations``; the model is never evaluated twice unchanged.

The stage is resumable: :mod:`.checkpoint` writes one checkpoint at the start, after every pruning
step and after every epoch, so a run killed at any moment continues from the last checkpoint and ends
with the same weights as an uninterrupted one (bit-identical on CPU with the same number of processes
and threads: data order derives from (seed, epoch), Fisher sampling from the event index).

Under torchrun every rank runs this function: fine-tuning is DistributedDataParallel over shards of
the training data, each rank computes its share of the Fisher gradients and the statistics are summed
across ranks, so every rank prunes the same weights. Only the main rank writes files.
"""
from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from wf_pipeline.data.bundle import DataBundle
from wf_pipeline.errors import WFError
from wf_pipeline.pruning import MaskSet, PruneSettings, PruneView, prune_step, select_prunable
from wf_pipeline.pruning.pruners.registry import pruner_class
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.reporting.metrics import EpochRecord, PruneRecord, PruneStepRecord, RunMetrics
from wf_pipeline.runtime.device import seed_everything
from wf_pipeline.runtime.distributed import (
    SINGLE_PROCESS,
    DistContext,
    all_reduce_sum_,
    broadcast_object,
    broadcast_tensor_,
)
from wf_pipeline.runtime.progress import NullReporter, PhaseProgress, Reporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.epoch import evaluate, test_images, train_epoch
from wf_pipeline.training.gradual.checkpoint import CHECKPOINT_NAME, StageState, load_checkpoint, save_checkpoint
from wf_pipeline.training.gradual.fisher_data import (
    fisher_batch_size,
    fisher_batches_for_step,
    fisher_pool_size,
    plan_num_grads,
)
from wf_pipeline.training.gradual.plan import PruneEvent, PruneGroup, build_groups, plan_events
from wf_pipeline.training.optimizer import build_optimizer


@dataclass
class StageResult:
    """What the pruning stage hands to export: the unwrapped model (masks applied, pruned weights
    exact zeros), its masks, and the stage's metrics (every pruning-stage field of RunMetrics set)."""

    model: nn.Module
    masks: MaskSet
    metrics: RunMetrics


def run_pruning_stage(recipe: Recipe, run: RunDir, model: nn.Module, data: DataBundle, device: torch.device, *,
                      dist: DistContext = SINGLE_PROCESS, reporter: Reporter | None = None,
                      resume: bool = False, initial_accuracy: float | None = None) -> StageResult:
    """Gradually prune `model` by the recipe's schedule with fine-tuning, resumable from the run dir.

    `model` arrives with its starting (usually pretrained) weights; it is modified in place and
    returned unwrapped. `initial_accuracy` (the caller's measured test accuracy of the starting model,
    on the whole test set) saves the stage its own evaluation of it. With ``resume=True`` the stage continues from
    ``run.checkpoints/gradual_state.pt`` (or starts fresh when there is none yet); a finished stage
    resumes to its result without work, and history.jsonl is rewritten to the records before the
    stage plus the stage's own up to the checkpoint (later stages' records are dropped, since they
    run again). Every rank of a torchrun job calls this with the same arguments.
    """
    stage = _Stage(recipe, run, model.to(device), data, device, dist, reporter or NullReporter())
    stage.start(resume, initial_accuracy)
    total_steps = stage.epochs * stage.steps_per_epoch
    state = stage.state
    handle = stage.masks.attach(stage.model, stage.optimizer)
    stage.reporter.start("pruning stage", stage.epochs + len(stage.events),
                         f"{stage.method}: {len(stage.events)} pruning steps, {stage.epochs} epochs")
    try:
        while not state.complete:
            stage.reporter.advance("pruning stage", stage.units_done())
            # 1. the pruning events due before the next optimizer step
            while state.events_done < len(stage.events) and stage.events[state.events_done].step <= state.steps_done:
                stage.prune(stage.events[state.events_done])
                state.events_done += 1
                stage.save()
            if state.steps_done >= total_steps:
                state.complete = True
                break
            # 2. fine-tune up to the next event or the end of the epoch, whichever comes first
            epoch_end = (state.steps_done // stage.steps_per_epoch + 1) * stage.steps_per_epoch
            stage.finetune_until(min(epoch_end, stage.next_event_step()))
            if state.steps_done == epoch_end:
                stage.close_epoch(epoch_end // stage.steps_per_epoch - 1)
                if stage.recipe.output.checkpoint_every_epoch or state.steps_done >= total_steps:
                    stage.save()
        if not state.last_evaluation_full:  # the stage's final accuracy is always on the whole test set
            stage.evaluate(full=True, kind="end", label="end of the stage (the final model)")
        stage.masks.apply(stage.model)
        stage.save()
    finally:
        handle.remove()
        stage.reporter.finish("pruning stage")
    return StageResult(stage.model, stage.masks, stage.metrics())


class _Stage:
    """The stage's objects and its four actions: prune, fine-tune, close an epoch, save."""

    def __init__(self, recipe: Recipe, run: RunDir, model: nn.Module, data: DataBundle, device: torch.device,
                 dist: DistContext, reporter: Reporter) -> None:
        self.recipe, self.run, self.model, self.data = recipe, run, model, data
        self.device, self.dist, self.reporter = device, dist, reporter
        self.cfg, self.pcfg = recipe.finetune, recipe.pruning
        self.method = self.pcfg.method
        self.epochs = self.cfg.epochs
        self.state = StageState()
        self.groups: list[PruneGroup] = [] if not self.pcfg.prunes else build_groups(
            model, self.pcfg, self._settings(), data.sample_input(1))
        selected, held = self._held_parameters()
        # Weights that arrive exactly zero (an already-pruned model) stay pruned: sparsity only grows.
        # Parameters a pruner holds beyond the selection (BatchNorm of a removed channel) start kept.
        extra = {name: p for name, p in held.items() if name not in selected}
        self.masks = MaskSet({**MaskSet.from_zeros(selected).masks, **MaskSet.dense(extra).masks}).to(device)
        self.optimizer = build_optimizer(model, self.cfg.optimizer)
        self.steps_per_epoch = len(data.train_batches(0, rank=dist.rank, world_size=dist.world_size,  # type: ignore[arg-type]
                                                      max_batches=self.cfg.steps_per_epoch))
        if self.steps_per_epoch == 0 and self.epochs > 0:
            raise WFError(f"fine-tuning has no full batch: {data.num_train} training samples over "
                          f"{dist.world_size} process(es) at batch size {data.cfg.batch_size}",
                          "lower data.batch_size or raise data.train_subset")
        self.events: list[PruneEvent] = plan_events(self.groups, max(self.steps_per_epoch, 1))
        self.train_model: nn.Module = model  # wrapped for DDP once the starting weights are in place
        self.started = time.perf_counter()

    # ------------------------------------------------------------------ setup
    def _settings(self) -> PruneSettings:
        """The recipe's pruning settings, with this rank's share of the Fisher gradients."""
        base = PruneSettings.from_config(self.pcfg)
        if not pruner_class(base.method, self.pcfg.structure).needs_gradients:
            return base
        total, note = plan_num_grads(base.num_grads, base.grad_batch_size, fisher_pool_size(self.data),
                                     self.dist.world_size)
        if note:
            self._note(note)
        # Each rank computes its share; prune_step normalises by the summed count of all ranks.
        return base.replace(num_grads=max(1, self.dist.share(total)))

    def _held_parameters(self) -> tuple[dict[str, nn.Parameter], dict[str, nn.Parameter]]:
        """(the selected weights, every parameter whose mask the stage holds)."""
        if not self.groups:  # method none: nothing is pruned, but existing zeros are held
            prunable = select_prunable(self.model, self.pcfg.layers, self.pcfg.skip, self.pcfg.min_layer_params)
            return prunable, prunable
        selected: dict[str, nn.Parameter] = {}
        held: dict[str, nn.Parameter] = {}
        for group in self.groups:
            selected.update(group.params)
            held.update(group.pruner.held_parameters(self.model, group.params))
        return selected, held

    def start(self, resume: bool, initial_accuracy: float | None) -> None:
        """Continue from the checkpoint, or start fresh (seeded, initial accuracy, first checkpoint)."""
        if resume and self._load():
            if self.dist.is_main:  # history.jsonl = records before the stage + this stage's, up to the checkpoint
                self.run.rewrite_history(self.run.read_history()[: self.state.history_base] + self.state.history)
        else:
            self._start_fresh(initial_accuracy)
        self.train_model = self._wrap_ddp()

    def _start_fresh(self, initial_accuracy: float | None) -> None:
        seed_everything(self.recipe.seed, self.recipe.deterministic)
        self.state.steps_per_epoch = self.steps_per_epoch
        self.state.history_base = len(self.run.read_history()) if self.dist.is_main else 0
        if initial_accuracy is None:
            self.state.initial_accuracy = self.evaluate(full=True, kind="start", label="before pruning")
            self.reporter.message(f"test accuracy before pruning: {self.state.initial_accuracy:.4f} "
                                  f"on {self.images(full=True)}")
        else:
            self.state.initial_accuracy = self.state.last_accuracy = float(initial_accuracy)
        if any(g.pruner.needs_gradients for g in self.groups):
            self.reporter.message(f"Fisher pool: {fisher_pool_size(self.data)} samples; "
                                  f"{self.groups[0].settings.num_grads} gradients per process")
        self.save()

    def _load(self) -> bool:
        loaded = load_checkpoint(self.checkpoint_path, self.recipe, self.model, self.optimizer, self.masks)
        if loaded is None:
            return False
        state, world_size = loaded
        self.masks.to(self.device)
        if state.steps_per_epoch != self.steps_per_epoch:
            # Another number of processes splits an epoch into another number of steps.
            epochs_done, within = divmod(state.steps_done, state.steps_per_epoch)
            if within:
                raise WFError(f"--resume: the run stopped inside an epoch with {world_size} process(es) and "
                              f"{state.steps_per_epoch} steps per epoch; now there are {self.steps_per_epoch}",
                              f"resume with {world_size} process(es)")
            state.steps_done = epochs_done * self.steps_per_epoch
            state.steps_per_epoch = self.steps_per_epoch
        if world_size != self.dist.world_size:
            self._note(f"resumed with {self.dist.world_size} processes; the run started with {world_size} "
                       "(same schedule and masks logic, but a different data split per step)")
        state.resumed_from.append({"epoch": state.steps_done / self.steps_per_epoch, "steps_done": state.steps_done,
                                   "events_done": state.events_done,
                                   "world_size": self.dist.world_size})
        self.state = state
        self.started = time.perf_counter()  # elapsed_s holds the time spent before the kill
        return True

    # ------------------------------------------------------------------ the four actions
    def prune(self, event: PruneEvent) -> None:
        """Prune one group to the event's target with fresh Fisher statistics, then evaluate and record."""
        group = self.groups[event.group]
        label = f"prune {event.index + 1}/{len(self.events)} -> {event.target:.1%}"
        if group.pruner.reached(PruneView(group.params, self.masks), event.target):
            self.reporter.message(
                f"epoch {event.epoch}: {group.name} already at or beyond {event.target:.2%}; no pruning")
            return
        t0 = time.perf_counter()
        settings = group.settings
        batches = fisher_batches_for_step(self.data, event.index, fisher_batch_size(settings), self.dist,
                                          calls_per_step=settings.recompute_steps)
        generator = torch.Generator().manual_seed(self.recipe.seed * 1_000_003 + event.index * 7_919 + self.dist.rank)
        with PhaseProgress(self.reporter, label) as progress:
            report = prune_step(self.model, group.params, self.masks, event.target, group.pruner, batches=batches,
                                reduce_fn=all_reduce_sum_ if self.dist.enabled else None, progress=progress,
                                generator=generator, spill_dir=self.run.path)
        # Momentum and Adam moments at newly pruned positions must not push those weights back.
        self.masks.apply(self.model)
        self.masks.mask_optimizer_state(self.model, self.optimizer)
        self.state.last_evaluation_full = False  # the model changed
        self.state.timings["prune_s"] += time.perf_counter() - t0
        is_last = self.state.events_done + 1 == len(self.events) and self.state.steps_done >= self.total_steps
        accuracy = None  # measured only where the recipe monitors pruning steps, or at the end of the stage
        if is_last or self.recipe.evaluation.after_pruning_steps:
            accuracy = self.evaluate(full=is_last, kind="prune", label=f"after pruning step {event.index + 1}"
                                     f"/{len(self.events)}{_FINAL if is_last else ''}", epoch=event.epoch,
                                     event=event.index)
        group_name = group.name if len(self.groups) > 1 else None
        # The checkpoint carries the entry as JSON (metrics() reads it back into a PruneStepRecord).
        self.state.reports.append(PruneStepRecord.of(report, epoch=event.epoch, optimizer_step=event.step,
                                                     event=event.index, group=group_name,
                                                     test_accuracy_after=accuracy).to_dict())
        warnings = report.notices()  # Fisher repairs (float64 retries, added damping) and skipped gradients
        self._record(PruneRecord(
            epoch=event.epoch, optimizer_step=event.step, event=event.index, group=group_name,
            target_sparsity=report.target_sparsity, achieved_sparsity=report.achieved_sparsity,
            test_accuracy_after=accuracy, timings=report.timings, method=report.method, num_grads=report.num_grads,
            fisher_plan=report.details.fisher_plan, warnings=list(warnings)).to_dict())
        if report.details.fisher_plan_summary is not None:
            self.reporter.message(report.details.fisher_plan_summary)
        for line in warnings:
            self.reporter.message(f"warning: {line}")
            if self.dist.is_main:
                self.run.logger().warning("pruning step %d%s: %s", event.index,
                                          f" ({group.name})" if len(self.groups) > 1 else "", line)
        measured = "" if accuracy is None else f": test accuracy {accuracy:.4f} on {self.images(full=is_last)}"
        self.reporter.message(
            f"pruned {group.name if len(self.groups) > 1 else ''}to {report.achieved_sparsity:.2%} "
            f"(target {event.target:.2%}) at epoch {event.epoch:g} in {report.timings.get('total', 0.0):.1f}s"
            f"{measured}")

    def finetune_until(self, stop: int) -> None:
        """Train from the current step up to (not including) step `stop`, within one epoch."""
        epoch, offset = divmod(self.state.steps_done, self.steps_per_epoch)
        end = stop - epoch * self.steps_per_epoch
        batches = self.data.train_batches(epoch, rank=self.dist.rank, world_size=self.dist.world_size,
                                          max_batches=end, skip_batches=offset)
        task = f"finetune epoch {epoch + 1}/{self.epochs}"
        self.reporter.start(task, self.steps_per_epoch, task)  # the first step's callback shows the offset
        t0 = time.perf_counter()
        stats = train_epoch(self.train_model, batches, self.optimizer, self.cfg, epoch=epoch,
                            steps_per_epoch=self.steps_per_epoch, device=self.device, start_step=offset,
                            progress=lambda s, _total, loss: self.reporter.advance(task, s, f"loss {loss:.3f}"))
        if end == self.steps_per_epoch:
            self.reporter.finish(task)
        self._sync_buffers()
        self.state.epoch_tally.add(stats.loss, stats.accuracy, stats.steps)
        self.state.steps_done = stop
        self.state.last_evaluation_full = False  # the model changed
        self.state.timings["finetune_s"] += time.perf_counter() - t0

    def close_epoch(self, epoch: int) -> None:
        """Evaluate and record a finished epoch."""
        tally = self.state.epoch_tally
        loss = torch.tensor([tally.loss, tally.accuracy], dtype=torch.float64)
        if self.dist.enabled:
            all_reduce_sum_(loss)
            loss /= self.dist.world_size
        is_last = self.state.steps_done >= self.total_steps and self.state.events_done == len(self.events)
        accuracy = None  # measured only where the recipe monitors epochs, or at the end of the stage
        if is_last or self.recipe.evaluation.after_epochs:
            accuracy = self.evaluate(full=is_last, kind="epoch", epoch=epoch + 1,
                                     label=f"after epoch {epoch + 1}/{self.epochs}{_FINAL if is_last else ''}")
        self.state.epoch_tally = type(tally)()
        self._record(EpochRecord(epoch=epoch, train_loss=float(loss[0]), train_accuracy=float(loss[1]),
                                 test_accuracy=accuracy, sparsity=self.sparsity(),
                                 lr=self.optimizer.param_groups[0]["lr"], elapsed_s=self._elapsed()).to_dict())
        measured = "" if accuracy is None else f"test accuracy {accuracy:.4f} on {self.images(full=is_last)}, "
        self.reporter.message(f"epoch {epoch + 1}/{self.epochs}: train loss {float(loss[0]):.4f}, "
                              f"{measured}sparsity {self.sparsity():.2%}")

    def save(self) -> None:
        if self.dist.is_main:
            self.state.elapsed_s = self._elapsed()
            self.started = time.perf_counter()
            save_checkpoint(self.checkpoint_path, self.recipe, self.dist.world_size, self.model, self.optimizer,
                            self.masks, self.state)

    # ------------------------------------------------------------------ helpers
    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    @property
    def checkpoint_path(self):  # noqa: ANN201 - a Path
        return self.run.checkpoints / CHECKPOINT_NAME

    def next_event_step(self) -> int:
        pending = self.events[self.state.events_done:]
        return pending[0].step if pending else self.total_steps

    def units_done(self) -> int:
        return self.state.steps_done // max(self.steps_per_epoch, 1) + self.state.events_done

    def sparsity(self) -> float:
        """Fraction of weights pruned; with channel structure, of prunable channels (or MACs) removed."""
        if not self.pcfg.removes_channels or not self.groups:
            return self.masks.sparsity()
        views = [(g.pruner, PruneView(g.params, self.masks)) for g in self.groups]
        sizes = [p.space.num_channels for p, _ in views]  # type: ignore[attr-defined]
        return sum(p.sparsity(v) * n for (p, v), n in zip(views, sizes, strict=True)) / max(sum(sizes), 1)

    def images(self, full: bool) -> str:
        """The test images `evaluate(full)` measures, in words."""
        return test_images(self.data, None if full else self.recipe.evaluation.monitor_samples)

    def evaluate(self, full: bool, *, kind: str, label: str, epoch: float | None = None,
                 event: int | None = None) -> float:
        """Test accuracy of the unwrapped model, measured on the main rank and shared with all; listed in
        the stage's evaluations (what was measured, when, on which images)."""
        t0 = time.perf_counter()
        limit = None if full else self.recipe.evaluation.monitor_samples
        measured: tuple[float, int] | None = None
        if self.dist.is_main:
            counted = _Counted(_first_samples(self.data.test_batches(), limit))
            measured = (evaluate(self.model, counted, self.device)[0], counted.samples)
        shared = broadcast_object(measured)
        assert shared is not None  # the main rank measured it
        accuracy, samples = float(shared[0]), int(shared[1])
        seconds = time.perf_counter() - t0
        self.state.timings["eval_s"] += seconds
        self.state.last_accuracy = accuracy
        self.state.last_evaluation_full = full or limit is None
        self.state.evaluations.append({
            "kind": kind, "label": label, "epoch": self.state.steps_done / max(self.steps_per_epoch, 1)
            if epoch is None else epoch, "event": event, "runtime": "PyTorch", "samples": samples,
            "test_images": self.images(full), "accuracy": accuracy, "seconds": round(seconds, 3)})
        return accuracy

    def _sync_buffers(self) -> None:
        """BatchNorm running statistics drift per rank during DDP training: take the main rank's."""
        if self.dist.enabled:
            for buffer in self.model.buffers():
                broadcast_tensor_(buffer)

    def _wrap_ddp(self) -> nn.Module:
        if not self.dist.enabled:
            return self.model
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(self.model, device_ids=device_ids)

    def _note(self, text: str) -> None:
        if text not in self.state.notes:
            self.state.notes.append(text)
        self.reporter.message(text)

    def _record(self, record: dict[str, Any]) -> None:
        self.state.history.append(record)
        if self.dist.is_main:
            self.run.append_history(record)

    def _elapsed(self) -> float:
        return self.state.elapsed_s + (time.perf_counter() - self.started)

    def metrics(self) -> RunMetrics:
        st = self.state
        all_params = sum(p.numel() for p in self.model.parameters())
        all_zeros = sum(int((p == 0).sum()) for p in self.model.parameters())
        return RunMetrics(
            method=self.method,
            structure=self.pcfg.structure,
            initial_accuracy=st.initial_accuracy,
            final_accuracy=st.last_accuracy,
            target_sparsity=self.pcfg.final_sparsity if self.pcfg.prunes and not self.pcfg.groups else None,
            sparsity=self.sparsity(),
            model_sparsity=all_zeros / max(all_params, 1),
            pruned_params=self.masks.num_zeros(),
            prunable_params=self.masks.num_params(),
            # the pruned layers' weights (channel masks also cover BatchNorm parameters: not layers of the chart)
            per_layer_sparsity={name: value for name, value in self.masks.per_layer_sparsity().items()
                                if any(name in group.params for group in self.groups)},
            schedule=[{"epoch": e.epoch, "optimizer_step": e.step, "target_sparsity": e.target,
                       **({"group": self.groups[e.group].name} if len(self.groups) > 1 else {})}
                      for e in self.events],
            prune_reports=[PruneStepRecord.from_dict(r) for r in st.reports],
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            world_size=self.dist.world_size,
            timings={**st.timings, "total_s": self._elapsed()},
            evaluations=[dict(e) for e in st.evaluations],
            resumed=bool(st.resumed_from),
            resumed_from=st.resumed_from,
            notes=st.notes,
            checkpoint=str(self.checkpoint_path),
        )


_FINAL = " (the final model)"


class _Counted:
    """Batches passed through, counting their samples."""

    def __init__(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> None:
        self.batches, self.samples = batches, 0

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for x, y in self.batches:
            self.samples += len(y)
            yield x, y


def _first_samples(batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                   limit: int | None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches up to `limit` samples (the last one cut), or all of them."""
    seen = 0
    for x, y in batches:
        if limit is not None and seen >= limit:
            return
        take = len(y) if limit is None else min(len(y), limit - seen)
        seen += take
        yield x[:take], y[:take]

