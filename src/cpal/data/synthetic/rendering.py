"""Rendering one sample of the built-in dataset: vectorised numpy on coordinate grids.

Image `i` of a split depends only on `(seed, split, i, image_size, family)`: shapes are
signed distance functions rasterised with anti-aliased coverage, objects are placed until
each shows well, then background, clutter, distractors and objects are painted.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from cpal.data.synthetic.families import (
    ATTRIBUTE_PROBS,
    BODY_FAMILIES,
    BODY_TEXTURE_PROBS,
    BODY_TEXTURES,
    BORDER_PX_PER_SIDE,
    CLASS_NAMES,
    CLASSES,
    CLUTTER_ATTRIBUTE_PROB,
    DECOY_PATCH_PROB,
    DISTRACTOR_RADIUS,
    FAMILIES,
    LAYOUT_TRIES,
    MAX_ROTATION_DEG,
    MIN_PART_VISIBLE,
    MIN_SEPARATION,
    MIN_VISIBLE_PIXELS,
    MODE_PROBS,
    NUM_DISTRACTORS_PROBS,
    NUM_OBJECTS_PROBS,
    OBJECT_RADIUS,
    PART_PERIOD,
    PATTERNS,
    RGB,
    SENSOR_NOISE,
    SPLIT_CODES,
    ClassSpec,
    Mode,
    Shape,
    class_appearance,
)
from cpal.errors import ConfigError
from cpal.io import IGNORE_INDEX

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
    parts: Array  # (H, W) bool: the visible class part of a labelled object (diagnostics)


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
    parts = np.zeros((size, size), dtype=bool)
    records = []
    for j, obj in enumerate(objects):
        interior = (vis.owner == j) & ~vis.band
        listed = vis.visible[j] >= MIN_VISIBLE_PIXELS
        mask[interior] = obj.cls + 1 if listed else IGNORE_INDEX
        if listed and obj.part is not None:
            parts[obj.region] |= (obj.part >= 0.5) & interior[obj.region]
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
    return Sample(image=image, mask=mask, labels=labels, objects=records, parts=parts)
