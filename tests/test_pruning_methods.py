"""prune_step for every method, ranking (global / uniform) and settings."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.methods import METHODS, PruneSettings, prune_step
from wf_pipeline.pruning.ranking import choose_pruned, target_zero_counts
from wf_pipeline.pruning.selection import select_prunable
from wf_pipeline.recipe.schema import PruningConfig


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
    assert all(abs(c - 0.3 * n) <= 1 for c, n in zip(counts, sizes))
    assert sum(counts) == round(0.3 * sum(sizes))
    for part, s in zip(chosen.split(sizes), scores.split(sizes)):
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
    assert set(METHODS) == {"woodfisher", "woodtaylor", "magnitude", "magnitude_uniform", "diag_fisher"}
