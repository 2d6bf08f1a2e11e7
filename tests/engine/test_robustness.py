"""Output folders that are full, unwritable or not a cpal run: each ends in one line naming
the file or key and exit 2, and nothing already written is lost."""

from __future__ import annotations

import errno
import io
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import SafetensorError

import cpal.engine.checkpoint as checkpoint_module
import cpal.io as io_module
from cpal.cli import main
from cpal.config import load_config
from cpal.engine.checkpoint import (
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from cpal.engine.output_dir import RUN_MARKER, is_run_folder
from cpal.engine.paths import RunPaths
from cpal.errors import OutputError
from cpal.io import append_lines, load_maps
from cpal.pipeline import stage_infer, stage_train
from tests.conftest import tiny_overrides


def _cli(capsys: pytest.CaptureFixture[str], command: str, config: Path,
         *overrides: str) -> tuple[int, str]:
    """Run `cpal COMMAND CONFIG OVERRIDES --no-progress`; return the exit code and stderr."""
    code = main([command, str(config), *overrides, "--no-progress"])
    return code, capsys.readouterr().err


def _error(err: str) -> str:
    """The one error line: exactly one, and no traceback."""
    lines = [line for line in err.splitlines() if line.startswith("cpal: error: ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def _warnings(err: str) -> list[str]:
    return [line for line in err.splitlines() if line.startswith("cpal: warning: ")]


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text("{}\n")
    return path


def _weights(output_dir: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(RunPaths(output_dir).checkpoints)).model


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def finished(tiny_dataset, tmp_path_factory) -> Path:
    """A finished 2-epoch CAM run with its maps; tests copy it."""
    out = tmp_path_factory.mktemp("finished") / "run"
    cfg = load_config(None, tiny_overrides(tiny_dataset, out))
    stage_train(cfg, progress=False)
    stage_infer(cfg, progress=False)
    return out


def _copy(finished: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    return out


# ------------------------------------------------------------------------- checkpoints


def test_checkpoint_files_follow_the_umask(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    for umask in (0o022, 0o027):
        monkeypatch.setattr(io_module, "_UMASK", umask)
        directory = tmp_path / oct(umask)
        save_checkpoint(directory, epoch=1, step=1, model=model, optimizer=None, meta={})
        modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
        assert modes == {"epoch_001.json": 0o666 & ~umask,
                         "epoch_001.safetensors": 0o666 & ~umask}


# ---------------------------------------------------------------------- full disk, rights


def test_full_disk_while_writing_a_checkpoint(finished, tiny_dataset, tmp_path, config_file,
                                              capsys, monkeypatch):
    """safetensors reports a full disk as SafetensorError('... (os error 28) ...')."""
    out = tmp_path / "run"
    overrides = tiny_overrides(tiny_dataset, out)
    real, calls = checkpoint_module.save_file, {"n": 0}

    def full_at_second(tensors, filename):
        calls["n"] += 1
        if calls["n"] == 2:
            raise SafetensorError("Error while serializing: I/O error: No space left on "
                                  f'device (os error 28) at path "{filename}.tmpXYZ"')
        return real(tensors, filename)

    monkeypatch.setattr(checkpoint_module, "save_file", full_at_second)
    code, err = _cli(capsys, "train", config_file, *overrides)
    assert code == 2
    assert _error(err) == (
        f"cpal: error: {out / 'checkpoints/epoch_002.safetensors'}: cannot write (No space "
        "left on device); free space and rerun the same command: finished files are kept "
        "and unfinished ones are redone")
    assert latest_checkpoint(out / "checkpoints").name == "epoch_001.json"  # kept, whole
    assert not [p for p in (out / "checkpoints").iterdir() if p.name.endswith(".tmp")]
    for line in (out / "train_log.jsonl").read_text().splitlines():
        json.loads(line)
    monkeypatch.undo()
    code, err = _cli(capsys, "train", config_file, *overrides)  # after freeing space
    assert code == 0, err
    _assert_same_weights(_weights(out), _weights(finished))


def test_full_disk_while_writing_maps(finished, tiny_dataset, tmp_path, config_file, capsys,
                                      monkeypatch):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "maps")
    overrides = tiny_overrides(tiny_dataset, out)
    real, calls = np.savez, {"n": 0}

    def full_at_fifth(handle, **arrays):
        calls["n"] += 1
        if calls["n"] == 5:
            handle.write(b"PK\x03\x04 half a file")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(handle, **arrays)

    monkeypatch.setattr(io_module.np, "savez", full_at_fifth)
    code, err = _cli(capsys, "infer", config_file, *overrides)
    assert code == 2
    line = _error(err)
    assert line.startswith("cpal: error: " + str(out / "maps/train")) and line.endswith(
        ".npz: cannot write (No space left on device); free space and rerun the same "
        "command: finished files are kept and unfinished ones are redone")
    written = sorted((out / "maps/train").glob("*.npz"))
    assert len(written) == 4 and not list((out / "maps/train").glob(".*.tmp"))
    for path in written:
        load_maps(path)  # whole
    monkeypatch.undo()
    code, err = _cli(capsys, "infer", config_file, *overrides)
    assert code == 0, err
    for split in ("train", "val"):
        for path in (finished / "maps" / split).glob("*.npz"):
            again = load_maps(out / "maps" / split / path.name)
            np.testing.assert_allclose(again.maps, load_maps(path).maps, atol=2e-3)  # 2 f16 ulps


def test_full_disk_during_a_log_append_leaves_no_torn_line(tmp_path, monkeypatch):
    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\n')

    class FullDisk(io.FileIO):
        def write(self, data) -> int:
            super().write(bytes(data)[: len(data) // 2])  # half lands, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(io_module, "open", lambda path, mode, buffering=-1: FullDisk(path, mode),
                        raising=False)
    with pytest.raises(OutputError, match=r"train_log\.jsonl: cannot write \(No space left"):
        append_lines(log, ['{"step": 2, "loss": 0.5}'])
    assert log.read_text() == '{"step": 1}\n'


def test_unwritable_output_folder_is_one_line(finished, tiny_dataset, tmp_path, config_file,
                                              capsys, monkeypatch):
    """Root ignores permissions, so the denial is simulated at the one call every write
    starts with (creating the temporary file); a real chmod follows when not root."""
    out = _copy(finished, tmp_path)
    overrides = tiny_overrides(tiny_dataset, out)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    def denied(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))

    with monkeypatch.context() as patch:
        patch.setattr("tempfile.mkstemp", denied)
        for command in ("evaluate", "infer", "train"):
            code, err = _cli(capsys, command, config_file, *overrides)
            assert code == 2
            assert _error(err) == (
                f"cpal: error: {out / RUN_MARKER}: cannot write (Permission denied); make "
                f"{out} writable or choose another output_dir")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    if os.geteuid() != 0:  # pragma: no cover - the development machine runs as root
        out.chmod(0o555)
        try:
            code, err = _cli(capsys, "evaluate", config_file, *overrides)
            assert code == 2 and "Permission denied" in _error(err)
        finally:
            out.chmod(0o755)


# -------------------------------------------------------------------- foreign output_dir


def test_a_folder_that_is_not_a_cpal_run_is_refused_unless_forced(
    tiny_dataset, tmp_path, config_file, capsys
):
    project = tmp_path / "project"  # e.g. the dataset root, or the user's own folder
    (project / "figures").mkdir(parents=True)
    (project / "config.yaml").write_text("my: notes\n")
    (project / "metrics.json").write_text('{"mine": 1}\n')
    (project / "figures/plot.png").write_bytes(b"my figure")
    before = {p: p.read_bytes() for p in project.rglob("*") if p.is_file()}
    overrides = [*tiny_overrides(tiny_dataset, project), "train.epochs=1"]
    for command in ("run", "train", "infer", "evaluate", "labels", "figures"):
        code, err = _cli(capsys, command, config_file, *overrides)
        assert code == 2, command
        assert _error(err) == (
            f"cpal: error: 'output_dir': {project} is not empty (config.yaml, figures, "
            "metrics.json) and is not a cpal run, whose files would be overwritten: choose a "
            "new or empty folder, or pass --force (output_dir_force=true) to write there "
            "anyway"), command
    assert {p: p.read_bytes() for p in project.rglob("*") if p.is_file()} == before
    code, err = _cli(capsys, "train", config_file, *overrides, "--force")
    assert code == 0, err
    assert (project / RUN_MARKER).is_file() and is_run_folder(project)
    code, err = _cli(capsys, "train", config_file, *overrides)  # now a run: no --force
    assert code == 0, err
    # A run made before the marker existed is recognised by its checkpoints or maps.
    legacy = tmp_path / "legacy"
    shutil.copytree(project / "checkpoints", legacy / "checkpoints")
    assert is_run_folder(legacy)
    plain = tmp_path / "a_file"
    plain.write_text("x")
    code, err = _cli(capsys, "train", config_file, *tiny_overrides(tiny_dataset, plain))
    assert code == 2
    assert _error(err) == f"cpal: error: 'output_dir': {plain} is a file, not a folder"
