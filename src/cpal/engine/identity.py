"""Run identity: which checkpoints and map folders belong to a configuration.

A checkpoint records the fingerprint of the settings that shape training; a maps folder
records what made its maps (`_maps.json`). Both are compared before anything is reused,
so that a run never resumes from, or makes maps with, a network trained otherwise, and a
number is never computed from maps made otherwise. File formats themselves (and refusing
files of an earlier format) are `cpal.engine.checkpoint`'s business and `MAPS_FORMAT`'s.
"""

from __future__ import annotations

import functools
import hashlib
import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from cpal.config import Config
from cpal.engine import distributed
from cpal.engine.checkpoint import (
    Checkpoint,
    Damaged,
    damaged_since,
    latest_checkpoint,
    load_checkpoint,
)
from cpal.engine.paths import RunPaths
from cpal.errors import CheckpointError, DatasetError
from cpal.io import read_json

# Settings that do not change the maths of training, left out of the fingerprint: a run
# may resume under other values (e.g. on 2 GPUs instead of 1 with grad_accum halved).
RUN_INDEPENDENT = frozenset({
    "num_workers", "resume", "log_every", "keep_checkpoints", "checkpoint_every",
    "checkpoint_every_steps", "grad_accum", "channels_last", "require_root",
    "pretrained_allow_leak", "require_pretrained",
})
# Sections of the config that shape training (besides seed and method).
_TRAINING_SECTIONS = ("data", "model", "train", "prototype", "bank", "awareness",
                      "alignment", "loss", "vit", "clip_es")
MAPS_META = "_maps.json"
MAPS_FORMAT = 2
"""Version of a maps folder's record; 1 (no `format` key): before precision was always
recorded. Folders of another version are refused, never reinterpreted."""


def training_fingerprint(config: Config) -> dict[str, Any]:
    """The settings that shape training (precision included, process count not); a
    checkpoint made under another fingerprint cannot be resumed or used for maps, except
    that a key it predates is accepted at its default (`check_fingerprint`)."""

    def strip(name: str) -> dict[str, Any]:
        return {k: v for k, v in asdict(getattr(config, name)).items()
                if k not in RUN_INDEPENDENT}

    return {"seed": config.seed, "method": config.method,
            **{name: strip(name) for name in _TRAINING_SECTIONS}}


@functools.cache
def _default_training_fingerprint() -> dict[str, Any]:
    return training_fingerprint(Config())


def _lookup(record: dict[str, Any], dotted: str) -> tuple[bool, Any]:
    """(found, value) of a dotted key in a nested record."""
    value: Any = record
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return False, None
        value = value[part]
    return True, value


def fingerprint_digest(fingerprint: Any) -> str:
    """A short stable digest of a fingerprint (or any JSON-ready record)."""
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two (nested) settings records."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            keys.append(f"{prefix}{key}")
    return keys


def check_fingerprint(path: Path, ckpt: Checkpoint, fingerprint: dict[str, Any]) -> None:
    """Refuse checkpoint `path` unless it was made with `fingerprint`, naming the keys.
    A training-config key the checkpoint's record lacks (the key was added to cpal after
    the checkpoint was made) is accepted while it holds its default, the behaviour every
    run had before it existed; so adding a key never strands earlier runs."""
    stored = ckpt.meta.get("fingerprint", {})
    if stored == fingerprint:
        return
    defaults = _default_training_fingerprint()
    changed = []
    for key in changed_keys(stored, fingerprint):
        in_stored, _ = _lookup(stored, key)
        has_default, default = _lookup(defaults, key)
        if in_stored or not has_default or _lookup(fingerprint, key) != (True, default):
            changed.append(key)
    if changed or not stored:
        raise CheckpointError(
            f"{path}: made with other settings ({', '.join(changed) or 'unknown'}); "
            "use another output_dir to train with these"
        )


def load_shared_checkpoint(path: Path) -> Checkpoint:
    """Load the checkpoint rank 0 chose, which every process must see."""
    if not path.exists():
        raise CheckpointError(
            f"{path}: not visible to process {distributed.ranks().rank}; output_dir must be "
            "on a file system every node shares"
        )
    return load_checkpoint(path)


def resume_point(directory: Path) -> tuple[Path | None, list[Damaged]]:
    """The newest complete checkpoint, and the damaged ones newer than it (which a resume
    from it falls back over, and must name)."""
    latest = latest_checkpoint(directory)
    return latest, damaged_since(directory, latest)


def load_final_checkpoint(
    config: Config, newest: tuple[Path | None, list[Damaged]] | None = None
) -> tuple[Path, Checkpoint]:
    """The finished training run of this config, for inference: refuses a checkpoint made
    with other settings or one from an unfinished run, and names a damaged newest one
    (never falling back to an older checkpoint). `newest`: the `resume_point` (newest
    complete checkpoint, damaged newer ones) as rank 0 saw it (default: looked up here)."""
    return load_finished_checkpoint(RunPaths(config.output_path).checkpoints,
                                    training_fingerprint(config), "cpal train", newest)


def load_finished_checkpoint(
    directory: Path, fingerprint: dict[str, Any] | None, command: str,
    newest: tuple[Path | None, list[Damaged]] | None = None,
) -> tuple[Path, Checkpoint]:
    """`load_final_checkpoint` for any trained network: the newest complete checkpoint in
    `directory`, made with `fingerprint` (None: not compared here) and finished; `command`
    is what (re)trains it."""
    latest, damaged = resume_point(directory) if newest is None else newest
    if damaged:
        redo = f"from {latest.name}" if latest is not None else "from the start"
        raise CheckpointError(
            f"{damaged[-1].describe()}; run `{command}` to redo it ({redo})"
        )
    if latest is None:
        raise CheckpointError(f"{directory}: no checkpoint; run `{command}` first")
    ckpt = load_shared_checkpoint(latest)
    if fingerprint is not None:
        check_fingerprint(latest, ckpt, fingerprint)
    total = int(ckpt.meta["epochs"])
    if ckpt.epoch < total:
        raise CheckpointError(
            f"{latest}: training stopped at epoch {ckpt.epoch} of {total}; "
            f"run `{command}` to finish it"
        )
    return latest, ckpt


def stage_fingerprint(config: Config, section: Any, **inputs: Any) -> dict[str, Any]:
    """The fingerprint of a network trained after the CAM network: the seed, its config
    section (run-independent training keys left out, as in `training_fingerprint`) and
    the records of what it trains on (`inputs`: label folders, trunk source)."""

    def strip(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in RUN_INDEPENDENT}
        return value

    fields = section if isinstance(section, dict) else asdict(section)
    return {"seed": config.seed, "section": strip(fields), **inputs}


def read_maps_identity(directory: Path) -> dict[str, Any]:
    """The record of what made `directory`'s maps; a folder of another format is refused
    in one line naming the record."""
    path = directory / MAPS_META
    try:
        identity = read_json(path)
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: not found; run `cpal infer` first") from exc
    found = identity.get("format", 1) if isinstance(identity, dict) else None
    if found != MAPS_FORMAT:
        raise DatasetError(
            f"{path}: maps folder of format {found}, this cpal reads format {MAPS_FORMAT}; "
            "delete the folder and run `cpal infer` again"
        )
    return identity
