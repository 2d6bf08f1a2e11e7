"""Segmentation networks by name: `build_segmenter("deeplab_v2", 21, pretrained=...)`.

The one entry point for the pipeline and the trainer: it builds the network from keyword
arguments (every constructor argument of the class) and loads the ImageNet trunk file
through the shared weights loader, returning its report (leaks included) as
`build_cam_net` does.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cpal.models.deeplab_v2 import DeepLabV2
from cpal.models.deeplab_v3plus import DeepLabV3Plus
from cpal.models.seg_base import SegmentationNet, sgd_param_groups
from cpal.models.weights import LoadReport

__all__ = ["SEGMENTERS", "SegmentationNet", "build_segmenter", "sgd_param_groups"]

SEGMENTERS: dict[str, type[SegmentationNet]] = {
    "deeplab_v2": DeepLabV2,
    "deeplab_v3plus": DeepLabV3Plus,
}


def canonical_name(name: str) -> str:
    """'DeepLab-v2', 'deeplabv2', 'deeplab_v3+' ... -> the registry's key."""
    key = name.strip().lower().replace("-", "_").replace("+", "plus")
    aliases = {"deeplabv2": "deeplab_v2", "deeplabv3plus": "deeplab_v3plus",
               "deeplab_v3_plus": "deeplab_v3plus"}
    key = aliases.get(key, key)
    if key not in SEGMENTERS:
        raise ValueError(f"unknown segmentation network {name!r}; choose one of "
                         f"{', '.join(SEGMENTERS)}")
    return key


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
    cls = SEGMENTERS[canonical_name(name)]
    try:
        model = cls(num_classes, **kwargs)
    except TypeError as exc:  # an argument this architecture does not take, named
        raise ValueError(f"{cls.__name__}: {exc}") from exc
    report = model.load_trunk(pretrained, allow_leak=allow_leak) if pretrained else None
    return model, report
