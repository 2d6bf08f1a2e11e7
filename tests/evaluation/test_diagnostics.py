"""Border-share and prototype-separation diagnostics on hand-made cases."""

from __future__ import annotations

import numpy as np
import torch

from cpal.config import load_config
from cpal.engine.infer import PrototypeInference
from cpal.evaluation.diagnostics import (
    BorderShare,
    PartBodyRecall,
    border_band,
    prototype_separation,
)
from cpal.models.cam_net import build_network


def test_border_band_width_is_an_eighth_of_the_short_side() -> None:
    band = border_band((16, 24))
    assert band.sum() == 16 * 24 - (16 - 4) * (24 - 4)  # width round(16 / 8) = 2
    assert not band[2:-2, 2:-2].any() and band[0].all() and band[:, -1].all()


def test_border_share_counts_object_pixels_in_the_band() -> None:
    gt = np.zeros((16, 16), dtype=np.uint8)
    gt[6:10, 6:10] = 1  # object in the middle: none in the band
    pred = np.zeros_like(gt)
    pred[0:2, :] = 1  # a frame along the top: 32 pixels, all in the band
    pred[6:10, 6:10] = 1  # plus the object (16 pixels)
    gt[0, 0] = 255  # ignored pixels count for neither
    share = BorderShare()
    share.update(pred, gt)
    d = share.to_dict()
    assert d["gt_object_in_border_band"] == 0.0
    assert d["predicted_object_in_border_band"] == round(100 * 31 / 47, 2)


def test_prototype_separation_runs_on_a_tiny_model() -> None:
    cfg = load_config(None, ["method=sipe", "model.arch=resnet18", "model.width=0.125",
                             "model.frozen_bn=false"])
    torch.manual_seed(0)
    net, _ = build_network(cfg, 3)
    net.eval()
    images = [torch.randn(3, 64, 64) for _ in range(4)]
    labels = [torch.tensor([1.0, 0, 1]), torch.tensor([1.0, 0, 0]), torch.tensor([0, 1.0, 0]),
              torch.tensor([1.0, 1, 0])]
    sep = prototype_separation(net, images, labels, PrototypeInference())
    assert sep.images == 4
    d = sep.to_dict()
    for key in ("cos_background_vs_class", "cos_same_class_across_images",
                "cos_other_class_across_images"):
        value = d[key]
        assert np.isnan(value) or -1.0 <= value <= 1.0


def test_part_body_recall_on_a_hand_made_case() -> None:
    gt = np.zeros((8, 8), dtype=np.uint8)
    gt[2:6, 2:6] = 1  # one object of 16 pixels
    parts = np.zeros((8, 8), dtype=bool)
    parts[2:4, 2:4] = True  # its part: 4 pixels
    pred = np.zeros_like(gt)
    pred[2:4, 2:6] = 1  # the part and 4 body pixels found
    pred[4, 2] = 2  # a body pixel with the wrong class
    pred[0, 0:3] = 1  # 3 false object pixels, one of them on ignored GT
    gt[0, 2] = 255
    recall = PartBodyRecall()
    recall.update(pred, gt, parts)
    d = recall.to_dict()
    assert d["part_recall"] == 100.0
    assert d["body_recall"] == round(100 * 4 / 12, 2)
    assert d["object_precision"] == round(100 * 8 / 11, 2)  # 8 correct of 11 counted
    assert d["part_share_of_objects"] == 25.0
