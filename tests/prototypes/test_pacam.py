from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal.prototypes.pacam import prototype_cam, self_supervision_loss


def test_pacam_range_and_absent_channels_zero() -> None:
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(2, 8, 5, 5, generator=g), dim=1)
    p = F.normalize(torch.randn(2, 4, 8, generator=g), dim=-1)
    valid = torch.tensor([[True, False, True, True], [True, True, False, False]])
    out = prototype_cam(z, p, valid)
    assert out.shape == (2, 4, 5, 5)
    assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
    assert torch.all(out[0, 1] == 0) and torch.all(out[1, 2:] == 0)
    # valid channels are max-normalised: peak ~1 where some pixel has positive cosine
    assert abs(float(out[0, 0].max()) - 1.0) < 1e-3


def test_pacam_hand_values() -> None:
    z = torch.tensor([[[[1.0, 0.0, -1.0]], [[0.0, 1.0, 0.0]]]])  # pixels e0, e1, -e0
    p = torch.tensor([[[1.0, 1.0]]]) / 2**0.5
    out = prototype_cam(z, p, torch.tensor([[True]]))
    # The max-normalisation's +1e-5 eps lowers the peak by ~1e-5 (measured 1.4e-5).
    torch.testing.assert_close(out[0, 0, 0], torch.tensor([1.0, 1.0, 0.0]), atol=1e-4, rtol=0)


def test_self_loss_averages_all_channels_or_present_ones() -> None:
    cam = torch.tensor([[[[1.0, 0.0]], [[0.5, 0.5]], [[0.0, 0.0]]]])  # absent channel is 0
    pacam = torch.tensor([[[[0.0, 0.0]], [[0.5, 0.0]], [[0.0, 0.0]]]])
    valid = torch.tensor([[True, True, False]])
    # SIPE: mean over all 3 channels x 2 pixels (the absent one contributes 0 - 0).
    loss = self_supervision_loss(cam, pacam, valid)
    torch.testing.assert_close(loss, torch.tensor((1.0 + 0.0 + 0.0 + 0.5) / 6))
    present = self_supervision_loss(cam, pacam, valid, average="present")
    torch.testing.assert_close(present, torch.tensor((1.0 + 0.0 + 0.0 + 0.5) / 4))
