"""AMN's activation manipulation network (Lee, Kim & Shim, CVPR 2022).

A ResNet trunk (IRN's output stride 16, BatchNorm statistics fixed, the stem frozen),
whose last-stage features are multiplied channel by channel with an encoding of the
image's labels (label conditioning: Linear(classes -> channels) per image), then a
dropout and DeepLab-v2's summed ASPP (rates 6/12/18/24) to 1 + C logits: a per-pixel
classifier trained on IR labels, so its maps come out two-level (whole objects, no
background) instead of a CAM's peaks.

`amn_loss` is its per-pixel classification loss and `amn_maps` how its logits become
maps; both are plain tensor functions so they can be checked by hand.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cpal.models.deeplab_v2 import SummedASPP
from cpal.models.registry import build_backbone
from cpal.models.resnet import ArchName
from cpal.models.seg_base import ParamGroup, param_group

__all__ = ["AMN", "AMNLoss", "amn_loss", "amn_maps", "smoothed_targets"]

IGNORE_INDEX = 255


class AMN(nn.Module):
    """Label-conditioned ResNet + summed ASPP -> (B, 1 + C, h, w) logits (background
    first), for `num_classes` foreground classes."""

    def __init__(
        self,
        num_classes: int,
        *,
        arch: ArchName = "resnet50",
        width: float = 1.0,
        output_stride: int = 16,
        rates: Sequence[int] = (6, 12, 18, 24),
        dropout: float = 0.1,
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"AMN needs at least one foreground class, got {num_classes}")
        self.num_classes = num_classes
        # AMN's trunk: FixedBatchNorm everywhere, conv1 / bn1 never trained.
        self.backbone = build_backbone(arch, width=width, output_stride=output_stride,
                                       frozen_bn=True, frozen_stages=1)
        if not 0 <= dropout < 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        channels = self.backbone.num_features
        self.label_enc = nn.Linear(num_classes, channels)
        self.dropout = dropout
        self.aspp = SummedASPP(channels, num_classes + 1, rates)

    def condition(self, features: Tensor, labels: Tensor) -> Tensor:
        """features (B, K, h, w) x Linear(labels) (B, K): each image's channels scaled by
        the encoding of its own image labels (B, C multi-hot)."""
        if labels.shape != (features.shape[0], self.num_classes):
            raise ValueError(f"labels must be (B, {self.num_classes}) for {features.shape[0]} "
                             f"images, got {tuple(labels.shape)}")
        code = self.label_enc(labels.to(features.dtype))
        return features * code[:, :, None, None]

    def forward(self, images: Tensor, labels: Tensor,
                generators: Sequence[torch.Generator] | None = None) -> Tensor:
        """Logits of `images` conditioned on their `labels` (B, C). In training, dropout
        draws image i's mask from `generators[i]` (on the images' device) when given, so
        that a resumed run draws the masks an uninterrupted one did, however the batch is
        split (nn.Dropout would draw from the global generator, whose state no checkpoint
        holds)."""
        x = self.condition(self.backbone(images)[-1], labels)
        if self.training and self.dropout > 0:
            keep = 1.0 - self.dropout
            if generators is None:
                mask = torch.empty_like(x).bernoulli_(keep)
            else:
                if len(generators) != x.shape[0]:
                    raise ValueError(f"{len(generators)} generators for {x.shape[0]} images")
                mask = torch.cat([torch.empty_like(x[i: i + 1]).bernoulli_(keep, generator=g)
                                  for i, g in enumerate(generators)])
            x = x * mask / keep
        return self.aspp(x)

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float
                     ) -> list[ParamGroup]:
        """AMN's two groups: the trainable trunk at lr (5e-6), the new layers (label
        encoder, ASPP) at lr x head_lr_mult (1e-4), weight decay on both."""
        trunk = [p for p in self.backbone.parameters() if p.requires_grad]
        new = [*self.label_enc.parameters(), *self.aspp.parameters()]
        return [param_group("backbone", trunk, lr, 1.0, weight_decay),
                param_group("new", new, lr, head_lr_mult, weight_decay)]


# ---------------------------------------------------------------------------------------
# The loss


class AMNLoss(NamedTuple):
    total: Tensor  # (fg + bg) / 2, as the reference code computes it
    fg: Tensor  # mean over pixels labelled with a foreground class
    bg: Tensor  # mean over pixels labelled background


def smoothed_targets(labels: Tensor, num_labels: int, eps: float,
                     ignore_index: int = IGNORE_INDEX) -> Tensor:
    """(B, h, w) labels -> (B, K, h, w) label-smoothed targets: 1 - eps on the pixel's
    label, eps / (K - 1) on each of the other K - 1 labels (every class of the dataset,
    present or not); ignored pixels get background's row (no loss reads them)."""
    if num_labels < 2:
        raise ValueError("label smoothing needs at least two labels")
    index = torch.where(labels == ignore_index, torch.zeros_like(labels), labels).long()
    shape = (labels.shape[0], num_labels, *labels.shape[1:])
    targets = torch.full(shape, eps / (num_labels - 1), device=labels.device)
    return targets.scatter_(1, index[:, None], 1.0 - eps)


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over `mask`; 0 (still in the graph) where it is empty, where the reference's
    0 / 0 would make the whole step NaN."""
    weight = mask.to(values.dtype)
    return (values * weight).sum() / weight.sum().clamp(min=1.0)


def amn_loss(logits: Tensor, labels: Tensor, eps: float = 0.4,
             ignore_index: int = IGNORE_INDEX) -> AMNLoss:
    """AMN's per-pixel classification loss: the cross entropy of log_softmax(logits)
    (B, K, h, w) against the label-smoothed targets of `labels` (B, h, w) (0 background,
    1..K-1 classes, `ignore_index` unsure), averaged separately over the foreground and
    over the background pixels; the total is half their sum, as the reference code's
    balanced_cross_entropy (a plain sum would differ under Adam only in the weight of the
    L2 weight decay against the loss)."""
    if logits.ndim != 4 or labels.shape != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(f"logits (B, K, h, w) and labels (B, h, w) of one grid expected, "
                         f"got {tuple(logits.shape)} and {tuple(labels.shape)}")
    log_p = torch.log_softmax(logits.float(), dim=1)
    per_pixel = -(log_p * smoothed_targets(labels, logits.shape[1], eps, ignore_index)).sum(1)
    fg = _masked_mean(per_pixel, (labels != 0) & (labels != ignore_index))
    bg = _masked_mean(per_pixel, labels == 0)
    return AMNLoss(total=(fg + bg) / 2, fg=fg, bg=bg)


# ---------------------------------------------------------------------------------------
# Its maps


def amn_maps(logits: Tensor, present: Tensor, keep: Tensor | None = None,
             eps: float = 1e-5) -> Tensor:
    """One image's AMN maps from its (multi-scale averaged) logits (1 + C, H, W):
    softmax over every label, then the channels of background and the `present` classes
    (indices 1..C into the logits), each min-max normalised over the image, (v - min) /
    (max - min + eps). `keep` (H, W) bool: pixels that keep the softmax itself instead
    (the reference keeps it where its IR labels say background, so that stretching a
    channel to [0, 1] cannot lift the background). Returns (1 + len(present), H, W)."""
    if logits.ndim != 3:
        raise ValueError(f"logits must be (1 + C, H, W), got {tuple(logits.shape)}")
    keys = torch.cat([present.new_zeros(1), present.long().flatten()])
    if keys.numel() > 1 and (int(keys[1:].min()) < 1 or int(keys.max()) >= logits.shape[0]):
        raise ValueError(f"present classes must lie in 1..{logits.shape[0] - 1}")
    probs = torch.softmax(logits.float(), dim=0)[keys]
    low = probs.amin(dim=(1, 2), keepdim=True)
    high = probs.amax(dim=(1, 2), keepdim=True)
    normed = (probs - low) / (high - low + eps)
    if keep is None:
        return normed
    if keep.shape != logits.shape[1:]:
        raise ValueError(f"keep must be {tuple(logits.shape[1:])}, got {tuple(keep.shape)}")
    return torch.where(keep.to(probs.device)[None], probs, normed)
