"""`cpal data prepare coco` on a generated miniature COCO 2014 (real instances JSON)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from cpal.cli import main
from cpal.data.images import load_mask
from cpal.data.prepare.coco2014 import prepare_coco, render_semantic_mask
from cpal.data.prepare.manifest import MANIFEST_FILE, verify
from cpal.data.voc import VOCLayout
from cpal.errors import DatasetError
from cpal.io import save_label_png
from tests.data.prepare_fixtures import (
    COCO_CLASSES,
    COCO_SIZES,
    TRAIN_A,
    TRAIN_B,
    VAL_A,
    VAL_EMPTY,
    coco_masks,
    make_coco,
    uncompressed_rle,
)

pytest.importorskip("pycocotools")


@pytest.fixture
def coco(tmp_path: Path) -> Path:
    return make_coco(tmp_path / "COCO2014")


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def _instances(root: Path, split: str) -> tuple[Path, dict]:
    path = root / "annotations" / f"instances_{split}2014.json"
    return path, json.loads(path.read_text())


def test_prepare_renders_a_voc_layout_root(coco: Path) -> None:
    manifest = prepare_coco(coco)
    assert _lines(coco / "classes.txt") == COCO_CLASSES
    lists = coco / "ImageSets" / "Segmentation"
    assert _lines(lists / "train.txt") == [TRAIN_A, TRAIN_B]
    assert _lines(lists / "val.txt") == [VAL_A]
    assert _lines(lists / "val_noann.txt") == [VAL_EMPTY]
    assert not (lists / "train_noann.txt").exists()  # every train image has annotations
    for stem, expected in coco_masks().items():
        np.testing.assert_array_equal(
            load_mask(coco / "SegmentationClass" / f"{stem}.png", 5), expected, err_msg=stem
        )
    assert not (coco / "SegmentationClass" / f"{VAL_EMPTY}.png").exists()
    # Crowd-only classes are labels too (the car crowd of TRAIN_B); empty images have none.
    assert json.loads((coco / "image_labels.json").read_text()) == {
        TRAIN_A: ["person", "car", "dog"],
        TRAIN_B: ["car", "toothbrush"],
        VAL_A: ["car"],
        VAL_EMPTY: [],
    }
    link = coco / "JPEGImages" / f"{TRAIN_A}.jpg"
    assert link.is_symlink() and os.readlink(link) == os.path.join("..", "train2014", link.name)
    assert link.read_bytes() == (coco / "train2014" / link.name).read_bytes()

    layout = VOCLayout.open(coco)
    assert layout.class_names == tuple(COCO_CLASSES)
    assert layout.check("train", masks=True, decode=True) == 2
    assert layout.check("val", masks=True, decode=True) == 1
    assert layout.check("val_noann") == 1
    assert layout.image_labels([VAL_EMPTY]).sum() == 0

    assert manifest["details"]["categories"] == {"1": 1, "3": 2, "18": 3, "90": 4}
    assert manifest["details"]["images_with_crowd_only_label"] == 2  # car in TRAIN_A, TRAIN_B
    assert manifest["details"]["dropped_polygon_parts"] == 1
    assert manifest["details"]["masks_rendered_now"] == 3
    assert {s: (e["count"], e["masks"]) for s, e in manifest["splits"].items()} == {
        "train": (2, True), "val": (1, True), "val_noann": (1, False)
    }
    assert set(manifest["sources"]) == {
        "annotations/instances_train2014.json", "annotations/instances_val2014.json"
    }
    warnings = "\n".join(manifest["warnings"])
    assert "4 categories; COCO has 80" in warnings
    assert "instances_train2014.json lists 2 images; the standard COCO 2014 has 82,783" in warnings
    assert "train has 2 ids; the standard COCO 2014 has 82,081" in warnings
    assert verify(coco)[0] == []


def test_overlap_rule_smaller_instance_wins_and_instances_beat_crowd() -> None:
    big = [0, 0, 6, 0, 6, 4, 0, 4]  # rows 0..3, cols 0..5
    small = [2, 1, 4, 1, 4, 3, 2, 3]  # rows 1..2, cols 2..3
    crowd = np.zeros((5, 6), np.uint8)
    crowd[3:, :] = 1
    annotations = [(2, False, [small], 1), (1, False, [big], 2),
                   (3, True, uncompressed_rle(crowd), 3)]
    expected = np.zeros((5, 6), np.uint8)
    expected[3:, :] = 255
    expected[0:4, 0:6] = 1
    expected[1:3, 2:4] = 2
    for order in (annotations, annotations[::-1]):
        np.testing.assert_array_equal(render_semantic_mask(5, 6, order, "x.json"), expected)


def test_bad_segmentations_name_the_annotation(coco: Path) -> None:
    path, data = _instances(coco, "val")
    data["annotations"][0]["segmentation"] = {"size": [3, 3], "counts": [9]}
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_val2014.json annotation 201: RLE size "
                                           r"\[3, 3\] is not the image's .* \[7, 7\]"):
        prepare_coco(coco)
    data["annotations"][0]["segmentation"] = {"size": [7, 7], "counts": [40]}
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 201: RLE run lengths do not cover"):
        prepare_coco(coco)
    data["annotations"][0]["segmentation"] = {"size": [7, 7], "counts": "0~~~~~~"}
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 201: .*RLE"):
        prepare_coco(coco)
    data["annotations"][0]["segmentation"] = [[1, 1, 5, "x", 5, 4]]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 201: polygon parts must be lists of num"):
        prepare_coco(coco)
    data["annotations"][0]["category_id"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 201 has unknown category_id 2"):
        prepare_coco(coco)
    # Nothing was written while the annotations were bad, so the fixed file prepares.
    assert not (coco / MANIFEST_FILE).exists()
    path.write_text(json.dumps(_instances(make_coco(coco.parent / "fresh"), "val")[1]))
    assert prepare_coco(coco)["details"]["masks_rendered_now"] == 3


def test_missing_image_and_missing_files_are_errors(tmp_path: Path, coco: Path) -> None:
    (coco / "val2014" / f"{VAL_EMPTY}.jpg").unlink()
    with pytest.raises(DatasetError, match=f"1 images of instances_val2014.json are missing "
                                           f"from .*val2014: {VAL_EMPTY}.jpg"):
        prepare_coco(coco)
    (tmp_path / "other" / "train2014").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"not a COCO 2014 root: missing val2014/, "
                                           r"annotations/instances_train2014.json"):
        prepare_coco(tmp_path / "other")


def test_different_categories_in_train_and_val_are_an_error(coco: Path) -> None:
    path, data = _instances(coco, "val")
    data["categories"] = data["categories"][:-1]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"list different categories"):
        prepare_coco(coco)


def test_resume_renders_only_missing_masks(coco: Path) -> None:
    prepare_coco(coco)
    masks = coco / "SegmentationClass"
    (masks / f"{TRAIN_B}.png").unlink()
    marker = np.full(COCO_SIZES[TRAIN_A], 2, np.uint8)
    save_label_png(masks / f"{TRAIN_A}.png", marker)
    (coco / "JPEGImages" / f"{VAL_A}.jpg").unlink()
    manifest = prepare_coco(coco)
    assert manifest["details"]["masks_rendered_now"] == 1
    assert manifest["details"]["links_made_now"] == 1
    np.testing.assert_array_equal(load_mask(masks / f"{TRAIN_B}.png", 5), coco_masks()[TRAIN_B])
    np.testing.assert_array_equal(load_mask(masks / f"{TRAIN_A}.png", 5), marker)


def test_changed_annotations_refuse_to_resume(coco: Path) -> None:
    prepare_coco(coco)
    path, data = _instances(coco, "train")
    data["annotations"] = data["annotations"][1:]
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"instances_train2014.json changed since .*"
                                           r"cpal_manifest.json was written"):
        prepare_coco(coco)


@pytest.mark.slow
def test_workers_and_hard_links_give_the_same_root(tmp_path: Path, coco: Path) -> None:
    prepare_coco(coco)
    other = make_coco(tmp_path / "other")
    prepare_coco(other, workers=2, link="hardlink")
    for stem in coco_masks():
        name = f"SegmentationClass/{stem}.png"
        assert (other / name).read_bytes() == (coco / name).read_bytes()
    image = other / "JPEGImages" / f"{VAL_A}.jpg"
    assert not image.is_symlink() and image.samefile(other / "val2014" / image.name)
    assert verify(other, workers=2)[0] == []


def test_verify_finds_deleted_images_and_bad_masks(coco: Path) -> None:
    prepare_coco(coco)
    (coco / "train2014" / f"{TRAIN_B}.jpg").unlink()  # the link now dangles
    bad = coco_masks()[VAL_A].copy()
    bad[0, 0] = 9
    save_label_png(coco / "SegmentationClass" / f"{VAL_A}.png", bad)
    (coco / "ImageSets" / "Segmentation" / "val_noann.txt").write_text(f"{VAL_A}\n")
    problems, summary = verify(coco)
    text = "\n".join(problems)
    assert len(problems) == 4, text
    assert f"image for id '{TRAIN_B}' not found" in text
    assert f"{VAL_A}.png has value(s) 9 but the dataset has 5 classes" in text
    assert "val_noann.txt: changed since prepare" in text
    assert f"val and val_noann share 1 ids ({VAL_A})" in text
    assert summary[0] == "train: 2 ids (images, labels, masks checked)"


def test_cli_prepare_coco(coco: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--root", str(coco), "--workers", "1", "--no-progress"]
    assert main(["data", "prepare", "coco", *args]) == 0
    out = capsys.readouterr().out
    assert "train: 2 ids (standard 82,081), masks in SegmentationClass" in out
    assert "val_noann: 1 ids (standard 367), no masks" in out
    assert f"manifest: {coco.resolve() / MANIFEST_FILE}" in out
    assert main(["data", "verify", *args]) == 0


def test_image_size_other_than_the_json_is_an_error(coco: Path) -> None:
    path, data = _instances(coco, "val")
    data["images"][0]["height"] = 8  # VAL_A is 7 x 7 on disk; its polygon fits either size
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=rf"{VAL_A}.jpg is 7x7 but instances_val2014.json "
                                           r"gives it 7x8 \(width x height\)"):
        prepare_coco(coco)
    assert not (coco / "SegmentationClass" / f"{VAL_A}.png").exists()


def test_render_tasks_carry_only_their_own_annotations(
    coco: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Workers are sent one image's annotations per mask, never a whole instances file."""
    from cpal.data.prepare import coco2014

    sent: list[tuple] = []

    def capture(fn, items, **kwargs):
        sent.extend(items)
        return [fn(item) for item in items]

    monkeypatch.setattr(coco2014, "parallel_map", capture)
    prepare_coco(coco, workers=2)
    by_image = {Path(task[0]).stem: sorted(a[3] for a in task[4]) for task in sent}
    assert by_image == {TRAIN_A: [101, 102, 103], TRAIN_B: [104, 105, 106], VAL_A: [201]}
    assert [Path(task[1]).parent.name for task in sent] == ["train2014", "train2014", "val2014"]


def test_crowd_only_image_is_annotated_and_counted(coco: Path) -> None:
    # TRAIN_B keeps only its car crowd: it still has an annotation, so it is in train.txt
    # (the 82,081 of the public lists count images with any annotation) with label car.
    path, data = _instances(coco, "train")
    data["annotations"] = [a for a in data["annotations"] if a["id"] not in (104, 106)]
    path.write_text(json.dumps(data))
    manifest = prepare_coco(coco)
    assert _lines(coco / "ImageSets" / "Segmentation" / "train.txt") == [TRAIN_A, TRAIN_B]
    assert json.loads((coco / "image_labels.json").read_text())[TRAIN_B] == ["car"]
    assert manifest["details"]["images_with_only_crowd_annotations"] == 1
    expected = np.zeros(COCO_SIZES[TRAIN_B], np.uint8)
    expected[7, 0:2] = 255
    np.testing.assert_array_equal(load_mask(coco / "SegmentationClass" / f"{TRAIN_B}.png", 5),
                                  expected)


def test_non_ascii_rle_counts_are_refused(coco: Path) -> None:
    path, data = _instances(coco, "train")
    data["annotations"][3]["segmentation"]["counts"] = "\u00e9" + "0" * 5
    path.write_text(json.dumps(data))
    with pytest.raises(DatasetError, match=r"annotation 104: bad compressed RLE \(non-ASCII"):
        prepare_coco(coco)


def test_hand_edited_manifest_is_one_line_error(coco: Path, capsys) -> None:
    prepare_coco(coco)
    manifest = json.loads((coco / MANIFEST_FILE).read_text())
    del manifest["mask_dir"]
    (coco / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert main(["data", "verify", "--root", str(coco), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err == f"cpal: error: {coco.resolve() / MANIFEST_FILE}: 'mask_dir' is missing or " \
                  "not a str\n"


@pytest.mark.slow
def test_sigkill_while_rendering_then_rerun_gives_the_clean_result(tmp_path: Path) -> None:
    """A real kill -9 mid-run: no half-written mask is trusted, the rerun completes the root
    and it equals a root prepared in one go."""
    import signal
    import subprocess
    import sys
    import time

    from tests.data.prepare_fixtures import make_coco_many

    killed = make_coco_many(tmp_path / "killed", 150)
    clean = make_coco_many(tmp_path / "clean", 150)
    command = [sys.executable, "-m", "cpal", "data", "prepare", "coco", "--root", str(killed),
               "--workers", "1", "--no-progress"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    masks = killed / "SegmentationClass"

    def pngs() -> int:  # finished masks; a killed write may also leave a .tmp file
        names = os.listdir(masks) if masks.is_dir() else []
        return sum(name.endswith(".png") for name in names)

    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and pngs() < 20:
        time.sleep(0.005)
    assert process.poll() is None, "prepare finished before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    rendered = pngs()
    assert 20 <= rendered < 153
    assert verify(killed)[0] == [f"{killed / MANIFEST_FILE}: preparation did not finish; "
                                 "rerun `cpal data prepare`"]

    manifest = prepare_coco(killed)
    assert manifest["details"]["masks_rendered_now"] == 153 - rendered
    assert verify(killed)[0] == []
    assert not [name for name in os.listdir(masks) if name.endswith(".tmp")]
    prepare_coco(clean)
    for name in sorted(os.listdir(clean / "SegmentationClass")):
        assert (masks / name).read_bytes() == (clean / "SegmentationClass" / name).read_bytes()
    assert len(os.listdir(masks)) == 153
