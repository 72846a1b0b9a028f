"""Per-sample / mini-batch gradients: every engine vs plain autograd, finite differences, masks, streaming."""
from __future__ import annotations

from typing import Any, cast

import pytest
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.fisher.gradients import SampleStream, iter_gradient_chunks, sample_model_labels
from wf_pipeline.pruning.selection import select_prunable

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(dtype: torch.dtype = torch.float32) -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(3 * 4 * 4, 4),
    ).to(dtype)
    with torch.no_grad():
        model.train()(torch.randn(16, 1, 4, 4, dtype=dtype))  # non-trivial BN running stats
    return model.eval()


def pool(n: int, batch: int, dtype: torch.dtype = torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 1, 4, 4, generator=g).to(dtype)
    ys = torch.randint(0, 4, (n,), generator=g)
    return xs, ys, (lambda: [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, n, batch)])


def autograd_reference(
    model: nn.Module, params: dict[str, nn.Parameter], x: torch.Tensor, y: torch.Tensor
) -> torch.Tensor:
    """Plain model(x).backward() for one group of samples, flattened over `params`."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in params.values()]
    assert all(g is not None for g in grads)
    return torch.cat([cast(torch.Tensor, g).reshape(-1) for g in grads])


def collect(*args, **kwargs) -> torch.Tensor:
    return torch.cat(list(iter_gradient_chunks(*args, **kwargs)))


ENGINES = ["layerwise", "vmap", "loop", "auto"]


@pytest.mark.parametrize("engine", ENGINES)
def test_per_sample_gradients_equal_plain_autograd(engine: str) -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    xs, ys, batches = pool(10, batch=3)
    grads = collect(model, params, batches, num_grads=10, chunk_size=4, engine=engine)
    assert grads.shape == (10, sum(p.numel() for p in params.values()))
    for i in range(10):
        ref = autograd_reference(model, params, xs[i : i + 1], ys[i : i + 1])
        assert torch.allclose(grads[i], ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_minibatch_gradients_are_mean_of_per_sample(engine: str) -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    _, _, batches = pool(12, batch=5)
    per_sample = collect(model, params, batches, num_grads=12, chunk_size=5, engine=engine)
    grouped = collect(model, params, batches, num_grads=4, grad_batch_size=3, chunk_size=3, engine=engine)
    assert torch.allclose(grouped, per_sample.reshape(4, 3, -1).mean(1), atol=1e-6)


@pytest.mark.parametrize("engine", ["layerwise", "vmap"])
def test_gradient_matches_finite_differences_fp64(engine: str) -> None:
    model = tiny_cnn(torch.float64)
    params = select_prunable(model, [".*"], [])
    xs, ys, batches = pool(2, batch=2, dtype=torch.float64)
    grads = collect(model, params, batches, num_grads=1, grad_batch_size=2, dtype=torch.float64, engine=engine)[0]
    flat_params = list(params.values())
    eps = 1e-6
    g = torch.Generator().manual_seed(1)
    offsets = [0]
    for p in flat_params:
        offsets.append(offsets[-1] + p.numel())
    for _ in range(12):
        layer = int(torch.randint(0, len(flat_params), (1,), generator=g))
        j = int(torch.randint(0, flat_params[layer].numel(), (1,), generator=g))
        flat = flat_params[layer].data.view(-1)
        orig = float(flat[j])
        losses = []
        for step in (eps, -eps):
            flat[j] = orig + step
            with torch.no_grad():
                losses.append(float(nn.functional.cross_entropy(model(xs), ys)))
        flat[j] = orig
        fd = (losses[0] - losses[1]) / (2 * eps)
        assert grads[offsets[layer] + j].item() == pytest.approx(fd, rel=1e-5, abs=1e-8)


@pytest.mark.parametrize("engine", ENGINES)
def test_masks_zero_gradients_and_stream_cycles(engine: str) -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(2)) < 0.5 for n, p in params.items()}
    flat_mask = torch.cat([masks[n].reshape(-1) for n in params])
    xs, ys, batches = pool(5, batch=2)
    chunks = list(iter_gradient_chunks(model, params, batches, num_grads=13, chunk_size=4, masks=masks, engine=engine))
    assert [c.shape[0] for c in chunks] == [4, 4, 4, 1]
    grads = torch.cat(chunks)
    assert torch.all(grads[:, ~flat_mask] == 0) and torch.any(grads[:, flat_mask] != 0)
    assert torch.allclose(grads[5], grads[0]) and torch.allclose(grads[12], grads[2])  # cycled through the pool


def test_sample_stream_regroups_and_empty_pool_errors() -> None:
    xs = torch.arange(7.0)
    stream = SampleStream(lambda: [(xs[:3], xs[:3]), (xs[3:], xs[3:])], torch.device("cpu"))
    assert stream.take(2)[0].tolist() == [0, 1]
    assert stream.take(4)[0].tolist() == [2, 3, 4, 5]
    assert stream.take(3)[0].tolist() == [6, 0, 1]
    with pytest.raises(WFError):
        SampleStream(lambda: [], torch.device("cpu")).take(1)


def test_true_fisher_samples_labels_from_the_model() -> None:
    logits = torch.tensor([[50.0, 0, 0], [0, 0, 50.0], [0.0, 0.0, 0.0]]).repeat(200, 1)
    labels = sample_model_labels(logits, torch.Generator().manual_seed(0))
    assert torch.all(labels[0::3] == 0) and torch.all(labels[1::3] == 2)
    assert set(labels[2::3].tolist()) == {0, 1, 2}
    again = sample_model_labels(logits, torch.Generator().manual_seed(0))
    assert torch.equal(labels, again)

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    _, _, batches = pool(6, batch=6)
    a = collect(model, params, batches, num_grads=6, fisher_type="true", generator=torch.Generator().manual_seed(3))
    b = collect(model, params, batches, num_grads=6, fisher_type="true", generator=torch.Generator().manual_seed(3))
    emp = collect(model, params, batches, num_grads=6)
    assert torch.equal(a, b) and not torch.allclose(a, emp)


@pytest.mark.parametrize("engine", ENGINES)
def test_block_major_chunks_equal_flat_chunks(engine: str) -> None:
    from wf_pipeline.fisher.inverse import BlockLayout

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    layout = BlockLayout([p.numel() for p in params.values()], 8)  # short last blocks in both layers
    masks = {n: torch.rand(p.shape, generator=torch.Generator().manual_seed(4)) < 0.5 for n, p in params.items()}
    _, _, batches = pool(6, batch=4)
    flat = collect(model, params, batches, num_grads=6, chunk_size=4, masks=masks, engine=engine)
    blocked = torch.cat(
        list(iter_gradient_chunks(
            model, params, batches, num_grads=6, chunk_size=4, masks=masks, layout=layout, engine=engine
        )),
        dim=1,
    )
    assert blocked.shape == (layout.num_blocks, 6, 8)
    assert torch.equal(blocked, layout.to_blocked(flat))
    assert torch.equal(layout.unpad(blocked.transpose(0, 1)), flat)
    assert float(blocked.transpose(0, 1)[:, ~layout.valid()].abs().sum()) == 0.0


# ----------------------------------------------------------------------------- finiteness guard
class InfAfter(nn.Module):
    """Overflows to Inf on inputs whose first pixel exceeds `threshold` (a model, not the data, at fault)."""

    def __init__(self, threshold: float) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 3, 3, padding=1)
        self.fc = nn.Linear(3 * 4 * 4, 4)
        self.threshold = threshold

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        big = (x[:, :1, :1, :1] > self.threshold).to(h.dtype) * 1e38
        return self.fc((h * (1 + big) * 10).flatten(1))


@pytest.mark.parametrize("blocked", [False, True], ids=["flat", "block-major"])
@pytest.mark.parametrize("engine", ENGINES)
def test_nan_input_sample_stops_with_the_chunk_samples_and_layers_named(engine: str, blocked: bool) -> None:
    from wf_pipeline.fisher.inverse import BlockLayout

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    xs, ys, _ = pool(10, batch=10)
    xs[6, 0, 2, 1] = float("nan")
    layout = BlockLayout([p.numel() for p in params.values()], 8) if blocked else None
    chunks = iter_gradient_chunks(
        model, params, lambda: [(xs, ys)], num_grads=10, chunk_size=4, engine=engine, layout=layout
    )
    first = next(chunks)  # samples 0-3 are clean
    assert torch.isfinite(first).all()
    with pytest.raises(WFError) as err:
        next(chunks)
    message = str(err.value)
    assert "non-finite gradient (NaN) in Fisher chunk 1 (gradients 4-7)" in message
    assert "1 gradient(s) affected" in message and "gradient 6 (Fisher sample 6" in message
    assert "'0.weight', '4.weight'" in message


@pytest.mark.parametrize("engine", ENGINES)
def test_inf_producing_model_stops_with_a_named_error(engine: str) -> None:
    torch.manual_seed(0)
    model = InfAfter(threshold=1.5).eval()
    params = select_prunable(model, [".*"], [])
    xs, ys, batches = pool(12, batch=5)
    xs[:, 0, 0, 0] = 0.0
    xs[9, 0, 0, 0] = 2.0  # overflows in gradient 9 only (groups of 3: gradient 3, samples 9-11)
    with pytest.raises(WFError, match=r"Fisher chunk 1 \(gradients 2-3\): 1 gradient\(s\) affected, "
                       r"the first is gradient 3 "
                       r"\(Fisher samples 9-11.*in layer\(s\) 'conv.weight', 'fc.weight'"):
        collect(model, params, batches, num_grads=4, grad_batch_size=3, chunk_size=2, engine=engine)


def test_true_fisher_with_non_finite_logits_reaches_the_guard() -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    xs, ys, _ = pool(4, batch=4)
    xs[2] = float("inf")
    with pytest.raises(WFError, match="gradient 2 "):
        collect(model, params, lambda: [(xs, ys)], num_grads=4, fisher_type="true",
                generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("engine", ["layerwise", "vmap"])
def test_skip_policy_replaces_non_finite_samples_and_counts_them(engine: str) -> None:
    from wf_pipeline.fisher.gradients import GradientStats

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    xs, ys, _ = pool(10, batch=10)
    xs[[1, 6]] = float("nan")
    batches = lambda: [(xs[:5], ys[:5]), (xs[5:], ys[5:])]  # noqa: E731
    stats = GradientStats()
    grads = collect(model, params, batches, num_grads=8, chunk_size=4, nonfinite="skip", stats=stats, engine=engine)
    assert grads.shape[0] == 8 and torch.isfinite(grads).all() and stats.skipped == 2
    clean = [i for i in range(10) if i not in (1, 6)]
    for row, i in enumerate(clean):
        assert torch.allclose(grads[row], autograd_reference(model, params, xs[i : i + 1], ys[i : i + 1]), atol=1e-6)
    xs[:] = float("nan")
    with pytest.raises(WFError, match="non-finite before 8 finite ones"):
        collect(model, params, batches, num_grads=8, chunk_size=4, nonfinite="skip")


@pytest.mark.parametrize(
    "method, route",
    [("woodfisher", "fast"), ("woodfisher", "woodbury"), ("woodtaylor", "fast"), ("woodtaylor", "woodbury"),
     ("diag_fisher", "fast")],
)
def test_prune_step_never_writes_a_nan_sample_into_the_weights(method: str, route: str) -> None:
    from wf_pipeline.pruning import MaskSet, PruneSettings, prune_step

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    before = {n: p.detach().clone() for n, p in params.items()}
    xs, ys, _ = pool(12, batch=12)
    xs[5, 0, 0, 0] = float("nan")
    settings = PruneSettings(method, num_grads=12, block_size=8, chunk_size=4, route=route, damp=1e-3)
    masks = MaskSet.dense(params)
    with pytest.raises(WFError, match=r"Fisher chunk 1 \(gradients 4-7\).*gradient 5 "):
        prune_step(model, params, masks, 0.5, settings, lambda: [(xs, ys)])
    assert all(torch.equal(p, before[n]) for n, p in params.items()) and all(m.all() for m in masks.masks.values())

    report = prune_step(model, params, masks, 0.5, settings.replace(nonfinite="skip"), lambda: [(xs, ys)])
    assert report.details.nonfinite_skipped == 1 and report.num_grads == 12  # sample 5 replaced by sample 0 again
    assert all(torch.isfinite(p).all() for p in params.values())
    assert report.achieved_sparsity == pytest.approx(0.5, abs=0.02)


@pytest.mark.parametrize("blocked", [False, True])
def test_reused_output_buffer_gives_the_same_chunks(blocked: bool) -> None:
    """``reuse_output`` writes every chunk into one buffer (a pre-filled buffer leaves no trace), with the
    same values as fresh chunks; a shorter last chunk gets a buffer of its own size."""
    from wf_pipeline.fisher.inverse import BlockLayout

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    _, _, batches = pool(22, batch=5)
    layout = BlockLayout([p.numel() for p in params.values()], 8) if blocked else None
    kwargs: dict[str, Any] = dict(num_grads=22, chunk_size=8, layout=layout, engine="layerwise")
    fresh = [c.clone() for c in iter_gradient_chunks(model, params, batches, **kwargs)]
    reused, pointers = [], []
    for chunk in iter_gradient_chunks(model, params, batches, reuse_output=True, **kwargs):
        pointers.append(chunk.data_ptr())
        reused.append(chunk.clone())
        chunk.fill_(float("nan"))  # garbage the next chunk must overwrite completely
    assert pointers[0] == pointers[1]
    assert [c.shape for c in reused] == [c.shape for c in fresh]
    for a, b in zip(fresh, reused, strict=True):
        assert torch.equal(a, b)


def test_layerwise_finiteness_shortcut_keeps_huge_finite_gradients_and_catches_a_narrow_output() -> None:
    """The layer-wise engine vouches for a chunk only when each layer's row sum is finite and the output
    dtype holds the rows: finite gradients whose sum overflows are kept (the element-wise check decides),
    and float32 gradients beyond float16's range stop with the named error."""
    from wf_pipeline.fisher.gradients import GradientComputer

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 3, bias=False)).eval()
    with torch.no_grad():
        cast(nn.Linear, model[0]).weight.mul_(1e-38)
        cast(nn.Linear, model[1]).weight.copy_(torch.tensor([[1.0, 0, 0], [0, 0, 0], [0, 0, 0]]))
    params = select_prunable(model, ["0\\."], [])
    xs = torch.full((6, 4), 2e38)  # gradients ~3e37 each: finite, but their sum overflows float32
    ys = torch.ones(6, dtype=torch.long)
    computer = GradientComputer(model, params, engine="layerwise")
    out = computer.compute(xs.view(6, 1, 4), ys.view(6, 1))
    assert bool(torch.isfinite(out).all()) and not bool(torch.isfinite(out.sum())) and not computer.known_finite
    grads = collect(model, params, lambda: [(xs, ys)], num_grads=6, chunk_size=6, engine="layerwise")
    assert torch.equal(grads, out)
    small = xs / 2e38
    computer.compute(small.view(6, 1, 4), ys.view(6, 1))
    assert computer.known_finite
    with pytest.raises(WFError, match=r"non-finite gradient \(Inf\) in Fisher chunk 0"):
        collect(model, params, lambda: [(small * 1e6, ys)], num_grads=6, chunk_size=3, engine="layerwise",
                dtype=torch.float16)
