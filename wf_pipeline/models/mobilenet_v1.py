"""MobileNetV1 (Howard et al. 2017): depthwise-separable convolutions, as pruned in the WoodFisher paper."""
from __future__ import annotations

import torch
from torch import nn

# (output channels, stride) of each depthwise-separable block, for 224x224 ImageNet inputs.
_IMAGENET_BLOCKS = [
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
]


def _conv_bn(inp: int, out: int, stride: int, groups: int = 1, kernel: int = 3) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, kernel, stride, kernel // 2, groups=groups, bias=False),
        nn.BatchNorm2d(out),
        nn.ReLU(inplace=True),
    )


class MobileNetV1(nn.Module):
    def __init__(
        self, num_classes: int = 1000, in_channels: int = 3, width_mult: float = 1.0, small_input: bool = False
    ) -> None:
        super().__init__()
        first = int(32 * width_mult)
        # Small (28-32 px) inputs keep resolution early, as CIFAR variants of the network do.
        layers = [_conv_bn(in_channels, first, 1 if small_input else 2)]
        channels = first
        for out, stride in _IMAGENET_BLOCKS:
            out = int(out * width_mult)
            if small_input and stride == 2 and out <= int(128 * width_mult):
                stride = 1
            layers.append(_conv_bn(channels, channels, stride, groups=channels))  # depthwise
            layers.append(_conv_bn(channels, out, 1, kernel=1))  # pointwise
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.pool(self.features(x)), 1))


def mobilenetv1(num_classes: int = 1000, in_channels: int = 3, **kwargs: object) -> MobileNetV1:
    return MobileNetV1(num_classes, in_channels, **kwargs)  # type: ignore[arg-type]
