"""Sparse ONNX export: parity with PyTorch, sparse storage loads in ORT, sparsity read back equals the masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch.nn.utils import parametrize

from deploy_fixtures import digits_images, make_sparse_model, random_images
from wf_pipeline.deploy.export import compare_sparsity, export_onnx
from wf_pipeline.deploy.ort_session import create_session, run_logits
from wf_pipeline.deploy.sparse_storage import initializer_arrays
from wf_pipeline.errors import WFError


@pytest.fixture(scope="module")
def sparse_export(tmp_path_factory):
    model, masks = make_sparse_model(0.9)
    out = tmp_path_factory.mktemp("export") / "model.onnx"
    result = export_onnx(model, random_images(2), out, masks=masks)
    return model, masks, result


def _ort(path: Path, inputs: torch.Tensor) -> np.ndarray:
    return run_logits(create_session(path), inputs.numpy())


def test_onnx_matches_pytorch_on_random_and_real_inputs(sparse_export):
    model, _, result = sparse_export
    real, _ = digits_images(64)
    for inputs in (random_images(32, seed=5), real):
        with torch.no_grad():
            expected = model(inputs).numpy()
        for path in (result.path, result.dense_path):
            np.testing.assert_allclose(_ort(path, inputs), expected, atol=1e-4, rtol=0)
    assert result.torch_max_abs_diff < 1e-4


def test_dynamic_batch_axis_accepts_batch_1_and_7(sparse_export):
    model, _, result = sparse_export
    session = create_session(result.path)
    assert session.get_inputs()[0].name == "input"
    assert session.get_outputs()[0].name == "logits"
    assert session.get_inputs()[0].shape[0] == "batch"
    for batch in (1, 7):
        inputs = random_images(batch, seed=batch)
        outputs = session.run(None, {"input": inputs.numpy()})[0]
        assert outputs.shape == (batch, 10)
        with torch.no_grad():
            np.testing.assert_allclose(outputs, model(inputs).numpy(), atol=1e-4, rtol=0)


def test_sparse_storage_file_is_smaller_and_identical_in_ort(sparse_export):
    _, _, result = sparse_export
    assert result.sparse_storage and result.dense_path == result.path.with_name("model.dense.onnx")
    assert result.dense_path.exists()
    stored = onnx.load(str(result.path))
    sparse_names = {s.values.name for s in stored.graph.sparse_initializer}
    assert sparse_names == {"conv1.weight", "block.0.weight", "fc.weight"} == set(result.sparse_initializers)
    for sparse in stored.graph.sparse_initializer:
        assert sparse.indices.data_type == onnx.TensorProto.INT64
        assert len(sparse.indices.dims) == 1  # the linearised index form
    assert not onnx.load(str(result.dense_path)).graph.sparse_initializer
    assert result.file_bytes == result.path.stat().st_size < result.dense_file_bytes == result.dense_path.stat().st_size
    inputs = torch.cat([random_images(5, seed=9), digits_images(5)[0]])
    np.testing.assert_array_equal(_ort(result.path, inputs), _ort(result.dense_path, inputs))
    assert result.sparse_vs_dense_max_abs_diff == 0.0


def test_sparsity_read_back_equals_masks_despite_bn_folding(sparse_export):
    model, masks, result = sparse_export
    assert result.sparsity_matches, result.sparsity_notes
    assert set(result.torch_per_layer_sparsity) == set(masks)
    for name, mask in masks.items():
        expected = 1.0 - mask.float().mean().item()
        assert result.torch_per_layer_sparsity[name] == pytest.approx(expected)
        assert result.onnx_per_layer_sparsity[name] == pytest.approx(expected)
        # BN-folded conv weights get their parameter's name back in the file
        assert result.initializer_for_param[name] == name
        assert result.per_initializer_sparsity[name] == pytest.approx(expected)
    stored = initializer_arrays(onnx.load(str(result.path)))
    conv = stored["conv1.weight"]
    torch_conv = model.conv1.weight.detach().numpy()
    assert not np.allclose(conv, torch_conv)  # BatchNorm really was folded into the conv
    np.testing.assert_array_equal(conv == 0, ~masks["conv1.weight"].numpy())


def test_sparsity_mismatch_is_detected(sparse_export):
    _, masks, result = sparse_export
    stored = onnx.load(str(result.dense_path))
    wrong = {name: mask.clone() for name, mask in masks.items()}
    kept = wrong["fc.weight"].nonzero()[0]
    wrong["fc.weight"][tuple(kept)] = False  # claim a kept (non-zero) weight was pruned
    weights = {name: np.zeros(mask.shape, np.float32) for name, mask in masks.items()}
    check = compare_sparsity(stored, weights, wrong)
    assert not check.matches
    assert any("fc.weight" in note and "non-zero" in note for note in check.notes)


def test_three_channel_input_and_fixed_batch(tmp_path):
    model, masks = make_sparse_model(0.9, in_channels=3)
    result = export_onnx(model, random_images(4, channels=3), tmp_path / "m.onnx", dynamic_batch=False, masks=masks)
    session = create_session(result.path)
    assert session.get_inputs()[0].shape == [4, 3, 8, 8]
    inputs = random_images(4, channels=3, seed=3)
    with torch.no_grad():
        np.testing.assert_allclose(session.run(None, {"input": inputs.numpy()})[0], model(inputs).numpy(), atol=1e-4)


def test_dense_storage_only_writes_one_file(tmp_path):
    model, _ = make_sparse_model(0.9)
    result = export_onnx(model, random_images(2), tmp_path / "plain.onnx", sparse_storage=False, opset=13)
    assert result.dense_path is None and not result.sparse_initializers
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]
    assert result.opset == 13
    assert result.file_bytes == result.dense_file_bytes
    # without masks the zeros in conv/linear weights are the pattern
    assert result.sparsity_matches
    assert all(v == pytest.approx(0.9, abs=0.01) for v in result.torch_per_layer_sparsity.values())


def test_threshold_and_size_rule_keep_tensors_dense(tmp_path):
    model, masks = make_sparse_model(0.9)
    high = export_onnx(model, random_images(2), tmp_path / "high.onnx", masks=masks, sparse_threshold=0.95)
    assert high.sparse_initializers == []
    half, half_masks = make_sparse_model(0.5)
    # 50% zeros: COO (value + int64 index per non-zero) would be larger than dense, so nothing converts
    result = export_onnx(half, random_images(2), tmp_path / "half.onnx", masks=half_masks, sparse_threshold=0.4)
    assert result.sparse_initializers == []
    assert result.file_bytes == result.dense_file_bytes


def test_parametrized_masks_are_squashed_and_caller_model_untouched(tmp_path):
    model, masks = make_sparse_model(0.0)  # dense weights, masks all True
    rng = torch.Generator().manual_seed(0)
    mask = torch.rand(model.fc.weight.shape, generator=rng) > 0.8

    class ApplyMask(torch.nn.Module):
        def forward(self, weight):
            return weight * mask

    parametrize.register_parametrization(model.fc, "weight", ApplyMask())
    model.train()
    result = export_onnx(model, random_images(2), tmp_path / "p.onnx")
    assert parametrize.is_parametrized(model.fc) and model.training  # export worked on a copy
    assert result.onnx_per_layer_sparsity["fc.weight"] == pytest.approx(1 - mask.float().mean().item())
    model.eval()
    inputs = random_images(3)
    with torch.no_grad():
        np.testing.assert_allclose(_ort(result.path, inputs), model(inputs).numpy(), atol=1e-4)


def test_bad_output_paths_raise_wferror(tmp_path):
    model, _ = make_sparse_model(0.9)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(WFError, match="cannot write"):
        export_onnx(model, random_images(2), blocker / "model.onnx")
    with pytest.raises(WFError, match=r"\.onnx"):
        export_onnx(model, random_images(2), tmp_path / "model.txt")
    (tmp_path / "dir.onnx").mkdir()
    with pytest.raises(WFError, match="folder"):
        export_onnx(model, random_images(2), tmp_path / "dir.onnx")


def test_mask_for_unknown_parameter_raises(tmp_path):
    model, masks = make_sparse_model(0.9)
    with pytest.raises(WFError, match="nope.weight"):
        export_onnx(model, random_images(2), tmp_path / "m.onnx", masks={"nope.weight": masks["fc.weight"]})


class _TokenModel(torch.nn.Module):
    """A Linear applied to a 3-D tensor exports as MatMul with a transposed copy of its (square) weight."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.proj = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = self.conv(x).flatten(2).transpose(1, 2)
        return self.head(self.proj(tokens).mean(1))


def test_transposed_matmul_weight_is_mapped_with_its_layout(tmp_path):
    torch.manual_seed(0)
    model = _TokenModel().eval()
    masks = {name: torch.rand(p.shape) > 0.9 for name, p in model.named_parameters() if p.dim() >= 2}
    result = export_onnx(model, random_images(2), tmp_path / "tok.onnx", masks=masks)
    assert result.sparsity_matches, result.sparsity_notes
    # the stored tensor is W^T, so it must not be renamed to the parameter's name
    assert result.initializer_for_param["proj.weight"] != "proj.weight"
    stored = initializer_arrays(onnx.load(str(result.path)))[result.initializer_for_param["proj.weight"]]
    np.testing.assert_array_equal(stored.T == 0, ~masks["proj.weight"].numpy())
