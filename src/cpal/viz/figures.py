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
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch

from cpal.io import IGNORE_INDEX, atomic_path, voc_palette

__all__ = ["OverlayRow", "overlay_grid", "per_class_iou_chart", "sweep_curve"]

_DPI = 100
_HEAT_ALPHA = 0.5
_NO_GT_GREY = 200


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


def overlay_grid(
    rows: Sequence[OverlayRow], path: Path, class_names: Sequence[str],
    heat_title: str = "heat map",
) -> None:
    """One row per image: image | GT | heat over image (jet) [| more heats] | pseudo label.

    GT and pseudo labels use the VOC palette; a legend lists the classes that appear
    (ignore included when present) so that colours can be read without a key.
    """
    if not rows:
        raise ValueError("overlay_grid needs at least one row")
    for row in rows:
        row.validate()
    palette = voc_palette()
    extra = list(rows[0].more_heats)
    if any(list(row.more_heats) != extra for row in rows):
        raise ValueError("overlay_grid: every row needs the same more_heats keys")
    titles = ("image", "ground truth", heat_title, *extra, "pseudo label")
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
        panels = [
            image,
            _NO_GT_GREY if row.gt is None else _colorize(row.gt, palette),
            _blend_heat(image, row.heat),
            *(_blend_heat(image, row.more_heats[key]) for key in extra),
            _colorize(pseudo, palette),
        ]
        if row.gt is not None:
            present.update(int(v) for v in np.unique(np.asarray(row.gt)))
        for c, (ax, panel) in enumerate(zip(axes[r], panels, strict=True)):
            ax.set_xticks([])
            ax.set_yticks([])
            if isinstance(panel, np.ndarray):
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
