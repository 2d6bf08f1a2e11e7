"""The refinement and labels stages on a tiny finished run: dense CRF and IRN write their
label folders, resume (skipping finished images, redoing damaged ones), score with their
protocol, and the labels stage publishes them as the final pseudo masks; bad input is
one line naming the file."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from cpal.cli import main
from cpal.config import load_config
from cpal.data.source import open_dataset
from cpal.engine.checkpoint import latest_checkpoint, load_checkpoint
from cpal.engine.hooks import Interrupt
from cpal.engine.paths import RunPaths
from cpal.errors import ConfigError, DatasetError
from cpal.evaluation.scoring import choose_threshold
from cpal.io import MapRecord, load_maps, save_maps
from cpal.pipeline import check_run_inputs, run, stage_infer, stage_labels, stage_refine
from cpal.refine.irn import follow_threshold
from tests.helpers import chain_overrides, cli_error, copied_run, finished_cam_run, tiny_overrides


@pytest.fixture(scope="module")
def finished(tiny_dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished CAM run with its maps; tests copy it."""
    out = tmp_path_factory.mktemp("refine") / "run"
    finished_cam_run(tiny_dataset, out)
    return out


def _config(tiny_dataset: Path, finished: Path, tmp_path: Path, *extra: str):
    return copied_run(tiny_dataset, finished, tmp_path, *chain_overrides("crf"), *extra)


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets/Segmentation" / f"{split}.txt").read_text().split()


def test_crf_stage_scores_resumes_and_is_published(tiny_dataset, finished, tmp_path, capsys):
    cfg = _config(tiny_dataset, finished, tmp_path)
    paths = RunPaths(cfg.output_path)
    result = stage_refine(cfg, progress=False)
    assert result["written"] == 24
    labels = result["labels"]
    assert 0 <= labels["miou"] <= 100
    protocol = labels["protocol"]
    # The irn preset refines the seeds: their threshold, tuned on val GT, is in it.
    assert protocol["threshold_choice"] == "tuned" and protocol["tuned_on"] == "val"
    assert protocol["refinement"].startswith("dense CRF (irn: 10 iterations, labels unary")
    folder = paths.refined("crf", "train")
    assert sorted(p.stem for p in folder.glob("*.png")) == sorted(_ids(tiny_dataset, "train"))
    # Rerun: nothing redone; a deleted and a truncated file are redone, the latter named.
    assert stage_refine(cfg, progress=False)["written"] == 0
    victims = sorted(folder.glob("*.png"))[:2]
    victims[0].unlink()
    whole = victims[1].read_bytes()
    victims[1].write_bytes(whole[:40])
    capsys.readouterr()
    assert stage_refine(cfg, progress=False)["written"] == 2
    err = capsys.readouterr().err
    assert f"{victims[1]}: damaged label file (truncated PNG); redoing it" in err
    assert victims[1].read_bytes() == whole

    final = stage_labels(cfg, progress=False)
    assert final["source"] == "crf" and final["miou"] == labels["miou"]
    for image_id in _ids(tiny_dataset, "train"):  # copies of the refined labels
        assert (paths.labels("train") / f"{image_id}.png").read_bytes() == (
            folder / f"{image_id}.png").read_bytes()
        assert (paths.seeds("train") / f"{image_id}.png").is_file()


def test_a_probability_preset_needs_no_threshold(tiny_dataset, finished, tmp_path):
    cfg = _config(tiny_dataset, finished, tmp_path, "refine.preset=clip_es")
    protocol = stage_refine(cfg, progress=False)["labels"]["protocol"]
    assert protocol["threshold_choice"] == "none" and not protocol["gt_used_for_tuning"]
    assert "ignore below 0.95" in protocol["refinement"]


def test_missing_and_wrong_size_maps_are_one_line(tiny_dataset, finished, tmp_path, capsys):
    cfg = _config(tiny_dataset, finished, tmp_path)
    maps = RunPaths(cfg.output_path).maps("train")
    victim = sorted(maps.glob("*.npz"))[3]
    victim.unlink()
    config_file = tmp_path / "c.yaml"
    config_file.write_text("{}\n")
    args = [str(config_file), *tiny_overrides(tiny_dataset, cfg.output_path),
            *chain_overrides("crf"), "--no-progress"]
    assert main(["refine", *args]) == 2
    line = cli_error(capsys.readouterr().err)
    assert f"{victim}: map missing (1 of 24 for split 'train')" in line
    save_maps(victim, MapRecord(classes=np.array([1]), maps=np.zeros((1, 20, 30), np.float32)))
    assert main(["refine", *args]) == 2
    assert f"{victim}: maps are 30x20 but the image is 64x64" in cli_error(
        capsys.readouterr().err)


def test_labels_refuse_refined_labels_of_other_maps(tiny_dataset, finished, tmp_path):
    cfg = _config(tiny_dataset, finished, tmp_path)
    stage_refine(cfg, progress=False)
    again = load_config(None, [*tiny_overrides(tiny_dataset, cfg.output_path),
                               *chain_overrides("crf"), "infer.scales=[1.0]"])
    shutil.rmtree(RunPaths(cfg.output_path).maps("train"))
    shutil.rmtree(RunPaths(cfg.output_path).maps("val"))
    stage_infer(again, progress=False)
    with pytest.raises(DatasetError, match=r"crf labels made from other maps .* run `cpal "
                                           r"refine` again"):
        stage_labels(again, progress=False)


def test_unknown_method_and_preset_are_named():
    with pytest.raises(ConfigError, match=r"'refine.method': unknown refinement method 'inr' "
                                          r"\(did you mean 'irn'\?\)"):
        load_config(None, ["refine.method=inr"])
    with pytest.raises(ConfigError, match=r"'irn.crf_preset': IR labels refine label maps"):
        load_config(None, ["irn.crf_preset=clip_es"])


# ------------------------------------------------------------------------------- IRN


def test_irn_stage_and_its_kill_and_resume(tiny_dataset, finished, tmp_path):
    """IR labels, IRNet trained through the shared trainer (killed after 2 of its 3 steps
    and resumed from the mid-epoch checkpoint: the same weights as an uninterrupted run),
    the random walk's labels."""
    every = "irn.train.checkpoint_every_steps=1"
    straight = _config(tiny_dataset, finished, tmp_path / "a", "refine.method=irn", every)
    result = stage_refine(straight, progress=False)
    paths = RunPaths(straight.output_path)
    assert sorted(p.stem for p in paths.refined("irn", "train").glob("*.png")) == sorted(
        _ids(tiny_dataset, "train"))
    ir = result["ir_labels"]
    assert 0 < ir["ignored"] < 100 and ir["protocol"]["threshold"] == 0.3
    protocol = result["labels"]["protocol"]
    # IRN's thresholds are fixed in advance: no GT tuned these labels.
    assert protocol["threshold_choice"] == "fixed" and protocol["threshold"] == 0.25
    assert not protocol["gt_used_for_tuning"] and "random walk radius 5" in protocol["refinement"]

    killed = _config(tiny_dataset, finished, tmp_path / "b", "refine.method=irn", every)
    with pytest.raises(KeyboardInterrupt):
        stage_refine(killed, progress=False, hooks=[Interrupt(at_step=2)])
    checkpoints = RunPaths(killed.output_path).refinement("irn") / "checkpoints"
    assert latest_checkpoint(checkpoints).name == "step_00000002.json"
    assert not RunPaths(killed.output_path).refined("irn", "train").exists()
    stage_refine(killed, progress=False)
    a = load_checkpoint(latest_checkpoint(paths.refinement("irn") / "checkpoints")).model
    b = load_checkpoint(latest_checkpoint(checkpoints)).model
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    walked = RunPaths(killed.output_path).refined("irn", "train")
    for path in paths.refined("irn", "train").glob("*.png"):
        assert (walked / path.name).read_bytes() == path.read_bytes()


def test_irn_needs_its_trunk_before_training(tiny_dataset, tmp_path):
    cfg = load_config(None, [*tiny_overrides(tiny_dataset, tmp_path / "run"),
                             *chain_overrides("irn"), "irn.trunk=pretrained"])
    with pytest.raises(ConfigError, match=r"'irn.pretrained': the irn trunk starts from "
                                          r"ImageNet weights"):
        run(cfg, progress=False)
    assert not RunPaths(cfg.output_path).checkpoints.exists()


def test_irn_thresholds_follow_the_seeds(tiny_dataset, finished, tmp_path):
    """irn.calibration=seeds: IRN's three thresholds are carried over to the maps' own
    calibration (the seeds' threshold, tuned on val GT), and every protocol says so."""
    cfg = _config(tiny_dataset, finished, tmp_path, "refine.method=irn",
                  "irn.calibration=seeds", "irn.reference_threshold=0.25")
    tuned = choose_threshold(cfg, open_dataset(cfg.data))
    assert tuned.choice == "tuned" and 0 < tuned.value < 1
    result = stage_refine(cfg, progress=False)
    ir, walked = result["ir_labels"]["protocol"], result["labels"]["protocol"]
    # The reference 0.25 goes to the seeds' threshold: the walk's background 0.25 becomes it.
    assert walked["threshold"] == pytest.approx(tuned.value, abs=1e-4)
    assert ir["threshold"] == pytest.approx(follow_threshold(0.30, tuned.value, 0.25), abs=1e-4)
    for protocol in (ir, walked):
        assert protocol["threshold_choice"] == "tuned" and protocol["tuned_on"] == "val"
        assert protocol["gt_used_for_tuning"]
        assert f"IRN's thresholds follow the seeds' {tuned.value:g} (tuned)" in (
            protocol["refinement"])
    record = RunPaths(cfg.output_path).refinement("irn") / "ir_labels" / "train"
    assert sorted(p.stem for p in record.glob("*.png")) == sorted(_ids(tiny_dataset, "train"))
    # AMN keeps its reference's thresholds: the switch is refused there, before training.
    amn = _config(tiny_dataset, finished, tmp_path / "amn", "refine.method=amn",
                  "irn.calibration=seeds")
    with pytest.raises(ConfigError, match=r"'irn.calibration': seeds is built for "
                                          r"refine.method=irn"):
        check_run_inputs(amn, progress=False)


def _give_maps_a_background(cfg, split: str = "train") -> None:
    """Turn the copied CAM run's maps into maps with their own background channel (1 - max
    of the classes), as a prototype method writes them."""
    for path in sorted(RunPaths(cfg.output_path).maps(split).glob("*.npz")):
        record = load_maps(path)
        top = record.maps.max(axis=0) if len(record.maps) else np.zeros(record.maps.shape[1:])
        save_maps(path, replace(record, background=(1.0 - top).astype(np.float32)))


def test_irn_on_the_maps_own_background(tiny_dataset, finished, tmp_path):
    """irn.background=own (SIPE's chain): maps with a background channel are split and
    walked against it, no threshold enters, and the protocol and records say so; CAM maps
    (no background channel) keep IRN's planes."""
    cam = _config(tiny_dataset, finished, tmp_path / "cam", "refine.method=irn",
                  "irn.background=own")
    planes = stage_refine(cam, progress=False)["labels"]["protocol"]
    assert "background 0.25" in planes["refinement"] and planes["threshold"] == 0.25

    own = _config(tiny_dataset, finished, tmp_path / "own", "refine.method=irn",
                  "irn.background=own")
    _give_maps_a_background(own)
    result = stage_refine(own, progress=False)
    for key in ("ir_labels", "labels"):
        protocol = result[key]["protocol"]
        assert protocol["threshold_choice"] == "none" and protocol["threshold"] is None
        assert not protocol["gt_used_for_tuning"]
        assert "against the maps' own background, confident bg x0.5" in protocol["refinement"]
    assert "random walk of [own background, maps]^1.5" in result["labels"]["protocol"][
        "refinement"]
    paths = RunPaths(own.output_path)
    walked = paths.refined("irn", "train")
    assert sorted(p.stem for p in walked.glob("*.png")) == sorted(_ids(tiny_dataset, "train"))
    record = json.loads((walked / "_labels.json").read_text())
    assert record["background"] == "own" and record["own_power"] == 1.5
    ir_record = json.loads((paths.refinement("irn") / "ir_labels" / "train" / "_labels.json")
                           .read_text())
    assert ir_record["params"]["own_bg_factor"] == 0.5

    # One maps file without its background in a run whose maps have one: a line naming it.
    broken = _config(tiny_dataset, finished, tmp_path / "broken", "refine.method=irn",
                     "irn.background=own")
    _give_maps_a_background(broken)
    victim = sorted(RunPaths(broken.output_path).maps("train").glob("*.npz"))[5]
    save_maps(victim, replace(load_maps(victim), background=None))
    with pytest.raises(DatasetError, match=rf"{victim}: no background channel"):
        stage_refine(broken, progress=False)
