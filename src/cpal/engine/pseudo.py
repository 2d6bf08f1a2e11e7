"""The labels stage: seeds from the maps, and the final pseudo masks.

Seeds are the maps turned into labels by the background threshold (fixed, or tuned on the
held-out `labels.tune_split`): OUT/labels/<split>/ themselves when no refinement follows,
OUT/seeds/<split>/ when one does, whose labels (OUT/refine/<method>/<split>/) are then
published as OUT/labels/<split>/, the folder the segmentation network trains on.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cpal.config import Config
from cpal.data.voc import VOCLayout
from cpal.engine.label_dirs import LabelFolder, publish, require_folder
from cpal.engine.paths import RunPaths
from cpal.engine.refine import REFINEMENTS
from cpal.errors import DatasetError
from cpal.evaluation.metrics import labels_from_maps
from cpal.evaluation.scoring import (
    ChosenThreshold,
    LabelsEvaluation,
    Provenance,
    choose_threshold,
    evaluate_labels,
    map_paths,
    maps_provenance,
)
from cpal.io import load_maps
from cpal.log import iterate

__all__ = ["PseudoLabels", "export_seeds", "final_labels"]


@dataclass(frozen=True)
class PseudoLabels:
    """What the labels stage made: the seeds, their threshold, the final folder and the
    scores of both."""

    threshold: ChosenThreshold
    seeds: LabelsEvaluation
    final: LabelsEvaluation
    source: str
    """seeds, or the refinement method the final labels come from."""


def export_seeds(config: Config, layout: VOCLayout, directory: Path, *, progress: bool
                 ) -> tuple[LabelFolder, ChosenThreshold, list[str]]:
    """Threshold labels of every image of `labels.split` into `directory` (finished files
    of the same maps and threshold are kept)."""
    split = config.labels.split
    threshold = choose_threshold(config, layout)
    pairs, identity = map_paths(config, layout, split)
    provenance = maps_provenance(identity, threshold)
    folder = LabelFolder(directory, {"kind": "seeds", "maps": identity,
                                     "provenance": provenance.to_dict()})
    folder.claim()
    todo = set(folder.pending([i for i, _ in pairs]))
    for image_id, map_path in iterate([p for p in pairs if p[0] in todo], f"labels {split}",
                                      enabled=progress):
        folder.write(image_id, labels_from_maps(load_maps(map_path), threshold.value))
    return folder, threshold, [i for i, _ in pairs]


def final_labels(config: Config, layout: VOCLayout, *, progress: bool) -> PseudoLabels:
    """Seeds, then OUT/labels/<split>/: the seeds themselves, or the refinement's labels
    (made from the same maps, else refused in one line)."""
    split = config.labels.split
    paths = RunPaths(config.output_path)
    method = REFINEMENTS.get(config.refine.method)
    seeds_dir = paths.seeds(split) if method.refines else paths.labels(split)
    seeds, threshold, ids = export_seeds(config, layout, seeds_dir, progress=progress)
    seeds_scores = evaluate_labels(layout, split, ids, seeds_dir,
                                   Provenance.from_dict(seeds.record["provenance"]))
    if not method.refines:
        return PseudoLabels(threshold, seeds_scores, seeds_scores, "seeds")
    refined = method.output(config)
    record = require_folder(refined, ids, f"{method.name} labels", "cpal refine")
    if record.get("maps") != seeds.record["maps"]:
        raise DatasetError(f"{refined}: {method.name} labels made from other maps than "
                           f"{paths.maps(split)}; run `cpal refine` again")
    final = publish(LabelFolder(refined, record), paths.labels(split), ids)
    final_scores = evaluate_labels(layout, split, ids, final.directory,
                                   Provenance.from_dict(record["provenance"]))
    return PseudoLabels(threshold, seeds_scores, final_scores, method.name)
