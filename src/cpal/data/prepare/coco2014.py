"""Prepare COCO 2014 as a VOC-layout root: semantic masks rendered from instance annotations.

Reads ROOT/{train2014,val2014}/ and ROOT/annotations/instances_{train,val}2014.json and adds

    ROOT/classes.txt                          background + the categories in category-id order
    ROOT/JPEGImages/<stem>.jpg                relative symlinks (or hard links) to the images
    ROOT/SegmentationClass/<stem>.png         palette masks, 0 background, 255 crowd
    ROOT/ImageSets/Segmentation/{train,val}.txt            images with annotations
    ROOT/ImageSets/Segmentation/{train,val}_noann.txt      images without any
    ROOT/image_labels.json                    classes of all annotations, crowd included
    ROOT/cpal_manifest.json

Ids are file stems (COCO_train2014_000000000009), never parsed as numbers. Masks are
written atomically and skipped when present, so an interrupted run resumes; the manifest
records the SHA-256 of the annotation files, and a resumed run refuses to mix masks
rendered from different annotations.
"""

from __future__ import annotations

import json
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from cpal.data.images import image_size
from cpal.data.prepare.common import (
    count_warning,
    examples,
    labels_text,
    list_names,
    list_text,
    parallel_map,
    remove_stale_temporaries,
    sha256_file,
    write_once,
)
from cpal.data.prepare.manifest import (
    MANIFEST_FILE,
    begin_manifest,
    finish_manifest,
    relative,
    write_image_checksums,
)
from cpal.data.voc import (
    BACKGROUND,
    CLASSES_FILE,
    IMAGE_DIR,
    IMAGE_EXTENSIONS,
    LABELS_FILE,
    MASK_DIR,
    VOCLayout,
    id_problem,
    invalid_json,
)
from cpal.errors import CpalError, DatasetError
from cpal.io import IGNORE_INDEX, save_label_png

__all__ = [
    "OVERLAP_RULE",
    "LinkMode",
    "checked_segmentation",
    "prepare_coco",
    "render_semantic_mask",
]

DATASET = "COCO 2014"
FOLDERS = {"train": "train2014", "val": "val2014"}
# Sizes of the public release; other counts are reported as warnings, not errors.
STANDARD_IMAGES = {"train": 82783, "val": 40504}
STANDARD_SPLITS = {"train": 82081, "val": 40137, "train_noann": 702, "val_noann": 367}
STANDARD_CATEGORIES = 80
NOANN = "{}_noann"
OVERLAP_RULE = (
    "crowd regions 255 first; then non-crowd instances from largest to smallest area, so a "
    "smaller instance wins where instances overlap and any instance wins over a crowd region"
)
LABEL_RULE = "category of every annotation of the image, crowd annotations included"

LinkMode = Literal["symlink", "hardlink"]
# One annotation as a render task carries it: (class index, iscrowd, segmentation, id).
Annotation = tuple[int, bool, Any, int]


def _mask_api() -> Any:
    try:
        from pycocotools import mask
    except ImportError as error:
        raise CpalError(
            "COCO masks need pycocotools: pip install 'cpal[coco]' (or pycocotools)"
        ) from error
    return mask


def _rle_string_counts(counts: bytes) -> list[int]:
    """Run lengths of a compressed COCO RLE string (pycocotools' rleFrString, in Python),
    so a corrupt string is refused here instead of overrunning the decoder's buffer."""
    runs: list[int] = []
    position = 0
    while position < len(counts):
        value, shift, more = 0, 0, True
        while more:
            if position >= len(counts):
                raise ValueError("truncated counts string")
            chunk = counts[position] - 48
            if not 0 <= chunk < 64:
                raise ValueError(f"invalid character {chr(counts[position])!r} in counts")
            value |= (chunk & 0x1F) << shift
            more = bool(chunk & 0x20)
            position += 1
            shift += 5
            if not more and chunk & 0x10:
                value |= -1 << shift
        if len(runs) > 2:
            value += runs[-2]
        runs.append(value)
    return runs


def _is_part(part: Any) -> bool:
    return isinstance(part, list) and len(part) >= 6 and len(part) % 2 == 0


def checked_segmentation(segmentation: Any, height: int, width: int, where: str) -> Any | None:
    """A COCO segmentation validated for an image of `height` x `width`, or None if it draws
    nothing: polygon lists lose their parts with fewer than 3 points (no area, and
    pycocotools would read a 4-number part as a box); uncompressed and compressed RLEs must
    cover the image exactly (a corrupt string would overrun pycocotools' decoder)."""
    if isinstance(segmentation, list):
        for part in segmentation:
            if not isinstance(part, list) or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in part
            ):
                raise DatasetError(f"{where}: polygon parts must be lists of numbers")
        return [part for part in segmentation if _is_part(part)] or None
    if isinstance(segmentation, dict) and "counts" in segmentation and "size" in segmentation:
        size = segmentation["size"]
        if not isinstance(size, list) or size != [height, width]:
            raise DatasetError(
                f"{where}: RLE size {size} is not the image's [height, width] [{height}, {width}]"
            )
        counts = segmentation["counts"]
        if isinstance(counts, str):
            try:
                counts = counts.encode("ascii")
            except UnicodeEncodeError as error:
                raise DatasetError(f"{where}: bad compressed RLE (non-ASCII counts)") from error
        if isinstance(counts, list):
            runs = counts
        elif isinstance(counts, bytes):
            try:
                runs = _rle_string_counts(counts)
            except ValueError as error:
                raise DatasetError(f"{where}: bad compressed RLE ({error})") from error
        else:
            raise DatasetError(f"{where}: RLE counts must be a list or a string")
        if any(not isinstance(run, int) or run < 0 for run in runs) or sum(runs) != height * width:
            raise DatasetError(
                f"{where}: RLE run lengths do not cover the {height}x{width} image exactly"
            )
        return {"size": [height, width], "counts": counts}
    raise DatasetError(f"{where}: segmentation is neither a polygon list nor an RLE object")


def _decode(api: Any, segmentation: Any, height: int, width: int) -> np.ndarray:
    """(H, W) bool pixels of a checked segmentation."""
    if isinstance(segmentation, list):
        rle = api.merge(api.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation["counts"], list):
        rle = api.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    with warnings.catch_warnings():
        # pycocotools 2.0.x with numpy 2: a DeprecationWarning about __array__(copy=...).
        warnings.simplefilter("ignore", DeprecationWarning)
        return api.decode(rle).astype(bool)


def render_semantic_mask(
    height: int, width: int, annotations: Sequence[Annotation], source: str
) -> np.ndarray:
    """(H, W) uint8 class indices of one image's instance annotations, by OVERLAP_RULE."""
    api = _mask_api()
    label = np.zeros((height, width), np.uint8)
    things = []
    for class_index, iscrowd, segmentation, ann_id in annotations:
        if segmentation is None:  # checked before: nothing to draw
            continue
        where = f"{source} annotation {ann_id}"
        checked = checked_segmentation(segmentation, height, width, where)
        if checked is None:
            continue
        pixels = _decode(api, checked, height, width)
        if iscrowd:
            label[pixels] = IGNORE_INDEX
        else:
            things.append((int(pixels.sum()), pixels, class_index))
    for _, pixels, class_index in sorted(things, key=lambda thing: -thing[0]):
        label[pixels] = class_index
    return label


# One mask to render: (target PNG, image file, height, width, annotations, JSON file name).
# It carries only its own image's annotations: workers never see the whole JSON.
RenderTask = tuple[str, str, int, int, tuple[Annotation, ...], str]


def _render_mask(task: RenderTask) -> None:
    """Render and write one mask, after checking that the image file has the size the JSON
    gives (a mask drawn at the wrong size would fail every later step, far from here)."""
    target, image, height, width, annotations, source = task
    found = image_size(Path(image))
    if found != (height, width):
        raise DatasetError(
            f"{image} is {found[1]}x{found[0]} but {source} gives it {width}x{height} "
            "(width x height); its mask cannot be drawn"
        )
    save_label_png(target, render_semantic_mask(height, width, annotations, source))


@dataclass
class _Image:
    stem: str
    file_name: str
    height: int
    width: int
    annotations: list[Annotation] = field(default_factory=list)


def _load(path: Path) -> dict[str, Any]:
    """One instances JSON, parsed from the open file (instances_train2014.json is hundreds
    of MB: `cpal.io.read_json` would hold its whole text as well as the parsed objects)."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as error:
        raise invalid_json(path, error) from error
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not UTF-8 text: {error.reason}") from error
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold a COCO object, found {type(data).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise DatasetError(f"{path}: '{key}' must be a list")
    return data


def _categories(data: dict[str, Any], path: Path) -> list[tuple[int, str]]:
    """(COCO category id, name), sorted by id: index i + 1 in the masks."""
    found = []
    for entry in data["categories"]:
        if not isinstance(entry, dict) or not isinstance(entry.get("id"), int) \
                or not isinstance(entry.get("name"), str):
            raise DatasetError(f"{path}: category {json.dumps(entry)[:80]} needs int id and name")
        found.append((entry["id"], entry["name"].strip()))
    found.sort()
    ids = [cid for cid, _ in found]
    if len(set(ids)) != len(ids):
        duplicate = next(cid for cid in ids if ids.count(cid) > 1)
        raise DatasetError(f"{path}: duplicate category id {duplicate}")
    seen: set[str] = set()
    for cid, name in found:
        if not name or name == BACKGROUND or name in seen:
            problem = "an empty" if not name else "a duplicate" if name in seen else "a reserved"
            raise DatasetError(f"{path}: category {cid} has {problem} name {name!r}")
        seen.add(name)
    return found


def _int_field(entry: dict[str, Any], key: str, path: Path, what: str) -> int:
    value = entry.get(key)
    if not isinstance(value, int) or isinstance(value, bool):
        raise DatasetError(f"{path}: {what} has no integer '{key}'")
    return value


def _images(
    data: dict[str, Any], path: Path, index: dict[int, int]
) -> tuple[dict[int, _Image], int]:
    """Image entries by COCO image id, each with its checked annotations (sorted by id), and
    the number of polygon parts dropped as degenerate."""
    images: dict[int, _Image] = {}
    for entry in data["images"]:
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: image entry {json.dumps(entry)[:80]} is not an object")
        image_id = _int_field(entry, "id", path, "an image")
        what = f"image {image_id}"
        file_name = entry.get("file_name")
        if not isinstance(file_name, str):
            raise DatasetError(f"{path}: {what} has no file_name")
        stem, dot, ext = file_name.rpartition(".")
        problem = id_problem(stem) if dot else "has no extension"
        if problem is None and "." + ext.lower() not in IMAGE_EXTENSIONS:
            problem = f"does not end in {', '.join(IMAGE_EXTENSIONS)}"
        if problem is not None:
            raise DatasetError(f"{path}: {what} file_name {file_name!r} {problem}")
        height = _int_field(entry, "height", path, what)
        width = _int_field(entry, "width", path, what)
        if height < 1 or width < 1:
            raise DatasetError(f"{path}: {what} has size {width}x{height}")
        if image_id in images:
            raise DatasetError(f"{path}: duplicate image id {image_id}")
        images[image_id] = _Image(stem, file_name, height, width)
    dropped = 0
    for entry in data["annotations"]:
        if not isinstance(entry, dict):
            raise DatasetError(f"{path}: annotation {json.dumps(entry)[:80]} is not an object")
        ann_id = _int_field(entry, "id", path, "an annotation")
        what = f"annotation {ann_id}"
        image = images.get(_int_field(entry, "image_id", path, what))
        if image is None:
            raise DatasetError(f"{path}: {what} refers to unknown image id {entry['image_id']}")
        category = _int_field(entry, "category_id", path, what)
        if category not in index:
            raise DatasetError(f"{path}: {what} has unknown category_id {category}")
        if "segmentation" not in entry:
            raise DatasetError(f"{path}: {what} has no segmentation")
        iscrowd = bool(entry.get("iscrowd", 0))
        segmentation = entry["segmentation"]
        checked = checked_segmentation(
            segmentation, image.height, image.width, f"{path.name} {what}"
        )
        if isinstance(segmentation, list):
            dropped += len(segmentation) - len(checked or [])
        image.annotations.append((index[category], iscrowd, checked, ann_id))
    for image in images.values():
        image.annotations.sort(key=lambda annotation: annotation[3])
    return images, dropped


def _require(root: Path) -> dict[str, Path]:
    if not root.is_dir():
        raise DatasetError(f"COCO root not found: {root}")
    files = {split: root / "annotations" / f"instances_{folder}.json"
             for split, folder in FOLDERS.items()}
    missing = [f"{folder}/" for folder in FOLDERS.values() if not (root / folder).is_dir()]
    missing += [relative(root, path) for path in files.values() if not path.is_file()]
    if missing:
        raise DatasetError(f"{root} is not a COCO 2014 root: missing {', '.join(missing)}")
    return files


def _link_images(root: Path, entries: list[tuple[str, str]], mode: LinkMode) -> int:
    """JPEGImages/<name> -> ../<folder>/<name> for each (folder, name); returns links made.

    Existing links to the same target and existing regular files are kept.
    """
    target_dir = root / IMAGE_DIR
    target_dir.mkdir(exist_ok=True)
    existing = list_names(target_dir)
    made = 0
    for folder, name in entries:
        link = target_dir / name
        source = Path("..") / folder / name
        if name in existing:
            if link.is_symlink() and Path(os.readlink(link)) != source:
                raise DatasetError(
                    f"{link} links to {os.readlink(link)}, not {source}; remove it to prepare"
                )
            continue
        try:
            if mode == "symlink":
                os.symlink(source, link)
            else:
                os.link(root / folder / name, link)
        except OSError as error:
            other = "hardlink" if mode == "symlink" else "symlink"
            raise DatasetError(
                f"cannot create {mode} {link}: {error.strerror or error} (try --link {other})"
            ) from error
        made += 1
    return made


def prepare_coco(
    root: Path,
    *,
    workers: int = 1,
    progress: bool = False,
    link: LinkMode = "symlink",
    checksum_images: bool = False,
) -> dict[str, Any]:
    """Render COCO 2014 into a VOC-layout root under `root`; return the manifest."""
    root = Path(root).expanduser()
    files = _require(root)
    _mask_api()
    warnings: list[str] = []
    sources = {relative(root, path): sha256_file(path) for path in files.values()}
    categories: list[tuple[int, str]] = []
    index: dict[int, int] = {}
    splits: dict[str, list[str]] = {}
    images: dict[str, _Image] = {}
    folder_of: dict[str, str] = {}
    dropped_parts = 0
    for split, path in files.items():
        # One JSON in memory at a time: only what masks and labels need outlives its loop.
        data = _load(path)
        found = _categories(data, path)
        if not categories:
            categories = found
            index = {cid: i for i, (cid, _) in enumerate(categories, start=1)}
        elif found != categories:
            raise DatasetError(f"{files['train']} and {path} list different categories")
        by_id, dropped = _images(data, path, index)
        del data
        dropped_parts += dropped
        folder = FOLDERS[split]
        present = list_names(root / folder)
        absent = sorted(i.file_name for i in by_id.values() if i.file_name not in present)
        if absent:
            raise DatasetError(
                f"{len(absent):,} images of {path.name} are missing from {root / folder}: "
                f"{examples(absent)}"
            )
        if len(by_id) != STANDARD_IMAGES[split]:
            warnings.append(f"{path.name} lists {len(by_id):,} images; the standard {DATASET} "
                            f"has {STANDARD_IMAGES[split]:,}")
        for image in by_id.values():
            if image.stem in images:
                raise DatasetError(f"image {image.file_name} is listed twice ({path})")
            images[image.stem] = image
            folder_of[image.stem] = folder
        annotated = sorted(i.stem for i in by_id.values() if i.annotations)
        empty = sorted(i.stem for i in by_id.values() if not i.annotations)
        splits[split] = annotated
        if empty:
            splits[NOANN.format(split)] = empty
    if len(categories) != STANDARD_CATEGORIES:
        warnings.append(f"{len(categories)} categories; COCO has {STANDARD_CATEGORIES}")
    layout = VOCLayout(root=root, class_names=(BACKGROUND, *(name for _, name in categories)))
    for split, ids in splits.items():
        if not ids and split in FOLDERS:
            raise DatasetError(f"{files[split]} has no annotated images")
        warning = count_warning(split, len(ids), STANDARD_SPLITS[split], DATASET)
        if warning:
            warnings.append(warning)

    names = layout.class_names
    labels: dict[str, list[str]] = {}
    crowd_only_label = crowd_only_image = 0
    for stem in sorted(images):
        image = images[stem]
        present_classes = sorted({a[0] for a in image.annotations})
        labels[stem] = [names[c] for c in present_classes]
        uncrowded = {a[0] for a in image.annotations if not a[1]}
        crowd_only_label += bool(set(present_classes) - uncrowded)
        crowd_only_image += bool(image.annotations) and not uncrowded

    outputs = [MASK_DIR + "/", CLASSES_FILE, LABELS_FILE,
               *(relative(root, layout.split_file(split)) for split in splits), MANIFEST_FILE]
    begin_manifest(
        root, DATASET, sources,
        redo_hint=f"delete {', '.join(outputs)} under {root} to prepare again",
    )
    write_once(root / CLASSES_FILE, list_text(names))
    for split, ids in splits.items():
        write_once(layout.split_file(split), list_text(ids))
    write_once(root / LABELS_FILE, labels_text(labels))
    links = _link_images(root, [(folder_of[s], images[s].file_name) for s in sorted(images)],
                         link)

    mask_dir = root / MASK_DIR
    mask_dir.mkdir(exist_ok=True)
    remove_stale_temporaries(mask_dir)
    done = list_names(mask_dir)
    tasks = []
    for split in FOLDERS:
        source = files[split].name
        for stem in splits[split]:
            if f"{stem}.png" not in done:
                image = images[stem]
                tasks.append((str(mask_dir / f"{stem}.png"),
                              str(root / FOLDERS[split] / image.file_name), image.height,
                              image.width, tuple(image.annotations), source))
    parallel_map(_render_mask, tasks, workers=workers, desc="masks", progress=progress)

    layout = VOCLayout.open(root)
    image_checksums = None
    if checksum_images:
        image_checksums = write_image_checksums(root, layout, sorted(images), workers=workers,
                                                progress=progress)
    disjoint = [("train", "val")] + [(s, NOANN.format(s)) for s in FOLDERS
                                    if NOANN.format(s) in splits]
    return finish_manifest(
        layout,
        dataset=DATASET,
        sources=sources,
        splits={split: STANDARD_SPLITS[split] for split in splits},
        disjoint=disjoint,
        files=[CLASSES_FILE, LABELS_FILE,
               *(relative(root, layout.split_file(split)) for split in splits)],
        details={
            "categories": {str(cid): index[cid] for cid, _ in categories},
            "overlap": OVERLAP_RULE,
            "labels": LABEL_RULE,
            "images_with_crowd_only_label": crowd_only_label,
            "images_with_only_crowd_annotations": crowd_only_image,
            "dropped_polygon_parts": dropped_parts,
            "image_links": link,
            "links_made_now": links,
            "masks_rendered_now": len(tasks),
        },
        warnings=warnings,
        image_checksums=image_checksums,
    )
