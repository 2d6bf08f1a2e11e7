"""Open the dataset a config names: a VOC-layout root, or the built-in synthetic one."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from cpal.config import DataConfig, default_cache_dir
from cpal.data.images import image_size
from cpal.data.synthetic import ensure_dataset
from cpal.data.voc import VOCLayout


def dataset_root(cfg: DataConfig) -> Path:
    if cfg.root is not None:
        return Path(cfg.root)
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    s = cfg.synthetic
    return ensure_dataset(
        cache, seed=s.seed, num_train=s.num_train, num_val=s.num_val, image_size=s.image_size,
        family=s.family,
    )


def open_dataset(cfg: DataConfig) -> VOCLayout:
    return VOCLayout.open(dataset_root(cfg))


def image_scale(min_long_side: int | None, long_sides: Sequence[int]) -> float:
    """The dataset-wide upscaling factor of `data.min_long_side` (1.0: none)."""
    if min_long_side is None or not len(long_sides):
        return 1.0
    return max(1.0, min_long_side / float(np.median(np.asarray(long_sides))))


def dataset_scale(cfg: DataConfig, layout: VOCLayout) -> float:
    """The factor every network of a run sees this dataset's images at: `data.min_long_side`
    over the median long side of the training split (the CAM network's, IRN's and the
    segmentation network's alike, in training and at inference)."""
    if cfg.min_long_side is None:
        return 1.0
    ids = layout.split_ids(cfg.train_split)
    return image_scale(cfg.min_long_side, [max(image_size(layout.image_path(i))) for i in ids])
