"""Channel groups from Torch-Pruning and lossless physical removal of zeroed channels."""
from __future__ import annotations

import pytest
import torch
import torchvision
from torch import nn

from wf_pipeline.models.cifar_resnet import resnet20
from wf_pipeline.models.mobilenet_v1 import mobilenetv1
from wf_pipeline.pruning.structured.groups import (
    build_channel_graph,
    channel_masks,
    remove_channels_from_masks,
    removed_channels,
)
from wf_pipeline.pruning.structured.surgery import remove_masked_channels

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest single-threaded

MODELS = {
    "resnet20": (lambda: resnet20(10, 1), (2, 1, 28, 28)),
    "mobilenetv1": (lambda: mobilenetv1(10, 1, width_mult=0.25, small_input=True), (2, 1, 28, 28)),
    "resnet18": (lambda: torchvision.models.resnet18(num_classes=10), (2, 3, 48, 48)),
    "mobilenet_v2": (lambda: torchvision.models.mobilenet_v2(num_classes=10), (2, 3, 48, 48)),
    "resnet50": (lambda: torchvision.models.resnet50(num_classes=10), (2, 3, 48, 48)),
}


def _randomise_norms(model: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm statistics and affine terms, so a channel is zero only through its masks."""
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            n = module.num_features
            assert module.running_mean is not None and module.running_var is not None
            module.running_mean.copy_(torch.rand(n, generator=gen) * 2 - 1)
            module.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            with torch.no_grad():
                module.weight.copy_(torch.rand(n, generator=gen) + 0.5)
                module.bias.copy_(torch.rand(n, generator=gen) - 0.5)


@pytest.mark.parametrize("name", list(MODELS))
def test_removing_zeroed_channels_leaves_outputs_unchanged(name: str) -> None:
    factory, shape = MODELS[name]
    gen = torch.Generator().manual_seed(0)
    model = factory().eval()
    _randomise_norms(model, gen)
    x = torch.randn(*shape, generator=gen)
    graph = build_channel_graph(model, x)
    masks = channel_masks(graph)
    removed_total = 0
    for group in graph.prunable:
        removed = torch.rand(group.size, generator=gen) < 0.5
        removed[0] = False  # keep one channel
        remove_channels_from_masks(masks, group, removed)
        assert torch.equal(removed_channels(group, masks), removed)
        removed_total += int(removed.sum())
    params = dict(model.named_parameters())
    with torch.no_grad():
        for pname, mask in masks.items():
            params[pname].mul_(mask)
        zeroed_out = model(x)
    before = sum(p.numel() for p in model.parameters())
    result = remove_masked_channels(model, masks, x)
    with torch.no_grad():
        after_out = model(x)
    torch.testing.assert_close(after_out, zeroed_out, rtol=1e-4, atol=1e-5)
    assert sum(result.removed_per_group.values()) == removed_total > 0
    assert sum(p.numel() for p in model.parameters()) == result.params_after < before
    assert sum(result.channels_after.values()) < sum(result.channels_before.values())


class _ChannelMeanNet(nn.Module):
    """A mean over channels has no parameters to mask and Torch-Pruning traces it as elementwise:
    removing a channel changes that mean, so surgery must notice the changed outputs."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.b = nn.Conv2d(4, 3, 3, padding=1)
        self.fc = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn(self.a(x)))
        return self.fc((self.b(h) * h.mean(1, keepdim=True)).mean((2, 3)))


def test_surgery_refuses_a_channel_that_is_not_really_zero() -> None:
    model = _ChannelMeanNet().eval()
    x = torch.randn(2, 1, 8, 8)
    graph = build_channel_graph(model, x)
    group = next(g for g in graph.prunable if g.name == "b")
    masks = channel_masks(graph)
    remove_channels_from_masks(masks, group, torch.arange(group.size) == 1)
    with pytest.raises(RuntimeError, match="changed the model's outputs"):
        remove_masked_channels(model, masks, x)


def test_groups_of_resnet20_and_mobilenetv1() -> None:
    model = resnet20(10, 1)
    graph = build_channel_graph(model, torch.zeros(1, 1, 28, 28), skip=[r"^conv1\."])
    by_name = {g.name: g for g in graph.groups}
    assert not by_name["fc"].prunable  # the classes stay
    stage1 = next(g for g in graph.groups if any(m.module == "conv1" for m in g.members))
    assert stage1.reason is not None and "conv1.weight" in stage1.reason  # skipped stem: its stage keeps its width
    stage3 = next(g for g in graph.groups if any(m.module == "layer3.2.conv2" for m in g.members))
    kinds = {(m.module, m.kind) for m in stage3.members}
    # A residual stage: every block's conv2 and the shortcut produce it, the next conv1s and fc consume it.
    assert {("layer3.0.conv2", "out"), ("layer3.1.conv2", "out"), ("layer3.0.shortcut.0", "out"),
            ("layer3.1.conv1", "in"), ("fc", "in"), ("layer3.0.bn2", "norm")} <= kinds
    assert sum(g.size for g in graph.prunable) == 3 * (16 + 32 + 64) + 32 + 64

    mobile = mobilenetv1(10, 1, width_mult=0.25, small_input=True)
    mgraph = build_channel_graph(mobile, torch.zeros(1, 1, 28, 28))
    depthwise = [g for g in mgraph.prunable if g.members_of("depthwise")]
    assert depthwise
    for group in depthwise:  # the pointwise producer, the depthwise conv, both BNs, the next pointwise
        assert {m.kind for m in group.members} == {"out", "norm", "depthwise", "in"}
