"""Learning-rate schedules: the single-schedule form (unchanged) and lists of pieces, against hand-computed rates."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from wf_pipeline.errors import WFError
from wf_pipeline.recipe.loader import validate_recipe
from wf_pipeline.recipe.schema import LRScheduleConfig, Recipe, TrainingConfig
from wf_pipeline.training.epoch import train_epoch
from wf_pipeline.training.lr_schedule import lr_at, lr_factor
from wf_pipeline.training.optimizer import build_optimizer


def training(**fields: Any) -> TrainingConfig:
    return TrainingConfig.model_validate(fields)


# Warm restarts as in SparseML's MobileNetV2 tutorial recipe: a constant rate for one epoch, a cosine from
# epoch 1 to 10, and the same cosine again from 10 to 15.
RESTARTS = [
    {"start_epoch": 0, "end_epoch": 1, "kind": "constant", "lr": 0.0005},
    {"start_epoch": 1, "end_epoch": 10, "kind": "cosine", "lr": 0.0005, "final_lr": 0.00025},
    {"start_epoch": 10, "end_epoch": 15, "kind": "cosine", "lr": 0.0005, "final_lr": 0.00025},
]


# ------------------------------------------------------------------------------------- the single form


@pytest.mark.parametrize(
    ("schedule", "epoch", "expected"),
    [
        # cosine 0.1 -> 0 over 10 epochs: 0.05 * (1 + cos(pi * e / 10))
        ({"kind": "cosine"}, 0.0, 0.1),
        ({"kind": "cosine"}, 2.5, 0.05 * (1 + math.sqrt(0.5))),
        ({"kind": "cosine"}, 5.0, 0.05),
        ({"kind": "cosine", "final_lr": 0.01}, 5.0, 0.055),
        # linear warmup for 2 epochs (from ~0), then linear 0.1 -> 0.02 over the remaining 8
        ({"kind": "linear", "warmup_epochs": 2, "final_lr": 0.02}, 1.0, 0.05),
        ({"kind": "linear", "warmup_epochs": 2, "final_lr": 0.02}, 6.0, 0.06),
        ({"kind": "step", "step_epochs": [3, 6], "gamma": 0.5}, 2.99, 0.1),
        ({"kind": "step", "step_epochs": [3, 6], "gamma": 0.5}, 3.0, 0.05),
        ({"kind": "step", "step_epochs": [3, 6], "gamma": 0.5}, 6.5, 0.025),
        ({"kind": "exponential", "gamma": 0.5}, 2.0, 0.025),
        ({"kind": "constant"}, 7.0, 0.1),
    ],
)
def test_single_schedule_rates(schedule: dict[str, Any], epoch: float, expected: float) -> None:
    cfg = training(epochs=10, optimizer={"lr": 0.1}, lr_schedule=schedule)
    assert lr_at(cfg, epoch) == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("kind", ["constant", "cosine", "step", "linear", "exponential", "onecycle"])
def test_single_schedule_is_the_factor_times_optimizer_lr_as_before(kind: str) -> None:
    schedule = LRScheduleConfig(kind=kind, warmup_epochs=1.5, step_epochs=[4, 7], gamma=0.3, final_lr=0.002)
    cfg = TrainingConfig(epochs=9, optimizer={"lr": 0.07}, lr_schedule=schedule)
    for step in range(0, 9 * 8 + 1):
        epoch = step / 8
        assert lr_at(cfg, epoch) == 0.07 * lr_factor(schedule, epoch, 9, 0.07)  # bit for bit


def test_single_schedule_is_still_the_default_and_round_trips() -> None:
    recipe = Recipe()
    assert isinstance(recipe.finetune.lr_schedule, LRScheduleConfig)
    assert Recipe.model_validate(recipe.to_dict()) == recipe


# ------------------------------------------------------------------------------------- pieces


@pytest.mark.parametrize(
    ("epoch", "expected"),
    [
        (0.0, 0.0005),
        (0.99, 0.0005),
        (1.0, 0.0005),  # cosine starts at its lr
        (5.5, 0.000375),  # halfway: (0.0005 + 0.00025) / 2
        (1 + 9 / 3, 0.00025 + 0.00025 * 0.5 * (1 + math.cos(math.pi / 3))),  # a third of the way: 0.0004375
        (9.999, 0.00025 + 0.00025 * 0.5 * (1 + math.cos(math.pi * 8.999 / 9))),
        (10.0, 0.0005),  # warm restart
        (12.5, 0.000375),
        (15.0, 0.00025),
        (16.0, 0.00025),  # after the last piece the rate stays at its end value
    ],
)
def test_warm_restart_pieces(epoch: float, expected: float) -> None:
    cfg = training(epochs=15, lr_schedule=RESTARTS)
    assert lr_at(cfg, epoch) == pytest.approx(expected, rel=1e-9)


def test_piece_kinds_and_an_open_ended_last_piece() -> None:
    cfg = training(
        epochs=12,
        lr_schedule=[
            {"start_epoch": 0, "end_epoch": 2, "kind": "linear", "lr": 0.0, "final_lr": 0.2},  # warmup from 0
            {"start_epoch": 2, "end_epoch": 6, "kind": "step", "lr": 0.2, "step_epochs": [3, 5], "gamma": 0.5},
            {"start_epoch": 6, "end_epoch": 8, "kind": "exponential", "lr": 0.04, "gamma": 0.25},
            {"start_epoch": 8, "kind": "linear", "lr": 0.01, "final_lr": 0.002},  # runs to epochs=12
        ],
    )
    expected = {
        0.0: 0.0,
        0.5: 0.05,
        2.0: 0.2,
        2.9: 0.2,
        3.0: 0.1,
        5.0: 0.05,
        6.0: 0.04,
        7.0: 0.01,
        7.5: 0.005,
        8.0: 0.01,
        10.0: 0.006,
        11.0: 0.004,
        12.0: 0.002,
    }
    for epoch, rate in expected.items():
        assert lr_at(cfg, epoch) == pytest.approx(rate, rel=1e-9, abs=1e-15), epoch


def test_train_epoch_sets_the_piecewise_rate_at_every_step() -> None:
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    cfg = training(epochs=15, optimizer={"lr": 0.0005}, lr_schedule=RESTARTS)
    optimizer = build_optimizer(model, cfg.optimizer)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(4)]
    seen: list[float] = []
    train_epoch(
        model,
        batches,
        optimizer,
        cfg,
        epoch=9,
        steps_per_epoch=4,
        device=torch.device("cpu"),
        after_step=lambda _: seen.append(optimizer.param_groups[0]["lr"]),
    )
    # steps at epochs 9, 9.25, 9.5, 9.75 of the cosine 1 -> 10
    expected = [0.00025 + 0.00025 * 0.5 * (1 + math.cos(math.pi * (8 + k / 4) / 9)) for k in range(4)]
    assert seen == pytest.approx(expected, rel=1e-12)
    seen.clear()
    train_epoch(
        model,
        batches,
        optimizer,
        cfg,
        epoch=10,
        steps_per_epoch=4,
        device=torch.device("cpu"),
        after_step=lambda _: seen.append(optimizer.param_groups[0]["lr"]),
    )
    assert seen[0] == pytest.approx(0.0005)  # the restart


def test_pieces_round_trip_and_show_only_the_values_their_kind_reads() -> None:
    recipe = Recipe.model_validate({"finetune": {"epochs": 15, "lr_schedule": RESTARTS}})
    dumped = recipe.to_dict()["finetune"]["lr_schedule"]
    assert dumped[0] == {"start_epoch": 0.0, "end_epoch": 1.0, "kind": "constant", "lr": 0.0005}
    assert dumped[1] == {"start_epoch": 1.0, "end_epoch": 10.0, "kind": "cosine", "lr": 0.0005, "final_lr": 0.00025}
    assert Recipe.model_validate(recipe.to_dict()) == recipe
    assert recipe.finetune.optimizer.lr == 0.0005  # mirrors the starting rate


# ------------------------------------------------------------------------------------- errors


def _error(finetune: dict[str, Any]) -> str:
    with pytest.raises(WFError) as info:
        validate_recipe({"finetune": finetune, "pruning": {"method": "none"}}, "r.yaml")
    return info.value.message


@pytest.mark.parametrize(
    ("finetune", "words"),
    [
        (
            {"epochs": 15, "lr_schedule": RESTARTS[:1] + [dict(RESTARTS[1], start_epoch=2)] + RESTARTS[2:]},
            ["lr_schedule.1 starts at epoch 2.0", "lr_schedule.0 ends at 1.0", "gaps"],
        ),
        ({"epochs": 15, "lr_schedule": RESTARTS[1:]}, ["lr_schedule.0 starts at epoch 1.0", "starts at 0"]),
        ({"epochs": 20, "lr_schedule": RESTARTS}, ["end at epoch 15.0", "lasts 20 epochs"]),
        ({"epochs": 8, "lr_schedule": RESTARTS}, ["lr_schedule.2 starts at epoch 10.0", "epochs=8"]),
        (
            {"epochs": 15, "lr_schedule": [dict(RESTARTS[0], end_epoch=None)] + RESTARTS[1:]},
            ["lr_schedule.0 has no end_epoch"],
        ),
        (
            {"epochs": 15, "lr_schedule": [dict(RESTARTS[0], final_lr=0.1)] + RESTARTS[1:]},
            ["finetune.lr_schedule.0", "final_lr has no effect on a 'constant' piece"],
        ),
        (
            {"epochs": 15, "lr_schedule": RESTARTS[:2] + [dict(RESTARTS[2], kind="cosine_restart")]},
            ["finetune.lr_schedule.2.kind", "cosine_restart"],
        ),
        (
            {"epochs": 15, "lr_schedule": RESTARTS[:2] + [dict(RESTARTS[2], speed=2)]},
            ["finetune.lr_schedule.2.speed", "unknown field"],
        ),
        (
            {"epochs": 15, "lr_schedule": [dict(RESTARTS[0], end_epoch=0)] + RESTARTS[1:]},
            ["end_epoch (0.0) must be after start_epoch"],
        ),
        (
            {"epochs": 6, "lr_schedule": [{"start_epoch": 0, "kind": "step", "lr": 0.1, "step_epochs": [0]}]},
            ["step epoch 0.0 is outside the piece"],
        ),
        ({"epochs": 15, "optimizer": {"lr": 0.1}, "lr_schedule": RESTARTS}, ["optimizer.lr (0.1) differs", "0.0005"]),
        ({"epochs": 15, "lr_schedule": []}, ["empty list"]),
        ({"epochs": 15, "lr_schedule": {"kind": "cosin"}}, ["finetune.lr_schedule.kind", "cosin"]),
    ],
)
def test_bad_pieces_name_the_piece_and_the_fix(finetune: dict[str, Any], words: list[str]) -> None:
    message = _error(finetune)
    for word in words:
        assert word in message, message


def test_weight_decay_pieces_change_only_the_decayed_group() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    cfg = training(
        epochs=3,
        optimizer={"weight_decay": 0.0005},
        lr_schedule=[
            {"start_epoch": 0, "end_epoch": 2, "kind": "constant", "lr": 0.01},
            {"start_epoch": 2, "kind": "constant", "lr": 0.01, "weight_decay": 0.0},
        ],
    )
    optimizer = build_optimizer(model, cfg.optimizer)
    batches = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(2)]
    decays: list[tuple[float, float]] = []

    def record(_):
        return decays.append((optimizer.param_groups[0]["weight_decay"], optimizer.param_groups[1]["weight_decay"]))

    for epoch in range(3):
        train_epoch(
            model,
            batches,
            optimizer,
            cfg,
            epoch=epoch,
            steps_per_epoch=2,
            device=torch.device("cpu"),
            after_step=record,
        )
    assert decays == [(0.0005, 0.0)] * 4 + [(0.0, 0.0)] * 2


def test_single_schedule_never_touches_weight_decay() -> None:
    model = nn.Linear(3, 2)
    cfg = training(epochs=1, optimizer={"weight_decay": 0.001})
    optimizer = build_optimizer(model, cfg.optimizer)
    optimizer.param_groups[0]["weight_decay"] = 0.123  # whatever the caller set stays
    train_epoch(
        model,
        [(torch.randn(2, 3), torch.tensor([0, 1]))],
        optimizer,
        cfg,
        epoch=0,
        steps_per_epoch=1,
        device=torch.device("cpu"),
    )
    assert optimizer.param_groups[0]["weight_decay"] == 0.123


def test_optimizer_lr_mirrors_a_warmup_from_zero() -> None:
    pieces = [
        {"start_epoch": 0, "end_epoch": 1, "kind": "linear", "lr": 0.0, "final_lr": 0.01},
        {"start_epoch": 1, "kind": "cosine", "lr": 0.01},
    ]
    cfg = training(epochs=4, lr_schedule=pieces)
    assert cfg.optimizer.lr == 0.01
    assert TrainingConfig.model_validate(cfg.model_dump()) == cfg
    with pytest.raises(ValueError, match="differs from the rate of the first lr_schedule piece"):
        training(epochs=4, optimizer={"lr": 0.5}, lr_schedule=pieces)
