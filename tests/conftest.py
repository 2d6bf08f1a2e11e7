"""Shared fixtures: a tiny built-in dataset and a CPU-sized run configuration."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

import pytest

import cpal.engine.train as train_module
from cpal.config import Config, load_config
from cpal.data.synthetic import generate


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(root, seed=3, num_train=24, num_val=8, image_size=64)
    return root


def tiny_overrides(data_root: Path, output_dir: Path) -> list[str]:
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


@pytest.fixture
def tiny_config(tiny_dataset: Path, tmp_path: Path) -> Config:
    return load_config(None, tiny_overrides(tiny_dataset, tmp_path / "run"))


@contextlib.contextmanager
def killed_in_second_epoch() -> Iterator[None]:
    """Training raises KeyboardInterrupt as its second epoch starts, as a kill would."""
    real, calls = train_module._run_epoch, {"n": 0}

    def dies(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    train_module._run_epoch = dies
    try:
        yield
    finally:
        train_module._run_epoch = real
