"""DeepLab-v3+ (Chen et al., ECCV 2018) on cpal's ResNet-50/101: the modern option of the
segmentation stage.

Encoder: dilated ResNet at output stride 16 (layer4 dilated 2 with multi-grid (1, 2, 4),
as deeplab-pytorch's v3+) and an ASPP of a 1x1 branch, three 3x3 atrous branches (rates
6/12/18; 12/24/36 at OS8) and image pooling, each conv + BN + ReLU, concatenated and
projected by a 1x1 conv + BN + ReLU. Decoder: layer1 features reduced to 48 channels,
concatenated with the upsampled ASPP output, two 3x3 conv + BN + ReLU of 256, then a 1x1
classifier. Logits come out at stride 4 (the inference helpers and the loss resize them).

Head widths follow the trunk's `width` (256 and 48 at width 1) unless given. Multi-grid
(1, 2, 4) applies to trunks whose layer4 has three blocks (ResNet-34/50/101); ResNet-18's
two blocks keep one dilation. The image
pooling branch applies BatchNorm to a 1x1 map: training needs at least 2 images a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.models.registry import SEGMENTERS, build_backbone
from cpal.models.resnet import ArchName, stage_depths
from cpal.models.seg_base import ParamGroup, SegmentationNet, param_group, split_weights

__all__ = ["ASPP", "DeepLabV3Plus"]


def _conv_bn_relu(cin: int, cout: int, kernel: int = 1, dilation: int = 1) -> nn.Sequential:
    pad = dilation * (kernel // 2)
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, padding=pad, dilation=dilation, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class ImagePooling(nn.Module):
    """Global context: average pool, 1x1 conv + BN + ReLU, broadcast back to the map."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = _conv_bn_relu(cin, cout)

    def forward(self, x: Tensor) -> Tensor:
        pooled = self.conv(F.adaptive_avg_pool2d(x, 1))
        return F.interpolate(pooled, size=x.shape[-2:], mode="bilinear", align_corners=False)


class ASPP(nn.Module):
    """DeepLab-v3's ASPP: 1x1, atrous 3x3 at each rate, image pooling; concat; 1x1."""

    def __init__(self, cin: int, channels: int, rates: Sequence[int]) -> None:
        super().__init__()
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            [_conv_bn_relu(cin, channels)]
            + [_conv_bn_relu(cin, channels, 3, r) for r in self.rates]
            + [ImagePooling(cin, channels)]
        )
        self.project = _conv_bn_relu(channels * len(self.branches), channels)

    def forward(self, x: Tensor) -> Tensor:
        return self.project(torch.cat([b(x) for b in self.branches], dim=1))


class DeepLabV3Plus(SegmentationNet):
    """ResNet + ASPP encoder, layer1 decoder; `forward` as `SegmentationNet`.

    MSC is off by default (`msc_scales=(1.0,)`); pass (1.0, 0.75, 0.5) for
    deeplab-pytorch's multi-scale training. Trunk BatchNorm trains by default (v3+ is
    trained with batch statistics); `frozen_bn=True` fixes it as DeepLab-v2's recipe.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        arch: ArchName = "resnet101",
        width: float = 1.0,
        output_stride: int = 16,
        rates: Sequence[int] | None = None,
        multi_grid: Sequence[int] | Literal["auto"] | None = "auto",
        aspp_channels: int | None = None,
        low_level_channels: int | None = None,
        msc_scales: Sequence[float] = (1.0,),
        frozen_bn: bool = False,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLab-v3+ output_stride must be 8 or 16, got {output_stride}")
        if rates is None:
            rates = (6, 12, 18) if output_stride == 16 else (12, 24, 36)
        if multi_grid == "auto":  # DeepLab-v3's (1, 2, 4) needs layer4's three blocks
            multi_grid = (1, 2, 4) if stage_depths(arch)[3] == 3 else None
        self.num_classes = num_classes
        self.msc_scales = tuple(msc_scales)
        self.backbone = build_backbone(
            arch, width=width, output_stride=output_stride,  # type: ignore[arg-type]
            dilations=(1, 2) if output_stride == 16 else (2, 4), multi_grid=multi_grid,
            frozen_bn=frozen_bn, frozen_stages=frozen_stages,
        )
        channels = aspp_channels or max(8, round(256 * width))
        low = low_level_channels or max(4, round(48 * width))
        self.aspp = ASPP(self.backbone.num_features, channels, rates)
        self.reduce = _conv_bn_relu(self.backbone.stage_channels[0], low)
        self.decoder = nn.Sequential(
            _conv_bn_relu(channels + low, channels, 3),
            _conv_bn_relu(channels, channels, 3),
            nn.Conv2d(channels, num_classes, 1),
        )
        for m in [self.aspp, self.reduce, self.decoder]:
            for conv in m.modules():
                if isinstance(conv, nn.Conv2d):
                    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
                    if conv.bias is not None:
                        nn.init.zeros_(conv.bias)
        self._init_trunk(frozen_bn)

    @property
    def logit_stride(self) -> int:
        return self.backbone.stage_strides[0]

    def forward_logits(self, x: Tensor) -> Tensor:
        features = self.backbone(x)
        low = self.reduce(features[0])
        high = F.interpolate(
            self.aspp(features[-1]), size=low.shape[-2:], mode="bilinear", align_corners=False
        )
        return self.decoder(torch.cat([high, low], dim=1))

    def head_modules(self) -> list[nn.Module]:
        return [self.aspp, self.reduce, self.decoder]

    def param_groups(self, lr: float, weight_decay: float) -> list[ParamGroup]:
        """Trunk at lr; the new layers (ASPP, decoder) at 10x; biases and BatchNorm
        affines without weight decay."""
        head = nn.ModuleList(self.head_modules())
        weights, others = split_weights(head)
        return [
            *self.trunk_param_groups(lr, weight_decay),
            param_group("head_weight", weights, lr, 10.0, weight_decay),
            param_group("head_norm_bias", others, lr, 10.0, 0.0),
        ]


SEGMENTERS.register("deeplab_v3plus", DeepLabV3Plus, aliases=("deeplabv3plus", "deeplab_v3_plus"))
