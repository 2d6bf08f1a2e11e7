"""Fully connected CRF with Gaussian edge potentials (Krähenbühl & Koltun, NIPS 2011).

Mean-field inference over all pixel pairs of one image, with a Gaussian (position) kernel
and a bilateral (position + RGB) kernel, Potts compatibility, symmetric kernel
normalisation, and the unary either -log p of probabilities or IRN's "gt_prob" unary of a
label map. Presets hold the parameter sets of the reference recipes (`PRESETS`).

Why our own implementation and not `pydensecrf2`: `pydensecrf2` (and `pydensecrf`) ship
source only for current Python on Linux; building them needs a C++ compiler, Python
headers and a pinned Cython 0.29.36 fetched at install time, which ties `make test` on a
fresh machine to a toolchain and to a Cython that newer Pythons do not support. This
module is ~300 lines of vectorised torch: nothing to compile, the same code on CPU and
CUDA, and, because it runs the same permutohedral-lattice algorithm as Krähenbühl's C++
code (`cpal.refine.lattice`), the same marginals as `pydensecrf` up to float rounding
(tests/refine/test_crf.py compares with stored `pydensecrf2` output and with an exact
O(N^2) mean field). The price is CPU speed: on one thread it runs 1.4-2.4x slower than
pydensecrf2 (benchmarks/crf.py: 0.4-0.7 images/s at 320x480 and 21 labels, ~0.8 s per
image at IRN's usual 3 labels); worker processes (`map_images`) and CUDA make up for it.
The position kernel depends on the image size only and is cached per size.

Semantics, as in Krähenbühl's code: Q_0 = softmax(-U); each of `iterations` steps sets
Q = softmax(-U + sum_k w_k Kn_k Q) with Kn_k = D_k^-1/2 K_k D_k^-1/2, K_k the kernel over
all pixel pairs *including* each pixel with itself, and D_k = diag(K_k 1). Position
features are (column / sxy, row / sxy), colour features channel / srgb.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from cpal.io import IGNORE_INDEX
from cpal.refine.lattice import PermutohedralLattice
from cpal.refine.registry import Refiner, register_refiner
from cpal.registry import Registry

__all__ = [
    "PRESETS",
    "CRFParams",
    "crf_labels",
    "dense_crf",
    "dense_crf_group",
    "mean_field_exact",
    "refine_label_group",
    "refine_labels",
    "refine_probabilities",
    "unary_from_labels",
    "unary_from_probabilities",
]

UnaryKind = Literal["probabilities", "labels"]


@dataclass(frozen=True)
class CRFParams:
    """One CRF parameter set. Compatibility weights `*_compat` are the Potts weights w_k.

    unary: what the recipe feeds the CRF ("probabilities": -log p clipped at `clip`;
      "labels": a label map with `gt_prob` on the given label, IRN's way).
    confidence: when set, pixels whose largest marginal is below it become ignore
      (CLIP-ES keeps a pseudo-label pixel only if its CRF marginal is >= 0.95).
    """

    iterations: int = 10
    gaussian_sxy: float = 3.0
    gaussian_compat: float = 3.0
    bilateral_sxy: float = 50.0
    bilateral_srgb: float = 5.0
    bilateral_compat: float = 10.0
    unary: UnaryKind = "labels"
    gt_prob: float = 0.7
    clip: float = 1e-5
    confidence: float | None = None

    def __post_init__(self) -> None:
        if self.iterations < 0:
            raise ValueError(f"iterations must be >= 0, got {self.iterations}")
        for name in ("gaussian_sxy", "bilateral_sxy", "bilateral_srgb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.unary not in ("probabilities", "labels"):
            raise ValueError(f"unary must be 'probabilities' or 'labels', got {self.unary!r}")
        if not 0 < self.gt_prob < 1:
            raise ValueError(f"gt_prob must lie in (0, 1), got {self.gt_prob}")
        if not 0 < self.clip < 1:
            raise ValueError(f"clip must lie in (0, 1), got {self.clip}")
        if self.confidence is not None and not 0 < self.confidence <= 1:
            raise ValueError(f"confidence must lie in (0, 1], got {self.confidence}")


PRESETS: Registry[CRFParams] = Registry("CRF preset")
# IRN's cam_to_ir_label: imutils.crf_inference_label (label unary, gt_prob 0.7).
PRESETS.register("irn", CRFParams())
# CLIP-ES's eval_cam_with_crf.py: unary_from_softmax of [1 - max(cams), cams], the
# DeepLab parameters, and pixels below 0.95 confidence ignored in the pseudo masks.
# (CLIP-ES feeds the bilateral kernel a mean-subtracted BGR image cast to uint8, which
# wraps; this preset takes the plain RGB image.)
PRESETS.register("clip_es", CRFParams(
    gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
    bilateral_compat=4.0, unary="probabilities", confidence=0.95))
# DeepLab-v2's test-time CRF (deeplab-pytorch: gaussian w 3 xy 1, bilateral w 4 xy 67
# rgb 3, 10 iterations) on the network's softmax.
PRESETS.register("deeplab", CRFParams(
    gaussian_sxy=1.0, gaussian_compat=3.0, bilateral_sxy=67.0, bilateral_srgb=3.0,
    bilateral_compat=4.0, unary="probabilities"))


def _check_image(image: np.ndarray | Tensor, height: int | None = None,
                 width: int | None = None) -> Tensor:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8:
            raise ValueError(f"image must be uint8 RGB (H, W, 3), got dtype {image.dtype}")
        image = torch.from_numpy(np.ascontiguousarray(image))
    elif image.dtype != torch.uint8:
        raise ValueError(f"image must be uint8 RGB (H, W, 3), got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image must be (H, W, 3), got shape {tuple(image.shape)}")
    if height is not None and tuple(image.shape[:2]) != (height, width):
        raise ValueError(
            f"image size {tuple(image.shape[:2])} != maps size {(height, width)}"
        )
    return image


def _as_float_maps(name: str, maps: np.ndarray | Tensor) -> Tensor:
    tensor = torch.from_numpy(np.asarray(maps)) if isinstance(maps, np.ndarray) else maps
    if not torch.is_floating_point(tensor):
        raise ValueError(f"{name} must be floating point (L, H, W), got dtype {tensor.dtype}")
    if tensor.ndim != 3 or tensor.shape[0] < 1:
        raise ValueError(f"{name} must be (L, H, W) with L >= 1, got shape {tuple(tensor.shape)}")
    if not bool(torch.isfinite(tensor).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    return tensor.to(torch.float32)


def unary_from_probabilities(probs: np.ndarray | Tensor, clip: float = 1e-5) -> Tensor:
    """(L, H, W) unary energy -log(clip(p, clip, 1)); `p` is not renormalised (as
    pydensecrf's unary_from_softmax, which CLIP-ES feeds [1 - max(cams), cams])."""
    probs = _as_float_maps("probabilities", probs)
    return -torch.log(probs.clamp(min=clip, max=1.0))


def unary_from_labels(labels: np.ndarray | Tensor, num_labels: int,
                      gt_prob: float = 0.7) -> Tensor:
    """(L, H, W) unary: -log(gt_prob) on each pixel's label, -log((1 - gt_prob) / (L - 1))
    on every other (pydensecrf's unary_from_labels with zero_unsure=False, as IRN uses)."""
    tensor = torch.from_numpy(np.asarray(labels)) if isinstance(labels, np.ndarray) else labels
    if tensor.dtype.is_floating_point or tensor.dtype == torch.bool or tensor.is_complex():
        raise ValueError(f"labels must hold integer indices (H, W), got dtype {tensor.dtype}")
    if tensor.ndim != 2:
        raise ValueError(f"labels must be (H, W), got shape {tuple(tensor.shape)}")
    if num_labels < 2:
        raise ValueError(f"num_labels must be >= 2, got {num_labels}")
    if not 0 < gt_prob < 1:
        raise ValueError(f"gt_prob must lie in (0, 1), got {gt_prob}")
    tensor = tensor.to(torch.int64)
    if tensor.numel() and (int(tensor.min()) < 0 or int(tensor.max()) >= num_labels):
        raise ValueError(f"labels must lie in [0, {num_labels}), got values in "
                         f"[{int(tensor.min())}, {int(tensor.max())}]")
    off = float(-np.log((1.0 - gt_prob) / (num_labels - 1)))
    unary = torch.full((num_labels, *tensor.shape), off, dtype=torch.float32,
                       device=tensor.device)
    unary.scatter_(0, tensor[None], float(-np.log(gt_prob)))
    return unary


def _features(image: Tensor, sxy: float, srgb: float | None) -> Tensor:
    height, width = image.shape[:2]
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float32, device=image.device),
                            torch.arange(width, dtype=torch.float32, device=image.device),
                            indexing="ij")
    columns = [xs.reshape(-1) / sxy, ys.reshape(-1) / sxy]
    if srgb is not None:
        rgb = image.reshape(-1, 3).to(torch.float32) / srgb
        columns += [rgb[:, 0], rgb[:, 1], rgb[:, 2]]
    return torch.stack(columns, dim=1)


def _normalised_kernel(features: Tensor, compat: float) -> Callable[[Tensor], Tensor]:
    """Q -> compat D^-1/2 K D^-1/2 Q with K the lattice filter over `features`."""
    lattice = PermutohedralLattice(features)
    norm = lattice.filter(torch.ones(features.shape[0], 1, device=features.device))[:, 0]
    inv_sqrt = 1.0 / torch.sqrt(norm + 1e-20)
    return lattice.scaled(compat * inv_sqrt, inv_sqrt)


@functools.lru_cache(maxsize=8)
def _position_kernel(height: int, width: int, sxy: float, compat: float,
                     device: str) -> Callable[[Tensor], Tensor]:
    """The position kernel depends on the image size only: built once per size (VOC's
    images come in few sizes), per process."""
    image = torch.zeros((height, width, 3), dtype=torch.uint8, device=device)
    return _normalised_kernel(_features(image, sxy, None), compat)


def dense_crf(image: np.ndarray | Tensor, unary: np.ndarray | Tensor, params: CRFParams,
              device: torch.device | str | None = None) -> Tensor:
    """Marginals Q (L, H, W) float32 of the dense CRF with unary energy `unary` (L, H, W).

    `image` is uint8 RGB (H, W, 3) of the same size. Runs on `device` (default: the
    unary's); returns a tensor there.
    """
    unary = _as_float_maps("unary", unary)
    return dense_crf_group(image, unary[None], params, device)[0]


def dense_crf_group(image: np.ndarray | Tensor, unaries: np.ndarray | Tensor,
                    params: CRFParams, device: torch.device | str | None = None) -> Tensor:
    """Marginals (G, L, H, W) of G independent CRFs on one image, unaries (G, L, H, W).

    The mean-field update is linear in Q per label before each softmax, so the G fields
    share one lattice per kernel and one filtering pass over G x L columns (IRN's two IR
    label CRFs cost little more than one): the same marginals as G `dense_crf` calls.
    """
    tensor = (torch.from_numpy(np.asarray(unaries)) if isinstance(unaries, np.ndarray)
              else unaries)
    if tensor.ndim != 4 or min(tensor.shape[:2]) < 1:
        raise ValueError(f"unaries must be (G, L, H, W) with G, L >= 1, got shape "
                         f"{tuple(tensor.shape)}")
    groups, num_labels, height, width = tensor.shape
    unary = _as_float_maps("unary", tensor.reshape(groups * num_labels, height, width))
    image = _check_image(image, height, width)
    device = torch.device(device) if device is not None else unary.device
    # (N, G * L): column g * L + l is label l of field g.
    unary = unary.to(device).reshape(groups * num_labels, -1).T.contiguous()
    image = image.to(device)
    kernels = []
    if params.gaussian_compat != 0:
        kernels.append(_position_kernel(height, width, params.gaussian_sxy,
                                        params.gaussian_compat, str(device)))
    if params.bilateral_compat != 0:
        features = _features(image, params.bilateral_sxy, params.bilateral_srgb)
        kernels.append(_normalised_kernel(features, params.bilateral_compat))
    logits = -unary

    def softmax(energy: Tensor) -> Tensor:
        return torch.softmax(energy.view(-1, groups, num_labels), dim=2).view(-1, groups
                                                                              * num_labels)

    q = softmax(logits)
    for _ in range(params.iterations):
        energy = logits
        for kernel in kernels:
            energy = kernel(q).add_(energy)  # a fresh tensor each time: logits stay intact
        q = softmax(energy)
    return q.T.reshape(groups, num_labels, height, width)


def mean_field_exact(image: np.ndarray | Tensor, unary: np.ndarray | Tensor,
                     params: CRFParams) -> Tensor:
    """The same mean field with the exact O(N^2) Gaussian kernels (float64): the
    reference the lattice is tested against, for images of at most a few thousand pixels."""
    unary = _as_float_maps("unary", unary).double()
    num_labels, height, width = unary.shape
    image = _check_image(image, height, width)
    if height * width > 4096:
        raise ValueError(f"mean_field_exact is O(N^2): {height * width} pixels is too many")
    logits = -unary.reshape(num_labels, -1).T
    kernels = []
    for sxy, srgb, compat in ((params.gaussian_sxy, None, params.gaussian_compat),
                              (params.bilateral_sxy, params.bilateral_srgb,
                               params.bilateral_compat)):
        f = _features(image, sxy, srgb).double()
        k = torch.exp(-0.5 * torch.cdist(f, f) ** 2)
        inv_sqrt = 1.0 / torch.sqrt(k.sum(dim=1))
        kernels.append(compat * inv_sqrt[:, None] * k * inv_sqrt[None, :])
    q = torch.softmax(logits, dim=1)
    for _ in range(params.iterations):
        q = torch.softmax(logits + sum(k @ q for k in kernels), dim=1)
    return q.T.reshape(num_labels, height, width).float()


def crf_labels(q: np.ndarray | Tensor, confidence: float | None = None,
               ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """(H, W) int64 argmax of marginals (L, H, W); `ignore_index` where the largest marginal
    is below `confidence` (ties go to the lower label, as np.argmax)."""
    q = _as_float_maps("marginals", q)
    best, label = q.max(dim=0)
    label = label.cpu().numpy().astype(np.int64)
    if confidence is not None:
        label[(best < confidence).cpu().numpy()] = ignore_index
    return label


def refine_probabilities(image: np.ndarray | Tensor, probs: np.ndarray | Tensor,
                         params: CRFParams = PRESETS["clip_es"],
                         device: torch.device | str | None = None) -> np.ndarray:
    """Label indices into `probs`' channels (H, W) int64 after the CRF on -log p, with
    `params.confidence` applied (ignore index 255)."""
    q = dense_crf(image, unary_from_probabilities(probs, params.clip), params, device)
    return crf_labels(q, params.confidence)


def refine_labels(image: np.ndarray | Tensor, labels: np.ndarray | Tensor, num_labels: int,
                  params: CRFParams = PRESETS["irn"],
                  device: torch.device | str | None = None) -> np.ndarray:
    """Label map (H, W) of values in [0, num_labels) cleaned by the CRF on IRN's gt_prob
    unary; returns (H, W) int64 labels (ignore index where `params.confidence` says)."""
    q = dense_crf(image, unary_from_labels(labels, num_labels, params.gt_prob), params, device)
    return crf_labels(q, params.confidence)


def refine_label_group(image: np.ndarray | Tensor, labels: Sequence[np.ndarray | Tensor],
                       num_labels: int, params: CRFParams = PRESETS["irn"],
                       device: torch.device | str | None = None) -> list[np.ndarray]:
    """`refine_labels` of several label maps of one image in one grouped mean field
    (`dense_crf_group`): one (H, W) int64 result per map."""
    unaries = torch.stack([unary_from_labels(x, num_labels, params.gt_prob) for x in labels])
    q = dense_crf_group(image, unaries, params, device)
    return [crf_labels(field, params.confidence) for field in q]


_UNARY_INPUTS: dict[str, tuple[str, ...]] = {
    "labels": ("image", "labels", "num_labels"), "probabilities": ("image", "probabilities")}
for _name, _params in PRESETS.items():
    register_refiner(Refiner(
        name=f"crf_{_name}",
        summary=f"dense CRF with the {_name} preset on a {_params.unary} unary",
        inputs=_UNARY_INPUTS[_params.unary],
        refine=refine_labels if _params.unary == "labels" else refine_probabilities,
        params=_params,
    ))
