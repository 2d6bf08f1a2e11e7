"""IRN's random walk: class maps propagated along pair affinities, blocked by boundaries.

With A the symmetric pair affinity matrix (1 on the diagonal, affinity^beta for pairs
within the radius, 0 beyond) and T = A D^-1 its column-normalised transition matrix, IRN
computes x T^(2^k) by squaring the dense N x N matrix T k times (`random_walk_dense`,
kept as the reference). Matrix products associate, so applying T to the maps 2^k times
gives the same result, and T has only 2P + 1 non-zeros per row (P pairs per pixel), so
`random_walk` applies it as a banded stencil on the grid: each step is, for every pixel,
a weighted sum of its own and its 2P neighbours' values. Memory is O(P N) instead of
O(N^2) and time O(2^k P N C) instead of O(k N^3); it is batched over images and runs on
any torch device. (T's columns sum to 1: a step moves each pixel's value to the average
of its neighbourhood weighted by affinity.)

`random_walk_labels` turns the propagated maps into labels as IRN does: upsample to the
image, divide by the global maximum, add a constant background plane, argmax.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from cpal.refine.irn import affinity_from_boundary, pair_offsets
from cpal.refine.registry import Refiner, register_refiner

__all__ = [
    "RandomWalkParams",
    "random_walk",
    "random_walk_dense",
    "random_walk_labels",
    "refine_by_random_walk",
    "stack_for_walk",
    "transition_stencil",
]


@dataclass(frozen=True)
class RandomWalkParams:
    """IRN's defaults: radius 5, beta 10, 2^8 steps, background score 0.25, maps at
    stride 4 of the image."""

    radius: int = 5
    beta: float = 10.0
    exp_times: int = 8
    bg_score: float = 0.25
    stride: int = 4

    def __post_init__(self) -> None:
        if self.radius < 2:
            raise ValueError(f"radius must be >= 2, got {self.radius}")
        if not self.beta > 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if not 0 <= self.exp_times <= 16:
            raise ValueError(f"exp_times must lie in [0, 16], got {self.exp_times}")
        if self.stride < 1:
            raise ValueError(f"stride must be >= 1, got {self.stride}")


def _check_inputs(maps: Tensor, boundary: Tensor) -> None:
    for name, tensor in (("maps", maps), ("boundary", boundary)):
        if not isinstance(tensor, Tensor):
            raise ValueError(f"{name} must be a torch tensor, got {type(tensor).__name__}")
        if not torch.is_floating_point(tensor):
            raise ValueError(f"{name} must be floating point, got dtype {tensor.dtype}")
    if maps.ndim != 4 or boundary.ndim != 3:
        raise ValueError(f"maps must be (B, C, H, W) and boundary (B, H, W), got shapes "
                         f"{tuple(maps.shape)} and {tuple(boundary.shape)}")
    if maps.shape[0] != boundary.shape[0] or maps.shape[2:] != boundary.shape[1:]:
        raise ValueError(f"maps {tuple(maps.shape)} and boundary {tuple(boundary.shape)} "
                         "differ in batch or grid size")
    if maps.device != boundary.device:
        raise ValueError(f"maps on {maps.device} but boundary on {boundary.device}")


def transition_stencil(boundary: Tensor, radius: int = 5,
                       beta: float = 10.0) -> tuple[Tensor, list[tuple[int, int]]]:
    """Weights (B, 2P + 1, H, W) and neighbour offsets of one random-walk step:
    out[j] = sum_k weight[k, j] * x[j + offset_k] equals (x T)[j], T = A D^-1."""
    aff = affinity_from_boundary(boundary, radius).clamp(min=0.0) ** beta  # (B, P, H, W)
    height, width = boundary.shape[-2:]
    pad = radius - 1
    offsets = pair_offsets(radius).offsets.tolist()
    # Pair p from j - o_p to j: its affinity sits at j - o_p; shift it onto j.
    padded = F.pad(aff, (pad, pad, pad, pad))
    backward = torch.stack([padded[:, p, pad - dy: pad - dy + height, pad - dx: pad - dx + width]
                            for p, (dy, dx) in enumerate(offsets)], dim=1)
    weights = torch.cat([torch.ones_like(aff[:, :1]), aff, backward], dim=1)
    weights = weights / weights.sum(dim=1, keepdim=True)  # the column sums of A
    neighbours = [(0, 0)] + [(dy, dx) for dy, dx in offsets] + [(-dy, -dx) for dy, dx in offsets]
    return weights, neighbours


def random_walk(maps: Tensor, boundary: Tensor,
                params: RandomWalkParams = RandomWalkParams()) -> Tensor:
    """Propagated maps (B, C, H, W) = (maps * (1 - boundary)) T^(2^exp_times), one image
    per batch entry, on the tensors' device (unbatched (C, H, W) and (H, W) work too).

    maps: class maps on the boundary's grid (IRN: CAMs at stride 4, foreground classes
    only); boundary: probabilities in [0, 1]. Images of different sizes batch together
    when padded with `stack_for_walk` (boundary 1 isolates the padding).
    """
    unbatched = isinstance(maps, Tensor) and maps.ndim == 3
    if unbatched:
        if not isinstance(boundary, Tensor) or boundary.ndim != 2:
            raise ValueError("unbatched maps (C, H, W) need an (H, W) boundary")
        maps, boundary = maps[None], boundary[None]
    _check_inputs(maps, boundary)
    weights, neighbours = transition_stencil(boundary.float(), params.radius, params.beta)
    height, width = maps.shape[-2:]
    pad = params.radius - 1
    x = maps.float() * (1.0 - boundary.float()).unsqueeze(1)
    self_weight = weights[:, :1]
    rest = [(weights[:, k: k + 1], pad + dy, pad + dx)
            for k, (dy, dx) in enumerate(neighbours) if k > 0]
    for _ in range(2 ** params.exp_times):
        padded = F.pad(x, (pad, pad, pad, pad))
        out = x * self_weight
        for weight, top, left in rest:
            out.addcmul_(weight, padded[..., top: top + height, left: left + width])
        x = out
    return x[0] if unbatched else x


def random_walk_dense(maps: Tensor, boundary: Tensor,
                      params: RandomWalkParams = RandomWalkParams()) -> Tensor:
    """IRN's propagate_to_edge, one image: the dense N x N affinity matrix, T = A^beta
    normalised over columns, squared exp_times times, then (maps * (1 - boundary)) T.
    O(N^2) memory and O(k N^3) time: the reference `random_walk` is tested against."""
    if not isinstance(maps, Tensor) or maps.ndim != 3:
        raise ValueError("maps must be a (C, H, W) tensor")
    if not isinstance(boundary, Tensor) or boundary.ndim != 2:
        raise ValueError("boundary must be an (H, W) tensor")
    _check_inputs(maps[None], boundary[None])
    height, width = boundary.shape
    n = height * width
    device = boundary.device
    aff = affinity_from_boundary(boundary.float(), params.radius)  # (P, H, W)
    index = torch.arange(n, device=device).reshape(height, width)
    dense = torch.eye(n, device=device)
    for p, (dy, dx) in enumerate(pair_offsets(params.radius).offsets.tolist()):
        ys = slice(0, height - dy)
        xs = slice(max(0, -dx), width - max(0, dx))
        src = index[ys, xs].reshape(-1)
        dst = index[dy:height, max(0, -dx) + dx: width - max(0, dx) + dx].reshape(-1)
        value = aff[p, ys, xs].reshape(-1)
        dense[src, dst] = value
        dense[dst, src] = value
    trans = dense ** params.beta
    del dense
    trans /= trans.sum(dim=0, keepdim=True)
    for _ in range(params.exp_times):
        trans = trans @ trans
    x = maps.float() * (1.0 - boundary.float())
    return (x.reshape(-1, n) @ trans).reshape(-1, height, width)


def stack_for_walk(maps: Sequence[Tensor], boundaries: Sequence[Tensor]) -> tuple[Tensor, Tensor]:
    """Batch (C_i, H_i, W_i) maps and (H_i, W_i) boundaries of different sizes: maps padded
    with 0 (channels and grid), boundaries with 1, so that padding has zero affinity to
    every pixel and each image walks as if alone. Crop result i to its (C_i, H_i, W_i)."""
    if len(maps) != len(boundaries) or not maps:
        raise ValueError(f"{len(maps)} maps and {len(boundaries)} boundaries: need as many, >= 1")
    for i, (m, b) in enumerate(zip(maps, boundaries, strict=True)):
        if m.ndim != 3 or b.ndim != 2 or m.shape[1:] != b.shape:
            raise ValueError(f"item {i}: maps {tuple(m.shape)} do not match boundary "
                             f"{tuple(b.shape)}")
    channels = max(m.shape[0] for m in maps)
    height = max(b.shape[0] for b in boundaries)
    width = max(b.shape[1] for b in boundaries)
    device = boundaries[0].device
    out_maps = torch.zeros(len(maps), channels, height, width, device=device)
    out_boundary = torch.ones(len(maps), height, width, device=device)
    for i, (m, b) in enumerate(zip(maps, boundaries, strict=True)):
        out_maps[i, : m.shape[0], : m.shape[1], : m.shape[2]] = m
        out_boundary[i, : b.shape[0], : b.shape[1]] = b
    return out_maps, out_boundary


def random_walk_labels(propagated: Tensor, classes: np.ndarray | Sequence[int],
                       size: tuple[int, int] | None = None,
                       params: RandomWalkParams = RandomWalkParams(),
                       own_background: bool = False) -> np.ndarray:
    """(H, W) uint8 labels from propagated maps (C, h, w), as IRN's make_sem_seg_labels:
    upsampled by `params.stride` (bilinear) and cropped to `size` (default: the grid),
    divided by their global maximum, background plane `params.bg_score`, argmax (ties go
    to background), channel -> dataset class via `classes`.

    own_background: channel 0 is the maps' own background, walked with the classes
    (SIPE's make_seg_labels): it takes the plane's place, and `classes` names the others."""
    if not isinstance(propagated, Tensor) or propagated.ndim != 3:
        raise ValueError("propagated must be a (C, h, w) tensor")
    if not torch.is_floating_point(propagated):
        raise ValueError(f"propagated must be floating point, got dtype {propagated.dtype}")
    keys = np.concatenate([[0], np.asarray(classes, dtype=np.int64)])
    if len(keys) != propagated.shape[0] + (0 if own_background else 1):
        raise ValueError(f"{len(keys) - 1} classes given for {propagated.shape[0]} channels"
                         + (" (the first the background)" if own_background else ""))
    maps = propagated.float()
    if size is not None:
        height, width = size
        if height > maps.shape[1] * params.stride or width > maps.shape[2] * params.stride:
            raise ValueError(f"size {size} exceeds the grid {tuple(maps.shape[1:])} x stride "
                             f"{params.stride}")
        if params.stride != 1:
            maps = F.interpolate(maps[None], scale_factor=params.stride, mode="bilinear",
                                 align_corners=False)[0]
        maps = maps[:, :height, :width]
    if maps.shape[0] == 0:
        return np.zeros(maps.shape[1:], dtype=np.uint8)
    peak = maps.max()
    if not peak > 0:  # nothing propagated: all background
        return np.zeros(maps.shape[1:], dtype=np.uint8)
    maps = maps / peak
    stacked = maps if own_background else torch.cat(
        [torch.full_like(maps[:1], params.bg_score), maps])
    return keys[stacked.argmax(dim=0).cpu().numpy()].astype(np.uint8)


def refine_by_random_walk(maps: Tensor, boundary: Tensor, classes: np.ndarray | Sequence[int],
                          size: tuple[int, int] | None = None,
                          params: RandomWalkParams = RandomWalkParams()) -> np.ndarray:
    """One image's labels (H, W) from its class maps (C, h, w) on the boundary's grid
    (h, w): `random_walk`, then `random_walk_labels` (IRN's make_sem_seg_labels)."""
    return random_walk_labels(random_walk(maps, boundary, params), classes, size, params)


register_refiner(Refiner(
    name="random_walk",
    summary="IRN's random walk of class maps along boundary-blocked affinities",
    inputs=("maps", "boundary", "classes", "size"),
    refine=refine_by_random_walk,
    params=RandomWalkParams(),
))
