"""Channel pruners on the common interface: global choice with floors, channel/FLOPs targets,
exact zeros, lossless surgery afterwards, and the link between group-OBS scores and predictions."""
from __future__ import annotations

import copy

import pytest
import torch

from wf_pipeline.models.cifar_resnet import resnet20
from wf_pipeline.models.mobilenet_v1 import mobilenetv1
from wf_pipeline.pruning import PruneSettings
from wf_pipeline.pruning.pruners import PruneView, StepContext
from wf_pipeline.pruning.pruners.base import eval_mode
from wf_pipeline.pruning.structured.flops import layer_shapes, total_macs
from wf_pipeline.pruning.structured.pruners import CHANNEL_PRUNERS
from wf_pipeline.pruning.structured.space import group_floor
from wf_pipeline.pruning.structured.stage import remove_pruned_channels, setup_channel_pruning

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: fastest single-threaded
SETTINGS = PruneSettings("woodfisher", num_grads=24, block_size=32, damp=1e-3, chunk_size=12)


def _data(seed: int = 0, n: int = 48, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, generator=gen), torch.randint(0, 10, (n,), generator=gen)


def _setup(model: torch.nn.Module, method: str, **kwargs):  # noqa: ANN202
    x, y = _data()
    setup = setup_channel_pruning(model, x[:1], SETTINGS.replace(method=method), **kwargs)
    pruner = setup.pruner
    ctx = StepContext(model, lambda: [(x[i : i + 12], y[i : i + 12]) for i in range(0, len(x), 12)],
                      generator=torch.Generator().manual_seed(0))
    return setup, pruner, PruneView(setup.params, setup.masks), ctx, x


def _trained_like(model: torch.nn.Module) -> torch.nn.Module:
    """Random but non-degenerate BatchNorm statistics (a freshly built net has mean 0, var 1)."""
    gen = torch.Generator().manual_seed(1)
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert module.running_var is not None
            module.running_var.copy_(torch.rand(module.num_features, generator=gen) + 0.5)
    return model.eval()


@pytest.mark.parametrize("method", sorted(CHANNEL_PRUNERS))
def test_pruner_reaches_channel_target_with_floors_and_exact_zeros(method: str) -> None:
    model = _trained_like(resnet20(10, 1))
    setup, pruner, view, ctx, x = _setup(model, method, min_keep=0.25, min_keep_by_layer={r"^layer3\.": 0.5})
    space = setup.space
    target = 0.4
    with eval_mode(model):
        outcome = pruner.prune(view, ctx, target)
    removed = space.removed(setup.masks.masks)
    assert sum(int(r.sum()) for r in removed) == round(target * space.num_channels)
    assert pruner.sparsity(view) == pytest.approx(round(target * space.num_channels) / space.num_channels)
    assert pruner.reached(view, target)
    for group, gone, floor in zip(space.groups, removed, space.floors, strict=True):
        assert group.size - int(gone.sum()) >= floor
    for name, param in setup.params.items():
        assert not param[~setup.masks.masks[name]].any(), f"{name}: a masked entry is not zero"
    if method == "woodfisher":
        assert outcome.predicted_loss_increase is not None and outcome.predicted_loss_increase > 0
    # The masked model and the physically smaller one compute the same function.
    with torch.no_grad():
        masked_out = model(x)
    before = sum(p.numel() for p in model.parameters())
    result = remove_pruned_channels(model, setup.masks.masks, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(model(x), masked_out, rtol=1e-4, atol=1e-5)
    assert result.params_after < before


def test_floors_from_fraction_and_layer_regexes() -> None:
    model = resnet20(10, 1)
    setup, *_ = _setup(model, "magnitude", min_keep=0.1, min_keep_by_layer={r"layer1\.0\.conv1": 0.5})
    floors = {g.name: f for g, f in zip(setup.space.groups, setup.space.floors, strict=True)}
    assert floors["layer1.0.conv1"] == 8  # 0.5 of 16
    assert floors["layer1.1.conv1"] == 2  # ceil(0.1 * 16)
    assert floors["layer3.0.conv1"] == 7  # ceil(0.1 * 64)
    assert group_floor(setup.space.groups[0], 0.0, {}) == 1  # never an empty layer


def test_woodfisher_prediction_for_one_channel_is_its_score() -> None:
    model = _trained_like(resnet20(10, 1))
    setup, pruner, view, ctx, _ = _setup(model, "woodfisher")
    stats = pruner.collect(view, ctx)
    scores = pruner.score(view, stats)
    chosen = pruner.choose(view, scores, 1 / setup.space.num_channels)
    assert int(chosen.sum()) == 1
    assert float(scores[chosen]) == pytest.approx(float(scores.min()))
    outcome = pruner.update(view, stats, chosen)
    # Removing one channel: the joint update's predicted increase is exactly that channel's cost.
    assert outcome.predicted_loss_increase == pytest.approx(float(scores[chosen]), rel=1e-5)


def test_woodfisher_compensates_in_the_consumer_only() -> None:
    model = _trained_like(resnet20(10, 1))
    setup, pruner, view, ctx, _ = _setup(model, "woodfisher")
    before = {n: p.detach().clone() for n, p in setup.params.items()}
    with eval_mode(model):
        pruner.prune(view, ctx, 0.1)
    consumers = set(setup.space.graph.consumers())
    masks = setup.masks.masks
    changed = {n for n, p in setup.params.items() if not torch.equal(p.detach()[masks[n]], before[n][masks[n]])}
    assert changed and changed <= consumers  # kept weights move only in consumer layers (the OBS update)


def test_flops_target_takes_the_shortest_prefix_and_counts_macs_like_the_pruned_model() -> None:
    model = _trained_like(mobilenetv1(10, 1, width_mult=0.25, small_input=True))
    setup, pruner, view, ctx, x = _setup(model, "magnitude", target="flops", min_keep=0.2)
    space = setup.space
    scores = pruner.score(view, None)
    removed = space.removed(setup.masks.masks)
    chosen = pruner.choose(view, scores, 0.3)
    after = space.split(chosen)
    assert space.sparsity(after) >= 0.3
    # One channel fewer (the last of the ranked prefix) misses the target.
    key = scores / space.channel_macs(removed).clamp_min(1.0)
    picked = chosen.nonzero().flatten()
    last = picked[torch.argmax(key[picked])]
    fewer = chosen.clone()
    fewer[last] = False
    assert space.sparsity(space.split(fewer)) < 0.3
    pruner.update(view, None, chosen)
    expected = space.macs(space.removed(setup.masks.masks))
    pruned = copy.deepcopy(model)
    remove_pruned_channels(pruned, setup.masks.masks, x[:2])
    assert total_macs(layer_shapes(pruned, x[:1]), {}, {}) == expected


def test_woodfisher_without_update_only_zeroes() -> None:
    model = _trained_like(resnet20(10, 1))
    x, y = _data()
    settings = SETTINGS.replace(update="none")
    setup = setup_channel_pruning(model, x[:1], settings)
    before = {n: p.detach().clone() for n, p in setup.params.items()}
    ctx = StepContext(model, lambda: [(x, y)], generator=torch.Generator().manual_seed(0))
    with eval_mode(model):
        outcome = setup.pruner.prune(PruneView(setup.params, setup.masks), ctx, 0.1)
    assert outcome.predicted_loss_increase is None
    for name, param in setup.params.items():
        kept = setup.masks.masks[name]
        assert torch.equal(param.detach()[kept], before[name][kept]), name  # nothing compensates
    with pytest.raises(Exception, match="not available for channel pruning"):
        setup_channel_pruning(model, x[:1], SETTINGS.replace(update="independent"))


def test_round_to_keeps_widths_in_multiples_and_blocks_go_cheapest_first() -> None:
    model = _trained_like(resnet20(10, 1))
    setup, pruner, view, ctx, x = _setup(model, "magnitude", min_keep=0.25, round_to=8)
    space = setup.space
    scores = pruner.score(view, None)
    chosen = pruner.choose(view, scores, 0.3)
    need = round(0.3 * space.num_channels)
    assert need <= int(chosen.sum()) < need + 8
    for group, picked, floor, values in zip(space.groups, space.split(chosen), space.floors, space.split(scores),
                                                   strict=True):
        kept = group.size - int(picked.sum())
        assert kept % 8 == 0 and kept >= floor
        if picked.any() and (~picked).any():  # within a group the cheapest channels go
            assert float(values[picked].max()) <= float(values[~picked].min())
    pruner.update(view, None, chosen)
    remove_pruned_channels(model, setup.masks.masks, x[:2])
    widths = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert all(w % 8 == 0 for w in widths)


def test_round_to_layers_sets_the_block_per_group() -> None:
    """AVX-512 ONNX Runtime pads widths to 16: wide stages go in blocks of 16, the 16-wide first stage in 8."""
    model = _trained_like(resnet20(10, 1))
    first_stage = r"^(conv1|layer1\.)"
    setup, pruner, view, ctx, x = _setup(model, "magnitude", min_keep=0.1, round_to=16,
                                         round_to_by_layer={first_stage: 8})
    space = setup.space
    assert {(g.size, r) for g, r in zip(space.groups, space.rounds, strict=True)} == {(16, 8), (32, 16), (64, 16)}
    chosen = pruner.choose(view, pruner.score(view, None), 0.5)
    for group, picked, r in zip(space.groups, space.split(chosen), space.rounds, strict=True):
        assert (group.size - int(picked.sum())) % r == 0, group.name
    assert any(int(p.sum()) % 16 == 8 for p in space.split(chosen))  # a block of 8 was really used
    pruner.update(view, None, chosen)
    remove_pruned_channels(model, setup.masks.masks, x[:2])
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Conv2d) and name != "conv1" and not name.startswith("layer1."):
            assert module.out_channels % 16 == 0, name


def test_round_to_layers_is_validated() -> None:
    from pydantic import ValidationError

    from wf_pipeline.recipe.schema import ChannelConfig

    assert ChannelConfig(round_to=16, round_to_layers={"^layer1": 8}).round_to_layers == {"^layer1": 8}
    with pytest.raises(ValidationError, match="must be >= 1"):
        ChannelConfig(round_to_layers={"^layer1": 0})
    with pytest.raises(ValidationError):
        ChannelConfig(round_to_layers={"(": 8})
