"""Run report: self-contained HTML with embedded charts and report.md, robust to missing or broken pieces."""
from __future__ import annotations

import base64
import json
import re
from pathlib import Path

import pytest
import yaml

from tests.deploy_fixtures import digits_images, make_sparse_model, random_images, remove_channels
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.deploy.validate import ValidationSettings, validate_model
from wf_pipeline.errors import WFError
from wf_pipeline.recipe.schema import GatesConfig
from wf_pipeline.reporting.report import write_report
from wf_pipeline.reporting.validation_outputs import write_validation_outputs

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def full_run(tmp_path_factory) -> Path:
    """A run directory with every file of the contract, written by the real export and validate code."""
    run = tmp_path_factory.mktemp("run")
    recipe = {"name": "tiny-run", "pruning": {"method": "magnitude", "final_sparsity": 0.9}}
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    environment = {"wf_pipeline": "0.1.0", "seed": 0, "torch": "2.x", "git_commit": "abc"}
    (run / "environment.json").write_text(json.dumps(environment))
    dense_model, _ = make_sparse_model(0.0, seed=3)
    model, masks = make_sparse_model(0.9, seed=3)
    pruned = export_onnx(model, random_images(2), run / "export" / "model.onnx", masks=masks)
    dense = export_onnx(dense_model, random_images(2), run / "export" / "dense_baseline.onnx", sparse_storage=False)
    exports = {"pruned": pruned.to_dict(), "dense_baseline": dense.to_dict()}
    (run / "export" / "export.json").write_text(json.dumps(exports))
    images, labels = digits_images(700)
    result = validate_model(pruned.path, torch_model=model, test_data=(images[600:], labels[600:]),
                            baseline_path=dense.path,
                            settings=ValidationSettings(parity_samples=20, batch_sizes=[1, 4], warmup=1, repeats=6),
                            gates=GatesConfig(min_sparsity=0.8, max_accuracy_drop=0.001))
    write_validation_outputs(result, run / "validation")
    per_layer = {name: 1 - mask.float().mean().item() for name, mask in masks.items()}
    (run / "metrics.json").write_text(json.dumps({
        "dense_accuracy": 0.94, "final_accuracy": 0.91, "sparsity": 0.9, "per_layer_sparsity": per_layer,
        "num_params": 5000, "total_seconds": 40.0,
        "timings": {"prune_s": 1.5, "finetune_s": 20.0, "eval_s": 5.0, "total_s": 27.0, "export_s": 2.0,
                    "validate_s": 3.0}}))
    history = [
        {"kind": "epoch", "epoch": 0, "train_loss": 1.2, "test_accuracy": 0.80, "sparsity": 0.0, "lr": 0.1},
        {"kind": "prune", "epoch": 1, "target_sparsity": 0.5, "achieved_sparsity": 0.5, "test_accuracy_after": 0.7,
         "timings": {"total": 0.4}},
        {"kind": "epoch", "epoch": 1, "train_loss": 0.9, "test_accuracy": 0.85, "sparsity": 0.5, "lr": 0.05},
        {"kind": "prune", "epoch": 2, "target_sparsity": 0.9, "achieved_sparsity": 0.9, "test_accuracy_after": 0.6,
         "timings": {"total": 0.5}},
        {"kind": "epoch", "epoch": 2, "train_loss": 0.7, "test_accuracy": 0.91, "sparsity": 0.9, "lr": 0.0},
    ]
    (run / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    (run / "oneshot").mkdir()
    (run / "oneshot" / "oneshot.json").write_text(json.dumps({"dense_accuracy": 0.94, "results": [
        {"method": m, "sparsity": s, "accuracy": a}
        for m, pts in (("woodfisher", ((0.5, 0.93), (0.9, 0.7))), ("magnitude", ((0.5, 0.92), (0.9, 0.4))))
        for s, a in pts]}))
    return run


def _embedded_pngs(html_text: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html_text)]


def test_full_report_embeds_every_chart_and_section(full_run):
    html_path = write_report(full_run)
    assert html_path == full_run / "report.html"
    text = html_path.read_text()
    pngs = _embedded_pngs(text)
    assert len(pngs) == 5 and all(p.startswith(PNG_MAGIC) for p in pngs)
    for title in ("Key metrics", "Deployment gates", "Per-layer sparsity", "Accuracy vs sparsity",
                  "Training and pruning", "Evaluations", "Latency in ONNX Runtime", "Dense vs pruned", "Time split",
                  "ONNX export", "Environment"):
        assert f"<h2>{title}" in text
    assert "tiny-run" in text and "conv1.weight" in text
    # the failing gate is named, values are escaped, nothing is fetched from outside the file
    assert "FAILED: max_accuracy_drop" in text and 'class="failed">FAILED' in text
    assert "&lt;=" in text or "&gt;=" in text
    assert "http://" not in text and "https://" not in text
    assert "Left out" not in text

    md = (full_run / "report.md").read_text()
    images = re.findall(r"!\[[^\]]*\]\((report_files/[^)]+\.png)\)", md)
    assert len(images) == 5
    for relative in images:
        assert (full_run / relative).read_bytes().startswith(PNG_MAGIC)
    assert "| max_accuracy_drop | FAILED |" in md
    # an older run's metrics.json lists no evaluations of its own: the report says so and lists validation's
    assert "lists none of the stage's evaluations (a run made before they were listed)" in md
    assert "| validation: the dense baseline ONNX model | ONNX Runtime | all 100 test images |" in md
    # the time split: five stages, then the rest of the 40 s run
    for row in ("| prune | 1.5 s | 3.8% |", "| fine-tune | 20.0 s | 50.0% |", "| evaluate | 5.0 s | 12.5% |",
                "| export | 2.0 s | 5.0% |", "| validate | 3.0 s | 7.5% |", "| other | 8.5 s | 21.2% |",
                "| total | 40.0 s | 100.0% |"):
        assert row in md, row
    # unstructured pruning: same shapes, fewer non-zeros; the export passed the full check
    assert "No layer lost channels" in md
    assert "| block.0.weight | 16 → 16 | 1,168 → 1,168 |" in md
    assert "| passes onnx.checker full check | True |" in md and "bitmask-v1 (3 weights)" in md


def test_structured_run_shows_channels_params_macs_and_latency_dense_vs_pruned(tmp_path):
    """A model with channels physically removed (surgery by hand), exported and validated like a real run."""
    run = tmp_path / "run"
    dense_model, _ = make_sparse_model(0.0, seed=4)
    slim = remove_channels(dense_model, keep1=[0, 2, 3, 5, 7], keep2=list(range(0, 16, 2)))
    pruned = export_onnx(slim, random_images(2), run / "export" / "model.onnx")
    dense = export_onnx(dense_model, random_images(2), run / "export" / "dense_baseline.onnx", sparse_storage=False)
    exports = {"pruned": pruned.to_dict(), "dense_baseline": dense.to_dict()}
    (run / "export" / "export.json").write_text(json.dumps(exports))
    images, labels = digits_images(100)
    result = validate_model(pruned.path, torch_model=slim, test_data=(images, labels), baseline_path=dense.path,
                            settings=ValidationSettings(parity_samples=20, batch_sizes=[1, 8], warmup=1, repeats=5),
                            gates=GatesConfig())
    write_validation_outputs(result, run / "validation")
    text = write_report(run).read_text()
    assert 'alt="channels per layer, dense vs pruned"' in text
    md = (run / "report.md").read_text()
    assert "2 of 3 layers have fewer output channels" in md
    assert "| conv1.weight | 8 → 5 | 80 → 50 |" in md  # 8x(1x3x3) + folded bias -> 5x(1x3x3) + 5
    assert "| block.0.weight | 16 → 8 | 1,168 → 368 |" in md
    assert "| fc.weight | 10 → 10 | 650 → 330 |" in md
    dense_macs, slim_macs = 64 * (8 * 9 + 16 * 8 * 9) + 10 * 64, 64 * (5 * 9 + 8 * 5 * 9) + 10 * 32
    assert f"| MACs per sample | {dense_macs:,} | {slim_macs:,} | {slim_macs / dense_macs:.3f} |" in md
    assert f"| parameters | 1,898 | 748 | {748 / 1898:.3f} |" in md
    for lat in result.latency:
        assert lat.pruned is not None and lat.dense is not None
        ratio = lat.pruned.p50 / lat.dense.p50
        assert f"| ORT p50 latency, batch {lat.batch_size} (ms) |" in md and f"| {ratio:.3f} |" in md
    # the CI summary of the validation carries the totals too
    validation_md = (run / "validation" / "validation.md").read_text()
    assert f"| parameters | 1,898 | 748 | {748 / 1898:.3f} |" in validation_md
    assert f"| MACs per sample (FLOPs = 2 x MACs) | {dense_macs:,} | {slim_macs:,} |" in validation_md


def test_empty_run_dir_gets_a_report_with_notes(tmp_path):
    html_path = write_report(tmp_path)
    text = html_path.read_text()
    assert _embedded_pngs(text) == []
    assert "Left out" in text and "oneshot/oneshot.json" in text and "validation/validation.json" in text
    assert (tmp_path / "report.md").exists()


def test_broken_pieces_are_noted_not_fatal(tmp_path):
    (tmp_path / "metrics.json").write_text("{not json")
    (tmp_path / "history.jsonl").write_text(
        json.dumps({"kind": "epoch", "epoch": 0, "train_loss": 1.0, "test_accuracy": 0.5, "sparsity": 0.0})
        + "\n{\"kind\": \"ep")
    (tmp_path / "validation").mkdir()
    (tmp_path / "validation" / "validation.json").write_text(json.dumps({"gates": [], "latency": [{"batch_size": 1}]}))
    text = write_report(tmp_path).read_text()
    assert "could not read metrics.json" in text
    assert "skipped 1 unreadable line" in text
    assert len(_embedded_pngs(text)) == 1  # the training curve from the one good history line


def test_layers_pruned_to_100_percent_are_flagged(tmp_path, full_run):
    per_layer = {"stem.weight": 0.5, "features.4.conv.1.0.weight": 1.0, "fc.weight": 0.9}
    (tmp_path / "metrics.json").write_text(json.dumps({"sparsity": 0.9, "per_layer_sparsity": per_layer}))
    write_report(tmp_path)
    text = (tmp_path / "report.md").read_text()
    assert "**Warning**: 1 layer(s) pruned to 100% sparsity" in text and "features.4.conv.1.0.weight." in text
    assert "layer collapse" in text and "pruning.ranking: uniform" in text
    assert "layer collapse" not in write_report(full_run).read_text()  # 90% everywhere: nothing to flag


def test_report_says_which_evaluations_were_on_which_images(tmp_path):
    (tmp_path / "recipe.yaml").write_text(yaml.safe_dump({"name": "r", "evaluation": {"monitor": "none"}}))
    evaluations = [
        {"kind": "start", "label": "before pruning", "epoch": 0.0, "event": None, "runtime": "PyTorch",
         "samples": 10000, "test_images": "all 10,000 test images", "accuracy": 0.9383, "seconds": 6.5},
        {"kind": "epoch", "label": "after epoch 2/2 (the final model)", "epoch": 2, "event": None,
         "runtime": "PyTorch", "samples": 10000, "test_images": "all 10,000 test images", "accuracy": 0.9151,
         "seconds": 6.6},
    ]
    (tmp_path / "metrics.json").write_text(json.dumps({"method": "woodfisher", "initial_accuracy": 0.9383,
                                                       "final_accuracy": 0.9151, "evaluations": evaluations}))
    history = [{"kind": "prune", "epoch": 0, "target_sparsity": 0.5, "achieved_sparsity": 0.5},
               {"kind": "epoch", "epoch": 0, "train_loss": 0.2, "train_accuracy": 0.93, "sparsity": 0.5},
               {"kind": "epoch", "epoch": 1, "train_loss": 0.3, "train_accuracy": 0.9, "test_accuracy": 0.9151,
                "sparsity": 0.5}]
    (tmp_path / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history))
    write_report(tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "`evaluation.monitor: none`, so nothing in between" in md
    assert "| before pruning | PyTorch | all 10,000 test images | 93.83% | 6.5 |" in md
    assert "| after epoch 2/2 (the final model) | PyTorch | all 10,000 test images | 91.51% | 6.6 |" in md
    assert "| 0 | 50.00% | 50.00% | not measured |" in md  # no accuracy right after the pruning step


def test_missing_run_dir_raises(tmp_path):
    with pytest.raises(WFError):
        write_report(tmp_path / "nope")
