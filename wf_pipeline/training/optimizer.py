"""The optimiser of a training run, and setting its learning rate and weight decay step by step."""
from __future__ import annotations

import torch
from torch import nn

from wf_pipeline.recipe.schema import OptimizerConfig

_DECAYED_GROUP = 0  # index of the weight-decayed parameter group in build_optimizer's optimizers


def build_optimizer(model: nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    # No weight decay on BatchNorm and bias parameters, as in the paper's training setups.
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() <= 1]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name == "adam":
        return torch.optim.Adam(groups, lr=cfg.lr)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    # build_optimizer puts the decayed parameters first; norms and biases (the second group) never decay.
    optimizer.param_groups[_DECAYED_GROUP]["weight_decay"] = weight_decay
