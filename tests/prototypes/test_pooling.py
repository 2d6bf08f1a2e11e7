"""Hand-computed cases for the CAM target, SIPE's seed rule and the instance prototypes."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal.prototypes.pooling import (
    affinity_iou,
    background_and_classes,
    cam_with_background,
    channel_mask,
    masked_average,
    pcm_refine,
    region_prototypes,
    region_weights,
    sipe_seeds,
)

EXACT = {"atol": 1e-4, "rtol": 0}  # SIPE normalises by (norm + 1e-5): hand values move ~1e-5


def test_masked_average_hand_case() -> None:
    # z: D=2 on a 2x2 grid; pixel values (1,0), (0,1), (2,2), (4,0).
    z = torch.tensor([[[1.0, 0.0], [2.0, 4.0]], [[0.0, 1.0], [2.0, 0.0]]])[None]
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]])[None]
    out = masked_average(z, w, eps=0.0)
    # channel 0: ((1,0) + (4,0)) / 2; channel 1: ((0,1) + 3*(2,2)) / 4
    expected = torch.tensor([[[2.5, 0.0], [1.5, 1.75]]])
    torch.testing.assert_close(out, expected)


def test_background_from_all_classes_then_absent_zeroed() -> None:
    # Raw CAM (1, 3, 1, 2): class 1 present, class 2 absent but strong on pixel 1.
    cam = torch.tensor([[[[2.0, 1.0]], [[4.0, 4.0]], [[0.0, -1.0]]]])
    cam[0, 1, 0] = torch.tensor([1.0, 4.0])
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    full = background_and_classes(cam, labels, "all")
    # normalised: class 0 -> (1, .5), class 1 -> (.25, 1), class 2 -> (0, 0)
    torch.testing.assert_close(full[0, 0, 0], torch.tensor([0.0, 0.0]), **EXACT)  # 1 - max all
    present = background_and_classes(cam, labels, "present")
    torch.testing.assert_close(present[0, 0, 0], torch.tensor([0.0, 0.5]), **EXACT)
    target = cam_with_background(cam, labels, background_from="all")
    torch.testing.assert_close(target[0, 2], torch.zeros(1, 2))  # absent class zeroed
    torch.testing.assert_close(target[0, 1, 0], torch.tensor([1.0, 0.5]), **EXACT)


def test_padding_zeroes_every_channel() -> None:
    cam = torch.rand(2, 3, 2, 3) + 0.1
    labels = torch.tensor([[1.0, 1.0, 1.0], [1.0, 0.0, 0.0]])
    spatial = torch.ones(2, 1, 2, 3)
    spatial[:, :, :, 2] = 0  # last column is padding
    m = cam_with_background(cam, labels, spatial=spatial)
    assert torch.all(m[:, :, :, 2] == 0)  # background too: padding is neither fg nor bg
    mask = channel_mask(labels, spatial)
    assert mask.shape == (2, 4, 2, 3)
    assert mask[1, 2].sum() == 0 and mask[1, 0, :, :2].sum() == 4


def _seed_case() -> tuple[torch.Tensor, torch.Tensor]:
    """1x4 grid: pixels 0,1 share feature e0, pixels 2,3 share e1 (affinity blocks of 1)."""
    f = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    m = torch.tensor([[0.6, 0.6, 0.0, 0.0],  # background
                      [0.0, 0.0, 1.0, 1.0],  # class 1 (present)
                      [0.9, 0.9, 0.0, 0.0]]).view(1, 3, 1, 4)  # class 2 (absent)
    return f, m


def test_affinity_iou_hand_case() -> None:
    f, m = _seed_case()
    score = affinity_iou(f, m)
    # pixel 0: sum_y A = 2. bg: inter 1.2, union 2 + 1.2 - 1.2 = 2 -> 0.6;
    # class 1: inter 0, union 2 + 2 = 4 -> 0; class 2: inter 1.8, union 2 -> 0.9.
    # pixel 2: bg inter 0, union 3.2 -> 0; class 1: inter 2, union 2 -> 1; class 2: 0.
    torch.testing.assert_close(score[0, :, 0, 0], torch.tensor([0.6, 0.0, 0.9]), **EXACT)
    torch.testing.assert_close(score[0, :, 0, 2], torch.tensor([0.0, 1.0, 0.0]), **EXACT)


def test_sipe_seeds_absent_winner_and_padding_give_no_seed() -> None:
    f, m = _seed_case()
    mask = torch.tensor([1.0, 1.0, 0.0]).view(1, 3, 1, 1).expand(1, 3, 1, 4)
    seeds = sipe_seeds(f, m, mask, bg_factor=0.5)
    # Pixels 0, 1: the absent class 2 wins (0.9 > 0.5 * 0.6): no seed at all (SIPE).
    assert seeds[0, :, 0].tolist() == [[0, 0, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    # With class 2's map zeroed (SIPE's training target), the background wins there.
    m_masked = m * mask
    seeds = sipe_seeds(f, m_masked, mask, bg_factor=0.5)
    assert seeds[0, 0, 0].tolist() == [1, 1, 0, 0]
    # The background factor decides: bg IoU 0.6 * 0.5 = 0.3 loses to a class at 0.35.
    m_masked[0, 1, 0, :2] = 0.7  # class 1 now also covers pixels 0, 1 at 0.7
    s = affinity_iou(f, m_masked)[0, :, 0, 0]
    assert 0.5 * s[0] < s[1] < s[0]
    assert sipe_seeds(f, m_masked, mask, bg_factor=0.5)[0, 1, 0, 0] == 1
    assert sipe_seeds(f, m_masked, mask, bg_factor=1.0)[0, 0, 0, 0] == 1
    pad = mask.clone()
    pad[..., 3] = 0  # pixel 3 is padding
    assert sipe_seeds(f, m_masked, pad, bg_factor=0.5)[0, :, 0, 3].sum() == 0


def test_empty_seed_gives_zero_prototype_or_cam_fallback() -> None:
    _, m = _seed_case()
    labels = torch.tensor([[1.0, 0.0]])
    seeds = torch.zeros(1, 3, 1, 4)
    seeds[0, 1, 0, 2:] = 1  # class 1 seeded; background seed empty
    z = torch.randn(1, 5, 1, 4)
    valid = torch.tensor([[True, True, False]])
    w = region_weights(m, labels, tau=0.5, tau_bg=0.5, region="sipe_seeds", seeds=seeds)
    p = region_prototypes(z, w, valid)
    assert torch.all(p[0, 0] == 0)  # SIPE: an empty seed is a zero prototype
    torch.testing.assert_close(p[0, 1], F.normalize(z[0, :, 0, 2:].sum(1), dim=0), **EXACT)
    assert torch.all(p[0, 2] == 0)  # absent
    w = region_weights(m, labels, tau=0.5, tau_bg=0.5, region="sipe_seeds", seeds=seeds,
                       empty="cam")
    torch.testing.assert_close(w[0, 0], m[0, 0])  # falls back to the CAM's weights


def test_threshold_region() -> None:
    bg = torch.tensor([[0.9, 0.2], [0.1, 0.6]])
    a = torch.tensor([[0.1, 0.8], [0.3, 0.4]])  # only one pixel above 0.5
    cam = torch.stack([bg, a, torch.zeros(2, 2)])[None]
    z = F.normalize(torch.randn(1, 4, 2, 2), dim=1)
    labels = torch.tensor([[1.0, 0.0]])
    valid = torch.tensor([[True, True, False]])
    w = region_weights(cam, labels, tau=0.5, tau_bg=0.5, region="threshold")
    p = region_prototypes(z, w, valid)
    torch.testing.assert_close(p[0, 1], z[0, :, 0, 1], atol=1e-4, rtol=0)
    bg_p = F.normalize(z[0, :, 0, 0] + z[0, :, 1, 1], dim=0)
    torch.testing.assert_close(p[0, 0], bg_p, atol=1e-4, rtol=0)


def test_raw_prototype_norm_measures_region_consistency() -> None:
    # Unit embeddings on a 1x3 grid: (1,0), (0,1), (1,0). Class 1 covers pixels 0, 1.
    z = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])[None]  # (1, 2, 1, 3)
    w = torch.tensor([[[[0.0, 0.0, 1.0]], [[1.0, 1.0, 0.0]]]])
    valid = torch.tensor([[True, True]])
    raw = region_prototypes(z, w, valid, normalize=False)
    close = {"atol": 1e-4, "rtol": 0}  # masked_average's +1e-5 in the denominator
    torch.testing.assert_close(raw[0, 1], torch.tensor([0.5, 0.5]), **close)
    torch.testing.assert_close(raw[0, 0], torch.tensor([1.0, 0.0]), **close)
    unit = region_prototypes(z, w, valid)
    torch.testing.assert_close(unit[0, 1], torch.tensor([0.5**0.5, 0.5**0.5]), **close)


def test_pcm_propagates_within_affinity_groups() -> None:
    # Guide: pixels 0,1 share one direction, 2,3 another; A = 1 within a group, column
    # sums 2 -> each step replaces a pixel's value by its group's mean.
    g = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 1, 4)
    m = torch.tensor([1.0, 0.0, 0.4, 0.8]).view(1, 1, 1, 4)
    out = pcm_refine(m, g)
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([0.5, 0.5, 0.6, 0.6]), **EXACT)
