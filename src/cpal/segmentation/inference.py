"""Multi-scale + flip (optionally tiled) inference of a segmentation network -> label maps.

Per scale the image is resized (bilinear, size rounded as cpal's CAM inference), it and
its mirror go through the network in one batch, the mirrored logits are flipped back and
averaged with the others, and the result is upsampled bilinearly (no corner alignment) to
the image size. Scales are then combined by `reduce`:

- "mean" (default; "sum" gives the same labels): averaged logits;
- "max": pixel-wise max over scales, as deeplab-pytorch's MSC and ToCo's seg test (ToCo
  sums each scale's image and mirror logits, then takes the max over scales: the same
  labels as flip=True, reduce="max" here, since halving every scale keeps the max's order).

With a DeepLab network in eval mode every call already includes its MSC max; scales=(1.0,),
flip=False reproduces deeplab-pytorch's `main.py test` logits (before its CRF).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from cpal.data.transforms import rescaled

Reduce = Literal["mean", "max", "sum"]
Model = Callable[[Tensor], Tensor]

__all__ = ["multi_scale_logits", "predict_labels", "segment", "sliding_window_logits"]


def _pair(value: int | tuple[int, int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _starts(size: int, crop: int, stride: int) -> list[int]:
    """Window origins covering [0, size): a regular grid plus one flush with the end."""
    if size <= crop:
        return [0]
    starts = list(range(0, size - crop + 1, stride))
    if starts[-1] != size - crop:
        starts.append(size - crop)
    return starts


def sliding_window_logits(
    model: Model, images: Tensor, crop: int | tuple[int, int], stride: int | tuple[int, int]
) -> Tensor:
    """Logits (B, C, H, W) at the image size from overlapping crop-sized windows, averaged
    where windows overlap. Images smaller than a window are zero-padded (after
    normalisation: the mean colour) at the bottom/right, and the padding is cut off."""
    (ch, cw), (sh, sw) = _pair(crop), _pair(stride)
    if min(ch, cw, sh, sw) < 1:
        raise ValueError(f"crop and stride must be positive, got {crop} / {stride}")
    height, width = images.shape[-2:]
    x = F.pad(images, (0, max(cw - width, 0), 0, max(ch - height, 0)))
    total: Tensor | None = None
    count = x.new_zeros((1, 1, *x.shape[-2:]))
    for y0 in _starts(x.shape[-2], ch, sh):
        for x0 in _starts(x.shape[-1], cw, sw):
            window = model(x[..., y0:y0 + ch, x0:x0 + cw]).float()
            window = F.interpolate(window, size=(ch, cw), mode="bilinear", align_corners=False)
            if total is None:
                total = window.new_zeros((x.shape[0], window.shape[1], *x.shape[-2:]))
            total[..., y0:y0 + ch, x0:x0 + cw] += window
            count[..., y0:y0 + ch, x0:x0 + cw] += 1
    assert total is not None  # at least one window
    return (total / count)[..., :height, :width]


@torch.no_grad()
def multi_scale_logits(
    model: Model,
    images: Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    reduce: Reduce = "mean",
    tile: tuple[int | tuple[int, int], int | tuple[int, int]] | None = None,
) -> Tensor:
    """(B, 3, H, W) normalised images -> (B, C, H, W) float32 logits at the image size.

    `tile=(crop, stride)` runs each scale by sliding windows (large images, fixed memory).
    """
    if not scales:
        raise ValueError("multi-scale inference needs at least one scale")
    if reduce not in ("mean", "max", "sum"):
        raise ValueError(f"reduce must be mean, max or sum, got {reduce!r}")
    batch, _, height, width = images.shape
    combined: Tensor | None = None
    for scale in scales:
        x = rescaled(images, scale)
        inputs = torch.cat([x, x.flip(-1)]) if flip else x
        if tile is None:
            logits = model(inputs).float()
        else:
            logits = sliding_window_logits(model, inputs, tile[0], tile[1])
        if flip:
            logits = (logits[:batch] + logits[batch:].flip(-1)) / 2
        logits = F.interpolate(logits, size=(height, width), mode="bilinear",
                               align_corners=False)
        if combined is None:
            combined = logits
        elif reduce == "max":
            combined = torch.maximum(combined, logits)
        else:
            combined = combined + logits
    assert combined is not None
    return combined / len(scales) if reduce == "mean" else combined


def predict_labels(logits: Tensor) -> Tensor:
    """(B, C, H, W) logits (or probabilities) -> (B, H, W) class indices (uint8 up to 256
    classes: the palette PNGs' type)."""
    labels = logits.argmax(dim=1)
    return labels.to(torch.uint8) if logits.shape[1] <= 256 else labels


def segment(
    model: Model,
    images: Tensor,
    *,
    scales: Sequence[float] = (1.0,),
    flip: bool = False,
    reduce: Reduce = "mean",
    tile: tuple[int | tuple[int, int], int | tuple[int, int]] | None = None,
) -> Tensor:
    """Label maps (B, H, W) of normalised images: `multi_scale_logits` then argmax.
    The model should be in eval mode (the caller's choice, as for the CAM network)."""
    logits = multi_scale_logits(model, images, scales=scales, flip=flip, reduce=reduce,
                                tile=tile)
    return predict_labels(logits)
