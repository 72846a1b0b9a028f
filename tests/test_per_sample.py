"""The layer-wise per-sample gradient engine: conv/linear rules against autograd, whole models against
vmap, and the guards that hand models it cannot serve to vmap."""
from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from wf_pipeline.fisher.gradients import GradientStats, iter_gradient_chunks
from wf_pipeline.fisher.inverse import BlockLayout
from wf_pipeline.fisher.per_sample import LayerwiseUnsupported, conv_grads, layerwise_blocker, linear_grads
from wf_pipeline.pruning.selection import select_prunable

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- single-layer rules
CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "dilated_no_bias": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, bias=False),
    "grouped_rect": lambda: nn.Conv2d(4, 8, (3, 2), padding=(1, 0), groups=2),
    "depthwise": lambda: nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False),
    "depthwise_x2": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4),
    "strided": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1),
    "strided_rect": lambda: nn.Conv2d(4, 6, (1, 3), stride=(2, 1), padding=(0, 1), dilation=(1, 2)),
    "pointwise": lambda: nn.Conv2d(4, 6, 1, bias=False),
    "same_even_kernel": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "valid": lambda: nn.Conv2d(4, 6, 3, padding="valid", dilation=(1, 2)),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="circular"),
    "conv1d": lambda: nn.Conv1d(4, 6, 3, padding=1),
    "conv1d_same_reflect": lambda: nn.Conv1d(4, 6, 5, padding="same", dilation=2, padding_mode="reflect"),
    "conv1d_strided_grouped": lambda: nn.Conv1d(4, 6, 3, stride=2, groups=2),
    "conv3d": lambda: nn.Conv3d(4, 6, (2, 3, 3), padding=(0, 1, 1), stride=(1, 2, 1), groups=2),
}


def per_sample_reference(layer: nn.Module, x: torch.Tensor, grad_out: torch.Tensor) -> torch.Tensor:
    """Weight gradient of <layer(x_n), grad_out_n> for each sample n, by plain autograd."""
    rows = []
    for xn, gn in zip(x, grad_out, strict=True):
        layer.zero_grad()
        (layer(xn.unsqueeze(0)) * gn.unsqueeze(0)).sum().backward()
        weight = layer.weight
        assert isinstance(weight, torch.Tensor) and weight.grad is not None
        rows.append(weight.grad.reshape(-1).clone())
    return torch.stack(rows)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("name", sorted(CONVS))
@pytest.mark.parametrize("method", ["grouped", "unfold", "auto"])
def test_conv_rule_equals_autograd(name: str, method: str) -> None:
    torch.manual_seed(0)
    layer = CONVS[name]().double()
    assert isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Conv3d))
    spatial = {nn.Conv1d: (13,), nn.Conv2d: (11, 12), nn.Conv3d: (3, 7, 8)}[type(layer)]
    x = torch.randn(6, 4, *spatial, dtype=torch.float64)
    grad_out = torch.randn_like(layer(x))
    if method == "unfold" and isinstance(layer, nn.Conv3d):
        pytest.skip("im2col is 1-d/2-d only; 3-d convs always take the grouped route")
    reference = per_sample_reference(layer, x, grad_out)
    assert torch.allclose(conv_grads(layer, x, grad_out, 6, method), reference, atol=1e-12)
    grouped = conv_grads(layer, x, grad_out, 2, method)  # groups of 3 samples: their sum
    assert torch.allclose(grouped, reference.view(2, 3, -1).sum(1), atol=1e-12)


def test_linear_rule_sums_over_extra_dims() -> None:
    torch.manual_seed(0)
    layer = nn.Linear(5, 3, bias=False).double()
    x = torch.randn(4, 7, 5, dtype=torch.float64)  # 4 samples of 7 tokens
    grad_out = torch.randn(4, 7, 3, dtype=torch.float64)
    reference = per_sample_reference(layer, x, grad_out)
    assert torch.allclose(linear_grads(layer, x, grad_out, 4), reference, atol=1e-12)
    assert torch.allclose(linear_grads(layer, x, grad_out, 2), reference.view(2, 2, -1).sum(1), atol=1e-12)


# ----------------------------------------------------------------------------- whole models
def fisher_pool(shape: tuple[int, ...], n: int, classes: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, *shape, generator=g)
    ys = torch.randint(0, classes, (n,), generator=g)
    return lambda: [(xs[i : i + 5], ys[i : i + 5]) for i in range(0, n, 5)]


def gradients(model, params, batches, engine: str, **kwargs) -> tuple[torch.Tensor, GradientStats]:
    stats = GradientStats()
    chunks = iter_gradient_chunks(model, params, batches, engine=engine, stats=stats, **kwargs)
    blocked = "layout" in kwargs
    return torch.cat(list(chunks), dim=1 if blocked else 0), stats


def assert_engines_agree(model, params, batches, rel: float = 1e-5, **kwargs) -> GradientStats:
    fast, stats = gradients(model, params, batches, "auto", **kwargs)
    generator = kwargs.pop("generator", None)
    if generator is not None:  # the same label draws for the reference
        kwargs["generator"] = torch.Generator().manual_seed(generator.initial_seed())
    reference, _ = gradients(model, params, batches, "vmap", **kwargs)
    assert fast.shape == reference.shape
    assert float((fast - reference).norm() / reference.norm()) < rel
    assert float((fast - reference).abs().max()) <= rel * float(reference.abs().max())
    return stats


def trained_bn(model: nn.Module, shape: tuple[int, ...]) -> nn.Module:
    """Non-trivial BatchNorm running statistics, then eval mode (as during Fisher computation)."""
    with torch.no_grad():
        model.train()(torch.randn(16, *shape, generator=torch.Generator().manual_seed(9)))
    return model.eval()


def test_bundled_resnet20_layerwise_equals_vmap_with_masks_groups_and_layout() -> None:
    from wf_pipeline.models import load_default_model

    model = load_default_model()
    params = select_prunable(model, [".*"], [])
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.7 for n, p in params.items()}
    layout = BlockLayout([p.numel() for p in params.values()], 128)
    batches = fisher_pool((1, 28, 28), 24)
    stats = assert_engines_agree(model, params, batches, num_grads=6, chunk_size=4, masks=masks, layout=layout)
    assert stats.engine == "layerwise" and stats.engine_note is None
    assert_engines_agree(model, params, batches, num_grads=5, grad_batch_size=3, chunk_size=2, masks=masks)
    assert_engines_agree(
        model, params, batches, num_grads=6, chunk_size=3, fisher_type="true",
        generator=torch.Generator().manual_seed(5),
    )


def test_mobilenet_v1_depthwise_layerwise_equals_vmap() -> None:
    from wf_pipeline.models.mobilenet_v1 import mobilenetv1

    torch.manual_seed(0)
    model = trained_bn(mobilenetv1(num_classes=10, in_channels=1, width_mult=0.25, small_input=True), (1, 16, 16))
    params = select_prunable(model, [".*"], [])
    assert any(m.groups > 1 for m in model.modules() if isinstance(m, nn.Conv2d))
    stats = assert_engines_agree(
        model, params, fisher_pool((1, 16, 16), 10), num_grads=6, chunk_size=3, grad_batch_size=2
    )
    assert stats.engine == "layerwise"


def test_torchvision_mobilenet_v3_layerwise_equals_vmap() -> None:
    """Squeeze-excitation, hardswish, depthwise and strided convs, a dropout classifier (in eval)."""
    import torchvision

    torch.manual_seed(0)
    model = trained_bn(torchvision.models.mobilenet_v3_small(num_classes=10), (3, 32, 32))
    params = select_prunable(model, ["features\\.(1|2|3)\\.", "classifier"], [])
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) < 0.5 for n, p in params.items()}
    stats = assert_engines_agree(model, params, fisher_pool((3, 32, 32), 8), num_grads=4, chunk_size=2, masks=masks)
    assert stats.engine == "layerwise"


class SharedAndInplace(nn.Module):
    """One conv applied twice (its gradient sums both calls), in-place ReLU straight after a conv,
    and a Linear over a sequence dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.head = nn.Conv2d(2, 3, 3, stride=2, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.token = nn.Linear(3, 4)
        self.fc = nn.Linear(4, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.conv(self.relu(self.conv(x))))
        tokens = self.relu(self.head(x)).flatten(2).transpose(1, 2)  # (N, positions, 3)
        return self.fc(self.relu(self.token(tokens)).mean(1))


def test_shared_module_inplace_relu_and_sequence_linear() -> None:
    torch.manual_seed(0)
    model = SharedAndInplace().eval()
    params = select_prunable(model, [".*"], [])
    stats = assert_engines_agree(model, params, fisher_pool((2, 9, 9), 10, classes=5), num_grads=6, chunk_size=4)
    assert stats.engine == "layerwise"


# ----------------------------------------------------------------------------- guards
class MixesSamples(nn.Module):
    """Glue code that couples the samples of a batch: no structural test can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3)
        self.fc = nn.Linear(2 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        return self.fc((h - h.mean(0, keepdim=True)).flatten(1))


class FunctionalWeight(nn.Module):
    """A selected weight also used outside its module's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.flatten(1)
        return self.fc(x) + F.linear(x.flip(1), self.fc.weight)


class NotCalled(nn.Module):
    """A selected weight used only functionally (as attention out-projections are)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x.flatten(1), self.fc.weight)


class Scale(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x


@pytest.mark.parametrize(
    "model, shape, expected",
    [
        (MixesSamples(), (1, 6, 6), "differ from plain autograd"),
        (FunctionalWeight(), (6,), "differ from plain autograd"),
        (NotCalled(), (6,), "outside its module"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3)), (4,), "training mode"),
        (nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4, track_running_stats=False).eval(), nn.Linear(4, 3)),
         (4,), "without running"),
        (nn.Sequential(nn.Linear(4, 4), Scale(), nn.Linear(4, 3)), (4,), "custom layer"),
    ],
    ids=["mixing-glue", "functional-use", "not-called", "bn-train", "bn-no-stats", "custom-leaf"],
)
def test_auto_falls_back_to_vmap_where_samples_interact(model: nn.Module, shape, expected: str) -> None:
    torch.manual_seed(0)
    for module in model.modules():  # built at collection from the unseeded global generator: make them the same
        reset = getattr(module, "reset_parameters", None)
        if callable(reset):
            reset()
    params = select_prunable(model, [".*"], [])
    batches = fisher_pool(shape, 8, classes=3)
    # Groups of two samples: BatchNorm in training mode cannot take a batch of one.
    fast, stats = gradients(model, params, batches, "auto", num_grads=6, chunk_size=3, grad_batch_size=2)
    assert stats.engine in ("vmap", "loop") and expected in (stats.engine_note or "")
    reference, _ = gradients(model, params, batches, "loop", num_grads=6, chunk_size=3, grad_batch_size=2)
    # Relative to the whole gradient, as assert_engines_agree does: BatchNorm over a pair of samples is
    # ill-conditioned, so single entries near zero differ in float32 by more than an element-wise rtol.
    assert float((fast - reference).norm() / reference.norm()) < 1e-5
    assert float((fast - reference).abs().max()) <= 1e-5 * float(reference.abs().max())


def test_forced_layerwise_refuses_a_model_it_cannot_serve() -> None:
    model: nn.Module = NotCalled()
    params = select_prunable(model, [".*"], [])
    with pytest.raises(LayerwiseUnsupported, match="outside its module"):
        gradients(model, params, fisher_pool((6,), 4, classes=3), "layerwise", num_grads=2)
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4), nn.Linear(4, 3))
    assert "training mode" in (layerwise_blocker(model, select_prunable(model, [".*"], [])) or "")
    with pytest.raises(LayerwiseUnsupported, match="training mode"):
        gradients(model, select_prunable(model, [".*"], []), fisher_pool((4,), 4, classes=3), "layerwise",
                  num_grads=2, grad_batch_size=2)


def test_cross_check_compares_the_largest_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A well-classified sample's tiny gradient is mostly rounding: the check must not rest on it."""
    from wf_pipeline.fisher.gradients import GradientComputer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(6, 3)).eval()
    params = select_prunable(model, [".*"], [])
    x = torch.randn(6, 1, 6)
    x[[1, 4]] *= 50  # the two largest gradients: large inputs, labelled as their least likely class
    with torch.no_grad():
        y = model(x).argmin(1, keepdim=True)
    computer = GradientComputer(model, params)
    checked: list[list[int]] = []
    original = computer.loop.grads

    def spy(xs: torch.Tensor, ys: torch.Tensor) -> dict[str, torch.Tensor]:
        checked.append([int((x == xi).flatten(1).all(1).nonzero()[0]) for xi in xs])
        return original(xs, ys)

    monkeypatch.setattr(computer.loop, "grads", spy)
    out = computer.compute(x, y)
    largest = sorted(torch.linalg.vector_norm(out, dim=1).topk(2).indices.tolist())
    assert largest == [1, 4] and computer.engine == "layerwise" and checked == [largest]


class _NoBackward(torch.autograd.Function):
    """Identity whose backward fails: marks a part of the graph the layer-wise backward must not run."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        raise AssertionError("backward ran past the first selected layer")


class _StemThenHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4 * 5 * 5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = _NoBackward.apply(self.stem(x))
        return self.fc(torch.relu(self.conv(x)).flatten(1))


def test_layerwise_backward_stops_at_the_first_selected_layer() -> None:
    """Gradients are asked for at the selected layers' outputs only: nothing before the first selected
    layer runs backward (here it would raise), and the gradients still equal plain autograd's."""
    torch.manual_seed(0)
    model = _StemThenHead().eval()
    params = {"conv.weight": model.conv.weight, "fc.weight": model.fc.weight}
    batches = fisher_pool((1, 5, 5), 6, classes=3)
    fast, stats = gradients(model, params, batches, "layerwise", num_grads=6, chunk_size=4)
    assert stats.engine == "layerwise"
    xs, ys = next(iter(batches()))
    for i in range(2):  # the same function without the marker, by plain autograd
        model.zero_grad()
        logits = model.fc(torch.relu(model.conv(model.stem(xs[i : i + 1]))).flatten(1))
        F.cross_entropy(logits, ys[i : i + 1]).backward()
        conv_grad, fc_grad = model.conv.weight.grad, model.fc.weight.grad
        assert conv_grad is not None and fc_grad is not None
        reference = torch.cat([conv_grad.reshape(-1), fc_grad.reshape(-1)])
        assert torch.allclose(fast[i], reference, atol=1e-6)


# ----------------------------------------------------------------------------- worker threads
class _Uncopyable(nn.Module):
    """Holds a lock: ``copy.deepcopy`` refuses it, so no replica can be made."""

    def __init__(self) -> None:
        super().__init__()
        import threading

        self.fc = nn.Linear(6, 3)
        self.lock = threading.Lock()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_passes_and_worker_threads_give_the_one_pass_gradients(monkeypatch: pytest.MonkeyPatch) -> None:
    """A chunk cut into passes, run by one thread or spread over worker threads (each on its own frozen
    replica), gives the gradients of one pass, with masks, groups and a block layout; the model is left
    as it was, and the replicas follow in-place changes of its weights and are rebuilt when one is replaced."""
    import wf_pipeline.fisher.layerwise as layerwise_module
    from wf_pipeline.fisher.gradients import GradientComputer
    from wf_pipeline.models import load_default_model

    model: Any = load_default_model()  # a CIFAR ResNet-20: layer3[2].conv2 below
    params = select_prunable(model, [".*"], [])
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(1)) < 0.7 for n, p in params.items()}
    layout = BlockLayout([p.numel() for p in params.values()], 128)
    x = torch.randn(7, 2, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    y = torch.randint(0, 10, (7, 2), generator=torch.Generator().manual_seed(4))

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:  # rounding apart (batch-size-dependent kernels)
        diff = a - b
        return float(diff.norm()) <= 1e-6 * float(b.norm()) and float(diff.abs().max()) <= 1e-6 * float(b.abs().max())

    def computer(workers: int) -> GradientComputer:
        return GradientComputer(model, params, masks=masks, layout=layout, engine="layerwise", workers=workers)

    one_pass = computer(3).compute(x, y)  # 14 samples: one pass of at most 25
    monkeypatch.setattr(layerwise_module, "CPU_PASS_SAMPLES", 4)
    assert computer(1).layerwise.passes(7, 2) == [(0, 2), (2, 4), (4, 5), (5, 7)]
    assert computer(3).layerwise.passes(7, 2) == [(0, 1), (1, 2), (2, 4), (4, 5), (5, 6), (6, 7)]  # a multiple of 3
    threaded = computer(3)
    for out in (computer(1).compute(x, y), threaded.compute(x, y), threaded.compute(x, y)):  # replicas reused
        assert close(out, one_pass)
    assert len(threaded.layerwise.pool.replicas) == 3
    assert all(isinstance(p, nn.Parameter) and p.requires_grad for p in model.parameters())
    assert not any(m._forward_hooks for m in model.modules())
    with torch.no_grad():  # in-place changes to the weights reach the replicas (shared storage)
        model.layer3[2].conv2.weight.mul_(2)
    changed = threaded.compute(x, y)
    assert close(changed, computer(1).compute(x, y))
    assert not close(changed, one_pass)
    model.layer3[2].conv2.weight = nn.Parameter(model.layer3[2].conv2.weight.detach() / 2)  # replaced: rebuilt
    params = select_prunable(model, [".*"], [])
    rebuilt = computer(3)
    rebuilt.layerwise.pool.replicas = threaded.layerwise.pool.replicas
    assert not any(r.current() for r in rebuilt.layerwise.pool.replicas)
    assert close(rebuilt.compute(x, y), one_pass)
    assert all(r.current() for r in rebuilt.layerwise.pool.replicas)
    assert rebuilt.layerwise.pool.replicas != threaded.layerwise.pool.replicas


def test_worker_threads_follow_the_engines_and_fall_back_for_an_uncopyable_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With two intra-op threads the default splits each chunk across two workers (replicas made);
    a model that cannot be copied runs on one thread; both agree with vmap."""
    import wf_pipeline.fisher.layerwise as layerwise_module
    from wf_pipeline.fisher.parallel import torch_threads

    monkeypatch.setattr(layerwise_module, "CPU_PASS_SAMPLES", 1)
    made: list[nn.Module] = []
    original_init = layerwise_module.FrozenReplica.__init__

    def counting_init(self, model: nn.Module) -> None:
        original_init(self, model)
        made.append(model)

    monkeypatch.setattr(layerwise_module.FrozenReplica, "__init__", counting_init)
    torch.manual_seed(0)
    model: nn.Module = SharedAndInplace().eval()  # one conv called twice, in-place ReLU, a sequence Linear
    params = select_prunable(model, [".*"], [])
    with torch_threads(2):
        stats = assert_engines_agree(model, params, fisher_pool((2, 9, 9), 10, classes=5), num_grads=6, chunk_size=4)
    assert stats.engine == "layerwise" and made == [model, model]
    model = _Uncopyable().eval()
    params = select_prunable(model, [".*"], [])
    with torch_threads(2):
        stats = assert_engines_agree(model, params, fisher_pool((6,), 8, classes=3), num_grads=6, chunk_size=3)
    assert stats.engine == "layerwise" and made == [made[0]] * 2
