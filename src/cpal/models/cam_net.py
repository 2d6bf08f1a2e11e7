"""The classification network that produces class activation maps (CAMs).

A 1x1 classifier without bias on the backbone's last feature map gives one map per class;
the image score is its global average (so the map is exactly what the score is made of).
Training and inference share this one module and its state dict.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import ModelConfig
from cpal.models.resnet import ResNet
from cpal.models.weights import LoadReport, load_backbone_weights


@dataclass
class CAMOutput:
    logits: Tensor  # (B, C) image scores
    cam: Tensor  # (B, C, h, w) raw class maps
    features: list[Tensor]  # backbone stage outputs layer1..layer4


class CAMNet(nn.Module):
    def __init__(self, backbone: ResNet, num_classes: int) -> None:
        super().__init__()
        self.backbone = backbone
        self.classifier = nn.Conv2d(backbone.num_features, num_classes, 1, bias=False)
        nn.init.kaiming_normal_(self.classifier.weight, mode="fan_out", nonlinearity="relu")

    @property
    def output_stride(self) -> int:
        return self.backbone.output_stride

    def forward(self, x: Tensor) -> CAMOutput:
        features = self.backbone(x)
        cam = self.classifier(features[-1])
        return CAMOutput(logits=cam.mean(dim=(2, 3)), cam=cam, features=features)

    def param_groups(self) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
        """(backbone, new layers): the references train new layers with a 10x learning rate."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        head = [p for p in self.classifier.parameters() if p.requires_grad]
        return backbone, head


def classification_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Multilabel soft margin loss (mean over classes and images), as the references use."""
    return F.multilabel_soft_margin_loss(logits, labels)


def build_cam_net(cfg: ModelConfig, num_classes: int) -> tuple[CAMNet, LoadReport | None]:
    backbone = ResNet(
        cfg.arch,
        width=cfg.width,
        output_stride=cfg.output_stride,
        frozen_bn=cfg.frozen_bn,
        frozen_stages=cfg.frozen_stages,
    )
    report = load_backbone_weights(backbone, cfg.pretrained) if cfg.pretrained else None
    return CAMNet(backbone, num_classes), report


def normalized_cam(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(cam) divided by its per-map maximum: values in [0, 1]."""
    cam = F.relu(cam)
    peak = cam.flatten(2).amax(dim=2)[..., None, None]
    return cam / (peak + eps)
