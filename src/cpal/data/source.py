"""Open the dataset a config names: a VOC-layout root, or the built-in synthetic one."""

from __future__ import annotations

from pathlib import Path

from cpal.config import DataConfig, default_cache_dir
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
