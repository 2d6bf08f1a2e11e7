"""Train the CAM network: SGD with a poly schedule, checkpoints, exact resume, data parallel.

Exact resume: the sample order of an epoch comes from a generator seeded by (seed, epoch)
and each sample's augmentation from (seed, epoch, index), so a run resumed from a
checkpoint (at an epoch's end, or inside an epoch: its consumed global batches are skipped)
replays the rest exactly as an uninterrupted run would.

Scale: `train.batch_size` is the global batch. Each global batch (the same images whatever
the number of processes) is cut into contiguous slices, one per process and micro-batch,
and each slice's loss terms are weighted by its share of the global batch, so the summed
gradient is the global batch's gradient (see `LossShare`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from cpal.config import Config, TrainConfig
from cpal.data.datasets import ClassificationDataset
from cpal.data.images import image_size
from cpal.data.source import open_dataset
from cpal.data.transforms import TrainTransform
from cpal.engine import distributed
from cpal.engine.checkpoint import Checkpoint, prune_checkpoints, save_checkpoint
from cpal.engine.distributed import Ranks, unwrap
from cpal.engine.identity import (
    check_fingerprint,
    load_shared_checkpoint,
    resume_point,
    training_fingerprint,
)
from cpal.engine.output_dir import claim_output_dir_everywhere
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import autocast, check_precision, setup
from cpal.errors import CheckpointError, ConfigError, DatasetError, warn
from cpal.io import append_lines, write_text_atomic
from cpal.log import Progress, get_logger
from cpal.models.cam_net import CAMNet, build_network, classification_loss
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
    """L = L_cls + lambda_self L_self + lambda_fda L_fda (the last two for prototype methods).

    `model` is a CAMNet or a DistributedDataParallel around one; `sample_ids` (dataset
    indices) let the support bank record which image each entry came from; `valid`
    (B, H, W) marks the image pixels of each crop (the rest is padding)."""
    with_cpal = unwrap(model).cpal is not None
    out = model(images, labels, sample_ids, valid) if with_cpal else model(images)
    parts = {"cls": classification_loss(out.logits.float(), labels) * share.images}
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


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / total) ** power


def run_epochs(train: TrainConfig, steps_per_epoch: int) -> int:
    """Whole epochs of a run: `train.epochs`, or enough to reach `train.steps` updates."""
    if train.steps is None:
        return train.epochs
    return max(1, math.ceil(train.steps / steps_per_epoch))


def crop_geometry(train: TrainConfig, long_sides: Sequence[int]) -> tuple[int, tuple[int, int]]:
    """(crop size, resize_long range) with "auto" resolved from the training images' long
    sides: the crop is their median rounded up to a multiple of 16, the range
    [0.875, 1.25] x the median (a 128-px dataset gets [112, 160] and 128)."""
    median = float(np.median(np.asarray(long_sides))) if len(long_sides) else 0.0
    if train.crop_size == "auto":
        crop = max(16, int(math.ceil(median / 16) * 16))
    else:
        crop = int(train.crop_size)
    if train.resize_long == "auto":
        lo, hi = max(1, round(0.875 * median)), max(1, round(1.25 * median))
    else:
        lo, hi = int(train.resize_long[0]), int(train.resize_long[1])
    return crop, (lo, hi)


def build_optimizer(model: CAMNet, config: Config) -> torch.optim.Optimizer:
    t = config.train
    proto = config.prototype.lr_mult
    mult = {"backbone": 1.0, "head": t.head_lr_mult,
            "prototype": t.head_lr_mult if proto is None else proto}
    groups = [{"params": params, "lr": t.lr * mult[role], "base_lr": t.lr * mult[role]}
              for params, role in model.param_groups()]
    if t.optimizer == "adam":
        return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def epoch_order(num_images: int, seed: int, epoch: int) -> list[int]:
    """The epoch's permutation of the training images (RandomSampler's, seeded by epoch)."""
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    return torch.randperm(num_images, generator=generator).tolist()


@dataclass(frozen=True)
class BatchPlan:
    """How a global batch is cut: a contiguous slice per process, then per micro-batch,
    so the images of a global batch never depend on the number of processes (unlike
    DistributedSampler's strided split) and bank entries keep the global batch's order."""

    batch_size: int
    world_size: int = 1
    grad_accum: int = 1

    def __post_init__(self) -> None:
        parts = self.world_size * self.grad_accum
        if self.batch_size % parts:
            raise ConfigError(
                f"'train.batch_size': {self.batch_size} does not split into "
                f"{self.world_size} processes x 'train.grad_accum' {self.grad_accum} equal "
                f"micro-batches; use a multiple of {parts}"
            )

    @property
    def micro_batch(self) -> int:
        return self.batch_size // (self.world_size * self.grad_accum)

    def slices(self, batch: Sequence[int], rank: int) -> list[list[int]]:
        """Rank `rank`'s micro-batches of one global batch, in order."""
        size = self.micro_batch
        first = rank * self.grad_accum * size
        return [list(batch[first + i * size : first + (i + 1) * size])
                for i in range(self.grad_accum)]


@dataclass
class Position:
    """Where training stands; saved with every checkpoint so a run resumes mid-epoch."""

    epoch: int = 0  # epochs completed
    batch: int = 0  # global batches done in epoch `epoch` (0 at an epoch boundary)
    step: int = 0  # optimizer steps done in the run
    loss_sum: float = 0.0  # sum of batch loss x batch images in epoch `epoch` so far
    images: int = 0  # images of epoch `epoch` so far
    skipped: int = 0  # steps of epoch `epoch` whose update fp16's gradient scaler skipped

    @classmethod
    def of(cls, ckpt: Checkpoint) -> Position:
        return cls(**ckpt.meta["position"])


@dataclass
class _Run:
    """What the epoch loop needs, gathered once by `train`."""

    config: Config
    paths: RunPaths
    net: CAMNet
    model: nn.Module  # what forward is called on: `net`, or DistributedDataParallel(net)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    dataset: ClassificationDataset
    plan: BatchPlan
    ranks: Ranks
    device: torch.device
    meta: dict[str, Any]
    total_steps: int
    epochs: int  # of the whole run (train.epochs, or derived from train.steps)
    show_progress: bool
    log_rows: list[dict[str, Any]] = field(default_factory=list)


@distributed.collective
def train(config: Config, *, progress: bool = True) -> Path:
    """Train (or resume) and return the final checkpoint's JSON path.

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
    if config.model.frozen_bn and not config.model.pretrained and ranks.is_main:
        warn("model.frozen_bn=true without model.pretrained: BatchNorm keeps its initial "
             "statistics (an identity); set model.frozen_bn=false to train from scratch")
    plan = BatchPlan(t.batch_size, ranks.world_size, t.grad_accum)
    ids = layout.split_ids(config.data.train_split)
    auto = "auto" in (t.crop_size, t.resize_long)
    sides = [max(image_size(layout.image_path(i))) for i in ids] if auto else []
    crop, resize = crop_geometry(t, sides)
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
        _log.info("train: crop %d, resize_long %s, %d epochs of %d steps (split '%s', %d "
                  "images)", crop, list(resize), epochs, steps_per_epoch,
                  config.data.train_split, len(dataset))

    net, report = build_network(config, layout.num_foreground)
    if report is not None and ranks.is_main:
        _log.info("pretrained: %s", report.summary())
    net.to(device)
    if t.channels_last:
        net.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(net, config)
    scaler = torch.amp.GradScaler(device.type, enabled=t.precision == "fp16")
    fingerprint = training_fingerprint(config)

    position = Position()
    # Rank 0 picks the checkpoint for everyone: processes resuming from different ones
    # would run different numbers of steps and wait for each other forever.
    latest, damaged = distributed.main_value(resume_point(paths.checkpoints))
    if (latest is not None or damaged) and not t.resume:
        raise CheckpointError(
            f"{paths.checkpoints}: holds checkpoints of an earlier run; set "
            "train.resume=true to continue it or choose another output_dir"
        )
    if latest is not None:
        position = _restore(latest, fingerprint, net, optimizer, scaler)
    if ranks.is_main:
        since = latest.name if latest is not None else "the start"
        for damage in damaged:  # never a silent fall-back to an older checkpoint
            warn(f"{damage.describe()}; training continues from {since} and redoes the "
                 "steps after it")
        # Rows after the resume point are redone (all of them when starting over).
        _truncate_log(paths.train_log, position.step, since)
        if latest is not None and position.epoch < epochs:
            _log.info("resuming from %s (epoch %d/%d, step %d)", latest.name, position.epoch,
                      epochs, position.step)
    if ranks.is_main:
        write_text_atomic(paths.config, config.to_yaml())
    if position.epoch >= epochs:
        distributed.barrier()
        assert latest is not None
        return latest

    if net.cpal is not None:
        # Prototypes of all micro-batches and processes enter the bank once per step.
        net.cpal.defer_bank_updates = True
    run = _Run(
        config=config, paths=paths, net=net, model=distributed.wrap(net, device),
        optimizer=optimizer, scaler=scaler, dataset=dataset, plan=plan, ranks=ranks,
        device=device,
        meta={"fingerprint": fingerprint, "class_names": list(layout.class_names),
              "epochs": epochs},
        total_steps=steps_per_epoch * epochs, epochs=epochs,
        show_progress=progress and ranks.is_main,
    )
    every = t.checkpoint_every_steps
    for epoch in range(position.epoch, epochs):
        position = _run_epoch(run, epoch, position)
        last = epoch + 1 == epochs
        if last and net.cpal is not None:
            # Inference uses the stored context: build it from the final bank.
            net.cpal.refresh_context()
        due_steps = every is not None and position.step % every == 0
        if last or (epoch + 1) % t.checkpoint_every == 0 or due_steps:
            latest = _save(run, position)
    assert latest is not None
    return latest


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


def _restore(
    path: Path, fingerprint: dict[str, Any], net: CAMNet, optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler,
) -> Position:
    """Load checkpoint `path` (made with these settings) into the network, optimizer and
    gradient scaler; return where training stood."""
    ckpt = load_shared_checkpoint(path)
    check_fingerprint(path, ckpt, fingerprint)
    net.load_state_dict(ckpt.model)
    if ckpt.optimizer is not None:
        optimizer.load_state_dict(ckpt.optimizer)
    if "grad_scaler" in ckpt.meta:
        scaler.load_state_dict(ckpt.meta["grad_scaler"])
    return Position.of(ckpt)


def _run_epoch(run: _Run, epoch: int, position: Position) -> Position:
    """Train epoch `epoch` from `position` (its start, or a mid-epoch checkpoint); return
    the position at its end."""
    config, t = run.config, run.config.train
    run.dataset.set_epoch(epoch)
    order = epoch_order(len(run.dataset), config.seed, epoch)
    batches = [order[i * t.batch_size : (i + 1) * t.batch_size]
               for i in range(len(order) // t.batch_size)]
    # This process's micro-batches of the global batches not yet done, in order.
    rank = run.ranks.rank
    mine = [s for batch in batches[position.batch :] for s in run.plan.slices(batch, rank)]
    loader = DataLoader(
        run.dataset, batch_sampler=mine, num_workers=config.data.num_workers,
        pin_memory=run.device.type == "cuda",
    )
    run.model.train()
    # No summary line: the epoch's own line below says more.
    bar = Progress(len(batches), f"train epoch {epoch + 1}/{run.epochs}",
                   enabled=run.show_progress, initial=position.batch, summary=False)
    every = t.checkpoint_every_steps
    seen, start = 0, time.perf_counter()
    micro: list[dict[str, Any]] = []
    for item in loader:
        micro.append(item)
        if len(micro) < t.grad_accum:
            continue
        losses, applied = _optimizer_step(run, micro, batches[position.batch], position.step)
        micro = []
        position.batch += 1
        position.step += 1  # a skipped update is still a step of the poly schedule
        if not applied:
            position.skipped += 1
        position.loss_sum += losses["loss"] * t.batch_size
        position.images += t.batch_size
        seen += t.batch_size
        bar.update()
        if position.step % t.log_every == 0:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{losses['loss']:.4f}", img_s=f"{rate:.1f}")
            run.log_rows.append(
                {"epoch": epoch + 1, "step": position.step, "loss": round(losses["loss"], 6),
                 **{f"loss_{k}": round(v, 6) for k, v in losses.items() if k != "loss"},
                 "lr": run.optimizer.param_groups[0]["lr"], "images_per_s": round(rate, 2)}
            )
        if every is not None and position.step % every == 0 and position.batch < len(batches):
            _save(run, position, stem=f"step_{position.step:08d}")
    bar.close()
    elapsed = time.perf_counter() - start
    summary = {
        "epoch": epoch + 1, "step": position.step,
        "mean_loss": round(position.loss_sum / max(position.images, 1), 6),
        "images_per_s": round(seen / elapsed, 2), "seconds": round(elapsed, 2),
    }
    if run.scaler.is_enabled():
        summary["skipped_steps"] = position.skipped
    run.log_rows.append(summary)
    _flush_log(run)
    _log.info("epoch %d/%d: loss %.4f, %.1f images/s", epoch + 1, run.epochs,
              summary["mean_loss"], summary["images_per_s"])
    return Position(epoch=epoch + 1, step=position.step)


def _optimizer_step(
    run: _Run, micro: list[dict[str, Any]], batch: Sequence[int], step: int
) -> tuple[dict[str, float], bool]:
    """One SGD step on a global batch from this process's micro-batches of it; returns the
    global batch's loss and its terms (the same numbers on every process), and whether the
    update was applied (False: fp16's gradient scaler found inf/NaN gradients and skipped
    it; the same answer on every process, since the gradients were all-reduced)."""
    t = run.config.train
    for group in run.optimizer.param_groups:
        group["lr"] = poly_lr(group["base_lr"], step, run.total_steps, t.poly_power)
    run.optimizer.zero_grad(set_to_none=True)
    channels = channel_count(run.dataset.labels[list(batch)])
    sums: dict[str, torch.Tensor] = {}
    for i, item in enumerate(micro):
        share = LossShare(images=len(item["label"]) / t.batch_size,
                          channels=channel_count(item["label"]) / channels)
        images = item["image"].to(run.device, non_blocking=True)
        if t.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        labels = item["label"].to(run.device, non_blocking=True)
        with distributed.no_sync(run.model, sync=i == len(micro) - 1):
            with autocast(run.device, t.precision):
                valid = item["valid"].to(run.device, non_blocking=True)
                loss, parts = compute_loss(run.model, images, labels, run.config, share,
                                           item.get("index"), valid)
            # DDP averages gradients over processes, while the shares already sum to one
            # over all of them: scale back up by the process count.
            run.scaler.scale(loss * run.ranks.world_size).backward()
        for key, value in parts.items():
            sums[key] = sums[key] + value.detach() if key in sums else value.detach()
    if t.grad_clip:
        run.scaler.unscale_(run.optimizer)
        torch.nn.utils.clip_grad_norm_(run.net.parameters(), t.grad_clip)
    scale = run.scaler.get_scale()
    run.scaler.step(run.optimizer)
    run.scaler.update()
    # The scaler lowers its scale exactly when it skipped the update (always 1.0 when off).
    applied = run.scaler.get_scale() >= scale
    if run.net.cpal is not None:
        if applied:
            run.net.cpal.flush_bank()
        else:
            # A skipped step leaves no trace: its prototypes may be inf/NaN (an fp16
            # overflow), and one NaN entry would spoil the bank's k-means context for good.
            run.net.cpal.discard_pending()
    terms = torch.stack(list(sums.values())).float()
    terms = distributed.all_reduce_sum(terms).tolist()
    return {"loss": sum(terms), **dict(zip(sums, terms, strict=True))}, applied


def _save(run: _Run, position: Position, stem: str | None = None) -> Path:
    """Checkpoint `position` (rank 0 writes, everyone waits); return the marker's path."""
    t = run.config.train
    stem = stem or f"epoch_{position.epoch:03d}"
    path = run.paths.checkpoints / f"{stem}.json"
    _flush_log(run)
    if run.ranks.is_main:
        meta = {**run.meta, "position": asdict(position)}
        if run.scaler.is_enabled():
            meta["grad_scaler"] = run.scaler.state_dict()
        path = save_checkpoint(
            run.paths.checkpoints, epoch=position.epoch, step=position.step, model=run.net,
            optimizer=run.optimizer, meta=meta, stem=stem,
        )
        prune_checkpoints(run.paths.checkpoints, t.keep_checkpoints)
    distributed.barrier()
    return path


def _flush_log(run: _Run) -> None:
    """Append the rows collected since the last flush (rank 0; the others drop theirs)."""
    if run.log_rows and run.ranks.is_main:
        append_lines(run.paths.train_log, [json.dumps(row) for row in run.log_rows])
    run.log_rows.clear()


def _truncate_log(path: Path, step: int, since: str) -> None:
    """Drop log rows after `step` (the resume point `since`: those steps are redone), and
    rows that do not parse, naming them: a torn last line is what a kill or a full disk
    during an append leaves (its steps are after the resume point, so they are redone)."""
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8", errors="replace").split("\n")
    last = max((n for n, line in enumerate(lines, start=1) if line.strip()), default=0)
    kept, dropped = [], False
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            if not isinstance(row, dict):
                raise ValueError("not an object")
        except ValueError:
            what = "torn last row" if number == last else "damaged row"
            warn(f"{path} line {number}: {what} dropped (not JSON); training continues "
                 f"from {since}")
            dropped = True
            continue
        row_step = row.get("step", 0)
        if isinstance(row_step, int) and row_step > step:
            dropped = True
            continue
        kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(line + "\n" for line in kept))
