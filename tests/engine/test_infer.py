"""Multi-scale + flip CAMs against a per-image reference loop, and the poly schedule."""

import math

import pytest
import torch
import torch.nn.functional as F

from cpal.engine.infer import multiscale_cam
from cpal.engine.optim import poly_lr
from cpal.models.cam_net import CAMNet
from cpal.models.resnet import ResNet


def _reference(model, image, scales):
    """IRN's recipe written plainly: per scale, the image and its flip one at a time,
    relu CAMs summed, upsampled to the stride-padded size and cropped."""
    _, _, h, w = image.shape
    padded = (math.ceil(h / 16) * 16, math.ceil(w / 16) * 16)
    total = 0
    for s in scales:
        x = image if s == 1.0 else F.interpolate(
            image, size=(round(h * s), round(w * s)), mode="bilinear", align_corners=False)
        cam = F.relu(model(x).cam) + F.relu(model(x.flip(-1)).cam).flip(-1)
        total = total + F.interpolate(cam, size=padded, mode="bilinear",
                                      align_corners=False)[:, :, :h, :w]
    return total


def test_batched_multiscale_equals_reference_loop():
    torch.manual_seed(0)
    model = CAMNet(ResNet("resnet18", width=0.125), num_classes=4).eval()
    images = torch.randn(3, 3, 50, 70)
    scales = [1.0, 0.5, 1.5]
    batched = multiscale_cam(model, images, scales, flip=True)
    assert batched.shape == (3, 4, 50, 70)
    with torch.no_grad():
        for i in range(3):
            expected = _reference(model, images[i : i + 1], scales)
            # Another batch size picks other kernel blocking (summation order); rounding is
            # relative to the maps' scale (sums up to ~300), so atol follows their max.
            torch.testing.assert_close(batched[i : i + 1], expected, rtol=1e-4,
                                       atol=1e-6 * float(expected.abs().max()))


def test_flip_makes_maps_mirror_symmetric_for_mirrored_input():
    torch.manual_seed(1)
    model = CAMNet(ResNet("resnet18", width=0.125), num_classes=2).eval()
    image = torch.randn(1, 3, 64, 64)
    a = multiscale_cam(model, image, [1.0], flip=True)
    b = multiscale_cam(model, image.flip(-1), [1.0], flip=True)
    # Equal up to the batch's summation order (image and flip swap places), as above.
    torch.testing.assert_close(a, b.flip(-1), rtol=1e-4, atol=1e-6 * float(a.abs().max()))


@pytest.mark.parametrize(("step", "expected"), [(0, 0.1), (50, 0.1 * 0.5**0.9), (100, 0.0)])
def test_poly_lr(step, expected):
    assert poly_lr(0.1, step, 100, 0.9) == pytest.approx(expected)  # float64 closed form
