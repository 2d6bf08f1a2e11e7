"""Process-wide set-up shared by every stage: seeds, threads, determinism, device, precision."""

from __future__ import annotations

import contextlib
import os
import random

import numpy as np
import torch

from cpal.config import Config
from cpal.engine import distributed
from cpal.errors import ConfigError
from cpal.methods import method_spec

AMP_DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def derived_seed(*keys: int) -> int:
    """A 63-bit seed fixed by `keys` alone (e.g. seed, epoch, image): random draws that a
    resumed run repeats exactly, with no generator state to checkpoint."""
    state = np.random.SeedSequence(list(keys))
    return int(state.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def setup(config: Config) -> torch.device:
    """Apply threads, seeds and deterministic mode, join torchrun's process group when
    launched by it; return the device to run on (cuda:LOCAL_RANK under torchrun)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    seed_everything(config.seed)
    if config.deterministic:
        # cuBLAS needs this workspace setting for deterministic matrix products.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
    return distributed.init(resolve_device(config.device))


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"'device': {name} requested but CUDA is not available here")
    return torch.device(name)


def check_precision(config: Config, device: torch.device, key: str, precision: str) -> None:
    """Refuse fp16 for a prototype method on CPU: CPU autocast keeps norms and sums in fp16
    (CUDA's runs them in fp32), so the zero prototypes of absent classes normalise to NaN
    and every update would be skipped; bf16 has float32's range and works on CPU."""
    if precision == "fp16" and device.type == "cpu" and method_spec(config.method).has_prototypes:
        raise ConfigError(
            f"'{key}': fp16 on CPU turns method {config.method}'s prototype maps into NaN "
            "(CPU autocast keeps normalisations in fp16); use bf16 or fp32 on CPU"
        )


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Mixed precision for forward passes: fp32 runs as is, bf16 and fp16 under autocast."""
    dtype = AMP_DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)
