"""Gradient accumulation, loss shares, mixed precision, channels-last and the fingerprint."""

from __future__ import annotations

import json

import pytest
import torch

from cpal.config import AlignmentConfig, AwarenessConfig, BankConfig, PrototypeConfig, load_config
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.identity import training_fingerprint
from cpal.engine.paths import RunPaths
from cpal.engine.runtime import check_precision
from cpal.engine.train import LossShare, channel_count, compute_loss
from cpal.engine.trainer import BatchPlan, epoch_order
from cpal.errors import CheckpointError, ConfigError
from cpal.methods import PrototypeBranch
from cpal.models.cam_net import build_network
from cpal.pipeline import stage_infer, stage_train
from cpal.prototypes.module import CPALModule
from tests.helpers import killed_in_second_epoch, tiny_overrides

PROTO = ["method=cpal", "bank.size=16", "bank.clusters=3",
         "bank.recluster_every=2", "awareness.top_k=2"]
# See tests/engine/test_distributed.py: frozen BN and a small learning rate make a split
# global batch comparable with the whole one.
EXACT = ["model.frozen_bn=true", "train.lr=0.001"]



def _final(cfg) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints)).model


def _log(cfg) -> list[dict]:
    lines = RunPaths(cfg.output_path).train_log.read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_batch_plan_cuts_contiguous_slices_rank_then_micro_batch():
    batch = [17, 3, 9, 0, 22, 5, 11, 8]
    plan = BatchPlan(8, world_size=2, grad_accum=2)
    assert plan.micro_batch == 2
    assert plan.slices(batch, 0) == [[17, 3], [9, 0]]
    assert plan.slices(batch, 1) == [[22, 5], [11, 8]]
    # Whatever the split, the slices in rank-then-micro order are the global batch.
    for world, accum in [(1, 1), (1, 4), (2, 1), (4, 2), (8, 1)]:
        plan = BatchPlan(8, world, accum)
        joined = [i for r in range(world) for s in plan.slices(batch, r) for i in s]
        assert joined == batch


def test_uneven_split_fails_naming_the_keys():
    with pytest.raises(ConfigError, match=r"'train\.batch_size': 16 .* 3 processes x "
                                          r"'train\.grad_accum' 2 .* multiple of 6"):
        BatchPlan(16, world_size=3, grad_accum=2)
    with pytest.raises(ConfigError, match=r"'train\.batch_size': 10 is not divisible by "
                                          r"train\.grad_accum \(4\)"):
        load_config(None, ["train.batch_size=10", "train.grad_accum=4"])


def test_epoch_order_is_random_samplers():
    from torch.utils.data import RandomSampler

    generator = torch.Generator().manual_seed(7 * 100_003 + 3)
    assert epoch_order(30, seed=7, epoch=3) == list(RandomSampler(range(30), generator=generator))


def test_micro_batch_shares_give_the_global_loss_and_gradient():
    """L_self averages over channels, so an image-count share would be wrong: a micro-batch
    with more present classes weighs more. Frozen BN keeps outputs per image independent."""
    cfg = load_config(None, ["model.arch=resnet18", "model.width=0.125", *PROTO])
    torch.manual_seed(0)
    net, _ = build_network(cfg, 4)
    net.train()
    images = torch.randn(6, 3, 48, 48)
    labels = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 1, 0, 0],
                           [1, 1, 1, 1], [0, 0, 1, 0], [0, 1, 0, 1]])
    net.cpal.defer_bank_updates = True
    for _ in range(2):  # fill the bank so the context path runs
        compute_loss(net, torch.randn_like(images), labels, cfg)
        net.cpal.flush_bank()

    def gradients(slices):
        net.zero_grad()
        total = 0.0
        for s in slices:
            share = LossShare(len(s) / 6, channel_count(labels[s]) / channel_count(labels))
            loss, _ = compute_loss(net, images[s], labels[s], cfg, share)
            loss.backward()
            total += loss.item()
        net.cpal._pending.clear()
        return total, {n: p.grad.clone() for n, p in net.named_parameters()}

    whole, g_whole = gradients([[0, 1, 2, 3, 4, 5]])
    split, g_split = gradients([[0, 1, 2], [3, 4, 5]])
    assert channel_count(labels[[0, 1, 2]]) == 3 + 5 and channel_count(labels) == 6 + 12
    # Only the summation order differs (two micro-batches vs one): rel 1e-6 is ~8 float32
    # ulps of the loss (measured <= 6e-8); gradient rounding scales with each tensor's largest
    # partial sums, so atol is relative to the tensor's max (measured <= 6e-7 of 1.34).
    assert split == pytest.approx(whole, rel=1e-6)
    for name, grad in g_whole.items():
        torch.testing.assert_close(g_split[name], grad, rtol=1e-4,
                                   atol=1e-5 * float(grad.abs().max()), msg=name)


def test_deferred_bank_matches_one_forward_over_the_whole_batch():
    def module() -> CPALModule:
        torch.manual_seed(0)
        return CPALModule((8, 16), 3, PrototypeBranch(bank=True, selection=True,
                                                      alignment=True), PrototypeConfig(),
                          BankConfig(size=8, clusters=2, recluster_every=1, kmeans_iters=3),
                          AwarenessConfig(top_k=2), AlignmentConfig())

    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(4, 8, 8, 8, generator=g), torch.randn(4, 16, 4, 4, generator=g)]
    cam = torch.randn(4, 3, 4, 4, generator=g)
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    whole = module().train()
    whole(feats, cam, labels)
    split = module().train()
    split.defer_bank_updates = True
    split([f[:1] for f in feats], cam[:1], labels[:1])
    split([f[1:] for f in feats], cam[1:], labels[1:])
    assert int(split.bank.count.sum()) == 0 and int(split.step) == 0  # nothing until flushed
    split.flush_bank()
    split.flush_bank()  # nothing pending: no second update
    # Default tolerance: the same entries enqueued in the same order and clustered from the
    # same seed (measured bit-equal); a wrong order would move entries by O(1).
    for key, value in whole.state_dict().items():
        torch.testing.assert_close(split.state_dict()[key], value, msg=key)
    assert int(split.step) == 1 and int(split.bank.count.sum()) == 4 + 7


def test_grad_accum_two_equals_one(tiny_dataset, tmp_path):
    runs = {}
    for accum in (1, 2):
        cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / f"a{accum}"), *EXACT,
                                 *PROTO, f"train.grad_accum={accum}"])
        stage_train(cfg, progress=False)
        runs[accum] = (_final(cfg), _log(cfg))
    (one, log_one), (two, log_two) = runs[1], runs[2]
    for key, value in one.items():
        if value.is_floating_point():
            # Summation order of the micro-batch gradients, through 6 SGD steps at lr 1e-3
            # (measured <= 3e-7 on weights up to 1.3, on AVX2, AVX-512 and SSE4.1 kernels).
            torch.testing.assert_close(two[key], value, rtol=1e-4, atol=1e-5, msg=key)
        else:
            assert torch.equal(two[key], value), key
    # The logged L_cls is the global batch's at every step. (L_self is not compared per
    # step: PACAM max-normalises relu(cos) by its peak + 1e-5, so a channel whose peak
    # cosine is ~1e-6 turns rounding-sized differences into different maps.)
    for a, b in zip(log_one, log_two, strict=True):
        assert (a["step"], a["epoch"]) == (b["step"], b["epoch"])
        if "loss_cls" in a:
            # ~100 float32 ulps: the same images' L_cls summed in another order (measured equal).
            assert b["loss_cls"] == pytest.approx(a["loss_cls"], rel=1e-5), a["step"]


def test_bf16_on_cpu_trains_close_to_fp32(tiny_dataset, tmp_path):
    logs = {}
    for precision in ("fp32", "bf16"):
        cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / precision),
                                 "method=sipe", "train.epochs=1",
                                 f"train.precision={precision}"])
        stage_train(cfg, progress=False)
        logs[precision] = [r for r in _log(cfg) if "loss" in r]
        assert all(torch.isfinite(v).all() for v in _final(cfg).values() if v.is_floating_point())
    fp32, bf16 = logs["fp32"], logs["bf16"]
    assert [r["step"] for r in bf16] == [1, 2, 3]
    # Same weights at step 1: only the forward's precision differs. rel 2e-2 is ~5 bf16 unit
    # roundoffs (2^-8), whatever the CPU's bf16 kernels (measured 0.15 to 0.17 % on AVX2,
    # AVX-512 and SSE4.1 oneDNN kernels).
    assert bf16[0]["loss"] == pytest.approx(fp32[0]["loss"], rel=2e-2)
    for a, b in zip(fp32, bf16, strict=True):
        # Later steps compound that gap through the SGD updates (momentum 0.9) and bf16
        # noise flips discrete seed assignments (an argmax), by amounts that depend on the
        # kernels: a loose bound that still catches a run that diverges (measured <= 12 %).
        assert b["loss"] == pytest.approx(a["loss"], rel=0.25)
        assert b["loss"] != a["loss"]  # autocast did run in bf16


def test_channels_last_trains_like_contiguous(tiny_dataset, tmp_path):
    finals = {}
    for layout in ("false", "true"):
        cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / layout), *EXACT,
                                 "train.epochs=1", f"train.channels_last={layout}"])
        stage_train(cfg, progress=False)
        finals[layout] = _final(cfg)
    for key, value in finals["false"].items():
        # NHWC runs other convolution kernels (another summation order); 3 SGD steps at lr
        # 1e-3 keep that far below the tolerance (measured <= 3e-8).
        torch.testing.assert_close(finals["true"][key], value, rtol=1e-4, atol=1e-5, msg=key)


def test_fingerprint_ignores_process_layout_but_not_precision(tiny_dataset, tmp_path):
    base = tiny_overrides(tiny_dataset, tmp_path / "run")
    plain = training_fingerprint(load_config(None, base))
    same = load_config(None, [*base, "train.grad_accum=4", "train.channels_last=true",
                              "train.checkpoint_every_steps=5"])
    assert training_fingerprint(same) == plain
    assert plain["train"]["precision"] == "fp32"  # every setting that shapes training
    bf16 = training_fingerprint(load_config(None, [*base, "train.precision=bf16"]))
    assert bf16["train"]["precision"] == "bf16"
    assert plain["prototype"]["normalize"] is True
    raw = training_fingerprint(load_config(None, [*base, "prototype.normalize=false"]))
    assert raw["prototype"]["normalize"] is False

    with pytest.raises(KeyboardInterrupt):
        stage_train(load_config(None, base), progress=False, hooks=killed_in_second_epoch())
    # Resuming with another accumulation works (1 GPU -> 2 GPUs is the same maths) ...
    stage_train(load_config(None, [*base, "train.grad_accum=2"]), progress=False)
    assert load_checkpoint(latest_checkpoint(tmp_path / "run/checkpoints")).epoch == 2
    # ... another precision does not.
    with pytest.raises(CheckpointError, match=r"other settings \(train\.precision\)"):
        stage_train(load_config(None, [*base, "train.precision=bf16"]), progress=False)



class _AlwaysScaling(torch.amp.GradScaler):
    """fp16's gradient scaler in an fp32 run: CPU autocast cannot run the prototype branch
    in fp16 (see the next test), and the skipping logic does not depend on the dtype."""

    def __init__(self, device: str, enabled: bool = True) -> None:
        super().__init__(device, enabled=True)


def test_a_skipped_scaler_step_moves_the_schedule_but_not_the_bank(tiny_dataset, tmp_path,
                                                                     monkeypatch):
    """Step 2's loss overflows: the gradient scaler skips its update and halves its scale;
    its prototypes stay out of the bank (bank updates: steps 1 and 3 only), and the epoch
    summary counts the skip."""
    import cpal.engine.train as train_module
    from cpal.data.source import open_dataset

    real, calls = train_module.classification_loss, {"n": 0}

    def overflowing(logits, labels):
        calls["n"] += 1
        loss = real(logits, labels)
        return loss * float("inf") if calls["n"] == 2 else loss

    monkeypatch.setattr(train_module, "classification_loss", overflowing)
    monkeypatch.setattr(torch.amp, "GradScaler", _AlwaysScaling)
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"), *PROTO,
                             "train.epochs=1", "train.grad_clip=1.0"])
    stage_train(cfg, progress=False)
    final = _final(cfg)
    assert all(torch.isfinite(v).all() for v in final.values() if v.is_floating_point())
    layout = open_dataset(cfg.data)
    labels = torch.from_numpy(layout.image_labels(layout.split_ids("train")))
    order = epoch_order(len(labels), seed=0, epoch=0)
    applied = [order[0:8], order[16:24]]  # global batches 1 and 3
    assert int(final["cpal.step"]) == 2
    # Each applied step enqueues its seeded channels (an empty seed has no prototype), and
    # every entry's source image belongs to an applied batch, none to the skipped one.
    held = int(final["cpal.bank.count"].sum())
    assert 0 < held <= sum(channel_count(labels[b]) for b in applied)
    sources = final["cpal.bank.sources"]
    assert set(sources[sources >= 0].tolist()) <= set(applied[0]) | set(applied[1])
    kept = final["cpal.bank.count"].clamp(max=sources.shape[1])  # FIFO capacity per class
    assert int((sources >= 0).sum()) == int(kept.sum())
    log = _log(cfg)
    assert [r["step"] for r in log] == [1, 2, 3, 3]
    assert log[1]["lr"] < log[0]["lr"]  # the poly schedule moved on at the skipped step
    assert log[-1]["skipped_steps"] == 1
    meta = load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints)).meta
    assert meta["grad_scaler"]["scale"] == 2.0**15  # 2**16, backed off once


def test_fp16_on_cpu_is_refused_for_prototype_methods(tiny_dataset, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"), *PROTO,
                             "train.precision=fp16"])
    with pytest.raises(ConfigError, match=r"'train\.precision': fp16 on CPU .* use bf16"):
        stage_train(cfg, progress=False)
    assert not (tmp_path / "run/checkpoints").exists()
    # Maps too (checked before any checkpoint is read); null follows train.precision, and
    # the key to change is infer.precision.
    for precision in ("fp16", "null"):
        cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"), *PROTO,
                                 "train.precision=fp16", f"infer.precision={precision}"])
        with pytest.raises(ConfigError, match=r"'infer\.precision': fp16 on CPU"):
            stage_infer(cfg, progress=False)
    # The CAM method has no prototype branch: fp16 runs on CPU (its scaler is tested so).
    check_precision(load_config(None, []), torch.device("cpu"), "train.precision", "fp16")


def test_crop_geometry_auto_follows_the_images() -> None:
    from cpal.config import TrainConfig
    from cpal.engine.train import crop_geometry
    from cpal.engine.trainer import run_epochs

    auto = TrainConfig(crop_size="auto", resize_long="auto")
    assert crop_geometry(auto, [128, 128, 96]) == (128, (112, 160))  # median 128
    assert crop_geometry(auto, [96] * 5) == (96, (84, 120))
    assert crop_geometry(auto, [500, 375, 500]) == (512, (438, 625))  # VOC-sized: ~IRN's
    fixed = TrainConfig(crop_size=64, resize_long=[50, 70])
    assert crop_geometry(fixed, []) == (64, (50, 70))
    assert run_epochs(TrainConfig(epochs=3), 10) == 3
    assert run_epochs(TrainConfig(epochs=3, steps=25), 10) == 3  # ceil(25 / 10) whole epochs
    assert run_epochs(TrainConfig(epochs=3, steps=100), 18) == 6


def test_steps_schedule_and_auto_crop_train_and_resume(tiny_dataset, tmp_path):
    over = [*tiny_overrides(tiny_dataset, tmp_path / "run"), "train.steps=7",
            "train.crop_size=auto", "train.resize_long=auto", "train.optimizer=adam",
            "train.lr=1e-3"]
    cfg = load_config(None, over)
    stage_train(cfg, progress=False)
    log = [r for r in _log(cfg) if "mean_loss" in r]
    assert [r["epoch"] for r in log] == [1, 2, 3]  # 24 images / 8 = 3 steps per epoch
    assert log[-1]["step"] == 9
    from cpal.engine.identity import load_final_checkpoint

    _, ckpt = load_final_checkpoint(cfg)  # finished by its own epoch count, not train.epochs
    assert ckpt.meta["epochs"] == 3 and ckpt.epoch == 3


def test_min_long_side_upscales_training_and_inference_alike(tiny_dataset, tmp_path):
    from cpal.data.source import image_scale
    from cpal.io import load_maps

    assert image_scale(None, [64]) == 1.0 and image_scale(96, [64, 64, 80]) == 1.5
    assert image_scale(48, [64]) == 1.0  # never shrinks
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"), "train.epochs=1",
                             "data.min_long_side=96", "train.crop_size=auto",
                             "train.resize_long=auto", "infer.splits=[train]",
                             "labels.threshold=0.3", "viz.split=train"])
    stage_train(cfg, progress=False)
    ckpt = load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints))
    assert ckpt.meta["image_scale"] == 1.5  # the tiny images are 64 px
    stage_infer(cfg, progress=False)
    identity = json.loads((RunPaths(cfg.output_path).maps("train") / "_maps.json").read_text())
    assert identity["scales"] == [1.5, 0.75]  # infer.scales [1.0, 0.5] x 1.5
    record = load_maps(next(RunPaths(cfg.output_path).maps("train").glob("*.npz")))
    assert record.maps.shape[1:] == (64, 64)  # maps stay at the image's own size
