import numpy as np
import torch

from cpal.data.transforms import IMAGENET_MEAN, TrainTransform, normalize, random_crop


def test_normalize_hand_value():
    image = np.full((2, 3, 3), 255, dtype=np.uint8)
    x = normalize(image)
    assert x.shape == (3, 2, 3)
    # Default rtol 1e-5: one float32 subtraction and division against Python's float64.
    assert torch.allclose(x[0], torch.tensor((1 - 0.485) / 0.229))


def test_random_crop_pads_small_images_with_zero():
    x = torch.ones(3, 4, 6)
    out = random_crop(x, 8, np.random.default_rng(0))
    assert out.shape == (3, 8, 8)
    assert out.sum() == 3 * 4 * 6  # every pixel kept exactly once, the rest zero


def test_random_crop_of_large_image_is_a_window():
    x = torch.arange(100.0).reshape(1, 10, 10)
    out = random_crop(x, 4, np.random.default_rng(1))
    top, left = divmod(int(out[0, 0, 0]), 10)
    assert torch.equal(out, x[:, top : top + 4, left : left + 4])


def test_train_transform_is_a_function_of_the_generator():
    image = (np.random.default_rng(0).random((40, 60, 3)) * 255).astype(np.uint8)
    t = TrainTransform(crop_size=32, resize_long=(30, 70), hflip=True)
    a, va = t(image, np.random.default_rng([1, 2, 3]))
    b, vb = t(image, np.random.default_rng([1, 2, 3]))
    c, _ = t(image, np.random.default_rng([1, 2, 4]))
    assert a.shape == (3, 32, 32) and va.shape == (32, 32)
    assert torch.equal(a, b) and torch.equal(va, vb) and not torch.equal(a, c)
    assert abs(float(IMAGENET_MEAN[0])) > 0  # mean colour becomes 0 after normalising


def test_valid_mask_marks_the_image_inside_the_padded_crop():
    # A 20 x 12 image in a 32 crop (no resize: resize_long = its long side) is padded on
    # both axes; the mask is 1 exactly where image pixels landed.
    image = np.full((20, 12, 3), 200, dtype=np.uint8)
    t = TrainTransform(crop_size=32, resize_long=(20, 20), hflip=False)
    x, valid = t(image, np.random.default_rng(5))
    assert int(valid.sum()) == 20 * 12
    inside = valid.bool()
    assert torch.all(x[:, ~inside] == 0) and torch.all(x[:, inside] > 0)
