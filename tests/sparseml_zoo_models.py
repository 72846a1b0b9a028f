"""Small models whose parameter names follow SparseML's own model zoo (`sections.*`, `classifier.fc`).

SparseML's recipe cards name parameters of its zoo architectures (e.g. ``sections.0.0.conv1.weight`` in
its ResNet-50, ``sections.1.0.point.conv.weight`` in its MobileNet), which torchvision models do not have.
These factories rebuild those layouts with tiny widths, so tests can convert such recipes with
``model.name: tests.sparseml_zoo_models:zoo_resnet50`` and run them quickly.
"""

from __future__ import annotations

from torch import nn


class _ConvBN(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, groups: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(cout)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.bn(self.conv(x))


class _Bottleneck(nn.Module):
    """Names as in SparseML's ResNet-50: conv1/bn1, conv2/bn2, conv3/bn3 and identity.conv/identity.bn."""

    def __init__(self, cin: int, mid: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, mid, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv2, self.bn2 = nn.Conv2d(mid, mid, 3, stride, 1, bias=False), nn.BatchNorm2d(mid)
        self.conv3, self.bn3 = nn.Conv2d(mid, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.identity = _ConvBN(cin, cout, 1, stride) if (cin != cout or stride != 1) else None
        self.act = nn.ReLU()

    def forward(self, x):  # noqa: ANN001, ANN201
        out = self.act(self.bn1(self.conv1(x)))
        out = self.act(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.act(out + (self.identity(x) if self.identity is not None else x))


class _Classifier(nn.Module):
    def __init__(self, cin: int, num_classes: int) -> None:
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.fc(self.pool(x).flatten(1))


class ZooResNet50(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.input = _ConvBN(in_channels, width, 3)
        blocks, sections, cin = (3, 4, 6, 3), [], width
        for index, count in enumerate(blocks):
            mid, cout = width * 2**index, width * 4 * 2**index
            layers = [
                _Bottleneck(cin if j == 0 else cout, mid, cout, 2 if (j == 0 and index > 0) else 1)
                for j in range(count)
            ]
            sections.append(nn.Sequential(*layers))
            cin = cout
        self.sections = nn.Sequential(*sections)
        self.classifier = _Classifier(cin, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.classifier(self.sections(nn.functional.relu(self.input(x))))


class _DepthwiseSeparable(nn.Module):
    """Names as in SparseML's MobileNet (v1): depth.conv/depth.bn then point.conv/point.bn."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.depth = _ConvBN(cin, cin, 3, stride, groups=cin)
        self.point = _ConvBN(cin, cout, 1)

    def forward(self, x):  # noqa: ANN001, ANN201
        return nn.functional.relu(self.point(nn.functional.relu(self.depth(x))))


class ZooMobileNet(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: int = 4) -> None:
        super().__init__()
        self.input = _ConvBN(in_channels, width, 3)
        sizes, sections, cin = (1, 2, 2, 6, 2), [], width
        for index, count in enumerate(sizes):
            cout = width * 2 ** (index + 1)
            sections.append(
                nn.Sequential(
                    *[
                        _DepthwiseSeparable(cin if j == 0 else cout, cout, 2 if j == 0 and index else 1)
                        for j in range(count)
                    ]
                )
            )
            cin = cout
        self.sections = nn.Sequential(*sections)
        self.classifier = _Classifier(cin, num_classes)

    def forward(self, x):  # noqa: ANN001, ANN201
        return self.classifier(self.sections(nn.functional.relu(self.input(x))))


def zoo_resnet50(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ZooResNet50(num_classes, in_channels)


def zoo_mobilenet(num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    return ZooMobileNet(num_classes, in_channels)
