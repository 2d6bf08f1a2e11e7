"""IRN's inter-pixel relation network (Ahn et al., CVPR 2019) on a frozen ResNet trunk.

Boundary branch: the five trunk levels (stem after max-pool, layer1..layer4), each a 1x1
conv to 32 channels + GroupNorm(4) (+ bilinear upsampling to stride 4) + ReLU, cropped to
the stride-4 grid, concatenated (160 ch) and a 1x1 conv with bias -> one boundary logit.
Displacement branch (optional): IRN's second head, a coarse-to-fine 1x1 GroupNorm network
giving a 2-channel displacement field at stride 4 (instance centroids; semantic
segmentation does not need it).

The trunk is fixed: eval mode always, no gradients (IRN detaches every level); only the
branches train, so it should be loaded with ImageNet weights (IRN) before training.

Pair affinities and the IRN losses take the pair/path indexing as plain tensors (built by
`cpal.refine`, or anyone): `path_affinity` documents the layout.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor, nn

from cpal.models.registry import build_backbone
from cpal.models.resnet import ArchName
from cpal.models.seg_base import ParamGroup, param_group
from cpal.models.weights import LoadReport, load_backbone_weights

__all__ = [
    "AffinityLabels", "AffinityLoss", "BoundaryBranch", "DisplacementBranch", "IRNet",
    "IRNetOutput", "affinity_labels", "affinity_loss", "boundary_map", "displacement_loss",
    "path_affinity",
]

GRID_STRIDE = 4  # IRN's boundary / displacement grid


def _upsample(factor: int) -> nn.Module:
    if factor == 1:
        return nn.Identity()
    return nn.Upsample(scale_factor=factor, mode="bilinear", align_corners=False)


def _level(cin: int, cout: int, groups: int, factor: int) -> nn.Sequential:
    """1x1 conv (no bias) + GroupNorm, upsampled before the ReLU as IRN orders them."""
    return nn.Sequential(
        nn.Conv2d(cin, cout, 1, bias=False), nn.GroupNorm(groups, cout), _upsample(factor),
        nn.ReLU(inplace=True),
    )


def _crop_to(x: Tensor, ref: Tensor) -> Tensor:
    """IRN crops upsampled levels to the finer grid (odd sizes round up when strided)."""
    return x[..., : ref.shape[-2], : ref.shape[-1]]


def _factors(strides: Sequence[int], target: int) -> list[int]:
    for s in strides:
        if s % target:
            raise ValueError(f"level stride {s} is not a multiple of {target}")
    return [s // target for s in strides]


class BoundaryBranch(nn.Module):
    """Five levels -> (B, 1, h, w) boundary logits at stride 4 (sigmoid: probabilities)."""

    def __init__(
        self, in_channels: Sequence[int], strides: Sequence[int], channels: int = 32,
        groups: int = 4,
    ) -> None:
        super().__init__()
        if len(in_channels) != 5 or len(strides) != 5:
            raise ValueError("the boundary branch reads five levels (stem, layer1..layer4)")
        factors = _factors(strides, GRID_STRIDE)
        self.levels = nn.ModuleList(
            _level(c, channels, groups, f) for c, f in zip(in_channels, factors, strict=True)
        )
        self.fuse = nn.Conv2d(5 * channels, 1, 1, bias=True)

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        first = self.levels[0](features[0])
        maps = [first] + [_crop_to(lvl(f), first)
                          for lvl, f in zip(self.levels[1:], features[1:], strict=True)]
        return self.fuse(torch.cat(maps, dim=1))


class DisplacementBranch(nn.Module):
    """IRN's displacement head: layer2..4 fused at stride 8, upsampled and fused with the
    stem and layer1 at stride 4 -> (B, 2, h, w). In eval mode the field's mean (estimated
    on training images after training, `mean_shift`) is subtracted, as IRN does."""

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int]) -> None:
        super().__init__()
        if len(in_channels) != 5 or len(strides) != 5:
            raise ValueError("the displacement branch reads five levels (stem, layer1..layer4)")
        c = in_channels
        fine = _factors(strides[:2], GRID_STRIDE)
        mid = _factors(strides[2:], strides[2])
        if fine != [1, 1]:
            raise ValueError("the stem and layer1 must be at stride 4")
        self.stem = _level(c[0], 64, 8, 1)
        self.layer1 = _level(c[1], 128, 16, 1)
        self.layer2 = _level(c[2], 256, 16, mid[0])
        self.layer3 = _level(c[3], 256, 16, mid[1])
        self.layer4 = _level(c[4], 256, 16, mid[2])
        self.coarse = _level(768, 256, 16, strides[2] // GRID_STRIDE)
        self.fine = nn.Sequential(
            nn.Conv2d(448, 256, 1, bias=False), nn.GroupNorm(16, 256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 2, 1, bias=False),
        )
        self.register_buffer("mean_shift", torch.zeros(2))

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        d1 = self.stem(features[0])
        d2 = self.layer1(features[1])
        d3 = self.layer2(features[2])
        d4 = _crop_to(self.layer3(features[3]), d3)
        d5 = _crop_to(self.layer4(features[4]), d3)
        up = _crop_to(self.coarse(torch.cat([d3, d4, d5], dim=1)), d2)
        out = self.fine(torch.cat([d1, d2, up], dim=1))
        if not self.training:
            out = out - self.mean_shift.view(1, 2, 1, 1)
        return out


@dataclass
class IRNetOutput:
    boundary: Tensor  # (B, 1, h, w) logits at stride 4
    displacement: Tensor | None  # (B, 2, h, w) at stride 4, when the net has the branch


class IRNet(nn.Module):
    """Frozen ResNet trunk (IRN: resnet50, OS16) + boundary branch (+ displacement)."""

    def __init__(
        self,
        *,
        arch: ArchName = "resnet50",
        width: float = 1.0,
        output_stride: int = 16,
        displacement: bool = False,
        edge_channels: int = 32,
        edge_groups: int = 4,
    ) -> None:
        super().__init__()
        self.backbone = build_backbone(arch, width=width, output_stride=output_stride,
                                       frozen_bn=True)
        for p in self.backbone.parameters():
            p.requires_grad_(False)
        channels = [self.backbone.stem_channels, *self.backbone.stage_channels]
        strides = [GRID_STRIDE, *self.backbone.stage_strides]
        self.edge = BoundaryBranch(channels, strides, edge_channels, edge_groups)
        self.displacement = DisplacementBranch(channels, strides) if displacement else None

    @property
    def arch(self) -> str:
        return self.backbone.arch

    def train(self, mode: bool = True) -> IRNet:
        """The trunk stays in eval mode (fixed BatchNorm statistics) whatever the mode."""
        super().train(mode)
        self.backbone.eval()
        return self

    def trunk_features(self, x: Tensor) -> list[Tensor]:
        """The five levels, without gradients: stem (after max-pool), layer1..layer4."""
        with torch.no_grad():
            stem = self.backbone.forward_stem(x)
            f1 = self.backbone.layer1(stem)
            f2 = self.backbone.layer2(f1)
            f3 = self.backbone.layer3(f2)
            f4 = self.backbone.layer4(f3)
        return [stem, f1, f2, f3, f4]

    def forward(self, x: Tensor) -> IRNetOutput:
        features = self.trunk_features(x)
        disp = self.displacement(features) if self.displacement is not None else None
        return IRNetOutput(boundary=self.edge(features), displacement=disp)

    def param_groups(self, lr: float, weight_decay: float) -> list[ParamGroup]:
        """IRN's groups: the boundary branch at lr, the displacement branch at 10 lr (IRN's
        0.1 / 1.0), both with weight decay (IRN: 1e-4 on every parameter)."""
        groups = [param_group("edge", self.edge.parameters(), lr, 1.0, weight_decay)]
        if self.displacement is not None:
            groups.append(param_group("displacement", self.displacement.parameters(), lr,
                                      10.0, weight_decay))
        return groups

    def load_trunk(
        self, path: str | Path, *, strict: bool = True, allow_leak: bool = False
    ) -> LoadReport:
        return load_backbone_weights(self.backbone, path, strict=strict, allow_leak=allow_leak)


@torch.no_grad()
def grid_size(height: int, width: int) -> tuple[int, int]:
    """The boundary grid of an image: its size over GRID_STRIDE, rounded up."""
    return -(-height // GRID_STRIDE), -(-width // GRID_STRIDE)


def boundary_map(net: IRNet, images: Tensor, *, flip: bool = True) -> Tensor:
    """Boundary probabilities (B, 1, ceil(H/4), ceil(W/4)) for inference: the sigmoid of
    the logits averaged with those of the mirrored image, as IRN's EdgeDisplacement."""
    grid = grid_size(*images.shape[-2:])
    batch = images.shape[0]
    logits = net(torch.cat([images, images.flip(-1)]) if flip else images).boundary
    if flip:
        logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
    return torch.sigmoid(logits[..., : grid[0], : grid[1]])


# ---------------------------------------------------------------------------------------
# Pair affinities and IRN's losses


def path_affinity(boundary: Tensor, paths: Tensor | Sequence[Tensor]) -> Tensor:
    """Affinity of pixel pairs: 1 - the largest boundary probability on the path between.

    boundary: (B, 1, h, w) probabilities (sigmoid of `IRNet` logits), the grid the
    indices refer to. paths: long tensor (..., L) of flat indices y * w + x into that grid,
    its last dimension the pixels on one pair's path, both end pixels included; paths
    shorter than L repeat one of their pixels (a max ignores repeats). Any leading shape:
    (P, L) for a list of pairs, or IRN's (directions, L, sources) moved to (directions,
    sources, L). A sequence of such tensors (e.g. grouped by path length to save padding)
    gives their flattened results concatenated: (B, sum of pairs).

    Returns (B, ...) affinities in [0, 1], differentiable in `boundary`.
    """
    if boundary.dim() != 4 or boundary.shape[1] != 1:
        raise ValueError(f"boundary must be (B, 1, h, w), got {tuple(boundary.shape)}")
    flat = boundary.flatten(1)
    if not isinstance(paths, Tensor):
        return torch.cat([path_affinity(boundary, p).flatten(1) for p in paths], dim=1)
    if paths.dtype != torch.long:
        raise TypeError(f"path indices must be int64, got {paths.dtype}")
    n = flat.shape[1]
    if paths.numel() and (int(paths.min()) < 0 or int(paths.max()) >= n):
        raise ValueError(f"path indices must lie in [0, {n}) for a "
                         f"{tuple(boundary.shape[-2:])} grid")
    on_path = flat[:, paths.reshape(-1)].view(flat.shape[0], *paths.shape)
    return 1.0 - on_path.amax(dim=-1)


class AffinityLabels(NamedTuple):
    """(B, P) float masks of the pairs: same label, background (bg-bg pairs); same
    label, foreground (fg-fg); different labels. Pairs touching an ignored pixel are in
    none of them."""

    bg_pos: Tensor
    fg_pos: Tensor
    neg: Tensor


def affinity_labels(
    labels: Tensor, src: Tensor, dst: Tensor, *, ignore_index: int = 255
) -> AffinityLabels:
    """IRN's pair labels from IR label maps (B, h, w) on the boundary grid (0 background,
    1..C classes, `ignore_index` unsure) and pair end points (P,) flat indices."""
    flat = labels.flatten(1)
    a, b = flat[:, src], flat[:, dst]
    valid = (a != ignore_index) & (b != ignore_index) & (a >= 0) & (b >= 0)
    same = (a == b) & valid
    return AffinityLabels(
        bg_pos=(same & (a == 0)).float(),
        fg_pos=(same & (a > 0)).float(),
        neg=((a != b) & valid).float(),
    )


class AffinityLoss(NamedTuple):
    total: Tensor  # (pos + neg) / 2, pos = (bg_pos + fg_pos) / 2: IRN's weighting
    bg_pos: Tensor
    fg_pos: Tensor
    neg: Tensor


def _masked_mean(values: Tensor, mask: Tensor, eps: float) -> Tensor:
    return (values * mask).sum() / (mask.sum() + eps)


def affinity_loss(affinity: Tensor, labels: AffinityLabels, *, eps: float = 1e-5) -> AffinityLoss:
    """IRN's inter-pixel relation loss on affinities (B, P) = `path_affinity`:
    -log(a) averaged separately over bg-bg and fg-fg pairs of one label, -log(1 - a) over
    pairs of different labels, each mean over its own pairs (eps: IRN's 1e-5)."""
    pos = -torch.log(affinity + eps)
    neg = -torch.log(1.0 + eps - affinity)
    bg = _masked_mean(pos, labels.bg_pos, eps)
    fg = _masked_mean(pos, labels.fg_pos, eps)
    ne = _masked_mean(neg, labels.neg, eps)
    return AffinityLoss(total=((bg + fg) / 2 + ne) / 2, bg_pos=bg, fg_pos=fg, neg=ne)


def displacement_loss(
    displacement: Tensor, src: Tensor, dst: Tensor, labels: AffinityLabels, *, eps: float = 1e-5
) -> tuple[Tensor, Tensor]:
    """IRN's displacement losses (fg, bg) for a (B, 2, h, w) field (in grid pixels, dy/dx):
    fg-fg pairs should differ by their offset (both point at one centroid), bg-bg pairs by
    nothing; L1, averaged over pairs and the two channels. src/dst: (P,) flat indices."""
    width = displacement.shape[-1]
    flat = displacement.flatten(2)
    pair = flat[:, :, src] - flat[:, :, dst]  # (B, 2, P)
    offset = torch.stack([dst // width - src // width, dst % width - src % width])
    fg = (pair - offset.to(pair.dtype)).abs()
    bg = pair.abs()
    return (
        (fg * labels.fg_pos[:, None]).sum() / (2 * labels.fg_pos.sum() + eps),
        (bg * labels.bg_pos[:, None]).sum() / (2 * labels.bg_pos.sum() + eps),
    )
