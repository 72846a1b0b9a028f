"""The INT8 stage: calibration on training images only, INT8 agreement with its FP32 source, exact compact
storage, same bytes after a kill and --resume, one-line refusals of a bad `quantize` section, and a latency
gate that holds at every batch size."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import numpy as np
import onnx
import pytest
import torch

from tests.cli_helpers import run_cli
from wf_pipeline.data import build_data
from wf_pipeline.data.loaders import TensorBatches
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.deploy.latency import LatencyStats
from wf_pipeline.deploy.ort_session import create_session, run_logits
from wf_pipeline.deploy.quantize import is_quantized, nodes_kept_fp32, quantize_model
from wf_pipeline.deploy.validate import ValidationSettings, validate_model
from wf_pipeline.models import build_model
from wf_pipeline.recipe.loader import load_recipe
from wf_pipeline.recipe.schema import DataConfig, GatesConfig, ModelConfig, QuantizeConfig
from wf_pipeline.runtime.rundir import RunDir

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parent.parent
TINY = REPO / "recipes" / "tiny_digits.yaml"
# slow_int8_convs and ship fixed: 'measure' and 'faster' time the model, so two runs may choose differently (a
# resumed run reuses its recorded choices: tested below).
QUICK = ["finetune.epochs=2", "finetune.steps_per_epoch=2", "pruning.schedule.end_epoch=1",
         "pruning.woodfisher.num_grads=16", "validate.repeats=2", "validate.warmup=0", "quantize.enabled=true",
         "quantize.calibration_samples=128", "quantize.slow_int8_convs=fp32", "quantize.ship=int8",
         "validate.gates.min_int8_agreement=0.5"]


def _digits():
    return build_data(DataConfig(dataset="digits", augment=False), seed=0)


def _bundled_resnet20() -> torch.nn.Module:
    return build_model(ModelConfig(name="resnet20", in_channels=1, weights="builtin:resnet20-fmnist")).eval()


# ------------------------------------------------------------------------------------------- calibration data
def test_calibration_images_are_training_images_never_test_images() -> None:
    data = _digits()
    batches = data.calibration_batches(200, batch_size=64)
    images = torch.cat(batches)
    assert images.shape[0] == 200 and [b.shape[0] for b in batches] == [64, 64, 64, 8]
    train, _ = next(iter(TensorBatches(data.train_split.images, data.train_split.labels, data.preprocess,
                                       len(data.train_split))))
    test, _ = data.test_tensors()
    flat_train, flat_test = train.flatten(1), test.flatten(1)
    in_train = (images.flatten(1)[:, None, :] == flat_train[None]).all(-1).any(-1)
    in_test = (images.flatten(1)[:, None, :] == flat_test[None]).all(-1).any(-1)
    assert bool(in_train.all())
    only_in_test = in_test & ~in_train
    assert not bool(only_in_test.any())
    # the same seed gives the same images (a resumed run calibrates on the same set)
    assert torch.equal(torch.cat(data.calibration_batches(200, batch_size=64)), images)


def test_export_stage_never_reads_the_test_split(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The export + quantize stage gives the same bytes with a test split that is overwritten and raises when read."""
    from wf_pipeline import stages

    recipe, _ = load_recipe(TINY, ["quantize.enabled=true", "quantize.calibration_samples=64",
                                   "quantize.slow_int8_convs=fp32", "quantize.ship=int8", f"output.root={tmp_path}"])
    model = build_model(recipe.model).eval()

    class Run:
        def __init__(self, path: Path) -> None:
            self.path = path

        def file(self, *parts: str) -> Path:
            return self.path.joinpath(*parts)

    clean = stages._export(recipe, cast(RunDir, Run(tmp_path / "clean")), model, model,
                           build_data(recipe.data, recipe.seed), masks=None)
    poisoned = build_data(recipe.data, recipe.seed)
    assert poisoned.test_split is not None
    poisoned.test_split.images.fill_(255)

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the export stage read test data")

    monkeypatch.setattr(type(poisoned), "test_batches", forbidden)
    monkeypatch.setattr(type(poisoned), "test_tensors", forbidden)
    files = stages._export(recipe, cast(RunDir, Run(tmp_path / "poisoned")), model, model, poisoned, masks=None)
    assert files.quantized and files.shipped.name == "model.onnx" and files.fp32.name == "model.fp32.onnx"
    assert is_quantized(onnx.load(str(files.shipped)))
    assert files.shipped.read_bytes() == clean.shipped.read_bytes()
    record = json.loads((files.shipped.parent / "export.json").read_text())
    assert record["shipped"] == "model.onnx" and record["shipped_format"] == "int8-qdq"
    assert record["quantized"]["calibration_split"] == "train" and record["quantized"]["calibration_samples"] == 64


@pytest.mark.parametrize("int8_over_fp32", [0.6, 1.4])
def test_the_faster_of_int8_and_its_fp32_source_ships(int8_over_fp32: float, tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from wf_pipeline import stages
    from wf_pipeline.deploy import quantize as quantize_module

    calls = []

    def timed(int8_path, fp32_path, batches, record=None):
        calls.append(record)
        return {"int8_over_fp32": int8_over_fp32, "how": "measured", "timings_ms": {}}

    monkeypatch.setattr(quantize_module, "int8_speed", timed)
    recipe, _ = load_recipe(TINY, ["quantize.enabled=true", "quantize.calibration_samples=64",
                                   "quantize.slow_int8_convs=fp32", f"output.root={tmp_path}"])
    model = build_model(recipe.model).eval()

    class Run:
        path = tmp_path / "run"

        def file(self, *parts: str) -> Path:
            return self.path.joinpath(*parts)

    files = stages._export(recipe, cast(RunDir, Run()), model, model, build_data(recipe.data, recipe.seed),
                           masks=None)
    export = tmp_path / "run" / "export"
    record = json.loads((export / "export.json").read_text())
    assert calls == [export / "int8_speed.json"]
    assert record["quantized"]["speed_vs_fp32"]["int8_over_fp32"] == int8_over_fp32
    if int8_over_fp32 < 1:
        assert files.quantized and files.note is None and record["shipped_format"] == "int8-qdq"
        assert is_quantized(onnx.load(str(export / "model.onnx")))
        assert not (export / "model.int8.onnx").exists()
    else:
        assert not files.quantized and record["shipped_format"] == "fp32"
        assert files.note is not None and "1.40x" in files.note and "model.int8.onnx" in files.note
        assert (export / "model.onnx").read_bytes() == (export / "model.fp32.onnx").read_bytes()
        assert is_quantized(onnx.load(str(export / "model.int8.onnx")))


# ------------------------------------------------------------------------------------------- numerics
@pytest.fixture(scope="module")
def fmnist_int8(tmp_path_factory: pytest.TempPathFactory):
    """The bundled ResNet-20 exported to FP32 and quantized on 256 Fashion-MNIST training images."""
    out = tmp_path_factory.mktemp("fmnist-int8")
    data = build_data(DataConfig(dataset="fashion_mnist", augment=False), seed=0)
    model = _bundled_resnet20()
    fp32 = export_onnx(model, data.sample_input(2), out / "model.fp32.onnx", sparse_storage=False).path
    calibration = [x.numpy() for x in data.calibration_batches(256)]
    result = quantize_model(fp32, out / "model.onnx", calibration, QuantizeConfig(enabled=True))
    return data, fp32, result


def test_int8_agrees_with_fp32_on_unseen_test_images_within_the_documented_bound(fmnist_int8) -> None:
    data, fp32, result = fmnist_int8
    images, labels = data.test_tensors(limit=2000)  # never seen by calibration
    x = images.numpy()
    reference = run_logits(create_session(fp32), x)
    int8 = run_logits(create_session(result.path), x)
    agreement = float((reference.argmax(1) == int8.argmax(1)).mean())
    relative = float(np.abs(int8 - reference).mean() / np.abs(reference).mean())
    defaults = GatesConfig()
    # the documented bound is the default gate: >= 97% top-1 agreement, <= 10% mean logit error
    assert defaults.min_int8_agreement is not None and defaults.max_int8_logit_error is not None
    assert agreement >= defaults.min_int8_agreement, agreement
    assert relative <= defaults.max_int8_logit_error, relative
    # and it is a real INT8 model, not the FP32 one renamed
    assert 0 < relative and result.quantized_nodes >= 20
    accuracy = float((int8.argmax(1) == labels.numpy()).mean())
    fp32_accuracy = float((reference.argmax(1) == labels.numpy()).mean())
    assert abs(accuracy - fp32_accuracy) <= 0.01


def test_slow_int8_convs_are_measured_and_named_op_types_stay_fp32(fmnist_int8, tmp_path: Path) -> None:
    data, fp32, result = fmnist_int8
    # ResNet-20's 1-channel input conv is the only one outside ORT's fast INT8 kernel; its precision was measured
    assert result.slow_int8_convs["convs"] == ["/conv1/Conv"] and result.slow_int8_convs["how"] == "measured"
    timings = result.slow_int8_convs["timings_ms"]
    assert set(timings) == {"int8", "fp32"} and all(v > 0 for t in timings.values() for v in t.values())
    assert result.slow_int8_convs["precision"] in ("int8", "fp32")
    assert ("/conv1/Conv" in result.fp32_nodes) == (result.slow_int8_convs["precision"] == "fp32")
    # a recorded choice is reused (what a resumed run does), a setting is obeyed without measuring
    calibration = [x.numpy() for x in data.calibration_batches(64)]
    choice = tmp_path / "choice.json"
    choice.write_text(json.dumps({"convs": ["/conv1/Conv"], "precision": "fp32", "how": "measured"}))
    reused = quantize_model(fp32, tmp_path / "a.onnx", calibration, QuantizeConfig(), choice_file=choice)
    assert reused.slow_int8_convs["precision"] == "fp32" and "reused" in reused.slow_int8_convs["how"]
    assert list(reused.fp32_nodes) == ["/conv1/Conv"]
    forced = quantize_model(fp32, tmp_path / "b.onnx", calibration, QuantizeConfig(slow_int8_convs="int8"))
    assert forced.fp32_nodes == {} and forced.slow_int8_convs["how"] == "setting"
    model = onnx.load(str(fp32))
    kept = nodes_kept_fp32(model, QuantizeConfig(keep_fp32_op_types=["Gemm"], keep_fp32_nodes=[r"^/layer3/layer3\.2/"]))
    assert all(model_node_type(model, name) == "Gemm" or name.startswith("/layer3/layer3.2/") for name in kept)
    assert any(model_node_type(model, name) == "Gemm" for name in kept)
    assert sum(name.startswith("/layer3/layer3.2/") for name in kept) >= 2
    assert nodes_kept_fp32(model, QuantizeConfig()) == {}
    assert nodes_kept_fp32(model, QuantizeConfig(), slow_convs_fp32=True) == {
        "/conv1/Conv": "slow_int8_convs: 1 -> 16 channels"}


def model_node_type(model: onnx.ModelProto, name: str) -> str:
    return next(node.op_type for node in model.graph.node if node.name == name)


def test_pruned_int8_weights_are_stored_compactly_and_run_exactly_as_the_plain_file(tmp_path: Path) -> None:
    model = _bundled_resnet20()
    generator = torch.Generator().manual_seed(0)
    masks = {name: torch.rand(p.shape, generator=generator) > 0.9
             for name, p in model.named_parameters() if p.dim() == 4 and name != "conv1.weight"}
    exported = export_onnx(model, torch.zeros(2, 1, 28, 28), tmp_path / "model.fp32.onnx", masks=masks)
    rng = np.random.default_rng(0)
    calibration = [rng.standard_normal((32, 1, 28, 28)).astype(np.float32) for _ in range(2)]
    assert exported.dense_path is not None
    fixed = QuantizeConfig(slow_int8_convs="fp32")  # no timing: the same inputs must give the same bytes
    result = quantize_model(exported.dense_path, tmp_path / "model.onnx", calibration, fixed)
    assert result.dense_path is not None and len(result.compact_weights) >= 18
    assert result.file_bytes < 0.5 * result.dense_file_bytes  # 90% zeros: bitmask + non-zeros beat plain INT8
    assert result.compact_vs_dense_max_abs_diff == 0.0
    probe = rng.standard_normal((16, 1, 28, 28)).astype(np.float32)
    compact = run_logits(create_session(result.path), probe)
    plain = run_logits(create_session(result.dense_path), probe)
    assert np.array_equal(compact, plain)
    # the same inputs give the same bytes (what makes --resume after a kill reproduce the file)
    again = quantize_model(exported.dense_path, tmp_path / "again.onnx", calibration, fixed)
    assert again.path.read_bytes() == result.path.read_bytes()
    # no work folder is left beside the output
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


# ------------------------------------------------------------------------------------------- validation gates
def _stats(ms: float) -> LatencyStats:
    return LatencyStats.from_runs([ms] * 3)


def test_latency_gate_fails_on_batch_32_when_only_batch_32_is_slow(fmnist_int8, monkeypatch) -> None:
    from wf_pipeline.deploy import validate as validate_module

    _, fp32, result = fmnist_int8
    timings = {1: {"pruned": 0.5, "dense": 1.0, "fp32": 0.9}, 32: {"pruned": 9.0, "dense": 10.0, "fp32": 9.5}}

    def fake_measure(sessions, batch, **_kwargs):
        return {key: _stats(timings[batch.shape[0]][key]) for key in sessions}

    monkeypatch.setattr(validate_module, "measure_interleaved", fake_measure)
    validation = validate_model(result.path, torch_model=None, test_data=None, baseline_path=fp32,
                                settings=ValidationSettings(batch_sizes=[1, 32]),
                                gates=GatesConfig(max_latency_ratio=0.6, max_parity_error=None), fp32_path=fp32)
    gate = next(g for g in validation.gates if g.name == "max_latency_ratio")
    assert gate.passed is False and gate.value == pytest.approx(0.9)
    assert "batch 32" in gate.message and "batch 1: 0.5" in gate.message
    assert [round(lat.fp32_ratio_p50 or 0, 2) for lat in validation.latency] == [0.9, 0.95]
    timings[32]["pruned"] = 5.0
    validation = validate_model(result.path, torch_model=None, test_data=None, baseline_path=fp32,
                                settings=ValidationSettings(batch_sizes=[1, 32]),
                                gates=GatesConfig(max_latency_ratio=0.6, max_parity_error=None), fp32_path=fp32)
    assert next(g for g in validation.gates if g.name == "max_latency_ratio").passed is True


def test_int8_model_is_judged_against_its_fp32_source_not_the_fp32_parity_gate(fmnist_int8) -> None:
    data, fp32, result = fmnist_int8
    test = data.test_tensors(limit=500)
    validation = validate_model(result.path, torch_model=_bundled_resnet20(), test_data=test, baseline_path=fp32,
                                settings=ValidationSettings(batch_sizes=[1], repeats=1, warmup=0),
                                gates=GatesConfig(), fp32_path=fp32)
    by_name = {g.name: g for g in validation.gates}
    assert validation.quantized and validation.int8_agreement is not None
    assert validation.int8_agreement.samples == 500  # the whole test set given, not only parity_samples
    assert by_name["max_parity_error"].passed is True  # the FP32 file against PyTorch: 1e-4 holds
    assert validation.parity is not None and validation.parity.max_abs_diff < 1e-4
    assert by_name["min_int8_agreement"].passed is True and by_name["max_int8_logit_error"].passed is True
    assert validation.fp32_accuracy is not None and validation.accuracy is not None
    # Without the FP32 file the PyTorch model is the reference, and the 1e-4 parity gate is skipped, not failed.
    alone = validate_model(result.path, torch_model=_bundled_resnet20(), test_data=test, baseline_path=None,
                           settings=ValidationSettings(batch_sizes=[1], repeats=1, warmup=0), gates=GatesConfig())
    alone_gates = {g.name: g for g in alone.gates}
    assert alone_gates["max_parity_error"].skipped and "INT8" in alone_gates["max_parity_error"].message
    assert alone.int8_agreement is not None and alone.int8_agreement.reference.startswith("PyTorch")
    assert alone_gates["min_int8_agreement"].passed is True


def test_fp32_models_get_no_int8_gates(fmnist_int8) -> None:
    _, fp32, _ = fmnist_int8
    validation = validate_model(fp32, torch_model=None, test_data=None, baseline_path=None,
                                settings=ValidationSettings(batch_sizes=[1], repeats=1, warmup=0),
                                gates=GatesConfig(max_parity_error=None))
    assert not validation.quantized and validation.gates == []


# ------------------------------------------------------------------------------------------- bad input
BAD_QUANTIZE = [
    (["quantize.calibrator=kl"], ["quantize.calibrator"]),
    (["quantize.calibration_samples=0"], ["quantize.calibration_samples"]),
    (["quantize.activations=int4"], ["quantize.activations"]),
    (["quantize.keep_fp32_nodes=['(']"], ["quantize.keep_fp32_nodes", "regex"]),
    (["quantize.keep_fp32_nodes=['']"], ["quantize.keep_fp32_nodes", "empty"]),
    (["quantize.keep_fp32_op_types=[conv]"], ["quantize.keep_fp32_op_types", "op type"]),
    (["quantize.percentile=50"], ["quantize.percentile"]),
    (["quantize.enabled=true", "export.enabled=false"], ["quantize.enabled", "export.enabled"]),
    (["quantize.enabled=true", "export.dynamic_batch=false"], ["quantize.enabled", "export.dynamic_batch"]),
    (["validate.gates.min_int8_agreement=0.99"], ["min_int8_agreement", "quantize.enabled"]),
    (["quantize.colour=blue"], ["quantize.colour"]),
]


@pytest.mark.parametrize(("overrides", "words"), BAD_QUANTIZE, ids=[o[0] for o, _ in BAD_QUANTIZE])
@pytest.mark.parametrize("command", ["check", "compress"])
def test_bad_quantize_section_is_one_line_and_exit_2_with_nothing_written(
        command, overrides, words, tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    sets = [arg for item in [*overrides, f"output.root={tmp_path / 'runs'}"] for arg in ("--set", item)]
    args = ["recipe", "check", str(TINY), *sets] if command == "check" else ["compress", str(TINY), *sets]
    result = run_cli(capsys, monkeypatch, *args)
    lines = [line for line in result.err.splitlines() if line.strip()]
    assert result.code == 2, result
    assert len(lines) == 1 and "Traceback" not in result.err, result.err
    for word in words:
        assert word in lines[0], (word, lines[0])
    assert not (tmp_path / "runs").exists()
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------- resume after a kill
ENTRY = """
import sys, time
from pathlib import Path
import onnxruntime.quantization as q
real, marker = q.quantize_static, Path(sys.argv[1])
def pausing(*args, **kwargs):
    real(*args, **kwargs)  # the work folder now holds a finished INT8 file that was never moved into place
    marker.write_text("quantizing")
    while True:
        time.sleep(1)
q.quantize_static = pausing
sys.argv = ["wf-pipeline", *sys.argv[2:]]
from wf_pipeline.cli import main
main()
"""


def test_a_run_that_ships_fp32_instead_of_slower_int8_passes_validation_without_int8_gates(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    from wf_pipeline.deploy import quantize as quantize_module

    monkeypatch.setattr(quantize_module, "int8_speed", lambda *args, **kwargs: {"int8_over_fp32": 1.5})
    sets = [a for item in [*QUICK, "quantize.ship=faster", "validate.gates.min_int8_agreement=0.9",
                           f"output.root={tmp_path}"] for a in ("--set", item)]
    result = run_cli(capsys, monkeypatch, "compress", str(TINY), *sets)
    assert result.code == 0, result.err
    assert "1.50x as long as its FP32 source" in result.out
    validation = json.loads((tmp_path / "tiny-digits" / "validation" / "validation.json").read_text())
    assert validation["quantized"] is False
    assert {g["name"] for g in validation["gates"]} == {"max_parity_error"}


@pytest.mark.slow
def test_resume_after_a_kill_during_quantization_gives_the_same_file(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    wf = [str(Path(sys.executable).parent / "wf-pipeline")]
    sets = [arg for item in QUICK for arg in ("--set", item)]
    reference = subprocess.run([*wf, "compress", str(TINY), *sets, "--set", f"output.root={tmp_path / 'ref'}"],
                               env=env, capture_output=True, text=True, timeout=300)
    assert reference.returncode == 0, reference.stderr[-2000:]
    marker = tmp_path / "marker"
    victim = subprocess.Popen([sys.executable, "-c", ENTRY, str(marker), "compress", str(TINY), *sets,
                               "--set", f"output.root={tmp_path / 'kill'}"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 300
        while not marker.exists() and victim.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert marker.exists(), "the victim never reached quantization"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    export = tmp_path / "kill" / "tiny-digits" / "export"
    assert not (export / "model.onnx").exists()  # nothing half-written in place of the shipped file
    assert [p for p in export.iterdir() if p.name.endswith(".tmp")]  # the kill left the work folder behind
    resumed = subprocess.run([*wf, "compress", str(TINY), *sets, "--set", f"output.root={tmp_path / 'kill'}",
                              "--resume"], env=env, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    ref_export = tmp_path / "ref" / "tiny-digits" / "export"
    assert (export / "model.onnx").read_bytes() == (ref_export / "model.onnx").read_bytes()
    assert (export / "model.fp32.onnx").read_bytes() == (ref_export / "model.fp32.onnx").read_bytes()
    assert not [p for p in export.iterdir() if p.name.endswith(".tmp")]  # resume removed the stale work folder
