"""IRNet: boundary grid at stride 4, frozen trunk, and the pair affinity losses by hand."""

import math

import pytest
import torch
from torch import nn

from cpal.models.irnet import (
    IRNet,
    affinity_labels,
    affinity_loss,
    boundary_map,
    displacement_loss,
    path_affinity,
)

WIDTH = 0.125


@pytest.fixture(scope="module")
def irn() -> IRNet:
    torch.manual_seed(0)
    return IRNet(arch="resnet50", width=WIDTH, displacement=True)


def test_boundary_and_displacement_at_stride_4(irn):
    irn.train()
    out = irn(torch.randn(2, 3, 64, 80))
    assert out.boundary.shape == (2, 1, 16, 20)
    assert out.displacement is not None and out.displacement.shape == (2, 2, 16, 20)
    odd = irn(torch.randn(1, 3, 62, 70))  # strided grids round up; upsampled ones are cropped
    assert odd.boundary.shape == (1, 1, 16, 18) and odd.displacement.shape == (1, 2, 16, 18)


def test_boundary_branch_reads_five_levels_like_irn(irn):
    levels = irn.edge.levels
    assert [lvl[0].in_channels for lvl in levels] == [8, 32, 64, 128, 256]  # stem, layer1..4
    assert all(lvl[0].out_channels == 32 and lvl[0].bias is None for lvl in levels)
    assert all(isinstance(lvl[1], nn.GroupNorm) and lvl[1].num_groups == 4 for lvl in levels)
    factors = [1 if isinstance(lvl[2], nn.Identity) else lvl[2].scale_factor for lvl in levels]
    assert factors == [1, 1, 2, 4, 4]  # strides 4, 4, 8, 16, 16 brought to 4
    assert all(isinstance(lvl[3], nn.ReLU) for lvl in levels)  # after the upsampling
    assert irn.edge.fuse.in_channels == 160 and irn.edge.fuse.out_channels == 1
    assert irn.edge.fuse.bias is not None
    os8 = IRNet(arch="resnet18", width=WIDTH, output_stride=8)
    assert [1 if isinstance(lvl[2], nn.Identity) else lvl[2].scale_factor
            for lvl in os8.edge.levels] == [1, 1, 2, 2, 2]
    assert os8(torch.randn(1, 3, 32, 32)).boundary.shape == (1, 1, 8, 8)
    assert os8.displacement is None


def test_trunk_is_frozen_and_branches_train(irn):
    irn.train()
    assert not irn.backbone.training and irn.edge.training
    stats = irn.backbone.layer2[0].bn1.running_mean.clone()
    irn.zero_grad(set_to_none=True)
    out = irn(torch.randn(2, 3, 32, 32) * 3 + 1)
    (out.boundary.sum() + out.displacement.sum()).backward()
    assert torch.equal(irn.backbone.layer2[0].bn1.running_mean, stats)
    assert all(p.grad is None and not p.requires_grad for p in irn.backbone.parameters())
    assert all(p.grad is not None for p in irn.edge.parameters())
    groups = {g["name"]: g for g in irn.param_groups(0.1, 1e-4)}
    assert groups["edge"]["lr"] == 0.1 and groups["displacement"]["lr"] == pytest.approx(1.0)
    assert groups["edge"]["weight_decay"] == groups["displacement"]["weight_decay"] == 1e-4


def test_displacement_mean_shift_applies_in_eval_only(irn):
    x = torch.randn(1, 3, 32, 32)
    irn.eval()
    with torch.no_grad():
        before = irn(x).displacement
        irn.displacement.mean_shift.copy_(torch.tensor([0.5, -1.0]))
        shifted = irn(x).displacement
        irn.train()
        raw = irn(x).displacement
    irn.displacement.mean_shift.zero_()
    torch.testing.assert_close(shifted, before - torch.tensor([0.5, -1.0]).view(1, 2, 1, 1))
    torch.testing.assert_close(raw, before)


def test_boundary_map_averages_the_mirror_logits(irn):
    irn.eval()
    images = torch.randn(1, 3, 30, 38)
    with torch.no_grad():
        a = irn(images).boundary
        b = irn(images.flip(-1)).boundary.flip(-1)
    prob = boundary_map(irn, images)
    assert prob.shape == (1, 1, 8, 10)
    torch.testing.assert_close(prob, torch.sigmoid((a + b) / 2)[..., :8, :10])


# ---------------------------------------------------------------------------------------
# Pair affinities on a 3 x 3 grid with a wall down the middle column:
#   boundary          labels (IR labels: 0 bg, 255 unsure)
#   .1  .9  .2        0    1    1
#   .0  .8  .3        0  255    1
#   .1  .7  .0        2    2    1

BOUNDARY = torch.tensor([[0.1, 0.9, 0.2], [0.0, 0.8, 0.3], [0.1, 0.7, 0.0]]).view(1, 1, 3, 3)
LABELS = torch.tensor([[[0, 1, 1], [0, 255, 1], [2, 2, 1]]])
SRC = torch.tensor([0, 0, 6, 5, 4, 6])
DST = torch.tensor([2, 3, 8, 8, 5, 7])
PATHS = torch.tensor([[0, 1, 2], [0, 3, 3], [6, 7, 8], [5, 8, 8], [4, 5, 5], [6, 7, 7]])
#                     across wall  down     across wall  down   unsure     one step
AFFINITY = [0.1, 0.9, 0.3, 0.7, 0.2, 0.3]


def test_affinity_is_one_minus_the_max_boundary_on_the_path():
    aff = path_affinity(BOUNDARY, PATHS)
    assert aff.shape == (1, 6)
    torch.testing.assert_close(aff, torch.tensor([AFFINITY]))
    # IRN's grouped layout: (directions, sources, L) keeps its shape, groups concatenate
    grouped = path_affinity(BOUNDARY.expand(2, 1, 3, 3), PATHS.view(2, 3, 3))
    assert grouped.shape == (2, 2, 3)
    split = path_affinity(BOUNDARY, [PATHS[:2], PATHS[2:, :2].clone()])  # shorter paths
    torch.testing.assert_close(split[0, :2], aff[0, :2])
    with pytest.raises(ValueError, match=r"\[0, 9\)"):
        path_affinity(BOUNDARY, torch.tensor([[0, 9]]))


def test_affinity_labels_split_bg_fg_and_different_pairs():
    labels = affinity_labels(LABELS, SRC, DST)
    assert labels.bg_pos.tolist() == [[0, 1, 0, 0, 0, 0]]
    assert labels.fg_pos.tolist() == [[0, 0, 0, 1, 0, 1]]
    assert labels.neg.tolist() == [[1, 0, 1, 0, 0, 0]]  # the unsure pair is in none


def test_affinity_loss_hand_computed():
    boundary = BOUNDARY.clone().requires_grad_(True)
    loss = affinity_loss(path_affinity(boundary, PATHS), affinity_labels(LABELS, SRC, DST))
    e = 1e-5  # IRN's: inside the logs and in each mean's denominator
    bg = -math.log(0.9 + e) / (1 + e)
    fg = (-math.log(0.7 + e) - math.log(0.3 + e)) / (2 + e)  # over the fg-fg pairs alone
    neg = (-math.log(1 + e - 0.1) - math.log(1 + e - 0.3)) / (2 + e)
    assert loss.bg_pos.item() == pytest.approx(bg, rel=1e-6)
    assert loss.fg_pos.item() == pytest.approx(fg, rel=1e-6)
    assert loss.neg.item() == pytest.approx(neg, rel=1e-6)
    assert loss.total.item() == pytest.approx(((bg + fg) / 2 + neg) / 2, rel=1e-6)
    loss.total.backward()
    # only the max pixel of each labelled path gets a gradient; the unsure pair none
    grad = boundary.grad.view(-1)
    assert grad[4] == 0 and grad[3] == 0  # unsure pair's max (4) / never a path max (3)
    assert grad[1] < 0 and grad[0] > 0  # a wall pushed up by a neg pair, bg pushed down


def test_displacement_loss_hand_computed():
    disp = torch.zeros(1, 2, 3, 3)
    disp[0, :, 1, 2] = torch.tensor([0.5, 0.0])  # pixel 5
    disp[0, :, 2, 2] = torch.tensor([-0.2, 0.1])  # pixel 8
    disp[0, :, 0, 0] = torch.tensor([0.1, 0.2])  # pixel 0
    disp[0, :, 1, 0] = torch.tensor([0.0, -0.1])  # pixel 3
    fg, bg = displacement_loss(disp, SRC, DST, affinity_labels(LABELS, SRC, DST))
    # fg 5->8 offset (1, 0): |0.7 - 1| + |-0.1| = 0.4; fg 6->7 offset (0, 1): 0 + 1 = 1
    assert fg.item() == pytest.approx((0.4 + 1.0) / 4, rel=1e-4)
    # bg 0->3 should not move: |0.1| + |0.3| = 0.4, over 1 pair x 2 channels
    assert bg.item() == pytest.approx(0.4 / 2, rel=1e-4)
