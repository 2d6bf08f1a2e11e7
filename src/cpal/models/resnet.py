"""ResNet-18/34/50/101 with torchvision's parameter names, so its checkpoint files load by key.

Differences from torchvision, all constructor arguments: a width multiplier (CPU-sized
runs), an output stride of 16 (layer4 stride 1, no dilation, as IRN/SIPE/AMN) or 8
(layer3 stride 1 too, with layer3/4 dilated by 2), and frozen BatchNorm statistics.
Output stride 32 is torchvision's own network (the ImageNet classifier's strides), used as
the FLOP reference of benchmarks/paper_scale_estimate.py.

Segmentation trunks set the dilations themselves (`dilations`, `multi_grid`): DeepLab-v2
runs OS8 with layer3/4 dilated by 2/4, DeepLab-v3+ OS16 with layer4's blocks dilated by
2 x (1, 2, 4). Dilation changes no parameter: every variant loads the same ImageNet file.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Literal

from torch import Tensor, nn

from cpal.models.registry import BACKBONES

ArchName = Literal["resnet18", "resnet34", "resnet50", "resnet101"]


def _conv3x3(cin: int, cout: int, stride: int = 1, dilation: int = 1) -> nn.Conv2d:
    return nn.Conv2d(
        cin, cout, 3, stride=stride, padding=dilation, dilation=dilation, bias=False
    )


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(
        self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride, dilation)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, 1, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's "ResNet v1.5" bottleneck: the stride sits on the 3x3 convolution."""

    expansion = 4

    def __init__(
        self, cin: int, planes: int, stride: int, dilation: int, downsample: nn.Module | None
    ) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes, stride, dilation)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * 4)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


_SPECS: dict[str, tuple[type[BasicBlock] | type[Bottleneck], tuple[int, int, int, int]]] = {
    "resnet18": (BasicBlock, (2, 2, 2, 2)),
    "resnet34": (BasicBlock, (3, 4, 6, 3)),
    "resnet50": (Bottleneck, (3, 4, 6, 3)),
    "resnet101": (Bottleneck, (3, 4, 23, 3)),
}


def stage_depths(arch: str) -> tuple[int, int, int, int]:
    """Blocks per stage (layer1..layer4) of `arch`."""
    if arch not in _SPECS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_SPECS)}")
    return _SPECS[arch][1]


class ResNet(nn.Module):
    """A ResNet trunk without the ImageNet classifier; returns all four stage outputs."""

    def __init__(
        self,
        arch: ArchName = "resnet50",
        *,
        width: float = 1.0,
        output_stride: Literal[8, 16, 32] = 16,
        frozen_bn: bool = False,
        frozen_stages: int = 0,
        dilations: tuple[int, int] | None = None,
        multi_grid: Sequence[int] | None = None,
    ) -> None:
        """dilations: of layer3 and layer4 (default: 2, 2 at OS8, none otherwise);
        multi_grid: per-block factors of layer4's dilation (DeepLab-v3's (1, 2, 4))."""
        super().__init__()
        if arch not in _SPECS:
            raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(_SPECS)}")
        if output_stride not in (8, 16, 32):
            raise ValueError(f"output_stride must be 8, 16 or 32, got {output_stride}")
        block, depths = _SPECS[arch]
        if dilations is None:
            dilations = (2, 2) if output_stride == 8 else (1, 1)
        if len(dilations) != 2 or min(dilations) < 1:
            raise ValueError(f"dilations must be two positive ints (layer3, layer4), got "
                             f"{dilations}")
        grid = tuple(multi_grid) if multi_grid is not None else (1,) * depths[3]
        if len(grid) != depths[3] or min(grid) < 1:
            raise ValueError(f"multi_grid needs {depths[3]} positive factors (one per layer4 "
                             f"block of {arch}), got {tuple(grid)}")
        self.arch = arch
        self.output_stride = output_stride
        self.frozen_bn = frozen_bn
        self.frozen_stages = frozen_stages
        planes = [max(1, round(p * width)) for p in (64, 128, 256, 512)]
        stem = planes[0]
        self.conv1 = nn.Conv2d(3, stem, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(stem)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        s3 = 1 if output_stride == 8 else 2
        s4 = 2 if output_stride == 32 else 1
        d3, d4 = dilations
        self._cin = stem
        self.layer1 = self._make_layer(block, planes[0], depths[0], stride=1, dilation=1)
        self.layer2 = self._make_layer(block, planes[1], depths[1], stride=2, dilation=1)
        self.layer3 = self._make_layer(block, planes[2], depths[2], stride=s3, dilation=d3)
        self.layer4 = self._make_layer(
            block, planes[3], depths[3], stride=s4, dilation=[d4 * g for g in grid]
        )
        self.stem_channels = stem
        self.stage_channels: tuple[int, ...] = tuple(p * block.expansion for p in planes)
        self.stage_strides: tuple[int, ...] = (4, 8, 8 * s3, 8 * s3 * s4)
        self._init_weights()
        self._freeze_stages()

    @property
    def num_features(self) -> int:
        return self.stage_channels[-1]

    def _make_layer(
        self, block: type[BasicBlock] | type[Bottleneck], planes: int, depth: int, *,
        stride: int, dilation: int | Sequence[int],
    ) -> nn.Sequential:
        """All blocks of a stage share its dilation (the first one too, as DeepLab), or
        take one each from a sequence (multi-grid)."""
        rates = [dilation] * depth if isinstance(dilation, int) else list(dilation)
        downsample = None
        cout = planes * block.expansion
        if stride != 1 or self._cin != cout:
            downsample = nn.Sequential(
                nn.Conv2d(self._cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)
            )
        layers = [block(self._cin, planes, stride, rates[0], downsample)]
        self._cin = cout
        layers += [block(cout, planes, 1, rate, None) for rate in rates[1:]]
        return nn.Sequential(*layers)

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def stages(self) -> list[Sequence[nn.Module]]:
        """Modules of each stage in order: stem, layer1..layer4."""
        return [
            [self.conv1, self.bn1],
            [self.layer1],
            [self.layer2],
            [self.layer3],
            [self.layer4],
        ]

    def _freeze_stages(self) -> None:
        for modules in self.stages()[: self.frozen_stages]:
            for module in modules:
                for p in module.parameters():
                    p.requires_grad_(False)

    def train(self, mode: bool = True) -> ResNet:
        """Keep frozen BatchNorm (and every BatchNorm inside frozen stages) in eval mode."""
        super().train(mode)
        if mode:
            frozen: list[nn.Module] = []
            if self.frozen_bn:
                frozen = [self]
            else:
                frozen = [m for mods in self.stages()[: self.frozen_stages] for m in mods]
            for root in frozen:
                for m in root.modules():
                    if isinstance(m, nn.BatchNorm2d):
                        m.eval()
        return self

    def forward_stem(self, x: Tensor) -> Tensor:
        """conv1 + bn1 + relu + maxpool: the stride-4 map IRN's branches also read."""
        return self.maxpool(self.relu(self.bn1(self.conv1(x))))

    def forward(self, x: Tensor) -> list[Tensor]:
        x = self.forward_stem(x)
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return [f1, f2, f3, f4]


for _arch in _SPECS:
    BACKBONES.register(_arch, functools.partial(ResNet, _arch))


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


