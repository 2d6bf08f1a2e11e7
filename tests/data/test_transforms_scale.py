"""The dataset-scale helpers every stage after the CAM network uses."""

from __future__ import annotations

import torch

from cpal.data.source import image_scale
from cpal.data.transforms import rescaled, scaled_range


def test_scaled_range_multiplies_both_ends():
    assert scaled_range([0.75, 1.25], 1.5) == (1.125, 1.875)
    assert scaled_range([0.5, 1.5], 1.0) == (0.5, 1.5)


def test_rescaled_is_identity_at_one_and_rounds_sizes():
    images = torch.rand(2, 3, 10, 7)
    assert rescaled(images, 1.0) is images
    assert rescaled(images, 1.5).shape == (2, 3, 15, 10)  # 10.5 rounds to 10 (banker's)


def test_image_scale_is_the_median_long_side_and_never_shrinks():
    assert image_scale(None, [64]) == 1.0
    assert image_scale(96, [64, 64, 80]) == 1.5
    assert image_scale(48, [64]) == 1.0
    assert image_scale(96, []) == 1.0
