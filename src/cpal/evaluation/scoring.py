"""Scoring a run's files against ground truth: its maps over every background threshold,
the threshold for pseudo labels, and label folders (the run's or anyone's).

Every result is a dataclass whose `to_dict` is what `metrics.json` holds, each number
beside the `Protocol` that produced it; what was scored is read from the maps folder's
own record (`_maps.json`), never from the current config.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from cpal.config import Config
from cpal.data.images import load_mask
from cpal.data.voc import VOCLayout
from cpal.engine import distributed
from cpal.engine.identity import read_maps_identity
from cpal.engine.paths import RunPaths
from cpal.errors import ConfigError, DatasetError, warn
from cpal.evaluation.diagnostics import BorderShare
from cpal.evaluation.metrics import (
    SegmentationScores,
    ThresholdSweep,
    confusion_matrix,
    labels_with_own_background,
)
from cpal.evaluation.protocol import Protocol
from cpal.io import IGNORE_INDEX, load_maps


def source_text(what: str, identity: dict[str, Any]) -> str:
    """e.g. "maps:pacam (method cpal)": what was scored, from the maps' own record."""
    return f"{what}:{identity['map']} (method {identity['method']})"


def no_masks_note(layout: VOCLayout, ids: Sequence[str]) -> str:
    return f"GT masks for {layout.count_masks(ids)} of {len(ids)} images; not evaluated"


def map_paths(
    config: Config, layout: VOCLayout, split: str
) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """(id, map file) for every image of `split`, and what made the maps; fails naming the
    first missing file."""
    directory = RunPaths(config.output_path).maps(split)
    identity = read_maps_identity(directory)
    pairs = [(i, directory / f"{i}.npz") for i in layout.split_ids(split)]
    missing = [p for _, p in pairs if not p.exists()]
    if missing:
        raise DatasetError(
            f"{missing[0]}: map missing ({len(missing)} of {len(pairs)} for split '{split}'); "
            f"run `cpal infer` (every shard) with infer.splits including '{split}'"
        )
    return pairs, identity


@dataclass
class SplitScores:
    """One pass over a split's maps: every background threshold at once and, for maps
    with their own background channel (PACAM), the threshold-free argmax."""

    sweep: ThresholdSweep
    identity: dict[str, Any]
    own_background: np.ndarray | None  # confusion matrix, None if the maps have no bg
    seeds: np.ndarray | None = None  # confusion matrix of the prototype seeds, if recorded


def sweep_split(
    config: Config, layout: VOCLayout, split: str, *, own_background: bool = True
) -> SplitScores:
    """`own_background=False` skips the threshold-free scores (choosing a threshold needs
    only the sweep)."""
    sweep = ThresholdSweep(config.eval.thresholds, layout.num_classes)
    pairs, identity = map_paths(config, layout, split)
    k = layout.num_classes
    own: np.ndarray | None = np.zeros((k, k), dtype=np.int64) if own_background else None
    seeds: np.ndarray | None = np.zeros((k, k), dtype=np.int64) if own_background else None
    for image_id, path in pairs:
        try:
            record, gt = load_maps(path), layout.load_mask(image_id)
            sweep.update(record, gt)
            if record.background is None:
                own = None
            elif own is not None:
                own += confusion_matrix(gt, labels_with_own_background(record), k)
            if record.seeds is None:
                seeds = None
            elif seeds is not None:
                # An unseeded pixel counts as background, as a 255 in a label file.
                seeded = np.where(record.seeds == IGNORE_INDEX, 0, record.seeds)
                seeds += confusion_matrix(gt, seeded.astype(np.int64), k)
        except ValueError as exc:
            raise DatasetError(f"{path} vs {layout.mask_path(image_id)}: {exc}") from exc
    return SplitScores(sweep, identity, own if pairs else None, seeds if pairs else None)


@dataclass(frozen=True)
class Scored:
    """Scores with the protocol that produced them."""

    scores: SegmentationScores
    protocol: Protocol
    class_names: Sequence[str]

    def to_dict(self) -> dict[str, Any]:
        return {**self.scores.to_dict(self.class_names), "protocol": self.protocol.to_dict()}


@dataclass(frozen=True)
class MapsEvaluation:
    """A split's maps: the sweep over thresholds, the best one (an ORACLE: tuned on the
    split's own GT), and the threshold-free scores of maps with their own background and
    of the prototype seeds where the maps record them."""

    split: str
    num_images: int
    identity: dict[str, Any]
    sweep: ThresholdSweep
    class_names: Sequence[str]
    own_background: Scored | None = None
    seeds: Scored | None = None

    def to_dict(self) -> dict[str, Any]:
        best_threshold, best = self.sweep.best()
        protocol = Protocol(
            split=self.split, num_images=self.num_images,
            source=source_text("maps", self.identity), threshold=best_threshold,
            threshold_choice="oracle", tuned_on=self.split,
            inference=self.identity["inference"],
        )
        result: dict[str, Any] = {
            "map": self.identity["map"],
            "method": self.identity["method"],
            "num_images": self.num_images,
            "sweep": [
                {"threshold": float(t), "miou": round(100 * s.miou, 2)}
                for t, s in zip(self.sweep.thresholds, self.sweep.scores(), strict=True)
            ],
            "oracle_best": {
                "threshold": best_threshold,
                **best.to_dict(self.class_names),
                "protocol": protocol.to_dict(),
            },
        }
        if self.own_background is not None:
            result["own_background"] = self.own_background.to_dict()
        if self.seeds is not None:
            result["seeds"] = self.seeds.to_dict()
        return result


def evaluate_maps(config: Config, layout: VOCLayout, split: str) -> MapsEvaluation:
    """Score `split`'s maps (every image needs its GT mask)."""
    ids = layout.split_ids(split)
    scores = sweep_split(config, layout, split)
    identity, names = scores.identity, layout.class_names

    def threshold_free(confusion: np.ndarray | None, source: str) -> Scored | None:
        if confusion is None:
            return None
        protocol = Protocol(split=split, num_images=len(ids), threshold=None,
                            threshold_choice="none", source=source,
                            inference=identity["inference"])
        return Scored(SegmentationScores.from_confusion(confusion), protocol, names)

    return MapsEvaluation(
        split=split, num_images=len(ids), identity=identity, sweep=scores.sweep,
        class_names=names,
        own_background=threshold_free(
            scores.own_background,
            source_text("maps", identity) + " argmax with its own background channel"),
        seeds=threshold_free(
            scores.seeds,
            source_text("seeds", identity) + " at the first scale (a diagnostic: the regions "
            "prototypes are pooled from; unseeded pixels count as background)"),
    )


# ---------------------------------------------------------------------------------------
# The threshold of pseudo labels


def tuning_overlap(config: Config, layout: VOCLayout, *, report: bool = True) -> int:
    """How many images `labels.tune_split` shares with `labels.split` (0 when the threshold
    is fixed, or tuned on the export split itself: an oracle, labelled as such).

    A threshold tuned on a split is reported as held out, so sharing images with the
    exported split is refused (DatasetError naming both lists and an id), unless
    `labels.allow_split_overlap` accepts it: then the protocol says 'NOT held out' with
    the count, and a warning is printed (`report`)."""
    lc = config.labels
    if lc.threshold is not None or lc.tune_split == lc.split:
        return 0
    exported = set(layout.split_ids(lc.split))
    shared = [i for i in layout.split_ids(lc.tune_split) if i in exported]
    if not shared:
        return 0
    tune_file, split_file = layout.split_file(lc.tune_split), layout.split_file(lc.split)
    what = (f"{tune_file} shares {len(shared)} image(s) with {split_file} (e.g. "
            f"'{shared[0]}'): a threshold tuned on '{lc.tune_split}' would not be held out")
    if not lc.allow_split_overlap:
        raise DatasetError(
            f"'labels.tune_split': {what}; remove them from one list, set labels.threshold, "
            "or set labels.allow_split_overlap=true to report the threshold as not held out"
        )
    if report:
        warn(f"{what}; labels.allow_split_overlap=true: reported as NOT held out")
    return len(shared)


@dataclass(frozen=True)
class ChosenThreshold:
    """The background threshold of pseudo labels and how it was chosen (`Protocol`'s
    threshold_choice: fixed, tuned or oracle); `tuning_overlap` counts the images the
    tuning split shares with `applied_to`, the split the labels are made for."""

    value: float
    choice: str
    tuned_on: str | None = None
    tuning_overlap: int = 0
    applied_to: str | None = None

    def to_dict(self) -> dict[str, Any]:
        chosen: dict[str, Any] = {"value": self.value, "choice": self.choice,
                                  "tuned_on": self.tuned_on}
        if self.tuning_overlap:
            chosen["tuning_overlap"] = self.tuning_overlap
        if self.applied_to is not None:
            chosen["applied_to"] = self.applied_to
        return chosen

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ChosenThreshold:
        return cls(float(data["value"]), data["choice"], data.get("tuned_on"),
                   int(data.get("tuning_overlap", 0)), data.get("applied_to"))


def choose_threshold(config: Config, layout: VOCLayout) -> ChosenThreshold:
    """`labels.threshold`, or the best one on `labels.tune_split`'s GT."""
    lc = config.labels
    if lc.threshold is not None:
        return ChosenThreshold(lc.threshold, "fixed", applied_to=lc.split)
    tune_ids = layout.split_ids(lc.tune_split)
    if not layout.has_masks(tune_ids):
        raise ConfigError(
            f"'labels.tune_split': split '{lc.tune_split}' has no GT masks to tune on; "
            "set labels.threshold to a fixed value"
        )
    overlap = tuning_overlap(config, layout)
    value, _ = sweep_split(config, layout, lc.tune_split, own_background=False).sweep.best()
    choice = "oracle" if lc.tune_split == lc.split else "tuned"
    return ChosenThreshold(value, choice, lc.tune_split, overlap, applied_to=lc.split)


# ---------------------------------------------------------------------------------------
# Label folders


def score_label_dir(layout: VOCLayout, ids: Sequence[str], label_dir: Path) -> SegmentationScores:
    """mIoU of label PNGs in `label_dir` against the dataset's GT masks.

    A predicted 255 (a pixel left unlabelled, as in IRN's IR labels) counts as background:
    it is right only where GT is background, so leaving pixels out never raises the score.
    """
    conf = np.zeros((layout.num_classes, layout.num_classes), dtype=np.int64)
    for image_id in ids:
        path = label_dir / f"{image_id}.png"
        if not path.exists():
            raise DatasetError(f"{path}: label file missing")
        pred = load_mask(path, layout.num_classes)
        pred[pred == IGNORE_INDEX] = 0
        try:
            conf += confusion_matrix(layout.load_mask(image_id), pred, layout.num_classes)
        except ValueError as exc:
            raise DatasetError(f"{path} vs {layout.mask_path(image_id)}: {exc}") from exc
    return SegmentationScores.from_confusion(conf)


@dataclass(frozen=True)
class LabelsEvaluation:
    """The run's pseudo labels of a split: scores with their protocol, and the border
    diagnostic; or, without GT masks, why they were not scored."""

    split: str
    num_images: int
    label_dir: Path
    scored: Scored | None = None
    border: BorderShare | None = None
    skipped: str | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"split": self.split, "num_images": self.num_images,
                                  "dir": str(self.label_dir), "miou": None}
        if self.scored is None:
            result["skipped"] = self.skipped
            return result
        assert self.border is not None
        result["border"] = self.border.to_dict()
        result.update(self.scored.to_dict())
        return result


@dataclass(frozen=True)
class Provenance:
    """What made a folder of labels, as the protocol of its scores states it: what it was
    made from (`source`, `inference`), the background threshold that entered it (None:
    none did) and the refinement. Stored in the folder's record, so that a later stage
    (segmentation) reports what its training labels owe to ground truth."""

    source: str
    inference: str
    threshold: ChosenThreshold | None = None
    refinement: str = "none"

    def protocol(self, split: str, num_images: int, *, image_labels: str = "ground truth"
                 ) -> Protocol:
        """The protocol of a number on `split` computed from these labels (or from a
        network trained on them): a threshold tuned on `split`'s own GT is an oracle for
        that number, one tuned on another split's is held out from it."""
        t = self.threshold
        if t is None:
            choice, value, tuned_on, overlap = "none", None, None, 0
        else:
            choice, value, tuned_on, overlap = t.choice, t.value, t.tuned_on, t.tuning_overlap
            if choice in ("tuned", "oracle"):
                choice = "oracle" if tuned_on == split else "tuned"
                overlap = overlap if choice == "tuned" and split == t.applied_to else 0
        return Protocol(
            split=split, num_images=num_images, source=self.source,
            threshold=value, threshold_choice=choice,  # type: ignore[arg-type]
            tuned_on=tuned_on, inference=self.inference, refinement=self.refinement,
            tuning_overlap=overlap, image_labels=image_labels,
        )

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "inference": self.inference,
                "threshold": None if self.threshold is None else self.threshold.to_dict(),
                "refinement": self.refinement}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Provenance:
        t = data.get("threshold")
        return cls(source=data["source"], inference=data["inference"],
                   threshold=None if t is None else ChosenThreshold.from_dict(t),
                   refinement=data.get("refinement", "none"))


def maps_provenance(identity: dict[str, Any], threshold: ChosenThreshold | None,
                    what: str = "labels", refinement: str = "none") -> Provenance:
    """Labels made from the maps `identity` describes."""
    return Provenance(source_text(what, identity), identity["inference"], threshold,
                      refinement)


SCORED_BY_RANK_0 = "scored by rank 0 (torchrun), which writes metrics.json"


def evaluate_labels(layout: VOCLayout, split: str, ids: Sequence[str], label_dir: Path,
                    provenance: Provenance, *, image_labels: str = "ground truth"
                    ) -> LabelsEvaluation:
    """Score a folder of labels of `split` made as `provenance` says (`image_labels`: what
    gated their classes, for the protocol). Under torchrun rank 0 alone scores (it alone
    writes metrics.json); the other processes get a note, not a second reading of every
    mask."""
    if not distributed.ranks().is_main:
        return LabelsEvaluation(split, len(ids), label_dir, skipped=SCORED_BY_RANK_0)
    if not layout.has_masks(ids):
        return LabelsEvaluation(split, len(ids), label_dir,
                                skipped=no_masks_note(layout, ids))
    scores, border = score_label_dir(layout, ids, label_dir), BorderShare()
    for image_id in ids:
        border.update(load_mask(label_dir / f"{image_id}.png", layout.num_classes),
                      layout.load_mask(image_id))
    protocol = provenance.protocol(split, len(ids), image_labels=image_labels)
    return LabelsEvaluation(split, len(ids), label_dir,
                            Scored(scores, protocol, layout.class_names), border)


def evaluate_label_dir(layout: VOCLayout, label_dir: Path, split: str) -> Scored:
    """Score any folder of label PNGs (ours or another method's) against a split's GT."""
    ids = layout.split_ids(split)
    protocol = Protocol(
        split=split, num_images=len(ids), source=f"labels:{label_dir}", threshold=None,
        threshold_choice="none", image_labels="as produced by the labels' source",
    )
    return Scored(score_label_dir(layout, ids, label_dir), protocol, layout.class_names)
