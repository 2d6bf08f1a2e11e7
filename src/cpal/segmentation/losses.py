"""Cross entropy on pseudo masks with 255 ignored, for one output or all MSC outputs.

deeplab-pytorch supervises each MSC output (scales 1, 0.75, 0.5 and their max) at its own
resolution, the labels resized to it by nearest neighbour, and sums the four losses.
Its resize is PIL's NEAREST, which samples pixel centres; torch's `nearest` does not
(it drops the centre offset and shifts labels by up to a pixel), `nearest-exact` does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

IGNORE_INDEX = 255

__all__ = ["IGNORE_INDEX", "check_labels", "cross_entropy_ignore", "resize_labels",
           "segmentation_loss"]


def resize_labels(labels: Tensor, size: tuple[int, int] | torch.Size) -> Tensor:
    """(B, H, W) integer labels -> (B, h, w) long, nearest at pixel centres (PIL's)."""
    if tuple(labels.shape[-2:]) == tuple(size):
        return labels.long()
    resized = F.interpolate(labels[:, None].float(), size=tuple(size), mode="nearest-exact")
    return resized[:, 0].long()


def check_labels(labels: Tensor, num_classes: int, ignore_index: int = IGNORE_INDEX) -> None:
    """Refuse float labels and values that are neither a class nor the ignore label, with
    the values named (on a GPU, cross entropy would fail with a device-side assert)."""
    if labels.dtype.is_floating_point:
        raise TypeError("labels must be an integer tensor")
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= num_classes))
    if bool(bad.any()):
        values = sorted({int(v) for v in labels[bad].unique()[:5]})
        raise ValueError(f"labels {values} are outside 0..{num_classes - 1} and are not "
                         f"the ignore label {ignore_index}")


def cross_entropy_ignore(
    logits: Tensor, labels: Tensor, ignore_index: int = IGNORE_INDEX, *, check: bool = True
) -> Tensor:
    """Mean cross entropy over pixels whose label is not `ignore_index`; 0 (still part of
    the graph) when a batch has none, where torch's mean would be 0/0 = nan."""
    if check:
        check_labels(labels, logits.shape[1], ignore_index)
    valid = labels != ignore_index
    total = F.cross_entropy(logits.float(), labels.long(), ignore_index=ignore_index,
                            reduction="sum")
    return total / valid.sum().clamp(min=1)


def segmentation_loss(
    outputs: Tensor | Sequence[Tensor],
    labels: Tensor,
    *,
    ignore_index: int = IGNORE_INDEX,
    resize: Literal["labels", "logits"] = "labels",
) -> Tensor:
    """Sum over outputs (one tensor, or MSC's list) of the ignore-aware cross entropy.

    resize="labels" (deeplab-pytorch): labels (B, H, W) go down to each logit size by
    nearest; resize="logits": logits go up to the label size (bilinear), as v3+ trainers do.
    """
    if isinstance(outputs, Tensor):
        outputs = [outputs]
    if not outputs:
        raise ValueError("no outputs to supervise")
    check_labels(labels, outputs[0].shape[1], ignore_index)  # once: resizing adds no value
    loss = outputs[0].new_zeros((), dtype=torch.float32)
    for logits in outputs:
        if resize == "labels":
            target = resize_labels(labels, logits.shape[-2:])
        elif resize == "logits":
            target = labels
            if logits.shape[-2:] != labels.shape[-2:]:
                logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                       align_corners=False)
        else:
            raise ValueError(f"resize must be 'labels' or 'logits', got {resize!r}")
        loss = loss + cross_entropy_ignore(logits, target, ignore_index, check=False)
    return loss
