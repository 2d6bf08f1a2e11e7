"""Kill-anywhere reliability: mid-epoch resume, kills during checkpoint and map writes
(real process deaths, os._exit halfway through a file), sharded map generation."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cpal.cli import main
from cpal.config import load_config
from cpal.engine.checkpoint import (
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
)
from cpal.engine.hooks import Interrupt
from cpal.engine.identity import MAPS_FORMAT, MAPS_META
from cpal.engine.infer import _claim_folder, _create_exclusive
from cpal.engine.paths import RunPaths
from cpal.engine.trainer import epoch_order
from cpal.errors import ConfigError, DatasetError
from cpal.evaluation.metrics import labels_from_maps
from cpal.io import load_maps
from cpal.pipeline import run, stage_evaluate, stage_infer, stage_train
from tests.helpers import REPO, tiny_overrides

# checkpoint_every_steps=2 with 3 steps per epoch: step_00000002, epoch_001 (step 3),
# step_00000004, epoch_002 (step 6).
MID = ["train.checkpoint_every_steps=2", "train.keep_checkpoints=5"]


def _cfg(tiny_dataset, out, *extra):
    return load_config(None, [*tiny_overrides(tiny_dataset, out), *extra])


def _weights(cfg) -> dict[str, torch.Tensor]:
    return load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints)).model


def _assert_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def uninterrupted(tiny_dataset, tmp_path_factory):
    cfg = _cfg(tiny_dataset, tmp_path_factory.mktemp("straight") / "run", *MID)
    stage_train(cfg, progress=False)
    return _weights(cfg)



def _torchrun(tmp_path: Path, command: str, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node=2 -m cpal COMMAND` (an empty config file plus
    `args`), one thread per process; returns the finished process with its output."""
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}\n")
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         "-m", "cpal", command, str(config_file), *args, "--no-progress"],
        env=env, capture_output=True, text=True, timeout=180,
    )

def test_mid_epoch_checkpoints_resume_exactly(tiny_dataset, tmp_path, uninterrupted):
    cfg = _cfg(tiny_dataset, tmp_path / "run", *MID)
    with pytest.raises(KeyboardInterrupt):  # killed during its 5th step
        stage_train(cfg, progress=False, hooks=[Interrupt(at_step=4)])
    directory = RunPaths(cfg.output_path).checkpoints
    assert [p.name for p in list_checkpoints(directory)] == [
        "step_00000002.json", "epoch_001.json", "step_00000004.json"]
    ckpt = load_checkpoint(latest_checkpoint(directory))
    assert (ckpt.epoch, ckpt.step, ckpt.meta["position"]["batch"]) == (1, 4, 1)
    stage_train(cfg, progress=False)  # replays batches 2 and 3 of epoch 2 only
    _assert_equal(_weights(cfg), uninterrupted)
    log = [json.loads(x) for x in RunPaths(cfg.output_path).train_log.read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 3, 4, 5, 6, 6]
    # The epoch's mean loss counts the batches before the kill too (saved with the step).
    summary = [r for r in log if "mean_loss" in r][-1]
    rows = [r["loss"] for r in log if r.get("epoch") == 2 and "loss" in r]
    # Log rows are rounded to 6 decimals, the summary is not: abs 1e-5 (no kernel involved).
    assert summary["mean_loss"] == pytest.approx(sum(rows) / 3, abs=1e-5)


_CHILD = r"""
import json, os, sys
from pathlib import Path
import pytest
import torch
torch.set_num_threads(1)
import cpal.engine.checkpoint as checkpoint
import cpal.engine.infer as infer
from cpal.config import load_config
from cpal.io import atomic_path
from cpal.pipeline import stage_infer, stage_train

stage, overrides, target, die_at = json.loads(sys.argv[1])
calls = {"n": 0}

def dying(real, write_whole):
    # Call number `die_at` writes half of its file into the temporary file, then the
    # process dies at once (no cleanup, no finally): a kill in the middle of a write.
    def wrapper(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] < die_at:
            return real(*args, **kwargs)
        scratch = Path(os.environ["SCRATCH"]) / "whole"
        write_whole(real, scratch, *args)
        final = Path(args[1] if target == "tensors" else args[0])
        with atomic_path(final) as tmp:
            data = scratch.read_bytes()
            tmp.write_bytes(data[: len(data) // 2])
            os._exit(3)
    return wrapper

patch = pytest.MonkeyPatch()  # this process dies (os._exit) before it could undo anything
if target == "tensors":
    patch.setattr(checkpoint, "save_file", dying(
        checkpoint.save_file, lambda real, p, tensors, name: real(tensors, str(p))))
elif target == "marker":
    patch.setattr(checkpoint, "write_json_atomic", dying(
        checkpoint.write_json_atomic, lambda real, p, path, record: real(p, record)))
elif target == "maps":
    patch.setattr(infer, "save_maps", dying(
        infer.save_maps, lambda real, p, path, record: real(p, record)))
config = load_config(None, overrides)
(stage_train if stage == "train" else stage_infer)(config, progress=False)
sys.exit(0)
"""


def _die_in_child(tmp_path: Path, stage: str, overrides: list[str], target: str,
                  die_at: int) -> None:
    env = {**os.environ, "PYTHONPATH": f"{REPO / 'src'}{os.pathsep}{REPO}",
           "OMP_NUM_THREADS": "1", "SCRATCH": str(tmp_path)}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps([stage, overrides, target, die_at])],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 3, done.stderr[-2000:]


@pytest.mark.slow
@pytest.mark.parametrize("target", ["tensors", "marker"])
def test_kill_while_writing_a_checkpoint_keeps_the_previous_one(
    target, tiny_dataset, tmp_path, uninterrupted
):
    out = tmp_path / "run"
    overrides = [*tiny_overrides(tiny_dataset, out), *MID]
    _die_in_child(tmp_path, "train", overrides, target, die_at=3)  # writing step_00000004
    directory = out / "checkpoints"
    # The half-written file is a temporary (or a tensor file without its marker): the
    # newest complete checkpoint is the one before.
    assert latest_checkpoint(directory).name == "epoch_001.json"
    leftovers = {p.name for p in directory.iterdir()}
    assert any(n.startswith(".step_00000004.") and n.endswith(".tmp") for n in leftovers)
    assert ("step_00000004.safetensors" in leftovers) == (target == "marker")
    assert "step_00000004.json" not in leftovers

    cfg = load_config(None, overrides)
    stage_train(cfg, progress=False)
    _assert_equal(_weights(cfg), uninterrupted)
    assert not list(directory.glob(".*.tmp"))  # stale temporaries are cleaned up


def test_pruning_never_deletes_the_newest_complete_checkpoint(tmp_path):
    model = torch.nn.Linear(2, 2)
    for epoch, step, stem in [(1, 3, None), (1, 4, "step_00000004"), (2, 6, None)]:
        save_checkpoint(tmp_path, epoch=epoch, step=step, model=model, optimizer=None,
                        meta={}, stem=stem)
    # Ordered by step, whatever the names.
    assert [p.name for p in list_checkpoints(tmp_path)] == [
        "epoch_001.json", "step_00000004.json", "epoch_002.json"]
    # A newer checkpoint killed while writing its tensors (marker present, file short).
    save_checkpoint(tmp_path, epoch=2, step=8, model=model, optimizer=None, meta={},
                    stem="step_00000008")
    short = tmp_path / "step_00000008.safetensors"
    short.write_bytes(short.read_bytes()[:10])
    (tmp_path / ".epoch_003.safetensors.abc.tmp").write_bytes(b"half")
    prune_checkpoints(tmp_path, keep=0)  # even 0 keeps one
    assert [p.name for p in list_checkpoints(tmp_path)] == ["epoch_002.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "epoch_002.json", "epoch_002.safetensors", "step_00000008.json",
        "step_00000008.safetensors"]  # the incomplete one is never trusted, never counted
    with pytest.raises(ValueError, match="stem"):
        save_checkpoint(tmp_path, epoch=1, step=1, model=model, optimizer=None, meta={},
                        stem="latest")


def test_fp16_gradient_scaler_state_is_checkpointed(tiny_dataset, tmp_path):
    straight = _cfg(tiny_dataset, tmp_path / "a", *MID, "train.precision=fp16")
    stage_train(straight, progress=False)
    scaler = load_checkpoint(latest_checkpoint(tmp_path / "a/checkpoints")).meta["grad_scaler"]
    assert scaler["scale"] > 0 and scaler["_growth_tracker"] >= 1
    crashed = _cfg(tiny_dataset, tmp_path / "b", *MID, "train.precision=fp16")
    with pytest.raises(KeyboardInterrupt):  # killed during its 5th step
        stage_train(crashed, progress=False, hooks=[Interrupt(at_step=4)])
    stage_train(crashed, progress=False)
    resumed = load_checkpoint(latest_checkpoint(tmp_path / "b/checkpoints")).meta["grad_scaler"]
    # The growth tracker counts steps since the scale last changed: restored, not restarted.
    assert resumed == scaler
    _assert_equal(_weights(crashed), _weights(straight))


# ------------------------------------------------------------------------------- maps


@pytest.fixture(scope="module")
def trained(tiny_dataset, tmp_path_factory):
    """A finished run and its uninterrupted maps; tests copy its checkpoints."""
    base = tmp_path_factory.mktemp("trained") / "run"
    cfg = _cfg(tiny_dataset, base, "train.epochs=1", "method=sipe")
    stage_train(cfg, progress=False)
    stage_infer(cfg, progress=False)
    return base


def _copy_run(trained: Path, tiny_dataset, out: Path, *extra: str):
    shutil.copytree(trained / "checkpoints", out / "checkpoints")
    return _cfg(tiny_dataset, out, "train.epochs=1", "method=sipe", *extra)


def _assert_same_maps(a: Path, b: Path) -> None:
    names = sorted(p.name for p in a.glob("*.npz"))
    assert names == sorted(p.name for p in b.glob("*.npz")) and names
    for name in names:
        x, y = load_maps(a / name), load_maps(b / name)
        assert np.array_equal(x.classes, y.classes)
        # 2 float16 ulps near 1: a resumed or sharded run batches other images together
        # (other kernel blocking), which may round to the neighbouring float16 (measured: equal).
        np.testing.assert_allclose(x.maps, y.maps, atol=2e-3)


@pytest.mark.slow
def test_map_generation_killed_halfway_resumes_without_truncated_files(
    trained, tiny_dataset, tmp_path
):
    out = tmp_path / "run"
    cfg = _copy_run(trained, tiny_dataset, out)
    overrides = [*tiny_overrides(tiny_dataset, out), "train.epochs=1", "method=sipe"]
    _die_in_child(tmp_path, "infer", overrides, "maps", die_at=10)
    maps = out / "maps/train"
    assert len(list(maps.glob("*.npz"))) == 9
    assert len(list(maps.glob(".*.npz.*.tmp"))) == 1  # the half-written file, hidden
    for path in maps.glob("*.npz"):
        load_maps(path)  # every visible file is complete
    with pytest.raises(DatasetError, match=r"map missing \(15 of 24 for split 'train'\)"):
        stage_evaluate(cfg)  # refuses an incomplete folder, naming how many are missing
    assert stage_infer(cfg, progress=False) == {"train": 15, "val": 8}
    assert not list(maps.glob(".*.tmp"))
    _assert_same_maps(maps, trained / "maps/train")
    _assert_same_maps(out / "maps/val", trained / "maps/val")


def test_two_shards_write_disjoint_halves_whose_union_is_the_split(
    trained, tiny_dataset, tmp_path, capsys
):
    out = tmp_path / "run"
    cfg = _copy_run(trained, tiny_dataset, out)
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}\n")
    argv = [str(config_file), *tiny_overrides(tiny_dataset, out), "train.epochs=1",
            "method=sipe", "--no-progress"]
    assert main(["infer", *argv, "--shard", "1/2"]) == 0
    first = {p.name for p in (out / "maps/train").glob("*.npz")}
    ids = (tiny_dataset / "ImageSets/Segmentation/train.txt").read_text().split()
    assert first == {f"{i}.npz" for i in ids[1::2]}
    with pytest.raises(DatasetError, match=r"missing \(12 of 24 .*every shard"):
        stage_evaluate(cfg)
    assert main(["infer", *argv, "--shard", "0/2"]) == 0
    second = {p.name for p in (out / "maps/train").glob("*.npz")} - first
    assert second == {f"{i}.npz" for i in ids[0::2]}
    _assert_same_maps(out / "maps/train", trained / "maps/train")
    stages = json.loads((out / "stages.json").read_text())
    assert stages["infer"]["shard"] == "0/2" and stages["infer"]["missing"]["train"] == 0
    capsys.readouterr()
    assert main(["infer", *argv, "--shard", "2/2"]) == 2
    err = capsys.readouterr().err.strip()
    assert "'infer.shard'" in err and "\n" not in err
    with pytest.raises(ConfigError, match=r"'infer\.shard'.*cpal infer --shard"):
        run(load_config(None, [*tiny_overrides(tiny_dataset, out), "infer.shard=0/2"]),
            progress=False)


def test_maps_folder_identity_is_claimed_once(tmp_path):
    ours = {"format": MAPS_FORMAT, "checkpoint": "epoch_001.json", "scales": [1.0]}
    theirs = {"format": MAPS_FORMAT, "checkpoint": "epoch_001.json", "scales": [1.0, 0.5]}
    _create_exclusive(tmp_path / MAPS_META, ours)
    _create_exclusive(tmp_path / MAPS_META, theirs)  # loses: the first record stays
    assert json.loads((tmp_path / MAPS_META).read_text()) == ours
    assert [p.name for p in tmp_path.iterdir()] == [MAPS_META]  # no temporaries left
    _claim_folder(tmp_path, ours)  # same identity: fine
    with pytest.raises(ConfigError, match=r"other settings \(scales\)"):
        _claim_folder(tmp_path, theirs)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "a.npz").write_bytes(b"x")
    with pytest.raises(ConfigError, match="unknown origin"):
        _claim_folder(foreign, ours)
    assert not (foreign / MAPS_META).exists()


@pytest.mark.distributed
def test_torchrun_processes_split_a_shard_between_them(trained, tiny_dataset, tmp_path):
    """The real launcher: `torchrun --nproc_per_node=2 -m cpal infer --shard 1/2` writes
    shard 1 of 2 of every split (the images `cpal infer --shard 1/2` would), half of it
    per process."""
    out = tmp_path / "run"
    _copy_run(trained, tiny_dataset, out)
    done = _torchrun(tmp_path, "infer", *tiny_overrides(tiny_dataset, out), "train.epochs=1",
                     "method=sipe", "--shard", "1/2")
    assert done.returncode == 0, done.stderr[-3000:]
    for split in ("train", "val"):
        ids = (tiny_dataset / f"ImageSets/Segmentation/{split}.txt").read_text().split()
        written = {p.name for p in (out / "maps" / split).glob("*.npz")}
        assert written == {f"{i}.npz" for i in ids[1::2]}, split
    stages = json.loads((out / "stages.json").read_text())
    assert stages["infer"]["written"] == {"train": 12, "val": 4}
    assert stages["infer"]["missing"] == {"train": 12, "val": 4}


@pytest.mark.distributed
def test_one_failing_torchrun_process_ends_the_job(tiny_dataset, tmp_path):
    """A corrupt image in process 1's first micro-batch: process 1 stops with the one-line
    error while process 0 waits for it in the gradient all-reduce; torchrun then stops
    process 0 and the job fails (no hang, no checkpoint)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_dataset, data)
    ids = (data / "ImageSets/Segmentation/train.txt").read_text().split()
    first = epoch_order(len(ids), seed=0, epoch=0)[:8]  # the first global batch
    broken = next((data / "JPEGImages").glob(f"{ids[first[5]]}.*"))  # process 1: 4..7
    broken.write_bytes(b"not an image")
    done = _torchrun(tmp_path, "train", *tiny_overrides(data, tmp_path / "run"))
    assert done.returncode != 0
    assert f"cpal: error: cannot read image {broken}" in done.stderr
    assert latest_checkpoint(tmp_path / "run/checkpoints") is None


def test_bf16_maps_record_their_precision(trained, tiny_dataset, tmp_path):
    cfg = _copy_run(trained, tiny_dataset, tmp_path / "run", "infer.precision=bf16")
    assert stage_infer(cfg, progress=False) == {"train": 24, "val": 8}
    identity = json.loads((tmp_path / "run/maps/train" / MAPS_META).read_text())
    assert identity["precision"] == "bf16" and identity["inference"].endswith(", bf16")
    fp32 = json.loads((trained / "maps/train" / MAPS_META).read_text())
    assert fp32["precision"] == "fp32" and not fp32["inference"].endswith("fp32")
    # What bf16 guarantees on any processor, not one processor's rounding: bf16 rounds every
    # activation to 8 significant bits (unit roundoff u = 2^-8), and how those roundings add
    # up depends on the CPU's kernels (AVX-512 bf16 or AVX2 emulation, blocking), so single
    # pixels may move by several u (0.04 to 0.08 measured between oneDNN ISAs). Asserted:
    # the same classes, finite values in [0, 1], a mean difference of at most 5u over all
    # pixels (measured: 0.0017 to 0.0022, about u / 2), and the same pseudo label on at
    # least 95 % of pixels (measured: 98.5 to 98.8 %; only pixels within that error of the
    # threshold or of another class's map can change).
    bound_u = 2.0**-8
    differences, same, pixels = [], 0, 0
    for name in ("train", "val"):
        ours, theirs = tmp_path / "run/maps" / name, trained / "maps" / name
        for path in ours.glob("*.npz"):
            bf16, ref = load_maps(path), load_maps(theirs / path.name)
            assert np.array_equal(bf16.classes, ref.classes), path.name
            for got, want in ((bf16.maps, ref.maps), (bf16.background, ref.background)):
                if got is None:  # a map kind without its own background channel
                    continue
                assert np.isfinite(got).all() and got.min() >= 0 and got.max() <= 1, path.name
                differences.append(np.abs(got - want).ravel())
            same += int((labels_from_maps(bf16, 0.25) == labels_from_maps(ref, 0.25)).sum())
            pixels += bf16.maps.shape[1] * bf16.maps.shape[2]
    assert float(np.concatenate(differences).mean()) <= 5 * bound_u
    assert same >= 0.95 * pixels
    # fp32 maps are not reused for bf16 ones: the folder's record differs.
    shutil.copytree(trained / "maps", tmp_path / "mixed/maps")
    mixed = _copy_run(trained, tiny_dataset, tmp_path / "mixed", "infer.precision=bf16")
    with pytest.raises(ConfigError, match=r"other settings \(inference, precision\)"):
        stage_infer(mixed, progress=False)
