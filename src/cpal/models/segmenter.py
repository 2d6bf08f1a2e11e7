"""Segmentation networks by name (`cpal.models.registry.SEGMENTERS`):
`build_segmenter("deeplab_v2", 21, pretrained=...)`.

The one entry point for the pipeline and the trainer: it builds the network from keyword
arguments (every constructor argument of the class) and loads the ImageNet trunk file
through the shared weights loader, returning its report (leaks included) as
`build_cam_net` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpal.models.registry import SEGMENTERS
from cpal.models.seg_base import SegmentationNet, sgd_param_groups
from cpal.models.weights import LoadReport

__all__ = ["SEGMENTERS", "SegmentationNet", "build_segmenter", "canonical_name",
           "sgd_param_groups"]


def canonical_name(name: str) -> str:
    """'DeepLab-v2', 'deeplabv2', 'deeplab_v3+' ... -> the registry's key."""
    return SEGMENTERS.canonical(name)


def build_segmenter(
    name: str,
    num_classes: int,
    *,
    pretrained: str | Path | None = None,
    allow_leak: bool = False,
    **kwargs: Any,
) -> tuple[SegmentationNet, LoadReport | None]:
    """The network `name` with `num_classes` outputs (background included) and its trunk
    loaded from `pretrained` when given (an ImageNet ResNet file of the same arch/width).

    kwargs go to the constructor: arch, width, output_stride, rates, msc_scales,
    frozen_bn, frozen_stages (and multi_grid, aspp_channels, low_level_channels for v3+).
    """
    cls = SEGMENTERS.get(name)
    try:
        model = cls(num_classes, **kwargs)
    except TypeError as exc:  # an argument this architecture does not take, named
        raise ValueError(f"{cls.__name__}: {exc}") from exc
    report = model.load_trunk(pretrained, allow_leak=allow_leak) if pretrained else None
    return model, report
