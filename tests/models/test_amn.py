"""AMN's network, loss and maps against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from cpal.engine.irn import grid_maps
from cpal.models.amn import AMN, amn_loss, amn_maps, smoothed_targets

LN2, LN3 = math.log(2.0), math.log(3.0)


def _logits_for(pixels: list[list[float]], shape: tuple[int, int]) -> torch.Tensor:
    """(1, K, H, W) logits from one K-vector per pixel, in raster order."""
    values = torch.tensor(pixels, dtype=torch.float64)  # (H * W, K)
    return values.T.reshape(1, -1, *shape)


def test_smoothed_targets_put_one_minus_eps_on_the_label_and_share_the_rest():
    labels = torch.tensor([[[2, 0, 255]]])
    targets = smoothed_targets(labels, 4, 0.4)
    assert targets.shape == (1, 4, 1, 3)
    expected = torch.tensor([[0.4 / 3, 0.4 / 3, 0.6, 0.4 / 3],  # label 2
                             [0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3],  # label 0
                             [0.6, 0.4 / 3, 0.4 / 3, 0.4 / 3]])  # ignored: background's row
    assert torch.allclose(targets[0, :, 0].T, expected)


def test_loss_by_hand_fg_and_bg_averaged_apart_255_ignored():
    # Softmax of log(1, 2, 1) is (1/4, 1/2, 1/4); with eps 0.4 and 3 labels the targets are
    # 0.6 on the label and 0.2 on each other, so the cross entropy is
    #   label 1: 0.2 ln4 + 0.6 ln2 + 0.2 ln4 = 1.4 ln2;  label 0 or 2: 0.6 ln4 + 0.2 ln2 +
    #   0.2 ln4 = 1.8 ln2;  uniform logits: ln3 whatever the label.
    peaked = [0.0, LN2, 0.0]
    wild = [100.0, -100.0, 0.0]  # the ignored pixel: any loss it entered would be huge
    labels = torch.tensor([[[1, 0, 0], [2, 255, 0]]])
    logits = _logits_for([peaked, peaked, [0.0, 0.0, 0.0], peaked, wild, peaked], (2, 3))
    terms = amn_loss(logits, labels, eps=0.4)
    fg = (1.4 * LN2 + 1.8 * LN2) / 2
    bg = (1.8 * LN2 + LN3 + 1.8 * LN2) / 3
    assert terms.fg.item() == pytest.approx(fg, rel=1e-6)
    assert terms.bg.item() == pytest.approx(bg, rel=1e-6)
    # The reference code halves the sum of the two means (1.4 ln2 + ln3 / 6 here); one mean
    # over the five labelled pixels would be (3.2 + 3.6) ln2 / 5 + ln3 / 5 instead.
    assert terms.total.item() == pytest.approx(1.4 * LN2 + LN3 / 6, rel=1e-6)
    pooled = (6.8 * LN2 + LN3) / 5
    assert abs(terms.total.item() - pooled) > 1e-3


def test_without_smoothing_the_loss_is_two_plain_cross_entropies():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, 6)
    labels = torch.randint(0, 4, (2, 5, 6))
    labels[0, 0, :3] = 255
    terms = amn_loss(logits, labels, eps=0.0)
    ce = F.cross_entropy(logits, labels.clamp(max=3), reduction="none")
    fg, bg = (labels > 0) & (labels != 255), labels == 0
    # float32 sums of 60 terms in another order: relative 1e-5.
    assert terms.fg.item() == pytest.approx(ce[fg].mean().item(), rel=1e-5)
    assert terms.bg.item() == pytest.approx(ce[bg].mean().item(), rel=1e-5)


def test_a_batch_without_foreground_has_a_zero_fg_term_not_nan():
    logits = torch.zeros(1, 3, 2, 2, requires_grad=True)
    terms = amn_loss(logits, torch.zeros(1, 2, 2, dtype=torch.long))
    assert terms.fg.item() == 0.0 and terms.total.item() == pytest.approx(LN3 / 2)
    terms.total.backward()
    assert torch.isfinite(logits.grad).all()


def test_label_conditioning_scales_each_images_2048_channels_by_its_own_labels():
    torch.manual_seed(0)
    net = AMN(20, arch="resnet50", width=1.0).eval()
    seen: dict[str, torch.Tensor] = {}
    net.backbone.layer4.register_forward_hook(lambda m, i, o: seen.update(f4=o))
    net.aspp.register_forward_hook(lambda m, i, o: seen.update(aspp_in=i[0]))
    images = torch.randn(2, 3, 32, 32)
    labels = torch.zeros(2, 20)
    labels[0, 3] = labels[1, [7, 14]] = 1.0
    with torch.no_grad():
        logits = net(images, labels)
    f4 = seen["f4"]
    assert f4.shape == (2, 2048, 2, 2)  # output stride 16
    code = net.label_enc(labels)
    assert code.shape == (2, 2048)
    assert torch.equal(seen["aspp_in"], f4 * code[:, :, None, None])
    assert logits.shape == (2, 21, 2, 2)  # background + 20 classes
    # Image 0's logits do not depend on image 1's labels.
    other = labels.clone()
    other[1] = 0.0
    other[1, 2] = 1.0
    with torch.no_grad():
        again = net(images, other)
    # Same inputs for image 0 (float32, one algorithm): equal to rounding.
    assert torch.allclose(again[0], logits[0], atol=1e-6)
    assert not torch.allclose(again[1], logits[1], atol=1e-4)
    with pytest.raises(ValueError, match=r"labels must be \(B, 20\)"):
        net(images, labels[:, :19])


def test_param_groups_are_the_trunk_and_the_new_layers_with_the_stem_frozen():
    net = AMN(4, arch="resnet18", width=0.125)
    trunk, new = net.param_groups(5e-6, 20.0, 1e-4)
    assert (trunk["lr"], new["lr"]) == (5e-6, pytest.approx(1e-4))
    assert trunk["weight_decay"] == new["weight_decay"] == 1e-4
    frozen = {id(p) for p in [*net.backbone.conv1.parameters(), *net.backbone.bn1.parameters()]}
    assert not frozen & {id(p) for p in trunk["params"]}
    assert {id(p) for p in new["params"]} == {
        id(p) for p in [*net.label_enc.parameters(), *net.aspp.parameters()]}
    counted = len(trunk["params"]) + len(new["params"])
    assert counted == sum(1 for p in net.parameters() if p.requires_grad)


def test_maps_softmax_over_every_label_then_min_max_of_the_present_ones_only():
    # 4 labels (background + 3 classes), class 2 present; three pixels whose softmax is
    # (1, 1, 2, 1) / 5, (3, 1, 1, 1) / 6 and (1, 1, 6, 1) / 9.
    logits = _logits_for([[0.0, 0.0, LN2, 0.0], [LN3, 0.0, 0.0, 0.0],
                          [0.0, 0.0, math.log(6.0), 0.0]], (1, 3)).float()[0]
    maps = amn_maps(logits, torch.tensor([2]))
    assert maps.shape == (2, 1, 3)  # background and class 2 only
    bg = np.array([1 / 5, 3 / 6, 1 / 9])
    cls = np.array([2 / 5, 1 / 6, 6 / 9])
    eps = 1e-5
    expected_bg = (bg - bg.min()) / (bg.max() - bg.min() + eps)
    expected_cls = (cls - cls.min()) / (cls.max() - cls.min() + eps)
    assert np.allclose(maps[0, 0].numpy(), expected_bg, atol=1e-6)
    assert np.allclose(maps[1, 0].numpy(), expected_cls, atol=1e-6)
    assert maps[1, 0, 0].item() == pytest.approx((0.4 - 1 / 6) / 0.5, abs=1e-4)
    # Where the IR labels said background, the softmax itself stays.
    keep = torch.tensor([[False, True, False]])
    kept = amn_maps(logits, torch.tensor([2]), keep)
    assert kept[1, 0, 1].item() == pytest.approx(1 / 6, abs=1e-6)
    assert kept[0, 0, 1].item() == pytest.approx(0.5, abs=1e-6)
    assert torch.equal(kept[:, :, [0, 2]], maps[:, :, [0, 2]])
    # No class present: the background channel alone.
    assert amn_maps(logits, torch.tensor([], dtype=torch.long)).shape == (1, 1, 3)
    with pytest.raises(ValueError, match=r"present classes must lie in 1..3"):
        amn_maps(logits, torch.tensor([4]))


def test_the_walk_reads_the_maps_on_the_grid_raised_to_the_power():
    maps = np.array([[[0.1, 0.3], [0.5, 0.7]]], dtype=np.float32)  # area mean 0.4
    on_grid = grid_maps(maps, (1, 1), torch.device("cpu"), power=1.3)
    assert on_grid.item() == pytest.approx(0.4 ** 1.3, rel=1e-6)
    assert grid_maps(maps, (1, 1), torch.device("cpu")).item() == pytest.approx(0.4)


def test_dropout_draws_from_the_given_generator_in_training_only():
    torch.manual_seed(0)
    net = AMN(3, arch="resnet18", width=0.125, dropout=0.5).train()
    images, labels = torch.randn(2, 3, 32, 32), torch.eye(3)[:2]

    def logits(*seeds: int, batch: slice = slice(None)) -> torch.Tensor:
        with torch.no_grad():
            return net(images[batch], labels[batch],
                       [torch.Generator().manual_seed(s) for s in seeds])

    assert torch.equal(logits(1, 2), logits(1, 2))  # the masks are the generators' alone
    assert not torch.allclose(logits(1, 2)[1], logits(1, 3)[1])
    # Image 1's mask is its own generator's, not its batch's: the same alone.
    assert torch.allclose(logits(3, batch=slice(1, 2))[0], logits(1, 3)[1], atol=1e-6)
    with pytest.raises(ValueError, match="1 generators for 2 images"):
        logits(1)
    net.eval()
    assert torch.equal(logits(1, 2), logits(3, 4))  # no dropout at inference
