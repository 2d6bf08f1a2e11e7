"""Hooks of `cpal.engine.trainer.Trainer`, and the ones every trainer uses: checkpoints,
the JSONL log, progress, and a test's kill.

`standard_hooks` gives them in their order (log rows before the checkpoint that covers
them, the checkpoint last); a trainer puts its own hooks (the CPAL bank) before them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from cpal.config import LoopConfig
from cpal.engine import distributed
from cpal.engine.checkpoint import prune_checkpoints, save_checkpoint
from cpal.errors import warn
from cpal.io import append_lines, write_text_atomic
from cpal.log import Progress, get_logger

if TYPE_CHECKING:
    from cpal.engine.trainer import Trainer

_log = get_logger(__name__)


class HookBase:
    """Called by a `Trainer` at six points; `trainer` is set when the trainer is made.

    Hooks run in the order given, so a hook that changes what a checkpoint holds (the CPAL
    bank) comes before the checkpoint hook."""

    trainer: Trainer

    def before_train(self) -> None:
        """Once, before the first step of this process's session."""

    def before_epoch(self) -> None:
        """As epoch `trainer.epoch` (0-based) starts (or resumes mid-way)."""

    def before_step(self) -> None:
        """Before each optimizer step (its micro-batches are loaded)."""

    def after_step(self) -> None:
        """After each step: `trainer.position` and `trainer.step_result` are updated."""

    def after_epoch(self) -> None:
        """After each epoch: `trainer.position` is at the next epoch's start and
        `trainer.epoch_summary` describes this one."""

    def after_train(self) -> None:
        """Once, after the last epoch (not after an error)."""



class CheckpointHook(HookBase):
    """Checkpoints at epoch ends (every `checkpoint_every` epochs, and the last) and every
    `checkpoint_every_steps` optimizer steps inside epochs; keeps the newest
    `keep_checkpoints`. Rank 0 writes, every process waits for it."""

    def __init__(self, train: LoopConfig) -> None:
        self.every_epochs = train.checkpoint_every
        self.every_steps = train.checkpoint_every_steps
        self.keep = train.keep_checkpoints

    def _due_steps(self) -> bool:
        return self.every_steps is not None and self.trainer.position.step % self.every_steps == 0

    def after_step(self) -> None:
        trainer = self.trainer
        if self._due_steps() and trainer.position.batch < trainer.steps_per_epoch:
            self.save(f"step_{trainer.position.step:08d}")

    def after_epoch(self) -> None:
        trainer = self.trainer
        if trainer.last_epoch or (trainer.epoch + 1) % self.every_epochs == 0 or self._due_steps():
            self.save(f"epoch_{trainer.position.epoch:03d}")

    def save(self, stem: str) -> Path:
        """Checkpoint the trainer's position as `stem`; return the marker's path."""
        trainer = self.trainer
        path = trainer.paths.checkpoints / f"{stem}.json"
        if trainer.ranks.is_main:
            meta = {**trainer.meta, "position": trainer.position.to_dict()}
            if trainer.scaler.is_enabled():
                meta["grad_scaler"] = trainer.scaler.state_dict()
            path = save_checkpoint(
                trainer.paths.checkpoints, epoch=trainer.position.epoch,
                step=trainer.position.step, model=trainer.task.net,
                optimizer=trainer.optimizer, meta=meta, stem=stem,
            )
            prune_checkpoints(trainer.paths.checkpoints, self.keep)
        distributed.barrier()
        trainer.latest = path
        return path


class JSONLogHook(HookBase):
    """`train_log.jsonl` (rank 0): a row every `log_every` steps (loss, its terms, lr,
    images/s) and one per epoch (mean loss, images/s, seconds, skipped steps), appended as
    they are made, so every checkpoint's steps are on disk when it is; and the epoch's
    one-line summary in the log."""

    def __init__(self, train: LoopConfig) -> None:
        self.every = train.log_every

    def _append(self, row: dict[str, Any]) -> None:
        if self.trainer.ranks.is_main:
            append_lines(self.trainer.paths.train_log, [json.dumps(row)])

    def after_step(self) -> None:
        trainer = self.trainer
        if trainer.position.step % self.every or trainer.step_result is None:
            return
        losses = trainer.step_result.losses
        self._append({
            "epoch": trainer.epoch + 1, "step": trainer.position.step,
            "loss": round(losses["loss"], 6),
            **{f"loss_{k}": round(v, 6) for k, v in losses.items() if k != "loss"},
            "lr": trainer.optimizer.param_groups[0]["lr"],
            "images_per_s": round(trainer.images_per_second(), 2),
        })

    def after_epoch(self) -> None:
        summary = self.trainer.epoch_summary
        assert summary is not None
        self._append(summary.to_dict())
        _log.info("epoch %d/%d: loss %.4f, %.1f images/s", summary.epoch, self.trainer.epochs,
                  summary.mean_loss, summary.images_per_s)


class ProgressHook(HookBase):
    """A bar over each epoch's global batches (on a terminal; rank 0). Off a terminal it
    stays silent: the epoch's log line says more."""

    def __init__(self, train: LoopConfig, *, enabled: bool) -> None:
        self.every = train.log_every
        self.enabled = enabled
        self._bar: Progress | None = None

    def before_epoch(self) -> None:
        trainer = self.trainer
        self._bar = Progress(trainer.steps_per_epoch,
                             f"train epoch {trainer.epoch + 1}/{trainer.epochs}",
                             enabled=self.enabled and trainer.ranks.is_main,
                             initial=trainer.position.batch, summary=False)

    def after_step(self) -> None:
        trainer = self.trainer
        if self._bar is None:
            return
        self._bar.update()
        if trainer.position.step % self.every == 0 and trainer.step_result is not None:
            self._bar.set_postfix(loss=f"{trainer.step_result.losses['loss']:.4f}",
                                  img_s=f"{trainer.images_per_second():.1f}")

    def after_epoch(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ScalarWriter(Protocol):
    """What `TensorBoardHook` writes to (torch.utils.tensorboard.SummaryWriter's subset)."""

    def add_scalar(self, tag: str, value: float, step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardHook(HookBase):
    """The JSONL log's numbers as TensorBoard scalars (rank 0): loss, its terms, lr and
    images/s every `log_every` steps, the mean loss per epoch (at the epoch's last step).
    `writer` defaults to a SummaryWriter in `log_dir`, made when training starts."""

    def __init__(self, train: LoopConfig, log_dir: Path, writer: ScalarWriter | None = None
                 ) -> None:
        self.every, self.log_dir, self.writer = train.log_every, log_dir, writer

    def before_train(self) -> None:
        if self.writer is None and self.trainer.ranks.is_main:
            from torch.utils.tensorboard import SummaryWriter  # optional: log.tensorboard

            self.writer = SummaryWriter(str(self.log_dir))

    def after_step(self) -> None:
        trainer, result = self.trainer, self.trainer.step_result
        if self.writer is None or result is None or trainer.position.step % self.every:
            return
        step = trainer.position.step
        for name, value in result.losses.items():
            self.writer.add_scalar(f"train/{name}", value, step)
        self.writer.add_scalar("train/lr", trainer.optimizer.param_groups[0]["lr"], step)
        self.writer.add_scalar("train/images_per_s", trainer.images_per_second(), step)

    def after_epoch(self) -> None:
        summary = self.trainer.epoch_summary
        if self.writer is not None and summary is not None:
            self.writer.add_scalar("epoch/mean_loss", summary.mean_loss, summary.step)

    def after_train(self) -> None:
        if self.writer is not None:
            self.writer.close()


class Interrupt(HookBase):
    """Raises KeyboardInterrupt, as a kill would: after `at_step` optimizer steps (before
    the next one), or as epoch `at_epoch` (0-based) starts. For tests of resume."""

    def __init__(self, *, at_step: int | None = None, at_epoch: int | None = None) -> None:
        if (at_step is None) == (at_epoch is None):
            raise ValueError("give exactly one of at_step and at_epoch")
        self.at_step, self.at_epoch = at_step, at_epoch

    def before_epoch(self) -> None:
        if self.trainer.epoch == self.at_epoch:
            raise KeyboardInterrupt

    def before_step(self) -> None:
        if self.trainer.position.step == self.at_step:
            raise KeyboardInterrupt


def standard_hooks(train: LoopConfig, *, progress: bool) -> list[HookBase]:
    """The JSONL log, progress and checkpoints, in that order."""
    return [JSONLogHook(train), ProgressHook(train, enabled=progress), CheckpointHook(train)]


def truncate_log(path: Path, step: int, since: str) -> None:
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
