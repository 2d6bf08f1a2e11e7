"""Pieces shared by VOC and COCO preparation and verification.

Preparation never modifies a file it did not create: `write_once` writes a new file, keeps
an identical one, and refuses to replace one with other content (it may be the user's).
Per-image work goes through `parallel_map`, which uses spawned processes so that the
parent's large annotation tables are not duplicated into each worker by fork.
"""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import TypeVar

from cpal.errors import ConfigError, DatasetError
from cpal.io import write_text_atomic
from cpal.log import Progress

T = TypeVar("T")
R = TypeVar("R")

_HASH_CHUNK = 1 << 20


def default_workers() -> int:
    """Processes for per-image work when --workers is not given: the CPUs, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def check_workers(workers: int) -> int:
    if workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    return workers


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex SHA-256 of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def list_text(ids: Iterable[str]) -> str:
    """An id list file's text: one id per line, newline-terminated."""
    return "".join(f"{image_id}\n" for image_id in ids)


def labels_text(labels: Mapping[str, Sequence[str]]) -> str:
    """image_labels.json text, one id per line (diffable, deterministic for a given order)."""
    rows = [f"  {json.dumps(key)}: {json.dumps(list(value))}" for key, value in labels.items()]
    return "{\n" + ",\n".join(rows) + "\n}\n" if rows else "{}\n"


def write_once(path: Path, text: str) -> bool:
    """Write `text` to `path` atomically unless it already holds exactly that.

    Returns True when the file was written. An existing file with other content is an
    error rather than overwritten: cpal only adds files to a dataset root.
    """
    if path.is_file():
        try:
            same = path.read_text(encoding="utf-8") == text
        except (OSError, UnicodeDecodeError):
            same = False
        if same:
            return False
        raise DatasetError(
            f"{path} already exists with different content; cpal does not overwrite files "
            "in a dataset root: move it away to let prepare write its own"
        )
    if path.exists():
        raise DatasetError(f"{path} exists and is not a file")
    write_text_atomic(path, text)
    return True


def examples(items: Sequence[str], limit: int = 5) -> str:
    """'a, b, c and 12 more': enough to find the problem without flooding the line."""
    shown = ", ".join(str(item) for item in items[:limit])
    more = len(items) - limit
    return f"{shown} and {more} more" if more > 0 else shown


def size_mismatch(
    mask: object, mask_hw: tuple[int, ...], image: object, image_hw: tuple[int, ...]
) -> str | None:
    """The one-line complaint when a mask and its image differ in (height, width), else None.

    Shared by preparation (before a mask is written) and verify (after), so both name the
    two files the same way.
    """
    if tuple(mask_hw) == tuple(image_hw):
        return None
    return (
        f"mask {mask} is {mask_hw[1]}x{mask_hw[0]} but its image {image} is "
        f"{image_hw[1]}x{image_hw[0]} (width x height)"
    )


def count_warning(what: str, found: int, standard: int, dataset: str) -> str | None:
    """A warning line when a count differs from the standard release (custom copies exist)."""
    if found == standard:
        return None
    return f"{what} has {found:,} ids; the standard {dataset} has {standard:,}"


def list_names(folder: Path) -> set[str]:
    """File names in `folder` (one listing; empty when the folder does not exist)."""
    try:
        return set(os.listdir(folder))
    except FileNotFoundError:
        return set()
    except OSError as error:
        raise DatasetError(f"cannot list {folder}: {error.strerror or error}") from error


def remove_stale_temporaries(folder: Path) -> int:
    """Delete temp files that `cpal.io.atomic_path` left behind when a run was killed."""
    removed = 0
    for name in list_names(folder):
        if name.startswith(".") and name.endswith(".tmp"):
            (folder / name).unlink(missing_ok=True)
            removed += 1
    return removed


def parallel_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    *,
    workers: int,
    desc: str,
    progress: bool,
) -> list[R]:
    """[fn(item) for item in items], in order, over `workers` spawned processes.

    `fn` must be a module-level function. The first exception raised by `fn` (e.g. a
    `DatasetError` naming a file) cancels the remaining work and propagates.
    """
    results: list[R] = []
    with Progress(len(items), desc, enabled=progress) as bar:
        if workers <= 1 or len(items) < 2:
            for item in items:
                results.append(fn(item))
                bar.update()
            return results
        chunksize = max(1, min(64, len(items) // (workers * 4)))
        context = multiprocessing.get_context("spawn")
        pool = ProcessPoolExecutor(max_workers=min(workers, len(items)), mp_context=context)
        try:
            for result in pool.map(fn, items, chunksize=chunksize):
                results.append(result)
                bar.update()
        except BaseException:
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
    return results
