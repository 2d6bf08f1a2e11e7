"""The built-in procedural WSSS dataset: deterministic by seed, versioned, VOC layout.

Each foreground object is a *body* (a shape whose colours and textures are shared by all
classes, by distractor shapes and by the background) carrying a small *part* (a patch with
a class-specific colour and pattern). Image-level labels can be predicted from the parts,
so a classifier's CAM fires on the part rather than on the whole object: the gap that
weakly supervised segmentation methods try to close. Every class has three attribute
modes (body colour family, shape variant, part position) drawn with skewed frequencies,
so rare appearances exist as in real data. Images are rendered with vectorised numpy on
coordinate grids; image `i` of a split depends only on `(seed, split, i)`.

Bump `GENERATOR_VERSION` whenever any output pixel, label or file could change: cached
datasets are keyed by it and regenerated when it differs.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from cpal.errors import ConfigError, DatasetError
from cpal.io import (
    IGNORE_INDEX,
    atomic_path,
    save_label_png,
    voc_palette,
    write_json_atomic,
    write_text_atomic,
)

__all__ = ["CLASS_NAMES", "GENERATOR_VERSION", "ensure_dataset", "generate", "sample_grid"]

GENERATOR_VERSION = 1

# ----------------------------------------------------------------------------- constants

SPLIT_CODES: dict[str, int] = {"train": 0, "val": 1}
MIN_IMAGE_SIZE = 32
MODE_PROBS: tuple[float, float, float] = (0.65, 0.25, 0.10)
"""Frequencies of every class's attribute modes: common, uncommon, rare."""
NUM_OBJECTS_PROBS: tuple[float, float, float] = (0.45, 0.35, 0.20)
"""P(1, 2, 3 labelled objects per image); classes are drawn uniformly with replacement."""
NUM_DISTRACTORS_PROBS: tuple[float, ...] = (0.15, 0.35, 0.35, 0.15)
DECOY_PATCH_PROB = 0.4
"""Distractors that carry a muted patch, so "has a patch" alone is not a class cue."""
OBJECT_RADIUS = (0.14, 0.22)
"""Body radius as a fraction of the image side (times the class scale)."""
DISTRACTOR_RADIUS = (0.09, 0.19)
MAX_ROTATION_DEG = 35.0
"""Objects stay roughly upright so that "part at the top" remains a meaningful attribute."""
MIN_SEPARATION = 0.55
"""Object centres are at least this times the sum of their radii apart (occlusion stays partial)."""
MIN_VISIBLE_PIXELS = 20
"""An object with fewer visible non-border pixels is not labelled (its pixels become 255)."""
MIN_PART_VISIBLE = 0.5
"""Layouts hiding more than half of an object's part are re-drawn, up to LAYOUT_TRIES times."""
LAYOUT_TRIES = 30
BORDER_PX_PER_SIDE = 1 / 160
"""Half-width of the 255 border band relative to the image side (1 px each side at 128)."""
PART_PERIOD = 1 / 32
"""Part pattern period relative to the image side (4 px at 128)."""
SENSOR_NOISE = 2.5
"""Per-pixel Gaussian noise (grey levels) over the whole image."""
GRID_COLUMNS = 6

RGB = tuple[int, int, int]

BODY_FAMILIES: dict[str, RGB] = {
    # Muted colours shared by bodies of all classes, distractors and backgrounds.
    "sand": (196, 176, 136),
    "slate": (104, 116, 138),
    "olive": (118, 128, 78),
    "rust": (158, 96, 72),
    "stone": (150, 148, 142),
    "teal": (86, 128, 126),
    "plum": (118, 92, 112),
    "cream": (214, 206, 184),
}
BODY_TEXTURES: tuple[str, ...] = ("plain", "grain", "stripes", "speckle")
BODY_TEXTURE_PROBS: tuple[float, ...] = (0.25, 0.3, 0.25, 0.2)
PATTERNS: tuple[str, ...] = ("hstripes", "vstripes", "diag", "adiag", "checker", "dots", "rings")

FAMILIES: tuple[str, ...] = ("parts", "attributes")
"""parts: bodies share every appearance (only the part tells the class). attributes: each
class's body has its own appearance modes (colour + texture), so appearance is evidence,
but the rare mode is another class's and clutter wears class appearances too."""
ATTRIBUTE_PROBS: tuple[float, float, float] = (0.6, 0.3, 0.1)
"""Frequencies of an attributes-family class's appearance modes: its own two, then the
borrowed one."""
ATTRIBUTE_SHARE_OFFSET = 3
"""Class c's rare mode is class (c + 3) mod 10's second mode (a shared attribute)."""
CLUTTER_ATTRIBUTE_PROB = 0.5
"""Share of distractors that wear a random class-mode appearance (clutter shares modes)."""
ATTRIBUTE_TEXTURES: tuple[str, ...] = ("plain", "stripes", "speckle", "grain")


def _hsv(hue: float, sat: float, val: float) -> tuple[int, int, int]:
    import colorsys

    r, g, b = colorsys.hsv_to_rgb(hue % 1.0, sat, val)
    return round(255 * r), round(255 * g), round(255 * b)


# Appearance (RGB, texture) of mode m of class c, m in {0, 1}: 20 hues 18 degrees apart,
# medium saturation (bodies stay distinct from the saturated parts and the muted backgrounds).
ATTRIBUTE_APPEARANCES: tuple[tuple[tuple[RGB, str], tuple[RGB, str]], ...] = tuple(
    (
        (_hsv((2 * c) / 20, 0.55, 0.85), ATTRIBUTE_TEXTURES[c % 4]),
        (_hsv((2 * c + 11) / 20, 0.5, 0.7), ATTRIBUTE_TEXTURES[(c + 2) % 4]),
    )
    for c in range(10)
)


@dataclass(frozen=True)
class Shape:
    """A body outline: an SDF `kind` with parameters in units of the body radius.

    `rot` (degrees) rotates and `sx`, `sy` stretch any kind; the rest are kind-specific.
    """

    kind: str
    params: tuple[tuple[str, float], ...] = ()

    def kwargs(self) -> dict[str, float]:
        return dict(self.params)


def _shape(kind: str, **params: float) -> Shape:
    return Shape(kind, tuple(sorted(params.items())))


@dataclass(frozen=True)
class Mode:
    """One attribute mode of a class: body colour family, shape variant and part placement."""

    name: str
    body: str
    shape: Shape
    part_at: tuple[float, float]
    part_radius: float
    part_shape: str = "circle"


@dataclass(frozen=True)
class ClassSpec:
    """A foreground class: its part appearance (the class cue) and its three modes."""

    name: str
    part_rgb: RGB
    part_alt_rgb: RGB
    pattern: str
    scale: float
    modes: tuple[Mode, Mode, Mode]


# The class table. Parts (colour pair + pattern) are unique per class; bodies are not.
# Modes are ordered common, uncommon, rare (MODE_PROBS). Part centres are in body-radius
# units in the object's frame (x right, y down); every part lies inside its body.
# fmt: off
CLASSES: tuple[ClassSpec, ...] = (
    ClassSpec("disc", (230, 30, 30), (250, 236, 236), "hstripes", 1.0, (
        Mode("round", "sand", _shape("ellipse", ax=1.0, ay=1.0), (0.0, 0.0), 0.34),
        Mode("oval", "slate", _shape("ellipse", ax=1.25, ay=0.78), (0.5, 0.0), 0.3),
        Mode("tall", "rust", _shape("ellipse", ax=0.8, ay=1.2), (0.0, -0.55), 0.28, "square"),
    )),
    ClassSpec("box", (30, 70, 235), (245, 220, 40), "checker", 1.0, (
        Mode("square", "slate", _shape("box", ax=0.85, ay=0.85, rc=0.1), (0.0, 0.0), 0.32,
             "square"),
        Mode("wide", "stone", _shape("box", ax=1.1, ay=0.65, rc=0.05), (-0.6, 0.0), 0.3,
             "square"),
        Mode("tall", "teal", _shape("box", ax=0.65, ay=1.1, rc=0.3), (0.0, 0.6), 0.3),
    )),
    ClassSpec("tri", (250, 215, 20), (20, 20, 20), "diag", 1.15, (
        Mode("up", "olive", _shape("poly", sides=3, apothem=0.62), (0.0, 0.05), 0.3),
        Mode("wide", "sand", _shape("poly", sides=3, apothem=0.62, sx=1.3, sy=0.85),
             (0.0, 0.12), 0.26),
        Mode("apex", "plum", _shape("poly", sides=3, apothem=0.62), (0.0, -0.32), 0.22,
             "square"),
    )),
    ClassSpec("ring", (30, 200, 60), (245, 250, 245), "dots", 1.0, (
        Mode("round", "stone", _shape("ring", ro=1.0, ri=0.5), (0.0, -0.75), 0.22),
        Mode("thick", "olive", _shape("ring", ro=1.0, ri=0.34), (0.67, 0.0), 0.28),
        Mode("oval", "rust", _shape("ring", ro=1.0, ri=0.52, sx=1.25, sy=0.9), (-0.95, 0.0),
             0.2),
    )),
    ClassSpec("star", (230, 40, 200), (20, 20, 20), "vstripes", 1.15, (
        Mode("five", "sand", _shape("star", points=5, ri=0.5, ro=1.15), (0.0, 0.0), 0.3),
        Mode("six", "slate", _shape("star", points=6, ri=0.56, ro=1.1), (0.0, 0.0), 0.33,
             "square"),
        Mode("four", "teal", _shape("star", points=4, ri=0.45, ro=1.2), (0.0, 0.0), 0.26),
    )),
    ClassSpec("cross", (30, 215, 230), (10, 20, 90), "rings", 1.1, (
        Mode("plus", "stone", _shape("cross", arm=1.0, width=0.36), (0.0, 0.0), 0.3, "square"),
        Mode("x", "sand", _shape("cross", arm=1.0, width=0.36, rot=45.0), (0.0, 0.0), 0.3),
        Mode("long", "plum", _shape("cross", arm=1.1, width=0.32), (0.72, 0.0), 0.24),
    )),
    ClassSpec("bar", (255, 130, 0), (20, 20, 20), "checker", 1.1, (
        Mode("bar", "olive", _shape("box", ax=1.15, ay=0.42, rc=0.05), (0.72, 0.0), 0.3,
             "square"),
        Mode("capsule", "stone", _shape("box", ax=1.15, ay=0.42, rc=0.42), (0.0, 0.0), 0.32),
        Mode("upright", "rust", _shape("box", ax=0.42, ay=1.15, rc=0.05), (0.0, -0.72), 0.3),
    )),
    ClassSpec("moon", (250, 250, 250), (210, 20, 30), "adiag", 1.2, (
        Mode("crescent", "slate", _shape("moon", offset=0.5, ri=0.85), (-0.67, 0.0), 0.26),
        Mode("thick", "sand", _shape("moon", offset=0.6, ri=0.8), (-0.6, 0.0), 0.3),
        Mode("thin", "olive", _shape("moon", offset=0.45, ri=0.9, rot=-90.0), (0.0, 0.72),
             0.22),
    )),
    ClassSpec("kite", (130, 40, 210), (250, 250, 250), "hstripes", 1.1, (
        Mode("diamond", "teal", _shape("rhombus", ax=0.85, ay=1.2), (0.0, -0.15), 0.3),
        Mode("square", "stone", _shape("rhombus", ax=1.0, ay=1.0), (0.0, 0.0), 0.34,
             "square"),
        Mode("flat", "plum", _shape("rhombus", ax=1.3, ay=0.75), (0.4, 0.0), 0.24),
    )),
    ClassSpec("hex", (150, 240, 20), (200, 0, 120), "rings", 1.0, (
        Mode("flat", "stone", _shape("poly", sides=6, apothem=0.9), (0.0, 0.0), 0.34),
        Mode("pointy", "olive", _shape("poly", sides=6, apothem=0.9, rot=30.0), (0.0, 0.45),
             0.3, "square"),
        Mode("long", "sand", _shape("poly", sides=6, apothem=0.9, sx=1.3, sy=0.75),
             (-0.55, 0.0), 0.28),
    )),
)

# fmt: on

CLASS_NAMES: tuple[str, ...] = ("background", *(spec.name for spec in CLASSES))

# ----------------------------------------------------------------------------- shapes (SDFs)

Array = np.ndarray
Region = tuple[slice, slice]
FULL: Region = (slice(None), slice(None))


def _sd_ellipse(u: Array, v: Array, *, ax: float, ay: float) -> Array:
    return (np.sqrt((u / ax) ** 2 + (v / ay) ** 2) - 1.0) * min(ax, ay)


def _sd_box(u: Array, v: Array, *, ax: float, ay: float, rc: float = 0.0) -> Array:
    qx = np.abs(u) - (ax - rc)
    qy = np.abs(v) - (ay - rc)
    outside = np.sqrt(np.maximum(qx, 0.0) ** 2 + np.maximum(qy, 0.0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0.0) - rc


def _sd_poly(u: Array, v: Array, *, sides: float, apothem: float) -> Array:
    """Regular polygon with a flat bottom edge (a triangle points up)."""
    result = None
    for k in range(int(sides)):
        angle = math.pi / 2 + 2 * math.pi * k / sides
        d = u * math.cos(angle) + v * math.sin(angle) - apothem
        result = d if result is None else np.maximum(result, d)
    assert result is not None
    return result


def _sd_ring(u: Array, v: Array, *, ro: float, ri: float) -> Array:
    return np.abs(np.sqrt(u * u + v * v) - (ro + ri) / 2) - (ro - ri) / 2


def _sd_star(u: Array, v: Array, *, points: float, ri: float, ro: float) -> Array:
    """Star with a tip pointing up; approximate distance (exact sign)."""
    theta = np.arctan2(v, u) + math.pi / 2
    phase = np.mod(theta * points / (2 * math.pi), 1.0)
    radius = ri + (ro - ri) * np.abs(phase - 0.5) * 2
    return (np.sqrt(u * u + v * v) - radius) * 0.6


def _sd_cross(u: Array, v: Array, *, arm: float, width: float) -> Array:
    return np.minimum(_sd_box(u, v, ax=arm, ay=width), _sd_box(u, v, ax=width, ay=arm))


def _sd_rhombus(u: Array, v: Array, *, ax: float, ay: float) -> Array:
    return (np.abs(u) / ax + np.abs(v) / ay - 1.0) / math.hypot(1 / ax, 1 / ay)


def _sd_moon(u: Array, v: Array, *, offset: float, ri: float) -> Array:
    """Unit disc minus a disc of radius `ri` shifted right by `offset` (thick side left)."""
    outer = np.sqrt(u * u + v * v) - 1.0
    inner = np.sqrt((u - offset) ** 2 + v * v) - ri
    return np.maximum(outer, -inner)


SDFS: dict[str, Callable[..., Array]] = {
    "ellipse": _sd_ellipse,
    "box": _sd_box,
    "poly": _sd_poly,
    "ring": _sd_ring,
    "star": _sd_star,
    "cross": _sd_cross,
    "rhombus": _sd_rhombus,
    "moon": _sd_moon,
}


def _shape_sdf(shape: Shape, u: Array, v: Array) -> Array:
    """Signed distance (body-radius units, negative inside) of `shape` at local coords."""
    params = shape.kwargs()
    rot = math.radians(params.pop("rot", 0.0))
    sx, sy = params.pop("sx", 1.0), params.pop("sy", 1.0)
    if rot:
        c, s = math.cos(rot), math.sin(rot)
        u, v = c * u + s * v, -s * u + c * v
    return SDFS[shape.kind](u / sx, v / sy, **params) * min(sx, sy)


def _part_sdf(mode: Mode, u: Array, v: Array) -> Array:
    du, dv = u - mode.part_at[0], v - mode.part_at[1]
    if mode.part_shape == "square":
        return np.maximum(np.abs(du), np.abs(dv)) - 0.9 * mode.part_radius
    return np.sqrt(du * du + dv * dv) - mode.part_radius


def _part_area(mode: Mode, radius_px: float) -> float:
    r = mode.part_radius * radius_px
    return (1.8 * r) ** 2 if mode.part_shape == "square" else math.pi * r * r


def _coverage(sdf_px: Array) -> Array:
    """Anti-aliased coverage from a pixel-unit signed distance (>= 0.5 means inside)."""
    return np.clip(0.5 - sdf_px, 0.0, 1.0).astype(np.float32)


@lru_cache(maxsize=8)
def _grid(size: int) -> tuple[Array, Array]:
    """Pixel-centre coordinates (x, y), shared and read-only."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    xs.setflags(write=False)
    ys.setflags(write=False)
    return xs, ys


@lru_cache(maxsize=16)
def _upsample_matrix(size: int, cells: int) -> Array:
    """(size, cells) bilinear interpolation matrix, for smooth noise as M @ low @ M.T."""
    pos = (np.arange(size) + 0.5) / size * (cells - 1)
    lo = np.clip(np.floor(pos).astype(int), 0, cells - 2)
    frac = (pos - lo).astype(np.float32)
    matrix = np.zeros((size, cells), dtype=np.float32)
    matrix[np.arange(size), lo] = 1 - frac
    matrix[np.arange(size), lo + 1] = frac
    matrix.setflags(write=False)
    return matrix


def _smooth_noise(
    rng: np.random.Generator, size: int, cells: int, channels: int, region: Region = FULL
) -> Array:
    """(h, w, channels) noise over `region`, varying smoothly over ~size/cells pixels."""
    low = rng.standard_normal((channels, cells, cells)).astype(np.float32)
    m = _upsample_matrix(size, cells)
    return np.moveaxis(m[region[0]] @ low @ m[region[1]].T, 0, -1)


# ----------------------------------------------------------------------------- layout

SHAPE_EXTENT = 1.6
"""Every body lies within this many radii of its centre (rasterisation is cropped to it)."""


@dataclass
class _Placed:
    """An object (or distractor) placed in an image, with its rasterised coverage."""

    cls: int  # index into CLASSES
    mode: int
    cx: float
    cy: float
    radius: float  # pixels
    angle: float  # radians
    region: Region  # the crop of the image that the arrays below cover
    u: Array  # local coordinates (body-radius units)
    v: Array
    body: Array  # coverage in [0, 1]
    part: Array | None  # coverage in [0, 1], clipped to the body

    @property
    def spec(self) -> ClassSpec:
        return CLASSES[self.cls]

    @property
    def mode_spec(self) -> Mode:
        return CLASSES[self.cls].modes[self.mode]


def _place(
    cls: int,
    mode: int,
    cx: float,
    cy: float,
    radius: float,
    angle: float,
    size: int,
    *,
    with_part: bool,
) -> _Placed:
    extent = SHAPE_EXTENT * radius + 1

    def span(centre: float) -> slice:
        lo = min(max(int(centre - extent), 0), size - 1)
        return slice(lo, max(min(int(centre + extent) + 1, size), lo + 1))

    region = (span(cy), span(cx))
    xs, ys = _grid(size)
    dx, dy = xs[region] - cx, ys[region] - cy
    c, s = math.cos(angle), math.sin(angle)
    u = (c * dx + s * dy) / radius
    v = (-s * dx + c * dy) / radius
    spec_mode = CLASSES[cls].modes[mode]
    body = _coverage(_shape_sdf(spec_mode.shape, u, v) * radius)
    part = _coverage(_part_sdf(spec_mode, u, v) * radius) * body if with_part else None
    return _Placed(cls, mode, cx, cy, radius, angle, region, u, v, body, part)


def _border_width(size: int) -> int:
    return max(1, round(size * BORDER_PX_PER_SIDE))


def _boundary_band(owner: Array, width: int) -> Array:
    """Pixels within `width` (Chebyshev) of a pixel with a different owner."""
    size_y, size_x = owner.shape
    padded = np.pad(owner, width, mode="edge")
    band = np.zeros(owner.shape, dtype=bool)
    for dy in range(-width, width + 1):
        for dx in range(-width, width + 1):
            if dy or dx:
                shifted = padded[width + dy : width + dy + size_y, width + dx : width + dx + size_x]
                band |= owner != shifted
    return band


@dataclass
class _Visibility:
    owner: Array  # object index per pixel, -1 = background
    band: Array
    visible: list[int]  # non-border pixels per object
    occluded: list[float]  # fraction of each object's in-frame body hidden by later objects
    part_visible: list[float]  # visible fraction of each object's part


def _visibility(objects: list[_Placed], size: int) -> _Visibility:
    """Who owns each pixel after occlusion (later objects on top), and how much shows."""
    owner = np.full((size, size), -1, dtype=np.int16)
    for j, obj in enumerate(objects):
        owner[obj.region][obj.body >= 0.5] = j
    band = _boundary_band(owner, _border_width(size))
    visible, occluded, part_visible = [], [], []
    for j, obj in enumerate(objects):
        mine = owner[obj.region] == j
        visible.append(int(np.count_nonzero(mine & ~band[obj.region])))
        occluded.append(1 - np.count_nonzero(mine) / max(np.count_nonzero(obj.body >= 0.5), 1))
        assert obj.part is not None
        shown = np.count_nonzero((obj.part >= 0.5) & mine)
        part_visible.append(shown / _part_area(obj.mode_spec, obj.radius))
    return _Visibility(owner, band, visible, occluded, part_visible)


def _choice(rng: np.random.Generator, probs: tuple[float, ...]) -> int:
    return int(rng.choice(len(probs), p=np.asarray(probs) / sum(probs)))


def _sample_objects(rng: np.random.Generator, size: int) -> tuple[list[_Placed], _Visibility]:
    """Classes and modes first, then geometry re-drawn until every object shows well.

    Only geometry is re-drawn, so class and mode frequencies are exactly the sampling ones.
    """
    count = 1 + _choice(rng, NUM_OBJECTS_PROBS)
    kinds = [(int(rng.integers(len(CLASSES))), _choice(rng, MODE_PROBS)) for _ in range(count)]
    for _ in range(LAYOUT_TRIES):
        placed: list[_Placed] = []
        for cls, mode in kinds:
            radius = rng.uniform(*OBJECT_RADIUS) * size * CLASSES[cls].scale
            angle = math.radians(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
            lo, hi = 0.6 * radius, size - 0.6 * radius
            for _attempt in range(20):
                cx, cy = rng.uniform(lo, hi, size=2)
                if all(
                    math.hypot(cx - o.cx, cy - o.cy) >= MIN_SEPARATION * (radius + o.radius)
                    for o in placed
                ):
                    break
            placed.append(_place(cls, mode, cx, cy, radius, angle, size, with_part=True))
        vis = _visibility(placed, size)
        if min(vis.visible) >= MIN_VISIBLE_PIXELS and min(vis.part_visible) >= MIN_PART_VISIBLE:
            return placed, vis
    # Rare (crowded small images): one large, centred, upright object always fits.
    cls, mode = kinds[0]
    radius = OBJECT_RADIUS[1] * size * CLASSES[cls].scale
    placed = [_place(cls, mode, size / 2, size / 2, radius, 0.0, size, with_part=True)]
    return placed, _visibility(placed, size)


# ----------------------------------------------------------------------------- appearance


def _family_colour(rng: np.random.Generator, family: str | None = None) -> Array:
    if family is None:
        family = list(BODY_FAMILIES)[int(rng.integers(len(BODY_FAMILIES)))]
    jitter = rng.normal(0, 10, 3).astype(np.float32)
    return np.asarray(BODY_FAMILIES[family], dtype=np.float32) + jitter


def _texture(
    rng: np.random.Generator, size: int, region: Region = FULL, kind: str | None = None
) -> Array:
    """A luminance texture (h, w, 1) over `region`: drawn from the shared kinds (bodies and
    background of the parts family), or of a fixed `kind` (an attributes-family mode)."""
    if kind is None:
        kind = BODY_TEXTURES[_choice(rng, BODY_TEXTURE_PROBS)]
    if kind == "grain":
        cells = max(4, size // 8)
        return _smooth_noise(rng, size, cells, 1, region) * rng.uniform(8, 16)
    if kind == "stripes":
        xs, ys = (g[region] for g in _grid(size))
        phi = rng.uniform(0, math.pi)
        period = rng.uniform(5, 10) * size / 128
        wave = np.sin(2 * math.pi * (xs * math.cos(phi) + ys * math.sin(phi)) / period)
        return (wave * rng.uniform(6, 12))[..., None]
    if kind == "speckle":
        shape = _grid(size)[0][region].shape
        return rng.standard_normal((*shape, 1), dtype=np.float32) * rng.uniform(5, 10)
    return np.zeros((1, 1, 1), dtype=np.float32)


def _body_field(
    rng: np.random.Generator, obj: _Placed, family: str | None, size: int,
    appearance: tuple[RGB, str] | None = None,
) -> Array:
    """Body colour: a shared family colour (or an attributes-family appearance: its colour
    and texture kind), a shading ramp and a texture."""
    if appearance is None:
        base = _family_colour(rng, family)
    else:
        base = np.asarray(appearance[0], dtype=np.float32) + rng.normal(0, 10, 3).astype(
            np.float32)
    phi = rng.uniform(0, 2 * math.pi)
    ramp = (obj.u * math.cos(phi) + obj.v * math.sin(phi))[..., None]
    field = base * (1 + rng.uniform(0.05, 0.18) * ramp)
    kind = None if appearance is None else appearance[1]
    return field + _texture(rng, size, obj.region, kind)


def class_appearance(cls: int, mode: int) -> tuple[RGB, str]:
    """The attributes family's body appearance of `mode` (0, 1: own; 2: borrowed)."""
    if mode == 2:
        return ATTRIBUTE_APPEARANCES[(cls + ATTRIBUTE_SHARE_OFFSET) % len(CLASSES)][1]
    return ATTRIBUTE_APPEARANCES[cls][mode]


def _pattern(kind: str, pu: Array, pv: Array, period: float) -> Array:
    """Two-tone pattern weight in [0, 1] at pixel offsets (pu, pv) in the object frame."""
    k = 2 * math.pi / period
    if kind == "hstripes":
        wave = np.sin(k * pv)
    elif kind == "vstripes":
        wave = np.sin(k * pu)
    elif kind == "diag":
        wave = np.sin(k * (pu + pv) / math.sqrt(2))
    elif kind == "adiag":
        wave = np.sin(k * (pu - pv) / math.sqrt(2))
    elif kind == "checker":
        wave = np.sin(k * pu * 0.75) * np.sin(k * pv * 0.75)
    elif kind == "dots":
        wave = np.cos(k * pu) * np.cos(k * pv) - 0.3
    elif kind == "rings":
        wave = np.cos(k * np.sqrt(pu * pu + pv * pv))
    else:
        raise ValueError(f"unknown part pattern {kind!r}")
    return np.clip(wave * 2.5 + 0.5, 0.0, 1.0)


def _patch_field(
    rng: np.random.Generator, obj: _Placed, rgb: Array, alt_rgb: Array, pattern: str, size: int
) -> Array:
    mode = obj.mode_spec
    pu = (obj.u - mode.part_at[0]) * obj.radius
    pv = (obj.v - mode.part_at[1]) * obj.radius
    period = max(3.0, PART_PERIOD * size) * rng.uniform(0.85, 1.15)
    weight = _pattern(pattern, pu, pv, period)[..., None]
    return alt_rgb + (rgb - alt_rgb) * weight


def _blend(canvas: Array, field: Array, alpha: Array) -> None:
    canvas += (field - canvas) * alpha[..., None]


def _background(rng: np.random.Generator, size: int) -> Array:
    """Two family colours in a ramp, smooth colour blotches and a shared texture."""
    xs, ys = _grid(size)
    first, second = _family_colour(rng), _family_colour(rng)
    phi = rng.uniform(0, 2 * math.pi)
    ramp = ((xs - size / 2) * math.cos(phi) + (ys - size / 2) * math.sin(phi)) / size + 0.5
    ramp = np.clip(ramp, 0, 1)[..., None] * rng.uniform(0.3, 1.0)
    canvas = first + (second - first) * ramp
    canvas = canvas + _smooth_noise(rng, size, int(rng.integers(3, 6)), 3) * rng.uniform(6, 14)
    canvas = canvas + _smooth_noise(rng, size, int(rng.integers(3, 6)), 1) * rng.uniform(6, 16)
    return (canvas + _texture(rng, size)).astype(np.float32)


def _draw_clutter(rng: np.random.Generator, canvas: Array) -> None:
    """Line segments and arcs in muted colours."""
    size = canvas.shape[0]
    xs, ys = _grid(size)
    for _ in range(int(rng.integers(1, 5))):
        (x0, y0), (x1, y1) = rng.uniform(-0.1, 1.1, (2, 2)) * size
        ex, ey = x1 - x0, y1 - y0
        t = np.clip(((xs - x0) * ex + (ys - y0) * ey) / max(ex * ex + ey * ey, 1e-6), 0, 1)
        dist = np.sqrt((xs - x0 - t * ex) ** 2 + (ys - y0 - t * ey) ** 2)
        width = rng.uniform(0.6, 2.5) * size / 128
        colour = _family_colour(rng) * rng.uniform(0.5, 1.3)
        _blend(canvas, colour, _coverage(dist - width / 2))
    for _ in range(int(rng.integers(0, 3))):
        cx, cy = rng.uniform(0, size, 2)
        radius = rng.uniform(0.1, 0.4) * size
        width = rng.uniform(0.6, 2.0) * size / 128
        dist = np.abs(np.sqrt((xs - cx) ** 2 + (ys - cy) ** 2) - radius)
        colour = _family_colour(rng) * rng.uniform(0.5, 1.3)
        _blend(canvas, colour, _coverage(dist - width / 2))


def _draw_distractors(rng: np.random.Generator, canvas: Array, family: str) -> None:
    """Object-like bodies without a class part (some with a muted decoy patch); in the
    attributes family half of them wear a random class's appearance mode."""
    size = canvas.shape[0]
    for _ in range(_choice(rng, NUM_DISTRACTORS_PROBS)):
        cls = int(rng.integers(len(CLASSES)))
        mode = int(rng.integers(len(MODE_PROBS)))
        radius = rng.uniform(*DISTRACTOR_RADIUS) * size * CLASSES[cls].scale
        angle = math.radians(rng.uniform(-180, 180))
        cx, cy = rng.uniform(0, size, 2)
        decoy = rng.random() < DECOY_PATCH_PROB
        obj = _place(cls, mode, cx, cy, radius, angle, size, with_part=decoy)
        crop = canvas[obj.region]
        appearance = None
        if family == "attributes" and rng.random() < CLUTTER_ATTRIBUTE_PROB:
            appearance = class_appearance(int(rng.integers(len(CLASSES))),
                                          _choice(rng, ATTRIBUTE_PROBS))
        _blend(crop, _body_field(rng, obj, None, size, appearance), obj.body)
        if obj.part is not None:
            rgb, alt = _family_colour(rng), _family_colour(rng) * 0.6
            pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
            _blend(crop, _patch_field(rng, obj, rgb, alt, pattern, size), obj.part)


def _draw_object(
    rng: np.random.Generator, canvas: Array, obj: _Placed, appearance: int | None = None
) -> None:
    """Body then part; `appearance` (attributes family) is the object's appearance mode."""
    spec, size, crop = obj.spec, canvas.shape[0], canvas[obj.region]
    look = None if appearance is None else class_appearance(obj.cls, appearance)
    _blend(crop, _body_field(rng, obj, obj.mode_spec.body, size, look), obj.body)
    jitter = rng.normal(0, 8, 3).astype(np.float32)
    rgb = np.asarray(spec.part_rgb, dtype=np.float32) + jitter
    alt = np.asarray(spec.part_alt_rgb, dtype=np.float32) + jitter
    assert obj.part is not None
    _blend(crop, _patch_field(rng, obj, rgb, alt, spec.pattern, size), obj.part)


# ----------------------------------------------------------------------------- one sample


@dataclass
class Sample:
    """One rendered image with its mask and per-object record."""

    image: Array  # (H, W, 3) uint8
    mask: Array  # (H, W) uint8: 0 background, i = CLASS_NAMES[i], 255 border/uncertain
    labels: list[str]  # class names present in the mask, in CLASS_NAMES order
    objects: list[dict[str, Any]]


def render_sample(
    seed: int, split: str, index: int, image_size: int, family: str = "parts"
) -> Sample:
    """Render image `index` of `split`; depends only on (seed, split, index, image_size,
    family). The attributes family draws its objects' appearance modes from a generator of
    its own, so its objects (classes, shape modes, geometry, masks, labels) are exactly the
    parts family's for the same seed; only appearances differ."""
    if family not in FAMILIES:
        raise ConfigError(f"synthetic dataset: unknown family {family!r}; choose "
                          f"{', '.join(FAMILIES)}")
    rng = np.random.default_rng([seed, SPLIT_CODES[split], index])
    size = image_size
    objects, vis = _sample_objects(rng, size)
    looks: list[int | None] = [None] * len(objects)
    if family == "attributes":
        look_rng = np.random.default_rng([seed, SPLIT_CODES[split], index, 1])
        looks = [_choice(look_rng, ATTRIBUTE_PROBS) for _ in objects]
    canvas = _background(rng, size)
    _draw_clutter(rng, canvas)
    _draw_distractors(rng, canvas, family)
    for obj, look in zip(objects, looks, strict=True):
        _draw_object(rng, canvas, obj, look)
    canvas *= rng.uniform(0.9, 1.1)
    canvas += rng.standard_normal(canvas.shape, dtype=np.float32) * SENSOR_NOISE
    image = np.clip(np.rint(canvas), 0, 255).astype(np.uint8)

    mask = np.zeros((size, size), dtype=np.uint8)
    records = []
    for j, obj in enumerate(objects):
        interior = (vis.owner == j) & ~vis.band
        listed = vis.visible[j] >= MIN_VISIBLE_PIXELS
        mask[interior] = obj.cls + 1 if listed else IGNORE_INDEX
        records.append(
            {
                "class": obj.spec.name,
                "mode": obj.mode_spec.name,
                **({} if looks[j] is None else {"appearance": int(looks[j])}),
                "center": [round(obj.cx, 2), round(obj.cy, 2)],
                "radius": round(obj.radius, 2),
                "angle_deg": round(math.degrees(obj.angle), 1),
                "visible_pixels": vis.visible[j],
                "occluded": round(vis.occluded[j], 3),
                "part_visible": round(min(vis.part_visible[j], 1.0), 3),
                "labelled": listed,
            }
        )
    mask[vis.band] = IGNORE_INDEX
    counts = np.bincount(mask.ravel(), minlength=IGNORE_INDEX + 1)
    labels = [CLASS_NAMES[i] for i in range(1, len(CLASS_NAMES)) if counts[i]]
    return Sample(image=image, mask=mask, labels=labels, objects=records)


# ----------------------------------------------------------------------------- dataset files


def _check_spec(seed: int, num_train: int, num_val: int, image_size: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synthetic dataset: seed must be a non-negative integer, got {seed!r}")
    if num_train < 1 or num_val < 1:
        raise ConfigError(
            f"synthetic dataset: needs >= 1 image per split, got {num_train} train / {num_val} val"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"synthetic dataset: image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}"
        )


def _mode_table() -> dict[str, list[dict[str, Any]]]:
    return {
        spec.name: [
            {
                "name": mode.name,
                "prob": prob,
                "body": mode.body,
                "shape": mode.shape.kind,
                "part_at": list(mode.part_at),
                "part_shape": mode.part_shape,
            }
            for mode, prob in zip(spec.modes, MODE_PROBS, strict=True)
        ]
        for spec in CLASSES
    }


def generate(
    root: Path, *, seed: int, num_train: int, num_val: int, image_size: int,
    family: str = "parts",
) -> None:
    """Write the dataset into `root` (must not exist or be empty).

    manifest.json is written last, so its presence marks a finished dataset.
    """
    _check_spec(seed, num_train, num_val, image_size)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"cannot generate the synthetic dataset into {root}: not empty")
    image_dir, mask_dir = root / "JPEGImages", root / "SegmentationClass"
    split_dir = root / "ImageSets" / "Segmentation"
    for folder in (image_dir, mask_dir, split_dir):
        folder.mkdir(parents=True, exist_ok=True)

    fg_names = CLASS_NAMES[1:]
    image_labels: dict[str, list[str]] = {}
    objects: dict[str, list[dict[str, Any]]] = {}
    splits: dict[str, Any] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        ids = []
        class_counts = dict.fromkeys(fg_names, 0)
        mode_counts = {s.name: {m.name: 0 for m in s.modes} for s in CLASSES}
        labels_per_image = {"1": 0, "2": 0, "3": 0}
        for index in range(1, count + 1):
            image_id = f"{split}_{index:05d}"
            sample = render_sample(seed, split, index, image_size, family)
            with atomic_path(image_dir / f"{image_id}.png") as tmp:
                # Level 1: noisy images barely compress further, and it halves encode time.
                Image.fromarray(sample.image, mode="RGB").save(tmp, format="PNG", compress_level=1)
            save_label_png(mask_dir / f"{image_id}.png", sample.mask)
            ids.append(image_id)
            image_labels[image_id] = sample.labels
            objects[image_id] = sample.objects
            for name in sample.labels:
                class_counts[name] += 1
            for record in sample.objects:
                if record["labelled"]:
                    mode_counts[record["class"]][record["mode"]] += 1
            labels_per_image[str(len(sample.labels))] += 1
        write_text_atomic(split_dir / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        splits[split] = {
            "class_image_counts": class_counts,
            "mode_counts": mode_counts,
            "labels_per_image": labels_per_image,
        }

    write_text_atomic(root / "classes.txt", "".join(f"{name}\n" for name in CLASS_NAMES))
    write_json_atomic(root / "image_labels.json", image_labels)
    write_json_atomic(root / "objects.json", objects)
    total_classes = {
        name: sum(s["class_image_counts"][name] for s in splits.values()) for name in fg_names
    }
    total_modes = {
        spec.name: {
            m.name: sum(s["mode_counts"][spec.name][m.name] for s in splits.values())
            for m in spec.modes
        }
        for spec in CLASSES
    }
    manifest = {
        "generator": "cpal.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "family": family,
        "seed": seed,
        "image_size": image_size,
        "counts": {"train": num_train, "val": num_val},
        "class_names": list(CLASS_NAMES),
        "class_image_counts": total_classes,
        "mode_counts": total_modes,
        "modes": _mode_table(),
        "mode_probs": list(MODE_PROBS),
        **({"appearances": _appearance_table()} if family == "attributes" else {}),
        "ignore_index": IGNORE_INDEX,
        "border_px_per_side": _border_width(image_size),
        "min_visible_pixels": MIN_VISIBLE_PIXELS,
        "splits": splits,
    }
    write_json_atomic(root / "manifest.json", manifest)


def _appearance_table() -> dict[str, list[dict[str, Any]]]:
    return {
        spec.name: [
            {"rgb": list(class_appearance(c, m)[0]), "texture": class_appearance(c, m)[1],
             "prob": prob,
             **({"borrowed_from": CLASSES[(c + ATTRIBUTE_SHARE_OFFSET) % len(CLASSES)].name}
                if m == 2 else {})}
            for m, prob in enumerate(ATTRIBUTE_PROBS)
        ]
        for c, spec in enumerate(CLASSES)
    }


def dataset_name(
    *, seed: int, num_train: int, num_val: int, image_size: int, family: str = "parts"
) -> str:
    kind = "" if family == "parts" else f"-{family}"
    return (f"synthetic{kind}-v{GENERATOR_VERSION}-seed{seed}-{num_train}x{num_val}-"
            f"{image_size}px")


def _is_complete(folder: Path, seed: int, num_train: int, num_val: int, image_size: int,
                 family: str = "parts") -> bool:
    """True if `folder` holds a finished dataset of this generator version and spec."""
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (
        manifest.get("family", "parts") == family
        and manifest.get("generator_version") == GENERATOR_VERSION
        and manifest.get("seed") == seed
        and manifest.get("image_size") == image_size
        and manifest.get("counts") == {"train": num_train, "val": num_val}
    )


def ensure_dataset(
    cache_dir: Path,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 128,
    family: str = "parts",
) -> Path:
    """Return the cached dataset folder, generating it atomically on first use.

    Generation goes to a hidden temporary sibling that is renamed into place, so a killed
    run never leaves a folder that looks complete, and concurrent callers either win the
    rename or adopt the winner's (identical) dataset.
    """
    _check_spec(seed, num_train, num_val, image_size)
    cache_dir = Path(cache_dir).expanduser()
    name = dataset_name(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size,
                        family=family)
    target = cache_dir / name
    if _is_complete(target, seed, num_train, num_val, image_size, family):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would be kept by the renamed dataset folder.
    tmp = cache_dir / f".{name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        generate(tmp, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size,
                 family=family)
        for _ in range(10):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if _is_complete(target, seed, num_train, num_val, image_size, family):
                    return target  # another process won the race
                # A stale or partial folder: move it aside (atomic), then retry.
                stale = cache_dir / f".{name}.stale-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):  # someone else moved it
                    os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
        raise DatasetError(f"cannot move the generated dataset into place at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ----------------------------------------------------------------------------- preview grid


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


def _wrap(draw: ImageDraw.ImageDraw, words: list[str], font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def sample_grid(root: Path, path: Path, *, num_images: int = 12, split: str = "train") -> None:
    """Write a PNG grid (image above its colour mask, with the class names) for the README.

    The grid is palette-quantised: it is for looking at, not a lossless copy of the data.
    """
    root = Path(root)
    split_file = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    try:
        ids = split_file.read_text(encoding="utf-8").split()[:num_images]
        labels = json.loads((root / "image_labels.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the synthetic dataset at {root}: {error}") from error
    if not ids:
        raise DatasetError(f"{split_file} lists no images")
    images = [_open_rgb(root / "JPEGImages" / f"{i}.png") for i in ids]
    masks = [_open_rgb(root / "SegmentationClass" / f"{i}.png") for i in ids]
    size = images[0].width
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 3
    gap = 6
    captions = [_wrap(scratch, labels.get(i, []), font, size) for i in ids]
    text_h = line_h * max(len(c) for c in captions) + gap
    cols = min(GRID_COLUMNS, len(ids))
    rows = math.ceil(len(ids) / cols)
    cell_w, cell_h = size + gap, 2 * size + 2 + text_h

    palette = voc_palette().tolist()
    legend = [(name, tuple(palette[k])) for k, name in enumerate(CLASS_NAMES) if k > 0]
    legend.append(("border (255)", tuple(palette[IGNORE_INDEX])))
    legend_w = gap + cols * cell_w
    legend_lines: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    x = gap
    for entry in legend:
        width = line_h + 4 + int(scratch.textlength(entry[0], font=font)) + 12
        if x + width > legend_w and legend_lines[-1]:
            legend_lines.append([])
            x = gap
        legend_lines[-1].append(entry)
        x += width
    canvas = Image.new(
        "RGB", (legend_w, gap + rows * cell_h + len(legend_lines) * line_h + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for k, (image, mask, caption) in enumerate(zip(images, masks, captions, strict=True)):
        x, y = gap + (k % cols) * cell_w, gap + (k // cols) * cell_h
        canvas.paste(image, (x, y))
        canvas.paste(mask, (x, y + size + 2))
        for n, line in enumerate(caption):
            draw.text((x, y + 2 * size + 4 + n * line_h), line, fill="black", font=font)
    y = gap + rows * cell_h
    for entries in legend_lines:
        x = gap
        for name, colour in entries:
            draw.rectangle((x, y, x + line_h - 3, y + line_h - 3), fill=colour, outline="black")
            draw.text((x + line_h + 1, y), name, fill="black", font=font)
            x += line_h + 4 + int(draw.textlength(name, font=font)) + 12
        y += line_h
    # A dithered 256-colour palette keeps README images ~3x smaller at no visible cost;
    # mask and text colours are reserved entries, so they stay exact (and undithered).
    reserved = [(0, 0, 0), (255, 255, 255), *(colour for _, colour in legend)]
    learned = canvas.quantize(colors=256 - len(reserved), method=Image.Quantize.MAXCOVERAGE)
    colours = [c for rgb in reserved for c in rgb] + learned.getpalette()[: 3 * 256]
    palette_image = Image.new("P", (1, 1))
    palette_image.putpalette(colours[: 3 * 256])
    quantised = canvas.quantize(palette=palette_image, dither=Image.Dither.FLOYDSTEINBERG)
    with atomic_path(path) as tmp:
        quantised.save(tmp, format="PNG", optimize=True)
