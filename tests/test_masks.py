"""MaskSet: exact zeros through optimizer steps, statistics, persistence; select_prunable."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.pruning.masks import MaskSet
from wf_pipeline.pruning.selection import select_prunable

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 6 * 6, 5),
    )


def random_masks(params: dict[str, nn.Parameter], keep: float, seed: int = 0) -> MaskSet:
    g = torch.Generator().manual_seed(seed)
    return MaskSet({n: torch.rand(p.shape, generator=g) < keep for n, p in params.items()})


def train_steps(model: nn.Module, optimizer: torch.optim.Optimizer, steps: int, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(8, 1, 6, 6, generator=g)
        y = torch.randint(0, 5, (8,), generator=g)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()


def warm_up_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Give every weight non-zero momentum / Adam moments before pruning."""
    train_steps(model, optimizer, 3, seed=7)


OPTIMIZERS = {
    "sgd_momentum_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4),
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-3),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", sorted(OPTIMIZERS))
def test_masks_never_revive(name: str) -> None:
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = OPTIMIZERS[name](model.parameters())
    warm_up_state(model, optimizer)
    params = select_prunable(model, [".*"], [])
    masks = random_masks(params, keep=0.4)
    handle = masks.attach(model, optimizer)
    for n, p in params.items():
        assert torch.all(p[~masks.masks[n]] == 0)
        for value in optimizer.state[p].values():
            if torch.is_tensor(value) and value.shape == p.shape:
                assert torch.all(value[~masks.masks[n]] == 0), "pruned optimizer state not cleared"
    before = {n: p.detach().clone() for n, p in params.items()}
    train_steps(model, optimizer, 25)
    for n, p in params.items():
        pruned = ~masks.masks[n]
        assert torch.all(p[pruned] == 0)
        assert not torch.signbit(p[pruned]).any(), "pruned weights must be +0.0"
        assert not torch.equal(p[~pruned], before[n][~pruned]), "kept weights should still train"
    handle.remove()
    train_steps(model, optimizer, 2)
    assert any(torch.any(p[~masks.masks[n]] != 0) for n, p in params.items()), "hooks should be removed"


def test_mask_updated_in_place_takes_effect() -> None:
    torch.manual_seed(0)
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    params = select_prunable(model, [".*"], [])
    masks = MaskSet.dense(params)
    masks.attach(model, optimizer)
    train_steps(model, optimizer, 3)
    name = next(iter(params))
    new_mask = masks.masks[name].clone()
    new_mask.view(-1)[:10] = False
    masks.masks[name] = new_mask
    masks.apply(model)
    train_steps(model, optimizer, 5)
    assert torch.all(params[name].view(-1)[:10] == 0)


def test_statistics_and_state_dict_roundtrip() -> None:
    params = {"a.weight": nn.Parameter(torch.tensor([[0.0, 1.0], [2.0, 0.0]])), "b.weight": nn.Parameter(torch.ones(4))}
    masks = MaskSet.from_zeros(params)
    assert masks.num_params() == 8 and masks.num_zeros() == 2
    assert masks.sparsity() == pytest.approx(0.25)
    assert masks.per_layer_sparsity() == {"a.weight": 0.5, "b.weight": 0.0}
    dense = MaskSet.dense(params)
    assert dense.sparsity() == 0.0
    dense.load_state_dict(masks.state_dict())
    assert all(torch.equal(dense.masks[n], masks.masks[n]) for n in params)
    with pytest.raises(ValueError):
        dense.load_state_dict({"masks": {"a.weight": torch.ones(3, dtype=torch.bool),
                                         "b.weight": torch.ones(4, dtype=torch.bool)}})
    assert dense.to("cpu") is dense


def test_fully_pruned_names_the_layers_with_nothing_kept() -> None:
    masks = MaskSet({"a.weight": torch.zeros(2, 3, dtype=torch.bool), "b.weight": torch.tensor([False, True]),
                     "c.weight": torch.zeros(4, dtype=torch.bool), "empty": torch.zeros(0, dtype=torch.bool)})
    assert masks.fully_pruned() == ["a.weight", "c.weight"]
    assert masks.fully_pruned(["b.weight", "c.weight"]) == ["c.weight"]


def test_apply_matches_ddp_style_prefix() -> None:
    inner = tiny_cnn()
    params = select_prunable(inner, [".*"], [])
    masks = random_masks(params, keep=0.5)
    wrapper = nn.Module()
    wrapper.module = inner  # same naming as DistributedDataParallel
    masks.apply(wrapper)
    for n, p in params.items():
        assert torch.all(p[~masks.masks[n]] == 0)


def test_select_prunable_filters_and_orders() -> None:
    model = tiny_cnn()
    assert list(select_prunable(model, [".*"], [])) == ["0.weight", "4.weight"]
    assert list(select_prunable(model, [r"^4\."], [])) == ["4.weight"]
    assert list(select_prunable(model, [".*"], [r"^0\."])) == ["4.weight"]
    assert list(select_prunable(model, [".*"], [], min_layer_params=100)) == ["4.weight"]
    with pytest.raises(WFError) as err:
        select_prunable(model, ["nothing"], [])
    assert "pruning.layers" in str(err.value) and "0.weight" in (err.value.hint or "")
