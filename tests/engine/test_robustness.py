"""Damaged artefacts, output folders that are full, unwritable or not a cpal run, and the
checks `cpal run` makes before training: each ends in one line naming the file or key and
exit 2, or is repaired and reported, and nothing already written is lost."""

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
from PIL import Image
from safetensors import SafetensorError

import cpal.engine.checkpoint as checkpoint_module
import cpal.io as io_module
from cpal.cli import main
from cpal.config import load_config
from cpal.engine.checkpoint import (
    damaged_since,
    latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    scan_checkpoints,
)
from cpal.engine.output_dir import RUN_MARKER, is_run_folder
from cpal.engine.paths import RunPaths
from cpal.errors import CheckpointError, OutputError
from cpal.io import append_lines, load_maps
from cpal.pipeline import stage_infer, stage_labels, stage_train
from tests.helpers import killed_in_second_epoch, tiny_overrides


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


def test_truncated_checkpoint_is_named_by_infer_and_redone_by_train(
    finished, tiny_dataset, tmp_path, config_file, capsys
):
    out = _copy(finished, tmp_path)
    shutil.rmtree(out / "maps")
    overrides = tiny_overrides(tiny_dataset, out)
    tensors = out / "checkpoints/epoch_002.safetensors"
    size = tensors.stat().st_size
    tensors.write_bytes(tensors.read_bytes()[: size // 2])
    code, err = _cli(capsys, "infer", config_file, *overrides)
    assert code == 2
    assert _error(err) == (
        f"cpal: error: {tensors}: damaged checkpoint (truncated: {size // 2} bytes, "
        f"epoch_002.json records {size}); run `cpal train` to redo it (from epoch_001.json)"
    )
    # Training falls back to the checkpoint before it, and says so.
    code, err = _cli(capsys, "train", config_file, *overrides)
    assert code == 0, err
    assert _warnings(err) == [
        f"cpal: warning: {tensors}: damaged checkpoint (truncated: {size // 2} bytes, "
        "epoch_002.json records " f"{size}); training continues from epoch_001.json and "
        "redoes the steps after it"
    ]
    _assert_same_weights(_weights(out), _weights(finished))  # redone exactly
    assert scan_checkpoints(out / "checkpoints")[1] == []
    code, err = _cli(capsys, "infer", config_file, *overrides)
    assert code == 0, err


def test_damaged_checkpoints_are_told_from_kill_leftovers(tmp_path):
    model = torch.nn.Linear(3, 2)
    for epoch, step, stem in [(1, 4, None), (2, 8, None), (2, 6, "step_00000006")]:
        save_checkpoint(tmp_path, epoch=epoch, step=step, model=model, optimizer=None,
                        meta={}, stem=stem)
    (tmp_path / "epoch_002.safetensors").unlink()  # a marker without its tensors
    (tmp_path / "step_00000006.json").write_text('{"epoch": 2, "st')  # a damaged marker
    (tmp_path / "epoch_003.safetensors").write_bytes(b"half")  # a kill's leftover: ignored
    complete, damaged = scan_checkpoints(tmp_path)
    assert [p.name for p in complete] == ["epoch_001.json"]
    assert [(d.culprit.name, d.step, d.epoch) for d in damaged] == [
        ("epoch_002.safetensors", 8, 2), ("step_00000006.json", 6, None)]
    assert damaged[0].problem.startswith("missing; epoch_002.json expects")
    assert damaged[1].problem.startswith("marker is not a checkpoint record")
    assert damaged_since(tmp_path, complete[-1]) == damaged
    # The right size but unreadable content: named, never loaded.
    first = tmp_path / "epoch_001.safetensors"
    first.write_bytes(b"\0" * first.stat().st_size)
    with pytest.raises(CheckpointError, match=r"epoch_001\.safetensors: damaged checkpoint"):
        load_checkpoint(tmp_path / "epoch_001.json")
    # Once a complete checkpoint is as far as them, pruning removes the damaged ones.
    save_checkpoint(tmp_path, epoch=2, step=8, model=model, optimizer=None, meta={})
    prune_checkpoints(tmp_path, keep=2)
    assert scan_checkpoints(tmp_path)[1] == []
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_001.json", "epoch_001.safetensors", "epoch_002.json", "epoch_002.safetensors"]


def test_checkpoint_files_follow_the_umask(tmp_path, monkeypatch):
    model = torch.nn.Linear(2, 2)
    for umask in (0o022, 0o027):
        monkeypatch.setattr(io_module, "_UMASK", umask)
        directory = tmp_path / oct(umask)
        save_checkpoint(directory, epoch=1, step=1, model=model, optimizer=None, meta={})
        modes = {p.name: p.stat().st_mode & 0o777 for p in directory.iterdir()}
        assert modes == {"epoch_001.json": 0o666 & ~umask,
                         "epoch_001.safetensors": 0o666 & ~umask}


# ---------------------------------------------------------------------------------- maps


def test_damaged_map_files_are_named_and_redone(finished, tiny_dataset, tmp_path,
                                                config_file, capsys):
    out = _copy(finished, tmp_path)
    overrides = tiny_overrides(tiny_dataset, out)
    truncated = sorted((out / "maps/train").glob("*.npz"))[3]
    truncated.write_bytes(truncated.read_bytes()[:300])
    empty = sorted((out / "maps/val").glob("*.npz"))[1]
    empty.write_bytes(b"")
    code, err = _cli(capsys, "evaluate", config_file, *overrides)
    assert code == 2
    line = _error(err)
    assert f"{truncated}: damaged map file (" in line and "rerun `cpal infer`" in line
    code, err = _cli(capsys, "infer", config_file, *overrides)
    assert code == 0, err
    warned = _warnings(err)
    assert len(warned) == 2
    assert warned[0].startswith(f"cpal: warning: {truncated}: damaged map file (")
    assert warned[1] == f"cpal: warning: {empty}: damaged map file (empty file); redoing it"
    stages = json.loads((out / "stages.json").read_text())
    assert stages["infer"]["written"] == {"train": 1, "val": 1}
    for path in (truncated, empty):
        again, original = load_maps(path), load_maps(finished / path.relative_to(out))
        assert np.array_equal(again.classes, original.classes)
        # Float16 storage: another batch may round to the neighbouring value (2 ulps near 1).
        np.testing.assert_allclose(again.maps, original.maps, atol=2e-3)
    code, err = _cli(capsys, "evaluate", config_file, *overrides)
    assert code == 0, err


def test_damaged_label_file_is_redone(finished, tiny_dataset, tmp_path, capsys):
    out = _copy(finished, tmp_path)
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, out), "labels.threshold=0.3"])
    first = stage_labels(cfg, progress=False)["miou"]
    capsys.readouterr()
    victim = sorted((out / "labels/train").glob("*.png"))[2]
    whole = victim.read_bytes()
    victim.write_bytes(whole[: len(whole) // 2])
    assert stage_labels(cfg, progress=False)["miou"] == first
    assert _warnings(capsys.readouterr().err) == [
        f"cpal: warning: {victim}: damaged label file (truncated PNG); redoing it"]
    assert victim.read_bytes() == whole


# ------------------------------------------------------------------------- training log


def test_torn_last_log_line_is_dropped_and_redone(finished, tiny_dataset, tmp_path, capsys):
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "run"))
    with pytest.raises(KeyboardInterrupt):
        stage_train(cfg, progress=False, hooks=killed_in_second_epoch())
    log = RunPaths(cfg.output_path).train_log
    rows = log.read_text().splitlines()
    with log.open("a") as handle:  # a kill (or a full disk) during the next append
        handle.write('{"epoch": 2, "step": 4, "lo')
    capsys.readouterr()
    stage_train(cfg, progress=False)
    assert _warnings(capsys.readouterr().err) == [
        f"cpal: warning: {log} line {len(rows) + 1}: torn last row dropped (not JSON); "
        "training continues from epoch_001.json"]
    steps = [json.loads(line)["step"] for line in log.read_text().splitlines()]
    assert steps == [1, 2, 3, 3, 4, 5, 6, 6]
    _assert_same_weights(_weights(cfg.output_path), _weights(finished))


def test_damaged_log_row_before_the_checkpoint_is_dropped_with_a_warning(tmp_path, capsys):
    from cpal.engine.hooks import truncate_log

    log = tmp_path / "train_log.jsonl"
    log.write_text('{"step": 1}\nnot json\n{"step": 2}\n{"step": 3}\n')
    truncate_log(log, 2, "epoch_001.json")
    assert log.read_text() == '{"step": 1}\n{"step": 2}\n'
    assert _warnings(capsys.readouterr().err) == [
        f"cpal: warning: {log} line 2: damaged row dropped (not JSON); training continues "
        "from epoch_001.json"]


def test_a_run_killed_before_its_first_checkpoint_restarts_its_log(tiny_dataset, tmp_path,
                                                                   monkeypatch):
    """Killed while writing its first checkpoint (the log rows before it are flushed
    first): the rerun starts over, and so does the log, instead of appending a second
    copy of the same steps."""
    cfg = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "run"))

    def killed(tensors, filename):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(checkpoint_module, "save_file", killed)
        with pytest.raises(KeyboardInterrupt):
            stage_train(cfg, progress=False)
    log = RunPaths(cfg.output_path).train_log
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [1, 2, 3, 3]
    assert latest_checkpoint(RunPaths(cfg.output_path).checkpoints) is None
    stage_train(cfg, progress=False)
    assert [json.loads(x)["step"] for x in log.read_text().splitlines()] == [
        1, 2, 3, 3, 4, 5, 6, 6]


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


# ------------------------------------------------------------ checks before training


def _broken_copy(tiny_dataset: Path, tmp_path: Path, breakage: str) -> tuple[Path, str]:
    """A copy of the dataset with one problem in the val split; returns the root and the
    text the error must contain."""
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    val = root / "ImageSets/Segmentation/val.txt"
    first = val.read_text().split()[0]
    if breakage == "empty val list":
        val.write_text("")
        return root, f"split file {val} lists no image ids"
    if breakage == "missing val list":
        val.unlink()
        return root, f"split file not found: {val}"
    if breakage == "unknown class":
        labels = json.loads((root / "image_labels.json").read_text())
        labels[first] = [*labels[first], "unicorn"]
        (root / "image_labels.json").write_text(json.dumps(labels))
        return root, f"image id '{first}' has unknown class 'unicorn'"
    mask_path = root / "SegmentationClass" / f"{first}.png"
    mask = np.asarray(Image.open(mask_path)).copy()
    mask[0, 0] = 77
    Image.fromarray(mask, mode="L").save(mask_path)
    return root, f"mask {mask_path} has value(s) 77"


@pytest.mark.parametrize("breakage", ["empty val list", "missing val list", "unknown class",
                                      "mask value out of range"])
def test_run_checks_every_split_before_training(breakage, tiny_dataset, tmp_path,
                                                config_file, capsys):
    root, expected = _broken_copy(tiny_dataset, tmp_path, breakage)
    out = tmp_path / "run"
    code, err = _cli(capsys, "run", config_file, *tiny_overrides(root, out))
    assert code == 2
    assert expected in _error(err)
    assert not (out / "checkpoints").exists() and not (out / "train_log.jsonl").exists()


@pytest.mark.slow
def test_train_ids_in_the_tuning_split_are_refused_or_labelled(tiny_dataset, tmp_path,
                                                               config_file, capsys):
    root = tmp_path / "data"
    shutil.copytree(tiny_dataset, root)
    lists = root / "ImageSets/Segmentation"
    shared = (lists / "train.txt").read_text().split()[:2]
    with (lists / "val.txt").open("a") as handle:
        handle.write("".join(f"{i}\n" for i in shared))
    out = tmp_path / "run"
    overrides = [*tiny_overrides(root, out), "train.epochs=1"]
    code, err = _cli(capsys, "run", config_file, *overrides)
    assert code == 2
    assert _error(err) == (
        f"cpal: error: 'labels.tune_split': {lists / 'val.txt'} shares 2 image(s) with "
        f"{lists / 'train.txt'} (e.g. '{shared[0]}'): a threshold tuned on 'val' would not be "
        "held out; remove them from one list, set labels.threshold, or set "
        "labels.allow_split_overlap=true to report the threshold as not held out")
    assert not (out / "checkpoints").exists()
    code, err = _cli(capsys, "run", config_file, *overrides, "labels.allow_split_overlap=true")
    assert code == 0, err
    assert any("reported as NOT held out" in line for line in _warnings(err))
    protocol = json.loads((out / "metrics.json").read_text())["pseudo_labels"]["protocol"]
    assert protocol["threshold_choice"] == "tuned" and protocol["tuning_overlap"] == 2
    assert "tuned on val GT (NOT held out: 2 of its images are also in train)" in (
        protocol["description"])
