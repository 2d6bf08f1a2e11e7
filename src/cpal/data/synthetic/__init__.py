"""The built-in procedural WSSS dataset: deterministic by seed, versioned, VOC layout.

Each foreground object is a *body* (a shape whose colours and textures are shared by all
classes, by distractor shapes and by the background) carrying a small *part* (a patch with
a class-specific colour and pattern). Image-level labels can be predicted from the parts,
so a classifier's CAM fires on the part rather than on the whole object: the gap that
weakly supervised segmentation methods try to close. docs/synthetic.md describes both
families (`parts`, `attributes`).

- `families`: the class table and each family's parameters;
- `rendering`: one sample, `render_sample(seed, split, index, image_size, family)`;
- `store`: the dataset on disk in VOC layout (`generate`), cached by spec and
  `GENERATOR_VERSION` (`ensure_dataset`);
- `preview`: the image grid of the docs (`sample_grid`).
"""

from __future__ import annotations

from cpal.data.synthetic.families import (
    ATTRIBUTE_PROBS,
    BODY_FAMILIES,
    CLASS_NAMES,
    CLASSES,
    FAMILIES,
    MIN_IMAGE_SIZE,
    MIN_VISIBLE_PIXELS,
    PATTERNS,
    class_appearance,
)
from cpal.data.synthetic.preview import sample_grid
from cpal.data.synthetic.rendering import Sample, render_sample
from cpal.data.synthetic.store import GENERATOR_VERSION, dataset_name, ensure_dataset, generate

__all__ = [
    "ATTRIBUTE_PROBS",
    "BODY_FAMILIES",
    "CLASSES",
    "CLASS_NAMES",
    "FAMILIES",
    "GENERATOR_VERSION",
    "MIN_IMAGE_SIZE",
    "MIN_VISIBLE_PIXELS",
    "PATTERNS",
    "Sample",
    "class_appearance",
    "dataset_name",
    "ensure_dataset",
    "generate",
    "render_sample",
    "sample_grid",
]
