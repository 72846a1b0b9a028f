"""The gradual pruning stage: exact masks through fine-tuning, scheduled sparsities, resume after SIGKILL."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from wf_pipeline.data import build_data
from wf_pipeline.errors import WFError
from wf_pipeline.models import build_model
from wf_pipeline.pruning.schedule import planned_targets
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.recipe.schema import Recipe
from wf_pipeline.runtime.progress import NullReporter
from wf_pipeline.runtime.rundir import RunDir
from wf_pipeline.training.gradual import CHECKPOINT_NAME, plan_num_grads, run_pruning_stage

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
ENTRY = REPO / "tests" / "gradual_entry.py"


def tiny_recipe(root: Path, *overrides: str):
    recipe, _ = load_recipe(TINY, [f"output.root={root}", *overrides])
    return recipe


def grouped(recipe, groups: list[dict]):
    """`recipe` pruning `groups` instead of its top-level target (which groups replace: both is refused)."""
    raw = recipe.to_dict()
    for name in ("layers", "initial_sparsity", "final_sparsity"):
        raw["pruning"].pop(name, None)
    return type(recipe).model_validate(raw | {"pruning": raw["pruning"] | {"groups": groups}})


def bare_run(recipe) -> RunDir:
    run = RunDir(Path(recipe.output.root) / recipe.run_name())
    run.checkpoints.mkdir(parents=True, exist_ok=True)
    return run


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest single-threaded


class ZeroWatcher(NullReporter):
    """After every fine-tuning step: no weight that was exactly zero (pruned) has come back."""

    def __init__(self, params: dict[str, torch.nn.Parameter]) -> None:
        self.params = params
        self.zeros: dict[str, torch.Tensor] | None = None
        self.steps = 0

    def advance(self, task: str, completed: int, info: str = "") -> None:
        if not task.startswith("finetune"):
            return
        now = {n: p.detach() == 0 for n, p in self.params.items()}
        if self.zeros is not None:
            for name, before in self.zeros.items():
                revived = before & ~now[name]
                assert not revived.any(), f"{int(revived.sum())} pruned weights of {name} revived"
        self.zeros = now
        self.steps += 1


@pytest.fixture(scope="module")
def woodfisher_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("gradual")
    recipe = tiny_recipe(root, "finetune.optimizer.momentum=0.9", "finetune.optimizer.weight_decay=0.01")
    torch.manual_seed(0)
    model = build_model(recipe.model)
    run = bare_run(recipe)
    watcher = ZeroWatcher(select_prunable(model, recipe.pruning.layers, recipe.pruning.skip))
    result = run_pruning_stage(recipe, run, model, build_data(recipe.data, recipe.seed), torch.device("cpu"),
                               reporter=watcher)
    return {"recipe": recipe, "run": run, "result": result, "watcher": watcher, "model": model}


def test_masks_never_revive_through_momentum_and_weight_decay(woodfisher_run: dict[str, Any]) -> None:
    recipe, result, watcher = woodfisher_run["recipe"], woodfisher_run["result"], woodfisher_run["watcher"]
    assert watcher.steps == recipe.finetune.epochs * recipe.finetune.steps_per_epoch
    named = dict(result.model.named_parameters())
    for name, mask in result.masks.masks.items():
        assert torch.all(named[name].detach()[~mask] == 0), name
    # The optimizer's momentum at pruned positions is zero too (checked in the final checkpoint).
    ckpt = torch.load(woodfisher_run["run"].checkpoints / CHECKPOINT_NAME, weights_only=True)
    decay_names = [n for n, p in result.model.named_parameters() if p.dim() > 1]  # build_optimizer's group 0
    group0 = ckpt["optimizer"]["param_groups"][0]["params"]
    checked = 0
    for name, mask in result.masks.masks.items():
        state = ckpt["optimizer"]["state"].get(group0[decay_names.index(name)])
        assert state is not None and "momentum_buffer" in state
        assert torch.all(state["momentum_buffer"][~mask.cpu()] == 0), name
        checked += 1
    assert checked == len(result.masks.masks)


def test_stage_reaches_scheduled_sparsities(woodfisher_run: dict[str, Any]) -> None:
    recipe, result, run = woodfisher_run["recipe"], woodfisher_run["result"], woodfisher_run["run"]
    n = result.masks.num_params()
    plan = planned_targets(recipe.pruning.schedule, recipe.pruning.initial_sparsity, recipe.pruning.final_sparsity)
    history = run.read_history()
    prunes = [r for r in history if r["kind"] == "prune"]
    assert [(r["epoch"], r["target_sparsity"]) for r in prunes] == [(e, pytest.approx(t)) for e, t in plan]
    for record in prunes:
        assert abs(record["achieved_sparsity"] - record["target_sparsity"]) <= 1.0 / n
        assert record["method"] == "woodfisher" and record["num_grads"] == recipe.pruning.woodfisher.num_grads
        assert set(record["timings"]) >= {"gradients", "inverse", "obs", "total"}
    epochs = [r for r in history if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == list(range(recipe.finetune.epochs))
    assert {"train_loss", "train_accuracy", "sparsity", "lr", "elapsed_s"} <= set(epochs[0])
    # the default (evaluation.monitor: none) measures the test accuracy only at the end
    assert ["test_accuracy" in r for r in epochs] == [False] * (len(epochs) - 1) + [True]
    assert all("test_accuracy_after" not in r for r in prunes)
    assert result.metrics.sparsity == pytest.approx(recipe.pruning.final_sparsity, abs=1.0 / n)
    assert result.metrics.final_accuracy == epochs[-1]["test_accuracy"]
    assert len(result.metrics.prune_reports) == len(plan)
    assert set(result.metrics.per_layer_sparsity) == set(result.masks.masks)


def count_evaluations(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Every PyTorch evaluation the pruning stage makes from now on, as its number of test images."""
    from wf_pipeline.training.gradual import loop

    calls: list[int] = []

    def counting(model, batches, device):  # noqa: ANN001, ANN202
        kept = list(batches)
        calls.append(sum(len(y) for _, y in kept))
        return real(model, kept, device)

    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", counting)
    return calls


def test_resuming_a_finished_stage_does_no_work_and_keeps_history(woodfisher_run: dict[str, Any],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    recipe, run, first = woodfisher_run["recipe"], woodfisher_run["run"], woodfisher_run["result"]
    before = run.read_history()
    model = build_model(recipe.model)  # fresh weights: everything must come from the checkpoint
    evaluations = count_evaluations(monkeypatch)
    again = run_pruning_stage(recipe, run, model, build_data(recipe.data, recipe.seed), torch.device("cpu"),
                              resume=True)
    assert evaluations == []  # both accuracies come from the checkpoint: nothing evaluated twice
    assert run.read_history() == before
    assert again.metrics.final_accuracy == first.metrics.final_accuracy
    assert again.metrics.initial_accuracy == first.metrics.initial_accuracy
    assert again.metrics.evaluations == first.metrics.evaluations
    for name, mask in first.masks.masks.items():
        assert torch.equal(again.masks.masks[name], mask)
    for (name, a), b in zip(first.model.state_dict().items(), again.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_resume_refuses_a_changed_recipe(woodfisher_run: dict[str, Any]) -> None:
    recipe, run = woodfisher_run["recipe"], woodfisher_run["run"]
    changed = recipe.model_copy(deep=True)
    changed.pruning.final_sparsity = 0.95
    with pytest.raises(WFError, match="pruning.final_sparsity"):
        run_pruning_stage(changed, run, build_model(recipe.model), build_data(recipe.data, recipe.seed),
                          torch.device("cpu"), resume=True)


def test_method_none_only_finetunes(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, "pruning.method=none", "finetune.epochs=1", "finetune.steps_per_epoch=2")
    run = bare_run(recipe)
    result = run_pruning_stage(recipe, run, build_model(recipe.model), build_data(recipe.data, recipe.seed),
                               torch.device("cpu"))
    assert [r["kind"] for r in run.read_history()] == ["epoch"]
    assert result.metrics.sparsity == 0.0 and result.metrics.prune_reports == []


def test_limited_data_caps_per_sample_gradients(tmp_path: Path) -> None:
    assert plan_num_grads(1000, 1, 5000, 1) == (1000, None)
    total, note = plan_num_grads(1000, 1, 30, 1)
    assert total == 30 and note is not None and "exceeds the Fisher pool" in note
    total, note = plan_num_grads(1000, 1, 31, 2)  # each of 2 ranks owns 15 samples of the pool
    assert total == 30
    total, note = plan_num_grads(100, 16, 200, 1)  # mini-batch gradients: distinct when cycled
    assert total == 100 and note is not None and "cycled" in note
    with pytest.raises(WFError):
        plan_num_grads(10, 1, 1, 2)

    recipe = tiny_recipe(tmp_path, "data.fisher_samples_per_class=2", "finetune.epochs=1",
                         "finetune.steps_per_epoch=1", "pruning.schedule.end_epoch=0")
    run = bare_run(recipe)
    result = run_pruning_stage(recipe, run, build_model(recipe.model), build_data(recipe.data, recipe.seed),
                               torch.device("cpu"))
    assert result.metrics.prune_reports is not None and result.metrics.notes is not None
    assert result.metrics.prune_reports[0].num_grads == 20  # 2 samples x 10 classes
    assert any("exceeds the Fisher pool" in note for note in result.metrics.notes)


# ----------------------------------------------------------------------------- resume after SIGKILL
def _entry(root: Path, out: Path, *extra: str) -> list[str]:
    # finetune.steps_per_epoch=3 keeps every subprocess to a few seconds of work
    return [sys.executable, str(ENTRY), str(TINY), "--root", str(root), "--out", str(out),
            "--set", "finetune.steps_per_epoch=3", *extra]


def _history_without_times(run_path: Path) -> list[dict[str, Any]]:
    records = [json.loads(line) for line in (run_path / "history.jsonl").read_text().splitlines()]
    for record in records:
        record.pop("elapsed_s", None)
        record.pop("timings", None)
        record.pop("fisher_plan", None)  # like timings: the memory plan depends on the machine's free memory
    return records


def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref_out, out, marker = tmp_path / "ref.pt", tmp_path / "resumed.pt", tmp_path / "paused"
    # The reference and the run to be killed start together (one core each).
    reference = subprocess.Popen(_entry(tmp_path / "ref", ref_out), env=env, stderr=subprocess.PIPE)
    victim = subprocess.Popen(_entry(tmp_path / "kill", out, "--pause-after-steps", "5", "--marker", str(marker)),
                              env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 180
        while not marker.exists():  # the victim is mid-way through epoch 2 (its 5th optimizer step)
            assert victim.poll() is None, victim.stderr.read().decode()  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run never reached the pause point"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    run_path = tmp_path / "kill" / "tiny-digits"
    assert (run_path / "checkpoints" / CHECKPOINT_NAME).exists() and not out.exists()

    resumed = subprocess.run(_entry(tmp_path / "kill", out, "--resume"), env=env, capture_output=True, timeout=180)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert reference.wait(timeout=180) == 0, reference.stderr.read().decode()[-2000:]  # type: ignore[union-attr]

    ref, got = torch.load(ref_out, weights_only=False), torch.load(out, weights_only=False)
    assert got["metrics"]["resumed"] and got["metrics"]["resumed_from"][0]["epoch"] == 1
    for name, mask in ref["masks"].items():
        assert torch.equal(got["masks"][name], mask), name
    assert got["metrics"]["final_accuracy"] == ref["metrics"]["final_accuracy"]
    for name, tensor in ref["state"].items():
        assert torch.equal(got["state"][name], tensor), f"{name} differs after resume"  # bit-identical on CPU
    # history.jsonl is rebuilt, not duplicated: the same records as the uninterrupted run
    assert _history_without_times(run_path) == _history_without_times(tmp_path / "ref" / "tiny-digits")


# ----------------------------------------------------------------------------- fractional schedules and groups
class _Crash(Exception):
    pass


class CrashAfterSteps(NullReporter):
    """Raises after the N-th fine-tuning step: an in-process stand-in for a kill."""

    def __init__(self, steps: int) -> None:
        self.left = steps

    def advance(self, task: str, completed: int, info: str = "") -> None:
        if task.startswith("finetune"):
            self.left -= 1
            if self.left == 0:
                raise _Crash()


FRACTIONAL = ("pruning.schedule.start_epoch=0", "pruning.schedule.end_epoch=1.5", "pruning.schedule.frequency=0.5",
              "finetune.epochs=3", "finetune.steps_per_epoch=4")


def _run_stage(recipe, reporter=None, resume=False):  # noqa: ANN001, ANN202
    run = bare_run(recipe)
    torch.manual_seed(0)
    return run, run_pruning_stage(recipe, run, build_model(recipe.model), build_data(recipe.data, recipe.seed),
                                  torch.device("cpu"), reporter=reporter, resume=resume)


def test_fractional_schedule_prunes_inside_epochs(tmp_path: Path) -> None:
    recipe = tiny_recipe(tmp_path, *FRACTIONAL)
    run, result = _run_stage(recipe)
    prunes = [r for r in run.read_history() if r["kind"] == "prune"]
    # every half epoch of 4 steps: before optimizer steps 0, 2, 4 and 6
    assert [r["optimizer_step"] for r in prunes] == [0, 2, 4, 6]
    assert [r["epoch"] for r in prunes] == [0, 0.5, 1, 1.5]
    assert prunes[-1]["target_sparsity"] == recipe.pruning.final_sparsity
    epochs = [r for r in run.read_history() if r["kind"] == "epoch"]
    assert [r["epoch"] for r in epochs] == [0, 1, 2]
    assert result.metrics.sparsity == pytest.approx(recipe.pruning.final_sparsity, abs=1e-4)


def test_resume_inside_an_epoch_after_a_pruning_step(tmp_path: Path) -> None:
    """Killed two steps after the pruning at step 6 (mid-epoch 1): the resumed run equals an uninterrupted one."""
    _, reference = _run_stage(tiny_recipe(tmp_path / "ref", *FRACTIONAL))
    crashed = tiny_recipe(tmp_path / "crash", *FRACTIONAL)
    with pytest.raises(_Crash):
        _run_stage(crashed, reporter=CrashAfterSteps(7))
    run, resumed = _run_stage(crashed, resume=True)
    assert resumed.metrics.resumed_from[0]["steps_done"] == 6  # the checkpoint after the pruning at step 6
    for (name, a), b in zip(reference.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    assert resumed.metrics.final_accuracy == reference.metrics.final_accuracy
    kinds = [(r["kind"], r.get("optimizer_step", r.get("epoch"))) for r in run.read_history()]
    assert kinds == [("prune", 0), ("prune", 2), ("epoch", 0), ("prune", 4), ("prune", 6), ("epoch", 1), ("epoch", 2)]


def test_groups_prune_their_own_layers_to_their_own_targets(tmp_path: Path) -> None:
    recipe = grouped(tiny_recipe(tmp_path, "finetune.epochs=2", "finetune.steps_per_epoch=2"), [
        {"name": "early", "layers": [r"^layer1\."], "final_sparsity": 0.5,
         "schedule": {"start_epoch": 0, "end_epoch": 0}},
        {"name": "late", "layers": [r"^layer[23]\."], "initial_sparsity": 0.3, "final_sparsity": 0.8,
         "schedule": {"start_epoch": 0, "end_epoch": 1, "frequency": 0.5}},
    ])
    run, result = _run_stage(recipe)
    sparsity = result.metrics.per_layer_sparsity
    early = [n for n in sparsity if n.startswith("layer1.")]
    late = [n for n in sparsity if n.startswith(("layer2.", "layer3."))]
    assert set(sparsity) == set(early) | set(late)  # conv1 and fc belong to no group: not held, not pruned
    sizes = dict((n, p.numel()) for n, p in result.model.named_parameters())
    group_sparsity = lambda names: sum(sparsity[n] * sizes[n] for n in names) / sum(sizes[n] for n in names)  # noqa: E731
    assert group_sparsity(early) == pytest.approx(0.5, abs=1e-3)
    assert group_sparsity(late) == pytest.approx(0.8, abs=1e-3)
    prunes = [r for r in run.read_history() if r["kind"] == "prune"]
    assert [(r["group"], r["optimizer_step"]) for r in prunes] == [("early", 0), ("late", 0), ("late", 1), ("late", 2)]


def test_groups_must_not_overlap_and_must_match(tmp_path: Path) -> None:
    recipe = grouped(tiny_recipe(tmp_path), [{"layers": [r"^layer1\."], "final_sparsity": 0.5},
                                             {"layers": [r"^layer1\.0\."], "final_sparsity": 0.7}])
    with pytest.raises(WFError, match=r"pruning.groups\[1\].layers: parameter 'layer1.0.conv1.weight' is already"):
        _run_stage(recipe)
    recipe.pruning.groups = [{"layers": ["^nothing"], "final_sparsity": 0.5}]
    with pytest.raises(WFError, match=r"pruning.groups\[0\]: no prunable weights"):
        _run_stage(recipe)


def test_by_default_the_stage_evaluates_only_its_start_and_end_on_the_whole_test_set(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The documented default (docs/recipes.md, the schema): no decision reads an accuracy between the start
    and the end, so the stage evaluates twice, the starting and the final model, each on the whole test set."""
    assert Recipe().evaluation.monitor == "none"
    recipe = tiny_recipe(tmp_path, "finetune.epochs=3", "finetune.steps_per_epoch=2", "pruning.schedule.end_epoch=2")
    assert recipe.evaluation.monitor == "none"  # the tiny recipe keeps the default
    full_size = len(build_data(recipe.data, recipe.seed).test_split)  # type: ignore[arg-type]
    evaluations = count_evaluations(monkeypatch)
    run, result = _run_stage(recipe)
    assert evaluations == [full_size, full_size]
    listed = result.metrics.evaluations
    assert listed is not None and [e["kind"] for e in listed] == ["start", "epoch"]
    assert [e["test_images"] for e in listed] == [f"all {full_size:,} test images"] * 2
    assert [e["accuracy"] for e in listed] == [result.metrics.initial_accuracy, result.metrics.final_accuracy]
    history = run.read_history()
    assert [r.get("test_accuracy", r.get("test_accuracy_after")) for r in history] == \
        [None] * (len(history) - 1) + [result.metrics.final_accuracy]


# 2 epochs of 2 steps, pruning before steps 0 and 2: the kinds of evaluation each setting makes, in order
@pytest.mark.parametrize("monitor, kinds", [
    ("pruning_steps", ["start", "prune", "prune", "epoch"]),
    ("epochs", ["start", "epoch", "epoch"]),
    ("all", ["start", "prune", "epoch", "prune", "epoch"]),
])
def test_monitoring_uses_a_slice_and_the_end_the_whole_test_set(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                 monitor: str, kinds: list[str]) -> None:
    recipe = tiny_recipe(tmp_path, f"evaluation.monitor={monitor}", "evaluation.monitor_samples=50",
                         "finetune.epochs=2", "finetune.steps_per_epoch=2", "pruning.schedule.end_epoch=1")
    data = build_data(recipe.data, recipe.seed)
    assert data.test_split is not None
    full_size = len(data.test_split)
    assert full_size > 50
    evaluations = count_evaluations(monkeypatch)
    run, result = _run_stage(recipe)
    listed = result.metrics.evaluations
    assert listed is not None
    assert [e["kind"] for e in listed] == kinds
    assert evaluations == [e["samples"] for e in listed] == [full_size] + [50] * (len(listed) - 2) + [full_size]
    assert all(e["test_images"] == "the first 50 of 360 test images" for e in listed[1:-1])
    history = run.read_history()
    measured = [r.get("test_accuracy", r.get("test_accuracy_after")) for r in history]
    assert sum(a is not None for a in measured) == len(listed) - 1  # every one but the start's is in the history
    for accuracy in measured[:-1]:
        assert accuracy is None or round(accuracy * 50, 6).is_integer()  # measured on 50 images
    assert history[-1]["test_accuracy"] == result.metrics.final_accuracy
    assert round(result.metrics.final_accuracy * full_size, 6).is_integer()
