"""Multi-scale + flip inference: shapes, and equality with a computation written out."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpal.models.deeplab_v2 import DeepLabV2
from cpal.segmentation.inference import (
    multi_scale_logits,
    predict_labels,
    segment,
    sliding_window_logits,
)


@pytest.fixture(scope="module")
def net() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(4, arch="resnet18", width=0.125, msc_scales=(1.0, 0.75, 0.5)).eval()


def _manual(net, images, scales, reduce):
    """Per scale: resize, logits of the image and of its mirror (flipped back), their
    mean, bilinear to the image size; then the mean (or max) over scales."""
    height, width = images.shape[-2:]
    per_scale = []
    for s in scales:
        x = images if s == 1.0 else F.interpolate(
            images, size=(round(height * s), round(width * s)), mode="bilinear",
            align_corners=False)
        with torch.no_grad():
            a = net(x)
            b = net(x.flip(-1)).flip(-1)
        both = F.interpolate((a + b) / 2, size=(height, width), mode="bilinear",
                             align_corners=False)
        per_scale.append(both)
    stacked = torch.stack(per_scale)
    return stacked.mean(0) if reduce == "mean" else stacked.amax(0)


@pytest.mark.parametrize("reduce", ["mean", "max"])
def test_multi_scale_flip_equals_the_manual_computation(net, reduce):
    torch.manual_seed(1)
    images = torch.randn(2, 3, 45, 61)
    scales = (1.0, 0.5, 1.5)
    logits = multi_scale_logits(net, images, scales=scales, flip=True, reduce=reduce)
    assert logits.shape == (2, 4, 45, 61) and logits.dtype == torch.float32
    expected = _manual(net, images, scales, reduce)
    torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4 * expected.abs().max())
    labels = segment(net, images, scales=scales, flip=True, reduce=reduce)
    assert labels.shape == (2, 45, 61) and labels.dtype == torch.uint8


def test_one_scale_without_flip_is_the_upsampled_model_output(net):
    images = torch.randn(1, 3, 40, 40)
    with torch.no_grad():
        expected = F.interpolate(net(images), size=(40, 40), mode="bilinear",
                                 align_corners=False)
    torch.testing.assert_close(multi_scale_logits(net, images), expected)


def test_predict_labels_is_the_argmax():
    logits = torch.tensor([[[[0.1, 3.0]], [[0.5, -1.0]], [[0.2, 2.0]]]])
    assert predict_labels(logits).tolist() == [[[1, 0]]]


def test_sliding_windows_of_a_pointwise_model_equal_the_whole_image():
    torch.manual_seed(2)
    conv = nn.Conv2d(3, 5, 1)  # no context: windows must reassemble the full answer
    images = torch.randn(2, 3, 37, 50)
    with torch.no_grad():
        whole = conv(images)
        tiled = sliding_window_logits(conv, images, crop=16, stride=11)
        small = sliding_window_logits(conv, images[..., :9, :12], crop=16, stride=8)
    torch.testing.assert_close(tiled, whole)
    torch.testing.assert_close(small, whole[..., :9, :12])  # padded, then cut back
    tiled_ms = multi_scale_logits(conv, images, scales=(1.0, 0.5), flip=True, tile=(16, 11))
    full_ms = multi_scale_logits(conv, images, scales=(1.0, 0.5), flip=True)
    torch.testing.assert_close(tiled_ms, full_ms)


def test_windows_cover_overlaps_by_averaging():
    seen = []

    def model(x):
        seen.append(tuple(x.shape[-2:]))
        return torch.ones(x.shape[0], 1, *x.shape[-2:])

    out = sliding_window_logits(model, torch.zeros(1, 3, 20, 30), crop=(10, 20), stride=(6, 6))
    # rows start at 0, 6, 10 (flush with the end); columns at 0, 6, 10
    assert len(seen) == 9 and set(seen) == {(10, 20)}
    torch.testing.assert_close(out, torch.ones(1, 1, 20, 30))
