"""The tensors of a TorchScript archive, read without running anything from it.

OpenAI's CLIP checkpoints (`ViT-B-16.pt`) are TorchScript archives: a zip holding the
model's code, a pickle of the module tree (`data.pkl`) and one file per tensor storage.
`torch.load(weights_only=True)` refuses them and `torch.jit.load` compiles and runs the
archive's code, so cpal reads the archive itself: a restricted unpickler rebuilds only
module records (any `__torch__.*` class becomes a plain attribute record; its code is
never looked at), tensors (from raw storage bytes, by our own rebuild function), and the
few containers TorchScript pickles. Any other global in the pickle is refused, so a file
cannot make this reader import or call anything.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from cpal.errors import CheckpointError

# Storage class names in TorchScript pickles (`torch FloatStorage`...) and their dtypes.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "DoubleStorage": torch.float64,
    "LongStorage": torch.int64, "IntStorage": torch.int32, "ShortStorage": torch.int16,
    "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}
_CONTAINER_BUILDERS = ("build_intlist", "build_doublelist", "build_boollist",
                       "build_tensorlist", "build_stringlist")


class _Record:
    """A TorchScript module or object: its pickled attributes, nothing else."""

    kind = "object"

    def __init__(self) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = dict(state) if isinstance(state, dict) else {}


class _StorageType:
    def __init__(self, dtype: torch.dtype) -> None:
        self.dtype = dtype


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple[int, ...],
                    stride: tuple[int, ...], *_: Any) -> torch.Tensor:
    """Our stand-in for torch._utils._rebuild_tensor_v2: a view of the storage, copied."""
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("a tensor without a storage")
    return torch.as_strided(storage, tuple(size), tuple(stride), int(offset)).clone()


def _rebuild_parameter(data: torch.Tensor, *_: Any) -> torch.Tensor:
    return data


def _first(value: Any, *_: Any) -> Any:
    return value


class _TensorUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, storage: Callable[[str, torch.dtype, int], torch.Tensor]
                 ) -> None:
        super().__init__(io.BytesIO(data))
        self._storage = storage
        self._records: dict[str, type[_Record]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            key = f"{module}.{name}"
            if key not in self._records:
                self._records[key] = type(name, (_Record,), {"kind": key})
            return self._records[key]
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor
        if module == "torch._utils" and name == "_rebuild_parameter":
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "collections" and name == "OrderedDict":
            return OrderedDict
        if module == "torch.jit._pickle" and (name in _CONTAINER_BUILDERS
                                              or name == "restore_type_tag"):
            return _first
        raise pickle.UnpicklingError(f"refused global {module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) >= 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.60}")
        return self._storage(str(pid[2]), pid[1].dtype, int(pid[4]))


def is_torchscript_archive(path: str | Path) -> bool:
    """A zip with a module pickle and compiled code (`constants.pkl` or `code/`)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
    return any(n.endswith("/data.pkl") for n in names) and any(
        n.endswith("/constants.pkl") or "/code/" in n for n in names)


def read_torchscript_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree, by dotted name (parameters,
    buffers and tensor attributes alike: the caller's key check tells them apart)."""
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            pickles = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
            if not pickles:
                raise CheckpointError(f"{path}: a zip archive without data.pkl")
            prefix = pickles[0][: -len("data.pkl")]
            order = f"{prefix}byteorder"
            if order in names and archive.read(order).decode().strip() != "little":
                raise CheckpointError(f"{path}: big-endian tensors are not supported")

            def storage(key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
                raw = archive.read(f"{prefix}data/{key}")
                size = numel * torch.empty((), dtype=dtype).element_size()
                if len(raw) < size:
                    raise CheckpointError(f"{path}: storage {key} is truncated")
                if size == 0:
                    return torch.empty(0, dtype=dtype)
                return torch.frombuffer(bytearray(raw[:size]), dtype=dtype)

            root = _TensorUnpickler(archive.read(pickles[0]), storage).load()
    except (zipfile.BadZipFile, KeyError, EOFError, ValueError, TypeError, RuntimeError,
            pickle.UnpicklingError) as exc:
        raise CheckpointError(f"{path}: cannot read the TorchScript archive ({exc})") from exc
    tensors: dict[str, torch.Tensor] = {}
    _collect(root, "", tensors)
    if not tensors:
        raise CheckpointError(f"{path}: the TorchScript archive holds no tensors")
    return tensors


def _collect(value: Any, prefix: str, out: dict[str, torch.Tensor]) -> None:
    if isinstance(value, torch.Tensor):
        out[prefix[:-1]] = value
    elif isinstance(value, _Record):
        for key, item in getattr(value, "state", {}).items():
            if not str(key).startswith("_"):  # hook flags and other private attributes
                _collect(item, f"{prefix}{key}.", out)
