"""The embedding head v: backbone features -> per-pixel embeddings z (docs/method.md, step 2)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# SIPE's side-convolution widths for ResNet-50/101 stage widths (256, 512, 1024, 2048).
SIPE_IN = (256, 512, 1024, 2048)
SIPE_SIDE = (128, 128, 256, 256)

HeadMode = Literal["hierarchical", "layer4"]
HeadInit = Literal["default", "kaiming"]


def side_widths(in_channels: Sequence[int]) -> tuple[int, ...]:
    """SIPE's exact widths for ResNet-50/101 stages; otherwise max(8, round(c_in / 2)).

    SIPE's widths are tied to the ResNet-50 stage widths, so narrower backbones (or a single
    token map) get a rule that keeps every side output at about half its input.
    """
    if tuple(in_channels) == SIPE_IN:
        return SIPE_SIDE
    return tuple(max(8, round(c / 2)) for c in in_channels)


def _unit(x: Tensor) -> Tensor:
    """x / (||x|| + 1e-5) over channels: SIPE's normalisation (not F.normalize's clamp).
    The norm as sqrt(sum x^2): within one rounding of `x.norm(dim=1)` and, on NCHW maps,
    about 3x faster forward and backward; the clamp keeps the gradient finite where a
    pixel's channels are all 0 (the same gradient as x.norm's there)."""
    return x / ((x * x).sum(dim=1, keepdim=True).clamp_min(1e-24).sqrt() + 1e-5)


class EmbeddingHead(nn.Module):
    """z = v(f): SIPE's hierarchical feature, optionally projected.

    hierarchical (SIPE): a 1x1 side conv (no bias) on each *detached* stage output, each
    L2-normalised per pixel, resized to the last map's grid (bilinear; align_corners=False
    as SIPE's F.interpolate default), concatenated. Without a projection z is that raw
    concatenation (norm sqrt(#stages) per pixel): SIPE pools prototypes on it, and a flip
    fusion that sums two such features keeps their relative weight.
    layer4: only the last stage's side conv (an ablation of the hierarchy).
    projection=D (this library's earlier choice): a learned 1x1 conv to D dims, then unit
    length per pixel. init="default" keeps PyTorch's default initialisation (SIPE);
    "kaiming" is Kaiming fan-out (the earlier choice), whose larger weights make the
    angular step of every update smaller behind the normalisation.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        mode: HeadMode = "hierarchical",
        *,
        projection: int | None = None,
        init: HeadInit = "default",
        align_corners: bool = False,
    ) -> None:
        super().__init__()
        if not in_channels:
            raise ValueError("EmbeddingHead needs at least one feature map")
        if mode not in ("layer4", "hierarchical"):
            raise ValueError(f"unknown embedding mode {mode!r}")
        if init not in ("default", "kaiming"):
            raise ValueError(f"unknown head init {init!r}")
        self.mode = mode
        self.in_channels = tuple(int(c) for c in in_channels)
        self.align_corners = align_corners
        used = self.in_channels if mode == "hierarchical" else self.in_channels[-1:]
        widths = side_widths(self.in_channels)
        widths = widths if mode == "hierarchical" else widths[-1:]
        self.sides = nn.ModuleList(
            nn.Conv2d(c, w, 1, bias=False) for c, w in zip(used, widths, strict=True)
        )
        self.proj = None if projection is None else nn.Conv2d(sum(widths), projection, 1,
                                                             bias=False)
        self.dim = sum(widths) if projection is None else projection
        if init == "kaiming":
            for m in [*self.sides, *([self.proj] if self.proj is not None else [])]:
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, features: Sequence[Tensor]) -> Tensor:
        if len(features) != len(self.in_channels):
            raise ValueError(
                f"EmbeddingHead built for {len(self.in_channels)} maps, got {len(features)}"
            )
        size = features[-1].shape[-2:]
        used = features if self.mode == "hierarchical" else features[-1:]
        parts = []
        for conv, f in zip(self.sides, used, strict=True):
            s = _unit(conv(f.detach()))
            if s.shape[-2:] != size:
                s = F.interpolate(s, size=size, mode="bilinear", align_corners=self.align_corners)
            parts.append(s)
        z = torch.cat(parts, dim=1)
        if self.proj is not None:
            z = F.normalize(self.proj(z), dim=1, eps=1e-5)
        return z
