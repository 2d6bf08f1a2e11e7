"""Backbones, localisation networks and segmentation networks by name.

A backbone is a builder `(**kwargs) -> ResNet-like trunk` (stage outputs layer1..4 with
`stage_channels`, `stage_strides`, `output_stride`, torchvision key names for ImageNet
files); the ResNets register themselves in `cpal.models.resnet`. Transformer trunks are
named in their own registries (`VIT_ARCHS` in `cpal.models.vit`, `CLIP_ARCHS` in
`cpal.models.clip`): they return tokens, not four stages, so they are not backbones.

A localisation network (`NETWORKS`) is what a method trains and makes maps with: the CAM
network on a ResNet, MCTformer on a DeiT, CLIP-ES on CLIP. A method names its network
(`MethodSpec.network`); `cpal.models.cam_net.build_network` builds it from the config.
A segmentation network is a `SegmentationNet` class; DeepLab-v2 and -v3+ register in their
modules.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cpal.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from torch import nn

    from cpal.models.resnet import ResNet
    from cpal.models.seg_base import SegmentationNet
    from cpal.models.weights import LoadReport

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


NetworkBuilder = Callable[..., "tuple[nn.Module, LoadReport | None]"]
"""(config, num_classes, *, pretrained) -> (network, report of its pretrained file)."""


@dataclass(frozen=True)
class NetworkSpec:
    """A localisation network as the pipeline sees it."""

    name: str
    build: NetworkBuilder
    archs: Callable[[], Registry[Any]]
    """The registry of the trunks it runs on (`model.arch`), looked up on use."""
    frozen_trunk: bool = False
    """The trunk never trains and is not stored in checkpoints: a trained network is
    rebuilt from `model.pretrained` and the checkpoint's other tensors (CLIP-ES + CPAL)."""
    map_sections: tuple[str, ...] = ()
    """Config sections that shape its maps (recorded with every maps folder)."""


NETWORKS: Registry[NetworkSpec] = Registry(
    "network", builtins=("cpal.models.cam_net", "cpal.models.mctformer", "cpal.models.clip_es"),
)


def register_network(spec: NetworkSpec) -> NetworkSpec:
    return NETWORKS.register(spec.name, spec)


def _arch_registries() -> list[Registry[Any]]:
    from cpal.models.clip import CLIP_ARCHS
    from cpal.models.vit import VIT_ARCHS

    return [BACKBONES, VIT_ARCHS, CLIP_ARCHS]


def check_arch(name: str, key: str) -> str:
    """The registered name of trunk `name` among every trunk registry, or a ConfigError
    for config key `key` naming the close ones."""
    registries = _arch_registries()
    for registry in registries:
        if name in registry:
            return registry.canonical(name)
    names = [n for registry in registries for n in registry.names()]
    close = difflib.get_close_matches(str(name), names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise UnknownNameError(f"'{key}': unknown arch {name!r}{hint}; choose one of "
                           f"{', '.join(names)}")
