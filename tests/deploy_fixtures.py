"""Tiny models and data shared by the deploy/report tests (export, validate, gates, report)."""
from __future__ import annotations

import torch
from torch import nn


class TinyNet(nn.Module):
    """conv+BN+relu twice, then a linear head: enough to exercise BN folding and name mapping."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.block = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.fc = nn.Linear(16 * 4, num_classes)

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
