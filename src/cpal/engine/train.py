"""Train the CAM network (cam, sipe, cpal-*): the CAM task of the shared trainer.

`CAMTask` is what depends on the network: the training crops, the classification loss
plus, for methods with a prototype branch, L_self and L_fda, each weighted by the
micro-batch's share of the global batch (`LossShare`). `BankHook` keeps the CPAL support
bank in step with the optimizer. The loop itself (batches, accumulation, precision, DDP,
exact resume) is `cpal.engine.trainer.Trainer`; checkpoints, the log and progress are its
standard hooks.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from cpal.config import Config, TrainConfig
from cpal.data.datasets import ClassificationDataset
from cpal.data.images import image_size
from cpal.data.source import image_scale, open_dataset
from cpal.data.transforms import TrainTransform
from cpal.engine import distributed
from cpal.engine.distributed import unwrap
from cpal.engine.hooks import HookBase, TensorBoardHook
from cpal.engine.identity import training_fingerprint
from cpal.engine.optim import build_optimizer
from cpal.engine.output_dir import claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import check_precision, setup
from cpal.engine.trainer import BatchPlan, fit, run_epochs
from cpal.errors import ConfigError, DatasetError, warn
from cpal.io import write_text_atomic
from cpal.log import get_logger
from cpal.models.cam_net import LocalisationNet, build_network, classification_loss
from cpal.prototypes.module import CPALModule
from cpal.prototypes.pacam import self_supervision_loss

_log = get_logger(__name__)


@dataclass(frozen=True)
class LossShare:
    """A micro-batch's share of its global batch, weighting each loss term so that the sum
    over micro-batches and processes is the global batch's loss (and gradient).

    L_cls is a mean over images. L_self under `loss.self_average: all` (SIPE) is a mean over
    every channel and pixel, i.e. over images too; under `present` a mean over background +
    present-class channels, so its share is the micro-batch's fraction of those channels.
    L_fda (off by default) is a mean over soft region weights known only after the forward;
    it is weighted by the image share, i.e. a mean of micro-batch means.
    """

    images: float = 1.0
    channels: float = 1.0


def compute_loss(
    model: nn.Module, images: torch.Tensor, labels: torch.Tensor, config: Config,
    share: LossShare = LossShare(), sample_ids: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_cls + lambda_self L_self + lambda_fda L_fda (the last two for prototype methods);
    L_cls is one multilabel soft margin term per image score the network trains (the CAM
    net's one; MCTformer's class tokens and patch CAM; none on frozen CLIP-ES).

    `model` is a localisation network or a DistributedDataParallel around one; `sample_ids` (dataset
    indices) let the support bank record which image each entry came from; `valid`
    (B, H, W) marks the image pixels of each crop (the rest is padding)."""
    with_cpal = unwrap(model).cpal is not None
    out = model(images, labels, sample_ids, valid) if with_cpal else model(images)
    parts = {name: classification_loss(scores.float(), labels) * share.images
             for name, scores in out.scores.items()}
    if out.cpal is not None:
        self_loss = out.cpal.losses["self"]
        if config.loss.self_detach_cam:
            c = out.cpal
            self_loss = self_supervision_loss(c.cam_norm.detach(), c.pacam, c.valid,
                                              config.loss.self_average)
        self_share = share.images if config.loss.self_average == "all" else share.channels
        parts["self"] = config.loss.self_weight * self_loss.float() * self_share
        if "fda" in out.cpal.losses:
            fda = out.cpal.losses["fda"].float()
            parts["fda"] = config.alignment.loss_weight * fda * share.images
    total = torch.stack(list(parts.values())).sum()
    return total, parts


def channel_count(labels: torch.Tensor) -> int:
    """Background + present-class channels of a batch: what L_self averages over under
    `loss.self_average: present`."""
    return int(labels.shape[0] + (labels > 0.5).sum())


def crop_geometry(
    train: TrainConfig, long_sides: Sequence[int], scale: float = 1.0
) -> tuple[int, tuple[int, int]]:
    """(crop size, resize_long range) with "auto" resolved from the training images' long
    sides (times `scale`, the dataset's upscaling): the crop is their median rounded up to
    a multiple of 16, the range [0.875, 1.25] x the median (a 128-px dataset gets
    [112, 160] and 128)."""
    median = float(np.median(np.asarray(long_sides))) * scale if len(long_sides) else 0.0
    if train.crop_size == "auto":
        crop = max(16, int(math.ceil(median / 16) * 16))
    else:
        crop = int(train.crop_size)
    if train.resize_long == "auto":
        lo, hi = max(1, round(0.875 * median)), max(1, round(1.25 * median))
    else:
        lo, hi = int(train.resize_long[0]), int(train.resize_long[1])
    return crop, (lo, hi)


class CAMTask:
    """The CAM network on image-level labels: one micro-batch's weighted loss."""

    def __init__(self, config: Config, net: LocalisationNet, dataset: ClassificationDataset,
                 device: torch.device) -> None:
        self.config, self.net, self.dataset, self.device = config, net, dataset, device

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        t = self.config.train
        share = LossShare(images=len(item["label"]) / t.batch_size,
                          channels=channel_count(item["label"])
                          / channel_count(self.dataset.labels[list(batch)]))
        images = item["image"].to(self.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = item["label"].to(self.device, non_blocking=True)
        valid = item["valid"].to(self.device, non_blocking=True)
        return compute_loss(model, images, labels, self.config, share, item.get("index"),
                            valid)

    def hooks(self) -> list[HookBase]:
        """The bank's hook for networks with a prototype branch (before the checkpoints)."""
        return [BankHook(self.net.cpal)] if self.net.cpal is not None else []


class BankHook(HookBase):
    """The CPAL support bank in step with the optimizer: the prototypes of all micro-batches
    and processes enter it once per step (in the global batch's order), none of a step the
    gradient scaler skipped, and the final bank's context is built before the last save."""

    def __init__(self, module: CPALModule) -> None:
        self.module = module

    def before_train(self) -> None:
        self.module.defer_bank_updates = True

    def after_step(self) -> None:
        result = self.trainer.step_result
        assert result is not None
        if result.applied:
            self.module.flush_bank()
        else:
            # A skipped step leaves no trace: its prototypes may be inf/NaN (an fp16
            # overflow), and one NaN entry would spoil the bank's k-means context for good.
            self.module.discard_pending()

    def after_epoch(self) -> None:
        if self.trainer.last_epoch:
            # Inference uses the stored context: build it from the final bank.
            self.module.refresh_context()


@distributed.collective
def train(config: Config, *, progress: bool = True, hooks: Sequence[HookBase] = ()) -> Path:
    """Train (or resume) and return the final checkpoint's JSON path. `hooks` run after
    the standard ones (e.g. `cpal.engine.hooks.Interrupt` in tests).

    Under torchrun every process calls this; rank 0 alone writes checkpoints, logs and the
    config, and the others wait for it at a barrier.
    """
    paths = RunPaths(config.output_path)
    device = setup(config)
    claim_output_dir_everywhere(config)
    ranks = distributed.ranks()
    t = config.train
    check_precision(config, device, "train.precision", t.precision)
    with distributed.main_first():  # rank 0 fills the dataset cache; the others reuse it
        layout = open_dataset(config.data)
    layout.check(config.data.train_split)  # every image present: fail now, not mid-epoch
    BatchPlan(t.batch_size, ranks.world_size, t.grad_accum)  # refuses an uneven split now
    ids = layout.split_ids(config.data.train_split)
    auto = "auto" in (t.crop_size, t.resize_long) or config.data.min_long_side is not None
    sides = [max(image_size(layout.image_path(i))) for i in ids] if auto else []
    scale = image_scale(config.data.min_long_side, sides)
    crop, resize = crop_geometry(t, sides, scale)
    transform = TrainTransform(crop, resize, t.hflip)
    dataset = ClassificationDataset(layout, config.data.train_split, transform, config.seed)
    _check_same_dataset(dataset, layout.root, config.data.train_split)
    steps_per_epoch = len(dataset) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"'train.batch_size': {t.batch_size} exceeds the {len(dataset)} images of split "
            f"'{config.data.train_split}'"
        )
    epochs = run_epochs(t, steps_per_epoch)
    if ranks.is_main and (auto or t.steps is not None):
        _log.info("train: images x%.3g, crop %d, resize_long %s, %d epochs of %d steps "
                  "(split '%s', %d images)", scale, crop, list(resize), epochs,
                  steps_per_epoch, config.data.train_split, len(dataset))

    net, report = build_network(config, layout.num_foreground,
                                class_names=layout.class_names[1:])
    has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in net.modules())
    if config.model.frozen_bn and not config.model.pretrained and has_bn and ranks.is_main:
        warn("model.frozen_bn=true without model.pretrained: BatchNorm keeps its initial "
             "statistics (an identity); set model.frozen_bn=false to train from scratch")
    if report is not None and ranks.is_main:
        _log.info("pretrained: %s", report.summary())
    net.to(device)
    if t.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, config)
    task = CAMTask(config, net, dataset, device)
    fingerprint = training_fingerprint(config)
    extra = [TensorBoardHook(t, paths.tensorboard)] if config.log.tensorboard else []

    def record_config() -> None:  # only once the folder's checkpoints are this run's
        if ranks.is_main:
            write_text_atomic(paths.config, config.to_yaml())

    return fit(task, optimizer, schedule=t, seed=config.seed,
               num_workers=config.data.num_workers, device=device, paths=paths,
               fingerprint=fingerprint, steps_per_epoch=steps_per_epoch,
               meta={"class_names": list(layout.class_names), "image_scale": scale},
               task_hooks=task.hooks(), hooks=[*extra, *hooks], progress=progress,
               on_resumed=record_config)


def _check_same_dataset(dataset: ClassificationDataset, root: Path, split: str) -> None:
    """Every process must cut its batches from the same ids and labels: node-local copies
    of a dataset that differ would make them run different steps and wait for each other
    forever. Compared by SHA-256; a mismatch stops every process."""
    digest = hashlib.sha256("\n".join(dataset.ids).encode())
    digest.update(dataset.labels.numpy().tobytes())
    if not distributed.same_everywhere(digest.hexdigest()):
        raise DatasetError(
            f"{root}: split '{split}' (its ids or labels) differs between the torchrun "
            "processes; every node needs the same dataset"
        )


