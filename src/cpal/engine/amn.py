"""Refinement method `amn`: AMN (Lee, Kim & Shim, CVPR 2022) on the run's maps, then IRN.

AMN sits between IRN's IR labels and IRN's boundary network: a label-conditioned
per-pixel classifier (`cpal.models.amn.AMN`) learns from the IR labels of the run's maps
and makes new maps whose activations are two-level, which IRN then refines. Six steps,
each resumable, under OUT/refine/amn/, reusing IRN's (`cpal.engine.irn`) for three:

1. `ir_labels/<split>/`: IR labels of the run's maps, by the `irn` section, as IRN's first
   step (`make_ir_labels`).
2. `checkpoints/`, `train_log.jsonl`: AMN trained on them through the shared trainer
   (`AMNTask`): label-smoothed cross entropy, averaged over foreground and background
   pixels apart.
3. `maps/<split>/`: AMN's maps, one `.npz` per image as the run's: softmax of the logits
   averaged over `infer.scales` and flips, each present class's channel min-max
   normalised per image (`cpal.models.amn.amn_maps`).
4. `amn_ir_labels/<split>/`: IR labels of those maps at `amn.fg_threshold` /
   `amn.bg_threshold` (`write_ir_labels`).
5. `irn/checkpoints/`: IRNet's boundary branch on them (`train_irn`, the `irn` section).
6. `<split>/`: IRN's random walk of AMN's maps raised to `amn.power` (`walk_split`): the
   refined labels the labels stage publishes as the pseudo masks.

No threshold is tuned on ground truth: every one is fixed in advance, as IRN's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cpal.config import AMNConfig, Config
from cpal.data.datasets import (
    InferenceDataset,
    LabelledDataset,
    PairTransformFn,
    SameSizeBatchSampler,
)
from cpal.data.images import load_mask
from cpal.data.source import dataset_scale
from cpal.data.voc import VOCLayout
from cpal.engine.hooks import HookBase
from cpal.engine.identity import fingerprint_digest, load_finished_checkpoint, stage_fingerprint
from cpal.engine.infer import describe_inference
from cpal.engine.irn import (
    NETWORK_KEYS,
    WalkPlan,
    check_irnet,
    ir_label_scores,
    make_ir_labels,
    train_irn,
    walk_provenance,
    walk_record,
    walk_split,
    walk_text,
    write_ir_labels,
)
from cpal.engine.label_dirs import LabelFolder
from cpal.engine.optim import OPTIMIZERS
from cpal.engine.paths import RunPaths
from cpal.engine.refine import RefinementMethod, register_refinement
from cpal.engine.runtime import autocast, derived_seed, setup
from cpal.engine.trainer import fit
from cpal.engine.trunks import check_trunk, prepare_stage_training
from cpal.errors import ConfigError
from cpal.evaluation.scoring import (
    ChosenThreshold,
    Provenance,
    evaluate_labels,
    map_paths,
    source_text,
)
from cpal.io import MapRecord, map_file_problem, save_maps
from cpal.log import Progress
from cpal.models.amn import AMN, amn_loss, amn_maps
from cpal.refine.crf import PRESETS
from cpal.refine.irn import IRLabelParams
from cpal.segmentation.inference import multi_scale_logits
from cpal.segmentation.losses import resize_labels

__all__ = ["AMNTask", "ConditionedDataset", "MapFolder", "amn_logits", "make_amn_maps",
           "train_amn"]

NAME = "amn"
# Keys of the amn section that shape AMN's weights (its maps' and IRN's keys do not).
_TRAINING_KEYS = ("trunk", "pretrained", "eps", "rates", "dropout", "optimizer",
                  "head_lr_mult", "train")


# ---------------------------------------------------------------------------------------
# 2. The network


class ConditionedDataset(LabelledDataset):
    """`LabelledDataset` (augmented images and their IR labels) plus each image's
    multi-hot image labels (`classes`), which AMN is conditioned on."""

    def __init__(self, layout: VOCLayout, ids: Sequence[str], label_dir: Path,
                 transform: PairTransformFn, seed: int) -> None:
        super().__init__(layout, ids, label_dir, transform, seed)
        self.classes = torch.from_numpy(layout.image_labels(self.ids))

    def __getitem__(self, index: int) -> dict[str, Any]:
        return {**super().__getitem__(index), "classes": self.classes[index]}


class AMNTask:
    """AMN's per-pixel classification on IR labels (255 ignored), for the shared trainer."""

    def __init__(self, net: AMN, dataset: ConditionedDataset, amn: AMNConfig,
                 device: torch.device, seed: int) -> None:
        self.net, self.dataset, self.amn, self.device = net, dataset, amn, device
        self.seed = seed

    def dropout_generator(self, index: int) -> torch.Generator:
        """An image's dropout mask from (seed, epoch, image) alone: the same after a
        resume, whatever the process count or accumulation."""
        seed = derived_seed(self.seed, self.dataset.epoch, index)
        return torch.Generator(device=self.device).manual_seed(seed)

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        share = len(item["label"]) / self.amn.train.batch_size
        images = item["image"].to(self.device, non_blocking=True)
        if self.amn.train.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        generators = [self.dropout_generator(int(i)) for i in item["index"]]
        logits = model(images, item["classes"].to(self.device), generators)
        # The reference resizes the labels to the logits' grid by PIL's nearest.
        labels = resize_labels(item["label"].to(self.device), logits.shape[-2:])
        terms = amn_loss(logits.float(), labels, self.amn.eps)
        return terms.total * share, {"fg": terms.fg.detach() * share,
                                     "bg": terms.bg.detach() * share}


def build_amn(config: Config, num_classes: int) -> AMN:
    return AMN(num_classes, arch=config.model.arch,  # type: ignore[arg-type]
               width=config.model.width, output_stride=config.model.output_stride,
               rates=config.amn.rates, dropout=config.amn.dropout)


def _amn_pretrained(config: Config) -> str | None:
    return config.amn.pretrained or config.model.pretrained


def amn_fingerprint(config: Config, ir_record: dict[str, Any], trunk: dict[str, Any]
                    ) -> dict[str, Any]:
    fields = {k: v for k, v in asdict(config.amn).items() if k in _TRAINING_KEYS}
    return stage_fingerprint(config, fields, ir_labels=fingerprint_digest(ir_record),
                             trunk=trunk, arch=[config.model.arch, config.model.width,
                                                config.model.output_stride])


def train_amn(config: Config, layout: VOCLayout, ir_folder: LabelFolder, ids: Sequence[str],
              *, progress: bool = True, hooks: Sequence[HookBase] = ()
              ) -> tuple[Path, dict[str, Any]]:
    """Train (or resume) AMN on the IR labels of `ir_folder`; returns the final checkpoint
    and its fingerprint."""
    device = setup(config)
    amn, t = config.amn, config.amn.train
    net = build_amn(config, layout.num_foreground)
    stage = prepare_stage_training(
        config, layout, net, device, key=NAME, trunk=amn.trunk,
        pretrained=_amn_pretrained(config), allow_leak=config.model.pretrained_allow_leak,
        schedule=t, ids=ids, label_dir=ir_folder.directory, dataset_type=ConditionedDataset)
    groups = net.param_groups(t.lr, amn.head_lr_mult, t.weight_decay)
    optimizer = OPTIMIZERS.get(amn.optimizer)(groups, t)  # type: ignore[arg-type]
    fingerprint = amn_fingerprint(config, ir_folder.record, stage.trunk)
    paths = RunPaths(RunPaths(config.output_path).refinement(NAME))
    checkpoint = fit(AMNTask(net, stage.dataset, amn, device, config.seed), optimizer,
                     schedule=t, seed=config.seed, num_workers=config.data.num_workers,
                     device=device, paths=paths, fingerprint=fingerprint,
                     steps_per_epoch=stage.steps_per_epoch,
                     hooks=hooks, progress=progress)
    return checkpoint, fingerprint


# ---------------------------------------------------------------------------------------
# 3. Its maps


class MapFolder(LabelFolder):
    """A resumable folder of `.npz` maps (AMN's), by `LabelFolder`'s rule: its record
    first, each file atomic, damaged files named and redone."""

    suffix = ".npz"
    what = "map file"

    def problem(self, path: Path) -> str | None:
        return map_file_problem(path)

    def write_maps(self, image_id: str, record: MapRecord) -> None:
        save_maps(self.path(image_id), record)


@torch.inference_mode()
def amn_logits(net: AMN, images: Tensor, labels: Tensor, scales: Sequence[float],
               flip: bool) -> Tensor:
    """AMN's logits (B, 1 + C, H, W) at the images' size, averaged over `scales` and, per
    scale, over the image and its mirror (flipped back): the reference's make_amn_cam."""
    def conditioned(x: Tensor) -> Tensor:  # an image and its mirror share their labels
        return net(x, labels.repeat(x.shape[0] // labels.shape[0], 1))

    return multi_scale_logits(conditioned, images, scales=scales, flip=flip)


def _map_scales(config: Config, layout: VOCLayout) -> list[float]:
    """`infer.scales` (the CAM's, as AMN makes its maps at cam_scales) times the dataset's
    upscaling factor, which AMN trained at."""
    factor = dataset_scale(config.data, layout)
    return [round(float(s) * factor, 6) for s in config.infer.scales]


def make_amn_maps(config: Config, layout: VOCLayout, ir_folder: LabelFolder,
                  checkpoint: Path, fingerprint: dict[str, Any], ids: Sequence[str],
                  identity: dict[str, Any], progress: bool) -> MapFolder:
    """AMN's maps of every image of `ids` not yet made (OUT/refine/amn/maps/<split>/)."""
    split, amn = config.labels.split, config.amn
    scales = _map_scales(config, layout)
    folder = MapFolder(RunPaths(config.output_path).refinement(NAME) / "maps" / split, {
        "kind": "amn_maps", "maps": identity, "checkpoint": checkpoint.name,
        "amn": fingerprint_digest(fingerprint), "scales": scales, "flip": config.infer.flip,
        "raw_on_background": amn.raw_on_background,
        "ir_labels": fingerprint_digest(ir_folder.record)})
    with folder.share(ids) as todo:
        if todo:
            _amn_images(config, layout, ir_folder, folder, fingerprint, scales, todo,
                        progress)
    return folder


def _amn_images(config: Config, layout: VOCLayout, ir_folder: LabelFolder,
                folder: MapFolder, fingerprint: dict[str, Any], scales: Sequence[float],
                todo: Sequence[str], progress: bool) -> None:
    split, amn = config.labels.split, config.amn
    device = setup(config)
    _, ckpt = load_finished_checkpoint(
        RunPaths(config.output_path).refinement(NAME) / "checkpoints", fingerprint,
        "cpal refine")
    net = build_amn(config, layout.num_foreground)
    net.load_state_dict(ckpt.model)
    net.to(device).eval()
    dataset = InferenceDataset(layout, todo)
    loader = DataLoader(dataset, batch_sampler=SameSizeBatchSampler(
        dataset.sizes(), config.infer.batch_size), num_workers=config.data.num_workers)
    bar = Progress(len(todo), f"AMN maps {split}", enabled=progress)
    for batch in loader:
        images, labels = batch["image"].to(device), batch["label"].to(device)
        with autocast(device, amn.train.precision):
            logits = amn_logits(net, images, labels, scales, config.infer.flip)
        for i, image_id in enumerate(batch["id"]):
            present = torch.nonzero(labels[i] > 0.5).flatten() + 1
            keep = None
            if amn.raw_on_background:
                ir = load_mask(ir_folder.path(image_id), layout.num_classes)
                keep = torch.from_numpy(ir == 0)
            maps = amn_maps(logits[i], present, keep).cpu().numpy()
            folder.write_maps(image_id, MapRecord(
                classes=present.cpu().numpy().astype(np.int64), maps=maps[1:],
                background=maps[0]))
        bar.update(len(batch["id"]))
    bar.close()


# ---------------------------------------------------------------------------------------
# The method


def _amn_text(config: Config) -> str:
    amn, m = config.amn, config.model
    return (f"AMN ({m.arch} x{m.width:g}, trunk {amn.trunk}, label smoothing {amn.eps:g}, "
            f"{amn.train.epochs} epochs) on IRN's IR labels (fg {config.irn.fg_threshold:g} / "
            f"bg {config.irn.bg_threshold:g}); its maps' IR labels (fg {amn.fg_threshold:g} / "
            f"bg {amn.bg_threshold:g}, CRF {amn.crf_preset}; unsure 255)")


def amn_provenance(config: Config, identity: dict[str, Any]) -> Provenance:
    irn = config.irn
    return walk_provenance(config, identity, (
        f"{_amn_text(config)}; IRNet boundary (trunk {irn.trunk}, {irn.train.epochs} epochs); "
        f"random walk of maps^{config.amn.power:g}, {walk_text(irn)}"))


def _amn_ir_provenance(config: Config, identity: dict[str, Any], scales: Sequence[float]
                       ) -> Provenance:
    amn = config.amn
    inference = f"{identity['inference']}; AMN maps {describe_inference(scales, config.infer.flip)}"
    return Provenance(source_text("labels", identity), inference,
                      ChosenThreshold(amn.fg_threshold, "fixed", applied_to=config.labels.split),
                      _amn_text(config))


def _refine_amn(config: Config, layout: VOCLayout, progress: bool,
                hooks: Sequence[HookBase] = ()) -> dict[str, Any]:
    """The six steps; `hooks` reach both trainings (AMN's, then IRNet's)."""
    split, amn = config.labels.split, config.amn
    paths = RunPaths(config.output_path)
    root = paths.refinement(NAME)
    source, source_provenance, ids = make_ir_labels(config, layout, progress,
                                                    directory=root / "ir_labels" / split)
    checkpoint, fingerprint = train_amn(config, layout, source, ids, progress=progress,
                                        hooks=hooks)
    _, identity = map_paths(config, layout, split)
    maps = make_amn_maps(config, layout, source, checkpoint, fingerprint, ids, identity,
                         progress)
    pairs = [(i, maps.path(i)) for i in ids]
    maps_digest = fingerprint_digest(maps.record)
    ir_provenance = _amn_ir_provenance(config, identity, maps.record["scales"])
    params = IRLabelParams(amn.fg_threshold, amn.bg_threshold, PRESETS[amn.crf_preset])
    ir_folder = write_ir_labels(
        config, layout, pairs, root / "amn_ir_labels" / split, params,
        {"maps": identity, "amn_maps": maps_digest, "provenance": ir_provenance.to_dict()},
        f"AMN IR labels {split}", progress)
    irnet_root = root / "irn"
    irnet, irnet_fingerprint = train_irn(config, layout, ir_folder, ids, root=irnet_root,
                                         keys=NETWORK_KEYS, progress=progress, hooks=hooks)
    folder = LabelFolder(paths.refined(NAME, split), {
        "kind": NAME, "maps": identity, "amn_maps": maps_digest, "power": amn.power,
        **walk_record(config, irnet, irnet_fingerprint),
        "provenance": amn_provenance(config, identity).to_dict()})
    plan = WalkPlan(folder, dict(pairs), irnet_root, irnet_fingerprint, power=amn.power)
    folder, ids = walk_split(config, layout, plan, progress)
    provenance = Provenance.from_dict(folder.record["provenance"])
    return {
        "labels": evaluate_labels(layout, split, ids, folder.directory, provenance).to_dict(),
        "ir_labels": ir_label_scores(layout, split, ir_folder, ids, ir_provenance),
        "source_ir_labels": ir_label_scores(layout, split, source, ids, source_provenance),
        "checkpoint": checkpoint.name,
        "irnet_checkpoint": irnet.name,
    }


def check_amn(config: Config, layout: VOCLayout) -> None:
    """AMN's trunk and IRNet's, before any training."""
    if config.irn.calibration != "fixed":
        raise ConfigError("'irn.calibration': seeds is built for refine.method=irn; AMN's "
                          "thresholds are its reference's, fixed (irn.calibration=fixed)")
    check_irnet(config, layout)  # a ResNet model.arch, IRNet's trunk source
    check_trunk(config, config.amn.trunk, _amn_pretrained(config), NAME, config.model.arch,
                config.model.width)


register_refinement(RefinementMethod(
    NAME, "AMN: a label-conditioned per-pixel classifier on IR labels, its maps, then IRN",
    run=_refine_amn, check=check_amn))
