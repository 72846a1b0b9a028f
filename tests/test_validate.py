"""ONNX Runtime validation: parity, accuracy, interleaved latency, gates, JUnit/JSON/Markdown outputs, bad files."""
from __future__ import annotations

import json
import xml.etree.ElementTree as ET

import pytest
import torch

from tests.deploy_fixtures import TinyNet, digits_images, make_sparse_model, random_images
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.deploy.ort_session import create_session, load_onnx
from wf_pipeline.deploy.validate import ValidationSettings, validate_model
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import GatesConfig
from wf_pipeline.reporting.validation_outputs import write_validation_outputs

TINY = ValidationSettings(parity_samples=40, batch_sizes=[1, 3], threads=1, warmup=1, repeats=4)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    folder = tmp_path_factory.mktemp("validate")
    torch.manual_seed(0)
    dense_model, _ = make_sparse_model(0.0, seed=3)
    sparse_model, masks = make_sparse_model(0.9, seed=3)  # same seed: the pruned version of dense_model
    dense = export_onnx(dense_model, random_images(2), folder / "dense.onnx", sparse_storage=False)
    sparse = export_onnx(sparse_model, random_images(2), folder / "model.onnx", masks=masks)
    return {"dense_model": dense_model, "sparse_model": sparse_model, "masks": masks,
            "dense": dense.path, "sparse": sparse.path, "folder": folder}


@pytest.fixture(scope="module")
def test_set():
    images, labels = digits_images(800)
    return images[600:], labels[600:]  # held out: the fixture head was fitted on the first 600


def _torch_accuracy(model, data) -> float:
    images, labels = data
    with torch.no_grad():
        return (model(images).argmax(1) == labels).double().mean().item()


def test_full_validation_measures_everything(models, test_set):
    gates = GatesConfig(min_sparsity=0.85, max_parity_error=1e-4, min_top1_agreement=1.0, max_latency_ratio=100.0)
    result = validate_model(models["sparse"], torch_model=models["sparse_model"], test_data=test_set,
                            baseline_path=models["dense"], settings=TINY, gates=gates)
    assert result.passed and result.exit_code == 0, [g.message for g in result.gates]
    assert result.accuracy == pytest.approx(_torch_accuracy(models["sparse_model"], test_set), abs=1e-9)
    assert result.baseline_accuracy == pytest.approx(_torch_accuracy(models["dense_model"], test_set), abs=1e-9)
    assert result.test_samples == 200
    assert result.parity is not None
    assert result.parity.samples == 40 and result.parity.source == "test data"
    assert result.parity.max_abs_diff < 1e-4 and result.parity.top1_agreement == 1.0
    masks = models["masks"]
    expected = sum((~m).sum().item() for m in masks.values()) / sum(m.numel() for m in masks.values())
    assert result.sparsity == pytest.approx(expected)
    assert result.baseline_sparsity == pytest.approx(0.0)
    assert result.sparse_initializers == 3
    assert result.baseline_file_bytes is not None and result.file_bytes < result.baseline_file_bytes
    assert [lat.batch_size for lat in result.latency] == [1, 3]
    for lat in result.latency:
        assert lat.pruned is not None and lat.dense is not None
        assert len(lat.pruned.runs_ms) == len(lat.dense.runs_ms) == TINY.repeats
        assert lat.pruned.p50 <= lat.pruned.p90 <= lat.pruned.p99
        assert lat.ratio_p50 == pytest.approx(lat.pruned.p50 / lat.dense.p50)
    assert {g.name for g in result.gates} == {"min_sparsity", "max_parity_error", "min_top1_agreement",
                                              "max_latency_ratio"}


def test_failing_gate_fails_result_and_outputs_name_it(models, test_set, tmp_path):
    gates = GatesConfig(min_accuracy=0.99, min_sparsity=0.5)
    result = validate_model(models["sparse"], torch_model=models["sparse_model"], test_data=test_set,
                            baseline_path=None, settings=TINY, gates=gates)
    assert not result.passed and result.exit_code == 1
    assert [g.name for g in result.failed_gates] == ["min_accuracy"]

    paths = write_validation_outputs(result, tmp_path / "validation")
    assert set(paths) == {"json", "junit", "markdown"} and all(p.exists() for p in paths.values())
    suite = ET.parse(paths["junit"]).getroot().find("testsuite")
    assert suite is not None
    assert suite.get("failures") == "1" and suite.get("tests") == "3"
    cases = {case.get("name"): case for case in suite.iter("testcase")}
    assert set(cases) == {"min_accuracy", "min_sparsity", "max_parity_error"}
    failure = cases["min_accuracy"].find("failure")
    assert failure is not None and "min_accuracy" in failure.get("message", "")
    assert cases["min_sparsity"].find("failure") is None

    data = json.loads(paths["json"].read_text())
    assert data["passed"] is False and data["failed_gates"] == ["min_accuracy"]
    assert len(data["latency"][0]["pruned"]["runs_ms"]) == TINY.repeats  # raw runs for the report
    assert data["latency"][0]["dense"] is None
    assert "FAILED: min_accuracy" in paths["markdown"].read_text()


def test_accuracy_is_computed_in_ort_per_model(models):
    # Labels = the dense PyTorch model's predictions: the dense ONNX baseline must score exactly 100%,
    # the pruned model exactly its own PyTorch agreement with them.
    images = digits_images(750)[0][600:]
    with torch.no_grad():
        labels = models["dense_model"](images).argmax(1)
    assert labels.unique().numel() > 1  # a model predicting one class would make this test vacuous
    result = validate_model(models["sparse"], torch_model=None, test_data=(images, labels),
                            baseline_path=models["dense"], settings=TINY, gates=GatesConfig())
    assert result.baseline_accuracy == 1.0
    assert result.accuracy == pytest.approx(_torch_accuracy(models["sparse_model"], (images, labels)))
    assert result.accuracy is not None and result.accuracy_drop == pytest.approx(1.0 - result.accuracy)


def test_loader_and_tensor_test_data_agree(models, test_set):
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*test_set), batch_size=17)
    settings = ValidationSettings(parity_samples=25, batch_sizes=[2], warmup=0, repeats=1)
    a = validate_model(models["sparse"], torch_model=models["sparse_model"], test_data=loader,
                       baseline_path=None, settings=settings, gates=GatesConfig())
    b = validate_model(models["sparse"], torch_model=models["sparse_model"], test_data=test_set,
                       baseline_path=None, settings=settings, gates=GatesConfig())
    assert a.accuracy == b.accuracy and a.test_samples == b.test_samples == 200
    assert a.parity is not None and a.parity.samples == 25  # parity stops at parity_samples even across loader batches


def test_wrong_torch_model_fails_parity_gate(models):
    other = TinyNet().eval()
    result = validate_model(models["sparse"], torch_model=other, test_data=None, baseline_path=None,
                            settings=TINY, gates=GatesConfig())
    assert result.parity is not None and result.parity.source == "random normal inputs"
    assert [g.name for g in result.failed_gates] == ["max_parity_error"]
    assert result.accuracy is None


def test_without_torch_model_parity_gate_is_skipped(models):
    calls = []
    result = validate_model(models["sparse"], torch_model=None, test_data=None, baseline_path=None,
                            settings=TINY, gates=GatesConfig(max_latency_ms=1e6),
                            progress=lambda stage, done, total: calls.append((stage, done, total)))
    assert calls[-1] == ("latency batch 3", TINY.repeats, TINY.repeats)
    statuses = {g.name: g.status for g in result.gates}
    assert statuses == {"max_latency_ms": "passed", "max_parity_error": "skipped"}
    assert result.passed


def test_explicit_gate_without_its_input_is_bad_input(models):
    with pytest.raises(WFError, match="baseline"):
        validate_model(models["sparse"], torch_model=None, test_data=None, baseline_path=None,
                       settings=TINY, gates=GatesConfig(max_accuracy_drop=0.01))


def test_missing_and_corrupt_files_raise_wferror(models, tmp_path):
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x00\xffthis is not a protobuf\x12\x34" * 20)
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(models["sparse"].read_bytes()[:300])
    for bad in (tmp_path / "missing.onnx", garbage, truncated, tmp_path):
        with pytest.raises(WFError) as info:
            validate_model(bad, torch_model=None, test_data=None, baseline_path=None, settings=TINY,
                           gates=GatesConfig())
        assert info.value.exit_code == 2 and info.value.hint
        with pytest.raises(WFError):
            create_session(bad)
        with pytest.raises(WFError):
            load_onnx(bad)
    with pytest.raises(WFError, match="garbage"):
        validate_model(models["sparse"], torch_model=None, test_data=None, baseline_path=garbage,
                       settings=TINY, gates=GatesConfig())


def test_fixed_batch_model_rejects_other_batch_sizes(models, tmp_path):
    fixed = export_onnx(models["sparse_model"], random_images(4), tmp_path / "fixed.onnx", dynamic_batch=False)
    with pytest.raises(WFError, match="fixed batch size of 4"):
        validate_model(fixed.path, torch_model=None, test_data=None, baseline_path=None, settings=TINY,
                       gates=GatesConfig())
    # accuracy still works on a test set whose size is not a multiple of 4 (chunked and padded)
    settings = ValidationSettings(parity_samples=10, batch_sizes=[4], warmup=0, repeats=1)
    data = digits_images(30)
    result = validate_model(fixed.path, torch_model=models["sparse_model"], test_data=data, baseline_path=None,
                            settings=settings, gates=GatesConfig())
    assert result.accuracy == pytest.approx(_torch_accuracy(models["sparse_model"], data))
    assert result.passed


def test_settings_follow_recipe_config():
    from wf_pipeline.recipe.schema import ValidateConfig

    settings = ValidationSettings.from_config(ValidateConfig(batch_sizes=[8], threads=2, warmup=0, repeats=3))
    assert (settings.batch_sizes, settings.threads, settings.warmup, settings.repeats) == ([8], 2, 0, 3)
    with pytest.raises(WFError):
        ValidationSettings(batch_sizes=[])


def test_validate_stage_reports_progress(tmp_path):
    """`run_validate` (the `validate` command) shows accuracy and latency progress through its reporter."""
    from pathlib import Path

    from wf_pipeline.models import build_model
    from wf_pipeline.recipe.loader import load_recipe
    from wf_pipeline.runtime.progress import RecordingReporter
    from wf_pipeline.stages import run_validate

    recipe, _ = load_recipe(Path(__file__).resolve().parent.parent / "recipes" / "tiny_digits.yaml",
                            ["validate.parity_samples=8", "validate.batch_sizes=[2]", "validate.warmup=0",
                             "validate.repeats=2"])
    model = build_model(recipe.model).eval()
    onnx_path = export_onnx(model, torch.zeros(2, 1, 8, 8), tmp_path / "model.onnx", sparse_storage=False).path
    reporter = RecordingReporter()
    outcome = run_validate(recipe, onnx_path, out=tmp_path / "validation", gates=GatesConfig(), reporter=reporter)
    assert outcome.result.passed and outcome.result.test_samples > 0
    started = [task for kind, task, _ in reporter.events if kind == "start"]
    assert started == ["validate accuracy", "validate latency batch 2"]
    finished = [task for kind, task, _ in reporter.events if kind == "finish"]
    assert finished == started  # every task closed
    accuracy_steps = [n for kind, task, n in reporter.events if kind == "advance" and task == "validate accuracy"]
    assert accuracy_steps == list(range(1, len(accuracy_steps) + 1)) and accuracy_steps
