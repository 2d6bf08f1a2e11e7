"""The stages of a run and how `cpal run` chains them.

Each stage reads the previous stage's files under `output_dir` and writes its own, so any
stage can be rerun alone (IRN's style). Finished stages are recorded in `stages.json`;
metrics accumulate in `metrics.json`, each number with the protocol that produced it.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cpal.config import Config
from cpal.data.images import image_size, load_mask
from cpal.data.source import open_dataset
from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout
from cpal.engine import distributed
from cpal.engine.hooks import HookBase
from cpal.engine.identity import load_final_checkpoint, read_maps_identity
from cpal.engine.infer import (
    PrototypeInference,
    infer,
    load_trained_model,
    missing_maps,
    normalised_maps,
)
from cpal.engine.output_dir import claim_output_dir, claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import resolve_device
from cpal.engine.train import train
from cpal.errors import ConfigError, CpalError, DatasetError, warn
from cpal.evaluation.diagnostics import BorderShare, prototype_separation
from cpal.evaluation.metrics import (
    SegmentationScores,
    ThresholdSweep,
    confusion_matrix,
    labels_from_maps,
    labels_with_own_background,
)
from cpal.evaluation.protocol import Protocol, results_table
from cpal.io import (
    IGNORE_INDEX,
    load_maps,
    png_complete,
    read_json,
    save_label_png,
    write_json_atomic,
)
from cpal.log import get_logger, iterate
from cpal.methods import CAM_MAP, PACAM_MAP, method_spec
from cpal.models.cam_net import CAMNet
from cpal.viz.figures import (
    ContextPanel,
    OverlayRow,
    overlay_grid,
    per_class_iou_chart,
    sweep_curve,
)

STAGES = ("train", "infer", "evaluate", "labels", "figures")
_log = get_logger(__name__)
_LABELS_META = "_labels.json"


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


def _source(what: str, identity: dict[str, Any]) -> str:
    """e.g. "maps:pacam (method cpal)": what was scored, from the maps' own record."""
    return f"{what}:{identity['map']} (method {identity['method']})"


def _no_masks_note(layout: VOCLayout, ids: Sequence[str]) -> str:
    return f"GT masks for {layout.count_masks(ids)} of {len(ids)} images; not evaluated"


def _map_paths(
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


# ---------------------------------------------------------------------------------------
# Stages


def stage_train(config: Config, *, progress: bool = True,
                hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """Train (or resume); `hooks` run after the standard ones (`cpal.engine.train.train`)."""
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
    pairs, identity = _map_paths(config, layout, split)
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
            results[split] = {"skipped": _no_masks_note(layout, ids)}
            continue
        scores = sweep_split(config, layout, split)
        sweep, identity = scores.sweep, scores.identity
        best_threshold, best = sweep.best()
        protocol = Protocol(
            split=split, num_images=len(ids), source=_source("maps", identity),
            threshold=best_threshold,
            threshold_choice="oracle", tuned_on=split, inference=identity["inference"],
        )
        results[split] = {
            "map": identity["map"],
            "method": identity["method"],
            "num_images": len(ids),
            "sweep": [
                {"threshold": float(t), "miou": round(100 * s.miou, 2)}
                for t, s in zip(sweep.thresholds, sweep.scores(), strict=True)
            ],
            "oracle_best": {
                "threshold": best_threshold,
                **best.to_dict(layout.class_names),
                "protocol": protocol.to_dict(),
            },
        }
        if scores.own_background is not None:
            own = Protocol(
                split=split, num_images=len(ids), threshold=None, threshold_choice="none",
                source=_source("maps", identity) + " argmax with its own background channel",
                inference=identity["inference"],
            )
            results[split]["own_background"] = {
                **SegmentationScores.from_confusion(scores.own_background).to_dict(
                    layout.class_names),
                "protocol": own.to_dict(),
            }
        if scores.seeds is not None:
            seed_protocol = Protocol(
                split=split, num_images=len(ids), threshold=None, threshold_choice="none",
                source=_source("seeds", identity) + " at scale 1 (a diagnostic: the regions "
                "prototypes are pooled from; unseeded pixels count as background)",
                inference=identity["inference"],
            )
            results[split]["seeds"] = {
                **SegmentationScores.from_confusion(scores.seeds).to_dict(layout.class_names),
                "protocol": seed_protocol.to_dict(),
            }
    _update_json(paths.metrics, "maps", results)
    if method_spec(config.method).has_prototypes and config.eval.diagnostic_images > 0:
        _update_json(paths.metrics, "diagnostics", {
            split: {"prototype_separation": _separation(config, layout, split)}
            for split in config.infer.splits
        })
    _record_stage(paths, "evaluate", time.perf_counter() - start)
    return results


def _separation(config: Config, layout: VOCLayout, split: str) -> dict[str, Any]:
    """The prototype-separation diagnostic on the first `eval.diagnostic_images` images."""
    device = resolve_device(config.device)
    _, ckpt = load_final_checkpoint(config)
    model = load_trained_model(ckpt, config, layout.num_foreground, device)
    ids = layout.split_ids(split)[: config.eval.diagnostic_images]
    images = [normalize(layout.load_image(i)).to(device) for i in ids]
    labels = torch.from_numpy(layout.image_labels(ids)).to(device)
    result = prototype_separation(model, images, list(labels), PrototypeInference.of(config))
    return {**result.to_dict(), "protocol": f"{split}, first {len(ids)} images, scale 1 + "
            "flip, instance prototypes as inference makes them (no GT used)"}


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


def choose_threshold(config: Config, layout: VOCLayout) -> dict[str, Any]:
    """The background threshold for pseudo labels, and how it was chosen."""
    lc = config.labels
    if lc.threshold is not None:
        return {"value": lc.threshold, "choice": "fixed", "tuned_on": None}
    tune_ids = layout.split_ids(lc.tune_split)
    if not layout.has_masks(tune_ids):
        raise ConfigError(
            f"'labels.tune_split': split '{lc.tune_split}' has no GT masks to tune on; "
            "set labels.threshold to a fixed value"
        )
    overlap = tuning_overlap(config, layout)
    value, _ = sweep_split(config, layout, lc.tune_split, own_background=False).sweep.best()
    choice = "oracle" if lc.tune_split == lc.split else "tuned"
    chosen = {"value": value, "choice": choice, "tuned_on": lc.tune_split}
    if overlap:
        chosen["tuning_overlap"] = overlap
    return chosen


def stage_labels(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """Export pseudo labels as palette PNGs and score them against GT where it exists."""
    claim_output_dir(config)
    start = time.perf_counter()
    paths = RunPaths(config.output_path)
    layout = open_dataset(config.data)
    split = config.labels.split
    threshold = choose_threshold(config, layout)
    out_dir = paths.labels(split)
    out_dir.mkdir(parents=True, exist_ok=True)
    pairs, identity = _map_paths(config, layout, split)
    meta_path = out_dir / _LABELS_META
    meta = {"threshold": threshold["value"], "maps": identity}
    # Reuse finished files only if they were made from these maps at this threshold; the
    # marker is removed while writing, so a killed run never passes for a finished one.
    reuse = _read_json(meta_path) == meta
    meta_path.unlink(missing_ok=True)
    for image_id, map_path in iterate(pairs, f"labels {split}", enabled=progress):
        target = out_dir / f"{image_id}.png"
        if reuse and target.exists():
            if png_complete(target):
                continue
            warn(f"{target}: damaged label file (truncated PNG); redoing it")
        save_label_png(target, labels_from_maps(load_maps(map_path), threshold["value"]))
    write_json_atomic(meta_path, meta)

    result: dict[str, Any] = {"split": split, "num_images": len(pairs),
                              "dir": str(out_dir), "miou": None}
    ids = [i for i, _ in pairs]
    if layout.has_masks(ids):
        scores, border = score_label_dir(layout, ids, out_dir), BorderShare()
        for image_id in ids:
            border.update(load_mask(out_dir / f"{image_id}.png", layout.num_classes),
                          layout.load_mask(image_id))
        result["border"] = border.to_dict()
        protocol = Protocol(
            split=split, num_images=len(ids), source=_source("labels", identity),
            threshold=threshold["value"],
            threshold_choice=threshold["choice"], tuned_on=threshold["tuned_on"],
            inference=identity["inference"], tuning_overlap=threshold.get("tuning_overlap", 0),
        )
        result.update(scores.to_dict(layout.class_names))
        result["protocol"] = protocol.to_dict()
    else:
        result["skipped"] = _no_masks_note(layout, ids)
    _update_json(paths.metrics, "threshold", threshold)
    _update_json(paths.metrics, "pseudo_labels", result)
    _record_stage(paths, "labels", time.perf_counter() - start, threshold=threshold["value"])
    return result


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


def evaluate_label_dir(config: Config, label_dir: Path, split: str) -> dict[str, Any]:
    """Score any folder of label PNGs (ours or another method's) against a split's GT."""
    layout = open_dataset(config.data)
    ids = layout.split_ids(split)
    scores = score_label_dir(layout, ids, label_dir)
    protocol = Protocol(
        split=split, num_images=len(ids), source=f"labels:{label_dir}", threshold=None,
        threshold_choice="none", image_labels="as produced by the labels' source",
    )
    return {**scores.to_dict(layout.class_names), "protocol": protocol.to_dict()}


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
        threshold = choose_threshold(config, layout)["value"]

    split = config.viz.split
    pairs, _ = _map_paths(config, layout, split)
    step = max(1, len(pairs) // config.viz.num_images)
    chosen = pairs[::step][: config.viz.num_images]
    has_gt = layout.has_masks([i for i, _ in chosen])
    rows = []
    for image_id, map_path in chosen:
        record = load_maps(map_path)
        heat = record.maps.max(axis=0) if len(record.classes) else record.maps.sum(axis=0)
        rows.append(OverlayRow(
            image_id=image_id, image=layout.load_image(image_id),
            gt=layout.load_mask(image_id) if has_gt else None,
            heat=heat, pseudo=labels_from_maps(record, threshold),
        ))
    target = paths.figures / f"overlay_{split}.png"
    overlay_grid(rows, target, layout.class_names, heat_title=f"{config.map_kind} heat map")
    written.append(target)
    if method_spec(config.method).has_prototypes:
        target = paths.figures / f"cam_vs_pacam_{split}.png"
        _comparison_figure(config, layout, rows, target)
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
    if series:
        target = paths.figures / "per_class_iou.png"
        per_class_iou_chart(layout.class_names, series, target, title="Per-class IoU (%)")
        written.append(target)
    _record_stage(paths, "figures", time.perf_counter() - start,
                  files=[p.name for p in written])
    return written


def _comparison_figure(
    config: Config, layout: VOCLayout, rows: list[OverlayRow], target: Path
) -> None:
    """Image | GT | CAM | PACAM | pseudo label, recomputed for the figure's few images from
    the final checkpoint (the run stores only one kind of map); for methods that select
    context (cpal-topk, cpal) also the training images behind the selected context."""
    device = resolve_device(config.device)
    _, ckpt = load_final_checkpoint(config)
    model = load_trained_model(ckpt, config, layout.num_foreground, device)
    selects = model.cpal is not None and model.cpal.uses_selection
    train_ids = layout.split_ids(config.data.train_split) if selects else []
    compared = []
    for row in rows:
        image = normalize(layout.load_image(row.image_id))[None].to(device)
        labels = torch.from_numpy(layout.image_labels([row.image_id])).to(device)
        maps = normalised_maps(model, image, labels, config.infer.scales, config.infer.flip,
                               (CAM_MAP, PACAM_MAP), PrototypeInference.of(config))
        present = torch.nonzero(labels[0] > 0.5).flatten()

        def heat(kind: str, present: torch.Tensor = present, maps: dict = maps) -> np.ndarray:
            chosen = maps[kind][0, present]
            return (chosen.amax(dim=0) if len(present) else chosen.sum(dim=0)).cpu().numpy()

        context = None
        if selects and len(present):
            context = _context_panel(model, layout, train_ids, image, labels, row, present)
        compared.append(dataclasses.replace(row, heat=heat(CAM_MAP),
                                            more_heats={"PACAM": heat(PACAM_MAP)},
                                            context=context))
    overlay_grid(compared, target, layout.class_names, heat_title="CAM")


@torch.inference_mode()
def _context_panel(
    model: CAMNet, layout: VOCLayout, train_ids: Sequence[str], image: torch.Tensor,
    labels: torch.Tensor, row: OverlayRow, present: torch.Tensor,
) -> ContextPanel:
    """For the image's main class (largest pseudo-label area among its present classes):
    each selected context prototype's weight and the training image of its nearest bank
    entry. One forward pass at scale 1 against the frozen bank, plus the few thumbnails."""
    assert model.cpal is not None
    areas = [int((row.pseudo == int(c) + 1).sum()) for c in present]
    channel = int(present[int(np.argmax(areas))]) + 1
    out = model(image, labels).cpal
    assert out is not None
    thumbnails: list[tuple[str, np.ndarray | None]] = []
    for weight, source in model.cpal.context_sources(out, 0, channel):
        if 0 <= source < len(train_ids):
            image_id = train_ids[source]
            thumbnails.append((f"w {weight:.2f}\n{image_id}", layout.load_image(image_id)))
        else:  # entries enqueued without sample ids (or from another dataset)
            thumbnails.append((f"w {weight:.2f}\nsource unknown", None))
    return ContextPanel(label=layout.class_names[channel], thumbnails=thumbnails)


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
            f"({_no_masks_note(layout, layout.split_ids(lc.tune_split))}); set "
            "labels.threshold to a fixed value"
        )
    tuning_overlap(config, layout)
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
    """The results table of a run: every number beside its protocol."""
    metrics = _read_json(RunPaths(config.output_path).metrics)
    rows: list[tuple[str, float, Protocol]] = []
    for split, result in metrics.get("maps", {}).items():
        if "oracle_best" in result:
            best = result["oracle_best"]
            rows.append((f"{result['map']} maps ({split})", best["miou"] / 100,
                         Protocol.from_dict(best["protocol"])))
    pseudo = metrics.get("pseudo_labels", {})
    if pseudo.get("miou") is not None:
        rows.append((f"pseudo labels ({pseudo['split']})", pseudo["miou"] / 100,
                     Protocol.from_dict(pseudo["protocol"])))
    return results_table(rows)


def run(config: Config, *, progress: bool = True) -> dict[str, Any]:
    """train -> maps -> evaluation -> pseudo labels -> figures; returns metrics.json.

    Under torchrun every process trains and writes its share of the maps; rank 0 alone
    then evaluates, exports labels and draws figures (the others return {})."""
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
    stage_train(config, progress=progress)
    _log.info("stage train: done")
    stage_infer(config, progress=progress)  # returns once every process has written its maps
    _log.info("stage infer: done")
    if not main:
        return {}
    stage_evaluate(config)
    _log.info("stage evaluate: done")
    stage_labels(config, progress=progress)
    _log.info("stage labels: done")
    figures = stage_figures(config)
    _log.info("stage figures: %s", ", ".join(str(p) for p in figures))
    return _read_json(paths.metrics)
