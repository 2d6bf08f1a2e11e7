"""Backbones and segmentation networks by name.

A backbone is a builder `(**kwargs) -> ResNet-like trunk` (stage outputs layer1..4 with
`stage_channels`, `stage_strides`, `output_stride`, torchvision key names for ImageNet
files); the ResNets register themselves in `cpal.models.resnet`. A segmentation network
is a `SegmentationNet` class; DeepLab-v2 and -v3+ register in their modules.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cpal.registry import Registry

if TYPE_CHECKING:
    from cpal.models.resnet import ResNet
    from cpal.models.seg_base import SegmentationNet

BACKBONES: Registry[Callable[..., ResNet]] = Registry(
    "backbone", builtins=("cpal.models.resnet",))


def _segmenter_key(name: str) -> str:
    """'DeepLab-v2', 'deeplab_v3+' ... -> lower case, '_' for '-', 'plus' for '+'."""
    return name.strip().lower().replace("-", "_").replace("+", "plus")


SEGMENTERS: Registry[type[SegmentationNet]] = Registry(
    "segmentation network", normalize=_segmenter_key,
    builtins=("cpal.models.deeplab_v2", "cpal.models.deeplab_v3plus"),
)


def build_backbone(arch: str, **kwargs: Any) -> ResNet:
    """The trunk registered as `arch`, built with `kwargs` (width, output_stride,
    frozen_bn, frozen_stages; dilations and multi_grid for segmentation trunks)."""
    return BACKBONES.get(arch)(**kwargs)
