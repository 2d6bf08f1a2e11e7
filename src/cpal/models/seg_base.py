"""What every segmentation network of cpal shares: MSC forward, optimiser groups, trunk init.

A network implements `forward_logits` (one scale) and `param_groups`; this base turns it
into deeplab-pytorch's MSC model (logits of the image at several scales plus their
pixel-wise max, every one supervised in training, the max predicted at test time) and
loads ImageNet trunk files through `cpal.models.weights.load_backbone_weights`, so a
segmentation trunk gets the same key checks and pixel-label leak warnings as the CAM net.

`forward(x)` returns one tensor in both modes (the max); `forward(x, return_all=True)`
returns the list the loss needs. Both go through `forward`, so DistributedDataParallel's
gradient hooks see them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Literal, overload

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.models.resnet import ResNet
from cpal.models.weights import LoadReport, load_backbone_weights

ParamGroup = dict[str, Any]


def msc_logits(
    forward: Callable[[Tensor], Tensor], x: Tensor, scales: Sequence[float]
) -> list[Tensor]:
    """Logits of `x` at each scale, each at its own resolution, then (with several scales)
    their pixel-wise max at the first scale's resolution: [l_s1, l_s2, ..., max].

    Inputs are resized as deeplab-pytorch's MSC does (bilinear, `scale_factor`, no corner
    alignment); so are the logits that enter the max. One scale gives [l_s1] alone: a max
    equal to it would count the same loss twice.
    """
    if not scales:
        raise ValueError("msc needs at least one scale")
    outputs = []
    for scale in scales:
        inp = x if scale == 1.0 else F.interpolate(
            x, scale_factor=scale, mode="bilinear", align_corners=False
        )
        outputs.append(forward(inp))
    if len(outputs) == 1:
        return outputs
    size = outputs[0].shape[-2:]
    aligned = [outputs[0]] + [
        F.interpolate(o, size=size, mode="bilinear", align_corners=False) for o in outputs[1:]
    ]
    return [*outputs, torch.stack(aligned).amax(dim=0)]


def param_group(
    name: str, params: Iterable[nn.Parameter], lr: float, lr_mult: float, weight_decay: float
) -> ParamGroup:
    """One SGD group in the trainer's format: `base_lr` is what its poly schedule decays."""
    return {"name": name, "params": list(params), "lr": lr * lr_mult, "base_lr": lr * lr_mult,
            "lr_mult": lr_mult, "weight_decay": weight_decay}


def split_weights(module: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """Trainable (conv / linear weights, biases and norm affines): weight decay applies to
    the first list only, as deeplab-pytorch (decay_mult 0 on biases) and common practice."""
    weights, others = [], []
    for p in module.parameters():
        if p.requires_grad:
            (weights if p.ndim > 1 else others).append(p)
    return weights, others


class SegmentationNet(nn.Module):
    """Base of the segmentation networks: a ResNet trunk and a head that gives logits."""

    backbone: ResNet
    num_classes: int
    msc_scales: tuple[float, ...]
    frozen_bn: bool

    def _init_trunk(self, frozen_bn: bool) -> None:
        """frozen_bn fixes trunk BatchNorm entirely (statistics and affine), as
        deeplab-pytorch does with its BN (eval mode, not given to the optimiser)."""
        self.frozen_bn = frozen_bn
        if frozen_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.BatchNorm2d):
                    for p in m.parameters():
                        p.requires_grad_(False)

    @property
    def arch(self) -> str:
        return self.backbone.arch

    @property
    def logit_stride(self) -> int:
        """Input pixels per logit at scale 1 (8 for DeepLab-v2, 4 for v3+'s decoder)."""
        raise NotImplementedError

    def forward_logits(self, x: Tensor) -> Tensor:
        """Logits (B, C, h, w) of one scale."""
        raise NotImplementedError

    @overload
    def forward(self, x: Tensor, *, return_all: Literal[False] = ...) -> Tensor: ...

    @overload
    def forward(self, x: Tensor, *, return_all: Literal[True]) -> list[Tensor]: ...

    def forward(self, x: Tensor, *, return_all: bool = False) -> Tensor | list[Tensor]:
        """The prediction's logits (the MSC max when there are several scales), or with
        `return_all` every output to supervise: one per scale, then the max."""
        outputs = msc_logits(self.forward_logits, x, self.msc_scales)
        return outputs if return_all else outputs[-1]

    def trunk_param_groups(self, lr: float, weight_decay: float) -> list[ParamGroup]:
        weights, norms = split_weights(self.backbone)
        groups = [param_group("trunk", weights, lr, 1.0, weight_decay)]
        if norms:
            groups.append(param_group("trunk_norm", norms, lr, 1.0, 0.0))
        return groups

    def param_groups(self, lr: float, weight_decay: float) -> list[ParamGroup]:
        """SGD parameter groups of the network's training recipe (empty groups left out)."""
        raise NotImplementedError

    def load_trunk(
        self, path: str | Path, *, strict: bool = True, allow_leak: bool = False
    ) -> LoadReport:
        """ImageNet ResNet weights (torchvision / timm layouts) into the trunk, by key."""
        return load_backbone_weights(self.backbone, path, strict=strict, allow_leak=allow_leak)


def sgd_param_groups(model: nn.Module, lr: float, weight_decay: float) -> list[ParamGroup]:
    """The SGD groups of a segmentation network (or of one inside DDP): e.g. DeepLab-v2's
    trunk at lr, ASPP weights at 10 lr, ASPP biases at 20 lr without weight decay."""
    net = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    if not isinstance(net, SegmentationNet):
        raise TypeError(f"expected a segmentation network, got {type(net).__name__}")
    groups = [g for g in net.param_groups(lr, weight_decay) if g["params"]]
    owned = {id(p) for g in groups for p in g["params"]}
    if len(owned) != sum(len(g["params"]) for g in groups):
        raise RuntimeError(f"{type(net).__name__}.param_groups lists a parameter twice")
    return groups
