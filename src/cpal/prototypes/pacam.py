"""The prototype-aware CAM (PACAM) and the self-supervision loss (docs/method.md, steps 8-9)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

SelfAverage = Literal["all", "present"]


def max_normalise(act: Tensor, valid: Tensor, eps: float = 1e-5) -> Tensor:
    """relu(act) / (per-channel max + eps), invalid channels zero: SIPE's IS-CAM scaling."""
    act = F.relu(act)
    peak = act.flatten(2).amax(dim=2)[..., None, None]
    return act / (peak + eps) * valid[:, :, None, None].to(act.dtype)


def prototype_similarity(z: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    """relu(cos(z(x), p_k)) (B, K, h, w), not normalised; invalid channels zero.

    z (B, D, h, w) shared by every channel, or (B, K, D, h, w) shifted per channel;
    prototypes (B, K, D). A zero prototype (an empty seed) gives a zero map, as SIPE's
    cosine with a zero vector.
    """
    p = F.normalize(prototypes, dim=-1, eps=1e-8)
    if z.dim() == 4:
        zn = F.normalize(z, dim=1, eps=1e-8)
        cos = torch.einsum("bdhw,bkd->bkhw", zn, p)
    else:
        zn = F.normalize(z, dim=2, eps=1e-8)
        cos = torch.einsum("bkdhw,bkd->bkhw", zn, p)
    return F.relu(cos) * valid[:, :, None, None].to(cos.dtype)


def prototype_cam(z: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    """`prototype_similarity`, max-normalised per channel: (B, K, h, w) in [0, 1]."""
    return max_normalise(prototype_similarity(z, prototypes, valid), valid)


def shifted_prototype_similarity(
    z: Tensor,
    cam_norm: Tensor,
    delta: Tensor,
    beta: float,
    prototypes: Tensor,
    valid: Tensor,
) -> Tensor:
    """relu(cos(z'_c, p_c)) of z'_c = z + beta M_c delta_c, without materialising
    (B, K, D, h, w). z is taken at unit length per pixel (the shift is in prototype units).

    cos(z'_c, p_c) = (z.p + beta m delta.p) / ||z'_c|| with
    ||z'_c||^2 = ||z||^2 + 2 beta m z.delta + beta^2 m^2 ||delta||^2, all from (B, K, h, w)
    dot products: memory O(B K hw) instead of O(B K D hw).
    """
    z = F.normalize(z, dim=1, eps=1e-8)
    p = F.normalize(prototypes, dim=-1, eps=1e-8)
    m = beta * cam_norm
    zp = torch.einsum("bdhw,bkd->bkhw", z, p)
    zd = torch.einsum("bdhw,bkd->bkhw", z, delta)
    dp = (delta * p).sum(-1)[:, :, None, None]
    dd = (delta * delta).sum(-1)[:, :, None, None]
    zz = (z * z).sum(1, keepdim=True)
    norm2 = zz + 2 * m * zd + m * m * dd
    cos = (zp + m * dp) / norm2.clamp_min(1e-16).sqrt()
    return F.relu(cos) * valid[:, :, None, None].to(cos.dtype)


def shifted_prototype_cam(
    z: Tensor, cam_norm: Tensor, delta: Tensor, beta: float, prototypes: Tensor, valid: Tensor
) -> Tensor:
    """`shifted_prototype_similarity`, max-normalised per channel."""
    sim = shifted_prototype_similarity(z, cam_norm, delta, beta, prototypes, valid)
    return max_normalise(sim, valid)


def self_supervision_loss(
    cam_norm: Tensor, pacam: Tensor, valid: Tensor, average: SelfAverage = "all"
) -> Tensor:
    """|M - PACAM| averaged (SIPE's GSC loss). No stop-gradient: the CAM is pulled towards
    the prototype map and the embedding towards the CAM.

    average="all" (SIPE): the mean over every channel (absent ones are 0 - 0) and every
    pixel of the batch, padded ones included (the CAM is zero there). "present": the mean
    over the background and present-class channels only (this library's earlier choice),
    which weighs the loss (C+1) / (1 + #present) times more.
    """
    if average == "all":
        return (cam_norm - pacam).abs().mean()
    if average != "present":
        raise ValueError(f"unknown self-supervision average {average!r}")
    v = valid[:, :, None, None].to(cam_norm.dtype)
    n = v.sum() * cam_norm.shape[-1] * cam_norm.shape[-2]
    return ((cam_norm - pacam).abs() * v).sum() / n.clamp_min(1.0)
