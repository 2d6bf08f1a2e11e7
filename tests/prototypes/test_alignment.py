from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal.prototypes.alignment import alignment_shift, compactness_loss, shift_features
from cpal.prototypes.awareness import context_aware_prototype
from cpal.prototypes.pacam import prototype_cam, shifted_prototype_cam


def test_shift_is_difference_of_means() -> None:
    # instance mean p (mean of its pixel features) and a weighted context mean
    feats = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    p = feats.mean(0)
    sel = torch.tensor([[2.0, 0.0], [0.0, 4.0]])
    w = torch.tensor([0.5, 0.5])
    _, ctx = context_aware_prototype(p, sel, w, alpha=0.5)
    delta = alignment_shift(p, ctx)
    torch.testing.assert_close(delta, torch.tensor([1.0, 2.0]) - torch.tensor([2 / 3, 2 / 3]))
    # shifting the instance features by delta makes their mean the context mean
    torch.testing.assert_close((feats + delta).mean(0), ctx)


def test_shift_moves_only_the_class_region() -> None:
    z = torch.randn(1, 3, 2, 2)
    m = torch.tensor([[[0.0, 1.0], [0.5, 0.0]]])
    delta = torch.tensor([[1.0, -2.0, 0.5]])
    out = shift_features(z, m, delta, beta=2.0)
    moved = (out - z).abs().sum(1)[0]
    assert moved[0, 0] == 0 and moved[1, 1] == 0
    torch.testing.assert_close(out[0, :, 0, 1], z[0, :, 0, 1] + 2.0 * delta[0])
    torch.testing.assert_close(out[0, :, 1, 0], z[0, :, 1, 0] + 1.0 * delta[0])


def test_closed_form_shifted_pacam_matches_explicit() -> None:
    g = torch.Generator().manual_seed(0)
    b, k, d, h, w = 2, 3, 5, 4, 4
    z = F.normalize(torch.randn(b, d, h, w, generator=g), dim=1)
    cam = torch.rand(b, k, h, w, generator=g)
    delta = torch.randn(b, k, d, generator=g) * 0.3
    p = F.normalize(torch.randn(b, k, d, generator=g), dim=-1)
    valid = torch.tensor([[True, True, False], [True, False, True]])
    explicit = torch.stack(
        [shift_features(z, cam[:, c], delta[:, c], 0.7) for c in range(k)], dim=1
    )
    # Two algebraically equal forms (terms reordered) on unit-scale values: ~1e-7 rounding.
    torch.testing.assert_close(
        shifted_prototype_cam(z, cam, delta, 0.7, p, valid),
        prototype_cam(explicit, p, valid),
        atol=1e-5,
        rtol=0,
    )


def test_compactness_loss_hand() -> None:
    z = torch.tensor([[[[1.0, 0.0]], [[0.0, 1.0]]]], requires_grad=True)  # pixels e0, e1
    p_star = torch.tensor([[[1.0, 0.0]]], requires_grad=True)
    region = torch.tensor([[[[1.0, 1.0]]]])
    loss = compactness_loss(z, region, p_star)
    torch.testing.assert_close(loss, torch.tensor(0.5))  # (0 + 1) / 2
    loss.backward()
    assert p_star.grad is None  # stop-gradient on p*
    assert z.grad is not None and float(z.grad.abs().sum()) > 0
    empty = compactness_loss(z, torch.zeros_like(region), p_star)
    assert float(empty.detach()) == 0.0
