"""Optimizers and schedules by name: the poly schedule unchanged, timm's cosine with a
linear warm-up, DeiT's linear learning-rate scaling, timm's no-decay groups, and
checkpoints of runs made before these keys existed."""

import math
from pathlib import Path

import pytest
import torch

from cpal.config import load_config
from cpal.engine.identity import training_fingerprint
from cpal.engine.optim import build_optimizer, effective_lr, poly_lr, schedule_lr
from cpal.errors import ConfigError
from cpal.models.cam_net import build_network


def _train(*overrides):
    return load_config(None, list(overrides)).train


def test_poly_is_the_references_schedule():
    t = _train()
    assert schedule_lr(t, 0.1, 30, 100, 10) == pytest.approx(poly_lr(0.1, 30, 100, 0.9))


def test_cosine_with_warm_up_as_timm():
    t = _train("train.schedule=cosine", "train.warmup_epochs=2", "train.warmup_lr=1e-6",
               "train.min_lr=1e-5")
    base, total, per_epoch = 6.25e-5, 600, 10  # 60 epochs of 10 steps, 20 warm-up steps
    assert schedule_lr(t, base, 0, total, per_epoch) == pytest.approx(1e-6)
    assert schedule_lr(t, base, 10, total, per_epoch) == pytest.approx((1e-6 + base) / 2)
    step = 300  # after the warm-up the cosine runs over the whole run (timm's default)
    expected = 1e-5 + 0.5 * (base - 1e-5) * (1 + math.cos(math.pi * step / total))
    assert schedule_lr(t, base, step, total, per_epoch) == pytest.approx(expected)
    assert schedule_lr(t, base, total - 1, total, per_epoch) == pytest.approx(1e-5, rel=1e-3)


def test_linear_scaling_and_timm_no_decay_groups():
    cfg = load_config(None, ["method=mctformer", "model.arch=deit_tiny", "model.width=0.125",
                             "vit.depth=1", "train.optimizer=adamw", "train.lr=5e-4",
                             "train.lr_reference_batch=512", "train.batch_size=64",
                             "train.weight_decay=0.05", "train.decay_norm_and_bias=false",
                             "train.head_lr_mult=1.0"])
    assert effective_lr(cfg.train) == pytest.approx(6.25e-5)  # MCTformer's 5e-4 x 64 / 512
    net, _ = build_network(cfg, 3)
    opt = build_optimizer(net, cfg)
    assert isinstance(opt, torch.optim.AdamW)
    names = {id(p): n for n, p in net.named_parameters()}
    for group in opt.param_groups:
        assert group["base_lr"] == pytest.approx(6.25e-5)
        for p in group["params"]:
            exempt = p.ndim <= 1 or names[id(p)].endswith(("cls_token", "pos_embed"))
            assert group["weight_decay"] == (0.0 if exempt else 0.05), names[id(p)]
    decayed = sum(len(g["params"]) for g in opt.param_groups if g["weight_decay"] > 0)
    assert decayed == 4 + 1 + 1  # qkv, proj, fc1, fc2 weights; patch conv; the conv head


def test_unknown_names_and_ranges():
    with pytest.raises(ConfigError, match=r"'train.optimizer': unknown optimizer 'adamx' "
                       r"\(did you mean 'adam'\?\)"):
        _train("train.optimizer=adamx")
    with pytest.raises(ConfigError, match=r"'train\.schedule': unknown schedule 'cos'"):
        _train("train.schedule=cos")
    with pytest.raises(ConfigError, match=r"'train\.lr_reference_batch': must be >= 1"):
        _train("train.lr_reference_batch=0")


def test_checkpoints_made_before_a_key_existed_are_accepted_while_it_holds_its_default():
    """A checkpoint's record lacks the keys added after it was made (here as written by
    the version before the transformer recipes and awareness.background): the run resumes
    while they hold their defaults, and is refused, naming the key, when one is set."""
    from cpal.engine.checkpoint import Checkpoint
    from cpal.engine.identity import check_fingerprint
    from cpal.errors import CheckpointError

    current = training_fingerprint(load_config(None, []))
    stored = {k: dict(v) if isinstance(v, dict) else v for k, v in current.items()
              if k not in ("vit", "clip_es")}
    for key in ("schedule", "lr_reference_batch", "warmup_epochs", "min_lr"):
        del stored["train"][key]
    del stored["awareness"]["background"]
    old = Checkpoint(epoch=1, step=1, model={}, optimizer=None, meta={"fingerprint": stored})
    check_fingerprint(Path("epoch_001.json"), old, current)  # accepted
    for override, key in (("train.schedule=cosine", "train.schedule"),
                          ("vit.depth=2", "vit"),
                          ("awareness.background=instance", "awareness.background"),
                          ("train.lr=0.5", "train.lr")):  # a key it has, changed
        changed = training_fingerprint(load_config(None, [override]))
        with pytest.raises(CheckpointError, match=rf"made with other settings \({key}\)"):
            check_fingerprint(Path("epoch_001.json"), old, changed)
    with pytest.raises(CheckpointError, match=r"\(unknown\)"):
        check_fingerprint(Path("epoch_001.json"), Checkpoint(1, 1, {}, None, {}), current)
