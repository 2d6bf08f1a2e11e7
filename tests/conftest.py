"""Shared fixtures: a tiny built-in dataset and a CPU-sized run configuration."""

from __future__ import annotations

from pathlib import Path

import pytest

from cpal.config import Config, load_config
from cpal.data.synthetic import generate
from tests.helpers import tiny_overrides


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("data") / "tiny"
    generate(root, seed=3, num_train=24, num_val=8, image_size=64)
    return root


@pytest.fixture
def tiny_config(tiny_dataset: Path, tmp_path: Path) -> Config:
    return load_config(None, tiny_overrides(tiny_dataset, tmp_path / "run"))
