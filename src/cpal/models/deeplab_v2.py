"""DeepLab-v2 as in deeplab-pytorch's VOC recipe (the segmentation stage of IRN, SIPE, AMN,
CLIP-ES and CPAL): a dilated ResNet-101 at output stride 8 and an ASPP of four 3x3
classifiers (rates 6/12/18/24, with bias) whose logits are summed, trained and tested
through MSC (scales 1, 0.75, 0.5 and their max; see `seg_base.msc_logits`).

The trunk is cpal's torchvision-layout ResNet (stride on the 3x3 convolution, "v1.5"),
so ImageNet torchvision / timm files load by key. deeplab-pytorch's own trunk is the Caffe
ResNet (stride on the first 1x1, max-pool with ceil mode, BGR 0-255 input): its COCO init
is a pixel-label leak anyway (see `cpal.models.weights`) and is not converted here.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from cpal.models.registry import SEGMENTERS, build_backbone
from cpal.models.resnet import ArchName
from cpal.models.seg_base import ParamGroup, SegmentationNet, param_group

__all__ = ["DeepLabV2", "SummedASPP"]


class SummedASPP(nn.Module):
    """Parallel dilated 3x3 convolutions straight to class logits, summed (DeepLab-v2's
    ASPP-L: no BatchNorm, no fusion layer, each branch a classifier with its own bias)."""

    def __init__(self, in_channels: int, num_classes: int, rates: Sequence[int]) -> None:
        super().__init__()
        if not rates:
            raise ValueError("ASPP needs at least one rate")
        self.rates = tuple(rates)
        self.branches = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True)
            for r in self.rates
        )
        for conv in self.branches:  # deeplab-pytorch's init of the new classifiers
            nn.init.normal_(conv.weight, mean=0.0, std=0.01)
            nn.init.zeros_(conv.bias)

    def forward(self, x: Tensor) -> Tensor:
        out = self.branches[0](x)
        for branch in self.branches[1:]:
            out = out + branch(x)
        return out


class DeepLabV2(SegmentationNet):
    """Dilated ResNet + summed ASPP; `forward` as `SegmentationNet` (MSC max / all outputs).

    Defaults are the VOC recipe: resnet101, OS8 with layer3/layer4 dilated 2/4, rates
    6/12/18/24, MSC scales (1, 0.75, 0.5), trunk BatchNorm fixed. `output_stride=16`
    keeps layer3 strided and dilates layer4 by 2. `width` scales the trunk for CPU runs;
    resnet18/34 trunks work too (CPU-sized demos).
    """

    def __init__(
        self,
        num_classes: int,
        *,
        arch: ArchName = "resnet101",
        width: float = 1.0,
        output_stride: int = 8,
        rates: Sequence[int] = (6, 12, 18, 24),
        msc_scales: Sequence[float] = (1.0, 0.75, 0.5),
        frozen_bn: bool = True,
        frozen_stages: int = 0,
    ) -> None:
        super().__init__()
        if output_stride not in (8, 16):
            raise ValueError(f"DeepLab-v2 output_stride must be 8 or 16, got {output_stride}")
        self.num_classes = num_classes
        self.msc_scales = tuple(msc_scales)
        self.backbone = build_backbone(
            arch, width=width, output_stride=output_stride,  # type: ignore[arg-type]
            dilations=(2, 4) if output_stride == 8 else (1, 2),
            frozen_bn=frozen_bn, frozen_stages=frozen_stages,
        )
        self.aspp = SummedASPP(self.backbone.num_features, num_classes, rates)
        self._init_trunk(frozen_bn)

    @property
    def logit_stride(self) -> int:
        return self.backbone.output_stride

    def forward_logits(self, x: Tensor) -> Tensor:
        return self.aspp(self.backbone(x)[-1])

    def param_groups(self, lr: float, weight_decay: float) -> list[ParamGroup]:
        """deeplab-pytorch's groups (Caffe's lr_mult / decay_mult): trunk at lr, ASPP
        weights at 10x, ASPP biases at 20x without weight decay. Fixed BatchNorm is in no
        group; a trainable one goes in `trunk_norm` (lr, no weight decay)."""
        aspp_weights = [b.weight for b in self.aspp.branches]
        aspp_biases = [b.bias for b in self.aspp.branches]
        return [
            *self.trunk_param_groups(lr, weight_decay),
            param_group("aspp_weight", aspp_weights, lr, 10.0, weight_decay),
            param_group("aspp_bias", aspp_biases, lr, 20.0, 0.0),
        ]


SEGMENTERS.register("deeplab_v2", DeepLabV2, aliases=("deeplabv2",))
