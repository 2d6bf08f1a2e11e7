"""Reader for any dataset in PASCAL VOC layout, with fail-fast validation.

    ROOT/JPEGImages/<id>.jpg|.jpeg|.png
    ROOT/SegmentationClass/<id>.png        index/palette PNG (evaluation only)
    ROOT/ImageSets/Segmentation/<split>.txt
    ROOT/classes.txt                        optional; default VOC_CLASSES
    ROOT/image_labels.json                  optional {"<id>": ["cat", ...]}
    ROOT/Annotations/<id>.xml               used when image_labels.json is absent
    ROOT/layout.json                        optional {"mask_dir": "SegmentationClassAug"}

Every problem is a `DatasetError` whose one-line message names the file (and for
labels the id and the offending name), so users fix their data instead of reading
tracebacks. Training reads images and image-level labels only; `mask_path`,
`load_mask` and `check(masks=True)` are the only places that touch the mask folder
(SegmentationClass, or the folder `layout.json` names: `cpal data prepare voc --sbd`
writes VOC+SBD masks to SegmentationClassAug and records that choice there, so the
user's SegmentationClass is never overwritten).
"""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

import numpy as np

from cpal.data.images import load_mask as _load_mask_file
from cpal.data.images import load_rgb
from cpal.errors import DatasetError
from cpal.io import IGNORE_INDEX

__all__ = [
    "IMAGE_EXTENSIONS",
    "VOC_CLASSES",
    "VOCLayout",
    "id_problem",
    "read_id_list",
    "read_xml_labels",
]

VOC_CLASSES: tuple[str, ...] = (
    "background",
    "aeroplane",
    "bicycle",
    "bird",
    "boat",
    "bottle",
    "bus",
    "car",
    "cat",
    "chair",
    "cow",
    "diningtable",
    "dog",
    "horse",
    "motorbike",
    "person",
    "pottedplant",
    "sheep",
    "sofa",
    "train",
    "tvmonitor",
)

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png")

BACKGROUND = "background"
IMAGE_DIR = "JPEGImages"
MASK_DIR = "SegmentationClass"
SPLIT_DIR = Path("ImageSets") / "Segmentation"
ANNOTATION_DIR = "Annotations"
CLASSES_FILE = "classes.txt"
LABELS_FILE = "image_labels.json"
LAYOUT_FILE = "layout.json"


def id_problem(image_id: str) -> str | None:
    """Why `image_id` cannot be used as a file stem, or None if it can.

    Ids are joined onto folders, so anything that could escape or nest a folder
    (separators, `..`, absolute or drive paths) is refused, as is whitespace, which in
    a split file usually means a VOC `ImageSets/Main` line ("<id>  1") was pasted in.
    """
    if not isinstance(image_id, str):
        return f"is not a string ({type(image_id).__name__})"
    if not image_id:
        return "is empty"
    if any(ch.isspace() for ch in image_id):
        return "contains whitespace"
    if "/" in image_id or "\\" in image_id or "\x00" in image_id:
        return "is a path (contains a separator), not a file name stem"
    if image_id in (".", ".."):
        return "is a path component, not a file name stem"
    if PurePosixPath(image_id).is_absolute() or PureWindowsPath(image_id).drive:
        return "is an absolute path"
    return None


def _validate_class_names(names: Sequence[str], source: str) -> tuple[str, ...]:
    names = tuple(names)
    if not names or names[0] != BACKGROUND:
        first = repr(names[0]) if names else "nothing"
        raise DatasetError(f"{source}: first class must be '{BACKGROUND}', found {first}")
    if len(names) < 2:
        raise DatasetError(f"{source}: needs at least one foreground class after background")
    if len(names) > IGNORE_INDEX:
        raise DatasetError(
            f"{source}: {len(names)} classes do not fit uint8 masks "
            f"(at most {IGNORE_INDEX}, since {IGNORE_INDEX} means ignore)"
        )
    seen: set[str] = set()
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DatasetError(f"{source}: empty class name")
        if name != name.strip():
            raise DatasetError(f"{source}: class name {name!r} has surrounding whitespace")
        if name in seen:
            raise DatasetError(f"{source}: duplicate class name '{name}'")
        seen.add(name)
    return names


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise DatasetError(f"{path} is not valid UTF-8 text: {error.reason}") from error
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error


def _reject_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key '{key}'")
        result[key] = value
    return result


def invalid_json(path: Path, error: json.JSONDecodeError) -> DatasetError:
    """The one-line error for a JSON file that does not parse: where, and why."""
    return DatasetError(
        f"{path} is not valid JSON: {error.msg} (line {error.lineno}, column {error.colno})"
    )


def _read_json_object(path: Path, shape: str) -> dict[str, Any]:
    """A JSON file holding one object (duplicate keys refused); `shape` is for the error."""
    try:
        data = json.loads(_read_text(path), object_pairs_hook=_reject_duplicate_keys)
    except json.JSONDecodeError as error:
        raise invalid_json(path, error) from error
    except ValueError as error:
        raise DatasetError(f"{path} is not valid: {error}") from error
    if not isinstance(data, dict):
        raise DatasetError(f"{path} must hold an object {shape}, found {type(data).__name__}")
    return data


def _read_layout_options(path: Path) -> dict[str, str]:
    """Options of `layout.json`; only "mask_dir" (a folder name under the root) exists."""
    data = _read_json_object(path, '{"mask_dir": "<folder>"}')
    unknown = sorted(set(data) - {"mask_dir"})
    if unknown:
        raise DatasetError(f"{path}: unknown key '{unknown[0]}'; valid keys: mask_dir")
    options: dict[str, str] = {}
    if "mask_dir" in data:
        folder = data["mask_dir"]
        problem = id_problem(folder)
        if problem is not None:
            raise DatasetError(f"{path}: mask_dir {folder!r} {problem}")
        options["mask_dir"] = folder
    return options


def read_id_list(path: Path) -> list[str]:
    """Ids of a list file (one per line), in file order, validated.

    Surrounding whitespace and trailing blank lines are ignored; blank lines in the
    middle, path-like ids, ids with inner whitespace and duplicates are errors.
    """
    if not path.is_file():
        raise DatasetError(f"id list not found: {path}")
    lines = [line.strip() for line in _read_text(path).splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise DatasetError(f"split file {path} lists no image ids")
    first_line: dict[str, int] = {}
    for number, image_id in enumerate(lines, start=1):
        if not image_id:
            raise DatasetError(f"{path} line {number}: empty image id")
        problem = id_problem(image_id)
        if problem is not None:
            raise DatasetError(f"{path} line {number}: image id {image_id!r} {problem}")
        if image_id in first_line:
            raise DatasetError(
                f"{path} line {number}: duplicate image id '{image_id}' "
                f"(first on line {first_line[image_id]})"
            )
        first_line[image_id] = number
    return lines


def read_xml_labels(path: Path) -> list[str]:
    """Every <object><name> of a VOC annotation file, difficult objects included.

    Like IRN and SIPE's label lists: an object marked difficult is still in the image.
    Only an object's own <name> counts: <part><name> (head, hand...) are not classes.
    """
    try:
        tree = ET.parse(path)
    except ET.ParseError as error:
        raise DatasetError(f"{path} is not valid XML: {error}") from error
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    names = []
    for number, obj in enumerate(tree.getroot().iter("object"), start=1):
        name = obj.find("name")
        if name is None or not (name.text or "").strip():
            raise DatasetError(f"{path}: object {number} has no <name>")
        names.append(name.text.strip())
    return names


@dataclass(frozen=True)
class VOCLayout:
    """A dataset root in VOC layout and its class list; create it with `VOCLayout.open`.

    Split lists, the JPEGImages listing, `image_labels.json` and parsed XML labels are
    cached on the instance (the caches are plain dicts, so it pickles into DataLoader
    workers).
    """

    root: Path
    class_names: tuple[str, ...]
    mask_dir: str = MASK_DIR
    """Folder (under root) holding the masks; `layout.json` can name another."""
    _cache: dict[str, Any] = field(
        default_factory=dict, init=False, repr=False, compare=False, hash=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "root", Path(self.root))
        object.__setattr__(
            self, "class_names", _validate_class_names(self.class_names, "class names")
        )
        problem = id_problem(self.mask_dir)
        if problem is not None:
            raise DatasetError(f"mask folder name {self.mask_dir!r} {problem}")

    # ------------------------------------------------------------------ construction

    @classmethod
    def open(cls, root: Path | str) -> VOCLayout:
        """Check that `root` exists; read `classes.txt` (VOC's 21 classes if absent) and
        `layout.json` (masks in SegmentationClass if absent)."""
        root = Path(root).expanduser()
        if not root.exists():
            raise DatasetError(f"dataset root not found: {root}")
        if not root.is_dir():
            raise DatasetError(f"dataset root is not a folder: {root}")
        classes_file = root / CLASSES_FILE
        if classes_file.is_file():
            lines = [line.strip() for line in _read_text(classes_file).splitlines()]
            names = _validate_class_names([line for line in lines if line], str(classes_file))
        else:
            names = VOC_CLASSES
        layout_file = root / LAYOUT_FILE
        options = _read_layout_options(layout_file) if layout_file.is_file() else {}
        return cls(root=root, class_names=names, **options)

    @property
    def num_classes(self) -> int:
        """Number of classes including background (= valid mask values 0..n-1)."""
        return len(self.class_names)

    @property
    def num_foreground(self) -> int:
        """Width of the multi-hot image-label vector."""
        return len(self.class_names) - 1

    # ------------------------------------------------------------------ splits and paths

    def split_file(self, split: str) -> Path:
        """Path of the id list for `split` (not checked for existence)."""
        problem = id_problem(split)
        if problem is not None:
            raise DatasetError(f"split name {split!r} {problem}")
        return self.root / SPLIT_DIR / f"{split}.txt"

    def split_ids(self, split: str) -> list[str]:
        """Ids listed in the split file (`read_id_list`), cached per split."""
        splits: dict[str, list[str]] = self._cache.setdefault("splits", {})
        if split not in splits:
            splits[split] = self._read_split(split)
        return list(splits[split])

    def _read_split(self, split: str) -> list[str]:
        path = self.split_file(split)
        if not path.is_file():
            folder = path.parent
            available = sorted(p.stem for p in folder.glob("*.txt")) if folder.is_dir() else []
            hint = f"; available splits: {', '.join(available)}" if available else ""
            raise DatasetError(f"split file not found: {path}{hint}")
        return read_id_list(path)

    def _checked_id(self, image_id: str) -> str:
        problem = id_problem(image_id)
        if problem is not None:
            raise DatasetError(f"image id {image_id!r} {problem}")
        return image_id

    def _image_index(self) -> dict[str, list[str]]:
        """One scandir of JPEGImages: stem -> file names with an image extension.

        Extensions match case-insensitively (`x.JPG` counts), the stem exactly.
        """
        index: dict[str, list[str]] | None = self._cache.get("images")
        if index is None:
            folder = self.root / IMAGE_DIR
            if not folder.is_dir():
                raise DatasetError(f"image folder not found: {folder}")
            index = {}
            try:
                with os.scandir(folder) as entries:
                    for entry in entries:
                        stem, dot, ext = entry.name.rpartition(".")
                        is_image = dot and stem and "." + ext.lower() in IMAGE_EXTENSIONS
                        if is_image and entry.is_file():
                            index.setdefault(stem, []).append(entry.name)
            except OSError as error:
                raise DatasetError(f"cannot list {folder}: {error.strerror or error}") from error
            self._cache["images"] = index
        return index

    def image_path(self, image_id: str) -> Path:
        """The one image file for `image_id` (.jpg, .jpeg or .png, any case).

        Two candidates for the same id (e.g. x.jpg and x.png) are an error rather than
        a silent pick, since it usually means a half-finished conversion.
        """
        self._checked_id(image_id)
        folder = self.root / IMAGE_DIR
        names = self._image_index().get(image_id)
        if not names:
            # The listing is cached: files written after it was taken are still found.
            names = [
                image_id + ext for ext in IMAGE_EXTENSIONS if (folder / (image_id + ext)).is_file()
            ]
        if len(names) == 1:
            return folder / names[0]
        if not names:
            tried = ", ".join(IMAGE_EXTENSIONS)
            raise DatasetError(
                f"image for id '{image_id}' not found: expected {folder / image_id} "
                f"with extension {tried} (any case)"
            )
        raise DatasetError(
            f"image id '{image_id}' is ambiguous: {', '.join(sorted(names))} in {folder}; keep one"
        )

    def mask_path(self, image_id: str) -> Path:
        """Where the mask of `image_id` should be (existence not checked). Evaluation only."""
        return self.root / self.mask_dir / f"{self._checked_id(image_id)}.png"

    def count_masks(self, ids: Sequence[str]) -> int:
        """How many of `ids` have a mask file (one directory listing, no decoding)."""
        folder = self.root / self.mask_dir
        try:
            present = set(os.listdir(folder))
        except FileNotFoundError:
            return 0
        except OSError as error:
            raise DatasetError(f"cannot list {folder}: {error.strerror or error}") from error
        return sum(self.mask_path(i).name in present for i in ids)

    def has_masks(self, ids: Sequence[str]) -> bool:
        """Whether every one of `ids` has a mask, i.e. the split can be evaluated."""
        return self.count_masks(ids) == len(ids)

    # ------------------------------------------------------------------ image-level labels

    @property
    def labels_file(self) -> Path:
        return self.root / LABELS_FILE

    def _json_labels(self) -> dict[str, list[str]] | None:
        """image_labels.json, loaded once and checked for shape; None when absent."""
        if "json" not in self._cache:
            path = self.labels_file
            if not path.is_file():
                self._cache["json"] = None
            else:
                data = _read_json_object(path, '{"<id>": ["class", ...]}')
                for key, value in data.items():
                    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                        raise DatasetError(
                            f"{path}: labels of id '{key}' must be a list of class names, "
                            f"found {json.dumps(value)[:80]}"
                        )
                self._cache["json"] = data
        return self._cache["json"]

    def _xml_labels(self, image_id: str) -> list[str]:
        """Labels of Annotations/<id>.xml (`read_xml_labels`), parsed once per id."""
        parsed: dict[str, list[str]] = self._cache.setdefault("xml", {})
        if image_id in parsed:
            return parsed[image_id]
        path = self.root / ANNOTATION_DIR / f"{image_id}.xml"
        if not path.is_file():
            raise DatasetError(
                f"no labels for image id '{image_id}': {path} not found "
                f"(and there is no {self.labels_file})"
            )
        names = read_xml_labels(path)
        parsed[image_id] = names
        return names

    def _class_column(self) -> dict[str, int]:
        columns: dict[str, int] | None = self._cache.get("columns")
        if columns is None:
            columns = {name: j for j, name in enumerate(self.class_names[1:])}
            self._cache["columns"] = columns
        return columns

    def image_labels(self, ids: Sequence[str]) -> np.ndarray:
        """(N, num_foreground) float32 multi-hot; column j is class_names[j + 1].

        Labels come from image_labels.json when present, else from per-id VOC XML files
        (parsed on demand). An image may have no foreground label (an all-zero row).
        """
        columns = self._class_column()
        table = self._json_labels()
        labels = np.zeros((len(ids), self.num_foreground), dtype=np.float32)
        for row, image_id in enumerate(ids):
            self._checked_id(image_id)
            if table is not None:
                source = self.labels_file
                if image_id not in table:
                    raise DatasetError(f"{source} has no entry for image id '{image_id}'")
                names = [name.strip() for name in table[image_id]]
            else:
                source = self.root / ANNOTATION_DIR / f"{image_id}.xml"
                names = self._xml_labels(image_id)
            for name in names:
                column = columns.get(name)
                if column is None:
                    if name == BACKGROUND:
                        raise DatasetError(
                            f"{source}: image id '{image_id}' lists '{BACKGROUND}', which is "
                            "not an image label (background is implied)"
                        )
                    raise DatasetError(
                        f"{source}: image id '{image_id}' has unknown class '{name}'; "
                        f"valid: {', '.join(self.class_names[1:])}"
                    )
                labels[row, column] = 1.0
        return labels

    # ------------------------------------------------------------------ pixels

    def load_image(self, image_id: str) -> np.ndarray:
        """(H, W, 3) uint8 RGB of `image_id`, EXIF-upright."""
        return load_rgb(self.image_path(image_id))

    def load_mask(self, image_id: str) -> np.ndarray:
        """(H, W) uint8 class indices (255 = ignore), values checked. Evaluation only."""
        path = self.mask_path(image_id)
        if not path.is_file():
            raise DatasetError(f"mask for image id '{image_id}' not found: {path}")
        return _load_mask_file(path, self.num_classes)

    # ------------------------------------------------------------------ validation

    def check_images(self, split: str) -> list[str]:
        """The split's ids, every image file present and unambiguous (the error names the
        split list); also enough for a split that is only predicted (VOC test)."""
        ids = self.split_ids(split)
        for image_id in ids:
            try:
                self.image_path(image_id)
            except DatasetError as error:
                raise DatasetError(f"{error} (listed in {self.split_file(split)})") from error
        return ids

    def check(self, split: str, *, masks: bool = False, decode: bool = False) -> int:
        """Validate a whole split up front and return its number of images.

        Always (fast, no decoding): ids valid and unique, every image file present and
        unambiguous, every id labelled with known classes. masks=True: every mask file
        present. decode=True: every image decodes (and every mask, with values in range
        and the same size as its image, when masks=True).
        """
        ids = self.check_images(split)
        split_file = self.split_file(split)
        self.image_labels(ids)
        if masks:
            folder = self.root / self.mask_dir
            if not folder.is_dir():
                raise DatasetError(f"mask folder not found: {folder}")
            try:
                present = set(os.listdir(folder))
            except OSError as error:
                raise DatasetError(f"cannot list {folder}: {error.strerror or error}") from error
            for image_id in ids:
                path = self.mask_path(image_id)
                if path.name not in present and not path.is_file():
                    raise DatasetError(
                        f"mask for image id '{image_id}' not found: {path} (listed in {split_file})"
                    )
        if decode:
            for image_id in ids:
                image = self.load_image(image_id)
                if masks:
                    mask = self.load_mask(image_id)
                    if mask.shape != image.shape[:2]:
                        raise DatasetError(
                            f"mask {self.mask_path(image_id)} is {mask.shape[1]}x{mask.shape[0]}"
                            f" but its image {self.image_path(image_id)} is "
                            f"{image.shape[1]}x{image.shape[0]} (width x height)"
                        )
        return len(ids)
