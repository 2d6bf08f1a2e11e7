"""Train the CAM network: SGD with a poly schedule, checkpoints every epoch, exact resume.

Exact resume: the sample order of an epoch comes from a generator seeded by (seed, epoch)
and each sample's augmentation from (seed, epoch, index), so a run resumed from the
checkpoint of epoch k replays epochs k+1.. exactly as an uninterrupted run would.
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, RandomSampler
from tqdm import tqdm

from cpal.config import Config
from cpal.data.datasets import ClassificationDataset
from cpal.data.source import open_dataset
from cpal.data.transforms import TrainTransform
from cpal.engine.checkpoint import (
    Checkpoint,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import setup
from cpal.errors import CheckpointError, ConfigError
from cpal.io import write_text_atomic
from cpal.models.cam_net import CAMNet, build_network, classification_loss
from cpal.prototypes.pacam import self_supervision_loss

# Settings that change what is trained; a checkpoint made under other values cannot be resumed.
_RUN_INDEPENDENT = {"num_workers", "resume", "log_every", "keep_checkpoints", "checkpoint_every"}


def training_fingerprint(config: Config) -> dict[str, Any]:
    def strip(section: Any) -> dict[str, Any]:
        return {k: v for k, v in asdict(section).items() if k not in _RUN_INDEPENDENT}

    return {
        "seed": config.seed,
        "method": config.method,
        "data": strip(config.data),
        "model": strip(config.model),
        "train": strip(config.train),
        **{
            name: asdict(getattr(config, name))
            for name in ("prototype", "bank", "awareness", "alignment", "loss")
        },
    }


def compute_loss(
    model: CAMNet, images: torch.Tensor, labels: torch.Tensor, config: Config
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L = L_cls + lambda_self L_self + lambda_fda L_fda (the last two for prototype methods)."""
    out = model(images, labels if model.cpal is not None else None)
    parts = {"cls": classification_loss(out.logits, labels)}
    if out.cpal is not None:
        self_loss = out.cpal.losses["self"]
        if config.loss.self_detach_cam:
            c = out.cpal
            self_loss = self_supervision_loss(c.cam_norm.detach(), c.pacam, c.valid)
        parts["self"] = config.loss.self_weight * self_loss
        if "fda" in out.cpal.losses:
            parts["fda"] = config.alignment.loss_weight * out.cpal.losses["fda"]
    total = torch.stack(list(parts.values())).sum()
    return total, parts


def _check_fingerprint(path: Path, ckpt: Checkpoint, fingerprint: dict[str, Any]) -> None:
    if ckpt.meta.get("fingerprint") != fingerprint:
        changed = changed_keys(ckpt.meta.get("fingerprint", {}), fingerprint)
        raise CheckpointError(
            f"{path}: made with other settings ({', '.join(changed) or 'unknown'}); "
            "use another output_dir to train with these"
        )


def load_final_checkpoint(config: Config) -> tuple[Path, Checkpoint]:
    """The finished training run of this config, for inference: refuses a checkpoint made
    with other settings or one from an unfinished run."""
    directory = RunPaths(config.output_path).checkpoints
    latest = latest_checkpoint(directory)
    if latest is None:
        raise CheckpointError(f"{directory}: no checkpoint; run `cpal train` first")
    ckpt = load_checkpoint(latest)
    _check_fingerprint(latest, ckpt, training_fingerprint(config))
    if ckpt.epoch < config.train.epochs:
        raise CheckpointError(
            f"{latest}: training stopped at epoch {ckpt.epoch} of {config.train.epochs}; "
            "run `cpal train` to finish it"
        )
    return latest, ckpt


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / total) ** power


def build_optimizer(model: CAMNet, config: Config) -> torch.optim.SGD:
    t = config.train
    backbone, head = model.param_groups()
    groups = [
        {"params": backbone, "lr": t.lr, "base_lr": t.lr},
        {"params": head, "lr": t.lr * t.head_lr_mult, "base_lr": t.lr * t.head_lr_mult},
    ]
    return torch.optim.SGD(
        [g for g in groups if g["params"]], lr=t.lr, momentum=t.momentum,
        weight_decay=t.weight_decay,
    )


def train(config: Config, *, progress: bool = True) -> Path:
    """Train (or resume) and return the final checkpoint's JSON path."""
    paths = RunPaths(config.output_path)
    device = setup(config)
    t = config.train
    layout = open_dataset(config.data)
    layout.check(config.data.train_split)  # every image present: fail now, not mid-epoch
    if config.model.frozen_bn and not config.model.pretrained:
        warnings.warn(
            "model.frozen_bn=true without model.pretrained: BatchNorm keeps its initial "
            "statistics (an identity); set model.frozen_bn=false to train from scratch",
            stacklevel=2,
        )
    transform = TrainTransform(t.crop_size, (t.resize_long[0], t.resize_long[1]), t.hflip)
    dataset = ClassificationDataset(layout, config.data.train_split, transform, config.seed)
    steps_per_epoch = len(dataset) // t.batch_size
    if steps_per_epoch == 0:
        raise ConfigError(
            f"'train.batch_size': {t.batch_size} exceeds the {len(dataset)} images of split "
            f"'{config.data.train_split}'"
        )
    total_steps = steps_per_epoch * t.epochs

    model, report = build_network(config, layout.num_foreground)
    if report is not None:
        tqdm.write(f"pretrained: {report.summary()}")
    model.to(device)
    optimizer = build_optimizer(model, config)
    fingerprint = training_fingerprint(config)

    start_epoch, step = 0, 0
    latest = latest_checkpoint(paths.checkpoints)
    if latest is not None:
        if not t.resume:
            raise CheckpointError(
                f"{paths.checkpoints}: holds checkpoints of an earlier run; set "
                "train.resume=true to continue it or choose another output_dir"
            )
        ckpt = load_checkpoint(latest)
        _check_fingerprint(latest, ckpt, fingerprint)
        model.load_state_dict(ckpt.model)
        if ckpt.optimizer is not None:
            optimizer.load_state_dict(ckpt.optimizer)
        start_epoch, step = ckpt.epoch, ckpt.step
        _truncate_log(paths.train_log, start_epoch)
        if start_epoch < t.epochs:
            tqdm.write(f"resuming from {latest.name} (epoch {start_epoch}/{t.epochs})")
    write_text_atomic(paths.config, config.to_yaml())
    if start_epoch >= t.epochs:
        assert latest is not None
        return latest

    for epoch in range(start_epoch, t.epochs):
        step = _run_epoch(
            model, optimizer, dataset, config, epoch=epoch, step=step, total_steps=total_steps,
            device=device, paths=paths, progress=progress,
        )
        last = epoch + 1 == t.epochs
        if last and model.cpal is not None:
            # Inference uses the stored context: build it from the final bank.
            model.cpal.refresh_context()
        if last or (epoch + 1) % t.checkpoint_every == 0:
            latest = save_checkpoint(
                paths.checkpoints, epoch=epoch + 1, step=step, model=model, optimizer=optimizer,
                meta={"fingerprint": fingerprint, "class_names": list(layout.class_names)},
            )
            prune_checkpoints(paths.checkpoints, t.keep_checkpoints)
    assert latest is not None
    return latest


def _run_epoch(
    model: CAMNet,
    optimizer: torch.optim.Optimizer,
    dataset: ClassificationDataset,
    config: Config,
    *,
    epoch: int,
    step: int,
    total_steps: int,
    device: torch.device,
    paths: RunPaths,
    progress: bool,
) -> int:
    t = config.train
    dataset.set_epoch(epoch)
    generator = torch.Generator().manual_seed(config.seed * 100_003 + epoch)
    loader = DataLoader(
        dataset,
        batch_size=t.batch_size,
        sampler=RandomSampler(dataset, generator=generator),
        drop_last=True,
        num_workers=config.data.num_workers,
        pin_memory=device.type == "cuda",
    )
    model.train()
    bar = tqdm(loader, desc=f"train epoch {epoch + 1}/{t.epochs}", disable=not progress,
               leave=False, dynamic_ncols=True)
    loss_sum, seen, start = 0.0, 0, time.perf_counter()
    log_rows = []
    for batch in bar:
        for group in optimizer.param_groups:
            group["lr"] = poly_lr(group["base_lr"], step, total_steps, t.poly_power)
        images = batch["image"].to(device, non_blocking=True)
        labels = batch["label"].to(device, non_blocking=True)
        loss, parts = compute_loss(model, images, labels, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if t.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        optimizer.step()
        step += 1
        loss_sum += loss.item() * len(images)
        seen += len(images)
        if step % t.log_every == 0:
            rate = seen / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.1f}")
            log_rows.append(
                {"epoch": epoch + 1, "step": step, "loss": round(loss.item(), 6),
                 **{f"loss_{k}": round(v.item(), 6) for k, v in parts.items()},
                 "lr": optimizer.param_groups[0]["lr"], "images_per_s": round(rate, 2)}
            )
    elapsed = time.perf_counter() - start
    summary = {
        "epoch": epoch + 1, "step": step, "mean_loss": round(loss_sum / max(seen, 1), 6),
        "images_per_s": round(seen / elapsed, 2), "seconds": round(elapsed, 2),
    }
    log_rows.append(summary)
    paths.train_log.parent.mkdir(parents=True, exist_ok=True)
    with paths.train_log.open("a", encoding="utf-8") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in log_rows)
    tqdm.write(
        f"epoch {epoch + 1}/{t.epochs}: loss {summary['mean_loss']:.4f}, "
        f"{summary['images_per_s']:.1f} images/s"
    )
    return step


def _truncate_log(path: Path, epochs_kept: int) -> None:
    """Drop log rows of epochs after the checkpoint we resume from (they will be rerun)."""
    if not path.exists():
        return
    rows = [line for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    kept = [line for line in rows if json.loads(line).get("epoch", 0) <= epochs_kept]
    if len(kept) != len(rows):
        write_text_atomic(path, "".join(line + "\n" for line in kept))


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) settings records."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys
