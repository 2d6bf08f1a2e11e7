"""Refinement method amn on tiny runs: `cpal run` end to end (AMN's network, its maps, their
IR labels, IRNet, the walk of maps^1.3, published as the pseudo masks, scored with fixed
thresholds), AMN's training killed and resumed exactly without the train split's GT
masks, and its inputs refused in one line before any training."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import cpal.engine.irn as irn_engine
from cpal.cli import main
from cpal.config import load_config
from cpal.data.source import open_dataset
from cpal.engine.amn import check_amn
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.hooks import Interrupt
from cpal.engine.paths import RunPaths
from cpal.errors import ConfigError
from cpal.io import load_maps
from cpal.pipeline import run, stage_refine
from tests.helpers import amn_overrides, cli_error, copied_run, finished_cam_run, tiny_overrides


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def test_cpal_run_with_amn(tiny_dataset, tmp_path, capsys, monkeypatch):
    walked: list[torch.Tensor] = []
    real_walk = irn_engine.random_walk

    def recording_walk(maps, boundary, params):
        walked.append(maps.clone())
        return real_walk(maps, boundary, params)

    monkeypatch.setattr(irn_engine, "random_walk", recording_walk)
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    assert main(["run", str(config), *tiny_overrides(tiny_dataset, out), *amn_overrides(),
                 "--no-progress"]) == 0
    table = capsys.readouterr().out
    for row in ("| seeds (train) |", "| amn: IR labels (train, ", "| amn labels (train) |",
                "| pseudo labels (train, from amn) |", "| segmentation (val) |"):
        assert row in table

    metrics = json.loads((out / "metrics.json").read_text())
    amn = metrics["refine"]["amn"]
    protocol = amn["labels"]["protocol"]
    # Every threshold of AMN's chain is fixed in advance: no GT tuned these labels.
    assert protocol["threshold_choice"] == "fixed" and protocol["threshold"] == 0.25
    assert not protocol["gt_used_for_tuning"]
    assert protocol["refinement"].startswith("AMN (resnet18 x0.125, trunk cam, label "
                                             "smoothing 0.4, 1 epochs) on IRN's IR labels "
                                             "(fg 0.3 / bg 0.05)")
    assert "random walk of maps^1.3, radius 5" in protocol["refinement"]
    assert amn["ir_labels"]["protocol"]["threshold"] == 0.45  # IR labels of AMN's maps
    assert amn["source_ir_labels"]["protocol"]["threshold"] == 0.3  # what AMN trained on
    assert 0 <= amn["ir_labels"]["ignored"] <= 100
    assert metrics["pseudo_labels"]["source"] == "amn"
    assert metrics["pseudo_labels"]["miou"] == amn["labels"]["miou"]
    assert metrics["segmentation"]["protocol"]["threshold_choice"] == "fixed"

    paths = RunPaths(out)
    root = paths.refinement("amn")
    ids = _ids(tiny_dataset, "train")
    layout = open_dataset(load_config(None, tiny_overrides(tiny_dataset, out)).data)
    labels = layout.image_labels(ids)
    assert latest_checkpoint(root / "checkpoints").name == "epoch_001.json"
    assert latest_checkpoint(root / "irn" / "checkpoints").name == "epoch_001.json"
    for image_id, row in zip(ids, labels, strict=True):
        record = load_maps(root / "maps" / "train" / f"{image_id}.npz")
        assert record.classes.tolist() == (np.flatnonzero(row) + 1).tolist()
        assert record.maps.shape == (len(record.classes), 64, 64)
        assert record.maps.min() >= 0 and record.maps.max() <= 1.0
        for folder in ("ir_labels", "amn_ir_labels"):
            assert (root / folder / "train" / f"{image_id}.png").is_file()
        assert (paths.labels("train") / f"{image_id}.png").read_bytes() == (
            paths.refined("amn", "train") / f"{image_id}.png").read_bytes()

    # The walk's first batch (the first images of the split, all 64 px: a 16 x 16 grid)
    # started from AMN's maps on the grid raised to 1.3.
    first = load_maps(root / "maps" / "train" / f"{ids[0]}.npz").maps
    count = len(first)
    expected = irn_engine.grid_maps(first, (16, 16), torch.device("cpu"), 1.3)
    assert torch.allclose(walked[0][0, :count], expected)
    assert not torch.allclose(walked[0][0, :count],
                              irn_engine.grid_maps(first, (16, 16), torch.device("cpu")))


@pytest.fixture(scope="module")
def no_train_masks(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset without the train split's GT masks: nothing of AMN may read them."""
    root = tmp_path_factory.mktemp("amn-data") / "tiny"
    shutil.copytree(tiny_dataset, root)
    for image_id in _ids(root, "train"):
        (root / "SegmentationClass" / f"{image_id}.png").unlink()
    return root


@pytest.fixture(scope="module")
def finished(no_train_masks: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished CAM run with its maps; tests copy it."""
    out = tmp_path_factory.mktemp("amn") / "run"
    finished_cam_run(no_train_masks, out, *amn_overrides())
    return out


def _config(root: Path, finished: Path, tmp_path: Path, *extra: str):
    return copied_run(root, finished, tmp_path, *amn_overrides(), *extra)


def test_amn_training_killed_and_resumed_equals_an_uninterrupted_run(
        no_train_masks, finished, tmp_path, capsys):
    """Killed after 2 of its 3 steps (a mid-epoch checkpoint written), AMN resumes from it:
    the same weights, the same maps and the same labels as a run that was never stopped,
    without a GT mask of the train split on disk; a damaged map is named and redone."""
    every = "amn.train.checkpoint_every_steps=1"
    straight = _config(no_train_masks, finished, tmp_path / "a", every)
    result = stage_refine(straight, progress=False)
    assert result["labels"]["skipped"] == "GT masks for 0 of 24 images; not evaluated"

    killed = _config(no_train_masks, finished, tmp_path / "b", every)
    with pytest.raises(KeyboardInterrupt):
        stage_refine(killed, progress=False, hooks=[Interrupt(at_step=2)])
    root = RunPaths(killed.output_path).refinement("amn")
    assert latest_checkpoint(root / "checkpoints").name == "step_00000002.json"
    assert not (root / "maps").exists() and not (root / "irn").exists()
    stage_refine(killed, progress=False)

    done = RunPaths(straight.output_path).refinement("amn")
    for network in ("checkpoints", "irn/checkpoints"):
        a = load_checkpoint(latest_checkpoint(done / network)).model
        b = load_checkpoint(latest_checkpoint(root / network)).model
        assert a.keys() == b.keys()
        for key, value in a.items():
            assert torch.equal(value, b[key]), (network, key)
    for folder, pattern in (("maps/train", "*.npz"), ("amn_ir_labels/train", "*.png"),
                            ("train", "*.png")):
        files = sorted((done / folder).glob(pattern))
        assert len(files) == 24
        for path in files:
            assert (root / folder / path.name).read_bytes() == path.read_bytes(), path

    # A rerun redoes a damaged map file, named, and nothing else.
    victim = sorted((root / "maps" / "train").glob("*.npz"))[5]
    victim.write_bytes(victim.read_bytes()[:100])
    capsys.readouterr()
    stage_refine(killed, progress=False)
    assert f"{victim}: damaged map file (" in capsys.readouterr().err
    assert victim.read_bytes() == (done / "maps" / "train" / victim.name).read_bytes()


def test_amn_needs_its_trunk_before_training(tiny_dataset, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    args = ["run", str(config), *tiny_overrides(tiny_dataset, out), *amn_overrides(),
            "amn.trunk=pretrained", "--no-progress"]
    assert main(args) == 2
    assert "'amn.pretrained': the amn trunk starts from ImageNet weights" in cli_error(
        capsys.readouterr().err)
    assert not RunPaths(out).checkpoints.exists()  # refused before the CAM network trained


def test_amn_refuses_a_trunk_that_is_not_a_resnet(tiny_dataset, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"),
                             "method=mctformer", "model.arch=deit_tiny", "refine.method=amn"])
    with pytest.raises(ConfigError, match=r"'refine.method': amn builds IRNet on model.arch, "
                                          r"which must be a ResNet, not deit_tiny"):
        check_amn(cfg, open_dataset(cfg.data))
    with pytest.raises(ConfigError, match=r"'refine.method': amn"):
        run(cfg, progress=False)


def test_amn_settings_are_checked_by_key():
    cases = {
        "amn.crf_preset=clip_es": r"'amn.crf_preset': IR labels refine label maps",
        "amn.optimizer=adma": r"'amn.optimizer': unknown optimizer 'adma' \(did you mean "
                              r"'adam'\?\)",
        "amn.eps=1.0": r"'amn.eps': must lie in \[0, 1\)",
        "amn.bg_threshold=0.5": r"'amn.bg_threshold': must satisfy",
        "amn.rates=[]": r"'amn.rates': must name at least one rate",
        "amn.power=0": r"'amn.power': must be > 0",
        "amn.train.batch_size=0": r"'amn.train.batch_size': must be >= 1",
    }
    for override, message in cases.items():
        with pytest.raises(ConfigError, match=message):
            load_config(None, ["refine.method=amn", override])
    cfg = load_config(None, ["refine.method=amn"])  # the reference recipe by default
    a, t = cfg.amn, cfg.amn.train
    assert (a.eps, a.rates, a.dropout, a.optimizer, a.head_lr_mult) == (
        0.4, [6, 12, 18, 24], 0.1, "adam", 20.0)
    assert (t.epochs, t.batch_size, t.crop_size, t.lr, t.weight_decay, t.poly_power) == (
        5, 16, 512, 5e-6, 1e-4, 0.0)
    assert (a.fg_threshold, a.bg_threshold, a.power) == (0.45, 0.15, 1.3)
