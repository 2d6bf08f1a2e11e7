"""The manifest of a prepared root (counts, checksums) and `verify`, which re-checks it.

`cpal_manifest.json` records, per split, the list file, its id count, the standard count
of the public release and whether every id has a mask; the SHA-256 of every file prepare
relies on (id lists, labels, classes, layout options); which split pairs must be disjoint;
and, with --checksum-images, a `cpal_images.sha256` file in `sha256sum -c` format.
It is first written with "complete": false, so a killed preparation is visible.
"""

from __future__ import annotations

import datetime
from collections.abc import Mapping, Sequence
from pathlib import Path, PurePosixPath
from typing import Any

from cpal import __version__
from cpal.data.images import image_size, load_mask
from cpal.data.prepare.common import (
    examples,
    list_names,
    parallel_map,
    sha256_file,
    size_mismatch,
)
from cpal.data.voc import IMAGE_DIR, VOCLayout
from cpal.errors import DatasetError
from cpal.io import read_json, write_json_atomic, write_text_atomic

MANIFEST_FILE = "cpal_manifest.json"
IMAGE_CHECKSUMS_FILE = "cpal_images.sha256"
MANIFEST_FORMAT = 1


def relative(root: Path, path: Path) -> str:
    """`path` relative to `root`, with forward slashes (manifests are portable)."""
    return path.relative_to(root).as_posix()


# What verify reads from a complete manifest, and the JSON type each must have.
_COMPLETE_KEYS: dict[str, type] = {
    "files": dict, "splits": dict, "mask_dir": str, "num_classes": int, "disjoint": list,
}


def _read_manifest(root: Path) -> dict[str, Any]:
    """The manifest, its shape checked so that a hand-edited one is a one-line error."""
    path = root / MANIFEST_FILE
    data = read_json(path)
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise DatasetError(f"{path}: not a cpal manifest of format {MANIFEST_FORMAT} ({found})")
    if data.get("complete"):
        for key, kind in _COMPLETE_KEYS.items():
            if not isinstance(data.get(key), kind):
                raise DatasetError(f"{path}: '{key}' is missing or not a {kind.__name__}")
        for split, entry in data["splits"].items():
            if not isinstance(entry, dict) or not isinstance(entry.get("count"), int) \
                    or not isinstance(entry.get("masks"), bool):
                raise DatasetError(f"{path}: splits.{split} needs an integer count and "
                                   "a boolean masks")
    return data


def begin_manifest(root: Path, dataset: str, sources: Mapping[str, str], redo_hint: str) -> None:
    """Mark the root as being prepared, after checking that an earlier (possibly interrupted)
    preparation used the same dataset and the same source files, since its outputs are
    kept on resume. `sources` maps file names to SHA-256; `redo_hint` says what to delete."""
    path = root / MANIFEST_FILE
    if path.is_file():
        old = _read_manifest(root)
        if old.get("dataset") != dataset:
            raise DatasetError(
                f"{path}: this root was prepared as {old.get('dataset')!r}, not {dataset!r}"
            )
        old_sources = old.get("sources") or {}
        for name, digest in sources.items():
            if name in old_sources and old_sources[name] != digest:
                raise DatasetError(
                    f"{name} changed since {path} was written (SHA-256 differs) and outputs "
                    f"made from the old file would be kept: {redo_hint}"
                )
    write_json_atomic(
        path, {"format": MANIFEST_FORMAT, "complete": False, "dataset": dataset,
               "sources": dict(sources)}
    )


def write_image_checksums(
    root: Path, layout: VOCLayout, ids: Sequence[str], *, workers: int, progress: bool
) -> str:
    """Hash every image of `ids` into cpal_images.sha256; return its name."""
    paths = sorted({layout.image_path(image_id) for image_id in ids})
    digests = parallel_map(sha256_file, paths, workers=workers, desc="image sha256",
                           progress=progress)
    pairs = zip(digests, paths, strict=True)
    text = "".join(f"{digest}  {relative(root, path)}\n" for digest, path in pairs)
    write_text_atomic(root / IMAGE_CHECKSUMS_FILE, text)
    return IMAGE_CHECKSUMS_FILE


def split_entry(layout: VOCLayout, split: str, standard: int | None) -> dict[str, Any]:
    ids = layout.split_ids(split)
    return {
        "file": relative(layout.root, layout.split_file(split)),
        "count": len(ids),
        "standard": standard,
        "masks": layout.has_masks(ids),
    }


def finish_manifest(
    layout: VOCLayout,
    *,
    dataset: str,
    sources: Mapping[str, str],
    splits: Mapping[str, int | None],
    disjoint: Sequence[tuple[str, str]],
    files: Sequence[str],
    details: Mapping[str, Any],
    warnings: Sequence[str],
    image_checksums: str | None,
) -> dict[str, Any]:
    """Write the complete manifest; `splits` maps each split to its standard count (or None),
    `files` are root-relative paths to checksum."""
    root = layout.root
    checksummed = [*files, *([image_checksums] if image_checksums else [])]
    manifest = {
        "format": MANIFEST_FORMAT,
        "complete": True,
        "dataset": dataset,
        "created_by": f"cpal {__version__}",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "sources": dict(sources),
        "num_classes": layout.num_classes,
        "mask_dir": layout.mask_dir,
        "splits": {name: split_entry(layout, name, standard) for name, standard in splits.items()},
        "disjoint": [list(pair) for pair in disjoint],
        "files": {name: sha256_file(root / name) for name in checksummed},
        "image_checksums": image_checksums,
        "details": dict(details),
        "warnings": list(warnings),
    }
    write_json_atomic(root / MANIFEST_FILE, manifest)
    return manifest


def _check_mask(task: tuple[str, str | None, int]) -> str | None:
    """Why a mask is bad (values out of range, unreadable, size differs from its image)."""
    mask_path, image_path, num_classes = task
    try:
        mask = load_mask(Path(mask_path), num_classes)
        if image_path is not None:
            return size_mismatch(mask_path, mask.shape, image_path, image_size(Path(image_path)))
    except DatasetError as error:
        return str(error)
    return None


def _check_digest(task: tuple[str, str, str]) -> str | None:
    path, name, expected = task
    try:
        digest = sha256_file(path)
    except FileNotFoundError:
        return f"{name}: missing (listed in {IMAGE_CHECKSUMS_FILE})"
    except OSError as error:
        return f"{name}: cannot read ({error.strerror or error})"
    if digest != expected:
        return f"{name}: SHA-256 differs from {IMAGE_CHECKSUMS_FILE} (file changed)"
    return None


def _image_checksum_tasks(root: Path, problems: list[str]) -> list[tuple[str, str, str]]:
    path = root / IMAGE_CHECKSUMS_FILE
    if not path.is_file():
        problems.append(f"{path}: missing (the manifest names it)")
        return []
    tasks = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        digest, _, name = line.partition("  ")
        parts = PurePosixPath(name).parts
        if len(digest) != 64 or not name or name.startswith("/") or ".." in parts:
            problems.append(f"{path} line {number}: not '<sha256>  <relative path>'")
            continue
        tasks.append((str(root / name), name, digest))
    return tasks


def verify(root: Path, *, workers: int = 1, progress: bool = False) -> tuple[list[str], list[str]]:
    """Re-check a prepared root against its manifest.

    Returns (problems, summary): one line per problem found (every missing image or mask,
    every bad mask, every edited file...), and one summary line per split. Only a missing
    or unreadable manifest raises.
    """
    root = Path(root).expanduser()
    path = root / MANIFEST_FILE
    if not path.is_file():
        raise DatasetError(
            f"no manifest {path}: run `cpal data prepare voc|coco --root {root}` first"
        )
    manifest = _read_manifest(root)
    if not manifest.get("complete"):
        return [f"{path}: preparation did not finish; rerun `cpal data prepare`"], []
    problems: list[str] = []
    for name, digest in manifest["files"].items():
        file = root / name
        if not file.is_file():
            problems.append(f"{file}: missing (recorded in {MANIFEST_FILE})")
        elif sha256_file(file) != digest:
            problems.append(f"{file}: changed since prepare (SHA-256 differs from {MANIFEST_FILE})")
    try:
        layout = VOCLayout.open(root)
        layout.image_labels([])  # parses image_labels.json once, if any
    except DatasetError as error:
        return [*problems, str(error)], []
    if layout.mask_dir != manifest["mask_dir"]:
        problems.append(
            f"{root}: masks are read from {layout.mask_dir}, the manifest recorded "
            f"{manifest['mask_dir']}"
        )
    if layout.num_classes != manifest["num_classes"]:
        problems.append(
            f"{root}: {layout.num_classes} classes, the manifest recorded {manifest['num_classes']}"
        )
    image_folder = layout.root / IMAGE_DIR
    images_ok = image_folder.is_dir()
    if not images_ok:
        problems.append(f"image folder not found: {image_folder}")
    split_ids: dict[str, list[str]] = {}
    seen: set[str] = set()
    mask_ids: dict[str, None] = {}
    summary = []
    for split, entry in manifest["splits"].items():
        try:
            ids = layout.split_ids(split)
        except DatasetError as error:
            problems.append(str(error))
            continue
        split_ids[split] = ids
        if len(ids) != entry["count"]:
            problems.append(
                f"{layout.split_file(split)}: {len(ids):,} ids, the manifest recorded "
                f"{entry['count']:,}"
            )
        for image_id in ids:
            if image_id in seen:
                continue
            seen.add(image_id)
            if images_ok:
                try:
                    layout.image_path(image_id)
                except DatasetError as error:
                    problems.append(f"{error} (listed in {split})")
            try:
                layout.image_labels([image_id])
            except DatasetError as error:
                problems.append(f"{error} (listed in {split})")
        if entry["masks"]:
            mask_ids.update(dict.fromkeys(ids))
        checked = "images, labels" + (", masks" if entry["masks"] else "")
        summary.append(f"{split}: {len(ids):,} ids ({checked} checked)")
    problems.extend(_check_masks(layout, list(mask_ids), workers=workers, progress=progress))
    for first, second in manifest["disjoint"]:
        if first in split_ids and second in split_ids:
            shared = sorted(set(split_ids[first]) & set(split_ids[second]))
            if shared:
                problems.append(
                    f"{first} and {second} share {len(shared):,} ids ({examples(shared)}); "
                    "they must be disjoint"
                )
    if manifest.get("image_checksums"):
        tasks = _image_checksum_tasks(root, problems)
        found = parallel_map(_check_digest, tasks, workers=workers, desc="image sha256",
                             progress=progress)
        problems.extend(problem for problem in found if problem is not None)
        summary.append(f"{len(tasks):,} image checksums checked")
    return problems, summary


def _check_masks(
    layout: VOCLayout, ids: Sequence[str], *, workers: int, progress: bool
) -> list[str]:
    if not ids:
        return []
    folder = layout.root / layout.mask_dir
    if not folder.is_dir():
        return [f"mask folder not found: {folder}"]
    present = list_names(folder)
    problems, tasks = [], []
    for image_id in ids:
        mask = layout.mask_path(image_id)
        if mask.name not in present:
            problems.append(f"mask for image id '{image_id}' not found: {mask}")
            continue
        try:
            image: str | None = str(layout.image_path(image_id))
        except DatasetError:
            image = None  # already reported as a missing image
        tasks.append((str(mask), image, layout.num_classes))
    found = parallel_map(_check_mask, tasks, workers=workers, desc="masks", progress=progress)
    problems.extend(problem for problem in found if problem is not None)
    return problems
