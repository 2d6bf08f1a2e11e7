"""The built-in dataset's class table and the parameters of its two families.

Each foreground object is a *body* (a shape whose colours and textures are shared by all
classes, by distractor shapes and by the background) carrying a small *part* (a patch with
a class-specific colour and pattern). Every class has three attribute modes (body colour
family, shape variant, part position) drawn with skewed frequencies (MODE_PROBS), so rare
appearances exist as in real data. The `attributes` family also gives each class's body
appearance modes of its own (ATTRIBUTE_*). Changing any value here changes pixels: bump
`cpal.data.synthetic.store.GENERATOR_VERSION`.
"""

from __future__ import annotations

from dataclasses import dataclass

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


def class_appearance(cls: int, mode: int) -> tuple[RGB, str]:
    """The attributes family's body appearance of `mode` (0, 1: own; 2: borrowed)."""
    if mode == 2:
        return ATTRIBUTE_APPEARANCES[(cls + ATTRIBUTE_SHARE_OFFSET) % len(CLASSES)][1]
    return ATTRIBUTE_APPEARANCES[cls][mode]
