"""Segmentation metrics computed the standard way (as IRN and SIPE compute them).

Conventions, stated once so that every number in the project means the same thing:

* One confusion matrix is accumulated over *all* evaluated pixels of *all* images
  (rows = ground truth, columns = prediction); pixels whose ground truth is the ignore
  index (255 on VOC) are left out. Scores are never averaged per image.
* IoU_c = TP / (TP + FP + FN) = diag / (row_sum + col_sum - diag);
  precision_c = diag / col_sum (of what was predicted c, how much is c);
  recall_c = diag / row_sum (of what is c, how much was found).
* mIoU is the mean IoU over all K classes (K = 21 on VOC, background included). A class
  whose union is 0 in the evaluated set (neither in the ground truth nor predicted) has an
  undefined IoU: it is NaN and left out of the mean (``np.nanmean``). A class that is
  predicted but absent from the ground truth, or present but never predicted, has IoU 0
  and *does* count.
* Scores are fractions in [0, 1] internally; only presentation (``to_dict``, tables,
  figures) turns them into percentages.
* Maps become labels by comparing them with a constant background score (the threshold):
  a pixel takes the class of its strongest map only if that map value is strictly greater
  than the threshold, so ties go to background, exactly as IRN's
  ``np.pad(cams, constant_values=threshold)`` followed by ``argmax`` does. The comparison
  is made in the maps' floating-point precision (at least float32), again as IRN's pad
  does, so that a float32 map value of 0.1 ties with a threshold of 0.1.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpal.io import IGNORE_INDEX, MapRecord

__all__ = [
    "SegmentationScores",
    "ThresholdSweep",
    "confusion_matrix",
    "default_thresholds",
    "labels_from_maps",
]


def _require_integer(name: str, array: np.ndarray) -> None:
    if not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(f"{name} must hold integer class indices, got dtype {array.dtype}")


def _bad_values(values: np.ndarray, limit: int = 8) -> str:
    uniq = np.unique(values)
    shown = ", ".join(str(int(v)) for v in uniq[:limit])
    return shown + (f", ... ({len(uniq)} distinct)" if len(uniq) > limit else "")


def _check_gt_values(gt_valid: np.ndarray, num_classes: int, ignore_index: int) -> None:
    """Raise if ground truth outside the ignore mask holds values outside [0, K)."""
    if gt_valid.size == 0:
        return
    lo, hi = int(gt_valid.min()), int(gt_valid.max())
    if lo < 0 or hi >= num_classes:
        bad = gt_valid[(gt_valid < 0) | (gt_valid >= num_classes)]
        raise ValueError(
            f"ground truth holds values outside [0, {num_classes}) other than the ignore "
            f"index {ignore_index}: {_bad_values(bad)}"
        )


def confusion_matrix(
    gt: np.ndarray, pred: np.ndarray, num_classes: int, ignore_index: int = IGNORE_INDEX
) -> np.ndarray:
    """(K, K) int64 pixel counts, rows = ground truth, columns = prediction.

    Pixels whose ground truth equals `ignore_index` are not counted. Bad input raises
    rather than being clipped, because a silently wrong matrix is a silently wrong paper.
    """
    gt = np.asarray(gt)
    pred = np.asarray(pred)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if gt.shape != pred.shape:
        raise ValueError(f"ground truth shape {gt.shape} != prediction shape {pred.shape}")
    _require_integer("ground truth", gt)
    _require_integer("prediction", pred)
    if pred.size:
        lo, hi = int(pred.min()), int(pred.max())
        if lo < 0 or hi >= num_classes:
            bad = pred[(pred < 0) | (pred >= num_classes)]
            raise ValueError(
                f"prediction holds values outside [0, {num_classes}): {_bad_values(bad)}"
            )
    gt_flat = gt.reshape(-1)
    valid = gt_flat != ignore_index
    gt_valid = gt_flat[valid].astype(np.int64)
    _check_gt_values(gt_valid, num_classes, ignore_index)
    index = gt_valid * num_classes + pred.reshape(-1)[valid].astype(np.int64)
    counts = np.bincount(index, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).astype(np.int64, copy=False)


def _nan_divide(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    out = np.full(num.shape, np.nan, dtype=np.float64)
    np.divide(num, den, out=out, where=den > 0)
    return out


def _percent(value: float) -> float | None:
    return None if math.isnan(value) else round(100.0 * float(value), 2)


@dataclass(frozen=True, eq=False)
class SegmentationScores:
    """Per-class and summary scores of one confusion matrix (fractions, NaN = undefined)."""

    iou: np.ndarray
    precision: np.ndarray
    recall: np.ndarray
    miou: float
    pixel_accuracy: float
    foreground_precision: float = math.nan
    """Class 0 against all others merged: of the pixels predicted as some object, the share
    that is an object in the GT (any class). With `foreground_recall` it tells a map that
    spreads onto the background (low precision) from one that misses object extent."""
    foreground_recall: float = math.nan

    @classmethod
    def from_confusion(cls, conf: np.ndarray) -> SegmentationScores:
        """Scores from a (K, K) confusion matrix with rows = ground truth."""
        conf = np.asarray(conf)
        if conf.ndim != 2 or conf.shape[0] != conf.shape[1]:
            raise ValueError(f"confusion matrix must be square (K, K), got {conf.shape}")
        if conf.size and conf.min() < 0:
            raise ValueError("confusion matrix holds negative counts")
        conf = conf.astype(np.float64)
        diag = np.diag(conf)
        gt_total = conf.sum(axis=1)
        pred_total = conf.sum(axis=0)
        iou = _nan_divide(diag, gt_total + pred_total - diag)
        precision = _nan_divide(diag, pred_total)
        recall = _nan_divide(diag, gt_total)
        # nanmean warns on all-NaN input; an empty evaluation simply has an undefined mIoU.
        defined = ~np.isnan(iou)
        miou = float(iou[defined].mean()) if defined.any() else math.nan
        total = conf.sum()
        pixel_accuracy = float(diag.sum() / total) if total > 0 else math.nan
        hits = conf[1:, 1:].sum()
        fg_pred, fg_gt = conf[:, 1:].sum(), conf[1:, :].sum()
        fg_precision = float(hits / fg_pred) if fg_pred > 0 else math.nan
        fg_recall = float(hits / fg_gt) if fg_gt > 0 else math.nan
        for array in (iou, precision, recall):
            array.setflags(write=False)
        return cls(
            iou=iou,
            precision=precision,
            recall=recall,
            miou=miou,
            pixel_accuracy=pixel_accuracy,
            foreground_precision=fg_precision,
            foreground_recall=fg_recall,
        )

    @property
    def num_classes(self) -> int:
        return len(self.iou)

    def to_dict(self, class_names: Sequence[str]) -> dict[str, Any]:
        """JSON-ready scores in percent (2 decimals); undefined values become None."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names given for {self.num_classes} classes")
        per_class = {
            str(name): {
                "iou": _percent(self.iou[i]),
                "precision": _percent(self.precision[i]),
                "recall": _percent(self.recall[i]),
            }
            for i, name in enumerate(class_names)
        }
        return {
            "miou": _percent(self.miou),
            "pixel_accuracy": _percent(self.pixel_accuracy),
            "foreground_precision": _percent(self.foreground_precision),
            "foreground_recall": _percent(self.foreground_recall),
            "per_class": per_class,
        }


def _work_dtype(maps: np.ndarray) -> np.dtype:
    """Precision of the threshold comparison: the maps' own, but at least float32."""
    if not np.issubdtype(maps.dtype, np.floating):
        raise ValueError(f"maps must be floating point, got dtype {maps.dtype}")
    return np.result_type(maps.dtype, np.float32)


def _check_classes(classes: np.ndarray, upper: int) -> np.ndarray:
    classes = np.asarray(classes)
    if classes.size == 0:
        return classes.astype(np.int64)
    if not np.issubdtype(classes.dtype, np.integer):
        raise ValueError(f"record classes must be integers, got dtype {classes.dtype}")
    if classes.min() < 0 or classes.max() >= upper:
        raise ValueError(f"record classes must lie in [0, {upper}), got {_bad_values(classes)}")
    return classes.astype(np.int64)


def _strongest_channel(maps: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-pixel max over channels and the first channel reaching it (as ``argmax``).

    ``maps.argmax(axis=0)`` strides across the planes of a (C, H, W) array and is ~20x
    slower than this: one max over planes, then, from the last channel down to the
    first, branch-free overwrite of the channel index wherever a plane equals the max
    (so the lowest channel wins ties, exactly as ``argmax``).
    """
    dtype = _work_dtype(maps)
    num_channels, height, width = maps.shape
    if num_channels == 0:
        return (
            np.full((height, width), -np.inf, dtype=dtype),
            np.zeros((height, width), dtype=np.uint8),
        )
    maps = maps.astype(dtype, copy=False)  # exact widening; float16 arithmetic is slow
    best = maps.max(axis=0)
    if np.isnan(best).any():  # max propagates NaN, so one check covers every plane
        raise ValueError("maps contain NaN values")
    index_dtype = np.uint8 if num_channels <= 256 else np.int64
    channel = np.zeros((height, width), dtype=index_dtype)
    for c in range(num_channels - 1, -1, -1):
        hit = (maps[c] == best).view(np.uint8).astype(index_dtype, copy=False)
        # channel = c where hit, else unchanged; modular arithmetic is exact here.
        channel += hit * (index_dtype(c) - channel)
    return best, channel


def labels_from_maps(record: MapRecord, threshold: float) -> np.ndarray:
    """(H, W) uint8 labels: the strongest map's class where it beats `threshold`, else 0.

    The threshold is a constant background score; ties go to background (strict ``>``),
    matching IRN's pad-then-argmax. A record with zero channels gives all background.
    """
    classes = _check_classes(record.classes, IGNORE_INDEX)
    fg_max, channel = _strongest_channel(record.maps)
    bg_score = fg_max.dtype.type(threshold)
    if classes.size == 0:
        return np.zeros(fg_max.shape, dtype=np.uint8)
    return np.where(fg_max > bg_score, classes[channel], 0).astype(np.uint8)


# The (T, N) broadcast comparison beats searchsorted ~8x but needs T * N bytes; above this
# many cells (or 255 thresholds, which a uint8 count cannot hold) searchsorted takes over.
_BROADCAST_MAX_CELLS = 1 << 25


def labels_with_own_background(record: MapRecord) -> np.ndarray:
    """(H, W) uint8 labels: argmax over the record's own background and its class maps (ties
    go to background). SIPE scores its IS-CAM this way: no threshold, so no GT tuning."""
    if record.background is None:
        raise ValueError("the record has no background map (CAM maps need a threshold)")
    classes = _check_classes(record.classes, IGNORE_INDEX)
    stacked = np.concatenate([record.background[None], record.maps.astype(record.background.dtype)])
    _, channel = _strongest_channel(stacked)
    return np.concatenate([[0], classes])[channel].astype(np.uint8)


def default_thresholds() -> np.ndarray:
    """0.05, 0.10, ..., 0.95 (19 values), rounded so that 0.15 prints as 0.15."""
    return np.round(np.arange(1, 20) * 0.05, 2)


class ThresholdSweep:
    """Accumulates confusion matrices for many background thresholds in one pass over the maps.

    Reading maps is the slow part of a sweep, so each image is seen once: its strongest
    map value and channel are computed once, each pixel's count of thresholds it beats is
    found by one broadcast comparison, and one ``bincount`` over (count, gt, class) gathers
    all thresholds at once. A pixel beating n of the sorted thresholds is foreground for
    the n lowest and background for the rest, so the (T, K, K) confusion matrices follow
    from that (T + 1, K, K) histogram by a cumulative sum, on demand.
    """

    def __init__(self, thresholds: Sequence[float], num_classes: int) -> None:
        values = np.array(thresholds, dtype=np.float64)  # a copy: it is made read-only
        if values.ndim != 1 or values.size == 0:
            raise ValueError("thresholds must be a non-empty 1-D sequence")
        if not np.isfinite(values).all():
            raise ValueError(f"thresholds must be finite, got {values.tolist()}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self._thresholds = values
        self._thresholds.setflags(write=False)
        self._order = np.argsort(values, kind="stable")
        self._sorted = values[self._order]
        self._num_classes = int(num_classes)
        t, k = values.size, self._num_classes
        # hist[n, g, c]: pixels with gt g, strongest class c, beating exactly n thresholds.
        self._hist = np.zeros((t + 1, k, k), dtype=np.int64)
        self._num_images = 0

    @property
    def thresholds(self) -> np.ndarray:
        return self._thresholds

    @property
    def num_classes(self) -> int:
        return self._num_classes

    @property
    def num_images(self) -> int:
        return self._num_images

    def update(self, record: MapRecord, gt: np.ndarray) -> None:
        """Add one image: `record` maps at full resolution, `gt` (H, W) indices, 255 ignored."""
        gt = np.asarray(gt)
        height, width = record.maps.shape[1:]
        if gt.shape != (height, width):
            raise ValueError(f"ground truth shape {gt.shape} != maps shape {(height, width)}")
        _require_integer("ground truth", gt)
        k = self._num_classes
        classes = _check_classes(record.classes, k)
        fg_max, channel = _strongest_channel(record.maps)
        gt_flat = gt.reshape(-1)
        valid = gt_flat != IGNORE_INDEX
        gt_valid = gt_flat[valid]
        _check_gt_values(gt_valid, k, IGNORE_INDEX)
        if classes.size == 0:  # no maps: every pixel is background at every threshold
            self._hist[0, :, 0] += np.bincount(gt_valid, minlength=k)
            self._num_images += 1
            return
        # Number of thresholds strictly below each pixel's score, compared in the maps'
        # precision so that the result equals labels_from_maps threshold by threshold.
        scores = fg_max.reshape(-1)[valid]
        sorted_thresholds = self._sorted.astype(scores.dtype)
        num_thresholds = sorted_thresholds.size
        if num_thresholds < 255 and num_thresholds * scores.size <= _BROADCAST_MAX_CELLS:
            beaten = (scores[None, :] > sorted_thresholds[:, None]).sum(axis=0, dtype=np.uint8)
        else:
            beaten = np.searchsorted(sorted_thresholds, scores, side="left")
        # Count by channel, then move the channel axis onto dataset classes (cheaper than
        # a per-pixel class lookup). In-place arithmetic on one index array: fresh
        # full-image int64 temporaries cost more in page faults than in arithmetic.
        num_channels = len(classes)
        index = beaten.astype(np.intp)
        index *= k
        np.add(index, gt_valid, out=index, casting="unsafe")  # any integer gt dtype
        index *= num_channels
        index += channel.reshape(-1)[valid]
        counts = np.bincount(index, minlength=self._hist.shape[0] * k * num_channels)
        counts = counts.reshape(self._hist.shape[0], k, num_channels)
        for c, class_index in enumerate(classes):
            self._hist[:, :, class_index] += counts[:, :, c]
        self._num_images += 1

    @property
    def confusion(self) -> np.ndarray:
        """(T, K, K) int64 confusion matrices, in the order the thresholds were given."""
        # at least[n] = pixels beating >= n thresholds; sorted threshold j labels a pixel
        # foreground iff it beats more than j thresholds, i.e. >= j + 1.
        at_least = np.cumsum(self._hist[::-1], axis=0)[::-1]
        foreground = at_least[1:]
        background = at_least[0][None] - foreground
        conf_sorted = foreground.copy()
        conf_sorted[:, :, 0] += background.sum(axis=2)
        conf = np.empty_like(conf_sorted)
        conf[self._order] = conf_sorted
        return conf

    def scores(self) -> list[SegmentationScores]:
        """Scores per threshold, in the order the thresholds were given."""
        return [SegmentationScores.from_confusion(conf) for conf in self.confusion]

    def best(self) -> tuple[float, SegmentationScores]:
        """The threshold with the highest mIoU; among equal mIoUs, the lowest threshold."""
        if self._num_images == 0:
            raise ValueError("ThresholdSweep.best() called before any update()")
        all_scores = self.scores()
        best_index: int | None = None
        for index in self._order:  # ascending thresholds: strict > keeps the lowest on ties
            miou = all_scores[index].miou
            if math.isnan(miou):
                continue
            if best_index is None or miou > all_scores[best_index].miou:
                best_index = int(index)
        if best_index is None:
            raise ValueError("no threshold has a defined mIoU (no labelled pixels seen)")
        return float(self._thresholds[best_index]), all_scores[best_index]
