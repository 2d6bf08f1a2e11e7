from __future__ import annotations

import json
import math

import numpy as np
import pytest

from cpal.evaluation.metrics import (
    SegmentationScores,
    ThresholdSweep,
    confusion_matrix,
    default_thresholds,
    labels_from_maps,
    labels_with_own_background,
)
from cpal.io import MapRecord

# ---------------------------------------------------------------- confusion_matrix


def test_confusion_matrix_hand_computed_3x3_with_ignore() -> None:
    gt = np.array([[0, 0, 1], [1, 2, 2], [255, 2, 0]], dtype=np.uint8)
    pred = np.array([[0, 1, 1], [1, 2, 0], [2, 2, 0]], dtype=np.uint8)
    # pixel pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,2) (2,0) [ignored] (2,2) (0,0)
    expected = np.array(
        [
            [2, 1, 0],
            [0, 2, 0],
            [1, 0, 2],
        ]
    )
    conf = confusion_matrix(gt, pred, num_classes=3)
    assert conf.dtype == np.int64
    np.testing.assert_array_equal(conf, expected)
    assert conf.sum() == 8  # the ignored pixel (predicted 2) is not counted


def test_confusion_matrix_rejects_bad_input() -> None:
    gt = np.zeros((2, 2), dtype=np.uint8)
    with pytest.raises(ValueError, match=r"\(2, 2\).*\(2, 3\)"):
        confusion_matrix(gt, np.zeros((2, 3), dtype=np.uint8), 3)
    with pytest.raises(ValueError, match=r"prediction.*7"):
        confusion_matrix(gt, np.array([[0, 7], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"prediction.*-1"):
        confusion_matrix(gt, np.array([[0, -1], [1, 2]]), 3)
    with pytest.raises(ValueError, match=r"ground truth.*5"):
        confusion_matrix(np.array([[0, 5], [255, 1]]), np.zeros((2, 2), np.int64), 3)
    with pytest.raises(ValueError, match="integer"):
        confusion_matrix(gt, np.zeros((2, 2), dtype=np.float32), 3)


def test_confusion_matrix_out_of_range_gt_under_ignore_is_fine() -> None:
    gt = np.array([255, 255, 1])
    conf = confusion_matrix(gt, np.array([0, 1, 1]), 2)
    np.testing.assert_array_equal(conf, [[0, 0], [0, 1]])


# ---------------------------------------------------------------- SegmentationScores


def test_scores_hand_computed() -> None:
    # rows = GT, cols = prediction; class 3 neither occurs nor is predicted.
    conf = np.array(
        [
            [50, 10, 0, 0],
            [5, 20, 5, 0],
            [0, 0, 0, 0],
            [0, 0, 0, 0],
        ]
    )
    scores = SegmentationScores.from_confusion(conf)
    # class 0: tp 50, gt 60, pred 55 -> IoU 50/65, precision 50/55, recall 50/60
    # class 1: tp 20, gt 30, pred 30 -> IoU 20/40, precision 20/30, recall 20/30
    # class 2: tp 0, gt 0, pred 5  -> IoU 0/5 = 0, precision 0, recall undefined
    # class 3: union 0 -> everything undefined, excluded from mIoU
    # Default tolerances here and below: ratios of integer counts in float64 (no kernel).
    np.testing.assert_allclose(scores.iou[:3], [50 / 65, 0.5, 0.0])
    np.testing.assert_allclose(scores.precision[:3], [50 / 55, 20 / 30, 0.0])
    np.testing.assert_allclose(scores.recall[:2], [50 / 60, 20 / 30])
    assert math.isnan(scores.recall[2])
    assert np.isnan([scores.iou[3], scores.precision[3], scores.recall[3]]).all()
    assert scores.miou == pytest.approx((50 / 65 + 0.5 + 0.0) / 3)
    assert scores.pixel_accuracy == pytest.approx(70 / 90)
    # Objects merged: predicted object 10 + 20 + 5 = 35 px, GT object 5 + 20 + 5 = 30 px,
    # both object 20 + 5 = 25 px (the GT-1-predicted-2 pixels count: object found).
    assert scores.foreground_precision == pytest.approx(25 / 35)
    assert scores.foreground_recall == pytest.approx(25 / 30)


def test_scores_to_dict_percent_and_none() -> None:
    conf = np.array([[3, 1, 0], [0, 2, 0], [0, 0, 0]])
    scores = SegmentationScores.from_confusion(conf)
    data = scores.to_dict(["background", "cat", "dog"])
    json.dumps(data)  # JSON-ready: no NaN, no numpy scalars
    # IoU: bg 3/4 = 75 %, cat 2/3 = 66.67 %, dog undefined
    assert data["miou"] == round(100 * (0.75 + 2 / 3) / 2, 2) == 70.83
    assert data["pixel_accuracy"] == round(100 * 5 / 6, 2)
    assert (data["foreground_precision"], data["foreground_recall"]) == (66.67, 100.0)
    assert data["per_class"]["cat"] == {"iou": 66.67, "precision": 66.67, "recall": 100.0}
    assert data["per_class"]["dog"] == {"iou": None, "precision": None, "recall": None}
    with pytest.raises(ValueError, match="2 class names"):
        scores.to_dict(["a", "b"])


def test_scores_empty_confusion_is_undefined() -> None:
    scores = SegmentationScores.from_confusion(np.zeros((3, 3), dtype=np.int64))
    assert math.isnan(scores.miou)
    assert math.isnan(scores.pixel_accuracy)
    assert math.isnan(scores.foreground_precision) and math.isnan(scores.foreground_recall)
    assert scores.to_dict(["a", "b", "c"])["miou"] is None


# ---------------------------------------------------------------- labels_from_maps


def test_labels_from_maps_threshold_and_ties() -> None:
    maps = np.array(
        [
            [[0.5, 0.3], [0.7, 0.1]],  # class 7
            [[0.2, 0.6], [0.7, 0.0]],  # class 12
        ],
        dtype=np.float32,
    )
    record = MapRecord(classes=np.array([7, 12]), maps=maps)
    # threshold 0.5: (0,0) max 0.5 == threshold -> background (ties go to background);
    # (0,1) 0.6 -> 12; (1,0) 0.7 tie between channels -> the first, 7; (1,1) 0.1 -> 0
    np.testing.assert_array_equal(labels_from_maps(record, 0.5), [[0, 12], [7, 0]])
    np.testing.assert_array_equal(labels_from_maps(record, 0.45), [[7, 12], [7, 0]])
    np.testing.assert_array_equal(labels_from_maps(record, 0.7), [[0, 0], [0, 0]])
    np.testing.assert_array_equal(labels_from_maps(record, 0.0), [[7, 12], [7, 7]])
    assert labels_from_maps(record, 0.5).dtype == np.uint8


def test_labels_from_maps_tie_in_map_precision() -> None:
    # float32(0.1) != float64 0.1; the comparison is made in the maps' precision, as
    # IRN's np.pad(constant_values=threshold) does, so this is a tie -> background.
    record = MapRecord(classes=np.array([3]), maps=np.full((1, 1, 2), 0.1, np.float32))
    np.testing.assert_array_equal(labels_from_maps(record, 0.1), [[0, 0]])


def test_labels_from_maps_matches_irn_pad_argmax() -> None:
    # IRN's reference: pad the maps with a constant background plane, then argmax.
    rng = np.random.default_rng(3)
    for threshold in (0.0, 0.15, 0.3, 0.55):
        maps = (rng.integers(0, 12, (4, 9, 10)) * 0.05).astype(np.float32)
        maps[2] = maps[1]  # exact ties between channels
        classes = np.array([2, 9, 4, 17])
        padded = np.pad(maps, ((1, 0), (0, 0), (0, 0)), constant_values=threshold)
        keys = np.pad(classes, (1, 0))
        reference = keys[np.argmax(padded, axis=0)]
        record = MapRecord(classes=classes, maps=maps)
        np.testing.assert_array_equal(labels_from_maps(record, threshold), reference)


def test_labels_from_maps_zero_channels_and_nan() -> None:
    record = MapRecord(classes=np.zeros(0, dtype=np.int64), maps=np.zeros((0, 2, 3)))
    labels = labels_from_maps(record, 0.0)
    assert labels.shape == (2, 3)
    assert not labels.any()
    bad = MapRecord(classes=np.array([1]), maps=np.full((1, 2, 2), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN"):
        labels_from_maps(bad, 0.5)


# ---------------------------------------------------------------- ThresholdSweep


def _random_case(
    rng: np.random.Generator, height: int, width: int, num_classes: int, num_channels: int
) -> tuple[MapRecord, np.ndarray]:
    classes = rng.choice(np.arange(1, num_classes), size=num_channels, replace=False)
    # Quantised to multiples of 0.05 so that many pixels tie with a threshold exactly,
    # and duplicated channels so that argmax ties occur too.
    maps = (rng.integers(0, 21, (num_channels, height, width)) * 0.05).astype(np.float32)
    if num_channels >= 2:
        maps[1, : height // 2] = maps[0, : height // 2]
    gt = rng.integers(0, num_classes, (height, width)).astype(np.uint8)
    gt[rng.random((height, width)) < 0.1] = 255
    return MapRecord(classes=classes, maps=maps), gt


def test_sweep_equals_per_threshold_loop() -> None:
    rng = np.random.default_rng(0)
    num_classes = 6
    thresholds = [0.3, 0.05, 0.5, 0.15, 0.95, 0.5, 0.0, 1.0]  # unsorted, duplicated
    sweep = ThresholdSweep(thresholds, num_classes)
    expected = np.zeros((len(thresholds), num_classes, num_classes), dtype=np.int64)
    # (height, width, channels): zero channels (no class present) included
    cases = [(7, 5, 2), (13, 17, 3), (1, 1, 1), (20, 9, 0), (4, 30, 3), (11, 11, 1)]
    for height, width, channels in cases:
        record, gt = _random_case(rng, height, width, num_classes, channels)
        sweep.update(record, gt)
        for t, threshold in enumerate(thresholds):
            pred = labels_from_maps(record, threshold)
            expected[t] += confusion_matrix(gt, pred, num_classes)
    np.testing.assert_array_equal(sweep.thresholds, thresholds)
    assert sweep.confusion.shape == expected.shape
    np.testing.assert_array_equal(sweep.confusion, expected)
    assert sweep.num_images == len(cases)
    for scores, conf in zip(sweep.scores(), expected, strict=True):
        reference = SegmentationScores.from_confusion(conf)
        np.testing.assert_array_equal(scores.iou, reference.iou)
        assert scores.miou == reference.miou or (
            math.isnan(scores.miou) and math.isnan(reference.miou)
        )


def test_sweep_equals_loop_with_many_thresholds() -> None:
    # More thresholds than the broadcast path handles: the searchsorted path must agree.
    rng = np.random.default_rng(1)
    thresholds = np.round(np.linspace(0.0, 1.0, 401), 4)  # includes every 0.01 step
    sweep = ThresholdSweep(thresholds, 4)
    expected = np.zeros((len(thresholds), 4, 4), dtype=np.int64)
    for height, width in [(9, 8), (16, 3)]:
        maps = (rng.integers(0, 101, (2, height, width)) * 0.01).astype(np.float32)
        record = MapRecord(classes=np.array([1, 3]), maps=maps)
        gt = rng.integers(0, 4, (height, width)).astype(np.uint8)
        sweep.update(record, gt)
        for t, threshold in enumerate(thresholds):
            expected[t] += confusion_matrix(gt, labels_from_maps(record, threshold), 4)
    np.testing.assert_array_equal(sweep.confusion, expected)


def test_sweep_best_ties_go_to_lowest_threshold() -> None:
    # One foreground pixel with score 0.6: thresholds 0.2 and 0.4 (and 0.5) give the
    # same perfect labels; 0.7 turns it background.
    record = MapRecord(classes=np.array([1]), maps=np.array([[[0.6, 0.0]]], np.float32))
    gt = np.array([[1, 0]], dtype=np.uint8)
    sweep = ThresholdSweep([0.7, 0.4, 0.2, 0.5], 2)
    sweep.update(record, gt)
    threshold, scores = sweep.best()
    assert threshold == 0.2
    assert scores.miou == 1.0
    mious = [s.miou for s in sweep.scores()]
    # approx: a float64 ratio of integer pixel counts; no kernel or summation order involved.
    assert mious == [pytest.approx(0.25), 1.0, 1.0, 1.0]  # 0.7: IoU bg 1/2, fg 0


def test_sweep_rejects_bad_input() -> None:
    sweep = ThresholdSweep([0.5], 3)
    with pytest.raises(ValueError, match="before any update"):
        sweep.best()
    record = MapRecord(classes=np.array([1]), maps=np.zeros((1, 2, 2), np.float32))
    with pytest.raises(ValueError, match="shape"):
        sweep.update(record, np.zeros((2, 3), np.uint8))
    with pytest.raises(ValueError, match=r"ground truth.*9"):
        sweep.update(record, np.array([[0, 9], [255, 1]], np.uint8))
    with pytest.raises(ValueError, match="classes"):
        sweep.update(
            MapRecord(np.array([3]), np.zeros((1, 2, 2), np.float32)), np.zeros((2, 2), np.uint8)
        )
    with pytest.raises(ValueError):
        ThresholdSweep([], 3)
    assert sweep.num_images == 0  # nothing half-added


def test_default_thresholds() -> None:
    values = default_thresholds()
    assert len(values) == 19
    assert values[0] == 0.05 and values[-1] == 0.95
    assert values[2] == 0.15  # not 0.15000000000000002
    assert [f"{v}" for v in values[:3]] == ["0.05", "0.1", "0.15"]


def test_labels_with_own_background_by_hand() -> None:
    # Pixel by pixel: bg 0.9 beats both classes; class 7 wins; class 2 wins; a tie between
    # background and class 2 goes to background (as SIPE's argmax, background first).
    maps = np.array([[[0.1, 0.2, 0.8, 0.5]], [[0.3, 0.9, 0.1, 0.4]]], dtype=np.float32)
    bg = np.array([[0.9, 0.5, 0.4, 0.5]], dtype=np.float32)
    record = MapRecord(classes=np.array([2, 7]), maps=maps, background=bg)
    assert labels_with_own_background(record).tolist() == [[0, 7, 2, 0]]
    with pytest.raises(ValueError, match="no background map"):
        labels_with_own_background(MapRecord(classes=np.array([2, 7]), maps=maps))
