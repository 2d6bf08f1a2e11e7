"""Refinement method `irn`: IRN (Ahn, Cho & Kwak, CVPR 2019) on the run's maps.

Three steps, each resumable, each writing under OUT/refine/irn/:

1. IR labels (`ir_labels/<split>/`): per image, confident foreground (background score
   `irn.fg_threshold`) and confident background (`irn.bg_threshold`), each cleaned by the
   dense CRF, 255 between; images over `refine.workers` processes.
2. The boundary branch of the inter-pixel relation network trained on them over a frozen
   trunk (`checkpoints/`, `train_log.jsonl`), through the shared trainer (`IRNTask`):
   pair affinity = 1 - the largest boundary probability on the path between two pixels,
   -log(a) for pairs of one label, -log(1 - a) for pairs of two.
3. The random walk (`<split>/`): the maps on the stride-4 grid times (1 - boundary),
   propagated 2^exp_times steps along affinity^beta (`cpal.refine.random_walk`, batched),
   upsampled, divided by their maximum, argmax against the background plane.

Each step takes its inputs and its folder as arguments (`write_ir_labels`, `train_irn`'s
`root`, `WalkPlan`), so refinement `amn` (`cpal.engine.amn`) runs the same three on its
own maps.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader

from cpal.config import Config, IRNConfig
from cpal.data.datasets import InferenceDataset, LabelledDataset, SameSizeBatchSampler
from cpal.data.images import load_rgb
from cpal.data.source import dataset_scale
from cpal.data.transforms import rescaled
from cpal.data.voc import VOCLayout
from cpal.engine.hooks import HookBase
from cpal.engine.identity import fingerprint_digest, load_finished_checkpoint, stage_fingerprint
from cpal.engine.label_dirs import LabelFolder
from cpal.engine.paths import RunPaths
from cpal.engine.refine import MapInputs, RefinementMethod, refine_with_workers, register_refinement
from cpal.engine.runtime import autocast, setup
from cpal.engine.trainer import fit
from cpal.engine.trunks import check_trunk, prepare_stage_training
from cpal.errors import ConfigError, DatasetError
from cpal.evaluation.scoring import (
    ChosenThreshold,
    Provenance,
    choose_threshold,
    evaluate_labels,
    map_paths,
    source_text,
)
from cpal.io import IGNORE_INDEX, MapRecord, load_maps
from cpal.log import Progress, get_logger
from cpal.models import irnet
from cpal.models.irnet import IRNet, boundary_map
from cpal.refine.crf import PRESETS
from cpal.refine.irn import (
    IRLabelParams,
    affinity_from_boundary,
    affinity_labels,
    follow_power,
    follow_threshold,
    ir_labels,
    pair_offsets,
    valid_pairs,
)
from cpal.refine.random_walk import (
    RandomWalkParams,
    random_walk,
    random_walk_labels,
    stack_for_walk,
)
from cpal.segmentation.losses import resize_labels

__all__ = ["IRNTask", "WalkPlan", "make_ir_labels", "train_irn", "walk_split",
           "write_ir_labels"]

_log = get_logger(__name__)
NAME = "irn"
# Keys of the irn section that shape IRNet itself: its trunk, pairs and schedule (the
# walk's do not). AMN trains an IRNet on IR labels of its own maps, so only these.
NETWORK_KEYS = ("trunk", "pretrained", "radius", "displacement", "train")
# IRN's IRNet also owes its weights to the IR labels of the run's maps made by these.
_TRAINING_KEYS = ("fg_threshold", "bg_threshold", "crf_preset", *NETWORK_KEYS)


# ---------------------------------------------------------------------------------------
# 1. IR labels


@dataclass(frozen=True)
class IRJob:
    image: Path
    maps: Path
    params: IRLabelParams


def ir_one(job: IRJob) -> np.ndarray:
    """One image's IR labels (a worker's function)."""
    record = load_maps(job.maps)
    inputs = MapInputs(load_rgb(job.image), record, None, job.maps)  # checks the sizes
    if job.params.own_bg_factor is not None:
        _require_background(record, job.maps)
    return ir_labels(inputs.image, record.maps, record.classes, job.params,
                     background=record.background)


def _require_background(record: MapRecord, path: Path) -> np.ndarray:
    """The record's own background channel, which irn.background=own reads; a file
    without one, in a run whose first maps had one, is a line naming it."""
    if record.background is None:
        raise DatasetError(f"{path}: no background channel, which irn.background=own reads; "
                           "the run's other maps have one")
    return record.background


@dataclass(frozen=True)
class Followed:
    """IRN's thresholds carried over to the maps' calibration (irn.calibration=seeds):
    the seeds' threshold they follow, with how it was chosen."""

    seeds: ChosenThreshold
    power: float

    def chosen(self, value: float) -> ChosenThreshold:
        """A threshold derived from the seeds' one: chosen as that one was."""
        return replace(self.seeds, value=value)

    def text(self, irn: IRNConfig) -> str:
        return (f"IRN's thresholds follow the seeds' {self.seeds.value:g} "
                f"({self.seeds.choice}): x^{self.power:.3f} maps {irn.reference_threshold:g} "
                "to it")


def follow_seeds(config: Config, layout: VOCLayout) -> tuple[Config, Followed | None]:
    """`config` with the irn section's three thresholds in the maps' calibration
    (irn.calibration=seeds; else as given), and what they followed."""
    irn = config.irn
    if irn.calibration == "fixed":
        return config, None
    seeds = choose_threshold(config, layout)
    if not 0 < seeds.value < 1:
        raise ConfigError(f"'irn.calibration': the seeds' threshold is {seeds.value:g}, "
                          "outside (0, 1): nothing to follow; set irn.calibration=fixed")
    mapped = replace(irn, **{
        key: round(follow_threshold(getattr(irn, key), seeds.value, irn.reference_threshold), 4)
        for key in ("fg_threshold", "bg_threshold", "bg_score")})
    _log.info("irn.calibration=seeds: confident fg %g / bg %g, walk background %g "
              "(the seeds' threshold %g)", mapped.fg_threshold, mapped.bg_threshold,
              mapped.bg_score, seeds.value)
    return replace(config, irn=mapped), Followed(
        seeds, follow_power(seeds.value, irn.reference_threshold))


def uses_own_background(config: Config, pairs: Sequence[tuple[str, Path]]) -> bool:
    """irn.background=own, and the run's maps carry their own background channel (the
    prototype methods'; a CAM run keeps IRN's planes). One file tells: a run's maps are
    all of one method."""
    if config.irn.background != "own" or not pairs:
        return False
    return load_maps(pairs[0][1]).background is not None


def _ir_params(irn: IRNConfig, own: bool = False) -> IRLabelParams:
    return IRLabelParams(irn.fg_threshold, irn.bg_threshold, PRESETS[irn.crf_preset],
                         own_bg_factor=irn.own_bg_factor if own else None)


def _ir_text(irn: IRNConfig, own: bool = False) -> str:
    if own:
        return (f"IR labels (against the maps' own background, confident bg x"
                f"{irn.own_bg_factor:g}, CRF {irn.crf_preset}; unsure 255)")
    return (f"IR labels (confident fg {irn.fg_threshold:g} / bg {irn.bg_threshold:g}, "
            f"CRF {irn.crf_preset}; unsure 255)")


def write_ir_labels(config: Config, layout: VOCLayout, pairs: Sequence[tuple[str, Path]],
                    directory: Path, params: IRLabelParams, record: dict[str, Any],
                    desc: str, progress: bool) -> LabelFolder:
    """IR labels of every image of `pairs` (id, maps file) not yet in `directory`, whose
    record is `record` plus the parameters: any maps (the run's, AMN's) in the same way."""
    folder = LabelFolder(directory, {"kind": "ir_labels", **record, "params": params.record()})
    with folder.share([i for i, _ in pairs]) as mine:
        todo = set(mine)
        jobs = {i: IRJob(layout.image_path(i), path, params) for i, path in pairs if i in todo}
        refine_with_workers(ir_one, jobs, folder, config, desc, progress)
    return folder


def _chosen(value: float, split: str, followed: Followed | None) -> ChosenThreshold:
    return (ChosenThreshold(value, "fixed", applied_to=split) if followed is None
            else followed.chosen(value))


def _followed_text(irn: IRNConfig, followed: Followed | None) -> str:
    return "" if followed is None else f"; {followed.text(irn)}"


def make_ir_labels(config: Config, layout: VOCLayout, progress: bool, *,
                   directory: Path | None = None, followed: Followed | None = None
                   ) -> tuple[LabelFolder, Provenance, list[str]]:
    """The IR labels of the run's maps of `labels.split` by the `irn` section, in
    `directory` (default: OUT/refine/irn/ir_labels/<split>/); `followed`: what the
    section's thresholds were carried over from (`follow_seeds`)."""
    split = config.labels.split
    pairs, identity = map_paths(config, layout, split)
    irn = config.irn
    own = uses_own_background(config, pairs)
    provenance = Provenance(source_text("labels", identity), identity["inference"],
                            None if own else _chosen(irn.fg_threshold, split, followed),
                            _ir_text(irn, own) + _followed_text(irn, followed))
    if directory is None:
        directory = RunPaths(config.output_path).refinement(NAME) / "ir_labels" / split
    folder = write_ir_labels(config, layout, pairs, directory, _ir_params(irn, own),
                             {"maps": identity, "provenance": provenance.to_dict()},
                             f"IR labels {split}", progress)
    return folder, provenance, [i for i, _ in pairs]


# ---------------------------------------------------------------------------------------
# 2. The boundary network


class IRNTask:
    """IRNet's boundary branch (and optional displacement branch) on IR labels."""

    def __init__(self, net: IRNet, dataset: LabelledDataset, irn: IRNConfig,
                 device: torch.device) -> None:
        self.net, self.dataset, self.irn, self.device = net, dataset, irn, device

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        share = len(item["label"]) / self.irn.train.batch_size
        images = item["image"].to(self.device, non_blocking=True)
        if self.irn.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        out = model(images)
        boundary = torch.sigmoid(out.boundary.float())[:, 0]
        height, width = boundary.shape[-2:]
        # IRN reduces the labels to the boundary grid by nearest (pil_rescale 0.25).
        labels = resize_labels(item["label"].to(self.device), (height, width))
        radius = self.irn.radius
        targets = affinity_labels(labels, radius, IGNORE_INDEX)
        masks = irnet.AffinityLabels(targets.bg_pos.float(), targets.fg_pos.float(),
                                     targets.neg.float())
        terms = irnet.affinity_loss(affinity_from_boundary(boundary, radius), masks)
        parts = {"bg_pos": terms.bg_pos, "fg_pos": terms.fg_pos, "neg": terms.neg}
        total = terms.total
        if out.displacement is not None:
            src, dst, pick = _flat_pairs(height, width, radius, labels.device)
            flat = irnet.AffinityLabels(*(m.flatten(1)[:, pick] for m in masks))
            fg, bg = irnet.displacement_loss(out.displacement.float(), src, dst, flat)
            parts.update(dp_fg=fg, dp_bg=bg)
            total = total + (fg + bg) / 2
        return total * share, {k: v.detach() * share for k, v in parts.items()}


def _flat_pairs(height: int, width: int, radius: int, device: torch.device
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The grid's valid pairs as flat (src, dst) indices and their positions in a
    flattened (P, H, W) pair tensor (what the displacement loss takes)."""
    valid = valid_pairs(height, width, radius, device)
    p, ys, xs = valid.nonzero(as_tuple=True)
    offsets = torch.as_tensor(pair_offsets(radius).offsets, device=device)[p]
    src = ys * width + xs
    dst = (ys + offsets[:, 0]) * width + xs + offsets[:, 1]
    return src, dst, (p * height + ys) * width + xs


def build_irnet(config: Config) -> IRNet:
    return IRNet(arch=config.model.arch, width=config.model.width,  # type: ignore[arg-type]
                 output_stride=config.model.output_stride,
                 displacement=config.irn.displacement)


def irn_fingerprint(config: Config, ir_record: dict[str, Any], trunk: dict[str, Any],
                    keys: Sequence[str] = _TRAINING_KEYS) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(config.irn).items() if k in keys}
    return stage_fingerprint(config, fields, ir_labels=fingerprint_digest(ir_record),
                             trunk=trunk, arch=[config.model.arch, config.model.width,
                                                config.model.output_stride])


def train_irn(config: Config, layout: VOCLayout, ir_folder: LabelFolder, ids: Sequence[str],
              *, root: Path | None = None, keys: Sequence[str] = _TRAINING_KEYS,
              progress: bool = True, hooks: Sequence[HookBase] = ()
              ) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) IRNet on the IR labels; returns the final checkpoint and its
    fingerprint. `root`: where its checkpoints/ and train_log.jsonl go (default
    OUT/refine/irn/); `keys`: the irn keys in its fingerprint (AMN leaves out the IR-label
    keys it does not train on)."""
    device = setup(config)
    irn, t = config.irn, config.irn.train
    net = build_irnet(config)
    stage = prepare_stage_training(
        config, layout, net, device, key="irn", trunk=irn.trunk,
        pretrained=_irn_pretrained(config), allow_leak=config.model.pretrained_allow_leak,
        schedule=t, ids=ids, label_dir=ir_folder.directory)
    groups = net.param_groups(t.lr, t.weight_decay)
    optimizer = torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum,
                                weight_decay=t.weight_decay)
    fingerprint = irn_fingerprint(config, ir_folder.record, stage.trunk, keys)
    paths = RunPaths(root if root is not None else RunPaths(config.output_path).refinement(NAME))
    checkpoint = fit(IRNTask(net, stage.dataset, irn, device), optimizer, schedule=t,
                     seed=config.seed, num_workers=config.data.num_workers, device=device,
                     paths=paths, fingerprint=fingerprint, steps_per_epoch=stage.steps_per_epoch,
                     hooks=hooks, progress=progress)
    return checkpoint, fingerprint


def _irn_pretrained(config: Config) -> str | None:
    return config.irn.pretrained or config.model.pretrained


# ---------------------------------------------------------------------------------------
# 3. The random walk


def walk_params(irn: IRNConfig) -> RandomWalkParams:
    return RandomWalkParams(radius=irn.walk_radius, beta=irn.beta, exp_times=irn.exp_times,
                            bg_score=irn.bg_score, stride=irnet.GRID_STRIDE)


def grid_maps(maps: np.ndarray, grid: tuple[int, int], device: torch.device,
              power: float = 1.0) -> torch.Tensor:
    """Full-resolution maps (C, H, W) averaged down to the boundary grid (IRN walks its
    stride-4 CAMs), then raised to `power` (AMN walks its maps^1.3)."""
    tensor = torch.from_numpy(np.ascontiguousarray(maps, dtype=np.float32)).to(device)
    if tensor.shape[0] == 0:
        return tensor.new_zeros((0, *grid))
    on_grid = F.interpolate(tensor[None], size=grid, mode="area")[0]
    return on_grid if power == 1.0 else on_grid.pow(power)


@dataclass(frozen=True)
class WalkPlan:
    """What a random walk reads and writes: IRN's walks the run's maps, AMN's its own
    maps raised to a power, both along an IRNet's boundaries."""

    folder: LabelFolder
    """Where the labels go, with its record (its `maps`: the run's maps identity, which
    the labels stage checks)."""
    maps: dict[str, Path]
    """id -> maps file of every image of the split, in the split's order."""
    network: Path
    """The IRNet's folder (its checkpoints/)."""
    fingerprint: dict[str, Any]
    """The IRNet's training fingerprint (its checkpoint is refused under another)."""
    power: float = 1.0
    """The maps on the boundary grid are raised to this first (AMN: 1.3)."""
    own_power: float | None = None
    """Set: the maps' own background channel is walked with them, raised to this power
    (irn.background=own, SIPE: 1.5), in place of the background plane."""


def walk_split(config: Config, layout: VOCLayout, plan: WalkPlan, progress: bool
               ) -> tuple[LabelFolder, list[str]]:
    """Random-walk labels of every image of `plan.maps` not yet written (under torchrun,
    each process a share of them)."""
    folder, ids = plan.folder, list(plan.maps)
    with folder.share(ids) as todo:
        if todo:
            _walk_images(config, layout, plan, todo, progress)
    return folder, ids


def _walk_images(config: Config, layout: VOCLayout, plan: WalkPlan, todo: Sequence[str],
                 progress: bool) -> None:
    split, irn, folder = config.labels.split, config.irn, plan.folder
    device = setup(config)
    _, ckpt = load_finished_checkpoint(plan.network / "checkpoints", plan.fingerprint,
                                       "cpal refine")
    net = build_irnet(config)
    net.load_state_dict(ckpt.model)
    net.to(device).eval()
    params = walk_params(irn)
    dataset = InferenceDataset(layout, todo)
    loader = DataLoader(dataset, batch_sampler=SameSizeBatchSampler(dataset.sizes(),
                                                                    irn.walk_batch),
                        num_workers=config.data.num_workers)
    bar = Progress(len(todo), f"random walk {split}", enabled=progress)
    scale = dataset_scale(config.data, layout)
    for batch in loader:
        images = batch["image"].to(device)
        height, width = images.shape[-2:]
        with torch.inference_mode(), autocast(device, irn.train.precision):
            boundary = boundary_map(net, rescaled(images, scale), flip=irn.boundary_flip)
            boundary = boundary[:, 0].float()
        records = [load_maps(plan.maps[i]) for i in batch["id"]]
        grid = tuple(boundary.shape[-2:])
        maps, walls = stack_for_walk([_walked(r, plan, grid, device, plan.maps[i])
                                      for r, i in zip(records, batch["id"], strict=True)],
                                     list(boundary))
        with torch.inference_mode():
            walked = random_walk(maps, walls, params)
            if scale != 1.0:  # the walk ran on the enlarged image's grid: back to the image's
                walked = F.interpolate(walked, size=irnet.grid_size(height, width), mode="bilinear",
                                       align_corners=False)
        own = plan.own_power is not None
        for i, (image_id, record) in enumerate(zip(batch["id"], records, strict=True)):
            count = len(record.classes) + int(own)
            folder.write(image_id, random_walk_labels(walked[i, :count], record.classes,
                                                      (height, width), params, own))
        bar.update(len(records))
    bar.close()


def _walked(record: MapRecord, plan: WalkPlan, grid: tuple[int, int], device: torch.device,
            path: Path) -> torch.Tensor:
    """One image's maps on the boundary grid as the walk reads them: the classes raised to
    `plan.power`, or [own background, classes] raised to `plan.own_power`."""
    if plan.own_power is None:
        return grid_maps(record.maps, grid, device, plan.power)
    stacked = np.concatenate([_require_background(record, path)[None], record.maps])
    return grid_maps(stacked, grid, device, plan.own_power)


def walk_record(config: Config, checkpoint: Path, fingerprint: dict[str, Any]
                ) -> dict[str, Any]:
    """What a walk's labels owe to its IRNet and the walk's settings (for its record)."""
    return {"checkpoint": checkpoint.name, "irnet": fingerprint_digest(fingerprint),
            "walk": asdict(walk_params(config.irn)), "boundary_flip": config.irn.boundary_flip}


def _irn_walk_plan(config: Config, layout: VOCLayout, checkpoint: Path, fingerprint: dict,
                   followed: Followed | None) -> WalkPlan:
    split = config.labels.split
    pairs, identity = map_paths(config, layout, split)
    paths = RunPaths(config.output_path)
    own = uses_own_background(config, pairs)
    folder = LabelFolder(paths.refined(NAME, split), {
        "kind": "irn", "maps": identity, **walk_record(config, checkpoint, fingerprint),
        **({"background": "own", "own_power": config.irn.own_power} if own else {}),
        "provenance": irn_provenance(config, identity, followed, own).to_dict()})
    return WalkPlan(folder, dict(pairs), paths.refinement(NAME), fingerprint,
                    own_power=config.irn.own_power if own else None)


def walk_text(irn: IRNConfig) -> str:
    """The random walk's settings, as protocols state them."""
    return f"radius {irn.walk_radius}, beta {irn.beta:g}, 2^{irn.exp_times} steps"


def walk_provenance(config: Config, identity: dict[str, Any], refinement: str,
                    followed: Followed | None = None) -> Provenance:
    """The protocol of labels from IRN's random walk on the maps of `identity`: its
    background score fixed in advance, or carried over from the seeds' threshold
    (`followed`, then chosen as that one was); `refinement` says what made them."""
    return Provenance(source_text("labels", identity), identity["inference"],
                      _chosen(config.irn.bg_score, config.labels.split, followed), refinement)


def irn_provenance(config: Config, identity: dict[str, Any],
                   followed: Followed | None = None, own: bool = False) -> Provenance:
    """own: the maps' own background replaced every plane (irn.background=own): no
    threshold entered the labels."""
    irn, t = config.irn, config.irn.train
    walk = (f"random walk of [own background, maps]^{irn.own_power:g}, {walk_text(irn)}"
            if own else f"random walk {walk_text(irn)}, background {irn.bg_score:g}")
    refinement = (f"IRN: {_ir_text(irn, own)}; IRNet boundary ({config.model.arch} "
                  f"x{config.model.width:g}, trunk {irn.trunk}, {t.epochs} epochs of batch "
                  f"{t.batch_size}); {walk}{_followed_text(irn, followed)}")
    if own:
        return Provenance(source_text("labels", identity), identity["inference"], None,
                          refinement)
    return walk_provenance(config, identity, refinement, followed)


def _refine_irn(config: Config, layout: VOCLayout, progress: bool,
                hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    followed = None
    if not uses_own_background(config, map_paths(config, layout, config.labels.split)[0]):
        config, followed = follow_seeds(config, layout)  # own: no threshold to carry
    ir_folder, ir_provenance, ids = make_ir_labels(config, layout, progress,
                                                   followed=followed)
    checkpoint, fingerprint = train_irn(config, layout, ir_folder, ids, progress=progress,
                                        hooks=hooks)
    plan = _irn_walk_plan(config, layout, checkpoint, fingerprint, followed)
    folder, ids = walk_split(config, layout, plan, progress)
    split = config.labels.split
    provenance = Provenance.from_dict(folder.record["provenance"])
    return {
        "labels": evaluate_labels(layout, split, ids, folder.directory, provenance).to_dict(),
        "ir_labels": ir_label_scores(layout, split, ir_folder, ids, ir_provenance),
        "checkpoint": checkpoint.name,
    }


def ir_label_scores(layout: VOCLayout, split: str, folder: LabelFolder, ids: Sequence[str],
                    provenance: Provenance) -> dict[str, Any]:
    """An IR-label folder's scores (unsure pixels as background) and its unsure share."""
    scores = evaluate_labels(layout, split, ids, folder.directory, provenance)
    return {**scores.to_dict(), "ignored": _ignored_share(folder, ids)}


def _ignored_share(folder: LabelFolder, ids: Sequence[str]) -> float:
    """Percent of IR-label pixels left unsure (255): what IRNet does not learn from."""
    ignored = total = 0
    for image_id in ids:
        with Image.open(folder.path(image_id)) as image:
            label = np.asarray(image)
        ignored += int((label == IGNORE_INDEX).sum())
        total += label.size
    return round(100.0 * ignored / max(total, 1), 2)


def check_irnet(config: Config, layout: VOCLayout) -> None:
    """Refuse, before any training, an IRNet it cannot build: a trunk that is not a
    ResNet, or a trunk source that cannot work."""
    from cpal.models.registry import BACKBONES

    if config.model.arch not in BACKBONES:
        raise ConfigError(
            f"'refine.method': {config.refine.method} builds IRNet on model.arch, which must "
            f"be a ResNet, not {config.model.arch}; use refine.method=crf with method "
            f"{config.method}")
    check_trunk(config, config.irn.trunk, _irn_pretrained(config), "irn", config.model.arch,
                config.model.width)


register_refinement(RefinementMethod(
    NAME, "IRN: IR labels, IRNet's boundary branch on a frozen trunk, random walk",
    run=_refine_irn, check=check_irnet))
