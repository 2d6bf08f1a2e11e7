"""Image transforms for training (random resize, flip, crop) and inference (normalise).

Randomness comes from a `numpy.random.Generator` handed in per sample, so a sample's
augmentation depends only on (seed, epoch, index): identical across worker counts and
across an interrupted-then-resumed run.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)


def normalize(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, 3) -> float32 (3, H, W) with ImageNet mean/std."""
    x = (image.astype(np.float32) / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def resize_long_side(image: np.ndarray, long_side: int) -> np.ndarray:
    h, w = image.shape[:2]
    scale = long_side / max(h, w)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image
    return np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))


class TrainTransform:
    """Random long-side resize, horizontal flip, normalisation and a random square crop.

    Images smaller than the crop are placed at a random position on a zero canvas
    (zero = the mean colour after normalisation), as IRN/SIPE do."""

    def __init__(self, crop_size: int, resize_long: tuple[int, int], hflip: bool) -> None:
        self.crop_size = crop_size
        self.resize_long = resize_long
        self.hflip = hflip

    def __call__(
        self, image: np.ndarray, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop (3, S, S), valid (S, S) uint8: 1 on image pixels, 0 on the padding)."""
        lo, hi = self.resize_long
        image = resize_long_side(image, int(rng.integers(lo, hi + 1)))
        if self.hflip and rng.random() < 0.5:
            image = image[:, ::-1]
        x = normalize(image)
        ones = torch.ones((1, *x.shape[1:]))
        out = random_crop(torch.cat([x, ones]), self.crop_size, rng)
        return out[:3], out[3].to(torch.uint8)


def random_crop(x: torch.Tensor, size: int, rng: np.random.Generator) -> torch.Tensor:
    """A random (C, size, size) window of x (C, H, W); an axis shorter than `size` is
    placed at a random offset on a zero canvas."""
    _, h, w = x.shape
    out = x.new_zeros((x.shape[0], size, size))
    # Offsets of the crop window inside the image (when larger) or of the image inside
    # the canvas (when smaller), chosen per axis.
    dy_img, dy_out = _offsets(h, size, rng)
    dx_img, dx_out = _offsets(w, size, rng)
    ch, cw = min(h, size), min(w, size)
    out[:, dy_out : dy_out + ch, dx_out : dx_out + cw] = x[
        :, dy_img : dy_img + ch, dx_img : dx_img + cw
    ]
    return out


def _offsets(length: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    if length >= size:
        return int(rng.integers(0, length - size + 1)), 0
    return 0, int(rng.integers(0, size - length + 1))


def scaled_range(scale_range: Sequence[float], scale: float) -> tuple[float, float]:
    """A random-rescale range `[min, max]` times the dataset's factor (`data.min_long_side`):
    a stage's own range is stated for images as the CAM network sees them."""
    return float(scale_range[0]) * scale, float(scale_range[1]) * scale


def rescaled(images: torch.Tensor, scale: float) -> torch.Tensor:
    """(B, 3, H, W) images resized by `scale` (bilinear); themselves at 1."""
    if scale == 1.0:
        return images
    height, width = images.shape[-2:]
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return F.interpolate(images, size=size, mode="bilinear", align_corners=False)


class PairTransform:
    """Random rescale (image bilinear, labels nearest, one factor from `scale_range`),
    horizontal flip, normalisation, padding to the crop (image: zero = the mean colour,
    labels: `ignore_index`) and one random crop of both: deeplab-pytorch's and IRN's
    training augmentation of an image with its label map."""

    def __init__(self, crop_size: int, scale_range: tuple[float, float], hflip: bool,
                 ignore_index: int = 255) -> None:
        self.crop_size = crop_size
        self.scale_range = scale_range
        self.hflip = hflip
        self.ignore_index = ignore_index

    def __call__(self, image: np.ndarray, label: np.ndarray, rng: np.random.Generator
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """(crop (3, S, S) float32, labels (S, S) int64)."""
        lo, hi = self.scale_range
        factor = float(rng.uniform(lo, hi))
        h, w = image.shape[:2]
        size = (max(1, round(w * factor)), max(1, round(h * factor)))
        if size != (w, h):
            image = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
            label = np.asarray(Image.fromarray(label).resize(size, Image.NEAREST))
        if self.hflip and rng.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        x = normalize(image)
        y = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        # The label plane rides along with the image through one crop: offset by one so
        # that the canvas's zero marks padding, which becomes the ignore label.
        both = random_crop(torch.cat([x, (y + 1).to(x.dtype)[None]]), self.crop_size, rng)
        labels = both[3].round().to(torch.int64) - 1
        labels[labels < 0] = self.ignore_index
        return both[:3], labels
