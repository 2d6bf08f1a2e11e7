"""Atomic file writes, VOC palette PNGs and per-image map files.

Every stage writes through `atomic_path` so that a run killed mid-write leaves either
the old file or the new one, never a truncated file that a resumed run would trust.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import shutil
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import numpy as np
from PIL import Image

from cpal.errors import DatasetError, OutputError

IGNORE_INDEX = 255


def _read_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# Read once at import (single-threaded), not per write: os.umask is process-wide.
_UMASK = _read_umask()


# Why an output cannot be written that the user can fix: space, quota, permissions.
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
_DENIED = {errno.EACCES, errno.EPERM, errno.EROFS}


def output_error(path: str | os.PathLike[str], exc: OSError) -> OutputError | None:
    """The one-line error for a write of `path` that failed with `exc`, or None when the
    failure is not about the output location (a bug, a vanished device: re-raised)."""
    path = Path(path)
    reason = exc.strerror or os.strerror(exc.errno or 0)
    if exc.errno in _FULL:
        return OutputError(
            f"{path}: cannot write ({reason}); free space and rerun the same command: "
            "finished files are kept and unfinished ones are redone"
        )
    if exc.errno in _DENIED:
        return OutputError(
            f"{path}: cannot write ({reason}); make {path.parent} writable or choose "
            "another output_dir"
        )
    return None


def reraise_as_output_error(path: str | os.PathLike[str], exc: OSError) -> NoReturn:
    """Raise `output_error(path, exc)` from `exc`, or `exc` itself when it is not about the
    output location: what every writer's `except OSError` does."""
    error = output_error(path, exc)
    if error is None:
        raise exc
    raise error from exc


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path beside `path`; rename it over `path` only on success.

    A full disk or a folder that cannot be written is an `OutputError` naming `path`
    (the previous file, if any, is left as it was)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as exc:
        reraise_as_output_error(path, exc)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        # The permissions a plain open() would give, set after the write: mkstemp creates
        # 0600 files, and some writers (safetensors) replace the file with their own 0600
        # temporary.
        os.chmod(tmp_path, 0o666 & ~_UMASK)
        os.replace(tmp_path, path)
    except OSError as exc:
        reraise_as_output_error(path, exc)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


def append_lines(path: str | os.PathLike[str], lines: list[str]) -> None:
    """Append whole lines to a text file. A write that fails (a full disk) is cut back to
    where it began, so the file never ends in a torn line, and is an `OutputError`."""
    path = Path(path)
    data = "".join(line + "\n" for line in lines).encode("utf-8")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "ab", buffering=0) as handle:
            start = handle.seek(0, os.SEEK_END)
            try:
                view = memoryview(data)
                while view:
                    view = view[handle.write(view) or 0 :]
            except OSError:
                with contextlib.suppress(OSError):
                    handle.truncate(start)
                raise
    except OSError as exc:
        reraise_as_output_error(path, exc)


def link_tree(source: str | os.PathLike[str], target: str | os.PathLike[str]) -> int:
    """Hard-link every finished file under `source` to the same place under `target` (a
    copy, through a temporary file, where the filesystem has no hard links); returns how
    many. Sharing is safe because every writer replaces a file by renaming a new one over
    it, never rewrites it in place. Temporaries (hidden, or named *.tmp: unfinished
    writes) stay behind. A full disk or a folder that cannot be written is an
    `OutputError` naming the file."""
    source, target = Path(source), Path(target)
    files = sorted(p for p in source.rglob("*") if p.is_file()
                   and not (p.name.startswith(".") or p.name.endswith(".tmp")))
    for path in files:
        dest = target / path.relative_to(source)
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, dest)
        except OSError:  # no hard links here (another device, a FAT disk), or no space
            with atomic_path(dest) as tmp:
                shutil.copyfile(path, tmp)
    return len(files)


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


_MAP_ARRAYS = ("classes.npy", "maps.npy")


def map_file_problem(path: str | os.PathLike[str]) -> str | None:
    """Why a map file is damaged, or None if it looks whole, from its zip directory alone
    (no decoding, so every finished file can be checked on each resume): an empty or
    truncated `.npz` has lost the directory that ends a zip, or members reach past its end.
    Our own writes are atomic; this is damage from elsewhere (a copy, a disk)."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (OSError, EOFError, ValueError, zipfile.BadZipFile) as exc:
        return "empty file" if path.exists() and path.stat().st_size == 0 else _one_line(exc)
    names = {m.filename for m in members}
    missing = [n for n in _MAP_ARRAYS if n not in names]
    if missing:
        return f"no {missing[0]} inside"
    if any(m.header_offset + m.compress_size > size for m in members):
        return "truncated"
    return None


def _one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def load_maps(path: str | os.PathLike[str]) -> MapRecord:
    """Read a map file; a damaged one (truncated, empty, not a map file) is a DatasetError
    naming it. A missing one raises FileNotFoundError (callers check for those first)."""
    try:
        with np.load(path) as data:
            background = data["background"].astype(np.float32) if "background" in data else None
            return MapRecord(classes=data["classes"], maps=data["maps"].astype(np.float32),
                             background=background, seeds=data.get("seeds"))
    except FileNotFoundError:
        raise
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as exc:
        problem = "empty file" if Path(path).stat().st_size == 0 else _one_line(exc)
        raise DatasetError(
            f"{path}: damaged map file ({problem}); rerun `cpal infer`, which redoes it"
        ) from exc


_PNG_END = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def png_complete(path: str | os.PathLike[str]) -> bool:
    """Whether a PNG file ends with its IEND chunk (a truncated or empty one does not)."""
    try:
        with open(path, "rb") as handle:
            handle.seek(0, os.SEEK_END)
            if handle.tell() < len(_PNG_END):
                return False
            handle.seek(-len(_PNG_END), os.SEEK_END)
            return handle.read() == _PNG_END
    except OSError:
        return False
