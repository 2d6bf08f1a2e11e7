"""torch Datasets over a VOC-layout root.

`ClassificationDataset` and `InferenceDataset` read images and image-level labels only:
pixel masks are for evaluation and are never touched here (a test checks that training
runs with SegmentationClass removed). `LabelledDataset` reads the pipeline's own label
files (pseudo masks, IR labels), never the GT folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from cpal.data.images import image_size, load_mask
from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout
from cpal.errors import DatasetError

SampleTransform = Callable[[np.ndarray, np.random.Generator], tuple[torch.Tensor, torch.Tensor]]


class _SeededSamples(Dataset):
    """Training samples whose augmentation depends on (seed, epoch, index) only: identical
    across worker counts and across an interrupted-then-resumed run."""

    ids: list[str]

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.ids)

    def rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, self.epoch, index])


class ClassificationDataset(_SeededSamples):
    """Augmented images with multi-hot labels for training the classifier."""

    def __init__(
        self, layout: VOCLayout, split: str, transform: SampleTransform, seed: int
    ) -> None:
        super().__init__(seed)
        self.layout = layout
        self.ids = layout.split_ids(split)
        self.labels = torch.from_numpy(layout.image_labels(self.ids))
        self.transform = transform

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        image, valid = self.transform(self.layout.load_image(self.ids[index]), rng)
        return {"image": image, "valid": valid, "label": self.labels[index], "index": index}


class InferenceDataset(Dataset):
    """Normalised full-size images with their labels, for multi-scale map inference;
    `labels=False` for images without image-level labels (a segmentation network's test
    split: VOC test lists none)."""

    def __init__(self, layout: VOCLayout, ids: Sequence[str], *, labels: bool = True) -> None:
        self.layout = layout
        self.ids = list(ids)
        self.labels = torch.from_numpy(layout.image_labels(self.ids)) if labels else None

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, Any]:
        image = self.layout.load_image(self.ids[index])
        item = {"image": normalize(image), "id": self.ids[index]}
        if self.labels is not None:
            item["label"] = self.labels[index]
        return item

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


PairTransformFn = Callable[[np.ndarray, np.ndarray, np.random.Generator],
                           tuple[torch.Tensor, torch.Tensor]]


class LabelledDataset(_SeededSamples):
    """Augmented images with label maps read from `label_dir`/<id>.png: the pseudo masks
    (or IR labels) a later network trains on. Never the dataset's GT masks: the labels
    are the pipeline's own files. Each sample's augmentation depends on (seed, epoch,
    index) only, as `ClassificationDataset`'s (exact resume)."""

    def __init__(self, layout: VOCLayout, ids: Sequence[str], label_dir: Path,
                 transform: PairTransformFn, seed: int) -> None:
        super().__init__(seed)
        self.layout = layout
        self.ids = list(ids)
        self.label_dir = Path(label_dir)
        self.transform = transform

    def label_path(self, image_id: str) -> Path:
        return self.label_dir / f"{image_id}.png"

    def check(self) -> None:
        """Every label file present and the size of its image (headers only): a mismatch
        is one DatasetError naming both files, before the first training step."""
        for image_id in self.ids:
            path = self.label_path(image_id)
            if not path.is_file():
                raise DatasetError(f"{path}: label file missing")
            label_size = image_size(path)
            size = image_size(self.layout.image_path(image_id))
            if label_size != size:
                raise DatasetError(
                    f"{path} is {label_size[1]}x{label_size[0]} but its image "
                    f"{self.layout.image_path(image_id)} is {size[1]}x{size[0]} (width x "
                    "height)"
                )

    def __getitem__(self, index: int) -> dict[str, Any]:
        rng = self.rng(index)
        image_id = self.ids[index]
        label = load_mask(self.label_path(image_id), self.layout.num_classes)
        image, target = self.transform(self.layout.load_image(image_id), label, rng)
        return {"image": image, "label": target, "index": index}
