"""The classification network that produces class activation maps (CAMs).

A 1x1 classifier without bias on the backbone's last feature map gives one map per class;
the image score is its global average (so the map is exactly what the score is made of).
Training and inference share this one module and its state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import Config, ModelConfig
from cpal.methods import method_spec
from cpal.models.registry import build_backbone
from cpal.models.resnet import ResNet
from cpal.models.weights import LoadReport, load_backbone_weights
from cpal.prototypes.module import CPALModule, CPALOutput
from cpal.prototypes.pooling import normalized_cam

__all__ = ["CAMNet", "CAMOutput", "build_cam_net", "build_network", "classification_loss",
           "normalized_cam"]


@dataclass
class CAMOutput:
    logits: Tensor  # (B, C) image scores
    cam: Tensor  # (B, C, h, w) raw class maps
    features: list[Tensor]  # backbone stage outputs layer1..layer4
    cpal: CPALOutput | None = None  # prototype branch, when the net has one and labels were given


class CAMNet(nn.Module):
    """Backbone + 1x1 classifier, and optionally the CPAL prototype module.

    Training and inference use this one module (and one state dict, support bank included).
    """

    def __init__(self, backbone: ResNet, num_classes: int, cpal: CPALModule | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.num_features, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out", nonlinearity="relu")
        self.cpal = cpal

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

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
        out = CAMOutput(logits=cam.mean(dim=(2, 3)), cam=cam, features=features)
        if self.cpal is not None and labels is not None:
            area = None
            if valid is not None:
                area = F.interpolate(valid[:, None].to(cam.dtype), size=cam.shape[-2:],
                                     mode="nearest")
            out.cpal = self.cpal(features, cam, labels, sample_ids, area, x)
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


def build_network(
    config: Config, num_classes: int, *, pretrained: bool = True
) -> tuple[CAMNet, LoadReport | None]:
    """The network of a run: the CAM net, plus the CPAL module for methods with a
    prototype branch.

    pretrained=False skips the ImageNet file (inference loads a checkpoint instead)."""
    net, report = build_cam_net(config.model, num_classes, pretrained=pretrained)
    branch = method_spec(config.method).branch
    if branch is not None:
        net.cpal = CPALModule(
            net.backbone.stage_channels, num_classes, branch, config.prototype,
            config.bank, config.awareness, config.alignment, config.loss.self_average,
        )
    return net, report
