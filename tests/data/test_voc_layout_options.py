"""VOCLayout's optional layout.json (mask folder) and the public list/XML readers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.data.voc import VOCLayout, read_id_list, read_xml_labels
from cpal.errors import DatasetError
from cpal.io import save_label_png


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "ds"
    (root / "JPEGImages").mkdir(parents=True)
    Image.fromarray(np.zeros((4, 5, 3), np.uint8)).save(root / "JPEGImages" / "a.png")
    save_label_png(root / "SegmentationClass" / "a.png", np.ones((4, 5), np.uint8))
    save_label_png(root / "SegmentationClassAug" / "a.png", np.full((4, 5), 2, np.uint8))
    (root / "ImageSets" / "Segmentation").mkdir(parents=True)
    (root / "ImageSets" / "Segmentation" / "train.txt").write_text("a\n")
    (root / "image_labels.json").write_text('{"a": ["bicycle"]}')
    return root


def test_layout_json_selects_the_mask_folder(tmp_path: Path) -> None:
    root = _root(tmp_path)
    assert VOCLayout.open(root).mask_dir == "SegmentationClass"
    assert VOCLayout.open(root).load_mask("a")[0, 0] == 1
    (root / "layout.json").write_text(json.dumps({"mask_dir": "SegmentationClassAug"}))
    layout = VOCLayout.open(root)
    assert layout.mask_path("a") == root / "SegmentationClassAug" / "a.png"
    assert layout.load_mask("a")[0, 0] == 2
    assert layout.count_masks(["a"]) == 1
    assert layout.check("train", masks=True, decode=True) == 1
    (root / "SegmentationClassAug" / "a.png").unlink()
    with pytest.raises(DatasetError, match=r"mask for image id 'a' not found: .*ClassAug"):
        layout.check("train", masks=True)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('{"mask_dir": "../elsewhere"}', r"layout.json: mask_dir '../elsewhere' is a path"),
        ('{"mask_dir": "M", "image_dir": "I"}', r"unknown key 'image_dir'; valid keys: mask_dir"),
        ('["SegmentationClassAug"]', r"layout.json must hold an object"),
        ('{"mask_dir": ', r"layout.json is not valid JSON"),
    ],
)
def test_bad_layout_json_is_one_line_naming_it(tmp_path: Path, text: str, message: str) -> None:
    root = _root(tmp_path)
    (root / "layout.json").write_text(text)
    with pytest.raises(DatasetError, match=message):
        VOCLayout.open(root)


def test_public_readers(tmp_path: Path) -> None:
    path = tmp_path / "list.txt"
    path.write_text("b\na\n\n")
    assert read_id_list(path) == ["b", "a"]
    path.write_text("b\nb\n")
    with pytest.raises(DatasetError, match=r"line 2: duplicate image id 'b'"):
        read_id_list(path)
    with pytest.raises(DatasetError, match=r"id list not found"):
        read_id_list(tmp_path / "none.txt")
    xml = tmp_path / "x.xml"
    xml.write_text("<annotation><object><name>dog</name><difficult>1</difficult>"
                   "<part><name>head</name></part></object></annotation>")
    assert read_xml_labels(xml) == ["dog"]
