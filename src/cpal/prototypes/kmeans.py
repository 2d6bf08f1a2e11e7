"""Spherical k-means, batched over groups (one group per bank channel) (step 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _uniform(
    shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device
) -> Tensor:
    """Uniform draws from `generator` (any device), moved to `device`.

    A private generator keeps the global RNG stream (data augmentation, dropout) untouched,
    so switching the bank on or off does not change the rest of a run.
    """
    if generator is None:
        generator = torch.Generator().manual_seed(0)
    u = torch.rand(shape, generator=generator, device=generator.device)
    return u.to(device)


def _pick(weights: Tensor, u: Tensor) -> Tensor:
    """Inverse-CDF sampling: row-wise index with probability proportional to weights (G, n)."""
    cdf = weights.cumsum(dim=1)
    target = u[:, None] * cdf[:, -1:]
    idx = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return idx.clamp_max(weights.shape[1] - 1)


def spherical_kmeans_batched(
    x: Tensor,
    mask: Tensor,
    k: int,
    iters: int,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor, Tensor]:
    """k-means on the unit sphere for G groups at once.

    x (G, n, D) unit rows, mask (G, n) bool (which rows are real). Returns centroids
    (G, k, D), member counts (G, k) and a valid mask (G, k) (k' = min(k, n_g) per group).
    k-means++ initialisation on the cosine distance, cosine assignment, centroid =
    normalised member mean, empty clusters re-seeded at the worst-fitting points.

    normalize=False (raw prototypes, `prototype.normalize`): rows may have any norm; the
    clustering itself runs on their directions as above (clusters are attributes, not
    magnitudes), and each returned centroid is the raw mean of its members' rows, so its
    norm keeps the members' consistency. A cluster left without members then has no mean
    and is returned invalid (zero centroid, count 0).
    """
    raw = x
    if not normalize:
        x = F.normalize(x, dim=2, eps=1e-12)
    g, n, d = x.shape
    device, dtype = x.device, x.dtype
    k = max(1, min(k, n))
    maskf = mask.to(dtype)
    n_valid = mask.sum(1)  # (G,)
    cvalid = torch.arange(k, device=device)[None, :] < n_valid[:, None]  # (G, k)
    u = _uniform((k, g), generator, device)
    rows = torch.arange(g, device=device)
    # (G, D, n) layout: centroid-times-points products are row-vector/matrix products,
    # several times faster on CPU than the (G, n, D) matrix-vector form.
    xt = x.transpose(1, 2).contiguous()

    # k-means++ seeding: first centre uniform over real rows, then proportional to d^2.
    cent = torch.zeros(g, k, d, device=device, dtype=dtype)
    idx = _pick(maskf + 1e-12 * (maskf.sum(1, keepdim=True) == 0), u[0])
    cent[:, 0] = x[rows, idx]
    best = torch.bmm(cent[:, :1], xt).squeeze(1)  # (G, n) best cosine so far
    for j in range(1, k):
        dist = (1.0 - best).clamp_min(0) ** 2 * maskf
        # All remaining distances zero (duplicates): fall back to uniform over real rows.
        none_left = dist.sum(1, keepdim=True) <= 1e-12
        dist = torch.where(none_left, maskf + 1e-12, dist)
        idx = _pick(dist, u[j])
        cent[:, j] = x[rows, idx]
        best = torch.maximum(best, torch.bmm(cent[:, j : j + 1], xt).squeeze(1))

    neg = torch.finfo(dtype).min
    n_reseed = min(k, n)
    for _ in range(iters):
        sim = torch.bmm(cent, xt).masked_fill(~cvalid[:, :, None], neg)  # (G, k, n)
        fit, assign = sim.max(dim=1)
        onehot = torch.zeros_like(sim).scatter_(1, assign[:, None], 1.0) * maskf[:, None]
        counts = onehot.sum(2)
        new = F.normalize(torch.bmm(onehot, x), dim=2, eps=1e-12)
        # Re-seed empty (but valid) clusters with the worst-fitting real points, one each.
        empty = (counts == 0) & cvalid
        fit = fit.masked_fill(~mask, float("inf"))
        worst = fit.topk(n_reseed, dim=1, largest=False).indices  # (G, n_reseed)
        rank = (empty.long().cumsum(1) - 1).clamp(0, n_reseed - 1)
        reseed = x[rows[:, None], worst.gather(1, rank)]
        cent = torch.where(empty[:, :, None], reseed, new)

    sim = torch.bmm(cent, xt).masked_fill(~cvalid[:, :, None], neg)
    assign = sim.argmax(dim=1)
    onehot = torch.zeros_like(sim).scatter_(1, assign[:, None], 1.0) * maskf[:, None]
    counts = onehot.sum(2)
    if not normalize:
        cvalid = cvalid & (counts > 0)
        cent = torch.bmm(onehot, raw) / counts.clamp_min(1.0)[:, :, None]
    cent = cent * cvalid[:, :, None].to(dtype)
    return cent, counts * cvalid.to(dtype), cvalid


def spherical_kmeans(
    x: Tensor,
    k: int,
    iters: int,
    generator: torch.Generator | None = None,
    normalize: bool = True,
) -> tuple[Tensor, Tensor]:
    """x (n, D) rows -> centroids (k', D) and member counts (k',) of the valid clusters
    (k' = min(k, n), fewer when normalize=False leaves a cluster empty)."""
    n = x.shape[0]
    if n == 0:
        return x.new_zeros(0, x.shape[1]), x.new_zeros(0)
    mask = torch.ones(1, n, dtype=torch.bool, device=x.device)
    cent, counts, valid = spherical_kmeans_batched(
        x[None], mask, k, iters, generator, normalize=normalize
    )
    return cent[0][valid[0]], counts[0][valid[0]]
