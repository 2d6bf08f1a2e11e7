"""Permutohedral-lattice Gaussian filtering (Adams, Baek & Davis, Eurographics 2010).

Filtering N values with a d-dimensional Gaussian over per-point features costs O(N d^2)
instead of the O(N^2) of the dense sum: each point is splatted onto the d + 1 vertices of
the lattice simplex around it (barycentric weights), the lattice is blurred with a
[1/2, 1, 1/2] kernel along each of its d + 1 axes, and values are sliced back with the
same weights. This module follows the variant in Krähenbühl's dense-CRF code (the one
`pydensecrf` wraps, and so the one IRN's, CLIP-ES's and DeepLab's numbers were made
with): features scaled by sqrt(2/3) (d + 1) / sqrt((i + 1)(i + 2)), the [1/2, 1, 1/2]
blur without renormalisation, and the output scaled by 1 / (1 + 2^-d), so that a CRF
built on it gives the same marginals as `pydensecrf` up to float rounding
(tests/refine/test_crf.py pins this on stored `pydensecrf2` output).

The lattice is built once per feature set with vectorised torch operations (a sort
instead of a hash table) and stored as three kinds of sparse matrices: splat (lattice x
points), d + 1 blurs (lattice x lattice) and slice (points x lattice). Filtering is then
d + 3 sparse-dense products, on whatever device the features live on.
"""

from __future__ import annotations

import math
import warnings

import torch
from torch import Tensor

__all__ = ["PermutohedralLattice"]


def _round_half_away(x: Tensor) -> Tensor:
    """C's round(): halves go away from zero (torch.round rounds them to even)."""
    return torch.sign(x) * torch.floor(torch.abs(x) + 0.5)


def _csr(crow: Tensor, col: Tensor, values: Tensor, size: tuple[int, int]) -> Tensor:
    with warnings.catch_warnings():  # torch flags sparse CSR as beta once per process
        warnings.filterwarnings("ignore", message=".*Sparse CSR tensor support.*")
        return torch.sparse_csr_tensor(crow, col, values, size=size, check_invariants=False)


class PermutohedralLattice:
    """Approximate Gaussian filter exp(-|f_i - f_j|^2 / 2) over features `f` (N, d).

    `features` are already divided by the kernel's standard deviations. `filter(values)`
    returns, for values (N, C), sum_j k(f_i, f_j) values_j (the point itself included),
    with the lattice's approximation of k.
    """

    def __init__(self, features: Tensor) -> None:
        if features.ndim != 2 or min(features.shape) < 1:
            raise ValueError(f"features must be (N, d) with N, d >= 1, got "
                             f"{tuple(features.shape)}")
        if not torch.is_floating_point(features):
            raise ValueError(f"features must be floating point, got dtype {features.dtype}")
        if not bool(torch.isfinite(features).all()):
            raise ValueError("features contain NaN or infinite values")
        features = features.to(torch.float32)
        device = features.device
        n, d = features.shape
        self.num_points = n
        self.dim = d
        self.device = device

        # Elevate onto the hyperplane sum(x) = 0 of R^{d+1}, scaled so that the blur
        # below approximates a unit Gaussian.
        # Rounded as the C++ code rounds them: a float std, factors in double, then float.
        inv_std = float(torch.tensor(math.sqrt(2.0 / 3.0) * (d + 1), dtype=torch.float32))
        scale = torch.tensor([inv_std / math.sqrt((i + 1) * (i + 2)) for i in range(d)],
                             dtype=torch.float32, device=device)
        cf = features * scale
        suffix = torch.flip(torch.cumsum(torch.flip(cf, [1]), dim=1), [1])  # sum_{k>=j} cf_k
        elevated = torch.empty((n, d + 1), device=device, dtype=torch.float32)
        elevated[:, 0] = suffix[:, 0]
        elevated[:, 1:d] = suffix[:, 1:] - torch.arange(1, d, device=device) * cf[:, : d - 1]
        elevated[:, d] = -d * cf[:, d - 1]

        # Nearest remainder-0 lattice point, then the rank of each coordinate's residual.
        down = 1.0 / (d + 1)
        rounded = _round_half_away(elevated * down)
        rem0 = (rounded * (d + 1)).to(torch.int64)
        offset_sum = rounded.sum(dim=1).to(torch.int64)
        residual = elevated - rem0.to(torch.float32)
        # rank_i = #{j: r_j > r_i} + #{j < i: r_j == r_i} (the C++ pairwise count, ties to
        # the earlier coordinate): the position of i in a stable descending sort.
        by_size = torch.sort(residual, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(by_size)
        rank.scatter_(1, by_size, torch.arange(d + 1, device=device).expand(n, d + 1))
        rank += offset_sum[:, None]
        low, high = rank < 0, rank > d
        rank = rank + (d + 1) * low - (d + 1) * high
        rem0 = rem0 + (d + 1) * low - (d + 1) * high

        # Barycentric weights of the d + 1 enclosing vertices.
        v = (elevated - rem0.to(torch.float32)) * down
        bary = torch.zeros((n, d + 2), device=device, dtype=torch.float32)
        bary.scatter_add_(1, d - rank, v)
        bary.scatter_add_(1, d - rank + 1, -v)
        bary[:, 0] += 1.0 + bary[:, d + 1]
        weights = bary[:, : d + 1]

        # Vertex keys are rem0 + canonical(remainder, rank) on the first d coordinates (the
        # last follows from sum = 0). Each key is encoded as one int64 in mixed radix; its
        # code follows from the point's base code and the coordinates of the largest
        # ranks, so the (N, d + 1, d) keys are never formed.
        margin = 2 * (d + 1)  # keys lie within rem0 -+ (d + 1), blur neighbours within d more
        low = rem0[:, :d].min(dim=0).values - margin
        span = rem0[:, :d].max(dim=0).values + margin - low + 1
        if float(torch.log2(span.double()).sum()) > 62:
            raise ValueError("features span too large a range for int64 lattice keys")
        mult = torch.cumprod(torch.cat([span.new_ones(1), span[:-1]]), dim=0)
        mult_sum = int(mult.sum())
        base = ((rem0[:, :d] - low) * mult).sum(dim=1)
        by_rank = torch.zeros((n, d + 1), dtype=torch.int64, device=device)
        by_rank.scatter_(1, rank, torch.cat([mult, mult.new_zeros(1)]).expand(n, d + 1))
        # largest[:, r] = sum of mult over the coordinates ranked d - r + 1 .. d
        largest = torch.zeros_like(by_rank)
        largest[:, 1:] = torch.cumsum(torch.flip(by_rank, [1]), dim=1)[:, :d]
        remainder = torch.arange(d + 1, device=device)
        codes = (base[:, None] + remainder * mult_sum - (d + 1) * largest).reshape(-1)

        # Deduplicate vertices by sorting their codes (the C++ code uses a hash table).
        sorted_codes, order = torch.sort(codes, stable=True)
        new_vertex = torch.ones_like(sorted_codes, dtype=torch.bool)
        new_vertex[1:] = sorted_codes[1:] != sorted_codes[:-1]
        vertex_of_sorted = torch.cumsum(new_vertex, dim=0) - 1
        m = int(vertex_of_sorted[-1]) + 1
        self.num_vertices = m
        vertex = torch.empty_like(vertex_of_sorted)
        vertex[order] = vertex_of_sorted
        unique_codes = sorted_codes[new_vertex]

        # Splat (m x n): rows in vertex order come straight from the sort.
        counts = torch.bincount(vertex_of_sorted, minlength=m)
        self._splat_crow = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        self._splat_col = order // (d + 1)
        self._splat_weight = weights.reshape(-1)[order]
        # Slice (n x m): d + 1 entries per point, scaled by the C++ code's alpha.
        alpha = 1.0 / (1.0 + 2.0 ** (-d))
        self._slice_crow = torch.arange(0, n * (d + 1) + 1, d + 1, device=device)
        self._slice_col = vertex.reshape(n, d + 1)
        self._slice_weight = weights * alpha
        sorted_slice = torch.sort(self._slice_col, dim=1)
        self._slice_col = sorted_slice.values.reshape(-1)
        self._slice_weight = torch.gather(self._slice_weight, 1, sorted_slice.indices).reshape(-1)

        # Blur along each lattice axis: v_i + (v_n1 + v_n2) / 2, absent neighbours are 0.
        self._blurs = [
            self._blur_matrix(unique_codes, mult_sum - (d + 1) * int(mult[axis]) if axis < d
                              else mult_sum)
            for axis in range(d + 1)
        ]
        self._splat = _csr(self._splat_crow, self._splat_col, self._splat_weight, (m, n))
        self._slice = _csr(self._slice_crow, self._slice_col, self._slice_weight, (n, m))

    def _blur_matrix(self, unique_codes: Tensor, step: int) -> Tensor:
        """Neighbours along one axis are the keys +1 on every coordinate but that axis's
        (-d there), and the opposite: their codes are the vertex's code +- `step`. Codes
        are sorted, so a row's columns are (lower neighbour, itself, upper neighbour)."""
        m = self.num_vertices
        lower, upper = (-abs(step), abs(step))
        columns, present = [], []
        for code in (unique_codes + lower, unique_codes + upper):
            pos = torch.searchsorted(unique_codes, code).clamp_(max=m - 1)
            present.append(unique_codes[pos] == code)
            columns.append(pos)
        col = torch.stack([columns[0], torch.arange(m, device=self.device), columns[1]], dim=1)
        keep = torch.stack([present[0], torch.ones_like(present[0]), present[1]], dim=1)
        value = torch.tensor([0.5, 1.0, 0.5], device=self.device).expand(m, 3)
        crow = torch.cat([col.new_zeros(1), torch.cumsum(keep.sum(1), 0)])
        return _csr(crow, col[keep], value[keep], (m, m))

    def filter(self, values: Tensor) -> Tensor:
        """(N, C) -> (N, C): splat, blur along every axis, slice (float32)."""
        if values.ndim != 2 or values.shape[0] != self.num_points:
            raise ValueError(
                f"values must be ({self.num_points}, C), got {tuple(values.shape)}"
            )
        lattice = self._splat @ values.to(torch.float32)
        for blur in self._blurs:
            lattice = blur @ lattice
        return self._slice @ lattice

    def scaled(self, row_scale: Tensor, col_scale: Tensor) -> _ScaledFilter:
        """diag(row_scale) K diag(col_scale) as one precomputed operator (used for the CRF's
        symmetric normalisation and compatibility weight, folded into slice and splat)."""
        return _ScaledFilter(self, row_scale.to(torch.float32), col_scale.to(torch.float32))


class _ScaledFilter:
    def __init__(self, lattice: PermutohedralLattice, row: Tensor, col: Tensor) -> None:
        n, m = lattice.num_points, lattice.num_vertices
        self._splat = _csr(lattice._splat_crow, lattice._splat_col,
                           lattice._splat_weight * col[lattice._splat_col], (m, n))
        rows = torch.arange(n, device=row.device).repeat_interleave(lattice.dim + 1)
        self._slice = _csr(lattice._slice_crow, lattice._slice_col,
                           lattice._slice_weight * row[rows], (n, m))
        self._blurs = lattice._blurs

    def __call__(self, values: Tensor) -> Tensor:
        lattice = self._splat @ values
        for blur in self._blurs:
            lattice = blur @ lattice
        return self._slice @ lattice
