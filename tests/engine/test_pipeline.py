"""End-to-end behaviour of the stages on a tiny generated dataset."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cpal.cli import main
from cpal.config import load_config
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.paths import RunPaths
from cpal.errors import CheckpointError, ConfigError, DatasetError
from cpal.io import load_maps
from cpal.pipeline import run, stage_infer, stage_labels, stage_train
from tests.helpers import chain_overrides, killed_in_second_epoch, tiny_overrides


@pytest.mark.slow
def test_run_writes_every_artifact(tiny_config):
    metrics = run(tiny_config, progress=False)
    paths = RunPaths(tiny_config.output_path)
    # maps: one file per image, present classes only, values in [0, 1], full resolution
    root = Path(tiny_config.data.root)
    train_ids = (root / "ImageSets/Segmentation/train.txt").read_text().split()
    record = load_maps(paths.maps("train") / f"{train_ids[0]}.npz")
    assert record.maps.shape[1:] == (64, 64)
    # 1e-3 ~ one float16 ulp below 1 (maps are stored as float16).
    assert record.maps.min() >= 0 and record.maps.max() <= 1.0 + 1e-3
    labels = json.loads((root / "image_labels.json").read_text())
    assert len(record.classes) == len(labels[train_ids[0]])
    # pseudo labels: palette PNGs for every training image, only present classes or bg
    for image_id in train_ids:
        png = Image.open(paths.labels("train") / f"{image_id}.png")
        assert png.mode == "P"
        assert set(np.unique(np.asarray(png))) <= {0, *load_maps(
            paths.maps("train") / f"{image_id}.npz").classes.tolist()}
    # metrics: pseudo-label mIoU in percent with its protocol; threshold tuned on val
    pseudo = metrics["pseudo_labels"]
    assert 0 <= pseudo["miou"] <= 100
    assert pseudo["protocol"]["threshold_choice"] == "tuned"
    assert pseudo["protocol"]["tuned_on"] == "val" and pseudo["protocol"]["gt_used_for_tuning"]
    assert metrics["maps"]["train"]["oracle_best"]["protocol"]["threshold_choice"] == "oracle"
    assert len(metrics["maps"]["val"]["sweep"]) == 19
    for name in ("overlay_train.png", "threshold_sweep.png", "per_class_iou.png"):
        assert Image.open(paths.figures / name).size[0] > 100
    stages = json.loads(paths.stages.read_text())
    assert set(stages) == {"train", "infer", "evaluate", "refine", "labels", "figures"}
    assert stages["refine"]["method"] == "none" and stages["labels"]["source"] == "seeds"
    # Without a refinement the seeds are the pseudo masks, scored once with one protocol.
    assert metrics["seeds"] == {k: v for k, v in pseudo.items() if k != "source"}
    assert not paths.seeds("train").exists()


@pytest.mark.slow
def test_run_whole_chain(tiny_dataset, tmp_path, capsys):
    """train -> maps -> IRN -> pseudo masks -> DeepLab -> its evaluation, one command, every
    stage's number in one table with its protocol."""
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    out = tmp_path / "run"
    assert main(["run", str(config), *tiny_overrides(tiny_dataset, out),
                 *chain_overrides("irn"), "--no-progress"]) == 0
    table = capsys.readouterr().out
    for row in ("| cam maps (train) |", "| seeds (train) |", "| irn: IR labels (train, ",
                "| irn labels (train) |", "| pseudo labels (train, from irn) |",
                "| segmentation (val) |"):
        assert row in table
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["pseudo_labels"]["source"] == "irn"
    assert metrics["pseudo_labels"]["miou"] == metrics["refine"]["irn"]["labels"]["miou"]
    assert metrics["segmentation"]["protocol"]["threshold_choice"] == "fixed"
    stages = json.loads((out / "stages.json").read_text())
    assert list(stages) == ["train", "infer", "evaluate", "refine", "labels", "segment",
                            "segment_eval", "figures"]
    paths = RunPaths(out)
    ids = (tiny_dataset / "ImageSets/Segmentation/train.txt").read_text().split()
    assert (paths.figures / "segmentation_val.png").is_file()
    for image_id in ids:  # the final pseudo masks are IRN's labels
        assert (paths.labels("train") / f"{image_id}.png").read_bytes() == (
            paths.refined("irn", "train") / f"{image_id}.png").read_bytes()


@pytest.mark.slow
def test_chain_sees_images_at_the_dataset_scale(tiny_dataset, tmp_path):
    """With data.min_long_side every network of the chain sees the enlarged images (IRN's
    boundaries, DeepLab in training and at inference), and every label stays at the
    image's own size."""
    config, out = tmp_path / "c.yaml", tmp_path / "run"
    config.write_text("{}\n")
    assert main(["run", str(config), *tiny_overrides(tiny_dataset, out),
                 *chain_overrides("irn"), "data.min_long_side=96", "train.crop_size=auto",
                 "train.resize_long=auto", "--no-progress"]) == 0
    paths = RunPaths(out)
    seg = load_checkpoint(latest_checkpoint(paths.segmentation / "checkpoints"))
    assert seg.meta["image_scale"] == 1.5  # the tiny images are 64 px
    record = json.loads((paths.predictions("val") / "_labels.json").read_text())
    assert record["image_scale"] == 1.5
    metrics = json.loads((out / "metrics.json").read_text())
    # segment.infer.scales [1.0] x 1.5
    assert metrics["segmentation"]["protocol"]["inference"].startswith("scales 1.5")
    for folder in (paths.refined("irn", "train"), paths.labels("train"),
                   paths.predictions("val")):
        for png in folder.glob("*.png"):
            assert Image.open(png).size == (64, 64)


def test_resume_after_crash_equals_uninterrupted_run(tiny_dataset, tmp_path):
    straight = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "straight"))
    stage_train(straight, progress=False)

    crashed = load_config(None, tiny_overrides(tiny_dataset, tmp_path / "crashed"))
    with pytest.raises(KeyboardInterrupt):
        stage_train(crashed, progress=False, hooks=killed_in_second_epoch())
    assert latest_checkpoint(RunPaths(crashed.output_path).checkpoints).name == "epoch_001.json"
    stage_train(crashed, progress=False)

    a = load_checkpoint(latest_checkpoint(RunPaths(straight.output_path).checkpoints))
    b = load_checkpoint(latest_checkpoint(RunPaths(crashed.output_path).checkpoints))
    assert (a.epoch, a.step) == (b.epoch, b.step) == (2, 6)
    summaries = [json.loads(line) for line in
                 RunPaths(crashed.output_path).train_log.read_text().splitlines()]
    assert [r["epoch"] for r in summaries if "mean_loss" in r] == [1, 2]
    for key, value in a.model.items():
        assert torch.equal(value, b.model[key]), key


def test_resume_refuses_changed_settings(tiny_config, tiny_dataset):
    stage_train(tiny_config, progress=False)
    changed = load_config(None, [*tiny_overrides(tiny_dataset, tiny_config.output_path),
                                 "train.lr=0.01"])
    with pytest.raises(CheckpointError, match=r"other settings \(train\.lr\)"):
        stage_train(changed, progress=False)


def test_training_never_reads_masks(tiny_dataset, tmp_path):
    root = tmp_path / "no_masks"
    shutil.copytree(tiny_dataset, root)
    shutil.rmtree(root / "SegmentationClass")
    config = load_config(None, [*tiny_overrides(root, tmp_path / "run"), "train.epochs=1"])
    stage_train(config, progress=False)
    stage_infer(config, progress=False)
    # with no GT anywhere, a fixed threshold still exports labels; their mIoU is not claimed
    config = load_config(None, [*tiny_overrides(root, tmp_path / "run"), "train.epochs=1",
                                "labels.threshold=0.3"])
    result = stage_labels(config, progress=False)
    assert result["miou"] is None
    assert result["skipped"] == "GT masks for 0 of 24 images; not evaluated"


def test_infer_skips_finished_images(tiny_config):
    stage_train(tiny_config, progress=False)
    first = stage_infer(tiny_config, progress=False)
    assert first == {"train": 24, "val": 8}
    victim = sorted(RunPaths(tiny_config.output_path).maps("val").glob("*.npz"))[0]
    victim.unlink()
    assert stage_infer(tiny_config, progress=False) == {"train": 0, "val": 1}


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["config", str(tmp_path / "nope.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("cpal: error:") and "nope.yaml" in err and "\n" not in err
    assert main(["train", _empty(tmp_path), "train.epochz=3"]) == 2
    err = capsys.readouterr().err.strip()
    assert "train.epochz" in err and "train.epochs" in err
    assert main(["train", _empty(tmp_path), f"data.root={tmp_path / 'missing'}",
                 f"output_dir={tmp_path / 'out'}"]) == 2
    assert "missing" in capsys.readouterr().err


def _empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("{}\n")
    return str(path)


def test_evaluate_external_label_dir(tiny_dataset, tmp_path, capsys):
    # GT masks themselves as "labels": a perfect score, computed through the CLI.
    from cpal.io import save_label_png

    gt_dir = tmp_path / "gt_as_labels"
    ids = (tiny_dataset / "ImageSets/Segmentation/val.txt").read_text().split()
    for image_id in ids:
        mask = np.asarray(Image.open(tiny_dataset / "SegmentationClass" / f"{image_id}.png"))
        save_label_png(gt_dir / f"{image_id}.png", np.where(mask == 255, 0, mask))
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tiny_dataset}\n")
    assert main(["evaluate", str(cfg), "--labels", str(gt_dir), "--split", "val"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("mIoU 100.00") and "val (8 images)" in out


def test_result_does_not_depend_on_worker_count(tiny_dataset, tmp_path):
    states = []
    for workers in (0, 2):
        cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / f"w{workers}"),
                                 "train.epochs=1", f"data.num_workers={workers}"])
        stage_train(cfg, progress=False)
        states.append(load_checkpoint(latest_checkpoint(RunPaths(cfg.output_path).checkpoints)))
    for key, value in states[0].model.items():
        assert torch.equal(value, states[1].model[key]), key


def test_data_check_cli(tiny_dataset, tmp_path, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"data:\n  root: {tiny_dataset}\n")
    assert main(["data", "check", str(cfg), "--decode"]) == 0
    out = capsys.readouterr().out
    assert "train: 24 images OK (images, labels, masks (decoded))" in out
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dataset, broken)
    (broken / "SegmentationClass" / "val_00003.png").unlink()
    cfg.write_text(f"data:\n  root: {broken}\n")
    assert main(["data", "check", str(cfg), "--masks"]) == 2
    assert "val_00003" in capsys.readouterr().err


def test_cli_accepts_overrides_around_options(capsys):
    demo = str(Path(__file__).resolve().parents[2] / "configs" / "demo.yaml")
    assert main(["config", demo, "seed=3", "--no-progress", "train.epochs=2"]) == 0
    out = capsys.readouterr().out
    assert "seed: 3" in out and "epochs: 2" in out


def test_infer_refuses_unfinished_training_and_stale_maps(tiny_config, tiny_dataset):
    with pytest.raises(KeyboardInterrupt):
        stage_train(tiny_config, progress=False, hooks=killed_in_second_epoch())
    with pytest.raises(CheckpointError, match="stopped at epoch 1 of 2"):
        stage_infer(tiny_config, progress=False)
    stage_train(tiny_config, progress=False)
    stage_infer(tiny_config, progress=False)
    other_scales = load_config(None, [*tiny_overrides(tiny_dataset, tiny_config.output_path),
                                      "infer.scales=[1.0]"])
    with pytest.raises(ConfigError, match=r"other settings \(inference, scales\)"):
        stage_infer(other_scales, progress=False)


def test_killed_labels_run_is_not_reused(tiny_config, tiny_dataset, monkeypatch):
    import cpal.engine.label_dirs as pipeline_module

    fixed = [*tiny_overrides(tiny_dataset, tiny_config.output_path), "labels.threshold=0.4"]
    cfg = load_config(None, fixed)
    stage_train(cfg, progress=False)
    stage_infer(cfg, progress=False)
    clean = stage_labels(cfg, progress=False)["miou"]
    real_save, written = pipeline_module.save_label_png, {"n": 0}

    def dies_after_three(*args, **kwargs):
        written["n"] += 1
        if written["n"] > 3:
            raise KeyboardInterrupt
        real_save(*args, **kwargs)

    monkeypatch.setattr(pipeline_module, "save_label_png", dies_after_three)
    with pytest.raises(KeyboardInterrupt):
        stage_labels(load_config(None, [*fixed, "labels.threshold=0.05"]), progress=False)
    monkeypatch.setattr(pipeline_module, "save_label_png", real_save)
    assert stage_labels(cfg, progress=False)["miou"] == clean


def test_missing_image_fails_before_training(tiny_dataset, tmp_path):
    root = tmp_path / "broken"
    shutil.copytree(tiny_dataset, root)
    (root / "JPEGImages" / "train_00007.png").unlink()
    cfg = load_config(None, [*tiny_overrides(root, tmp_path / "run"), "data.num_workers=2"])
    with pytest.raises(DatasetError, match="train_00007"):
        stage_train(cfg, progress=False)
    assert not RunPaths(cfg.output_path).checkpoints.exists()
