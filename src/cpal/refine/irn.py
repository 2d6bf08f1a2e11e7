"""IRN's pieces around the inter-pixel relation network (Ahn, Cho & Kwak, CVPR 2019).

* `ir_labels`: inter-pixel relation labels from CAMs: confident foreground (background
  score 0.30) and confident background (0.05), each cleaned by the dense CRF; foreground
  where the first says so, background where both say background, ignore elsewhere.
* `pair_offsets`: the pixel pairs IRN relates, as offsets (dy, dx) within a radius on the
  stride-4 grid, one per unordered pair (the half plane dy > 0, or dy = 0 and dx > 0),
  each with the grid cells on the segment between the two pixels (its "path").
* `affinity_from_boundary`: affinity of each pair = 1 - the largest boundary probability on
  its path (a wall between two pixels cuts their affinity).
* `affinity_labels`: training targets for the pairs from (downsampled) IR labels: both
  background, both the same foreground class, different classes; pairs touching an
  ignored pixel or leaving the grid are in none of the three.

Pair tensors share one layout: (..., P, H, W), entry [p, y, x] for the pair from (y, x) to
(y + dy_p, x + dx_p); entries whose second pixel falls outside the grid are invalid
(affinity 0, no label), so a tensor of any grid size needs no index bookkeeping.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from cpal.io import IGNORE_INDEX
from cpal.refine.crf import PRESETS, CRFParams, refine_label_group

__all__ = [
    "AffinityLabels",
    "IRLabelParams",
    "PairOffsets",
    "affinity_from_boundary",
    "affinity_labels",
    "downsample_labels",
    "follow_power",
    "follow_threshold",
    "ir_labels",
    "pair_offsets",
    "valid_pairs",
]


def follow_power(seed_threshold: float, reference: float) -> float:
    """g = ln t / ln ref: the power x -> x^g that sends `reference` to `seed_threshold`.

    A power is the one-parameter monotone map of [0, 1] onto itself that fixes 0 and 1:
    it keeps any set of thresholds in order, so IRN's confident fg / bg and walk background
    keep their places around the seeds' cut on maps calibrated otherwise than VOC's CAMs."""
    if not (0 < seed_threshold < 1 and 0 < reference < 1):
        raise ValueError(f"thresholds to follow must lie in (0, 1): seed threshold "
                         f"{seed_threshold}, reference {reference}")
    return float(np.log(seed_threshold) / np.log(reference))


def follow_threshold(value: float, seed_threshold: float, reference: float) -> float:
    """`value`, a threshold set for maps whose seeds are best cut at `reference`, carried
    over to maps whose seed threshold is `seed_threshold`: value^g (`follow_power`)."""
    return float(value ** follow_power(seed_threshold, reference))


@dataclass(frozen=True)
class IRLabelParams:
    """IRN's defaults (conf_fg_thres 0.30, conf_bg_thres 0.05, its CRF).

    own_bg_factor (None: IRN's constant planes): maps that carry their own background
    channel (a prototype map's) are split as SIPE's cam2ir does: confident foreground by
    argmax against that channel, confident background against it times this factor
    (SIPE: 0.5); the two thresholds are then unused."""

    fg_threshold: float = 0.30
    bg_threshold: float = 0.05
    crf: CRFParams = field(default_factory=lambda: PRESETS["irn"])
    ignore_index: int = IGNORE_INDEX
    own_bg_factor: float | None = None

    def __post_init__(self) -> None:
        if not self.bg_threshold <= self.fg_threshold:
            raise ValueError(f"bg_threshold {self.bg_threshold} must be <= fg_threshold "
                             f"{self.fg_threshold} (the confident background is the wider one)")
        if self.crf.unary != "labels":
            raise ValueError("IR labels refine label maps: the CRF preset needs unary='labels'")
        if self.own_bg_factor is not None and not 0 < self.own_bg_factor <= 1:
            raise ValueError(f"own_bg_factor must lie in (0, 1], got {self.own_bg_factor}")

    def record(self) -> dict[str, object]:
        """The parameters as a folder record; own_bg_factor only when used, so records
        written before it existed still match."""
        fields = asdict(self)
        if self.own_bg_factor is None:
            del fields["own_bg_factor"]
        return fields


def _threshold_argmax(maps: np.ndarray, threshold: float) -> np.ndarray:
    """0 (background) where no map beats `threshold`, else 1 + the strongest map's channel;
    ties go to the lower index, as IRN's pad-then-argmax."""
    padded = np.concatenate([np.full((1, *maps.shape[1:]), threshold, maps.dtype), maps])
    return padded.argmax(axis=0)


def _own_argmax(maps: np.ndarray, background: np.ndarray, factor: float) -> np.ndarray:
    """0 where the background channel times `factor` wins, else 1 + the strongest map's
    channel; ties go to background (SIPE's argmax over [bg, classes])."""
    return np.concatenate([(background * factor)[None], maps]).argmax(axis=0)


def ir_labels(image: np.ndarray, maps: np.ndarray, classes: np.ndarray,
              params: IRLabelParams = IRLabelParams(),
              device: torch.device | str | None = None,
              background: np.ndarray | None = None) -> np.ndarray:
    """(H, W) uint8 IR labels: dataset class indices, 0 background, `ignore_index` unsure.

    image: uint8 RGB (H, W, 3); maps: float (C, H, W) in [0, 1], one per class in
    `classes` (dataset indices of the image's foreground classes, as in `MapRecord`);
    background: the maps' own background channel (H, W), used when
    `params.own_bg_factor` is set (else, or when None, IRN's constant planes).
    The CRF runs over 1 + C labels (background and the image's classes), as IRN's.
    """
    maps = np.asarray(maps)
    classes = np.asarray(classes)
    if not np.issubdtype(maps.dtype, np.floating):
        raise ValueError(f"maps must be floating point (C, H, W), got dtype {maps.dtype}")
    if maps.ndim != 3:
        raise ValueError(f"maps must be (C, H, W), got shape {maps.shape}")
    if classes.ndim != 1 or len(classes) != maps.shape[0]:
        raise ValueError(f"{len(classes)} classes given for {maps.shape[0]} map channels")
    if classes.size and not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"classes must be integers, got dtype {classes.dtype}")
    if classes.size and (classes.min() < 1 or classes.max() >= params.ignore_index):
        raise ValueError(f"classes must lie in [1, {params.ignore_index}) (0 is background)")
    if image.shape[:2] != maps.shape[1:]:
        raise ValueError(f"image size {image.shape[:2]} != maps size {maps.shape[1:]}")
    keys = np.concatenate([[0], classes.astype(np.int64)])
    if classes.size == 0:  # nothing but background to be confident about
        return np.zeros(maps.shape[1:], dtype=np.uint8)
    work = maps.astype(np.result_type(maps.dtype, np.float32), copy=False)
    if params.own_bg_factor is not None and background is not None:
        if background.shape != maps.shape[1:]:
            raise ValueError(f"background size {background.shape} != maps size {maps.shape[1:]}")
        own = background.astype(work.dtype, copy=False)
        seeds = [_own_argmax(work, own, 1.0), _own_argmax(work, own, params.own_bg_factor)]
    else:
        seeds = [_threshold_argmax(work, params.fg_threshold),
                 _threshold_argmax(work, params.bg_threshold)]
    # Both CRFs in one grouped mean field: they share the image's lattices.
    fg, bg = (keys[x] for x in refine_label_group(image, seeds, len(keys), params.crf, device))
    out = np.where(fg == 0, params.ignore_index, fg)
    out[(fg == 0) & (bg == 0)] = 0
    return out.astype(np.uint8)


@dataclass(frozen=True, eq=False)
class PairOffsets:
    """Pairs within `radius`: offsets (P, 2) as (dy, dx) and, per pair, the path cells
    (L_p, 2) relative to the first pixel, both ends included."""

    radius: int
    offsets: np.ndarray
    paths: tuple[np.ndarray, ...]

    @property
    def num_pairs(self) -> int:
        return len(self.offsets)


@functools.lru_cache(maxsize=8)
def pair_offsets(radius: int) -> PairOffsets:
    """IRN's search directions: offsets with 0 < dy^2 + dx^2 < radius^2 in the half plane
    (dy = 0, dx > 0) or dy > 0; a path holds the cells of the offset's bounding box whose
    distance to the segment's line is below 1 (IRN's PathIndex, in raster order)."""
    if not isinstance(radius, (int, np.integer)) or radius < 2:
        raise ValueError(f"radius must be an integer >= 2, got {radius!r}")
    offsets = [(0, dx) for dx in range(1, radius)]
    offsets += [(dy, dx) for dy in range(1, radius) for dx in range(-radius + 1, radius)
                if dx * dx + dy * dy < radius * radius]
    paths = []
    for dy, dx in offsets:
        length_sq = dy * dy + dx * dx
        cells = [(y, x)
                 for y in range(min(0, dy), max(0, dy) + 1)
                 for x in range(min(0, dx), max(0, dx) + 1)
                 if (dy * x - dx * y) ** 2 < length_sq]  # distance to the line < 1
        path = np.array(cells, dtype=np.int64)
        path.flags.writeable = False
        paths.append(path)
    array = np.array(offsets, dtype=np.int64)
    array.flags.writeable = False
    return PairOffsets(radius=int(radius), offsets=array, paths=tuple(paths))


def _shifted(padded: Tensor, dy: int, dx: int, pad: int, height: int, width: int) -> Tensor:
    """padded[..., y + dy, x + dx] for the (height, width) grid at offset `pad` columns."""
    return padded[..., dy: dy + height, pad + dx: pad + dx + width]


def _check_grid(name: str, tensor: Tensor) -> Tensor:
    if tensor.ndim < 2:
        raise ValueError(f"{name} must be (..., H, W), got shape {tuple(tensor.shape)}")
    return tensor


def affinity_from_boundary(boundary: Tensor, radius: int = 5) -> Tensor:
    """(..., H, W) boundary probabilities -> (..., P, H, W) pair affinities.

    affinity[p, y, x] = 1 - max(boundary over the path of pair p from (y, x)); 0 for
    pairs leaving the grid (the grid is padded with boundary 1, as IRN pads its edge
    map). Differentiable, on any device, for any leading batch dimensions.
    """
    if not isinstance(boundary, Tensor) or not torch.is_floating_point(boundary):
        raise ValueError("boundary must be a floating-point tensor (..., H, W)")
    _check_grid("boundary", boundary)
    pairs = pair_offsets(radius)
    pad = radius - 1
    height, width = boundary.shape[-2:]
    padded = torch.nn.functional.pad(boundary, (pad, pad, 0, pad), value=1.0)
    out = []
    for path in pairs.paths:
        worst = _shifted(padded, int(path[0, 0]), int(path[0, 1]), pad, height, width)
        for dy, dx in path[1:]:
            worst = torch.maximum(worst, _shifted(padded, int(dy), int(dx), pad, height, width))
        out.append(1.0 - worst)
    return torch.stack(out, dim=-3)


def valid_pairs(height: int, width: int, radius: int = 5,
                device: torch.device | str | None = None) -> Tensor:
    """(P, H, W) bool: the pair's second pixel lies inside the grid."""
    offsets = pair_offsets(radius).offsets
    ys = torch.arange(height, device=device)[:, None]
    xs = torch.arange(width, device=device)[None, :]
    return torch.stack([(ys + dy < height) & (xs + dx >= 0) & (xs + dx < width)
                        for dy, dx in offsets.tolist()])


@dataclass(frozen=True)
class AffinityLabels:
    """Boolean (..., P, H, W) targets; a pair is in at most one of them."""

    bg_pos: Tensor
    fg_pos: Tensor
    neg: Tensor


def affinity_labels(labels: Tensor | np.ndarray, radius: int = 10,
                    ignore_index: int = IGNORE_INDEX) -> AffinityLabels:
    """Pair targets from label maps (..., H, W) (IR labels at the affinity grid's size,
    see `downsample_labels`): same background, same foreground class, different labels;
    pairs with an `ignore_index` end or leaving the grid are in none. IRN trains with
    radius 10."""
    if isinstance(labels, np.ndarray):
        labels = torch.from_numpy(labels)
    if labels.dtype.is_floating_point or labels.dtype == torch.bool:
        raise ValueError(f"labels must hold integer class indices, got dtype {labels.dtype}")
    _check_grid("labels", labels)
    labels = labels.to(torch.int64)
    height, width = labels.shape[-2:]
    pad = radius - 1
    padded = torch.nn.functional.pad(labels, (pad, pad, 0, pad), value=ignore_index)
    here = labels.unsqueeze(-3)
    there = torch.stack([_shifted(padded, dy, dx, pad, height, width)
                         for dy, dx in pair_offsets(radius).offsets.tolist()], dim=-3)
    valid = (here != ignore_index) & (there != ignore_index)
    same = (here == there) & valid
    return AffinityLabels(bg_pos=same & (here == 0), fg_pos=same & (here != 0),
                          neg=valid & (here != there))


def downsample_labels(labels: np.ndarray, stride: int = 4) -> np.ndarray:
    """Nearest-neighbour label map at 1/stride of the size (round(H / stride), round(W /
    stride)), as IRN reduces its IR labels to the boundary map's grid (PIL NEAREST)."""
    labels = np.asarray(labels)
    if labels.ndim != 2 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be an integer (H, W) map, got {labels.dtype} "
                         f"{labels.shape}")
    if labels.min(initial=0) < 0 or labels.max(initial=0) > 255:
        raise ValueError("labels must lie in [0, 255] (uint8 label maps)")
    height, width = labels.shape
    size = (max(1, round(width / stride)), max(1, round(height / stride)))
    return np.asarray(Image.fromarray(labels.astype(np.uint8)).resize(size, Image.NEAREST))
