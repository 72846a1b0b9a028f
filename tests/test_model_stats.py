"""Channels, parameters and MACs read from ONNX files equal counts taken from the PyTorch modules."""
from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from tests.deploy_fixtures import make_sparse_model, random_images, remove_channels
from wf_pipeline.deploy.export import export_onnx
from wf_pipeline.deploy.model_stats import model_stats


def _torch_layer_counts(model: nn.Module, sample: torch.Tensor) -> dict[str, dict[str, int]]:
    """Per layer, from forward hooks: channels, MACs per sample, weight non-zeros times positions."""
    counts: dict[str, dict[str, int]] = {}
    handles = []

    def hook(name: str, module: nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
        def record(_, inputs, output):
            batch = inputs[0].shape[0]
            weight = module.weight.detach()
            if isinstance(module, nn.Linear):
                positions = output.numel() // batch // module.out_features
                macs = positions * module.in_features * module.out_features
                channels = (module.in_features, module.out_features)
            elif isinstance(module, nn.ConvTranspose2d):
                positions = inputs[0].numel() // batch // module.in_channels  # each input pixel scatters the kernel
                macs = inputs[0].numel() // batch * weight[0].numel()
                channels = (module.in_channels, module.out_channels)
            else:
                positions = output.numel() // batch // module.out_channels
                macs = output.numel() // batch * weight[0].numel()
                channels = (module.in_channels, module.out_channels)
            counts[f"{name}.weight"] = {"in": channels[0], "out": channels[1], "macs": macs,
                                        "nonzero_macs": int(torch.count_nonzero(weight)) * positions}
        return record

    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            handles.append(module.register_forward_hook(hook(name, module)))
    with torch.no_grad():
        model.eval()(sample)
    for handle in handles:
        handle.remove()
    return counts


def _check_against_torch(model: nn.Module, sample: torch.Tensor, stats) -> None:
    reference = _torch_layer_counts(model, sample)
    layers = {layer.name: layer for layer in stats.layers}
    assert set(layers) == set(reference)
    for name, ref in reference.items():
        layer = layers[name]
        assert (layer.in_channels, layer.out_channels) == (ref["in"], ref["out"]), name
        assert layer.macs == ref["macs"] and layer.nonzero_macs == ref["nonzero_macs"], name
    assert stats.macs == sum(r["macs"] for r in reference.values())


def test_tiny_net_counts_equal_torch_hooks_in_both_storage_forms(tmp_path):
    model, masks = make_sparse_model(0.9)
    result = export_onnx(model, random_images(2), tmp_path / "m.onnx", masks=masks)
    for path in (result.path, result.dense_path):
        stats = model_stats(onnx.load(str(path)))
        _check_against_torch(model, random_images(2), stats)
        # BN is folded: every conv gains a bias of out_channels entries
        expected_params = sum(m.weight.numel() + m.weight.shape[0] for m in (model.conv1, model.block[0], model.fc))
        assert stats.params == expected_params
        nonzero = sum(int(torch.count_nonzero(model.get_parameter(n))) for n in masks)
        biases = sum(layer.nonzero_params for layer in stats.layers) - nonzero
        assert stats.nonzero_params == nonzero + biases and biases <= 8 + 16 + 10
    assert result.structure == model_stats(onnx.load(str(result.path))).to_dict()


def test_physically_smaller_model_has_fewer_channels_params_and_macs(tmp_path):
    dense, _ = make_sparse_model(0.0)
    slim = remove_channels(dense, keep1=[0, 2, 3, 5, 7], keep2=list(range(0, 16, 2)))
    sample = random_images(2)
    dense_path = export_onnx(dense, sample, tmp_path / "d.onnx", sparse_storage=False).path
    dense_stats = model_stats(onnx.load(str(dense_path)))
    slim_stats = model_stats(onnx.load(str(export_onnx(slim, sample, tmp_path / "s.onnx", sparse_storage=False).path)))
    _check_against_torch(slim, sample, slim_stats)
    channels = {layer.name: layer.out_channels for layer in slim_stats.layers}
    assert channels == {"conv1.weight": 5, "block.0.weight": 8, "fc.weight": 10}
    assert [layer.out_channels for layer in dense_stats.layers] == [8, 16, 10]
    # 8x8 images, 3x3 convs with padding 1: 64 output positions per channel
    assert slim_stats.macs == 64 * (5 * 1 * 9 + 8 * 5 * 9) + 10 * 8 * 4
    assert dense_stats.macs == 64 * (8 * 1 * 9 + 16 * 8 * 9) + 10 * 16 * 4
    assert slim_stats.params == (5 * 9 + 5) + (8 * 5 * 9 + 8) + (10 * 32 + 10)


class _MixedNet(nn.Module):
    """Depthwise and grouped convs, a transposed conv and a Linear on tokens (exported as MatMul)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, stride=2, padding=1)
        self.depthwise = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.grouped = nn.Conv2d(8, 12, 1, groups=4)
        self.up = nn.ConvTranspose2d(12, 6, 2, stride=2)
        self.proj = nn.Linear(6, 5)
        self.head = nn.Linear(5, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.up(self.grouped(torch.relu(self.depthwise(self.stem(x)))))
        tokens = self.proj(x.flatten(2).transpose(1, 2))
        return self.head(tokens.mean(1))


def test_grouped_transposed_and_matmul_layers_equal_torch_hooks(tmp_path):
    torch.manual_seed(0)
    model = _MixedNet().eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(torch.rand_like(param) > 0.5)
    sample = random_images(2)
    result = export_onnx(model, sample, tmp_path / "mixed.onnx")
    stats = model_stats(onnx.load(str(result.path)))
    assert {layer.op for layer in stats.layers} == {"Conv", "ConvTranspose", "MatMul", "Gemm"}
    for layer in stats.layers:
        assert layer.name != "proj.weight"  # MatMul computes x @ W^T with the stored tensor `proj.weight.T`
        layer.name = layer.name.removesuffix(".T")
    _check_against_torch(model, sample, stats)
    depthwise = next(layer for layer in stats.layers if layer.name == "depthwise.weight")
    assert (depthwise.in_channels, depthwise.out_channels, depthwise.params) == (8, 8, 8 * 9 + 8)


def test_dynamic_spatial_size_leaves_macs_unknown(tmp_path):
    model, _ = make_sparse_model(0.0)
    path = export_onnx(model, random_images(2), tmp_path / "m.onnx", sparse_storage=False).path
    stored = onnx.load(str(path))
    for dim in stored.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "size"
    stats = model_stats(stored)
    assert stats.macs is None and stats.layers[0].macs is None
    assert stats.params == pytest.approx(model_stats(onnx.load(str(path))).params)
