"""Atomic file writes, VOC palette PNGs and per-image map files.

Every stage writes through `atomic_path` so that a run killed mid-write leaves either
the old file or the new one, never a truncated file that a resumed run would trust.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from cpal.errors import DatasetError

IGNORE_INDEX = 255


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (single-threaded), not per write: os.umask is process-wide.
_UMASK = _read_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    # mkstemp creates 0600 files; give the result the permissions a plain open() would.
    os.chmod(tmp_path, 0o666 & ~_UMASK)
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    finally:
        if tmp_path.exists():
            tmp_path.unlink()


def read_json(path: str | os.PathLike[str]) -> Any:
    """Parse a JSON file; a corrupt one is a DatasetError naming it (a missing one raises
    FileNotFoundError, which callers treat as they need)."""
    text = Path(path).read_text(encoding="utf-8")
    try:
        return json.loads(text)
    except ValueError as exc:
        raise DatasetError(f"{path}: corrupt JSON ({exc})") from exc


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


@functools.lru_cache(maxsize=4)
def voc_palette(num_entries: int = 256) -> np.ndarray:
    """The PASCAL VOC colour map (bit-interleaved), shape (num_entries, 3) uint8, read-only.

    Index 255 (ignore) is VOC's cream (224, 224, 192). Cached: every label PNG needs it."""
    palette = np.zeros((num_entries, 3), dtype=np.uint8)
    for i in range(num_entries):
        c, r, g, b = i, 0, 0, 0
        for bit in range(8):
            r |= ((c >> 0) & 1) << (7 - bit)
            g |= ((c >> 1) & 1) << (7 - bit)
            b |= ((c >> 2) & 1) << (7 - bit)
            c >>= 3
        palette[i] = (r, g, b)
    if num_entries > IGNORE_INDEX:
        palette[IGNORE_INDEX] = (224, 224, 192)
    palette.flags.writeable = False
    return palette


def save_label_png(path: str | os.PathLike[str], label: np.ndarray) -> None:
    """Write an index mask as a palette PNG (readable as indices, viewable in colour)."""
    if label.ndim != 2:
        raise ValueError(f"label must be 2-D, got shape {label.shape}")
    image = Image.fromarray(label.astype(np.uint8), mode="P")
    image.putpalette(voc_palette().reshape(-1).tolist())
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


@dataclass(frozen=True)
class MapRecord:
    """Localisation maps of one image.

    classes: indices (into the dataset's class list, 0 = background) of the channels in
      `maps`; for CAMs these are the image's present foreground classes.
    maps: float array (len(classes), H, W) at full image resolution, values in [0, 1].
    background: the map's own background score (H, W) in [0, 1] when the method has one
      (PACAM's background-prototype channel); None for CAMs, which are thresholded.
    seeds: the prototype seeds (H, W) uint8 as dataset class indices, 255 where no seed
      (prototype methods, a diagnostic: what the prototypes were pooled from at scale 1).
    """

    classes: np.ndarray
    maps: np.ndarray
    background: np.ndarray | None = None
    seeds: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.maps.ndim != 3 or self.maps.shape[0] != len(self.classes):
            raise ValueError(
                f"maps shape {self.maps.shape} does not match {len(self.classes)} classes"
            )
        if self.background is not None and self.background.shape != self.maps.shape[1:]:
            raise ValueError(
                f"background shape {self.background.shape} != maps shape {self.maps.shape[1:]}"
            )
        if self.seeds is not None and self.seeds.shape != self.maps.shape[1:]:
            raise ValueError(f"seeds shape {self.seeds.shape} != maps shape {self.maps.shape[1:]}")


def save_maps(path: str | os.PathLike[str], record: MapRecord) -> None:
    """Write maps as float16 `.npz` atomically."""
    with atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez(
                handle,
            classes=np.asarray(record.classes, dtype=np.int64),
            maps=record.maps.astype(np.float16),
            **({} if record.background is None
               else {"background": record.background.astype(np.float16)}),
            **({} if record.seeds is None else {"seeds": record.seeds.astype(np.uint8)}),
        )


def load_maps(path: str | os.PathLike[str]) -> MapRecord:
    with np.load(path) as data:
        background = data["background"].astype(np.float32) if "background" in data else None
        seeds = data.get("seeds")
        return MapRecord(classes=data["classes"], maps=data["maps"].astype(np.float32),
                         background=background, seeds=seeds)
