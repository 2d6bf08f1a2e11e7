"""Cross entropy on pseudo masks: 255 ignored, labels resized as deeplab-pytorch does."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from cpal.segmentation.losses import cross_entropy_ignore, resize_labels, segmentation_loss


def test_loss_ignores_255_hand_computed():
    # Two classes, one row of three pixels; the middle pixel is unsure (255).
    logits = torch.tensor([[[[2.0, 5.0, 0.0]], [[0.0, -5.0, 1.0]]]])  # (1, 2, 1, 3)
    labels = torch.tensor([[[0, 255, 1]]])
    # pixel 0: -log(e^2 / (e^2 + 1)); pixel 2: -log(e^1 / (1 + e^1)); mean over the two
    expected = (math.log1p(math.exp(-2.0)) + math.log1p(math.exp(-1.0))) / 2
    assert cross_entropy_ignore(logits, labels).item() == pytest.approx(expected, rel=1e-6)
    # the ignored pixel's logits get no gradient, whatever they are
    logits.requires_grad_(True)
    segmentation_loss(logits, labels).backward()
    assert torch.all(logits.grad[..., 1] == 0) and torch.all(logits.grad[..., 0] != 0)


def test_all_ignored_batch_gives_zero_not_nan():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    loss = segmentation_loss(logits, torch.full((2, 4, 4), 255))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.all(logits.grad == 0)


def test_labels_outside_the_classes_are_named():
    with pytest.raises(ValueError, match=r"labels \[7\] are outside 0..2"):
        cross_entropy_ignore(torch.randn(1, 3, 2, 2), torch.tensor([[[0, 7], [255, 1]]]))
    with pytest.raises(TypeError, match="integer"):
        cross_entropy_ignore(torch.randn(1, 3, 2, 2), torch.zeros(1, 2, 2))


@pytest.mark.parametrize(("src", "dst"), [((321, 321), (41, 41)), ((17, 23), (5, 7)),
                                          ((41, 41), (31, 31)), ((6, 5), (13, 11))])
def test_resize_labels_is_pil_nearest(src, dst):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 21, size=(2, *src)).astype(np.uint8)
    labels[:, ::3] = 255
    expected = np.stack([
        np.asarray(Image.fromarray(label).resize(dst[::-1], resample=Image.NEAREST))
        for label in labels
    ])
    out = resize_labels(torch.from_numpy(labels), dst)
    assert out.dtype == torch.long
    np.testing.assert_array_equal(out.numpy(), expected)


def test_msc_loss_sums_each_output_against_labels_at_its_size():
    torch.manual_seed(0)
    labels = torch.randint(0, 3, (2, 33, 33))
    labels[:, :5] = 255
    outputs = [torch.randn(2, 3, 5, 5), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 3, 3),
               torch.randn(2, 3, 5, 5)]
    expected = sum(cross_entropy_ignore(o, resize_labels(labels, o.shape[-2:])) for o in outputs)
    torch.testing.assert_close(segmentation_loss(outputs, labels), expected)
    full = torch.nn.functional.interpolate(outputs[0], size=(33, 33), mode="bilinear",
                                           align_corners=False)
    torch.testing.assert_close(segmentation_loss(outputs[0], labels, resize="logits"),
                               cross_entropy_ignore(full, labels))


def test_msc_loss_checks_the_labels_once_before_resizing():
    labels = torch.zeros(1, 8, 8, dtype=torch.long)
    labels[0, 0, 0] = 21  # gone after resizing to 2 x 2: still refused
    with pytest.raises(ValueError, match=r"labels \[21\]"):
        segmentation_loss([torch.randn(1, 21, 2, 2)], labels)
