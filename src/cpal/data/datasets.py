"""torch Datasets over a VOC-layout root.

Both read images and image-level labels only: pixel masks are for evaluation and are
never touched here (a test checks that training runs with SegmentationClass removed).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cpal.data.images import image_size
from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout

SampleTransform = Callable[[np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class ClassificationDataset(Dataset):
    """Augmented images with multi-hot labels for training the classifier."""

    def __init__(
        self, layout: VOCLayout, split: str, transform: SampleTransform, seed: int
    ) -> None:
        self.layout = layout
        self.ids = layout.split_ids(split)
        self.labels = torch.from_numpy(layout.image_labels(self.ids))
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = np.random.default_rng([self.seed, self.epoch, index])
        image, valid = self.transform(self.layout.load_image(self.ids[index]), rng)
        return {"image": image, "valid": valid, "label": self.labels[index], "index": index}


class InferenceDataset(Dataset):
    """Normalised full-size images with their labels, for multi-scale map inference."""

    def __init__(self, layout: VOCLayout, ids: Sequence[str]) -> None:
        self.layout = layout
        self.ids = list(ids)
        self.labels = torch.from_numpy(layout.image_labels(self.ids))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.layout.load_image(self.ids[index])
        return {"image": normalize(image), "label": self.labels[index], "id": self.ids[index]}

    def sizes(self) -> list[tuple[int, int]]:
        return [image_size(self.layout.image_path(i)) for i in self.ids]


class SameSizeBatchSampler(Sampler[list[int]]):
    """Batches of images that share one size, so a batch stacks without padding."""

    def __init__(self, sizes: Sequence[tuple[int, int]], batch_size: int) -> None:
        groups: dict[tuple[int, int], list[int]] = {}
        for index, size in enumerate(sizes):
            groups.setdefault(size, []).append(index)
        self.batches = [
            members[i : i + batch_size]
            for members in groups.values()
            for i in range(0, len(members), batch_size)
        ]

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)
