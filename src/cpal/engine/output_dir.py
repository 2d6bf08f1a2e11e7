"""Claiming `output_dir` for a run before any stage writes there.

Stages overwrite their own files (config.yaml, metrics.json, figures/...) without asking,
which is right inside a run folder and wrong anywhere else: pointed at a dataset root or
a project folder, a run would replace the user's own files of those names. So the first
stage marks the folder as a cpal run (`cpal_run.json`), and every stage refuses a
non-empty folder that is neither marked nor recognisably a run made before the marker
existed, unless `output_dir_force` (`--force`) says to write there anyway. The claim also
checks that the folder can be written, so a read-only or foreign-owned folder fails in one
line before hours of work, not at the first checkpoint.
"""

from __future__ import annotations

import os
import tempfile
from datetime import datetime, timezone
from pathlib import Path

from cpal import __version__
from cpal.config import Config
from cpal.engine import distributed
from cpal.engine.checkpoint import is_checkpoint_marker
from cpal.engine.identity import MAPS_META
from cpal.errors import ConfigError, CpalError
from cpal.io import output_error, write_json_atomic

RUN_MARKER = "cpal_run.json"


def is_run_folder(root: Path) -> bool:
    """Whether `root` is a cpal run: its marker, or (runs made before the marker) a
    checkpoint marker under checkpoints/ or a maps record under maps/<split>/."""
    if (root / RUN_MARKER).is_file():
        return True
    checkpoints = root / "checkpoints"
    if checkpoints.is_dir() and any(is_checkpoint_marker(p) for p in checkpoints.iterdir()):
        return True
    return any((root / "maps").glob(f"*/{MAPS_META}"))


def _problem(config: Config) -> CpalError | None:
    """Why this process may not write into output_dir (None: it may, and it is marked)."""
    root = config.output_path
    if root.exists() and not root.is_dir():
        return ConfigError(f"'output_dir': {root} is a file, not a folder")
    if root.is_dir() and not is_run_folder(root):
        entries = sorted(p.name for p in root.iterdir())
        if entries and not config.output_dir_force:
            more = f" and {len(entries) - 4} more" if len(entries) > 4 else ""
            return ConfigError(
                f"'output_dir': {root} is not empty ({', '.join(entries[:4])}{more}) and is "
                "not a cpal run, whose files would be overwritten: choose a new or empty "
                "folder, or pass --force (output_dir_force=true) to write there anyway"
            )
    try:
        if not (root / RUN_MARKER).is_file():
            write_json_atomic(root / RUN_MARKER, {
                "cpal": __version__,
                "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            })
        else:  # a finished run made read-only, a folder of another user: fail now
            fd, probe = tempfile.mkstemp(prefix=".write_probe.", suffix=".tmp", dir=root)
            os.close(fd)
            os.unlink(probe)
    except CpalError as exc:
        return exc
    except OSError as exc:
        error = output_error(root / RUN_MARKER, exc)
        if error is None:
            raise
        return error
    return None


def claim_output_dir(config: Config) -> None:
    """Refuse a foreign output_dir (ConfigError) or one that cannot be written (OutputError),
    naming it; otherwise mark it as a cpal run. For stages one process runs."""
    problem = _problem(config)
    if problem is not None:
        raise problem


def claim_output_dir_everywhere(config: Config) -> None:
    """`claim_output_dir` for stages every torchrun process runs (train, infer): rank 0
    decides and every process raises its verdict, so that none waits for the others."""
    problem = _problem(config) if distributed.ranks().is_main else None
    problem = distributed.main_value(problem)
    if problem is not None:
        raise problem
