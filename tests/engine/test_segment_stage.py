"""The segmentation stage on a tiny run's pseudo masks: training through the shared
trainer (killed and resumed exactly), from pseudo masks alone (the train split has no
GT mask here),
predictions resumable, scored with the protocol its training labels carry, a split
without masks in the VOC server's layout; bad pseudo masks are one line naming the file."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpal.cli import main
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.hooks import Interrupt
from cpal.engine.paths import RunPaths
from cpal.errors import CheckpointError
from cpal.io import save_label_png
from cpal.pipeline import (
    stage_labels,
    stage_segment,
    stage_segment_eval,
    summary_table,
)
from tests.helpers import chain_overrides, cli_error, copied_run, finished_cam_run, tiny_overrides


@pytest.fixture(scope="module")
def data_root(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny dataset without the train split's GT masks (nothing after the maps may
    read them) and with a split `test` of images without masks or labels (VOC test)."""
    root = tmp_path_factory.mktemp("segment-data") / "tiny"
    shutil.copytree(tiny_dataset, root)
    for image_id in (root / "ImageSets/Segmentation/train.txt").read_text().split():
        (root / "SegmentationClass" / f"{image_id}.png").unlink()
    val = (root / "ImageSets/Segmentation/val.txt").read_text().split()
    for i, image_id in enumerate(val[:3]):
        shutil.copy(root / "JPEGImages" / f"{image_id}.png", root / "JPEGImages" / f"t{i}.png")
    (root / "ImageSets/Segmentation/test.txt").write_text("t0\nt1\nt2\n")
    return root


@pytest.fixture(scope="module")
def labelled(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished CAM run with its maps and pseudo masks (no refinement); tests copy it."""
    out = tmp_path_factory.mktemp("segment") / "run"
    cfg = finished_cam_run(data_root, out, *chain_overrides("none"))
    assert stage_labels(cfg, progress=False)["skipped"].startswith("GT masks for 0 of 24")
    return out


def _config(root: Path, labelled: Path, tmp_path: Path, *extra: str):
    return copied_run(root, labelled, tmp_path, *chain_overrides("none"), *extra)


def test_training_predictions_and_protocol(data_root, labelled, tmp_path):
    cfg = _config(data_root, labelled, tmp_path)
    assert stage_segment(cfg, progress=False)["checkpoint"] == "epoch_002.json"
    result = stage_segment_eval(cfg, progress=False)
    paths = RunPaths(cfg.output_path)
    assert result["split"] == "val" and 0 <= result["miou"] <= 100
    val = (data_root / "ImageSets/Segmentation/val.txt").read_text().split()
    for image_id in val:
        png = Image.open(paths.predictions("val") / f"{image_id}.png")
        assert png.mode == "P" and png.size == (64, 64)
    protocol = result["protocol"]
    # The pseudo masks' threshold was tuned on val GT, and val scores this network: for
    # this number that threshold is an oracle, and the protocol says so.
    assert protocol["threshold_choice"] == "oracle" and protocol["tuned_on"] == "val"
    assert protocol["source"].startswith("segmentation:deeplab_v2 resnet18 x0.125 (trunk cam)")
    assert protocol["image_labels"].startswith("none at test time")
    assert "| segmentation (val) |" in summary_table(cfg)
    # Finished predictions are kept; a deleted one is redone alone.
    victim = paths.predictions("val") / f"{val[0]}.png"
    before = {p.name: p.stat().st_mtime_ns for p in paths.predictions("val").glob("*.png")}
    victim.unlink()
    assert stage_segment_eval(cfg, progress=False)["miou"] == result["miou"]
    after = {p.name: p.stat().st_mtime_ns for p in paths.predictions("val").glob("*.png")}
    assert {k for k in before if after[k] != before[k]} == {victim.name}


def test_killed_training_resumes_exactly(data_root, labelled, tmp_path):
    straight = _config(data_root, labelled, tmp_path / "a")
    stage_segment(straight, progress=False)
    killed = _config(data_root, labelled, tmp_path / "b")
    with pytest.raises(KeyboardInterrupt):
        stage_segment(killed, progress=False, hooks=[Interrupt(at_epoch=1)])
    checkpoints = RunPaths(killed.output_path).segmentation / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "epoch_001.json"
    with pytest.raises(CheckpointError, match="training stopped at epoch 1 of 2; run `cpal "
                                              "segment` to finish it"):
        stage_segment_eval(killed, progress=False)
    stage_segment(killed, progress=False)
    a = load_checkpoint(latest_checkpoint(RunPaths(straight.output_path).segmentation
                                          / "checkpoints")).model
    b = load_checkpoint(latest_checkpoint(checkpoints)).model
    for key, value in a.items():
        assert torch.equal(value, b[key]), key


def test_wrong_size_or_missing_pseudo_masks_are_one_line(data_root, labelled, tmp_path,
                                                         capsys):
    cfg = _config(data_root, labelled, tmp_path)
    labels = RunPaths(cfg.output_path).labels("train")
    victim = sorted(labels.glob("*.png"))[5]
    save_label_png(victim, np.zeros((40, 50), dtype=np.uint8))
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}\n")
    args = [str(config_file), *tiny_overrides(data_root, cfg.output_path),
            *chain_overrides("none"), "--no-progress"]
    assert main(["segment", *args]) == 2
    line = cli_error(capsys.readouterr().err)
    assert f"{victim} is 50x40 but its image" in line and "is 64x64" in line
    victim.unlink()
    assert main(["segment", *args]) == 2
    assert f"{victim}: pseudo masks missing (1 of 24); run `cpal labels`" in cli_error(
        capsys.readouterr().err)
    assert not (RunPaths(cfg.output_path).segmentation / "checkpoints").exists()


def test_a_split_without_masks_goes_to_the_server_layout(data_root, labelled, tmp_path):
    cfg = _config(data_root, labelled, tmp_path, "segment.splits=[val, test]")
    stage_segment(cfg, progress=False)
    result = stage_segment_eval(cfg, progress=False)
    server = RunPaths(cfg.output_path).server_results("test")
    assert server.as_posix().endswith("segmentation/results/VOC2012/Segmentation/comp6_test_cls")
    assert sorted(p.name for p in server.glob("*.png")) == ["t0.png", "t1.png", "t2.png"]
    assert result["splits"]["test"]["skipped"] == "GT masks for 0 of 3 images; not evaluated"
    assert result["split"] == "val"
    index = np.asarray(Image.open(server / "t0.png"))
    assert index.dtype == np.uint8 and index.max() < 11
