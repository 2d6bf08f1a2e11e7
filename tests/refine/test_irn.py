"""IRN pieces: IR labels, pair offsets and paths, affinity from boundaries, affinity labels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpal.refine.crf import CRFParams
from cpal.refine.irn import (
    IRLabelParams,
    affinity_from_boundary,
    affinity_labels,
    downsample_labels,
    follow_threshold,
    ir_labels,
    pair_offsets,
    valid_pairs,
)

# ---------------------------------------------------------------- IR labels


def _two_object_scene() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 20 x 30 image: grey background, a red square (class 3), a green one (class 7) and
    a yellow patch. CAMs: strong inside each square; weak (0.1: neither confident fg nor
    confident bg) on a grey ring around the red square and on the yellow patch."""
    image = np.full((20, 30, 3), 128, dtype=np.uint8)
    image[4:12, 3:11] = (220, 20, 20)
    image[6:14, 18:26] = (20, 220, 20)
    image[15:19, 3:11] = (230, 230, 40)
    maps = np.zeros((2, 20, 30), dtype=np.float32)
    maps[0, 2:14, 1:13] = 0.1
    maps[0, 4:12, 3:11] = 0.9
    maps[0, 15:19, 3:11] = 0.1
    maps[1, 6:14, 18:26] = 0.8
    return image, maps, np.array([3, 7])


NO_PAIRWISE = CRFParams(gaussian_compat=0.0, bilateral_compat=0.0)


def test_ir_labels_construction_hand_computed() -> None:
    """Without pairwise terms the CRF keeps its input labels, so the construction is exact:
    fg where fg-conf (0.30) says fg, bg where bg-conf (0.05) says bg too, 255 between."""
    image, maps, classes = _two_object_scene()
    labels = ir_labels(image, maps, classes, IRLabelParams(crf=NO_PAIRWISE))
    assert labels.dtype == np.uint8 and labels.shape == (20, 30)
    expected = np.zeros((20, 30), dtype=np.uint8)
    expected[2:14, 1:13] = 255
    expected[4:12, 3:11] = 3
    expected[15:19, 3:11] = 255
    expected[6:14, 18:26] = 7
    np.testing.assert_array_equal(labels, expected)


def test_ir_labels_crf_follows_colour() -> None:
    """With IRN's CRF the weak ring, grey like the background, joins the background in
    both CRFs; the yellow patch keeps its weak class-3 evidence in the bg-conf CRF and
    stays ignored."""
    image, maps, classes = _two_object_scene()
    labels = ir_labels(image, maps, classes)
    expected = np.zeros((20, 30), dtype=np.uint8)
    expected[4:12, 3:11] = 3
    expected[15:19, 3:11] = 255
    expected[6:14, 18:26] = 7
    np.testing.assert_array_equal(labels, expected)


def test_ir_labels_thresholds_are_parameters() -> None:
    image, maps, classes = _two_object_scene()
    # A confident-fg background score of 0.08 takes the weak evidence as class 3.
    params = IRLabelParams(fg_threshold=0.08, bg_threshold=0.05, crf=NO_PAIRWISE)
    low = ir_labels(image, maps, classes, params)
    assert (low[2:14, 1:13] == 3).all() and (low[15:19, 3:11] == 3).all()
    assert not (low == 255).any()
    with pytest.raises(ValueError, match="bg_threshold"):
        IRLabelParams(fg_threshold=0.05, bg_threshold=0.3)
    with pytest.raises(ValueError, match="unary='labels'"):
        IRLabelParams(crf=CRFParams(unary="probabilities"))


def test_ir_labels_against_the_maps_own_background_hand_computed() -> None:
    """SIPE's cam2ir: confident fg by argmax against the own background, confident bg
    against it x 0.5; the thresholds are unused. Without pairwise terms, per pixel: class
    where m > b, background where 0.5 b >= m, unsure between (and ties go to background)."""
    image = np.full((2, 4, 3), 128, dtype=np.uint8)
    maps = np.array([[[0.9, 0.6, 0.3, 0.1], [0.5, 0.0, 0.4, 0.8]]], dtype=np.float32)
    background = np.array([[0.5, 0.8, 0.5, 0.9], [0.5, 0.2, 0.9, 0.7]], dtype=np.float32)
    params = IRLabelParams(fg_threshold=0.99, bg_threshold=0.98, crf=NO_PAIRWISE,
                           own_bg_factor=0.5)
    labels = ir_labels(image, maps, np.array([4]), params, background=background)
    np.testing.assert_array_equal(labels, [[4, 255, 255, 0], [255, 0, 0, 4]])
    # Without a background channel, or without the factor, IRN's planes apply.
    planes = IRLabelParams(fg_threshold=0.99, bg_threshold=0.98, crf=NO_PAIRWISE)
    np.testing.assert_array_equal(ir_labels(image, maps, np.array([4]), planes,
                                            background=background), np.zeros((2, 4)))
    np.testing.assert_array_equal(ir_labels(image, maps, np.array([4]), params),
                                  np.zeros((2, 4)))
    # The factor is recorded only when used, so earlier folder records still match.
    assert "own_bg_factor" not in planes.record() and params.record()["own_bg_factor"] == 0.5
    with pytest.raises(ValueError, match="own_bg_factor"):
        IRLabelParams(own_bg_factor=0.0)


def test_thresholds_follow_the_seeds_by_a_power() -> None:
    # reference 0.25 -> seeds at 0.5: the power is ln 0.5 / ln 0.25 = 1/2, a square root.
    for value, expected in ((0.04, 0.2), (0.09, 0.3), (0.25, 0.5), (0.64, 0.8)):
        assert follow_threshold(value, 0.5, 0.25) == pytest.approx(expected)
    # At the reference itself nothing moves; IRN's three keep their order either way.
    for value in (0.05, 0.25, 0.30):
        assert follow_threshold(value, 0.16, 0.16) == pytest.approx(value)
    for seeds in (0.05, 0.25, 0.55, 0.9):
        bg, walk, fg = (follow_threshold(v, seeds, 0.16) for v in (0.05, 0.25, 0.30))
        assert 0 < bg < seeds < walk < fg < 1
    with pytest.raises(ValueError, match=r"must lie in \(0, 1\): seed threshold 1.0"):
        follow_threshold(0.3, 1.0, 0.16)
    with pytest.raises(ValueError, match="reference 0"):
        follow_threshold(0.3, 0.5, 0)


def test_ir_labels_without_classes_are_background() -> None:
    image = np.zeros((5, 6, 3), dtype=np.uint8)
    labels = ir_labels(image, np.zeros((0, 5, 6), np.float32), np.zeros(0, np.int64))
    np.testing.assert_array_equal(labels, 0)


def test_ir_labels_bad_input() -> None:
    image, maps, classes = _two_object_scene()
    with pytest.raises(ValueError, match=r"image size \(20, 29\) != maps size \(20, 30\)"):
        ir_labels(image[:, :29], maps, classes)
    with pytest.raises(ValueError, match="maps must be floating point"):
        ir_labels(image, (maps * 10).astype(np.int32), classes)
    with pytest.raises(ValueError, match="3 classes given for 2 map channels"):
        ir_labels(image, maps, np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="image must be uint8"):
        ir_labels(image.astype(np.float32), maps, classes)
    with pytest.raises(ValueError, match="0 is background"):
        ir_labels(image, maps, np.array([0, 7]))


# ---------------------------------------------------------------- pairs and paths


def _cells(path: np.ndarray) -> list[tuple[int, int]]:
    return sorted(map(tuple, path.tolist()))


def test_radius_2_pairs_are_the_8_neighbourhood_half() -> None:
    pairs = pair_offsets(2)
    assert pairs.offsets.tolist() == [[0, 1], [1, -1], [1, 0], [1, 1]]
    paths = [_cells(p) for p in pairs.paths]
    assert paths[0] == [(0, 0), (0, 1)] and paths[2] == [(0, 0), (1, 0)]
    # Diagonal steps: both cells beside the diagonal lie within distance 1/sqrt(2) < 1.
    assert paths[1] == [(0, -1), (0, 0), (1, -1), (1, 0)]
    assert paths[3] == [(0, 0), (0, 1), (1, 0), (1, 1)]


def test_pair_offsets_radius_5_count_and_paths() -> None:
    pairs = pair_offsets(5)
    assert pairs.num_pairs == 34  # 4 + 9 + 9 + 7 + 5 offsets with |o| < 5 in the half plane
    offsets = {tuple(o) for o in pairs.offsets.tolist()}
    assert not offsets & {(-dy, -dx) for dy, dx in offsets}  # one per unordered pair
    path = dict(zip(map(tuple, pairs.offsets.tolist()), pairs.paths, strict=True))
    # Cells of the offset's box whose distance to the segment's line is below 1.
    assert _cells(path[(0, 4)]) == [(0, x) for x in range(5)]
    assert _cells(path[(3, 3)]) == sorted((y, x) for y in range(4) for x in range(4)
                                          if abs(x - y) <= 1)  # distance |x - y| / sqrt 2
    # (2, 3): distance |2x - 3y| / sqrt(13) < 1 keeps |2x - 3y| <= 3: 8 cells of 12.
    assert _cells(path[(2, 3)]) == [(0, 0), (0, 1), (1, 0), (1, 1), (1, 2), (1, 3), (2, 2),
                                    (2, 3)]


def test_valid_pairs_stay_on_the_grid() -> None:
    valid = valid_pairs(3, 4, radius=2)
    offsets = pair_offsets(2).offsets.tolist()
    right = offsets.index([0, 1])
    down_left = offsets.index([1, -1])
    assert not valid[right, :, 3].any() and valid[right, :, :3].all()
    assert not valid[down_left, :, 0].any() and not valid[down_left, 2].any()


# ---------------------------------------------------------------- affinity


def test_a_wall_blocks_affinity() -> None:
    """A vertical wall (boundary 1) at column 3 of a 5 x 7 grid: pairs across it have
    affinity 0, pairs on one side 1 - their path's largest boundary value."""
    boundary = torch.zeros(5, 7)
    boundary[:, 3] = 1.0
    boundary[2, 1] = 0.25
    aff = affinity_from_boundary(boundary, radius=3)
    assert aff.shape == (pair_offsets(3).num_pairs, 5, 7)
    offsets = pair_offsets(3).offsets.tolist()
    for p, (dy, dx) in enumerate(offsets):
        for y in range(5):
            for x in range(7):
                y2, x2 = y + dy, x + dx
                if not (y2 < 5 and 0 <= x2 < 7):
                    assert aff[p, y, x] == 0  # leaves the grid
                elif min(x, x2) <= 3 <= max(x, x2):
                    assert aff[p, y, x] == 0, (dy, dx, y, x)  # crosses or touches the wall
                else:
                    cells = {(y + cy, x + cx) for cy, cx in pair_offsets(3).paths[p].tolist()}
                    expected = 0.75 if (2, 1) in cells else 1.0
                    assert aff[p, y, x] == pytest.approx(expected), (dy, dx, y, x)


def test_affinity_is_differentiable_and_batched() -> None:
    boundary = torch.rand(2, 3, 6, 6, requires_grad=True)
    aff = affinity_from_boundary(boundary, radius=3)
    assert aff.shape == (2, 3, pair_offsets(3).num_pairs, 6, 6)
    aff.sum().backward()
    assert boundary.grad is not None and (boundary.grad <= 0).all()
    torch.testing.assert_close(aff[1, 2], affinity_from_boundary(boundary[1, 2].detach(), 3))


def test_affinity_bad_input() -> None:
    with pytest.raises(ValueError, match="floating-point tensor"):
        affinity_from_boundary(torch.zeros(4, 4, dtype=torch.int64))
    with pytest.raises(ValueError, match="radius"):
        affinity_from_boundary(torch.zeros(4, 4), radius=1)


# ---------------------------------------------------------------- affinity labels


def test_affinity_labels_hand_made() -> None:
    labels = torch.tensor([[0, 0, 5, 255],
                           [0, 5, 5, 5]])
    out = affinity_labels(labels, radius=2)
    offsets = pair_offsets(2).offsets.tolist()
    right, down = offsets.index([0, 1]), offsets.index([1, 0])
    assert out.bg_pos[right].tolist() == [[True, False, False, False], [False, False, False, False]]
    assert out.fg_pos[right].tolist() == [[False, False, False, False], [False, True, True, False]]
    assert out.neg[right].tolist() == [[False, True, False, False], [True, False, False, False]]
    assert out.bg_pos[down].tolist()[0] == [True, False, False, False]
    assert out.fg_pos[down].tolist()[0] == [False, False, True, False]
    assert out.neg[down].tolist()[0] == [False, True, False, False]  # 0 above 5; 255 ignored
    together = out.bg_pos.int() + out.fg_pos.int() + out.neg.int()
    assert together.max() <= 1
    assert not (together.bool() & ~valid_pairs(2, 4, radius=2)).any()


def test_affinity_labels_batched_and_from_numpy() -> None:
    labels = np.random.default_rng(0).integers(0, 3, (2, 6, 7))
    out = affinity_labels(labels, radius=3)
    single = affinity_labels(labels[1], radius=3)
    assert torch.equal(out.neg[1], single.neg) and torch.equal(out.fg_pos[1], single.fg_pos)
    with pytest.raises(ValueError, match="integer class indices"):
        affinity_labels(labels.astype(np.float32))


def test_downsample_labels_is_nearest() -> None:
    labels = np.zeros((8, 12), dtype=np.uint8)
    labels[:, 6:] = 4
    labels[0, 0] = 255
    small = downsample_labels(labels, 4)
    assert small.shape == (2, 3)
    assert set(np.unique(small)) <= {0, 4, 255}
    assert (small[:, 2] == 4).all() and (small[:, 1:2] != 255).all()
    with pytest.raises(ValueError, match="integer"):
        downsample_labels(labels.astype(np.float32))
