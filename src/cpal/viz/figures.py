"""Figures: qualitative overlays, threshold-sweep curves and per-class IoU bars.

Built on matplotlib's object-oriented API (`Figure` + `FigureCanvasAgg`), never pyplot:
no global figure state, no GUI backend, safe in worker threads and headless runs. Every
PNG is written through `cpal.io.atomic_path`, so an interrupted run never leaves a
truncated image behind.

Scores arrive as fractions in [0, 1], as `SegmentationScores` holds them, and are drawn
in percent; a value above 1 raises rather than drawing a chart 100x off.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
from PIL import Image

from cpal.io import IGNORE_INDEX, atomic_path, voc_palette

__all__ = ["ContextPanel", "OverlayRow", "overlay_grid", "per_class_iou_chart", "sweep_curve"]

_DPI = 100
_HEAT_ALPHA = 0.5
_NO_GT_GREY = 200
_THUMB = 64  # context thumbnail side (pixels of the mosaic)
_THUMB_CAPTION = 24  # room under a thumbnail for its two-line caption
_THUMB_GAP = 4


@dataclass
class ContextPanel:
    """The training images behind the context prototypes selected for one class: which
    attributes of the class the support bank offered this image."""

    label: str  # drawn under the panel, e.g. the class name
    thumbnails: list[tuple[str, np.ndarray | None]] = field(default_factory=list)
    """(caption, (h, w, 3) image) per selected context prototype, best first; None when
    the entry's source image is unknown."""


@dataclass
class OverlayRow:
    """One image of an overlay grid; all arrays share the image's (H, W)."""

    image_id: str
    image: np.ndarray  # (H, W, 3) uint8
    gt: np.ndarray | None  # (H, W) uint8 class indices, 255 = ignore
    heat: np.ndarray  # (H, W) float in [0, 1], e.g. the max over the class maps
    pseudo: np.ndarray  # (H, W) uint8 class indices
    more_heats: dict[str, np.ndarray] = field(default_factory=dict)
    """Further heat maps drawn after `heat`, titled by their keys (e.g. {"PACAM": ...})."""
    context: ContextPanel | None = None
    """Drawn as a last column when any row of the grid has one."""

    def validate(self) -> None:
        """Raise ValueError naming the image and the array whose shape is wrong."""
        image = np.asarray(self.image)
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"{self.image_id}: image must be (H, W, 3), got {image.shape}")
        size = image.shape[:2]
        arrays = {"heat": self.heat, "pseudo": self.pseudo, **self.more_heats}
        if self.gt is not None:
            arrays["gt"] = self.gt
        for name, array in arrays.items():
            shape = np.asarray(array).shape
            if shape != size:
                raise ValueError(f"{self.image_id}: {name} shape {shape} != image size {size}")
        for caption, thumb in self.context.thumbnails if self.context else ():
            shape = None if thumb is None else np.asarray(thumb).shape
            if shape is not None and (len(shape) != 3 or shape[2] != 3):
                raise ValueError(f"{self.image_id}: context thumbnail {caption!r} shape {shape}")


def _save(figure: Figure, path: Path) -> None:
    FigureCanvasAgg(figure)  # attaches itself to the figure
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png", dpi=_DPI)


def _colorize(labels: np.ndarray, palette: np.ndarray) -> np.ndarray:
    return palette[np.asarray(labels, dtype=np.uint8)]


def _as_uint8_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype == np.uint8:
        return image
    if np.issubdtype(image.dtype, np.floating) and image.size and image.max() <= 1.0:
        image = image * 255.0
    return np.clip(image, 0, 255).astype(np.uint8)


def _blend_heat(image: np.ndarray, heat: np.ndarray) -> np.ndarray:
    """The jet-coloured heat map blended half-and-half over the image."""
    heat = np.clip(np.nan_to_num(np.asarray(heat, dtype=np.float64)), 0.0, 1.0)
    coloured = colormaps["jet"](heat)[..., :3]
    blended = (1.0 - _HEAT_ALPHA) * (image / 255.0) + _HEAT_ALPHA * coloured
    return (np.clip(blended, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def _class_name(class_names: Sequence[str], index: int) -> str:
    if index == IGNORE_INDEX:
        return "ignore"
    return class_names[index] if index < len(class_names) else f"class {index}"


def _thumbnail(image: np.ndarray, side: int) -> np.ndarray:
    """The image shrunk to fit side x side (aspect kept), centred on light grey."""
    tile = np.full((side, side, 3), 235, dtype=np.uint8)
    small = Image.fromarray(_as_uint8_image(image))
    small.thumbnail((side, side), Image.Resampling.BILINEAR)
    h, w = small.height, small.width
    y, x = (side - h) // 2, (side - w) // 2
    tile[y : y + h, x : x + w] = np.asarray(small.convert("RGB"))
    return tile


def _context_mosaic(
    panel: ContextPanel,
) -> tuple[np.ndarray, list[tuple[float, float, str]]]:
    """Thumbnails tiled in a near-square grid (white ground) and (x, y, text) captions."""
    n = len(panel.thumbnails)
    cols = max(1, math.ceil(math.sqrt(n)))
    rows = max(1, math.ceil(n / cols))
    step_x, step_y = _THUMB + _THUMB_GAP, _THUMB + _THUMB_CAPTION + _THUMB_GAP
    mosaic = np.full((rows * step_y + _THUMB_GAP, cols * step_x + _THUMB_GAP, 3), 255, np.uint8)
    texts = []
    for i, (caption, thumb) in enumerate(panel.thumbnails):
        r, c = divmod(i, cols)
        y, x = _THUMB_GAP + r * step_y, _THUMB_GAP + c * step_x
        if thumb is None:
            mosaic[y : y + _THUMB, x : x + _THUMB] = _NO_GT_GREY
            texts.append((x + _THUMB / 2, y + _THUMB / 2, "?"))
        else:
            mosaic[y : y + _THUMB, x : x + _THUMB] = _thumbnail(thumb, _THUMB)
        texts.append((x + _THUMB / 2, y + _THUMB + 2, caption))
    return mosaic, texts


def _draw_context(ax: Axes, panel: ContextPanel | None) -> None:
    if panel is None or not panel.thumbnails:
        ax.imshow(np.full((_THUMB, _THUMB, 3), 255, np.uint8))
        note = "no context" if panel is None else "no selected context"
        ax.text(0.5, 0.5, note, ha="center", va="center", transform=ax.transAxes, fontsize=8)
    else:
        mosaic, texts = _context_mosaic(panel)
        ax.imshow(mosaic, interpolation="bilinear")
        for x, y, text in texts:
            centred = text == "?"
            ax.text(x, y, text, ha="center", va="center" if centred else "top",
                    fontsize=10 if centred else 6, linespacing=1.0)
    if panel is not None:
        ax.set_xlabel(f"class: {panel.label}", fontsize=9)


def overlay_grid(
    rows: Sequence[OverlayRow], path: Path, class_names: Sequence[str],
    heat_title: str = "heat map", label_title: str = "pseudo label",
) -> None:
    """One row per image: image | GT | heat over image (jet) [| more heats] | pseudo label
    [| context].

    GT and pseudo labels use the VOC palette; a legend lists the classes that appear
    (ignore included when present) so that colours can be read without a key. The context
    column (when any row has a ContextPanel) tiles the thumbnails of the panel.
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    for row in rows:
        row.validate()
    palette = voc_palette()
    extra = list(rows[0].more_heats)
    if any(list(row.more_heats) != extra for row in rows):
        raise ValueError("overlay_grid: every row needs the same more_heats keys")
    with_context = any(row.context is not None for row in rows)
    titles = ("image", "ground truth", heat_title, *extra, label_title)
    if with_context:
        titles = (*titles, "context: nearest bank entries")
    columns = len(titles)
    # Panels 3 inches wide; each row as tall as its image's aspect ratio asks.
    row_heights = [3.0 * row.image.shape[0] / max(row.image.shape[1], 1) for row in rows]
    figure = Figure(
        figsize=(columns * 3.0, sum(row_heights) + 0.4 * len(rows) + 0.8), layout="constrained"
    )
    axes = figure.subplots(
        len(rows), columns, squeeze=False, gridspec_kw={"height_ratios": row_heights}
    )
    present: set[int] = set()
    for r, row in enumerate(rows):
        image = _as_uint8_image(row.image)
        pseudo = np.asarray(row.pseudo)
        present.update(int(v) for v in np.unique(pseudo))
        panels: list[np.ndarray | int | None] = [
            image,
            _NO_GT_GREY if row.gt is None else _colorize(row.gt, palette),
            _blend_heat(image, row.heat),
            *(_blend_heat(image, row.more_heats[key]) for key in extra),
            _colorize(pseudo, palette),
        ]
        if row.gt is not None:
            present.update(int(v) for v in np.unique(np.asarray(row.gt)))
        if with_context:
            panels.append(None)  # drawn from row.context
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.set_xticks([])
            ax.set_yticks([])
            if panel is None:
                _draw_context(ax, row.context)
            elif isinstance(panel, np.ndarray):
                ax.imshow(panel, interpolation="nearest")
            else:  # a grey panel of the image's size keeps the row's layout
                ax.imshow(np.full_like(image, panel))
                ax.text(0.5, 0.5, "no GT", ha="center", va="center", transform=ax.transAxes)
            if r == 0:
                ax.set_title(titles[c], fontsize=10)
        axes[r][0].set_ylabel(row.image_id, fontsize=9)
    handles = [
        Patch(
            facecolor=palette[index] / 255.0,
            edgecolor="black",
            linewidth=0.5,
            label=_class_name(class_names, index),
        )
        for index in sorted(present)
    ]
    if handles:
        figure.legend(
            handles=handles,
            loc="outside lower center",
            ncol=min(len(handles), 7),
            fontsize=9,
            frameon=False,
        )
    _save(figure, Path(path))


def _fractions(name: str, values: Sequence[float | None]) -> np.ndarray:
    """Fractions (None -> NaN) checked to lie in [0, 1]."""
    array = np.array([math.nan if v is None else float(v) for v in values], dtype=np.float64)
    finite = array[~np.isnan(array)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0):
        raise ValueError(
            f"{name}: scores must be fractions in [0, 1] (as SegmentationScores holds "
            f"them), got values in [{finite.min():g}, {finite.max():g}]"
        )
    return array


def sweep_curve(
    thresholds: Sequence[float],
    miou_by_split: Mapping[str, Sequence[float]],
    chosen: float | None,
    path: Path,
    title: str = "",
) -> None:
    """mIoU (%) against background threshold, one line per split, the chosen one marked.

    Drawing the evaluated split next to the split the threshold was tuned on shows at a
    glance how much an oracle choice would have gained.
    """
    x = np.asarray(thresholds, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError("sweep_curve needs a non-empty 1-D sequence of thresholds")
    if not miou_by_split:
        raise ValueError("sweep_curve needs at least one split")
    series = {}
    for split, values in miou_by_split.items():
        if len(values) != x.size:
            raise ValueError(
                f"split {split!r} has {len(values)} mIoU values for {x.size} thresholds"
            )
        series[split] = 100.0 * _fractions(f"split {split!r}", values)
    order = np.argsort(x, kind="stable")
    figure = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = figure.add_subplot()
    for split, y in series.items():
        ax.plot(x[order], y[order], marker="o", markersize=3, label=split)
    if chosen is not None:
        ax.axvline(
            float(chosen), color="black", linestyle="--", linewidth=1, label=f"chosen {chosen:g}"
        )
    ax.set_xlabel("background threshold")
    ax.set_ylabel("mIoU (%)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=9)
    if title:
        ax.set_title(title)
    _save(figure, Path(path))


def per_class_iou_chart(
    class_names: Sequence[str],
    iou_by_series: Mapping[str, Sequence[float | None]],
    path: Path,
    title: str = "",
) -> None:
    """Grouped horizontal bars of per-class IoU (%), one colour per series.

    Undefined IoUs (None or NaN: the class neither occurs nor is predicted) get no bar
    rather than a misleading zero; the legend gives each series' mean over defined
    classes, which is its mIoU.
    """
    if not class_names:
        raise ValueError("per_class_iou_chart needs class names")
    if not iou_by_series:
        raise ValueError("per_class_iou_chart needs at least one series")
    series = {}
    for name, values in iou_by_series.items():
        if len(values) != len(class_names):
            raise ValueError(
                f"series {name!r} has {len(values)} values for {len(class_names)} classes"
            )
        series[name] = 100.0 * _fractions(f"series {name!r}", values)
    num_classes, num_series = len(class_names), len(series)
    height = 0.8 / num_series
    positions = np.arange(num_classes, dtype=np.float64)
    figure = Figure(
        figsize=(7.0, max(3.0, 0.25 * num_classes * max(1.0, num_series / 2) + 1.2)),
        layout="constrained",
    )
    ax = figure.add_subplot()
    for s, (name, values) in enumerate(series.items()):
        defined = ~np.isnan(values)
        offset = (s - (num_series - 1) / 2) * height
        mean = float(values[defined].mean()) if defined.any() else math.nan
        label = f"{name} (mean {mean:.1f})" if not math.isnan(mean) else name
        ax.barh(positions[defined] + offset, values[defined], height=height, label=label)
    ax.set_yticks(positions, labels=[str(n) for n in class_names], fontsize=8)
    ax.invert_yaxis()  # first class at the top, as in a table
    ax.set_xlim(0, 100)
    ax.set_xlabel("IoU (%)")
    ax.grid(True, axis="x", alpha=0.3)
    # Long series names (they carry thresholds and means) get one legend row each.
    _, labels = ax.get_legend_handles_labels()
    longest = max((len(label) for label in labels), default=0)
    ncol = 1 if longest > 30 else min(num_series, 4)
    figure.legend(loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)
    if title:
        ax.set_title(title)
    _save(figure, Path(path))
