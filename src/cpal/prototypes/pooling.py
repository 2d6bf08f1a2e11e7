"""Normalised CAMs with a background channel, seeds, class regions and instance prototypes
(docs/method.md, steps 1 and 3).

The defaults reproduce SIPE's official code (Chen et al., CVPR 2022), the base CPAL's
authors name: the background is formed from every foreground map before absent classes
are zeroed, seeds split the whole image by an affinity-IoU rule, and an empty seed gives a
zero prototype. The earlier choices of this library stay available as switches.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Region = Literal["sipe_seeds", "threshold"]
BackgroundFrom = Literal["all", "present"]
EmptyRegion = Literal["zero", "cam"]


def normalized_cam(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(cam) / (per-map max + eps): values in [0, 1]. The one normalisation used by
    training (the CAM branch of L_self) and inference (the written maps)."""
    cam = F.relu(cam)
    peak = cam.flatten(2).amax(dim=2)[..., None, None]
    return cam / (peak + eps)


def min_max_normalised(maps: Tensor, eps: float = 1e-8) -> Tensor:
    """(x - min) / (max - min + eps) per map over its last two dimensions: MCTformer's
    and CLIP-ES's normalisation (a constant map becomes 0)."""
    low = maps.flatten(-2).amin(dim=-1)[..., None, None]
    high = maps.flatten(-2).amax(dim=-1)[..., None, None]
    return (maps - low) / (high - low + eps)


def channel_valid(labels: Tensor) -> Tensor:
    """(B, C) multi-hot -> (B, C+1) bool: background always, foreground iff present."""
    bg = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([bg, labels > 0.5], dim=1)


def channel_mask(labels: Tensor, spatial: Tensor | None = None) -> Tensor:
    """(B, C+1, 1, 1) or (B, C+1, h, w) float: 1 for background and present classes,
    times the valid (unpadded) image area when `spatial` (B, 1, h, w) is given. SIPE's
    `valid_mask`."""
    mask = channel_valid(labels).to(labels.dtype if labels.is_floating_point() else torch.float)
    mask = mask[:, :, None, None]
    return mask if spatial is None else mask * spatial.to(mask.dtype)


def background_and_classes(
    cam: Tensor, labels: Tensor, background_from: BackgroundFrom = "all", eps: float = 1e-5
) -> Tensor:
    """(B, C, h, w) raw CAM -> (B, C+1, h, w) in [0, 1], NOT masked: bg M_0 = 1 - max_c M_c.

    background_from="all" (SIPE): the max runs over every foreground map, absent classes
    included, so a class the network confuses with the object still claims its pixels
    from the background. "present": absent classes are zeroed first (this library's
    earlier choice), so only the labelled classes shape the background.
    """
    fg = normalized_cam(cam, eps)
    if background_from == "present":
        fg_for_bg = fg * labels[:, :, None, None].to(fg.dtype)
    elif background_from == "all":
        fg_for_bg = fg
    else:
        raise ValueError(f"unknown background_from {background_from!r}")
    if fg.shape[1] == 0:
        bg = torch.ones_like(cam[:, :1].sum(1, keepdim=True))
    else:
        bg = 1.0 - fg_for_bg.amax(dim=1, keepdim=True)
    return torch.cat([bg, fg], dim=1)


def cam_with_background(
    cam: Tensor,
    labels: Tensor,
    eps: float = 1e-5,
    *,
    background_from: BackgroundFrom = "all",
    spatial: Tensor | None = None,
) -> Tensor:
    """The training target M: `background_and_classes`, then absent classes (and, given
    `spatial`, padded pixels of every channel) set to zero, as SIPE's `norm_cam * valid_mask`."""
    m = background_and_classes(cam, labels, background_from, eps)
    return m * channel_mask(labels, spatial).to(m.dtype)


def masked_average(z: Tensor, weights: Tensor, eps: float = 1e-5) -> Tensor:
    """z (B, D, h, w), weights (B, K, h, w) >= 0 -> (B, K, D): sum_x w z / sum_x w."""
    w = weights.flatten(2).to(z.dtype)
    num = torch.bmm(w, z.flatten(2).transpose(1, 2))
    return num / (w.sum(dim=2, keepdim=True) + eps)


def region_prototypes(
    z: Tensor, weights: Tensor, valid: Tensor, normalize: bool = True
) -> Tensor:
    """(B, K, D) prototypes from pooling weights; invalid channels and empty regions are
    zero vectors.

    normalize=True: unit vectors (direction only; what cosine scores see). False: the raw
    masked mean, whose norm (for unit embeddings, <= 1) falls as the region's embeddings
    disagree, so a dot product with it carries how consistent the region is
    (`prototype.normalize`). SIPE's sum / (h w) has the direction of either.
    """
    p = masked_average(z, weights)
    if normalize:
        p = F.normalize(p, dim=-1, eps=1e-5)
    return p * valid[..., None].to(p.dtype)


def affinity_iou(
    features: Tensor, cam_norm: Tensor, iou: Literal["product", "minmax"] = "product"
) -> Tensor:
    """SIPE's seed score (B, K, h, w): the soft IoU between each pixel's affinity row and
    each channel's map.

    A(x, y) = relu(f(x).f(y)) on per-pixel L2-normalised features (norm + 1e-5, as SIPE).
    "product" is SIPE's code (inter = sum_y A M, union = sum_y A + sum_y M - inter);
    "minmax" the Ruzicka form sum min(A, M) / sum max(A, M). Memory: one (B, hw, hw)
    affinity.
    """
    b, k, h, w = cam_norm.shape
    f = features.detach().flatten(2).float()
    f = f / (f.norm(dim=1, keepdim=True) + 1e-5)  # (B, D, n)
    a = F.relu(torch.bmm(f.transpose(1, 2), f))  # (B, n, n)
    m = cam_norm.detach().flatten(2).float()  # (B, K, n)
    if iou == "product":
        inter = torch.bmm(a, m.transpose(1, 2))  # (B, n, K)
    elif iou == "minmax":
        inter = torch.stack([torch.minimum(a, m[:, c, None, :]).sum(2) for c in range(k)], dim=2)
    else:
        raise ValueError(f"unknown iou {iou!r}")
    union = a.sum(2, keepdim=True) + m.sum(2)[:, None, :] - inter
    score = inter / union.clamp_min(1e-12)
    return score.transpose(1, 2).reshape(b, k, h, w)


def argmax_seeds(score: Tensor, mask: Tensor, bg_factor: float) -> Tensor:
    """One-hot seeds (B, K, h, w) from per-channel scores: the background score is scaled
    by `bg_factor` (SIPE 0.5, SFC 0.3), every pixel goes to its best channel, then the
    one-hot is multiplied by `mask` (SIPE's label x valid-area mask), so a pixel won by an
    absent class (or a padded pixel) belongs to no seed."""
    score = score.clone()
    score[:, 0] = score[:, 0] * bg_factor
    k = score.shape[1]
    onehot = F.one_hot(score.argmax(dim=1), k).permute(0, 3, 1, 2).to(mask.dtype)
    return onehot * mask


def sipe_seeds(
    features: Tensor,
    cam_norm: Tensor,
    mask: Tensor,
    *,
    bg_factor: float = 0.5,
    iou: Literal["product", "minmax"] = "product",
) -> Tensor:
    """SIPE's seeds: each pixel goes to the channel whose map best matches its affinity
    row (`affinity_iou`, background x `bg_factor`), masked by `mask` (B, K, h|1, w|1)."""
    with torch.no_grad():
        return argmax_seeds(affinity_iou(features, cam_norm, iou), mask, bg_factor)


def pcm_refine(cam_norm: Tensor, guide: Tensor) -> Tensor:
    """SFC's pixel correlation module: two steps of propagation with a learned affinity.

    guide (B, D, h, w) is the embedded [image, layer4] of SFC (a 1x1 conv the caller
    owns); A = relu(g(x).g(y)) on unit features, normalised over its first index; the map
    is propagated as M A A. Gradients reach both the map and the guide, as in SFC.
    """
    b, k, h, w = cam_norm.shape
    g = guide.flatten(2)
    g = g / (g.norm(dim=1, keepdim=True) + 1e-5)
    aff = F.relu(torch.bmm(g.transpose(1, 2), g))
    aff = aff / (aff.sum(dim=1, keepdim=True) + 1e-5)
    m = cam_norm.flatten(2)
    return torch.bmm(torch.bmm(m, aff), aff).view(b, k, h, w)


def region_weights(
    cam_norm: Tensor,
    labels: Tensor,
    *,
    tau: float,
    tau_bg: float,
    region: Region,
    seeds: Tensor | None = None,
    empty: EmptyRegion = "zero",
) -> Tensor:
    """The pooling weights R (B, C+1, h, w): seeds or a thresholded region.

    empty="zero" (SIPE): an empty region gives a zero prototype (its channel's prototype
    map is then zero). "cam": fall back to CAM-weighted pooling, which keeps a prototype
    for an instance whose CAM never crosses tau (this library's earlier choice).
    Invalid channels get zero weight.
    """
    cam_norm = cam_norm.detach()
    if region == "threshold":
        thr = torch.full_like(cam_norm[0, :, 0, 0], tau)
        thr[0] = tau_bg
        mask = (cam_norm > thr[None, :, None, None]).to(cam_norm.dtype)
    elif region == "sipe_seeds":
        if seeds is None:
            raise ValueError("region 'sipe_seeds' needs the seeds from sipe_seeds()")
        mask = seeds.to(cam_norm.dtype)
    else:
        raise ValueError(f"unknown region {region!r}")
    if empty == "cam":
        is_empty = mask.flatten(2).sum(2) == 0
        mask = torch.where(is_empty[:, :, None, None], cam_norm, mask)
    elif empty != "zero":
        raise ValueError(f"unknown empty-region rule {empty!r}")
    return mask * channel_valid(labels)[:, :, None, None].to(cam_norm.dtype)
