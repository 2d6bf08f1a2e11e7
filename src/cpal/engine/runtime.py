"""Process-wide set-up shared by every stage: seeds, threads, determinism, device."""

from __future__ import annotations

import os
import random

import numpy as np
import torch

from cpal.config import Config
from cpal.errors import ConfigError


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def setup(config: Config) -> torch.device:
    """Apply threads, seeds and deterministic mode; return the device to run on."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    if config.deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix products.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return resolve_device(config.device)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"'device': {name} requested but CUDA is not available here")
    return torch.device(name)
