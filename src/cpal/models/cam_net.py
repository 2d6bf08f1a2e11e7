"""The classification network that produces class activation maps (CAMs).

A 1x1 classifier without bias on the backbone's last feature map gives one map per class;
the image score is its global average (so the map is exactly what the score is made of).
Training and inference share this one module and its state dict.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import Config, ModelConfig
from cpal.methods import method_spec
from cpal.models.registry import (
    BACKBONES,
    NETWORKS,
    NetworkSpec,
    build_backbone,
    register_network,
)
from cpal.models.resnet import ResNet
from cpal.models.weights import LoadReport, load_backbone_weights
from cpal.prototypes.module import CPALModule, CPALOutput
from cpal.prototypes.pooling import normalized_cam

__all__ = ["CAMNet", "CAMOutput", "LocalisationNet", "MapNorm", "build_cam_net",
           "build_cpal_module", "build_network", "classification_loss", "network_spec",
           "normalized_cam", "valid_area"]

MapNorm = Literal["max", "min_max"]
"""Per-class normalisation of summed maps: / max (IRN, SIPE) or (x - min) / (max - min)
(MCTformer, CLIP-ES)."""


@dataclass
class CAMOutput:
    """What every localisation network returns (the CAM net, MCTformer, CLIP-ES)."""

    logits: Tensor  # (B, C) image scores
    cam: Tensor  # (B, C, h, w) raw class maps: what the prototype branch reads
    features: list[Tensor]  # maps for the prototype branch (ResNet stages, patch tokens)
    cpal: CPALOutput | None = None  # prototype branch, when the net has one and labels were given
    maps: Tensor | None = None
    """The network's own localisation maps (B, C, h, w) >= 0 at the CAM's grid, where
    they are not relu(cam) (MCTformer's attention maps, CLIP-ES's refined GradCAM):
    inference writes these as the `cam` kind."""
    scores: dict[str, Tensor] = field(default_factory=dict)
    """Image scores by loss-term name, each trained by a multilabel soft margin loss
    (the CAM net: cls; MCTformer: cls (class tokens) and patch; frozen CLIP-ES: none)."""

    @property
    def localisation(self) -> Tensor:
        """The `cam` kind of map: the network's own maps, else relu(CAM)."""
        return self.maps if self.maps is not None else F.relu(self.cam)


class LocalisationNet(Protocol):
    """What training and inference need of a network (`CAMNet`, `MCTformer`, `ClipEs`)."""

    cpal: CPALModule | None
    align_to_stride: bool
    map_norm: MapNorm

    @property
    def output_stride(self) -> int: ...

    def __call__(self, x: Tensor, labels: Tensor | None = None,
                 sample_ids: Tensor | None = None, valid: Tensor | None = None) -> CAMOutput:
        """Training forward: the prototype branch runs when labels are given."""
        ...

    def inference(self, x: Tensor, labels: Tensor | None = None) -> CAMOutput: ...

    def eval(self) -> nn.Module: ...


class CAMNet(nn.Module):
    """Backbone + 1x1 classifier, and optionally the CPAL prototype module.

    Training and inference use this one module (and one state dict, support bank included).
    """

    align_to_stride = True
    """Maps are upsampled on the stride grid, then cropped (IRN); transformers resize
    their patch grid straight to the image instead."""
    map_norm: MapNorm = "max"
    """How the summed maps are normalised per class (IRN: divided by the maximum)."""

    def __init__(self, backbone: ResNet, num_classes: int, cpal: CPALModule | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.num_features, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out", nonlinearity="relu")
        self.cpal = cpal

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def inference(self, x: Tensor, labels: Tensor | None = None) -> CAMOutput:
        """The forward pass maps are made from (labels: the images' classes, which some
        networks' maps need; the CAM's do not)."""
        return self(x)

    def forward(
        self,
        x: Tensor,
        labels: Tensor | None = None,
        sample_ids: Tensor | None = None,
        valid: Tensor | None = None,
    ) -> CAMOutput:
        """labels: run the prototype branch (training); sample_ids: dataset indices of the
        batch, the bank's provenance; valid (B, H, W): 1 on image pixels, 0 on a training
        crop's padding (SIPE's valid mask), resized to the CAM grid by nearest neighbour."""
        features = self.backbone(x)
        cam = self.classifier(features[-1])
        logits = cam.mean(dim=(2, 3))
        out = CAMOutput(logits=logits, cam=cam, features=features, scores={"cls": logits})
        if self.cpal is not None and labels is not None:
            out.cpal = self.cpal(features, cam, labels, sample_ids, valid_area(valid, cam), x)
        return out

    def param_groups(self) -> list[tuple[list[nn.Parameter], str]]:
        """(parameters, role) with role backbone, head (the classifier, which the
        references train with a 10x learning rate) or prototype (the CPAL branch)."""
        groups = [
            ([p for p in self.backbone.parameters() if p.requires_grad], "backbone"),
            ([p for p in self.classifier.parameters() if p.requires_grad], "head"),
        ]
        if self.cpal is not None:
            groups.append(([p for p in self.cpal.parameters() if p.requires_grad], "prototype"))
        return [(params, role) for params, role in groups if params]


def valid_area(valid: Tensor | None, cam: Tensor) -> Tensor | None:
    """A crop's image pixels (B, H, W) at the CAM's grid (B, 1, h, w), nearest neighbour."""
    if valid is None:
        return None
    return F.interpolate(valid[:, None].to(cam.dtype), size=cam.shape[-2:], mode="nearest")


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft margin loss (mean over classes and images), as the references use."""
    return F.multilabel_soft_margin_loss(logits, labels)


def build_cam_net(
    cfg: ModelConfig, num_classes: int, *, pretrained: bool = True
) -> tuple[CAMNet, LoadReport | None]:
    backbone = build_backbone(
        cfg.arch,
        width=cfg.width,
        output_stride=cfg.output_stride,
        frozen_bn=cfg.frozen_bn,
        frozen_stages=cfg.frozen_stages,
    )
    report = None
    if pretrained and cfg.pretrained:
        report = load_backbone_weights(
            backbone, cfg.pretrained, allow_leak=cfg.pretrained_allow_leak
        )
    return CAMNet(backbone, num_classes), report


def build_cpal_module(config: Config, in_channels: Sequence[int], num_classes: int
                      ) -> CPALModule | None:
    """The prototype branch of the config's method on maps of `in_channels` channels
    (any network's), or None for a method without one."""
    branch = method_spec(config.method).branch
    if branch is None:
        return None
    return CPALModule(in_channels, num_classes, branch, config.prototype, config.bank,
                      config.awareness, config.alignment, config.loss.self_average)


def _build_cam_network(config: Config, num_classes: int, *, pretrained: bool = True,
                       class_names: Sequence[str] | None = None
                       ) -> tuple[CAMNet, LoadReport | None]:
    net, report = build_cam_net(config.model, num_classes, pretrained=pretrained)
    net.cpal = build_cpal_module(config, net.backbone.stage_channels, num_classes)
    return net, report


register_network(NetworkSpec("cam", _build_cam_network, archs=lambda: BACKBONES))


def build_network(
    config: Config, num_classes: int, *, pretrained: bool = True,
    class_names: Sequence[str] | None = None,
) -> tuple[nn.Module, LoadReport | None]:
    """The network of a run, as its method names it (`MethodSpec.network`): the CAM net,
    MCTformer or CLIP-ES, with the CPAL module for methods with a prototype branch.

    pretrained=False skips the trunk's file (inference loads a checkpoint instead);
    class_names: the foreground classes in order (CLIP-ES's prompts are made of them)."""
    spec = network_spec(config)
    return spec.build(config, num_classes, pretrained=pretrained, class_names=class_names)


def network_spec(config: Config) -> NetworkSpec:
    return NETWORKS.get(method_spec(config.method).network)
