"""The refinement stage: maps of `labels.split` -> refined label maps, by a registered
method (`refine.method`).

A `RefinementMethod` writes OUT/refine/<name>/<split>/<id>.png (a `LabelFolder`: resumable,
damaged files redone) and returns its scores for `metrics.json`; the labels stage then
publishes its folder as the final pseudo masks. `none` refines nothing (the seeds are the
pseudo masks), `crf` runs the dense CRF of `refine.preset` over worker processes, `irn`
(`cpal.engine.irn`) IRN's relation network and random walk, `amn` (`cpal.engine.amn`)
AMN's network and its maps before IRN's. A new method is a module that registers its
`RefinementMethod`, plus its name in the builtins.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from cpal.config import Config
from cpal.data.images import load_rgb
from cpal.data.voc import VOCLayout
from cpal.engine.hooks import HookBase
from cpal.engine.label_dirs import LabelFolder
from cpal.engine.paths import RunPaths
from cpal.errors import DatasetError
from cpal.evaluation.scoring import (
    ChosenThreshold,
    Provenance,
    choose_threshold,
    evaluate_labels,
    map_paths,
    maps_provenance,
)
from cpal.io import IGNORE_INDEX, MapRecord, load_maps
from cpal.log import Progress
from cpal.refine.crf import PRESETS, CRFParams
from cpal.refine.registry import REFINERS
from cpal.refine.workers import map_images
from cpal.registry import Registry

__all__ = ["REFINEMENTS", "MapInputs", "RefinementMethod", "refine_with_workers"]


@dataclass(frozen=True)
class RefinementMethod:
    """A refinement as the pipeline sees it."""

    name: str
    summary: str
    run: Callable[[Config, VOCLayout, bool, Sequence[HookBase]], dict[str, Any]] | None
    """(config, layout, progress, hooks) -> its metrics entry (scores of its labels under
    "labels", anything else it measured); writes `output(config)`; `hooks` go to the
    trainer of a network it trains (after the standard ones). None: no refinement."""
    check: Callable[[Config, VOCLayout], None] | None = None
    """Refuse, before any training, inputs the method will need and lack (ConfigError /
    DatasetError naming the key or file)."""

    def output(self, config: Config) -> Path:
        """The folder of its refined labels of `labels.split`."""
        return RunPaths(config.output_path).refined(self.name, config.labels.split)

    @property
    def refines(self) -> bool:
        return self.run is not None


REFINEMENTS: Registry[RefinementMethod] = Registry(
    "refinement method", builtins=("cpal.engine.refine", "cpal.engine.irn", "cpal.engine.amn"))


def register_refinement(method: RefinementMethod) -> RefinementMethod:
    return REFINEMENTS.register(method.name, method)


# ---------------------------------------------------------------------------------------
# Per-image inputs of a refiner


class MapInputs:
    """What a refiner (`cpal.refine.REFINERS`) may take, made on demand from one image and
    its maps, in the image's own label space: 0 background, 1..C the record's classes
    (`keys` maps them back to dataset classes). The refiner's `inputs` name the ones it
    uses, so no code here knows which refiner runs."""

    def __init__(self, image: np.ndarray, record: MapRecord, threshold: float | None,
                 where: Path) -> None:
        if record.maps.shape[1:] != image.shape[:2]:
            h, w = record.maps.shape[1:]
            raise DatasetError(f"{where}: maps are {w}x{h} but the image is "
                               f"{image.shape[1]}x{image.shape[0]} (width x height)")
        self.image = image
        self.record = record
        self.threshold = threshold
        self.where = where
        self.keys = np.concatenate([[0], np.asarray(record.classes, dtype=np.int64)])

    @property
    def num_labels(self) -> int:
        return len(self.keys)

    @cached_property
    def labels(self) -> np.ndarray:
        """The seeds: the strongest map's label where it beats the threshold, else 0."""
        if self.threshold is None:
            raise ValueError("a label-unary refiner needs the background threshold")
        maps = self.record.maps.astype(np.float32, copy=False)
        return np.where(maps.max(axis=0) > np.float32(self.threshold),
                        maps.argmax(axis=0) + 1, 0).astype(np.int64)

    @cached_property
    def probabilities(self) -> np.ndarray:
        """[background, maps]: the map's own background channel where it has one (PACAM),
        else 1 - the strongest map (CLIP-ES's)."""
        maps = self.record.maps.astype(np.float32, copy=False)
        background = self.record.background
        if background is None:
            background = 1.0 - maps.max(axis=0)
        return np.concatenate([background[None].astype(np.float32), maps])

    def to_dataset(self, local: np.ndarray) -> np.ndarray:
        """Image label space -> dataset class indices (the ignore label kept)."""
        out = np.full(local.shape, IGNORE_INDEX, dtype=np.uint8)
        known = local != IGNORE_INDEX
        out[known] = self.keys[local[known]]
        return out


@dataclass(frozen=True)
class CRFJob:
    """One image of the CRF stage, as a worker process receives it."""

    image: Path
    maps: Path
    refiner: str
    params: CRFParams
    threshold: float | None


def crf_one(job: CRFJob) -> np.ndarray:
    """The refined (H, W) uint8 label map of one image (a worker's function)."""
    record = load_maps(job.maps)
    inputs = MapInputs(load_rgb(job.image), record, job.threshold, job.maps)
    if inputs.num_labels < 2:  # no class in the image: nothing to refine
        return np.zeros(inputs.image.shape[:2], dtype=np.uint8)
    refiner = REFINERS.get(job.refiner)
    local = refiner(*(getattr(inputs, name) for name in refiner.inputs), params=job.params)
    return inputs.to_dataset(np.asarray(local))


def refine_with_workers(fn: Callable[[Any], np.ndarray], jobs: dict[str, Any],
                        folder: LabelFolder, config: Config, desc: str,
                        progress: bool) -> int:
    """Run `fn` on each image's job in `config.refine.workers` processes and write the
    results into `folder` as they come, in order; returns how many were written."""
    bar = Progress(len(jobs), desc, enabled=progress)
    results = map_images(fn, jobs.values(), workers=config.refine.workers,
                         threads=config.refine.threads)
    for image_id, label in zip(jobs, results, strict=True):
        folder.write(image_id, label)
        bar.update()
    bar.close()
    return len(jobs)


# ---------------------------------------------------------------------------------------
# The methods


def _refine_crf(config: Config, layout: VOCLayout, progress: bool,
                hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Dense CRF of `refine.preset` over every image of `labels.split`: on the seeds
    (the tuned threshold) for a label-unary preset, on [background, maps] otherwise."""
    preset, split = config.refine.preset, config.labels.split
    params = PRESETS[preset]
    refiner = REFINERS.get(f"crf_{preset}")
    threshold: ChosenThreshold | None = None
    if "labels" in refiner.inputs:
        threshold = choose_threshold(config, layout)
    pairs, identity = map_paths(config, layout, split)
    provenance = maps_provenance(identity, threshold, refinement=_crf_text(preset, params))
    folder = LabelFolder(RunPaths(config.output_path).refined("crf", split), {
        "kind": "crf", "maps": identity, "preset": preset, "params": asdict(params),
        "provenance": provenance.to_dict()})
    with folder.share([i for i, _ in pairs]) as mine:
        todo = set(mine)
        jobs = {i: CRFJob(layout.image_path(i), path, refiner.name, params,
                          None if threshold is None else threshold.value)
                for i, path in pairs if i in todo}
        written = refine_with_workers(crf_one, jobs, folder, config, f"crf {split}",
                                      progress)
    scores = evaluate_labels(layout, split, [i for i, _ in pairs], folder.directory,
                             provenance)
    return {"labels": scores.to_dict(), "written": written}


def _crf_text(preset: str, params: CRFParams) -> str:
    return (f"dense CRF ({preset}: {params.iterations} iterations, {params.unary} unary, "
            f"gaussian {params.gaussian_compat:g}/{params.gaussian_sxy:g}, bilateral "
            f"{params.bilateral_compat:g}/{params.bilateral_sxy:g}/{params.bilateral_srgb:g}"
            + ("" if params.confidence is None else f", ignore below {params.confidence:g}")
            + ")")


def provenance_of(folder_record: dict[str, Any]) -> Provenance:
    """The provenance a label folder's record stores."""
    return Provenance.from_dict(folder_record["provenance"])


register_refinement(RefinementMethod(
    "none", "no refinement: the seeds (maps + background threshold) are the pseudo masks",
    run=None))
register_refinement(RefinementMethod(
    "crf", "dense CRF of the maps (refine.preset: irn, clip_es, deeplab)", run=_refine_crf))
