"""prune_step for every method, ranking (global / uniform) and settings."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning import METHODS, PruneSettings, prune_step
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.ranking import choose_pruned, target_zero_counts
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.schema import PruningConfig

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, padding=1, bias=False),
        nn.BatchNorm2d(6),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 5 * 5, 3),
    )
    with torch.no_grad():  # non-trivial running statistics
        model.train()(torch.randn(32, 1, 5, 5))
    return model


def fisher_pool(n: int = 40, batch: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 1, 5, 5, generator=g)
    ys = torch.randint(0, 3, (n,), generator=g)
    return lambda: [(xs[i : i + batch], ys[i : i + batch]) for i in range(0, n, batch)]


def test_choose_pruned_global_picks_smallest_across_layers() -> None:
    scores = torch.tensor([5.0, 0.1, 3.0, 0.2, 9.0, 0.05])
    kept = torch.ones(6, dtype=torch.bool)
    chosen = choose_pruned(scores, kept, [2, 4], 0.5, "global")
    assert chosen.tolist() == [False, True, False, True, False, True]


def test_choose_pruned_excludes_already_pruned_and_counts_them() -> None:
    scores = torch.tensor([0.0, 0.1, 3.0, 0.2, 9.0, 0.05])
    kept = torch.tensor([False, True, True, True, True, True])
    chosen = choose_pruned(scores, kept, [6], 0.5, "global")
    assert chosen.tolist() == [False, True, False, False, False, True]
    assert not choose_pruned(scores, kept, [6], 0.1, "global").any(), "never revive, never over-prune"


def test_choose_pruned_uniform_per_layer() -> None:
    torch.manual_seed(0)
    sizes = [10, 7, 33]
    scores = torch.rand(sum(sizes))
    kept = torch.ones(sum(sizes), dtype=torch.bool)
    chosen = choose_pruned(scores, kept, sizes, 0.3, "uniform")
    counts = [int(c.sum()) for c in chosen.split(sizes)]
    assert counts == target_zero_counts(sizes, 0.3)
    assert all(abs(c - 0.3 * n) <= 1 for c, n in zip(counts, sizes, strict=True))
    assert sum(counts) == round(0.3 * sum(sizes))
    for part, s in zip(chosen.split(sizes), scores.split(sizes), strict=True):
        assert s[part].max() <= s[~part].min()


def test_magnitude_global_and_uniform() -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    original = torch.cat([p.detach().abs().reshape(-1) for p in params.values()])
    report = prune_step(model, params, masks, 0.6, PruneSettings(method="magnitude"))
    total = sum(p.numel() for p in params.values())
    assert abs(report.achieved_sparsity * total - 0.6 * total) <= 1
    pruned = torch.cat([(~masks.masks[n]).reshape(-1) for n in params])
    assert original[pruned].max() <= original[~pruned].min()
    for n, p in params.items():
        assert torch.all(p[~masks.masks[n]] == 0)

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    report = prune_step(model, params, masks, 0.6, PruneSettings(method="magnitude_uniform"))
    for n, p in params.items():
        assert abs(report.per_layer_sparsity[n] * p.numel() - 0.6 * p.numel()) <= 1


def test_settings_validation_and_from_config() -> None:
    with pytest.raises(ValueError):
        PruneSettings(method="bogus")
    with pytest.raises(ValueError):
        PruneSettings(method="woodfisher", block_size=0)
    cfg = PruningConfig(method="woodtaylor", ranking="uniform")
    settings = PruneSettings.from_config(cfg)
    assert settings.method == "woodtaylor" and settings.ranking == "uniform"
    assert settings.block_size == cfg.woodfisher.block_size and settings.damp == cfg.woodfisher.damp
    with pytest.raises(WFError):
        PruneSettings.from_config(PruningConfig(method="none"))
    assert set(METHODS) == {"woodfisher", "woodtaylor", "magnitude", "magnitude_uniform", "diag_fisher", "kfac",
                            "taylor", "group_norm"}


def total_params(params) -> int:
    return sum(p.numel() for p in params.values())


def assert_consistent(params, masks: MaskSet, report, target: float) -> None:
    total = total_params(params)
    zeros = sum(int((~masks.masks[n]).sum()) for n in params)
    assert abs(zeros - target * total) <= 1, (zeros, target * total)
    assert report.achieved_sparsity == pytest.approx(zeros / total)
    for n, p in params.items():
        assert torch.all(p[~masks.masks[n]] == 0), f"{n}: pruned weights must be exactly 0"


VARIANTS = [
    PruneSettings(method="woodfisher", num_grads=24, block_size=16, chunk_size=10),
    PruneSettings(method="woodfisher", num_grads=24, block_size=16, ranking="uniform", update="independent"),
    PruneSettings(method="woodfisher", num_grads=10, block_size=32, update="none", fisher_type="true"),
    PruneSettings(method="woodfisher", num_grads=12, block_size=16, recompute_steps=3, grad_batch_size=2),
    PruneSettings(method="woodfisher", num_grads=8, block_size=8, route="woodbury", dtype="float64"),
    PruneSettings(method="woodtaylor", num_grads=24, block_size=16),
    PruneSettings(method="diag_fisher", num_grads=24),
    PruneSettings(method="magnitude"),
    PruneSettings(method="magnitude_uniform"),
]


@pytest.mark.parametrize("settings", VARIANTS,
                         ids=lambda s: f"{s.method}-{s.ranking}-{s.update}-{s.route}-r{s.recompute_steps}")
def test_prune_step_every_method_reaches_target(settings: PruneSettings) -> None:
    model = tiny_cnn()
    model.train()
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    progress_calls: list[tuple[str, int, int]] = []
    report = prune_step(model, params, masks, 0.4, settings, fisher_pool(),
                        progress=lambda *a: progress_calls.append(a), generator=torch.Generator().manual_seed(0))
    assert_consistent(params, masks, report, 0.4)
    assert model.training and all(m.training for m in model.modules()), "mode must be restored"
    before = {n: m.clone() for n, m in masks.masks.items()}
    report = prune_step(model, params, masks, 0.7, settings, fisher_pool())
    assert_consistent(params, masks, report, 0.7)
    assert all(torch.all(masks.masks[n] <= before[n]) for n in params), "pruned weights stay pruned"
    assert set(report.timings) >= {"gradients", "inverse", "obs", "total"}
    assert json.loads(json.dumps(report.to_dict()))["method"] == settings.method
    if settings.method in ("woodfisher", "woodtaylor", "diag_fisher"):
        assert report.num_grads == settings.num_grads * settings.recompute_steps
        assert any(label == "gradients" for label, _, _ in progress_calls)
        if settings.method != "diag_fisher":
            assert any(label == "inverse" for label, _, _ in progress_calls)
    if settings.method == "woodfisher" and settings.update == "joint":
        assert report.predicted_loss_increase is not None and report.predicted_loss_increase > 0


def test_prune_step_matches_manual_pipeline_fp64() -> None:
    """prune_step's WoodFisher = gradients → BlockFisherInverse.from_gradients → obs_prune, by hand."""
    from wf_pipeline.fisher.gradients import iter_gradient_chunks
    from wf_pipeline.fisher.inverse import BlockFisherInverse
    from wf_pipeline.pruning.obs import obs_prune

    model = tiny_cnn().double().eval()
    params = select_prunable(model, [".*"], [])
    pool = fisher_pool()

    def xs_pool() -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(x.double(), y) for x, y in pool()]

    settings = PruneSettings(method="woodfisher", num_grads=30, block_size=16, damp=1e-4, dtype="float64")
    chunks = list(iter_gradient_chunks(model, params, xs_pool, num_grads=30, chunk_size=100))
    sizes = [p.numel() for p in params.values()]
    inverse = BlockFisherInverse.from_gradients(chunks, 16, 1e-4, sizes=sizes, dtype=torch.float64)
    weights = torch.cat([p.detach().reshape(-1) for p in params.values()])
    expected = obs_prune(weights, inverse, 0.5)

    masks = MaskSet.dense(params)
    report = prune_step(model, params, masks, 0.5, settings, xs_pool)
    got = torch.cat([p.detach().reshape(-1) for p in params.values()])
    kept = torch.cat([masks.masks[n].reshape(-1) for n in params])
    assert torch.equal(~kept, expected.pruned)
    assert torch.allclose(got, expected.weights, atol=1e-10)
    assert report.predicted_loss_increase == pytest.approx(expected.predicted_loss_increase, rel=1e-8)


@pytest.mark.parametrize("method", ["woodfisher", "woodtaylor", "diag_fisher"])
def test_reduce_fn_scaling_all_statistics_gives_identical_masks(method: str) -> None:
    """A fake all-reduce that doubles every statistic (as if two ranks had identical gradients)."""
    settings = PruneSettings(method=method, num_grads=16, block_size=16, dtype="float64")
    results = []
    for reduce_fn in (None, lambda t: t.mul_(2)):
        model = tiny_cnn()
        params = select_prunable(model, [".*"], [])
        masks = MaskSet.dense(params)
        prune_step(model, params, masks, 0.5, settings, fisher_pool(), reduce_fn=reduce_fn)
        results.append((masks, torch.cat([p.detach().reshape(-1) for p in params.values()])))
    (m0, w0), (m1, w1) = results
    assert all(torch.equal(m0.masks[n], m1.masks[n]) for n in m0.masks)
    assert torch.allclose(w0, w1, atol=1e-8)


def test_woodbury_route_agrees_with_fast_route_and_refuses_reduce() -> None:
    weights, masks_seen = [], []
    for route in ("fast", "woodbury"):
        model = tiny_cnn()
        params = select_prunable(model, [".*"], [])
        masks = MaskSet.dense(params)
        prune_step(model, params, masks, 0.5, PruneSettings(method="woodfisher", num_grads=20, block_size=16, damp=1e-3,
                                                            dtype="float64", route=route), fisher_pool())
        weights.append(torch.cat([p.detach().reshape(-1) for p in params.values()]))
        masks_seen.append(masks)
    assert all(torch.equal(masks_seen[0].masks[n], masks_seen[1].masks[n]) for n in masks_seen[0].masks)
    assert torch.allclose(weights[0], weights[1], atol=1e-8)
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    with pytest.raises(WFError):
        prune_step(model, params, MaskSet.dense(params), 0.5, PruneSettings(method="woodfisher", route="woodbury"),
                   fisher_pool(), reduce_fn=lambda t: None)


def test_prune_step_below_current_sparsity_changes_nothing() -> None:
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    settings = PruneSettings(method="woodfisher", num_grads=8, block_size=16)
    prune_step(model, params, masks, 0.5, settings, fisher_pool())
    snapshot = {n: p.detach().clone() for n, p in params.items()}
    report = prune_step(model, params, masks, 0.3, settings, fisher_pool())
    assert report.newly_pruned == 0 and report.num_grads == 0
    assert all(torch.equal(snapshot[n], p) for n, p in params.items())


def test_global_ranking_may_empty_a_layer_and_the_report_names_it() -> None:
    """Layer collapse is allowed (the ranking is as asked) but reported, step by step."""
    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    with torch.no_grad():
        params["3.weight"].mul_(1e-3)  # the smallest magnitudes of the model: global ranking takes them first
    masks = MaskSet.dense(params)
    settings = PruneSettings(method="magnitude", ranking="global")
    first = prune_step(model, params, masks, 0.2, settings)
    assert first.fully_pruned == [] and 0 < first.per_layer_sparsity["3.weight"] < 1
    second = prune_step(model, params, masks, 0.5, settings)
    assert second.fully_pruned == ["3.weight"] == masks.fully_pruned()
    assert second.per_layer_sparsity["3.weight"] == 1.0 and not params["3.weight"].any()
    assert json.loads(json.dumps(second.to_dict()))["fully_pruned"] == ["3.weight"]
    uniform = MaskSet.dense(params)
    prune_step(model, params, uniform, 0.5, PruneSettings(method="magnitude", ranking="uniform"))
    assert uniform.fully_pruned() == []


def test_every_recipe_method_is_one_pruner_class() -> None:
    from wf_pipeline.pruning import PRUNERS, Pruner, build_pruner
    from wf_pipeline.pruning.structured.pruners import CHANNEL_PRUNERS
    from wf_pipeline.recipe.schema import CHANNEL_METHODS, CHANNEL_ONLY_METHODS

    assert set(PRUNERS) == set(METHODS) - set(CHANNEL_ONLY_METHODS)
    assert set(CHANNEL_PRUNERS) == set(CHANNEL_METHODS)  # channel pruners need the model: tests/test_structured_*
    for name in PRUNERS:
        pruner = build_pruner(PruneSettings(method=name))
        assert isinstance(pruner, Pruner) and pruner.name == name


def test_prune_step_drives_any_pruner_through_the_four_steps() -> None:
    """A new method is one class: prune_step runs collect → score → choose → update on it, in order."""
    from wf_pipeline.pruning.pruners import FlatPruner, Update

    calls: list[str] = []

    class ReversedMagnitude(FlatPruner[None]):
        name = "reversed_magnitude"

        def collect(self, view, ctx):
            calls.append("collect")

        def score(self, view, stats):
            calls.append("score")
            return -view.flat_weights().abs()  # largest weights first

        def choose(self, view, scores, target):
            calls.append("choose")
            return super().choose(view, scores, target)

        def update(self, view, stats, chosen):
            calls.append("update")
            view.write_back(view.flat_kept() & ~chosen)
            return Update(predicted_loss_increase=None)

    model = tiny_cnn()
    params = select_prunable(model, [".*"], [])
    original = torch.cat([p.detach().abs().reshape(-1) for p in params.values()])
    masks = MaskSet.dense(params)
    report = prune_step(model, params, masks, 0.3, ReversedMagnitude(PruneSettings(method="magnitude")))
    assert calls == ["collect", "score", "choose", "update"]
    assert report.method == "reversed_magnitude"
    pruned = torch.cat([(~masks.masks[n]).reshape(-1) for n in params])
    assert original[pruned].min() >= original[~pruned].max()


def test_settings_read_the_schema_section() -> None:
    """PruneSettings holds the recipe's woodfisher section itself: one declaration, one validation."""
    cfg = PruningConfig(method="woodfisher")
    settings = PruneSettings.from_config(cfg)
    assert settings.woodfisher is cfg.woodfisher
    changed = settings.replace(num_grads=7, ranking="uniform")
    assert changed.num_grads == 7 and changed.ranking == "uniform" and settings.num_grads == cfg.woodfisher.num_grads
    with pytest.raises(ValueError, match="damp"):
        settings.replace(damp=-1.0)
