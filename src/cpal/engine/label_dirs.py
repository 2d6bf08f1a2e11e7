"""Folders of per-image label PNGs that a stage makes from one set of inputs.

Every stage after the maps writes one palette PNG per image (seeds, CRF and IRN labels,
the final pseudo masks, segmentation predictions). `LabelFolder` gives them one resume
rule: the folder's record (`_labels.json`: what made its files) is written before the
first file and each file is written atomically, so a rerun with the same record skips
every finished file (checking that it is complete: a PNG truncated by a copy or a disk is
named and redone), and a rerun with another record starts the folder afresh. `publish`
makes a folder that holds copies of another folder's files.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from cpal.engine import distributed
from cpal.engine.identity import changed_keys
from cpal.errors import DatasetError, warn
from cpal.io import atomic_path, png_complete, read_json, save_label_png, write_json_atomic
from cpal.log import get_logger

_log = get_logger(__name__)

RECORD = "_labels.json"
_NAMED = 10  # damaged files named one per line; the rest are counted


class LabelFolder:
    """`directory`/<id>.png made from what `record` describes (a JSON-ready dict).
    A subclass keeps other per-image files by the same rule (`suffix`, `problem`)."""

    suffix = ".png"
    what = "label file"

    def __init__(self, directory: Path, record: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.record = record

    def path(self, image_id: str) -> Path:
        return self.directory / f"{image_id}{self.suffix}"

    def problem(self, path: Path) -> str | None:
        """Why an existing file is not complete (None: it is)."""
        return None if png_complete(path) else "truncated PNG"

    def stored_record(self) -> dict[str, Any] | None:
        path = self.directory / RECORD
        return read_json(path) if path.is_file() else None

    def claim(self) -> None:
        """Make the folder this record's: a folder made from other inputs loses its files
        (they would be mixed with new ones), with a note saying which inputs changed."""
        self.directory.mkdir(parents=True, exist_ok=True)
        stored = self.stored_record()
        if stored == self.record:
            return
        old = sorted(self.directory.glob(f"*{self.suffix}"))
        if old:
            what = ", ".join(changed_keys(stored, self.record)) if stored else "no record"
            _log.info("%s: %d files made from other inputs (%s); making them again",
                      self.directory, len(old), what)
            for path in old:
                path.unlink()
        write_json_atomic(self.directory / RECORD, self.record)

    def pending(self, ids: Sequence[str]) -> list[str]:
        """The ids without a complete file (after `claim`); damaged files are named."""
        todo, damaged = [], []
        for image_id in ids:
            path = self.path(image_id)
            if not path.exists():
                todo.append(image_id)
                continue
            problem = self.problem(path)
            if problem is not None:
                todo.append(image_id)
                damaged.append(f"{path}: damaged {self.what} ({problem}); redoing it")
        for line in damaged[:_NAMED]:
            warn(line)
        if len(damaged) > _NAMED:
            warn(f"{self.directory}: {len(damaged) - _NAMED} more damaged {self.what}s; "
                 "redoing them")
        return todo

    @contextlib.contextmanager
    def share(self, ids: Sequence[str]) -> Iterator[list[str]]:
        """Claim the folder and yield this process's part of its pending ids: all of them
        in one process; under torchrun every n-th of what rank 0 found, so no image is
        made twice. On leaving, wait until every process has written its part, so the
        folder is complete for whoever reads it next."""
        def claim_and_list() -> list[str]:
            self.claim()
            return self.pending(ids)

        yield distributed.deal(claim_and_list)
        distributed.barrier()

    def write(self, image_id: str, label: np.ndarray) -> None:
        save_label_png(self.path(image_id), label)

    def missing(self, ids: Sequence[str]) -> list[str]:
        """Ids whose file does not exist (for a stage that reads this folder)."""
        return [i for i in ids if not self.path(i).exists()]


def require_folder(directory: Path, ids: Sequence[str], what: str, producer: str
                   ) -> dict[str, Any]:
    """The record of a folder another stage made, every file of `ids` present; otherwise
    one DatasetError naming the first missing file and the command that makes it."""
    path = Path(directory) / RECORD
    if not path.is_file():
        raise DatasetError(f"{path}: not found ({what} not made yet); run `{producer}` first")
    missing = [i for i in ids if not (Path(directory) / f"{i}.png").exists()]
    if missing:
        raise DatasetError(
            f"{Path(directory) / (missing[0] + '.png')}: {what} missing ({len(missing)} of "
            f"{len(ids)}); run `{producer}`"
        )
    return read_json(path)


def publish(source: LabelFolder, target: Path, ids: Sequence[str],
            extra: dict[str, Any] | None = None) -> LabelFolder:
    """`target` holding copies of `source`'s files of `ids`, with the source's record
    (plus `extra`) as its own; complete copies of an earlier call are kept. Copies, not
    links: damage to one folder (an edit, a truncated file) never reaches the other."""
    folder = LabelFolder(target, {**source.record, **(extra or {}),
                                  "published_from": str(source.directory)})
    folder.claim()
    for image_id in folder.pending(ids):
        src = source.path(image_id)
        if not png_complete(src):
            raise DatasetError(f"{src}: damaged label file (truncated PNG); rerun the stage "
                               f"that made {source.directory}")
        with atomic_path(folder.path(image_id)) as tmp:
            shutil.copyfile(src, tmp)
    return folder
