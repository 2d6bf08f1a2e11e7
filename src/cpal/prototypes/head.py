"""The embedding head v: backbone features -> per-pixel unit-norm embeddings z (step 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# SIPE's side-convolution widths for ResNet-50/101 stage widths (256, 512, 1024, 2048).
SIPE_IN = (256, 512, 1024, 2048)
SIPE_SIDE = (128, 128, 256, 256)


def side_widths(in_channels: Sequence[int]) -> tuple[int, ...]:
    """SIPE's exact widths for ResNet-50/101 stages; otherwise max(8, round(c_in / 2)).

    SIPE's widths are tied to the ResNet-50 stage widths, so narrower backbones (or a single
    token map) get a rule that keeps every side output at about half its input.
    """
    if tuple(in_channels) == SIPE_IN:
        return SIPE_SIDE
    return tuple(max(8, round(c / 2)) for c in in_channels)


class EmbeddingHead(nn.Module):
    """z = v(f), per-pixel L2-normalised, D dims.

    layer4: v is a 1x1 conv on the last map (gradients reach the backbone).
    hierarchical (SIPE): 1x1 side convs on *detached* maps (the embedding never disturbs
    the classifier's features, as in SIPE), each L2-normalised over channels, resized to
    the last map's grid (bilinear, align_corners=True as SIPE), concatenated, then
    v = 1x1 conv to D.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        dim: int,
        mode: Literal["layer4", "hierarchical"],
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("EmbeddingHead needs at least one feature map")
        if mode not in ("layer4", "hierarchical"):
            raise ValueError(f"unknown embedding mode {mode!r}")
        self.mode = mode
        self.in_channels = tuple(int(c) for c in in_channels)
        self.dim = dim
        if mode == "layer4":
            self.sides = nn.ModuleList()
            self.proj = nn.Conv2d(self.in_channels[-1], dim, 1, bias=False)
        else:
            widths = side_widths(self.in_channels)
            self.sides = nn.ModuleList(
                nn.Conv2d(c, w, 1, bias=False)
                for c, w in zip(self.in_channels, widths, strict=True)
            )
            self.proj = nn.Conv2d(sum(widths), dim, 1, bias=False)
        for m in [*self.sides, self.proj]:
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"EmbeddingHead built for {len(self.in_channels)} maps, got {len(features)}"
            )
        if self.mode == "layer4":
            z = self.proj(features[-1])
        else:
            size = features[-1].shape[-2:]
            parts = []
            for conv, f in zip(self.sides, features, strict=True):
                s = F.normalize(conv(f.detach()), dim=1, eps=1e-5)
                if s.shape[-2:] != size:
                    s = F.interpolate(s, size=size, mode="bilinear", align_corners=True)
                parts.append(s)
            z = self.proj(torch.cat(parts, dim=1))
        return F.normalize(z, dim=1, eps=1e-5)
