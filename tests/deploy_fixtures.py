"""Tiny models and data shared by the deploy/report tests (export, validate, gates, report)."""
from __future__ import annotations

from typing import cast

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv+BN+relu twice, then a linear head: enough to exercise BN folding and name mapping."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, widths: tuple[int, int] = (8, 16)) -> None:
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(in_channels, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.block = nn.Sequential(nn.Conv2d(c1, c2, 3, padding=1, bias=False), nn.BatchNorm2d(c2), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(c2 * 4, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.pool(self.block(x))
        return self.fc(torch.flatten(x, 1))


def make_sparse_model(sparsity: float = 0.9, seed: int = 0, in_channels: int = 1):
    """A TinyNet with non-trivial BN statistics and the smallest `sparsity` of each conv/linear weight zeroed.

    Returns (model, masks) with masks True = kept.
    """
    torch.manual_seed(seed)
    model = TinyNet(in_channels)
    masks: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.uniform_(-0.1, 0.1)
                module.momentum = None  # cumulative average: one pass sets the running statistics
        # Calibrated BN statistics (not the 0/1 defaults, so folding really changes the weights) and a
        # head fitted by ridge regression on digits features: predictions vary with the input, so
        # accuracy and agreement checks are not vacuous (an untrained net predicts one class).
        model.train()
        model(torch.cat([digits_images(128, channels=in_channels)[0], random_images(128, channels=in_channels)]))
        model.eval()
        images, labels = digits_images(600, channels=in_channels)
        features = torch.flatten(model.pool(model.block(torch.relu(model.bn1(model.conv1(images))))), 1)
        features = torch.cat([features, torch.ones(features.shape[0], 1)], 1).double()
        targets = nn.functional.one_hot(labels, 10).double()
        solution = torch.linalg.solve(features.T @ features + 1e-3 * torch.eye(features.shape[1]), features.T @ targets)
        model.fc.weight.copy_(solution[:-1].T.float())
        model.fc.bias.copy_(solution[-1].float())
        for name, param in model.named_parameters():
            if param.dim() >= 2:
                k = int(round(sparsity * param.numel()))
                if k == 0:
                    mask = torch.ones_like(param, dtype=torch.bool)
                else:
                    mask = param.abs() > param.abs().flatten().kthvalue(k).values
                param.mul_(mask)
                masks[name] = mask
    return model.eval(), masks


def remove_channels(model: TinyNet, keep1: list[int], keep2: list[int]) -> TinyNet:
    """Channel surgery by hand: a physically narrower TinyNet holding the kept channels' weights.

    Output channels `keep1` of conv1 (with bn1 and the matching input channels of the block conv) and
    `keep2` of the block conv (with its BN and the matching fc columns) stay; the rest is removed.
    """
    slim = TinyNet(model.conv1.in_channels, model.fc.out_features, widths=(len(keep1), len(keep2))).eval()
    i1, i2 = torch.tensor(keep1), torch.tensor(keep2)
    fc_columns = (i2[:, None] * 4 + torch.arange(4)).reshape(-1)  # flatten of (channel, 2, 2)

    def copy_bn(target: nn.BatchNorm2d, source: nn.BatchNorm2d, index: torch.Tensor) -> None:
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(target, name).copy_(getattr(source, name)[index])

    with torch.no_grad():
        slim.conv1.weight.copy_(model.conv1.weight[i1])
        copy_bn(slim.bn1, model.bn1, i1)
        cast(nn.Conv2d, slim.block[0]).weight.copy_(cast(nn.Conv2d, model.block[0]).weight[i2][:, i1])
        copy_bn(cast(nn.BatchNorm2d, slim.block[1]), cast(nn.BatchNorm2d, model.block[1]), i2)
        slim.fc.weight.copy_(model.fc.weight[:, fc_columns])
        slim.fc.bias.copy_(model.fc.bias)
    return slim


def digits_images(n: int = 64, size: int = 8, channels: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Real images: scikit-learn's 8x8 digits (shipped in the wheel), scaled to [0, 1], shape n x C x 8 x 8."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images[:n] / 16.0, dtype=torch.float32).unsqueeze(1).repeat(1, channels, 1, 1)
    labels = torch.tensor(digits.target[:n], dtype=torch.long)
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    return images, labels


def random_images(n: int, size: int = 8, channels: int = 1, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, channels, size, size, generator=generator)
