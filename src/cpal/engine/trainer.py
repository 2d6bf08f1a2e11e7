"""The training loop every trainer shares, with hooks (Detectron2's pattern).

`Trainer` owns what does not depend on the model: the sample order of each epoch, the
global batch cut into per-process micro-batches (`BatchPlan`), gradient accumulation,
precision (autocast, fp16's gradient scaler), clipping, the learning-rate schedule, DDP, the
resume point and exact resume. What does depend on it is a `TrainTask`: the network, its
dataset and the loss of one micro-batch. Everything around the loop (checkpoints, the
JSONL log, progress, the CPAL bank, a test's kill) is a hook (`cpal.engine.hooks`)
called at six points:
before/after the run, each epoch and each optimizer step, in the order given.

Exact resume: the sample order of an epoch comes from a generator seeded by (seed, epoch)
and each sample's augmentation from (seed, epoch, index) (the dataset's job), the global
generator (stochastic depth) is seeded by (seed, step, process, micro-batch), so a run
resumed from a checkpoint (at an epoch's end, or inside an epoch: its consumed global
batches are skipped) replays the rest exactly as an uninterrupted run would.

Scale: `train.batch_size` is the global batch. Each global batch (the same images whatever
the number of processes) is cut into contiguous slices, one per process and micro-batch;
the task weights each slice's loss by its share of the global batch, so the summed
gradient is the global batch's gradient.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader

from cpal.config import LoopConfig
from cpal.engine import distributed
from cpal.engine.checkpoint import Checkpoint
from cpal.engine.distributed import Ranks
from cpal.engine.hooks import HookBase, standard_hooks, truncate_log
from cpal.engine.identity import check_fingerprint, load_shared_checkpoint, resume_point
from cpal.engine.optim import schedule_lr
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import autocast, derived_seed
from cpal.errors import CheckpointError, ConfigError, warn
from cpal.log import get_logger

_log = get_logger(__name__)


# ---------------------------------------------------------------------------------------
# Schedule and batches


def run_epochs(train: LoopConfig, steps_per_epoch: int) -> int:
    """Whole epochs of a run: `train.epochs`, or enough to reach `train.steps` updates."""
    if train.steps is None:
        return train.epochs
    return max(1, math.ceil(train.steps / steps_per_epoch))


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

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------
# What a trainer trains, and what it calls


class EpochDataset(Protocol):
    """A training set whose augmentation depends on (seed, epoch, index) only."""

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> dict[str, Any]: ...

    def set_epoch(self, epoch: int) -> None: ...


class TrainTask(Protocol):
    """The model-specific part of a training run (CAM now; DeepLab and IRN next)."""

    net: nn.Module
    """The network trained and checkpointed (never wrapped in DDP)."""
    dataset: EpochDataset

    def loss(self, model: nn.Module, item: dict[str, Any], batch: Sequence[int]
             ) -> tuple[Tensor, dict[str, Tensor]]:
        """The loss of micro-batch `item` of global batch `batch` (dataset indices),
        weighted by its share of the global batch, and its terms for the log. `model` is
        what forward is called on: `net`, or DDP around it. Runs under autocast."""
        ...


@dataclass(frozen=True)
class StepResult:
    """One optimizer step: the global batch's loss and its terms (the same numbers on
    every process), and whether the update was applied (False: fp16's gradient scaler
    found inf/NaN gradients and skipped it, the same answer on every process)."""

    losses: dict[str, float]
    applied: bool


@dataclass(frozen=True)
class EpochSummary:
    """What an epoch did (the images of this process's session of it)."""

    epoch: int  # 1-based
    step: int
    mean_loss: float
    images_per_s: float
    seconds: float
    skipped: int | None = None  # steps the gradient scaler skipped (None: no scaler)

    def to_dict(self) -> dict[str, Any]:
        row: dict[str, Any] = {"epoch": self.epoch, "step": self.step,
                               "mean_loss": self.mean_loss,
                               "images_per_s": self.images_per_s, "seconds": self.seconds}
        if self.skipped is not None:
            row["skipped_steps"] = self.skipped
        return row


# ---------------------------------------------------------------------------------------
# The loop


class Trainer:
    """Runs a `TrainTask` for `epochs` epochs of `steps_per_epoch` global batches.

    Under torchrun every process runs one; rank 0 alone writes (its hooks decide), and
    every process loads the checkpoint rank 0 chose."""

    def __init__(
        self,
        task: TrainTask,
        optimizer: torch.optim.Optimizer,
        *,
        train: LoopConfig,
        seed: int,
        num_workers: int,
        device: torch.device,
        paths: RunPaths,
        meta: dict[str, Any],
        epochs: int,
        steps_per_epoch: int,
        hooks: Sequence[HookBase] = (),
    ) -> None:
        self.task, self.optimizer, self.settings = task, optimizer, train
        self.seed, self.num_workers, self.device, self.paths = seed, num_workers, device, paths
        self.epochs, self.steps_per_epoch = epochs, steps_per_epoch
        self.total_steps = steps_per_epoch * epochs
        self.ranks: Ranks = distributed.ranks()
        self.plan = BatchPlan(train.batch_size, self.ranks.world_size, train.grad_accum)
        self.scaler = torch.amp.GradScaler(device.type, enabled=train.precision == "fp16")
        self.meta = {**meta, "epochs": epochs}
        self.position = Position()
        self.latest: Path | None = None
        """The newest checkpoint: resumed from, then each one written."""
        self.model: nn.Module = task.net  # DDP around it once training starts
        self.epoch = self.position.epoch
        self.step_result: StepResult | None = None
        self.epoch_summary: EpochSummary | None = None
        self._epoch_images = 0
        self._epoch_start = 0.0
        self.hooks = list(hooks)
        for hook in self.hooks:
            hook.trainer = self

    @property
    def finished(self) -> bool:
        return self.position.epoch >= self.epochs

    @property
    def last_epoch(self) -> bool:
        """Whether epoch `epoch` is the run's last."""
        return self.epoch + 1 == self.epochs

    def images_per_second(self) -> float:
        """This process's session of the current epoch so far."""
        return self._epoch_images / (time.perf_counter() - self._epoch_start)

    # ------------------------------------------------------------------------------ resume

    def resume(self, fingerprint: dict[str, Any], *, allowed: bool) -> None:
        """Continue from the newest complete checkpoint when there is one (made with
        `fingerprint`, else refused); name every damaged newer one (never a silent
        fall-back). `allowed=False` (train.resume) refuses an existing run instead."""
        # Rank 0 picks the checkpoint for everyone: processes resuming from different ones
        # would run different numbers of steps and wait for each other forever.
        latest, damaged = distributed.main_value(resume_point(self.paths.checkpoints))
        if (latest is not None or damaged) and not allowed:
            raise CheckpointError(
                f"{self.paths.checkpoints}: holds checkpoints of an earlier run; set "
                "train.resume=true to continue it or choose another output_dir"
            )
        if latest is not None:
            self.position = self._restore(latest, fingerprint)
            self.latest = latest
        self.epoch = self.position.epoch
        if self.ranks.is_main:
            since = latest.name if latest is not None else "the start"
            for damage in damaged:
                warn(f"{damage.describe()}; training continues from {since} and redoes the "
                     "steps after it")
            # Rows after the resume point are redone (all of them when starting over).
            truncate_log(self.paths.train_log, self.position.step, since)
            if latest is not None and not self.finished:
                _log.info("resuming from %s (epoch %d/%d, step %d)", latest.name,
                          self.position.epoch, self.epochs, self.position.step)

    def _restore(self, path: Path, fingerprint: dict[str, Any]) -> Position:
        """Load checkpoint `path` into the network, optimizer and gradient scaler."""
        ckpt = load_shared_checkpoint(path)
        check_fingerprint(path, ckpt, fingerprint)
        self.task.net.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            self.optimizer.load_state_dict(ckpt.optimizer)
        if "grad_scaler" in ckpt.meta:
            self.scaler.load_state_dict(ckpt.meta["grad_scaler"])
        return Position.of(ckpt)

    # ------------------------------------------------------------------------------ train

    def train(self) -> Path | None:
        """Run the remaining epochs; return the newest checkpoint."""
        self.model = distributed.wrap(self.task.net, self.device)
        self._call("before_train")
        for epoch in range(self.position.epoch, self.epochs):
            self.epoch = epoch
            self._call("before_epoch")
            self._run_epoch(epoch)
            self._call("after_epoch")
        self._call("after_train")
        return self.latest

    def _call(self, event: str) -> None:
        for hook in self.hooks:
            getattr(hook, event)()

    def _run_epoch(self, epoch: int) -> None:
        """Train epoch `epoch` from `position` (its start, or a mid-epoch checkpoint)."""
        t, position = self.settings, self.position
        dataset = self.task.dataset
        dataset.set_epoch(epoch)
        order = epoch_order(len(dataset), self.seed, epoch)
        batches = [order[i * t.batch_size : (i + 1) * t.batch_size]
                   for i in range(len(order) // t.batch_size)]
        # This process's micro-batches of the global batches not yet done, in order.
        rank = self.ranks.rank
        mine = [s for batch in batches[position.batch :] for s in self.plan.slices(batch, rank)]
        loader = DataLoader(
            dataset, batch_sampler=mine, num_workers=self.num_workers,  # type: ignore[arg-type]
            pin_memory=self.device.type == "cuda",
        )
        self.model.train()
        self._epoch_images, self._epoch_start = 0, time.perf_counter()
        micro: list[dict[str, Any]] = []
        for item in loader:
            micro.append(item)
            if len(micro) < t.grad_accum:
                continue
            self._call("before_step")
            result = self._optimizer_step(micro, batches[position.batch], position.step)
            micro = []
            position.batch += 1
            position.step += 1  # a skipped update is still a step of the schedule
            if not result.applied:
                position.skipped += 1
            position.loss_sum += result.losses["loss"] * t.batch_size
            position.images += t.batch_size
            self._epoch_images += t.batch_size
            self.step_result = result
            self._call("after_step")
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_summary = EpochSummary(
            epoch=epoch + 1, step=position.step,
            mean_loss=round(position.loss_sum / max(position.images, 1), 6),
            images_per_s=round(self._epoch_images / elapsed, 2), seconds=round(elapsed, 2),
            skipped=position.skipped if self.scaler.is_enabled() else None,
        )
        self.position = Position(epoch=epoch + 1, step=position.step)

    def _optimizer_step(
        self, micro: list[dict[str, Any]], batch: Sequence[int], step: int
    ) -> StepResult:
        """One update on a global batch from this process's micro-batches of it."""
        t = self.settings
        for group in self.optimizer.param_groups:
            group["lr"] = schedule_lr(t, group["base_lr"], step, self.total_steps,
                                      self.steps_per_epoch)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, Tensor] = {}
        for i, item in enumerate(micro):
            # Layers that draw from the global generator (ViT's stochastic depth) get a
            # state fixed by (seed, step, process, micro-batch): a resumed run draws what
            # an uninterrupted one would have drawn.
            torch.manual_seed(derived_seed(self.seed, step, self.ranks.rank, i))
            with distributed.no_sync(self.model, sync=i == len(micro) - 1):
                with autocast(self.device, t.precision):
                    loss, parts = self.task.loss(self.model, item, batch)
                # DDP averages gradients over processes, while the shares already sum to
                # one over all of them: scale back up by the process count.
                self.scaler.scale(loss * self.ranks.world_size).backward()
            for key, value in parts.items():
                sums[key] = sums[key] + value.detach() if key in sums else value.detach()
        if t.grad_clip:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.task.net.parameters(), t.grad_clip)
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        # The scaler lowers its scale exactly when it skipped the update (always 1.0 when off).
        applied = self.scaler.get_scale() >= scale
        terms = torch.stack(list(sums.values())).float()
        values = distributed.all_reduce_sum(terms).tolist()
        return StepResult({"loss": sum(values), **dict(zip(sums, values, strict=True))},
                          applied)


def fit(task: TrainTask, optimizer: torch.optim.Optimizer, *, schedule: LoopConfig,
        seed: int, num_workers: int, device: torch.device, paths: RunPaths,
        fingerprint: dict[str, Any], steps_per_epoch: int, meta: dict[str, Any] | None = None,
        task_hooks: Sequence[HookBase] = (), hooks: Sequence[HookBase] = (),
        progress: bool = True, on_resumed: Callable[[], None] | None = None) -> Path:
    """Train `task` to the end of `schedule`, resuming from the newest checkpoint under
    `paths` made with `fingerprint`; `task_hooks` run before the standard ones, `hooks`
    after them (a test's `Interrupt`); `on_resumed` once the resume point is accepted
    (what a run records only when the folder is its own). Returns the final checkpoint's
    marker: what a trainer for a new network calls (docs/development.md)."""
    trainer = Trainer(
        task, optimizer, train=schedule, seed=seed, num_workers=num_workers, device=device,
        paths=paths, meta={"fingerprint": fingerprint, **(meta or {})},
        epochs=run_epochs(schedule, steps_per_epoch), steps_per_epoch=steps_per_epoch,
        hooks=[*task_hooks, *standard_hooks(schedule, progress=progress), *hooks],
    )
    trainer.resume(fingerprint, allowed=schedule.resume)
    if on_resumed is not None:
        on_resumed()
    if trainer.finished:
        distributed.barrier()
    else:
        trainer.train()
    assert trainer.latest is not None
    return trainer.latest
