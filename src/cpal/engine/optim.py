"""Optimizers and learning-rate schedules by name (`train.optimizer`, `train.schedule`).

The references train ResNet CAMs with SGD and a poly schedule (IRN, SIPE) and DeiT-based
MCTformer with AdamW and a cosine schedule after a linear warm-up (timm's recipe), so both
are entries of a registry that the trainer looks up; a new one is a function and one
registration here. A network states its parameter groups (`param_groups`: parameters and
a role); `build_optimizer` gives each role its learning rate and, when
`train.decay_norm_and_bias` is false, splits off the one-dimensional parameters
(norms, biases) and the token and position embeddings without weight decay, as timm does.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import torch
from torch import nn

from cpal.config import Config, TrainConfig
from cpal.registry import Registry

OptimizerBuilder = Callable[[list[dict[str, Any]], TrainConfig], torch.optim.Optimizer]
Schedule = Callable[[float, int, int, TrainConfig, int], float]
"""(base lr, step, total steps, train settings, steps per epoch) -> lr of that step."""

OPTIMIZERS: Registry[OptimizerBuilder] = Registry("optimizer")
SCHEDULES: Registry[Schedule] = Registry("schedule")

NO_DECAY_NAMES = ("cls_token", "pos_embed", "token_embedding", "class_embedding")
"""Embeddings timm and CLIP exclude from weight decay (besides 1-d tensors)."""


def _sgd(groups: list[dict[str, Any]], t: TrainConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(groups, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)


def _adam(groups: list[dict[str, Any]], t: TrainConfig) -> torch.optim.Optimizer:
    """Adam with the weight decay as L2 in the gradient (torch.optim.Adam's)."""
    return torch.optim.Adam(groups, lr=t.lr, weight_decay=t.weight_decay)


def _adamw(groups: list[dict[str, Any]], t: TrainConfig) -> torch.optim.Optimizer:
    """AdamW: decoupled weight decay (DeiT / MCTformer: 0.05), betas 0.9/0.999, eps 1e-8."""
    return torch.optim.AdamW(groups, lr=t.lr, weight_decay=t.weight_decay, eps=1e-8)


OPTIMIZERS.register("sgd", _sgd)
OPTIMIZERS.register("adam", _adam)
OPTIMIZERS.register("adamw", _adamw)


def poly_lr(base: float, step: int, total: int, power: float) -> float:
    return base * (1.0 - step / total) ** power


def warmup_steps(t: TrainConfig, steps_per_epoch: int) -> int:
    return round(t.warmup_epochs * steps_per_epoch)


def _warm(base: float, step: int, t: TrainConfig, steps_per_epoch: int) -> float | None:
    """Linear warm-up from `train.warmup_lr` to `base` over the first warmup steps."""
    steps = warmup_steps(t, steps_per_epoch)
    if step >= steps:
        return None
    return t.warmup_lr + (base - t.warmup_lr) * step / steps


def _poly(base: float, step: int, total: int, t: TrainConfig, steps_per_epoch: int) -> float:
    warm = _warm(base, step, t, steps_per_epoch)
    return warm if warm is not None else poly_lr(base, step, total, t.poly_power)


def _cosine(base: float, step: int, total: int, t: TrainConfig, steps_per_epoch: int) -> float:
    """timm's CosineLRScheduler without restarts: after the warm-up, min_lr + (base -
    min_lr)(1 + cos(pi step / total)) / 2, the cosine measured over the whole run
    (timm's warm-up is not a prefix), per optimizer step rather than per epoch."""
    warm = _warm(base, step, t, steps_per_epoch)
    if warm is not None:
        return warm
    return t.min_lr + 0.5 * (base - t.min_lr) * (1.0 + math.cos(math.pi * step / total))


SCHEDULES.register("poly", _poly)
SCHEDULES.register("cosine", _cosine)


class HasParamGroups(Protocol):
    def param_groups(self) -> list[tuple[list[nn.Parameter], str]]: ...

    def named_parameters(self) -> Iterable[tuple[str, nn.Parameter]]: ...


def effective_lr(t: TrainConfig) -> float:
    """train.lr, scaled by batch_size / lr_reference_batch when that is set (DeiT's
    linear scaling rule: 5e-4 at a batch of 512)."""
    if t.lr_reference_batch is None:
        return t.lr
    return t.lr * t.batch_size / t.lr_reference_batch


def role_multipliers(config: Config) -> dict[str, float]:
    """Learning-rate multiplier of each parameter role a network declares."""
    t, proto = config.train, config.prototype.lr_mult
    return {"backbone": 1.0, "head": t.head_lr_mult,
            "prototype": t.head_lr_mult if proto is None else proto}


def build_optimizer(model: HasParamGroups, config: Config) -> torch.optim.Optimizer:
    """The optimizer `train.optimizer` names over the network's parameter groups, each
    with `base_lr` (the schedule scales it) = effective lr x its role's multiplier."""
    t = config.train
    lr = effective_lr(t)
    mult = role_multipliers(config)
    names = {id(p): n for n, p in model.named_parameters()}
    groups: list[dict[str, Any]] = []
    for params, role in model.param_groups():
        base = lr * mult[role]
        if t.decay_norm_and_bias:
            groups.append({"params": params, "lr": base, "base_lr": base})
            continue
        plain = [p for p in params if not _no_decay(names.get(id(p), ""), p)]
        exempt = [p for p in params if _no_decay(names.get(id(p), ""), p)]
        groups += [{"params": ps, "lr": base, "base_lr": base, **extra}
                   for ps, extra in ((plain, {}), (exempt, {"weight_decay": 0.0})) if ps]
    return OPTIMIZERS.get(t.optimizer)(groups, t)  # every group states its own lr


def _no_decay(name: str, p: nn.Parameter) -> bool:
    return p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES


def schedule_lr(t: TrainConfig, base: float, step: int, total: int, steps_per_epoch: int
                ) -> float:
    """The learning rate of optimizer step `step` (0-based) of `total`."""
    return SCHEDULES.get(t.schedule)(base, step, total, t, steps_per_epoch)
