"""The built-in dataset on disk: generated into VOC layout, cached by spec and version.

Bump `GENERATOR_VERSION` whenever any output pixel, label or file could change: cached
datasets are keyed by it and regenerated when it differs.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from PIL import Image

from cpal.data.synthetic.families import (
    ATTRIBUTE_PROBS,
    ATTRIBUTE_SHARE_OFFSET,
    CLASS_NAMES,
    CLASSES,
    MIN_IMAGE_SIZE,
    MIN_VISIBLE_PIXELS,
    MODE_PROBS,
    class_appearance,
)
from cpal.data.synthetic.rendering import _border_width, render_sample
from cpal.data.voc import CLASSES_FILE, IMAGE_DIR, LABELS_FILE, MASK_DIR, SPLIT_DIR
from cpal.errors import ConfigError, DatasetError
from cpal.io import (
    IGNORE_INDEX,
    atomic_path,
    save_label_png,
    write_json_atomic,
    write_text_atomic,
)

GENERATOR_VERSION = 1
MANIFEST_FILE = "manifest.json"
"""The generator's record of a finished dataset (written last)."""
OBJECTS_FILE = "objects.json"
"""Every object's class, mode, geometry and visibility, per image."""


# ----------------------------------------------------------------------------- dataset files


def _check_spec(seed: int, num_train: int, num_val: int, image_size: int) -> None:
    if not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"synthetic dataset: seed must be a non-negative integer, got {seed!r}")
    if num_train < 1 or num_val < 1:
        raise ConfigError(
            f"synthetic dataset: needs >= 1 image per split, got {num_train} train / {num_val} val"
        )
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(
            f"synthetic dataset: image_size must be >= {MIN_IMAGE_SIZE}, got {image_size}"
        )


def _mode_table() -> dict[str, list[dict[str, Any]]]:
    return {
        spec.name: [
            {
                "name": mode.name,
                "prob": prob,
                "body": mode.body,
                "shape": mode.shape.kind,
                "part_at": list(mode.part_at),
                "part_shape": mode.part_shape,
            }
            for mode, prob in zip(spec.modes, MODE_PROBS, strict=True)
        ]
        for spec in CLASSES
    }


def sample_id(split: str, index: int) -> str:
    """The image id of sample `index` (1-based) of `split`, as the generator names its files."""
    return f"{split}_{index:05d}"


def generate(
    root: Path, *, seed: int, num_train: int, num_val: int, image_size: int,
    family: str = "parts",
) -> None:
    """Write the dataset into `root` (must not exist or be empty).

    The manifest is written last, so its presence marks a finished dataset.
    """
    _check_spec(seed, num_train, num_val, image_size)
    root = Path(root)
    if root.exists() and (not root.is_dir() or any(root.iterdir())):
        raise DatasetError(f"cannot generate the synthetic dataset into {root}: not empty")
    image_dir, mask_dir = root / IMAGE_DIR, root / MASK_DIR
    split_dir = root / SPLIT_DIR
    for folder in (image_dir, mask_dir, split_dir):
        folder.mkdir(parents=True, exist_ok=True)

    fg_names = CLASS_NAMES[1:]
    image_labels: dict[str, list[str]] = {}
    objects: dict[str, list[dict[str, Any]]] = {}
    splits: dict[str, Any] = {}
    for split, count in (("train", num_train), ("val", num_val)):
        ids = []
        class_counts = dict.fromkeys(fg_names, 0)
        mode_counts = {s.name: {m.name: 0 for m in s.modes} for s in CLASSES}
        labels_per_image = {"1": 0, "2": 0, "3": 0}
        for index in range(1, count + 1):
            image_id = sample_id(split, index)
            sample = render_sample(seed, split, index, image_size, family)
            with atomic_path(image_dir / f"{image_id}.png") as tmp:
                # Level 1: noisy images barely compress further, and it halves encode time.
                Image.fromarray(sample.image, mode="RGB").save(tmp, format="PNG", compress_level=1)
            save_label_png(mask_dir / f"{image_id}.png", sample.mask)
            ids.append(image_id)
            image_labels[image_id] = sample.labels
            objects[image_id] = sample.objects
            for name in sample.labels:
                class_counts[name] += 1
            for record in sample.objects:
                if record["labelled"]:
                    mode_counts[record["class"]][record["mode"]] += 1
            labels_per_image[str(len(sample.labels))] += 1
        write_text_atomic(split_dir / f"{split}.txt", "".join(f"{i}\n" for i in ids))
        splits[split] = {
            "class_image_counts": class_counts,
            "mode_counts": mode_counts,
            "labels_per_image": labels_per_image,
        }

    write_text_atomic(root / CLASSES_FILE, "".join(f"{name}\n" for name in CLASS_NAMES))
    write_json_atomic(root / LABELS_FILE, image_labels)
    write_json_atomic(root / OBJECTS_FILE, objects)
    total_classes = {
        name: sum(s["class_image_counts"][name] for s in splits.values()) for name in fg_names
    }
    total_modes = {
        spec.name: {
            m.name: sum(s["mode_counts"][spec.name][m.name] for s in splits.values())
            for m in spec.modes
        }
        for spec in CLASSES
    }
    manifest = {
        "generator": "cpal.data.synthetic",
        "generator_version": GENERATOR_VERSION,
        "family": family,
        "seed": seed,
        "image_size": image_size,
        "counts": {"train": num_train, "val": num_val},
        "class_names": list(CLASS_NAMES),
        "class_image_counts": total_classes,
        "mode_counts": total_modes,
        "modes": _mode_table(),
        "mode_probs": list(MODE_PROBS),
        **({"appearances": _appearance_table()} if family == "attributes" else {}),
        "ignore_index": IGNORE_INDEX,
        "border_px_per_side": _border_width(image_size),
        "min_visible_pixels": MIN_VISIBLE_PIXELS,
        "splits": splits,
    }
    write_json_atomic(root / MANIFEST_FILE, manifest)


def _appearance_table() -> dict[str, list[dict[str, Any]]]:
    return {
        spec.name: [
            {"rgb": list(class_appearance(c, m)[0]), "texture": class_appearance(c, m)[1],
             "prob": prob,
             **({"borrowed_from": CLASSES[(c + ATTRIBUTE_SHARE_OFFSET) % len(CLASSES)].name}
                if m == 2 else {})}
            for m, prob in enumerate(ATTRIBUTE_PROBS)
        ]
        for c, spec in enumerate(CLASSES)
    }


def dataset_name(
    *, seed: int, num_train: int, num_val: int, image_size: int, family: str = "parts"
) -> str:
    kind = "" if family == "parts" else f"-{family}"
    return (f"synthetic{kind}-v{GENERATOR_VERSION}-seed{seed}-{num_train}x{num_val}-"
            f"{image_size}px")


def _is_complete(folder: Path, seed: int, num_train: int, num_val: int, image_size: int,
                 family: str = "parts") -> bool:
    """True if `folder` holds a finished dataset of this generator version and spec."""
    try:
        manifest = json.loads((folder / MANIFEST_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(manifest, dict) and (
        manifest.get("family", "parts") == family
        and manifest.get("generator_version") == GENERATOR_VERSION
        and manifest.get("seed") == seed
        and manifest.get("image_size") == image_size
        and manifest.get("counts") == {"train": num_train, "val": num_val}
    )


def ensure_dataset(
    cache_dir: Path,
    *,
    seed: int = 0,
    num_train: int = 2000,
    num_val: int = 500,
    image_size: int = 128,
    family: str = "parts",
) -> Path:
    """Return the cached dataset folder, generating it atomically on first use.

    Generation goes to a hidden temporary sibling that is renamed into place, so a killed
    run never leaves a folder that looks complete, and concurrent callers either win the
    rename or adopt the winner's (identical) dataset.
    """
    _check_spec(seed, num_train, num_val, image_size)
    cache_dir = Path(cache_dir).expanduser()
    name = dataset_name(seed=seed, num_train=num_train, num_val=num_val, image_size=image_size,
                        family=family)
    target = cache_dir / name
    if _is_complete(target, seed, num_train, num_val, image_size, family):
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Not tempfile.mkdtemp: its 0700 mode would be kept by the renamed dataset folder.
    tmp = cache_dir / f".{name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        generate(tmp, seed=seed, num_train=num_train, num_val=num_val, image_size=image_size,
                 family=family)
        for _ in range(10):
            try:
                os.rename(tmp, target)
                return target
            except OSError:
                if _is_complete(target, seed, num_train, num_val, image_size, family):
                    return target  # another process won the race
                # A stale or partial folder: move it aside (atomic), then retry.
                stale = cache_dir / f".{name}.stale-{uuid.uuid4().hex}"
                with contextlib.suppress(FileNotFoundError):  # someone else moved it
                    os.rename(target, stale)
                shutil.rmtree(stale, ignore_errors=True)
        raise DatasetError(f"cannot move the generated dataset into place at {target}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
