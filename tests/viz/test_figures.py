from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.viz.figures import (
    ContextPanel,
    OverlayRow,
    overlay_grid,
    per_class_iou_chart,
    sweep_curve,
)

CLASS_NAMES = ["background", "aeroplane", "bicycle", "bird"]


def _assert_png(path: Path, min_width: int, min_height: int) -> tuple[int, int]:
    assert path.is_file()
    with Image.open(path) as image:
        assert image.format == "PNG"
        image.load()  # a truncated file fails here
        width, height = image.size
    assert width >= min_width and height >= min_height
    assert width <= 4000 and height <= 8000
    # atomic_path leaves no '.name.*.tmp' files beside the result
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    return width, height


def _row(rng: np.random.Generator, image_id: str, with_gt: bool) -> OverlayRow:
    height, width = 30, 40
    gt = np.zeros((height, width), dtype=np.uint8)
    gt[5:20, 10:30] = 2
    gt[0, :] = 255
    pseudo = np.zeros((height, width), dtype=np.uint8)
    pseudo[6:22, 12:30] = 3
    return OverlayRow(
        image_id=image_id,
        image=rng.integers(0, 256, (height, width, 3), dtype=np.uint8),
        gt=gt if with_gt else None,
        heat=rng.random((height, width)),
        pseudo=pseudo,
    )


def test_overlay_grid_writes_png(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "figs" / "overlay.png"
    overlay_grid(
        [_row(rng, "2007_000032", True), _row(rng, "2007_000039", False)], path, CLASS_NAMES
    )
    _, height = _assert_png(path, 600, 300)
    one_row = tmp_path / "one" / "overlay.png"
    overlay_grid([_row(rng, "2007_000032", True)], one_row, CLASS_NAMES)
    assert height > _assert_png(one_row, 600, 150)[1]  # rows add height


def test_overlay_grid_context_column(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    plain = tmp_path / "plain" / "overlay.png"
    overlay_grid([_row(rng, "a", True)], plain, CLASS_NAMES)
    width, _ = _assert_png(plain, 600, 150)
    row = _row(rng, "a", True)
    row.context = ContextPanel("bird", [
        ("w 0.61\n2007_000033", rng.integers(0, 256, (50, 80, 3), dtype=np.uint8)),
        ("w 0.39\nsource unknown", None),
        ("w 0.00\ntall", rng.integers(0, 256, (90, 20, 3), dtype=np.uint8)),
    ])
    other = _row(rng, "b", False)  # a row without context gets an empty panel
    path = tmp_path / "ctx" / "overlay.png"
    overlay_grid([row, other], path, CLASS_NAMES)
    ctx_width, _ = _assert_png(path, 600, 300)
    # one more 3-inch column at 100 dpi
    assert ctx_width == width + 300
    row.context.thumbnails.append(("bad", np.zeros((4, 4))))
    with pytest.raises(ValueError, match="a: context thumbnail 'bad'"):
        overlay_grid([row], tmp_path / "bad.png", CLASS_NAMES)


def test_overlay_grid_rejects_mismatched_shapes(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    row = _row(rng, "img", True)
    row.heat = np.zeros((3, 3))
    path = tmp_path / "overlay.png"
    with pytest.raises(ValueError, match="img: heat shape"):
        overlay_grid([row], path, CLASS_NAMES)
    with pytest.raises(ValueError, match="at least one row"):
        overlay_grid([], path, CLASS_NAMES)
    assert list(tmp_path.iterdir()) == []


def test_sweep_curve_writes_png(tmp_path: Path) -> None:
    thresholds = [0.05, 0.1, 0.15, 0.2]
    path = tmp_path / "sweep.png"
    sweep_curve(
        thresholds,
        {"train": [0.40, 0.45, 0.47, 0.44], "val": [0.41, 0.46, float("nan"), 0.43]},
        chosen=0.15,
        path=path,
        title="CAM background threshold",
    )
    _assert_png(path, 300, 200)


def test_sweep_curve_rejects_percentages_and_bad_lengths(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="fractions"):
        sweep_curve([0.1, 0.2], {"train": [45.0, 47.0]}, None, tmp_path / "a.png")
    with pytest.raises(ValueError, match="2 thresholds"):
        sweep_curve([0.1, 0.2], {"train": [0.4]}, None, tmp_path / "a.png")
    assert list(tmp_path.iterdir()) == []


def test_per_class_iou_chart_writes_png(tmp_path: Path) -> None:
    path = tmp_path / "per_class.png"
    per_class_iou_chart(
        CLASS_NAMES,
        {"CAM": [0.8, 0.5, None, 0.3], "CPAL": [0.85, 0.6, 0.2, float("nan")]},
        path,
        title="per-class IoU",
    )
    _assert_png(path, 300, 200)
    with pytest.raises(ValueError, match="3 values for 4 classes"):
        per_class_iou_chart(CLASS_NAMES, {"CAM": [0.1, 0.2, 0.3]}, tmp_path / "b.png")
    with pytest.raises(ValueError, match="fractions"):
        per_class_iou_chart(CLASS_NAMES, {"CAM": [80.0, 50.0, None, 30.0]}, tmp_path / "b.png")
