"""Feature distribution alignment: shift instance features towards their context (step 7)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def alignment_shift(p: Tensor, ctx: Tensor) -> Tensor:
    """delta = ctx - p (..., D): the optimal shift from instance to context distribution.

    Model the instance features of a class and its selected context cluster as Gaussians
    N(p, S) and N(ctx, S) with a shared covariance. Among translations x -> x + delta, the
    KL divergence KL(N(p + delta, S) || N(ctx, S)) = 1/2 (ctx - p - delta)^T S^-1 (...) is
    minimised (to zero) by delta = ctx - p; the 2-Wasserstein distance
    ||mu_1 - mu_2||^2 + B(S_1, S_2) has a translation-invariant covariance term, so the same
    difference of means is optimal for any covariances.
    """
    return ctx - p


def shift_features(z: Tensor, cam_norm_c: Tensor, delta: Tensor, beta: float) -> Tensor:
    """z (B, D, h, w) + beta * M_c(x) * delta (B, D): only the class's own region moves."""
    return z + beta * cam_norm_c[:, None] * delta[:, :, None, None]


def compactness_loss(z: Tensor, region: Tensor, p_star: Tensor) -> Tensor:
    """Mean over region pixels of 1 - cos(z(x), stopgrad(p*)).

    z (B, D, h, w); region (B, K, h, w) (binary or soft weights, zero for absent classes);
    p_star (B, K, D). Pulls the instance features into a compact cluster around p*.
    """
    zn = F.normalize(z, dim=1, eps=1e-8)
    ps = F.normalize(p_star.detach(), dim=-1, eps=1e-8)
    cos = torch.einsum("bdhw,bkd->bkhw", zn, ps)
    w = region.detach().to(z.dtype)
    total = w.sum()
    if total <= 0:
        return z.sum() * 0.0
    return ((1.0 - cos) * w).sum() / total
