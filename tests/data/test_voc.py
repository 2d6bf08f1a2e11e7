"""VOC-layout reader: a good dataset round-trips, every bad dataset fails with one clear line."""

from __future__ import annotations

import json
import pickle
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.data import images as images_module
from cpal.data.voc import IMAGE_EXTENSIONS, VOC_CLASSES, VOCLayout
from cpal.errors import DatasetError
from cpal.io import save_label_png

CLASSES = ("background", "cat", "dog", "bird")


def _image(seed: int, height: int = 6, width: int = 8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _write_split(root: Path, split: str, lines: list[str]) -> Path:
    path = root / "ImageSets" / "Segmentation" / f"{split}.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def make_dataset(root: Path, *, classes: tuple[str, ...] | None = CLASSES) -> Path:
    """Three images (png, jpg, png), palette and L masks, json labels, split 'train'."""
    (root / "JPEGImages").mkdir(parents=True)
    (root / "SegmentationClass").mkdir()
    if classes is not None:
        (root / "classes.txt").write_text("\n".join(classes) + "\n")
    Image.fromarray(_image(0)).save(root / "JPEGImages" / "a.png")
    Image.fromarray(_image(1)).save(root / "JPEGImages" / "b.jpg", quality=100, subsampling=0)
    Image.fromarray(_image(2, 5, 7)).save(root / "JPEGImages" / "c.png")
    mask_a = np.zeros((6, 8), np.uint8)
    mask_a[1:3, 2:5] = 1
    mask_a[0, 0] = 255
    save_label_png(root / "SegmentationClass" / "a.png", mask_a)
    mask_b = np.zeros((6, 8), np.uint8)
    mask_b[:, 4:] = 2
    mask_b[0, :] = 3
    Image.fromarray(mask_b, mode="L").save(root / "SegmentationClass" / "b.png")
    save_label_png(root / "SegmentationClass" / "c.png", np.full((5, 7), 3, np.uint8))
    labels = {"a": ["cat"], "b": ["dog", "bird"], "c": ["bird", "bird"], "unused": ["cat"]}
    (root / "image_labels.json").write_text(json.dumps(labels))
    _write_split(root, "train", ["b", "a", "c"])
    return root


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_dataset(tmp_path / "ds")


def _voc_xml(objects: list[tuple[str, int]], *, parts: bool = False) -> str:
    body = "".join(
        f"<object><name>{name}</name><pose>Unspecified</pose><difficult>{difficult}</difficult>"
        + ("<part><name>head</name></part>" if parts else "")
        + "<bndbox><xmin>1</xmin><ymin>1</ymin><xmax>3</xmax><ymax>3</ymax></bndbox></object>"
        for name, difficult in objects
    )
    return (
        "<annotation><folder>VOC2012</folder><filename>x.jpg</filename>"
        "<size><width>8</width><height>6</height><depth>3</depth></size>"
        f"<segmented>1</segmented>{body}</annotation>"
    )


# ---------------------------------------------------------------------------- good data


def test_round_trip(root: Path) -> None:
    layout = VOCLayout.open(root)
    assert layout.class_names == CLASSES
    assert layout.num_classes == 4 and layout.num_foreground == 3
    ids = layout.split_ids("train")
    assert ids == ["b", "a", "c"]

    labels = layout.image_labels(ids)
    assert labels.dtype == np.float32 and labels.shape == (3, 3)
    # columns: cat, dog, bird
    np.testing.assert_array_equal(labels, [[0, 1, 1], [1, 0, 0], [0, 0, 1]])

    np.testing.assert_array_equal(layout.load_image("a"), _image(0))
    jpg = layout.load_image("b")
    assert jpg.shape == (6, 8, 3) and jpg.dtype == np.uint8
    assert np.abs(jpg.astype(int) - _image(1).astype(int)).mean() < 5
    assert layout.image_path("b") == root / "JPEGImages" / "b.jpg"

    mask_a = layout.load_mask("a")  # palette PNG
    assert mask_a.dtype == np.uint8 and mask_a[0, 0] == 255 and mask_a[1, 2] == 1
    assert mask_a.sum() == 255 + 6
    mask_b = layout.load_mask("b")  # L PNG
    assert mask_b[0].tolist() == [3] * 8 and mask_b[3].tolist() == [0] * 4 + [2] * 4
    assert layout.mask_path("c") == root / "SegmentationClass" / "c.png"
    assert layout.load_mask("c").shape == (5, 7)

    assert layout.check("train") == 3
    assert layout.check("train", masks=True, decode=True) == 3


def test_split_ids_returns_a_copy(root: Path) -> None:
    layout = VOCLayout.open(root)
    layout.split_ids("train").append("zzz")
    assert layout.split_ids("train") == ["b", "a", "c"]


def test_crlf_bom_and_trailing_blank_lines_in_split(root: Path) -> None:
    path = root / "ImageSets" / "Segmentation" / "val.txt"
    path.write_bytes("\ufeffa\r\n c \r\n\r\n\r\n".encode())
    assert VOCLayout.open(root).split_ids("val") == ["a", "c"]


def test_default_voc_classes_when_classes_txt_absent(tmp_path: Path) -> None:
    root = make_dataset(tmp_path / "ds", classes=None)
    (root / "image_labels.json").write_text(
        json.dumps({"a": ["cat"], "b": ["dog", "person"], "c": ["tvmonitor"]})
    )
    layout = VOCLayout.open(root)
    assert layout.class_names == VOC_CLASSES
    assert len(VOC_CLASSES) == 21 and VOC_CLASSES[0] == "background"
    assert VOC_CLASSES[8] == "cat" and VOC_CLASSES[-1] == "tvmonitor"
    assert layout.num_foreground == 20
    labels = layout.image_labels(["a", "b", "c"])
    assert labels.shape == (3, 20)
    assert np.flatnonzero(labels[0]).tolist() == [VOC_CLASSES.index("cat") - 1]
    assert np.flatnonzero(labels[1]).tolist() == [11, 14]  # dog, person
    assert np.flatnonzero(labels[2]).tolist() == [19]


def test_xml_labels_include_difficult_objects(root: Path) -> None:
    (root / "image_labels.json").unlink()
    annotations = root / "Annotations"
    annotations.mkdir()
    (annotations / "a.xml").write_text(_voc_xml([("cat", 0), ("dog", 1)], parts=True))
    (annotations / "b.xml").write_text(_voc_xml([("bird", 0), ("bird", 0)]))
    (annotations / "c.xml").write_text(_voc_xml([("\n  dog\n  ", 1)]))
    layout = VOCLayout.open(root)
    np.testing.assert_array_equal(
        layout.image_labels(["a", "b", "c"]), [[1, 1, 0], [0, 0, 1], [0, 1, 0]]
    )
    assert layout.check("train") == 3


def test_image_extensions_any_case(root: Path) -> None:
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png")
    (root / "JPEGImages" / "c.png").rename(root / "JPEGImages" / "c.JPEG")
    layout = VOCLayout.open(root)
    assert layout.image_path("c") == root / "JPEGImages" / "c.JPEG"


def test_image_added_after_listing_is_found(root: Path) -> None:
    layout = VOCLayout.open(root)
    layout.image_path("a")  # builds the cached listing
    Image.fromarray(_image(3)).save(root / "JPEGImages" / "late.jpeg")
    assert layout.image_path("late") == root / "JPEGImages" / "late.jpeg"


def test_check_without_masks_needs_no_mask_folder(root: Path) -> None:
    for mask in (root / "SegmentationClass").iterdir():
        mask.unlink()
    (root / "SegmentationClass").rmdir()
    layout = VOCLayout.open(root)
    assert layout.check("train", decode=True) == 3
    with pytest.raises(DatasetError, match="SegmentationClass"):
        layout.check("train", masks=True)


def test_layout_pickles_for_worker_processes(root: Path) -> None:
    layout = VOCLayout.open(root)
    layout.check("train")
    clone = pickle.loads(pickle.dumps(layout))
    assert clone == layout
    assert clone.split_ids("train") == ["b", "a", "c"]
    np.testing.assert_array_equal(clone.load_image("a"), _image(0))


def test_check_is_fast_and_decodes_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    root = tmp_path / "big"
    (root / "JPEGImages").mkdir(parents=True)
    ids = [f"{i:06d}" for i in range(10_000)]
    for image_id in ids:
        (root / "JPEGImages" / f"{image_id}.jpg").touch()
    (root / "image_labels.json").write_text(json.dumps({i: ["cat"] for i in ids}))
    _write_split(root, "train", ids)

    def no_open(*args: object, **kwargs: object) -> None:
        raise AssertionError("check() without decode opened an image")

    monkeypatch.setattr(images_module.Image, "open", no_open)
    start = time.perf_counter()
    assert VOCLayout.open(root).check("train") == 10_000
    assert time.perf_counter() - start < 5.0


# ---------------------------------------------------------------------------- bad data


def test_missing_root(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no_such_root"):
        VOCLayout.open(tmp_path / "no_such_root")
    (tmp_path / "file").write_text("x")
    with pytest.raises(DatasetError, match="not a folder"):
        VOCLayout.open(tmp_path / "file")


def test_missing_image_folder(root: Path) -> None:
    (root / "JPEGImages").rename(root / "Images")
    with pytest.raises(DatasetError, match="JPEGImages"):
        VOCLayout.open(root).check("train")


def test_missing_split_file(root: Path) -> None:
    with pytest.raises(DatasetError, match=r"val\.txt.*available splits: train"):
        VOCLayout.open(root).split_ids("val")


def test_bad_split_name(root: Path) -> None:
    with pytest.raises(DatasetError, match="split name"):
        VOCLayout.open(root).split_ids("../train")


def test_empty_split(root: Path) -> None:
    _write_split(root, "empty", ["", "  "])
    with pytest.raises(DatasetError, match=r"empty\.txt lists no image ids"):
        VOCLayout.open(root).split_ids("empty")


@pytest.mark.parametrize(
    ("bad_id", "reason"),
    [
        ("../x", "separator"),
        ("a/b", "separator"),
        ("a\\b", "separator"),
        ("/abs", "separator"),
        ("..", "path component"),
        ("C:x", "absolute"),
        ("2008_000008  1", "whitespace"),
        ("a\tb", "whitespace"),
    ],
)
def test_path_like_ids_are_rejected(root: Path, bad_id: str, reason: str) -> None:
    split = _write_split(root, "bad", ["a", bad_id])
    with pytest.raises(DatasetError, match=reason) as info:
        VOCLayout.open(root).split_ids("bad")
    assert split.name in str(info.value) and "line 2" in str(info.value)
    with pytest.raises(DatasetError, match=reason):
        VOCLayout.open(root).image_path(bad_id)


def test_blank_line_inside_split_is_rejected(root: Path) -> None:
    _write_split(root, "gap", ["a", "", "b"])
    with pytest.raises(DatasetError, match=r"gap\.txt line 2: empty image id"):
        VOCLayout.open(root).split_ids("gap")


def test_duplicate_ids(root: Path) -> None:
    _write_split(root, "dup", ["a", "b", "a"])
    with pytest.raises(DatasetError, match=r"dup\.txt line 3: duplicate image id 'a'.*line 1"):
        VOCLayout.open(root).split_ids("dup")


def test_missing_image(root: Path) -> None:
    (root / "JPEGImages" / "c.png").unlink()
    layout = VOCLayout.open(root)
    with pytest.raises(DatasetError) as info:
        layout.check("train")
    message = str(info.value)
    assert str(root / "JPEGImages" / "c") in message
    assert ".jpg, .jpeg, .png" in message and "train.txt" in message
    with pytest.raises(DatasetError, match="'c' not found"):
        layout.load_image("c")


def test_ambiguous_image(root: Path) -> None:
    Image.fromarray(_image(0)).save(root / "JPEGImages" / "a.jpg")
    with pytest.raises(DatasetError, match=r"'a' is ambiguous: a\.jpg, a\.png"):
        VOCLayout.open(root).check("train")


def test_missing_mask_only_when_masks_are_asked_for(root: Path) -> None:
    (root / "SegmentationClass" / "a.png").unlink()
    layout = VOCLayout.open(root)
    assert layout.check("train") == 3
    assert layout.check("train", decode=True) == 3
    with pytest.raises(DatasetError, match=r"'a'.*SegmentationClass/a\.png"):
        layout.check("train", masks=True)
    with pytest.raises(DatasetError, match=r"SegmentationClass/a\.png"):
        layout.load_mask("a")


def test_unknown_class_name(root: Path) -> None:
    (root / "image_labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dgo"], "c": ["bird"]}))
    with pytest.raises(DatasetError) as info:
        VOCLayout.open(root).check("train")
    message = str(info.value)
    assert "image_labels.json" in message and "'b'" in message and "'dgo'" in message
    assert "cat, dog, bird" in message


def test_background_is_not_an_image_label(root: Path) -> None:
    (root / "image_labels.json").write_text(
        json.dumps({"a": ["cat", "background"], "b": ["dog"], "c": ["bird"]})
    )
    with pytest.raises(DatasetError, match=r"image_labels\.json: image id 'a' lists 'background'"):
        VOCLayout.open(root).check("train")


def test_id_without_label_entry(root: Path) -> None:
    (root / "image_labels.json").write_text(json.dumps({"a": ["cat"], "b": ["dog"]}))
    with pytest.raises(DatasetError, match=r"image_labels\.json has no entry for image id 'c'"):
        VOCLayout.open(root).check("train")


def test_id_without_xml(root: Path) -> None:
    (root / "image_labels.json").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(_voc_xml([("cat", 0)]))
    (root / "Annotations" / "b.xml").write_text(_voc_xml([("dog", 0)]))
    with pytest.raises(DatasetError, match=r"'c'.*Annotations/c\.xml not found"):
        VOCLayout.open(root).check("train")


def test_unknown_class_in_xml_names_file_id_and_name(root: Path) -> None:
    (root / "image_labels.json").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text(_voc_xml([("cat", 0), ("zebra", 1)]))
    with pytest.raises(DatasetError, match=r"a\.xml: image id 'a' has unknown class 'zebra'"):
        VOCLayout.open(root).image_labels(["a"])


@pytest.mark.parametrize(
    "text", ['{"a": ["cat"],', '["a", "cat"]', '{"a": "cat"}', '{"a": ["cat"], "a": ["dog"]}']
)
def test_malformed_json(root: Path, text: str) -> None:
    (root / "image_labels.json").write_text(text)
    with pytest.raises(DatasetError, match=r"image_labels\.json"):
        VOCLayout.open(root).image_labels(["a"])


def test_malformed_xml(root: Path) -> None:
    (root / "image_labels.json").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text("<annotation><object><name>cat</name>")
    with pytest.raises(DatasetError, match=r"a\.xml is not valid XML"):
        VOCLayout.open(root).image_labels(["a"])


def test_xml_object_without_name(root: Path) -> None:
    (root / "image_labels.json").unlink()
    (root / "Annotations").mkdir()
    (root / "Annotations" / "a.xml").write_text("<annotation><object></object></annotation>")
    with pytest.raises(DatasetError, match=r"a\.xml: object 1 has no <name>"):
        VOCLayout.open(root).image_labels(["a"])


def test_truncated_image_fails_only_when_decoding(root: Path) -> None:
    path = root / "JPEGImages" / "b.jpg"
    Image.fromarray(_image(5, 64, 64)).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    layout = VOCLayout.open(root)
    assert layout.check("train") == 3
    with pytest.raises(DatasetError, match=r"b\.jpg"):
        layout.check("train", decode=True)


def test_unreadable_image(root: Path) -> None:
    (root / "JPEGImages" / "a.png").write_bytes(b"not an image at all")
    with pytest.raises(DatasetError, match=r"cannot read image .*a\.png"):
        VOCLayout.open(root).check("train", decode=True)


def test_mask_value_beyond_class_count(root: Path) -> None:
    save_label_png(root / "SegmentationClass" / "c.png", np.full((5, 7), 4, np.uint8))
    layout = VOCLayout.open(root)
    assert layout.check("train", masks=True) == 3  # values are only read when decoding
    with pytest.raises(DatasetError, match=r"c\.png has value\(s\) 4 but the dataset has 4"):
        layout.check("train", masks=True, decode=True)


def test_mask_size_differs_from_image(root: Path) -> None:
    save_label_png(root / "SegmentationClass" / "c.png", np.zeros((7, 5), np.uint8))
    layout = VOCLayout.open(root)
    assert layout.check("train", decode=True) == 3  # masks not asked for
    with pytest.raises(DatasetError, match=r"c\.png is 5x7 but its image .*c\.png is 7x5"):
        layout.check("train", masks=True, decode=True)


@pytest.mark.parametrize(
    ("lines", "match"),
    [
        (["cat", "dog"], "first class must be 'background', found 'cat'"),
        (["Background", "dog"], "first class must be 'background'"),
        (["background", "cat", "dog", "cat"], "duplicate class name 'cat'"),
        (["background"], "at least one foreground class"),
        ([], "first class must be 'background', found nothing"),
    ],
)
def test_bad_classes_txt(root: Path, lines: list[str], match: str) -> None:
    (root / "classes.txt").write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=match) as info:
        VOCLayout.open(root)
    assert "classes.txt" in str(info.value)


def test_too_many_classes(root: Path) -> None:
    names = ["background"] + [f"c{i}" for i in range(255)]
    (root / "classes.txt").write_text("\n".join(names))
    with pytest.raises(DatasetError, match="do not fit uint8"):
        VOCLayout.open(root)
