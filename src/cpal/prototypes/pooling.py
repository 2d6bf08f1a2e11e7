"""Normalised CAMs with a background channel, class regions and instance prototypes (steps 1, 3)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Region = Literal["threshold", "sipe_seeds"]


def normalized_cam(cam: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(cam) / (per-map max + eps): values in [0, 1]. The one normalisation used by
    training (the CAM branch of L_self) and inference (the written maps)."""
    cam = F.relu(cam)
    peak = cam.flatten(2).amax(dim=2)[..., None, None]
    return cam / (peak + eps)


def cam_with_background(cam: Tensor, labels: Tensor, eps: float = 1e-5) -> Tensor:
    """(B, C, h, w) raw CAM -> (B, C+1, h, w) in [0, 1]: bg M_0 = 1 - max_c M_c at index 0.

    Foreground maps are relu + per-map max normalised and zeroed for absent classes before
    the background is formed, so an absent class can never suppress the background.
    """
    fg = normalized_cam(cam, eps) * labels[:, :, None, None].to(cam.dtype)
    if fg.shape[1] == 0:
        bg = torch.ones_like(cam[:, :1].sum(1, keepdim=True))
    else:
        bg = 1.0 - fg.amax(dim=1, keepdim=True)
    return torch.cat([bg, fg], dim=1)


def channel_valid(labels: Tensor) -> Tensor:
    """(B, C) multi-hot -> (B, C+1) bool: background always, foreground iff present."""
    bg = torch.ones_like(labels[:, :1], dtype=torch.bool)
    return torch.cat([bg, labels > 0.5], dim=1)


def masked_average(z: Tensor, weights: Tensor, eps: float = 1e-5) -> Tensor:
    """z (B, D, h, w), weights (B, K, h, w) >= 0 -> (B, K, D): sum_x w z / sum_x w."""
    w = weights.flatten(2).to(z.dtype)
    num = torch.bmm(w, z.flatten(2).transpose(1, 2))
    return num / (w.sum(dim=2, keepdim=True) + eps)


def region_prototypes(
    z: Tensor, weights: Tensor, valid: Tensor, normalize: bool = True
) -> Tensor:
    """(B, K, D) prototypes from pooling weights; invalid channels are zero vectors.

    normalize=True: unit vectors (direction only). False: the raw masked mean of the unit
    embeddings z, whose norm is <= 1 and falls as the region's embeddings disagree, so a
    dot product with it carries how consistent the region is (`prototype.normalize`).
    """
    p = masked_average(z, weights)
    if normalize:
        p = F.normalize(p, dim=-1, eps=1e-5)
    return p * valid[..., None].to(p.dtype)


def region_weights(
    cam_norm: Tensor,
    labels: Tensor,
    *,
    tau: float,
    tau_bg: float,
    region: Region,
    seeds: Tensor | None = None,
) -> Tensor:
    """The pooling weights R (B, C+1, h, w): a binary region, or the CAM where it is empty.

    The fallback keeps a prototype for an instance whose CAM never crosses tau (small or
    weakly activated objects) instead of dropping it. Invalid channels get zero weight.
    """
    cam_norm = cam_norm.detach()
    if region == "threshold":
        thr = torch.full_like(cam_norm[0, :, 0, 0], tau)
        thr[0] = tau_bg
        mask = cam_norm > thr[None, :, None, None]
    elif region == "sipe_seeds":
        if seeds is None:
            raise ValueError("region 'sipe_seeds' needs the seeds from sipe_seeds()")
        k = cam_norm.shape[1]
        mask = F.one_hot(seeds.long(), k).permute(0, 3, 1, 2).bool()
    else:
        raise ValueError(f"unknown region {region!r}")
    mask = mask.to(cam_norm.dtype)
    empty = mask.flatten(2).sum(2) == 0
    weights = torch.where(empty[:, :, None, None], cam_norm, mask)
    return weights * channel_valid(labels)[:, :, None, None].to(cam_norm.dtype)


def instance_prototypes(
    z: Tensor,
    cam_norm: Tensor,
    labels: Tensor,
    *,
    tau: float,
    tau_bg: float,
    region: Region,
    seeds: Tensor | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """Masked averages of z over each class region -> ((B, C+1, D), (B, C+1) valid).

    Unit norm unless normalize=False (see region_prototypes). Regions come from the detached
    CAM (a region is a selection, not a differentiable quantity); gradients reach z.
    Invalid (absent-class) prototypes are zero vectors.
    """
    weights = region_weights(
        cam_norm, labels, tau=tau, tau_bg=tau_bg, region=region, seeds=seeds
    )
    valid = channel_valid(labels)
    return region_prototypes(z, weights, valid, normalize), valid


def sipe_seeds(
    z_hier: Tensor,
    cam_norm: Tensor,
    labels: Tensor,
    iou: Literal["product", "minmax"] = "product",
) -> Tensor:
    """SIPE's seeds: each pixel goes to the channel whose CAM best matches its affinity row.

    S = relu(cos(z(x), z(y))) (B, hw, hw). Per channel c a soft IoU between the row S(x, .)
    and M_c: "product" is SIPE's code (inter = sum S M, union = sum S + sum M - inter);
    "minmax" is the Ruzicka form sum min(S, M) / sum max(S, M). Background IoU x 0.5 (as
    SIPE); argmax over background + present classes -> (B, h, w) long in [0, C].
    """
    with torch.no_grad():
        b, k, h, w = cam_norm.shape
        f = F.normalize(z_hier.detach().flatten(2).float(), dim=1, eps=1e-5)  # (B, D, n)
        s = F.relu(torch.bmm(f.transpose(1, 2), f))  # (B, n, n)
        m = cam_norm.detach().flatten(2).float()  # (B, K, n)
        s_sum = s.sum(2, keepdim=True)  # (B, n, 1)
        m_sum = m.sum(2)[:, None, :]  # (B, 1, K)
        if iou == "product":
            inter = torch.bmm(s, m.transpose(1, 2))  # (B, n, K)
        elif iou == "minmax":
            # Chunk over channels: the (B, n, n) minimum is materialised once per channel.
            inter = torch.stack(
                [torch.minimum(s, m[:, c, None, :]).sum(2) for c in range(k)], dim=2
            )
        else:
            raise ValueError(f"unknown iou {iou!r}")
        union = s_sum + m_sum - inter
        score = inter / union.clamp_min(1e-5)
        score[..., 0] *= 0.5
        valid = channel_valid(labels)[:, None, :]
        score = score.masked_fill(~valid, float("-inf"))
        return score.argmax(dim=2).view(b, h, w)
