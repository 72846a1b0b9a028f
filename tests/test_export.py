"""ONNX export: parity with PyTorch, a compact file that passes the full check and equals its dense twin in
ORT, parameter names on folded weights, sparsity read back equals the masks."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper
from torch.nn.utils import parametrize

from tests.deploy_fixtures import digits_images, make_sparse_model, random_images
from wf_pipeline.deploy.export import compare_sparsity, export_onnx
from wf_pipeline.deploy.ort_session import create_session, run_logits
from wf_pipeline.deploy.sparse_storage import (
    DECODE_OP,
    DOMAIN,
    bitmask_bytes,
    compact_weight_names,
    initializer_arrays,
    to_compact_storage,
    to_sparse_initializers,
)
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


def test_compact_file_passes_full_check_and_is_identical_in_ort(sparse_export):
    _, _, result = sparse_export
    assert result.sparse_storage and result.dense_path == result.path.with_name("model.dense.onnx")
    assert result.dense_path.exists()
    for path in (result.path, result.dense_path):
        onnx.checker.check_model(str(path), full_check=True)
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
    assert result.onnx_full_check and result.storage_format == "bitmask-v1"
    stored = onnx.load(str(result.path))
    assert not stored.graph.sparse_initializer
    compact = {"conv1.weight", "block.0.weight", "fc.weight"}
    assert set(compact_weight_names(stored)) == compact == set(result.compact_weights)
    stored_names = {init.name for init in stored.graph.initializer}
    assert not compact & stored_names  # the dense tensors are gone from the file...
    assert {f"{name}.bitmask" for name in compact} <= stored_names  # ...replaced by their bitmask form
    assert not compact_weight_names(onnx.load(str(result.dense_path)))
    assert result.file_bytes == result.path.stat().st_size < result.dense_file_bytes == result.dense_path.stat().st_size
    inputs = torch.cat([random_images(5, seed=9), digits_images(5)[0]])
    np.testing.assert_array_equal(_ort(result.path, inputs), _ort(result.dense_path, inputs))
    assert result.sparse_vs_dense_max_abs_diff == 0.0
    # the decoded weights are the dense twin's, bit for bit
    decoded, dense = initializer_arrays(stored), initializer_arrays(onnx.load(str(result.dense_path)))
    assert decoded.keys() == dense.keys()
    assert all(decoded[name].tobytes() == dense[name].tobytes() for name in dense)


def test_shape_inference_gives_decoded_weights_their_static_shape(sparse_export):
    model, _, result = sparse_export
    inferred = onnx.shape_inference.infer_shapes(onnx.load(str(result.path)), strict_mode=True)
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim] for v in inferred.graph.value_info}
    for name in result.compact_weights:
        assert shapes[name] == list(model.get_parameter(name).shape)


def test_sparse_initializers_fail_the_full_check_but_not_ort(sparse_export):
    """Why the bitmask form exists: the earlier sparse_initializer file fails the full check."""
    _, _, result = sparse_export
    dense = onnx.load(str(result.dense_path))
    legacy, conversion = to_sparse_initializers(dense, 0.5)
    assert set(conversion.names) == set(result.compact_weights)
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(legacy, full_check=True)
    legacy_arrays, dense_arrays = initializer_arrays(legacy), initializer_arrays(dense)
    for name in conversion.names:
        np.testing.assert_array_equal(legacy_arrays[name], dense_arrays[name])


def _decode_in_ort_and_reference(array: np.ndarray) -> tuple[np.ndarray, np.ndarray, onnx.ModelProto]:
    """A one-node model (Identity of the weight) with the weight in the bitmask form."""
    import onnxruntime as ort
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    dtype = helper.np_dtype_to_tensor_dtype(array.dtype)
    graph = helper.make_graph([helper.make_node("Identity", ["w"], ["out"])], "g", [],
                              [helper.make_tensor_value_info("out", dtype, list(array.shape))],
                              initializer=[numpy_helper.from_array(array, "w")])
    compact, conversion = to_compact_storage(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), 0.0)
    assert conversion.names == ["w"]
    onnx.checker.check_model(compact, full_check=True)
    session = ort.InferenceSession(compact.SerializeToString(), providers=["CPUExecutionProvider"])
    reference = ReferenceEvaluator(compact).run(None, {})
    assert isinstance(reference, list)
    return session.run(None, {})[0], reference[0], compact


@pytest.mark.parametrize("shape, density, dtype", [
    ((3, 5, 3, 3), 0.1, np.float32),  # 135 elements: the last bitmask byte is partly padding
    ((16, 8), 0.5, np.float32),
    ((7, 1, 1, 1), 0.0, np.float32),  # all pruned
    ((4, 6), 0.6, np.float64),
    ((2, 9), 0.3, np.float16),
])
def test_bitmask_decode_is_exact_in_ort_and_reference(shape, density, dtype):
    rng = np.random.default_rng(sum(shape))
    array = (rng.standard_normal(shape) * (rng.random(shape) < density)).astype(dtype)
    array.reshape(-1)[-1] = 0.0  # a zero in the last (padded) byte
    from_ort, from_reference, compact = _decode_in_ort_and_reference(array)
    for decoded in (from_ort, from_reference):
        assert decoded.dtype == array.dtype and decoded.shape == array.shape
        np.testing.assert_array_equal(decoded, array)
    payload = sum(init.ByteSize() for init in compact.graph.initializer if init.name in ("w.bitmask", "w.values"))
    assert bitmask_bytes(array) <= payload <= bitmask_bytes(array) + 64  # + protobuf framing


def test_read_back_survives_a_constant_op_the_reference_runtime_cannot_run(sparse_export):
    from onnx import helper

    _, masks, result = sparse_export
    stored = onnx.load(str(result.path))
    stored.graph.node.append(helper.make_node("Mystery", ["fc.bias"], ["mystery_out"], domain="vendor"))
    stored.graph.output.append(helper.make_empty_tensor_value_info("mystery_out"))
    stored.opset_import.append(helper.make_opsetid("vendor", 1))
    arrays = initializer_arrays(stored)
    assert "mystery_out" not in arrays
    for name, mask in masks.items():  # the decoded weights are still read
        np.testing.assert_array_equal(arrays[name] == 0, ~mask.numpy())


def test_decode_runs_as_one_function_call_per_weight(sparse_export):
    _, _, result = sparse_export
    stored = onnx.load(str(result.path))
    decoders = [n for n in stored.graph.node if n.domain == DOMAIN]
    assert {n.op_type for n in decoders} == {DECODE_OP} and len(decoders) == 3
    assert [(f.domain, f.name) for f in stored.functions] == [(DOMAIN, DECODE_OP)]
    # every op of the body is a standard ONNX op of the model's opset
    assert {o.domain for o in stored.functions[0].opset_import} == {""}


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


def test_every_folded_weight_and_bias_is_named_after_its_parameter(tmp_path):
    """The default recipe keeps conv1 dense (no mask): its folded weight must still get its name."""
    model, _ = make_sparse_model(0.0)
    _, masks = make_sparse_model(0.9)
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx",
                         masks={"block.0.weight": masks["block.0.weight"]})
    assert result.generated_names == []
    for path in (result.path, result.dense_path):
        stored = onnx.load(str(path))
        layers = {n.op_type: n for n in stored.graph.node if n.op_type in ("Conv", "Gemm")}
        used = {name for n in stored.graph.node if n.op_type in ("Conv", "Gemm") for name in n.input[1:]}
        assert used == {"conv1.weight", "conv1.bias", "block.0.weight", "block.0.bias", "fc.weight", "fc.bias"}, layers
        assert not any(name.startswith("onnx::") for name in initializer_arrays(stored))
    assert result.compact_weights == ["block.0.weight"]


def test_equal_folded_biases_shared_by_the_exporter_still_get_each_convs_name(tmp_path):
    """Untrained BatchNorm folds to equal zero biases; the exporter shares one constant through Identity nodes."""
    from tests.deploy_fixtures import TinyNet

    torch.manual_seed(0)
    model = TinyNet(widths=(8, 8)).eval()
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", sparse_storage=False)
    stored = onnx.load(str(result.path))
    assert any(n.op_type == "Identity" for n in stored.graph.node)  # the sharing this test is about
    convs = [n for n in stored.graph.node if n.op_type == "Conv"]
    assert [n.input[2] for n in convs] == ["conv1.bias", "block.0.bias"]
    assert result.generated_names == []


def test_masks_on_batchnorm_vectors_are_applied_and_folded(tmp_path):
    """Channel pruning also masks BatchNorm entries: they fold into the conv, only weights are read back."""
    model, masks = make_sparse_model(0.5)
    bn_mask = torch.ones(8, dtype=torch.bool)
    bn_mask[[1, 4]] = False
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", masks={**masks, "bn1.weight": bn_mask})
    assert result.sparsity_matches and set(result.torch_per_layer_sparsity) == set(masks)
    folded = initializer_arrays(onnx.load(str(result.path)))["conv1.weight"]
    assert not folded[[1, 4]].any() and folded[[0, 2, 3, 5, 6, 7]].any()  # gamma 0 zeroes the folded rows
    assert any("conv1.weight" in note and "kept weights are exactly zero" in note for note in result.sparsity_notes)


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
    assert result.dense_path is None and not result.compact_weights and not result.notes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plain.onnx"]
    assert result.opset == 13
    assert result.file_bytes == result.dense_file_bytes
    # without masks the zeros in conv/linear weights are the pattern
    assert result.sparsity_matches
    assert all(v == pytest.approx(0.9, abs=0.01) for v in result.torch_per_layer_sparsity.values())


def test_threshold_and_size_rule_keep_tensors_dense(tmp_path):
    model, masks = make_sparse_model(0.9)
    high = export_onnx(model, random_images(2), tmp_path / "high.onnx", masks=masks, sparse_threshold=0.95)
    assert high.compact_weights == []
    half, half_masks = make_sparse_model(0.5)
    # 50% zeros: the bitmask form (1/8 byte per weight + the non-zeros) is already smaller than dense
    result = export_onnx(half, random_images(2), tmp_path / "half.onnx", masks=half_masks, sparse_threshold=0.4)
    assert set(result.compact_weights) == set(half_masks) and result.file_bytes < result.dense_file_bytes
    # no zeros at all: the bitmask form would be larger, so nothing converts even at threshold 0
    dense, _ = make_sparse_model(0.0)
    plain = export_onnx(dense, random_images(2), tmp_path / "dense.onnx", sparse_threshold=0.0)
    assert plain.compact_weights == [] and plain.file_bytes == plain.dense_file_bytes


def test_opset_below_11_falls_back_to_dense_storage_with_a_note(tmp_path):
    model, masks = make_sparse_model(0.9)
    result = export_onnx(model, random_images(2), tmp_path / "old.onnx", masks=masks, opset=10)
    assert result.opset == 10 and not result.sparse_storage and result.dense_path is None
    assert result.compact_weights == [] and any("opset 10" in note for note in result.notes)
    assert result.sparsity_matches and result.onnx_full_check


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
    # the stored tensor is W^T: it is named as PyTorch writes the transpose
    assert result.initializer_for_param["proj.weight"] == "proj.weight.T"
    assert result.generated_names == []
    stored = initializer_arrays(onnx.load(str(result.path)))[result.initializer_for_param["proj.weight"]]
    np.testing.assert_array_equal(stored.T == 0, ~masks["proj.weight"].numpy())


# ------------------------------------------------------------------------------------ fully pruned layers


class _Block(torch.nn.Module):
    """Depthwise conv + BN + ReLU under two levels of Sequential, as in MobileNetV2's `features.4.conv.1.0`."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = torch.nn.Sequential(torch.nn.Sequential(
            torch.nn.Conv2d(channels, channels, 3, padding=1, groups=channels, bias=False),
            torch.nn.BatchNorm2d(channels), torch.nn.ReLU()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class _DeepNet(torch.nn.Module):
    """Three equal-shape depthwise layers nested three modules deep: only their scope tells them apart."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3, padding=1, bias=False), torch.nn.BatchNorm2d(8),
                                        torch.nn.ReLU())
        self.features = torch.nn.Sequential(_Block(8), _Block(8), _Block(8))
        self.fc = torch.nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(self.stem(x)).mean((2, 3)))


def _deep_net_with_masks(fully_pruned: list[str]) -> tuple[torch.nn.Module, dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    model = _DeepNet().eval()
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):  # folding really rescales (negative gammas: -0.0 too)
                module.weight.uniform_(-1.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                assert module.running_var is not None
                module.running_var.uniform_(0.5, 2.0)
    masks = {name: torch.rand(p.shape) > 0.5 for name, p in model.named_parameters() if p.dim() >= 2}
    for name in fully_pruned:
        masks[name][:] = False
    return model, masks


def _weight_inputs(model: onnx.ModelProto) -> dict[str, str]:
    """Conv node name -> the tensor it reads as its weight."""
    return {node.name: node.input[1] for node in model.graph.node if node.op_type == "Conv"}


def test_a_fully_pruned_layer_exports_named_compact_and_checked(tmp_path):
    model, masks = _deep_net_with_masks(["features.1.conv.0.0.weight"])
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", masks=masks)
    assert result.sparsity_matches, result.sparsity_notes
    assert result.torch_per_layer_sparsity["features.1.conv.0.0.weight"] == 1.0
    assert result.onnx_per_layer_sparsity["features.1.conv.0.0.weight"] == 1.0
    # every layer, pruned or not, reads a weight named after its parameter (scope resolution through nesting)
    assert result.generated_names == []
    for name in masks:
        assert result.initializer_for_param[name] == name
    assert "features.1.conv.0.0.weight" in result.compact_weights  # stored as a bitmask, not 288 dense zeros
    stored = initializer_arrays(onnx.load(str(result.path)))["features.1.conv.0.0.weight"]
    assert stored.shape == (8, 1, 3, 3) and not stored.any()
    assert result.sparse_vs_dense_max_abs_diff == 0.0 and result.torch_max_abs_diff < 1e-4


def test_equal_all_zero_weights_shared_by_the_exporter_are_named_and_checked(tmp_path):
    """Two fully pruned layers of one shape fold to equal all-zero weights: torch.onnx stores one, the
    second layer reads it through an Identity. Both must be found, named and read back as pruned."""
    pruned = ["features.1.conv.0.0.weight", "features.2.conv.0.0.weight"]
    model, masks = _deep_net_with_masks(pruned)
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", masks=masks)
    assert result.sparsity_matches, result.sparsity_notes
    dense = onnx.load(str(result.dense_path))
    identities = [n for n in dense.graph.node if n.op_type == "Identity"]
    assert [list(n.input) for n in identities] == [[pruned[0]]]  # the sharing this test is about
    for path in (result.dense_path, result.path):
        reads = _weight_inputs(onnx.load(str(path)))
        assert reads["/features/features.1/conv/conv.0/conv.0.0/Conv"] == pruned[0]
        assert reads["/features/features.2/conv/conv.0/conv.0.0/Conv"] == pruned[1]
    assert result.generated_names == []
    assert result.initializer_for_param == {**{n: n for n in masks}, pruned[1]: pruned[0]}
    assert all(result.onnx_per_layer_sparsity[n] == 1.0 for n in pruned)
    # stored once, compactly: no dense all-zero weight is left in the file
    compact = onnx.load(str(result.path))
    assert pruned[0] in result.compact_weights
    assert not any(len(i.dims) >= 2 and i.data_type == onnx.TensorProto.FLOAT and not numpy_helper.to_array(i).any()
                   for i in compact.graph.initializer)
    assert any(f"{pruned[1]} = {pruned[0]}" in note for note in result.notes)
    assert result.sparse_vs_dense_max_abs_diff == 0.0 and result.torch_max_abs_diff < 1e-4


def test_equal_dense_weights_nested_deep_are_named_by_scope(tmp_path):
    """Unpruned weights of one shape share a zero pattern (none), so only the node scope can name them."""
    model, _ = _deep_net_with_masks([])
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", sparse_storage=False)
    assert result.generated_names == []
    reads = _weight_inputs(onnx.load(str(result.path)))
    assert [reads[f"/features/features.{i}/conv/conv.0/conv.0.0/Conv"] for i in range(3)] == [
        f"features.{i}.conv.0.0.weight" for i in range(3)]
