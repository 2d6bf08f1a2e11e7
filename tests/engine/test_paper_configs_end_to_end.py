"""The shipped paper configs, end to end on miniature prepared VOC and COCO trees.

`cpal data prepare` -> `cpal run configs/<dataset>/cpal_r50.yaml data.root=...` with only
the network and sizes shrunk: the configs' splits (VOC train_aug + SBD masks, COCO's
contiguous classes), threshold protocol and CPAL settings are the ones users run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cpal.cli import main
from tests.data.prepare_fixtures import TRAIN_AUG, VOC_TRAIN, make_coco, make_sbd, make_voc
from tests.helpers import REPO

pytestmark = pytest.mark.slow

SMALL = [  # a network and sizes for 8 px images on a CPU; everything else as shipped
    "model.arch=resnet18", "model.width=0.125", "model.frozen_bn=false",
    "model.frozen_stages=0", "train.epochs=1", "train.batch_size=2", "train.crop_size=32",
    "train.resize_long=[32,32]", "train.checkpoint_every_steps=null", "infer.scales=[1.0]",
    "infer.batch_size=2", "data.num_workers=0", "bank.size=8",
    "bank.clusters=2", "awareness.top_k=1", "viz.num_images=1", "threads=1",
    # The later stages' trunks from this run's CAM network (no ImageNet files in tests).
    "irn.trunk=cam", "irn.train.epochs=1", "irn.train.batch_size=2", "irn.train.crop_size=32",
    "refine.workers=1", "segment.trunk=cam", "segment.arch=resnet18", "segment.width=0.125",
    "segment.train.steps=2", "segment.train.batch_size=2", "segment.train.grad_accum=1",
    "segment.train.crop_size=32", "segment.train.checkpoint_every_steps=null",
    "segment.infer.crf=null", "segment.infer.batch_size=2",
]


def _run(config: str, root: Path, out: Path) -> dict:
    code = main(["run", str(REPO / "configs" / config), f"data.root={root}",
                 f"output_dir={out}", *SMALL, "--no-progress"])
    assert code == 0
    return json.loads((out / "metrics.json").read_text())


def test_voc12_config_on_a_prepared_voc_with_sbd(tmp_path):
    pytest.importorskip("scipy")
    voc, sbd = make_voc(tmp_path / "VOC2012"), make_sbd(tmp_path / "sbd")
    assert main(["data", "prepare", "voc", "--root", str(voc), "--sbd", str(sbd),
                 "--workers", "1"]) == 0
    metrics = _run("voc12/cpal_r50.yaml", voc, tmp_path / "run")
    log = [json.loads(line) for line in (tmp_path / "run/train_log.jsonl").read_text().splitlines()]
    # Trained on train_aug (VOC train + SBD, 6 images here: 3 steps of 2), scored on train.
    assert log[-1]["step"] == len(TRAIN_AUG) // 2
    assert metrics["maps"]["train"]["num_images"] == len(VOC_TRAIN)
    # The seeds' background threshold is tuned on val GT.
    assert metrics["seeds"]["protocol"]["threshold_choice"] == "tuned"
    assert metrics["pseudo_labels"]["source"] == "irn"
    # SIPE's chain into IRN (irn.background=own): PACAM's own background, no threshold.
    assert metrics["pseudo_labels"]["protocol"]["threshold_choice"] == "none"
    assert "against the maps' own background" in metrics["pseudo_labels"]["protocol"][
        "refinement"]
    assert "miou" in metrics["segmentation"]
    assert metrics["maps"]["train"]["own_background"]["protocol"]["threshold_choice"] == "none"


def test_coco14_config_on_a_prepared_coco(tmp_path):
    pytest.importorskip("pycocotools")
    coco = make_coco(tmp_path / "COCO2014")
    assert main(["data", "prepare", "coco", "--root", str(coco), "--workers", "1"]) == 0
    metrics = _run("coco14/cam_r50.yaml", coco, tmp_path / "run")
    classes = (coco / "classes.txt").read_text().split()
    assert list(metrics["maps"]["train"]["oracle_best"]["per_class"]) == classes
    assert metrics["maps"]["train"]["num_images"] == 2  # images with annotations only
