"""The prototype-aware CAM (PACAM) and the self-supervision loss (steps 8-9)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _max_normalise(act: Tensor, valid: Tensor, eps: float = 1e-5) -> Tensor:
    act = F.relu(act)
    peak = act.flatten(2).amax(dim=2)[..., None, None]
    return act / (peak + eps) * valid[:, :, None, None].to(act.dtype)


def prototype_cam(z_per_channel: Tensor, prototypes: Tensor, valid: Tensor) -> Tensor:
    """relu(cos(z, p)) per channel, max-normalised, invalid channels zero: (B, K, h, w) in [0, 1].

    z_per_channel is (B, K, D, h, w) (embeddings shifted per channel) or (B, D, h, w)
    (shared); prototypes (B, K, D).
    """
    p = F.normalize(prototypes, dim=-1, eps=1e-8)
    if z_per_channel.dim() == 4:
        zn = F.normalize(z_per_channel, dim=1, eps=1e-8)
        cos = torch.einsum("bdhw,bkd->bkhw", zn, p)
    else:
        zn = F.normalize(z_per_channel, dim=2, eps=1e-8)
        cos = torch.einsum("bkdhw,bkd->bkhw", zn, p)
    return _max_normalise(cos, valid)


def shifted_prototype_cam(
    z: Tensor,
    cam_norm: Tensor,
    delta: Tensor,
    beta: float,
    prototypes: Tensor,
    valid: Tensor,
) -> Tensor:
    """prototype_cam of z'_c = z + beta M_c delta_c without materialising (B, K, D, h, w).

    cos(z'_c, p_c) = (z.p + beta m delta.p) / ||z'_c|| with
    ||z'_c||^2 = ||z||^2 + 2 beta m z.delta + beta^2 m^2 ||delta||^2, all from (B, K, h, w)
    dot products: memory O(B K hw) instead of O(B K D hw).
    """
    p = F.normalize(prototypes, dim=-1, eps=1e-8)
    m = beta * cam_norm
    zp = torch.einsum("bdhw,bkd->bkhw", z, p)
    zd = torch.einsum("bdhw,bkd->bkhw", z, delta)
    dp = (delta * p).sum(-1)[:, :, None, None]
    dd = (delta * delta).sum(-1)[:, :, None, None]
    zz = (z * z).sum(1, keepdim=True)
    norm2 = zz + 2 * m * zd + m * m * dd
    cos = (zp + m * dp) / norm2.clamp_min(1e-16).sqrt()
    return _max_normalise(cos, valid)


def self_supervision_loss(cam_norm: Tensor, pacam: Tensor, valid: Tensor) -> Tensor:
    """mean |M - PACAM| over background + present-class channels (SIPE's GSC loss).

    No stop-gradient: the CAM is pulled towards the prototype map and the embedding towards
    the CAM, as in SIPE.
    """
    v = valid[:, :, None, None].to(cam_norm.dtype)
    n = v.sum() * cam_norm.shape[-1] * cam_norm.shape[-2]
    return ((cam_norm - pacam).abs() * v).sum() / n.clamp_min(1.0)
