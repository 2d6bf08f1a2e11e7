"""The stages of a run and how `cpal run` chains them.

Each stage reads the previous stage's files under `output_dir` and writes its own, so any
stage can be rerun alone (IRN's style). Finished stages are recorded in `stages.json`;
metrics accumulate in `metrics.json`, each number with the protocol that produced it.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch

from cpal.config import Config
from cpal.data.images import image_size, load_mask
from cpal.data.source import open_dataset
from cpal.data.voc import VOCLayout
from cpal.engine import distributed
from cpal.engine.hooks import HookBase
from cpal.engine.infer import infer, missing_maps
from cpal.engine.label_dirs import RECORD
from cpal.engine.output_dir import claim_output_dir, claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.pseudo import final_labels
from cpal.engine.refine import REFINEMENTS
from cpal.engine.runtime import setup
from cpal.engine.segment import check_segmentation, predict_splits, train_segmentation
from cpal.engine.train import train
from cpal.errors import ConfigError, CpalError, DatasetError
from cpal.evaluation.diagnostics import split_separation
from cpal.evaluation.metrics import labels_from_maps
from cpal.evaluation.protocol import Protocol, results_table
from cpal.evaluation.scoring import (
    choose_threshold,
    evaluate_maps,
    map_paths,
    no_masks_note,
    tuning_overlap,
)
from cpal.io import load_maps, read_json, write_json_atomic
from cpal.log import get_logger, iterate
from cpal.methods import method_spec
from cpal.viz.comparison import comparison_figure
from cpal.viz.figures import OverlayRow, overlay_grid, per_class_iou_chart, sweep_curve

STAGES = ("train", "infer", "evaluate", "refine", "labels", "segment", "segment_eval",
          "figures")
_log = get_logger(__name__)


# ---------------------------------------------------------------------------------------
# Bookkeeping


def _read_json(path: Path) -> dict[str, Any]:
    return read_json(path) if path.exists() else {}


def _update_json(path: Path, key: str, value: Any) -> dict[str, Any]:
    data = _read_json(path)
    data[key] = value
    write_json_atomic(path, data)
    return data


def _record_stage(paths: RunPaths, stage: str, seconds: float, **details: Any) -> None:
    _update_json(
        paths.stages,
        stage,
        {
            "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "seconds": round(seconds, 1),
            **details,
        },
    )


# ---------------------------------------------------------------------------------------
# Stages


def stage_train(config: Config, *, progress: bool = True,
                hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train (or resume); `hooks` run after the standard ones (`cpal.engine.train.train`)."""
    if not method_spec(config.method).trains:
        raise ConfigError(
            f"'method': {config.method} makes its maps from pretrained weights and has no "
            "training stage; run `cpal infer` (or `cpal run`)"
        )
    start = time.perf_counter()
    checkpoint = train(config, progress=progress, hooks=hooks)
    details = {"checkpoint": checkpoint.name}
    if distributed.ranks().is_main:
        _record_stage(RunPaths(config.output_path), "train", time.perf_counter() - start,
                      **details)
    return details


def stage_infer(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Maps of `infer.shard` (all images when null), this process's part of them under
    torchrun; returns (and rank 0 records) the totals of all processes once every one has
    finished."""
    start = time.perf_counter()
    written = infer(config, progress=progress)
    totals = distributed.all_reduce_sum(torch.tensor(list(written.values()), dtype=torch.long))
    written = dict(zip(written, totals.tolist(), strict=True))
    distributed.barrier()
    if distributed.ranks().is_main:
        details: dict[str, Any] = {"written": written}
        if config.infer.shard is not None:
            details["shard"] = config.infer.shard
        layout = open_dataset(config.data)
        details["missing"] = {s: len(missing_maps(config, layout, s)) for s in written}
        _record_stage(RunPaths(config.output_path), "infer", time.perf_counter() - start,
                      **details)
    return written


def stage_evaluate(config: Config) -> dict[str, Any]:
    """Score the maps of every inferred split that has GT masks, over all thresholds."""
    claim_output_dir(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    layout = open_dataset(config.data)
    results: dict[str, Any] = {}
    for split in config.infer.splits:
        ids = layout.split_ids(split)
        if not layout.has_masks(ids):
            results[split] = {"skipped": no_masks_note(layout, ids)}
            continue
        results[split] = evaluate_maps(config, layout, split).to_dict()
    _update_json(paths.metrics, "maps", results)
    if method_spec(config.method).has_prototypes and config.eval.diagnostic_images > 0:
        _update_json(paths.metrics, "diagnostics", {
            split: {"prototype_separation": split_separation(config, layout, split).to_dict()}
            for split in config.infer.splits
        })
    _record_stage(paths, "evaluate", time.perf_counter() - start)
    return results


def stage_refine(config: Config, *, progress: bool = True,
                 hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Refine the maps of `labels.split` by `refine.method` (none: nothing to do) into
    OUT/refine/<method>/<split>/; its scores go to metrics.json's `refine.<method>`.
    `hooks` reach a method's training (IRN's), after the standard ones.

    Under torchrun every process trains the method's network and makes a share of its
    per-image files; rank 0 alone writes metrics.json and stages.json."""
    if distributed.ranks().enabled:
        setup(config)  # the process group, before the first shared folder
    claim_output_dir_everywhere(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    method = REFINEMENTS.get(config.refine.method)
    main = distributed.ranks().is_main
    if not method.refines:
        if main:
            _record_stage(paths, "refine", time.perf_counter() - start, method=method.name)
        return {}
    layout = open_dataset(config.data)
    result = method.run(config, layout, progress, hooks)  # type: ignore[misc]
    if not main:
        return result
    refined = _read_json(paths.metrics).get("refine", {})
    refined[method.name] = result
    _update_json(paths.metrics, "refine", refined)
    _record_stage(paths, "refine", time.perf_counter() - start, method=method.name)
    return result


def stage_labels(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """The seeds (maps + background threshold) and the final pseudo masks of
    `labels.split` (the seeds, or the refinement's labels) as palette PNGs in
    OUT/labels/<split>/, each scored against GT where it exists."""
    claim_output_dir(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    made = final_labels(config, open_dataset(config.data), progress=progress)
    result = {**made.final.to_dict(), "source": made.source}
    _update_json(paths.metrics, "threshold", made.threshold.to_dict())
    _update_json(paths.metrics, "seeds", made.seeds.to_dict())
    _update_json(paths.metrics, "pseudo_labels", result)
    _record_stage(paths, "labels", time.perf_counter() - start,
                  threshold=made.threshold.value, source=made.source)
    return result


def stage_segment(config: Config, *, progress: bool = True,
                  hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train (or resume) `segment.network` on OUT/labels/<labels.split>/."""
    start = time.perf_counter()
    checkpoint = train_segmentation(config, progress=progress, hooks=hooks)
    details = {"checkpoint": checkpoint.name, "network": config.segment.network}
    if distributed.ranks().is_main:
        _record_stage(RunPaths(config.output_path), "segment", time.perf_counter() - start,
                      **details)
    return details


def stage_segment_eval(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Predict `segment.splits` with the trained segmentation network and score them:
    metrics.json's `segmentation` (its `miou`: the first split with GT masks)."""
    claim_output_dir(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    result = predict_splits(config, progress=progress)
    _update_json(paths.metrics, "segmentation", result)
    _record_stage(paths, "segment_eval", time.perf_counter() - start,
                  splits=list(result["splits"]))
    return result


def stage_figures(config: Config) -> list[Path]:
    """Overlay grid, threshold-sweep curve and per-class IoU chart, as PNGs."""
    claim_output_dir(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    layout = open_dataset(config.data)
    metrics = _read_json(paths.metrics)
    written: list[Path] = []
    # A threshold given now wins over the one the labels stage recorded.
    threshold = config.labels.threshold
    if threshold is None:
        threshold = metrics.get("threshold", {}).get("value")
    if threshold is None:
        threshold = choose_threshold(config, layout).value

    split = config.viz.split
    # The final pseudo masks where the labels stage made them, else the maps' seeds.
    final = paths.labels(split) if (paths.labels(split) / RECORD).is_file() else None
    rows = _overlay_rows(config, layout, split, threshold, final)
    target = paths.figures / f"overlay_{split}.png"
    overlay_grid(rows, target, layout.class_names, heat_title=f"{config.map_kind} heat map")
    written.append(target)
    for seg_split in config.segment.splits:
        predictions = paths.predictions(seg_split)
        if seg_split in config.infer.splits and (predictions / RECORD).is_file():
            target = paths.figures / f"segmentation_{seg_split}.png"
            overlay_grid(_overlay_rows(config, layout, seg_split, threshold, predictions),
                         target, layout.class_names, heat_title=f"{config.map_kind} heat map",
                         label_title="segmentation")
            written.append(target)
    if method_spec(config.method).has_prototypes:
        target = paths.figures / f"cam_vs_pacam_{split}.png"
        comparison_figure(config, layout, rows, target)
        written.append(target)

    maps = {s: r for s, r in metrics.get("maps", {}).items() if "sweep" in r}
    if maps:
        target = paths.figures / "threshold_sweep.png"
        sweep_curve(
            [row["threshold"] for row in next(iter(maps.values()))["sweep"]],
            {s: _fractions(row["miou"] for row in r["sweep"]) for s, r in maps.items()},
            threshold, target, title="Maps: mIoU vs background threshold",
        )
        written.append(target)
    series = {
        f"maps {s} (oracle thr {r['oracle_best']['threshold']:g})": _fractions(
            r["oracle_best"]["per_class"][n]["iou"] for n in layout.class_names
        )
        for s, r in maps.items()
    }
    pseudo = metrics.get("pseudo_labels", {})
    if pseudo.get("per_class"):
        series[f"pseudo labels {pseudo['split']} (thr {threshold:g})"] = _fractions(
            pseudo["per_class"][n]["iou"] for n in layout.class_names
        )
    segmentation = metrics.get("segmentation", {})
    if segmentation.get("per_class"):
        series[f"segmentation {segmentation['split']}"] = _fractions(
            segmentation["per_class"][n]["iou"] for n in layout.class_names
        )
    if series:
        target = paths.figures / "per_class_iou.png"
        per_class_iou_chart(layout.class_names, series, target, title="Per-class IoU (%)")
        written.append(target)
    _record_stage(paths, "figures", time.perf_counter() - start,
                  files=[p.name for p in written])
    return written


def _overlay_rows(config: Config, layout: VOCLayout, split: str, threshold: float,
                  labels: Path | None) -> list[OverlayRow]:
    """`viz.num_images` evenly spaced images of `split`: image, GT (where the split has
    it), the maps' heat, and the labels of folder `labels` (None: the maps' seeds)."""
    pairs, _ = map_paths(config, layout, split)
    step = max(1, len(pairs) // config.viz.num_images)
    chosen = pairs[::step][: config.viz.num_images]
    has_gt = layout.has_masks([i for i, _ in chosen])
    rows = []
    for image_id, map_path in chosen:
        record = load_maps(map_path)
        heat = record.maps.max(axis=0) if len(record.classes) else record.maps.sum(axis=0)
        shown = (labels_from_maps(record, threshold) if labels is None
                 else load_mask(labels / f"{image_id}.png", layout.num_classes))
        rows.append(OverlayRow(
            image_id=image_id, image=layout.load_image(image_id),
            gt=layout.load_mask(image_id) if has_gt else None, heat=heat, pseudo=shown,
        ))
    return rows


def _fractions(percents: Iterable[float | None]) -> list[float | None]:
    """metrics.json holds percent; the figure functions take fractions."""
    return [None if p is None else p / 100 for p in percents]


# ---------------------------------------------------------------------------------------
# The whole chain


def check_run_inputs(config: Config, *, progress: bool = True) -> None:
    """Check every split `cpal run` will read before its first training step, not hours
    later: lists (present, not empty), images present and labels known for the training
    split and every inferred one; GT masks decoded (values in range, image size) for the
    splits that will be scored, the tuning split's masks present, and the tuning split
    held out (`tuning_overlap`). Every problem is one DatasetError naming the file."""
    layout = open_dataset(config.data)
    splits = list(dict.fromkeys([config.data.train_split, *config.infer.splits]))
    for split in splits:
        layout.check(split)
    lc = config.labels
    if lc.threshold is None and not layout.has_masks(layout.split_ids(lc.tune_split)):
        raise ConfigError(
            f"'labels.tune_split': split '{lc.tune_split}' has no GT masks to tune on "
            f"({no_masks_note(layout, layout.split_ids(lc.tune_split))}); set "
            "labels.threshold to a fixed value"
        )
    tuning_overlap(config, layout)
    method = REFINEMENTS.get(config.refine.method)
    if method.check is not None:
        method.check(config, layout)
    if config.segment.network is not None:
        check_segmentation(config)
        for split in config.segment.splits:
            layout.check_images(split)
    scored = []  # (split, id) of the splits stage_evaluate will score (every mask present)
    for split in dict.fromkeys(config.infer.splits):
        ids = layout.split_ids(split)
        if layout.has_masks(ids):
            scored += [(split, i) for i in ids]
    for split, image_id in iterate(scored, "checking masks", enabled=progress):
        mask = layout.load_mask(image_id)  # values checked against the class count
        height, width = image_size(layout.image_path(image_id))
        if mask.shape != (height, width):
            raise DatasetError(
                f"mask {layout.mask_path(image_id)} is {mask.shape[1]}x{mask.shape[0]} but "
                f"its image {layout.image_path(image_id)} is {width}x{height} (width x "
                f"height; split '{split}')"
            )


def summary_table(config: Config) -> str:
    """The results table of a run: every stage's number beside its protocol (maps,
    seeds, each refinement, the final pseudo masks, the segmentation network)."""
    metrics = _read_json(RunPaths(config.output_path).metrics)
    rows: list[tuple[str, float, Protocol]] = []

    def add(name: str, result: dict[str, Any] | None) -> None:
        if result and result.get("miou") is not None and "protocol" in result:
            rows.append((name, result["miou"] / 100, Protocol.from_dict(result["protocol"])))

    for split, result in metrics.get("maps", {}).items():
        if "oracle_best" in result:
            add(f"{result['map']} maps ({split})", result["oracle_best"])
    pseudo = metrics.get("pseudo_labels", {})
    refined = pseudo.get("source", "seeds") != "seeds"
    if refined:
        seeds = metrics.get("seeds", {})
        add(f"seeds ({seeds.get('split')})", seeds)
    for name, result in metrics.get("refine", {}).items():
        if "ir_labels" in result:
            ir = result["ir_labels"]
            add(f"{name}: IR labels ({ir.get('split')}, {ir.get('ignored')}% unsure as bg)", ir)
        add(f"{name} labels ({result['labels'].get('split')})", result["labels"])
    source = f", from {pseudo['source']}" if refined else ""
    add(f"pseudo labels ({pseudo.get('split')}{source})", pseudo)
    segmentation = metrics.get("segmentation", {})
    add(f"segmentation ({segmentation.get('split')})", segmentation)
    return results_table(rows)


def run(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """train -> maps -> evaluation -> refinement -> pseudo masks -> segmentation network ->
    its evaluation -> figures; returns metrics.json. Methods that do not train
    (`MethodSpec.trains`, CLIP-ES) start at the maps.

    Under torchrun every process trains and writes its share of the maps; rank 0 alone
    then runs the rest as a single process (the others return {}): launch
    `torchrun ... cpal segment` separately to train the segmentation network on every GPU."""
    if config.infer.shard is not None:
        raise ConfigError(
            "'infer.shard': `cpal run` evaluates every map; run `cpal infer --shard I/N` "
            "for each shard, then `cpal evaluate`, `cpal labels` and `cpal figures`"
        )
    paths = RunPaths(config.output_path)
    main = distributed.ranks().is_main
    _log.info("cpal run: output in %s", paths.root)
    # Before any training step; rank 0 checks, every process gets its verdict (when their
    # group is up: otherwise the others stop when rank 0 does, as after any failure).
    claim_output_dir_everywhere(config)
    problem: CpalError | None = None
    if main:
        try:
            check_run_inputs(config, progress=progress)
        except CpalError as exc:
            problem = exc
    problem = distributed.main_value(problem)
    if problem is not None:
        raise problem
    if method_spec(config.method).trains:
        stage_train(config, progress=progress)
        _log.info("stage train: done")
    else:
        _log.info("stage train: none (method %s makes maps from pretrained weights)",
                  config.method)
    stage_infer(config, progress=progress)  # returns once every process has written its maps
    _log.info("stage infer: done")
    if not main:
        return {}
    with distributed.alone():
        stage_evaluate(config)
        _log.info("stage evaluate: done")
        stage_refine(config, progress=progress)
        _log.info("stage refine: done (%s)", config.refine.method)
        stage_labels(config, progress=progress)
        _log.info("stage labels: done")
        if config.segment.network is not None:
            stage_segment(config, progress=progress)
            _log.info("stage segment: done")
            stage_segment_eval(config, progress=progress)
            _log.info("stage segment_eval: done")
        figures = stage_figures(config)
    _log.info("stage figures: %s", ", ".join(str(p) for p in figures))
    return _read_json(paths.metrics)
