"""Helpers shared by test modules (fixtures stay in conftest.py, which is not imported)."""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import torch
from torch import nn

from cpal.config import Config, load_config
from cpal.engine.hooks import HookBase, Interrupt

REPO = Path(__file__).resolve().parents[1]


def tiny_overrides(data_root: Path, output_dir: Path) -> list[str]:
    """A CPU-sized run on `data_root` (the `tiny_dataset` fixture: 24 train images, so
    3 steps per epoch at batch 8)."""
    return [
        f"data.root={data_root}",
        f"output_dir={output_dir}",
        "model.arch=resnet18",
        "model.width=0.125",
        "model.frozen_bn=false",
        "train.epochs=2",
        "train.batch_size=8",
        "train.crop_size=48",
        "train.resize_long=[48, 72]",
        "train.lr=0.05",
        "train.momentum=0.9",
        "train.head_lr_mult=1.0",
        "train.log_every=1",
        "infer.scales=[1.0, 0.5]",
        "infer.batch_size=4",
        "viz.num_images=3",
        "threads=1",
    ]


def finished_cam_run(data_root: Path, out: Path, *overrides: str) -> Config:
    """Train and map a tiny CAM run into `out` (a module fixture's start, which tests copy
    with `copied_run`); returns its config."""
    from cpal.pipeline import stage_infer, stage_train

    cfg = load_config(None, [*tiny_overrides(data_root, out), *overrides])
    stage_train(cfg, progress=False)
    stage_infer(cfg, progress=False)
    return cfg


def copied_run(data_root: Path, finished: Path, tmp_path: Path, *overrides: str) -> Config:
    """The config of a copy of the finished run `finished` in tmp_path/run, so that each
    test changes its own."""
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return load_config(None, [*tiny_overrides(data_root, out), *overrides])


def killed_in_second_epoch() -> list[HookBase]:
    """Hooks for `stage_train`: training raises KeyboardInterrupt as its second epoch
    starts (its first checkpoint written), as a kill would."""
    return [Interrupt(at_epoch=1)]


def chain_overrides(refine: str = "irn") -> list[str]:
    """The rest of the chain, CPU-sized for `tiny_overrides`' run: refinement `refine`,
    IRN on the CAM network's trunk, a DeepLab-v2 of the CAM network's trunk (resnet18
    x0.125) trained for 3 steps and predicted on val."""
    return [
        f"refine.method={refine}",
        "irn.trunk=cam",
        "irn.radius=5",
        "irn.train.epochs=1",
        "irn.train.batch_size=8",
        "irn.train.crop_size=48",
        "irn.train.log_every=1",
        "irn.exp_times=4",
        "irn.walk_batch=4",
        "segment.network=deeplab_v2",
        "segment.arch=resnet18",
        "segment.width=0.125",
        "segment.output_stride=16",
        "segment.msc_scales=[1.0, 0.75]",
        "segment.trunk=cam",
        "segment.train.steps=null",
        "segment.train.epochs=2",
        "segment.train.batch_size=8",
        "segment.train.grad_accum=1",
        "segment.train.crop_size=48",
        "segment.train.lr=0.01",
        "segment.train.log_every=1",
        "segment.train.checkpoint_every_steps=null",
        "segment.splits=[val]",
    ]


def amn_overrides() -> list[str]:
    """`chain_overrides("amn")` plus AMN's network CPU-sized: on the CAM network's trunk,
    one epoch of 3 steps on 48 px crops."""
    return [
        *chain_overrides("amn"),
        "amn.trunk=cam",
        "amn.train.epochs=1",
        "amn.train.batch_size=8",
        "amn.train.crop_size=48",
        "amn.train.lr=0.001",
        "amn.train.log_every=1",
    ]


def cli_error(err: str) -> str:
    """The one `cpal: error:` line of a command's stderr (exactly one, no traceback)."""
    lines = [line for line in err.splitlines() if line.startswith("cpal: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def torchscript_archive(make: type[nn.Module], folder: Path, name: str = "ViT-B-16.pt"
                        ) -> tuple[nn.Module, Path]:
    """(module, its TorchScript archive) of `make()` seeded with 0, as OpenAI ships CLIP:
    scripting takes seconds, so module-scoped fixtures build it once."""
    torch.manual_seed(0)
    model = make().eval()
    path = folder / name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit is deprecated
        torch.jit.save(torch.jit.script(model), str(path))
    return model, path
