"""Loading local ImageNet weight files into our backbones, by key, safely.

One place handles every layout difference (torchvision files, timm files, wrappers
such as {"state_dict": ...} or a "module." prefix), so models never special-case files.
Files are read with `torch.load(weights_only=True)` or safetensors: never unpickled.
"""

from __future__ import annotations

import pickle
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from cpal.errors import CheckpointError

# Keys of ImageNet classifier heads: present in torchvision/timm files, never in a trunk.
_IGNORED_PREFIXES = ("fc.",)
_WRAPPER_KEYS = ("state_dict", "model", "model_state")
_STRIPPED_PREFIXES = ("module.", "backbone.", "encoder.")


@dataclass
class LoadReport:
    path: Path
    loaded: int = 0
    ignored: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return (
            f"{self.path.name}: loaded {self.loaded} tensors, ignored {len(self.ignored)} "
            f"(ImageNet head), missing {len(self.missing)}, unexpected {len(self.unexpected)}"
        )


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a tensor dict from .safetensors or a torch file, refusing pickled objects."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: weight file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path), device="cpu")
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).splitlines()[0] if str(exc) else "unsupported object"
        raise CheckpointError(
            f"{path}: refused, the file holds pickled objects, not plain tensors ({first})"
        ) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise CheckpointError(f"{path}: cannot read weights ({exc})") from exc
    for key in _WRAPPER_KEYS:
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            raise CheckpointError(f"{path}: entry '{key}' is not a tensor")
        for prefix in _STRIPPED_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def load_backbone_weights(model: nn.Module, path: str | Path, *, strict: bool = True) -> LoadReport:
    """Copy matching tensors into `model`; with `strict`, any mismatch is an error that
    lists the missing and unexpected keys (so a wrong file never half-loads silently)."""
    path = Path(path)
    state = read_state_dict(path)
    own = model.state_dict()
    report = LoadReport(path=path)
    usable: dict[str, torch.Tensor] = {}
    shape_errors = []
    for key, value in state.items():
        if key.startswith(_IGNORED_PREFIXES):
            report.ignored.append(key)
        elif key not in own:
            report.unexpected.append(key)
        elif own[key].shape != value.shape:
            shape_errors.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = value
    # Files from before PyTorch 0.4 have no BatchNorm step counters; nothing uses them.
    report.missing = [
        k for k in own if k not in usable and not k.endswith("num_batches_tracked")
    ]
    if shape_errors:
        raise CheckpointError(
            f"{path}: shape mismatch for {len(shape_errors)} tensors (file vs model), e.g. "
            + "; ".join(shape_errors[:5])
            + " - check model.arch and model.width"
        )
    if strict and (report.missing or report.unexpected):
        raise CheckpointError(
            f"{path}: keys do not match the model: missing {_preview(report.missing)}; "
            f"unexpected {_preview(report.unexpected)}"
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report


def _preview(keys: list[str], limit: int = 6) -> str:
    if not keys:
        return "none"
    shown = ", ".join(keys[:limit])
    return f"{len(keys)} ({shown}{', ...' if len(keys) > limit else ''})"
