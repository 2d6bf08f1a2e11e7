"""Prepare PASCAL VOC 2012 (optionally with SBD) for cpal, writing only new files in the root.

    ROOT/ImageSets/Segmentation/train_aug.txt  VOC train + SBD train + SBD val - VOC val
    ROOT/SegmentationClassAug/<id>.png         palette masks of train_aug and val (--sbd)
    ROOT/layout.json                           {"mask_dir": "SegmentationClassAug"} (--sbd)
    ROOT/image_labels.json                     every Annotations/*.xml, difficult included
    ROOT/cpal_manifest.json                    counts and checksums (`cpal data verify`)

Masks of VOC train/val ids come from SegmentationClass (which keeps VOC's 255 boundary
band); the other train_aug ids come from SBD's cls/<id>.mat (no boundary band). The
user's SegmentationClass, lists and annotations are never modified.
"""

from __future__ import annotations

import json
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from cpal.data.images import image_size, load_mask
from cpal.data.prepare.common import (
    count_warning,
    examples,
    labels_text,
    list_names,
    list_text,
    parallel_map,
    remove_stale_temporaries,
    size_mismatch,
    write_once,
)
from cpal.data.prepare.manifest import (
    begin_manifest,
    finish_manifest,
    relative,
    write_image_checksums,
)
from cpal.data.voc import (
    ANNOTATION_DIR,
    IMAGE_DIR,
    LABELS_FILE,
    LAYOUT_FILE,
    MASK_DIR,
    SPLIT_DIR,
    VOC_CLASSES,
    VOCLayout,
    read_id_list,
    read_xml_labels,
)
from cpal.errors import DatasetError
from cpal.io import IGNORE_INDEX, save_label_png

__all__ = ["AUG_MASK_DIR", "SBD_STANDARD", "VOC_STANDARD", "load_sbd_mat", "prepare_voc"]

DATASET = "VOC 2012"
AUG_MASK_DIR = "SegmentationClassAug"
TRAIN_AUG = "train_aug"
# Sizes of the public releases; other counts are reported as warnings, not errors.
VOC_STANDARD = {"train": 1464, "val": 1449, TRAIN_AUG: 10582}
SBD_STANDARD = {"train": 8498, "val": 2857}
LABEL_RULE = "every <object> of Annotations/<id>.xml, difficult ones included (as IRN, SIPE)"


def _require(root: Path) -> None:
    if not root.is_dir():
        raise DatasetError(f"VOC root not found: {root}")
    wanted = [IMAGE_DIR, MASK_DIR, ANNOTATION_DIR]
    missing = [f"{name}/" for name in wanted if not (root / name).is_dir()]
    missing += [
        f"{SPLIT_DIR.as_posix()}/{split}.txt"
        for split in ("train", "val")
        if not (root / SPLIT_DIR / f"{split}.txt").is_file()
    ]
    if missing:
        raise DatasetError(f"{root} is not a VOC 2012 root: missing {', '.join(missing)}"
                           f"{_nested_hint(root, 'VOC2012', IMAGE_DIR)}")


def _require_sbd(sbd: Path) -> None:
    if not sbd.is_dir():
        raise DatasetError(f"SBD folder not found: {sbd}")
    missing = [name for name in ("cls/", "train.txt", "val.txt") if not (sbd / name).exists()]
    if missing:
        raise DatasetError(
            f"{sbd} is not SBD's benchmark_RELEASE/dataset folder: missing {', '.join(missing)}"
            f"{_nested_hint(sbd, 'dataset', 'cls')}"
        )


def _nested_hint(folder: Path, child: str, marker: str) -> str:
    """' (did you mean .../VOC2012?)' when the user gave the archive's outer folder
    (VOCdevkit, benchmark_RELEASE) instead of the one inside it."""
    for candidate in (folder / child, *folder.glob(f"*/{child}")):
        if (candidate / marker).is_dir():
            return f" (did you mean {candidate}?)"
    return ""


def load_sbd_mat(path: Path) -> np.ndarray:
    """Class indices of an SBD cls/<id>.mat, (H, W), integer dtype (range checked by callers).

    SBD ships MATLAB v5 files holding a 1x1 struct GTcls {Boundaries, Segmentation,
    CategoriesPresent}; loadmat with struct_as_record=True and squeeze_me=False (asked for
    explicitly: the code below depends on them) returns it as a (1, 1) record array whose
    Segmentation cell holds the (H, W) uint8 array. Only Segmentation is used (Boundaries
    serve SBD's own edge benchmark). A float array of whole numbers, as a copy re-saved by
    MATLAB code that computed in double would hold, is accepted too.
    """
    try:
        from scipy.io import loadmat
        from scipy.io.matlab import MatReadError
    except ImportError as error:
        raise DatasetError(
            f"reading {path} needs scipy: pip install 'cpal[voc]' (or scipy)"
        ) from error
    try:
        data = loadmat(path, struct_as_record=True, squeeze_me=False)
    except NotImplementedError as error:  # scipy's answer to MATLAB v7.3 (HDF5) files
        raise DatasetError(
            f"{path} is a MATLAB v7.3 (HDF5) file; SBD's cls files are MATLAB v5: use the "
            "files of benchmark_RELEASE as downloaded (or re-save them with save -v7)"
        ) from error
    except (MatReadError, OSError, ValueError, TypeError, zlib.error) as error:
        # zlib.error: a damaged compressed element (a corrupt or half-downloaded file)
        raise DatasetError(f"cannot read {path}: {error}") from error
    struct = data.get("GTcls")
    names = getattr(struct, "dtype", None) and struct.dtype.names
    if struct is None or not names or "Segmentation" not in names or struct.size != 1:
        found = ", ".join(k for k in data if not k.startswith("__")) or "nothing"
        raise DatasetError(
            f"{path}: expected a struct GTcls with field Segmentation, found {found}"
        )
    seg = np.asarray(struct["Segmentation"].flat[0])
    if seg.ndim == 2 and np.issubdtype(seg.dtype, np.floating):
        whole = np.isfinite(seg).all() and bool((seg == np.round(seg)).all())
        if not whole:
            raise DatasetError(f"{path}: GTcls.Segmentation holds non-integer values")
        seg = seg.astype(np.int64)
    if seg.ndim != 2 or not np.issubdtype(seg.dtype, np.integer):
        raise DatasetError(f"{path}: GTcls.Segmentation is {seg.dtype} {seg.shape}, not a 2-D "
                           "integer array")
    return seg


def _convert_mask(task: tuple[str, str, str, str]) -> None:
    """One mask of SegmentationClassAug, from a VOC PNG or an SBD .mat, checked and written."""
    kind, source, image, target = task
    num_classes = len(VOC_CLASSES)
    if kind == "png":
        values = load_mask(Path(source), num_classes)
    else:
        values = load_sbd_mat(Path(source))
        bad = (values >= num_classes) & (values != IGNORE_INDEX) | (values < 0)
        if bad.any():
            shown = ", ".join(str(v) for v in np.unique(values[bad])[:10].tolist())
            raise DatasetError(
                f"{source} has class value(s) {shown}; VOC has 0..{num_classes - 1} "
                f"(and {IGNORE_INDEX} = ignore)"
            )
    problem = size_mismatch(source, values.shape, image, image_size(Path(image)))
    if problem is not None:
        raise DatasetError(problem)
    save_label_png(target, values.astype(np.uint8))


def _image_labels(root: Path, *, workers: int, progress: bool) -> dict[str, list[str]]:
    """{id: class names in VOC order} for every Annotations/*.xml."""
    folder = root / ANNOTATION_DIR
    ids = sorted(name[:-4] for name in list_names(folder) if name.endswith(".xml"))
    paths = [folder / f"{image_id}.xml" for image_id in ids]
    parsed = parallel_map(read_xml_labels, paths, workers=workers, desc="labels",
                          progress=progress)
    order = {name: j for j, name in enumerate(VOC_CLASSES)}
    labels = {}
    for image_id, path, names in zip(ids, paths, parsed, strict=True):
        for name in names:
            if name not in order or name == VOC_CLASSES[0]:
                raise DatasetError(
                    f"{path}: unknown class '{name}'; valid: {', '.join(VOC_CLASSES[1:])}"
                )
        labels[image_id] = sorted(set(names), key=order.__getitem__)
    return labels


def _train_aug(
    layout: VOCLayout, train: list[str], val: list[str], sbd: Path | None, warnings: list[str]
) -> tuple[list[str] | None, set[str], bool]:
    """The train_aug ids (None when neither --sbd nor an existing list), the SBD ids, and
    whether the list file still has to be written."""
    val_set = set(val)
    path = layout.split_file(TRAIN_AUG)
    existing = layout.split_ids(TRAIN_AUG) if path.is_file() else None
    if existing is not None:
        shared = sorted(set(existing) & val_set)
        if shared:
            raise DatasetError(
                f"{path} lists {len(shared):,} ids of val ({examples(shared)}); train_aug must "
                "be disjoint from val: move the file away to let prepare build it"
            )
    if sbd is None:
        return existing, set(), False
    _require_sbd(sbd)
    sbd_train, sbd_val = read_id_list(sbd / "train.txt"), read_id_list(sbd / "val.txt")
    for split, ids in (("train", sbd_train), ("val", sbd_val)):
        warning = count_warning(f"SBD {split}.txt", len(ids), SBD_STANDARD[split], "SBD")
        if warning:
            warnings.append(warning)
    sbd_ids = set(sbd_train) | set(sbd_val)
    computed = sorted((set(train) | sbd_ids) - val_set)
    if existing is not None and set(existing) != set(computed):
        missing = sorted(set(computed) - set(existing))
        extra = sorted(set(existing) - set(computed))
        raise DatasetError(
            f"{path} already exists and differs from VOC train + SBD train + SBD val - VOC val "
            f"({len(missing):,} ids missing, e.g. {examples(missing, 3) or '-'}; {len(extra):,} "
            f"extra, e.g. {examples(extra, 3) or '-'}): move it away to let prepare write its own"
        )
    if existing is None:
        return computed, sbd_ids, True
    return existing, sbd_ids, False


def _write_aug_masks(
    layout: VOCLayout,
    ids: list[str],
    sbd: Path,
    sbd_ids: set[str],
    voc_ids: set[str],
    *,
    workers: int,
    progress: bool,
    warnings: list[str],
) -> dict[str, int]:
    """SegmentationClassAug/<id>.png for `ids`, skipping masks already written."""
    root = layout.root
    target_dir = root / AUG_MASK_DIR
    target_dir.mkdir(exist_ok=True)
    remove_stale_temporaries(target_dir)
    done = list_names(target_dir)
    voc_masks = list_names(root / MASK_DIR)
    sbd_masks = list_names(sbd / "cls")
    sources = {"SegmentationClass": 0, "SBD cls": 0}
    tasks, missing, fallback = [], [], []
    for image_id in ids:
        name = f"{image_id}.png"
        if name in voc_masks and image_id in voc_ids:
            kind, source = "png", root / MASK_DIR / name
            sources["SegmentationClass"] += 1
        elif image_id in sbd_ids and f"{image_id}.mat" in sbd_masks:
            kind, source = "mat", sbd / "cls" / f"{image_id}.mat"
            sources["SBD cls"] += 1
            if image_id in voc_ids:
                fallback.append(image_id)
        else:
            missing.append(image_id)
            continue
        if name not in done:
            image = layout.image_path(image_id)
            tasks.append((kind, str(source), str(image), str(target_dir / name)))
    if missing:
        raise DatasetError(
            f"no mask for {len(missing):,} ids of train_aug/val in {root / MASK_DIR} or "
            f"{sbd / 'cls'}: {examples(missing)}"
        )
    if fallback:
        warnings.append(
            f"{len(fallback):,} VOC train/val ids have no mask in {MASK_DIR}; their SBD mask is "
            f"used ({examples(fallback)})"
        )
    parallel_map(_convert_mask, tasks, workers=workers, desc="masks", progress=progress)
    # Masks already there (an earlier run, or a downloaded SegmentationClassAug) are kept
    # unread: `cpal data verify` checks them.
    return {**sources, "written_now": len(tasks), "kept": len(ids) - len(tasks)}


def prepare_voc(
    root: Path,
    *,
    sbd: Path | None = None,
    workers: int = 1,
    progress: bool = False,
    checksum_images: bool = False,
) -> dict[str, Any]:
    """Check a VOC 2012 root, add train_aug (+SBD masks), labels and a manifest; return it."""
    root = Path(root).expanduser()
    sbd = Path(sbd).expanduser() if sbd is not None else None
    _require(root)
    classes_file = root / "classes.txt"
    if classes_file.is_file() and VOCLayout.open(root).class_names != VOC_CLASSES:
        raise DatasetError(f"{classes_file} does not list VOC's 21 classes; is this VOC 2012?")
    layout = VOCLayout(root=root, class_names=VOC_CLASSES)
    warnings: list[str] = []
    train, val = layout.split_ids("train"), layout.split_ids("val")
    shared = sorted(set(train) & set(val))
    if shared:
        raise DatasetError(
            f"{layout.split_file('train')} and val.txt share {len(shared):,} ids "
            f"({examples(shared)}); they must be disjoint"
        )
    train_aug, sbd_ids, write_train_aug = _train_aug(layout, train, val, sbd, warnings)
    splits = {"train": train, "val": val, **({TRAIN_AUG: train_aug} if train_aug else {})}
    for split, ids in splits.items():
        warning = count_warning(split, len(ids), VOC_STANDARD[split], DATASET)
        if warning:
            warnings.append(warning)
    listed = sorted(set().union(*splits.values()))
    absent = []
    for image_id in listed:
        try:
            layout.image_path(image_id)
        except DatasetError:
            absent.append(image_id)
    if absent:
        raise DatasetError(
            f"{len(absent):,} listed ids have no image in {root / IMAGE_DIR}: {examples(absent)}"
        )

    labels = _image_labels(root, workers=workers, progress=progress)
    unlabelled = [image_id for image_id in listed if image_id not in labels]
    if unlabelled:
        raise DatasetError(
            f"{len(unlabelled):,} listed ids have no {root / ANNOTATION_DIR}/<id>.xml: "
            f"{examples(unlabelled)}"
        )

    # Everything checked that can be checked before writing: start writing.
    begin_manifest(root, DATASET, {}, redo_hint="")
    if write_train_aug and train_aug is not None:
        write_once(layout.split_file(TRAIN_AUG), list_text(train_aug))
    write_once(root / LABELS_FILE, labels_text(labels))
    files = [relative(root, layout.split_file(split)) for split in splits] + [LABELS_FILE]

    details: dict[str, Any] = {"labels": LABEL_RULE, "labelled_images": len(labels)}
    if sbd is not None and train_aug is not None:
        aug_ids = sorted(set(train_aug) | set(val))
        details["sbd"] = str(sbd)
        details["train_aug_rule"] = "VOC train + SBD train + SBD val - VOC val"
        details["mask_sources"] = _write_aug_masks(
            layout, aug_ids, sbd, sbd_ids, set(train) | set(val), workers=workers,
            progress=progress, warnings=warnings,
        )
        write_once(root / LAYOUT_FILE, json.dumps({"mask_dir": AUG_MASK_DIR}) + "\n")
    if (root / LAYOUT_FILE).is_file():
        files.append(LAYOUT_FILE)
    layout = VOCLayout.open(root)
    for split, ids in splits.items():
        have = layout.count_masks(ids)
        if have != len(ids) and split != TRAIN_AUG:
            warnings.append(f"{split}: {len(ids) - have:,} of {len(ids):,} ids have no mask in "
                            f"{layout.mask_dir} (the split will not be evaluated)")
    image_checksums = None
    if checksum_images:
        image_checksums = write_image_checksums(root, layout, listed, workers=workers,
                                                progress=progress)
    return finish_manifest(
        layout,
        dataset=DATASET,
        sources={},
        splits={split: VOC_STANDARD[split] for split in splits},
        disjoint=[("train", "val")] + ([(TRAIN_AUG, "val")] if train_aug else []),
        files=files,
        details=details,
        warnings=warnings,
        image_checksums=image_checksums,
    )

