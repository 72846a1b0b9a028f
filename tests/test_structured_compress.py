"""`compress` with ``pruning.structure: channel`` end to end: prune whole channels, fine-tune, cut them
out, export the physically smaller model and validate it; a killed run resumes to the same result."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import run_cli
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.loader import load_recipe

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
ENTRY = REPO / "tests" / "gradual_entry.py"
# Two short epochs, two pruning steps (20% then 50% of the channels), a small Fisher.
STRUCTURED = ["pruning.structure=channel", "pruning.initial_sparsity=0.2", "pruning.final_sparsity=0.5",
              "pruning.schedule.end_epoch=1", "finetune.epochs=2", "finetune.steps_per_epoch=2",
              "pruning.woodfisher.num_grads=16", "pruning.woodfisher.chunk_size=16", "pruning.channel.min_keep=0.25"]
MODELS = {
    "resnet20": [],
    "mobilenetv1": ["model.name=mobilenetv1", "model.kwargs={width_mult: 0.25, small_input: true}"],
    # torchvision ResNet-18: prune the channels produced in its first two stages (keeps the Fisher small)
    "resnet18": ["model.name=resnet18", r"pruning.layers=['^layer1\.', '^layer2\.']"],
}


def _sets(*overrides: str) -> list[str]:
    return [arg for item in overrides for arg in ("--set", item)]


@pytest.mark.parametrize("model", list(MODELS))
def test_structured_compress_exports_a_smaller_model_that_validates(model: str, tmp_path: Path, capsys,
                                                                    monkeypatch) -> None:
    root = tmp_path / "artifacts"
    result = run_cli(capsys, monkeypatch, "compress", str(TINY),
                     *_sets(f"output.root={root}", *STRUCTURED, *MODELS[model]))
    assert result.code == 0, result.out + result.err
    run = root / "tiny-digits"
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["sparsity"] == pytest.approx(0.5, abs=0.01)  # half of the prunable channels
    surgery = metrics["channel_surgery"]
    assert surgery["params_after"] < surgery["params_before"] and surgery["max_output_change"] < 1e-3
    assert sum(surgery["channels_after"].values()) < sum(surgery["channels_before"].values())
    export = json.loads((run / "export" / "export.json").read_text())
    assert export["pruned"]["sparsity_matches"]
    # The ONNX file itself is smaller: fewer parameters and multiply-accumulates than the dense baseline.
    pruned, dense = export["pruned"]["structure"], export["dense_baseline"]["structure"]
    assert pruned["params"] < dense["params"] and pruned["macs"] < dense["macs"]
    validation = json.loads((run / "validation" / "validation.json").read_text())
    assert validation["passed"] is True  # parity of the smaller ONNX model with the smaller torch model


def test_channel_methods_need_channel_structure() -> None:
    with pytest.raises(WFError, match="structure"):
        load_recipe(TINY, ["pruning.method=taylor"])
    with pytest.raises(WFError, match="prunes single weights"):
        load_recipe(TINY, ["pruning.structure=channel", "pruning.method=diag_fisher"])
    with pytest.raises(WFError, match="min_keep"):
        load_recipe(TINY, ["pruning.structure=channel", "pruning.channel.min_keep=1.5"])
    floors = r"pruning.channel.min_keep_layers={'^layer3\.': 0.5}"
    recipe, _ = load_recipe(TINY, ["pruning.structure=channel", "pruning.method=group_norm",
                                   "pruning.channel.target=flops", floors])
    assert recipe.pruning.channel.target == "flops" and recipe.pruning.channel.min_keep_layers == {r"^layer3\.": 0.5}


# ----------------------------------------------------------------------------- resume after SIGKILL
def _entry(root: Path, out: Path, *extra: str) -> list[str]:
    return [sys.executable, str(ENTRY), str(TINY), "--root", str(root), "--out", str(out),
            *_sets(*STRUCTURED, "finetune.steps_per_epoch=3"), *extra]


def test_resumed_structured_run_equals_uninterrupted_run(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    ref_out, out, marker = tmp_path / "ref.pt", tmp_path / "resumed.pt", tmp_path / "paused"
    reference = subprocess.Popen(_entry(tmp_path / "ref", ref_out), env=env, stderr=subprocess.PIPE)
    # Killed in the second epoch (its 4th optimizer step), after the first pruning step.
    victim = subprocess.Popen(_entry(tmp_path / "kill", out, "--pause-after-steps", "4", "--marker", str(marker)),
                              env=env, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert victim.poll() is None, victim.stderr.read().decode()[-2000:]  # type: ignore[union-attr]
            assert time.monotonic() < deadline, "the run never reached the pause point"
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL and not out.exists()
    resumed = subprocess.run(_entry(tmp_path / "kill", out, "--resume"), env=env, capture_output=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr.decode()[-2000:]
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]  # type: ignore[union-attr]

    ref, got = torch.load(ref_out, weights_only=False), torch.load(out, weights_only=False)
    assert got["metrics"]["resumed"] and not ref["metrics"]["resumed"]
    assert set(got["masks"]) == set(ref["masks"]) and any(n.endswith("bn1.weight") for n in ref["masks"])
    for name, mask in ref["masks"].items():
        assert torch.equal(got["masks"][name], mask), name
    for name, tensor in ref["state"].items():
        assert torch.equal(got["state"][name], tensor), f"{name} differs after resume"
    assert got["metrics"]["final_accuracy"] == ref["metrics"]["final_accuracy"]
    assert got["metrics"]["sparsity"] == ref["metrics"]["sparsity"] == pytest.approx(0.5, abs=0.01)


# ----------------------------------------------------------------------------- torchrun
@pytest.mark.parametrize("method", ["woodfisher", "taylor"])
def test_two_processes_remove_the_same_channels_as_one(method: str, tmp_path: Path) -> None:
    from tests.test_distributed import free_port

    # One step straight to 50% of the channels (fp64 statistics: summation order cannot flip a ranking).
    one_step = [*STRUCTURED, f"pruning.method={method}", "pruning.schedule.end_epoch=0", "pruning.initial_sparsity=0.5",
                "pruning.woodfisher.num_grads=32", "pruning.woodfisher.dtype=float64", "finetune.epochs=1",
                "data.batch_size=32"]
    env = {**os.environ, "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, str(ENTRY), str(TINY), "--root", str(tmp_path / "one"),
                             "--out", str(tmp_path / "one.pt"), *_sets(*one_step)],
                            env=env, capture_output=True, timeout=300)
    assert single.returncode == 0, single.stderr.decode()[-3000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                             "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ENTRY), str(TINY),
                             "--root", str(tmp_path / "two"), "--out", str(tmp_path / "two.pt"), *_sets(*one_step)],
                            env=env, capture_output=True, timeout=300)
    assert double.returncode == 0, double.stderr.decode()[-3000:]
    one = torch.load(tmp_path / "one.pt", weights_only=False)
    two = torch.load(tmp_path / "two.pt", weights_only=False)  # the entry checked that both ranks agree
    assert two["metrics"]["world_size"] == 2
    for name, mask in one["masks"].items():
        assert torch.equal(two["masks"][name], mask), f"{name}: the 2-process run removed other channels"
    assert two["metrics"]["prune_reports"][0]["num_grads"] == one["metrics"]["prune_reports"][0]["num_grads"] == 32
