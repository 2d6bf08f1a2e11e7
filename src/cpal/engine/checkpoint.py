"""Training checkpoints: tensors in safetensors, everything else in JSON.

A checkpoint is `STEM.safetensors` plus `STEM.json`, STEM being `epoch_NNN` at the end of
an epoch or `step_NNNNNNNN` inside one. The JSON is written last (each file through a
temporary file and a rename) and records the tensor file's size, so it acts as the commit
marker: a run killed during a write leaves no JSON (or a stale one that does not match),
and resume ignores it. Checkpoints are ordered by optimizer step.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from cpal.errors import CheckpointError
from cpal.io import atomic_path, reraise_as_output_error, write_json_atomic

FORMAT_VERSION = 2
"""2: every setting in the fingerprint and the position in every marker; checkpoints of
another version are refused by `load_checkpoint`, in one line naming the file."""
_NAME = re.compile(r"^(?:epoch_\d{3,}|step_\d{8,})\.json$")


@dataclass
class Checkpoint:
    epoch: int  # epochs completed
    step: int  # optimizer steps completed
    model: dict[str, torch.Tensor]
    optimizer: dict[str, Any] | None
    meta: dict[str, Any]


def save_checkpoint(
    directory: Path,
    *,
    epoch: int,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    meta: dict[str, Any],
    stem: str | None = None,
) -> Path:
    """Write tensors, then the JSON marker; `stem` defaults to `epoch_NNN`."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        reraise_as_output_error(directory / "checkpoint", exc)
    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    optim_meta = None
    if optimizer is not None:
        state = optimizer.state_dict()
        optim_state: dict[str, dict[str, Any]] = {}
        for pid, entries in state["state"].items():
            for name, value in entries.items():
                if isinstance(value, torch.Tensor):
                    tensors[f"optim.{pid}.{name}"] = value.detach().cpu().contiguous()
                else:
                    optim_state.setdefault(str(pid), {})[name] = value
        optim_meta = {"param_groups": state["param_groups"], "state": optim_state}
    stem = stem or f"epoch_{epoch:03d}"
    if not _NAME.match(f"{stem}.json"):
        raise ValueError(f"checkpoint stem {stem!r} is not epoch_NNN or step_NNNNNNNN")
    tensor_path = directory / f"{stem}.safetensors"
    with atomic_path(tensor_path) as tmp:
        _save_tensors(tensors, tmp)
    record = {
        "format": FORMAT_VERSION,
        "epoch": epoch,
        "step": step,
        "tensors": tensor_path.name,
        "tensor_bytes": tensor_path.stat().st_size,
        "optimizer": optim_meta,
        "meta": meta,
    }
    json_path = directory / f"{stem}.json"
    write_json_atomic(json_path, record)
    return json_path


def _save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    """safetensors' save_file, its I/O failures (a full disk) raised as the OSError they
    are, so that `atomic_path` reports them like every other write."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        code = re.search(r"os error (\d+)", str(exc))
        if code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from exc


def is_checkpoint_marker(path: Path) -> bool:
    """Whether `path` is named like a checkpoint's JSON marker (epoch_NNN, step_NNNNNNNN)."""
    return bool(_NAME.match(path.name))


def list_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints (JSON marker whose tensor file matches), oldest first."""
    complete, _ = scan_checkpoints(directory)
    return complete


def latest_checkpoint(directory: Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1] if found else None


@dataclass(frozen=True)
class Damaged:
    """A checkpoint whose marker exists but which cannot be used: its tensor file is
    missing or not the size the marker records (truncated by a copy or a failing disk), or
    the marker itself is unreadable. Kills never leave one (each file is renamed into
    place complete, the marker last), so this is damage, and it is always reported."""

    marker: Path
    culprit: Path  # the file at fault
    problem: str
    step: int | None  # from the marker (or a step_N name); None when unknown
    epoch: int | None  # from the marker (or an epoch_N name)

    def describe(self) -> str:
        return f"{self.culprit}: damaged checkpoint ({self.problem})"

    def superseded_by(self, step: int, epoch: int) -> bool:
        """Whether a complete checkpoint at (step, epoch) is at least as far as this one."""
        if self.step is not None:
            return self.step <= step
        return self.epoch is not None and self.epoch <= epoch


def scan_checkpoints(directory: Path) -> tuple[list[Path], list[Damaged]]:
    """Complete checkpoints, oldest first (by optimizer step), and damaged ones."""
    if not directory.is_dir():
        return [], []
    found, damaged = [], []
    for path in directory.iterdir():
        if _NAME.match(path.name):
            record, damage = _inspect(path)
            if record is not None:
                found.append((record["step"], record["epoch"], path.name, path))
            elif damage is not None:
                damaged.append(damage)
    return [p for *_, p in sorted(found)], sorted(damaged, key=lambda d: d.marker.name)


def damaged_since(directory: Path, latest: Path | None) -> list[Damaged]:
    """Damaged checkpoints that `latest` (the newest complete one, or None) does not
    supersede: the ones a resume or an inference would have used had they been whole."""
    _, damaged = scan_checkpoints(directory)
    if latest is None:
        return damaged
    record, _ = _inspect(latest)
    if record is None:
        return damaged
    return [d for d in damaged if not d.superseded_by(record["step"], record["epoch"])]


def _counter_from_name(path: Path) -> tuple[int | None, int | None]:
    """(step, epoch) that a marker's name gives: step_N names a step, epoch_N an epoch."""
    kind, _, number = path.stem.partition("_")
    return (int(number), None) if kind == "step" else (None, int(number))


def _inspect(json_path: Path) -> tuple[dict[str, Any] | None, Damaged | None]:
    """(record, None) if the marker's tensor file is there in full; (None, why) if not;
    (None, None) if the marker vanished meanwhile (pruned by the writing process)."""
    step, epoch = _counter_from_name(json_path)
    try:
        text = json_path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None, None
    except (OSError, ValueError) as exc:
        return None, Damaged(json_path, json_path, f"unreadable marker: {exc}", step, epoch)
    try:
        record = json.loads(text)
        tensor_path = json_path.with_name(record["tensors"])
        expected = record["tensor_bytes"]
        counters = (record["step"], record["epoch"])
        if not all(isinstance(x, int) for x in (expected, *counters)):
            raise TypeError("non-integer counters")
    except (ValueError, KeyError, TypeError) as exc:
        problem = f"marker is not a checkpoint record ({type(exc).__name__}: {exc})"
        return None, Damaged(json_path, json_path, problem, step, epoch)
    step, epoch = counters
    try:
        size = tensor_path.stat().st_size
    except FileNotFoundError:
        return None, Damaged(json_path, tensor_path, f"missing; {json_path.name} expects "
                             f"{expected} bytes", step, epoch)
    except OSError as exc:
        return None, Damaged(json_path, tensor_path, f"unreadable: {exc.strerror}", step, epoch)
    if size != expected:
        what = "truncated" if size < expected else "longer than recorded"
        return None, Damaged(json_path, tensor_path, f"{what}: {size} bytes, "
                             f"{json_path.name} records {expected}", step, epoch)
    return record, None


def load_checkpoint(json_path: Path) -> Checkpoint:
    try:
        record = json.loads(json_path.read_text(encoding="utf-8"))
        tensor_path = json_path.with_name(record["tensors"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CheckpointError(f"{json_path}: unreadable checkpoint ({exc})") from exc
    if record.get("format") != FORMAT_VERSION:
        raise CheckpointError(
            f"{json_path}: checkpoint format {record.get('format')}, this cpal reads format "
            f"{FORMAT_VERSION}; train again (delete {json_path.parent} or choose another "
            "output_dir)"
        )
    try:
        tensors = load_file(str(tensor_path), device="cpu")
    except (OSError, SafetensorError) as exc:
        # The right size but unreadable content (a corrupted copy): not redone silently.
        detail = " ".join(str(exc).split()) or type(exc).__name__
        raise CheckpointError(
            f"{tensor_path}: damaged checkpoint ({detail}); delete {json_path.name} to "
            "continue from the checkpoint before it"
        ) from exc
    model = {k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")}
    optimizer = None
    if record["optimizer"] is not None:
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, pid, name = key.split(".", 2)
                state.setdefault(int(pid), {})[name] = value
        for pid, entries in record["optimizer"]["state"].items():
            state.setdefault(int(pid), {}).update(entries)
        optimizer = {"state": state, "param_groups": record["optimizer"]["param_groups"]}
    return Checkpoint(
        epoch=record["epoch"], step=record["step"], model=model, optimizer=optimizer,
        meta=record["meta"],
    )


def prune_checkpoints(directory: Path, keep: int) -> None:
    """Delete all but the newest `keep` (at least 1) complete checkpoints, tensor files
    without a marker and temporary files of killed writes.

    Call it only from the process that writes checkpoints, after its write finished: then
    no temporary file belongs to a write in progress.
    """
    complete, damaged = scan_checkpoints(directory)
    keep = max(1, keep)  # never delete the newest complete checkpoint
    for json_path in complete[:-keep]:
        record, _ = _inspect(json_path)
        json_path.unlink(missing_ok=True)  # the marker first: never a marker without tensors
        if record is not None:
            json_path.with_name(record["tensors"]).unlink(missing_ok=True)
    newest, _ = _inspect(complete[-1]) if complete else (None, None)
    for damage in damaged:
        # Reported when the run resumed past it; now a complete checkpoint is as far.
        if newest is not None and damage.superseded_by(newest["step"], newest["epoch"]):
            damage.marker.unlink(missing_ok=True)
            if damage.culprit.stem == damage.marker.stem:  # never another checkpoint's file
                damage.culprit.unlink(missing_ok=True)
    kept = {p.stem for p in complete[-keep:]}
    for tensor_path in directory.glob("*.safetensors"):
        if tensor_path.stem not in kept and not tensor_path.with_suffix(".json").exists():
            tensor_path.unlink(missing_ok=True)
    # Ours (.NAME.XXXX.tmp) and those of safetensors' own write-then-rename (.tmpXXXXXX).
    for tmp in [*directory.glob(".*.tmp"), *directory.glob(".tmp*")]:
        tmp.unlink(missing_ok=True)
