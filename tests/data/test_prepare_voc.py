"""`cpal data prepare voc` and `cpal data verify` on a generated miniature VOC 2012 + SBD."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.cli import main
from cpal.data.images import load_mask
from cpal.data.prepare.manifest import IMAGE_CHECKSUMS_FILE, MANIFEST_FILE, verify
from cpal.data.prepare.voc2012 import AUG_MASK_DIR, load_sbd_mat, prepare_voc
from cpal.data.voc import VOCLayout
from cpal.errors import DatasetError
from cpal.io import save_label_png
from tests.data.prepare_fixtures import (
    EXPECTED_LABELS,
    EXTRA,
    SBD_ONLY,
    TRAIN_AUG,
    VOC_TRAIN,
    VOC_VAL,
    make_sbd,
    make_voc,
    sbd_mask,
    voc_mask,
    write_sbd_mat,
)

pytest.importorskip("scipy")


@pytest.fixture
def voc(tmp_path: Path) -> Path:
    return make_voc(tmp_path / "VOC2012")


@pytest.fixture
def sbd(tmp_path: Path) -> Path:
    return make_sbd(tmp_path / "benchmark_RELEASE" / "dataset")


def _snapshot(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*")) if p.is_file()
    }


def _lines(path: Path) -> list[str]:
    return path.read_text().splitlines()


def test_prepare_with_sbd_builds_train_aug_masks_labels_and_manifest(voc: Path, sbd: Path) -> None:
    before = _snapshot(voc)
    manifest = prepare_voc(voc, sbd=sbd)
    lists = voc / "ImageSets" / "Segmentation"
    assert _lines(lists / "train_aug.txt") == TRAIN_AUG
    assert not set(TRAIN_AUG) & set(VOC_VAL)  # SBD's copies of val ids were removed
    # The user's files are untouched; everything else is new.
    after = _snapshot(voc)
    assert {name: after[name] for name in before} == before
    added = set(after) - set(before)
    masks = {f"{AUG_MASK_DIR}/{i}.png" for i in TRAIN_AUG + VOC_VAL}
    assert added == masks | {
        "ImageSets/Segmentation/train_aug.txt", "image_labels.json", "layout.json", MANIFEST_FILE
    }
    # VOC ids keep VOC's mask (with its 255 band), SBD-only ids get the .mat values.
    for image_id in VOC_TRAIN + VOC_VAL:
        mask = load_mask(voc / AUG_MASK_DIR / f"{image_id}.png", 21)
        np.testing.assert_array_equal(mask, voc_mask(image_id))
        assert (mask == 255).any()
    for image_id in SBD_ONLY:
        with Image.open(voc / AUG_MASK_DIR / f"{image_id}.png") as png:
            assert png.mode == "P"  # palette PNG: viewable in colour
        np.testing.assert_array_equal(
            load_mask(voc / AUG_MASK_DIR / f"{image_id}.png", 21), sbd_mask(image_id)
        )
    assert json.loads((voc / "image_labels.json").read_text()) == EXPECTED_LABELS
    assert json.loads((voc / "layout.json").read_text()) == {"mask_dir": AUG_MASK_DIR}

    layout = VOCLayout.open(voc)
    assert layout.mask_dir == AUG_MASK_DIR
    for split, count in (("train", 3), ("val", 2), ("train_aug", 6)):
        assert layout.check(split, masks=True, decode=True) == count
    labels = layout.image_labels(["2008_000002"])[0]
    assert [layout.class_names[j + 1] for j in np.flatnonzero(labels)] == ["cat", "dog"]

    assert manifest["complete"] and manifest["mask_dir"] == AUG_MASK_DIR
    assert {s: e["count"] for s, e in manifest["splits"].items()} == {
        "train": 3, "val": 2, "train_aug": 6
    }
    assert all(entry["masks"] for entry in manifest["splits"].values())
    assert manifest["splits"]["train_aug"]["standard"] == 10582
    assert sorted(manifest["disjoint"]) == [["train", "val"], ["train_aug", "val"]]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((voc / name).read_bytes()).hexdigest() == digest
    assert set(manifest["files"]) == {
        "ImageSets/Segmentation/train.txt", "ImageSets/Segmentation/val.txt",
        "ImageSets/Segmentation/train_aug.txt", "image_labels.json", "layout.json",
    }
    assert manifest["details"]["mask_sources"] == {
        "SegmentationClass": 5, "SBD cls": 3, "written_now": 8, "kept": 0
    }
    # Counts of a miniature copy are reported, not refused.
    warnings = "\n".join(manifest["warnings"])
    assert "train has 3 ids; the standard VOC 2012 has 1,464" in warnings
    assert "SBD train.txt has 3 ids" in warnings
    assert json.loads((voc / MANIFEST_FILE).read_text()) == manifest
    assert verify(voc) == ([], [
        "train: 3 ids (images, labels, masks checked)",
        "val: 2 ids (images, labels, masks checked)",
        "train_aug: 6 ids (images, labels, masks checked)",
    ])


def test_prepare_without_sbd_keeps_segmentation_class(voc: Path) -> None:
    manifest = prepare_voc(voc)
    assert not (voc / "layout.json").exists()
    assert not (voc / AUG_MASK_DIR).exists()
    assert set(manifest["splits"]) == {"train", "val"}
    assert manifest["mask_dir"] == "SegmentationClass"
    layout = VOCLayout.open(voc)
    assert layout.check("val", masks=True, decode=True) == 2
    # image_labels.json covers every annotation, listed or not.
    assert layout.image_labels([EXTRA]).sum() == 1
    assert verify(voc)[0] == []


def test_existing_train_aug_overlapping_val_is_an_error(voc: Path, sbd: Path) -> None:
    path = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    path.write_text("\n".join([*TRAIN_AUG, VOC_VAL[1]]) + "\n")
    for source in (sbd, None):
        with pytest.raises(DatasetError, match=r"train_aug.txt lists 1 ids of val \(2008_000008\)"):
            prepare_voc(voc, sbd=source)
    assert not (voc / MANIFEST_FILE).exists()  # nothing written before the checks pass


def test_train_and_val_overlap_is_an_error(voc: Path, sbd: Path) -> None:
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text(
        "\n".join([*VOC_TRAIN, VOC_VAL[0]]) + "\n"
    )
    with pytest.raises(DatasetError, match=r"share 1 ids .2007_000033.; they must be disjoint"):
        prepare_voc(voc, sbd=sbd)


def test_existing_train_aug_is_kept_when_it_has_the_same_ids(voc: Path, sbd: Path) -> None:
    path = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    path.write_text("\n".join(reversed(TRAIN_AUG)) + "\n")  # e.g. a downloaded list
    prepare_voc(voc, sbd=sbd)
    assert _lines(path) == list(reversed(TRAIN_AUG))
    path.write_text("\n".join(TRAIN_AUG[:-1]) + "\n")
    with pytest.raises(DatasetError, match=r"train_aug.txt already exists and differs .*1 ids "
                                           r"missing, e.g. 2010_000003; 0 extra"):
        prepare_voc(voc, sbd=sbd)


def test_user_file_with_other_content_is_never_overwritten(voc: Path) -> None:
    (voc / "image_labels.json").write_text('{"2007_000032": ["aeroplane"]}\n')
    with pytest.raises(DatasetError, match=r"image_labels.json already exists with different"):
        prepare_voc(voc)
    assert (voc / "image_labels.json").read_text() == '{"2007_000032": ["aeroplane"]}\n'


def test_sbd_mat_round_trip_and_bad_files(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [20, 15, 0]], np.uint8)
    write_sbd_mat(tmp_path / "a.mat", values)
    read = load_sbd_mat(tmp_path / "a.mat")
    np.testing.assert_array_equal(read, values)
    from scipy.io import savemat

    savemat(tmp_path / "b.mat", {"GTinst": {"Segmentation": values}})
    with pytest.raises(DatasetError, match=r"b.mat: expected a struct GTcls .* found GTinst"):
        load_sbd_mat(tmp_path / "b.mat")
    (tmp_path / "c.mat").write_bytes(b"not a mat file")
    with pytest.raises(DatasetError, match=r"cannot read .*c.mat"):
        load_sbd_mat(tmp_path / "c.mat")
    # Damaged compressed data (a bad download) fails inside zlib: still one line naming it.
    raw = bytearray((tmp_path / "a.mat").read_bytes())
    raw[200:240] = b"\xff" * 40
    (tmp_path / "d.mat").write_bytes(bytes(raw))
    with pytest.raises(DatasetError, match=r"cannot read .*d.mat: "):
        load_sbd_mat(tmp_path / "d.mat")
    (tmp_path / "e.mat").write_bytes(bytes(raw[:150]))  # truncated
    with pytest.raises(DatasetError, match=r"cannot read .*e.mat: "):
        load_sbd_mat(tmp_path / "e.mat")


def test_sbd_mat_in_double_and_v73_files(tmp_path: Path) -> None:
    values = np.array([[0, 1, 2], [20, 15, 0]], np.uint8)
    # A copy re-saved by MATLAB code that worked in double: whole numbers are accepted.
    write_sbd_mat(tmp_path / "double.mat", values, dtype=np.float64)
    read = load_sbd_mat(tmp_path / "double.mat")
    assert np.issubdtype(read.dtype, np.integer)
    np.testing.assert_array_equal(read, values)
    write_sbd_mat(tmp_path / "half.mat", values + 0.5, dtype=np.float64)
    with pytest.raises(DatasetError, match=r"half.mat: GTcls.Segmentation holds non-integer"):
        load_sbd_mat(tmp_path / "half.mat")
    # MATLAB v7.3 is HDF5: a 128-byte header with version 0x0200, which scipy does not read.
    header = b"MATLAB 7.3 MAT-file, Platform: GLNXA64, HDF5 schema 1.00 .".ljust(116)
    (tmp_path / "v73.mat").write_bytes(header + bytes(8) + b"\x00\x02IM" + bytes(512))
    with pytest.raises(DatasetError, match=r"v73.mat is a MATLAB v7.3 \(HDF5\) file"):
        load_sbd_mat(tmp_path / "v73.mat")


def test_sbd_value_out_of_range_names_the_mat(voc: Path, sbd: Path) -> None:
    bad = sbd_mask("2009_000002")
    bad[0, 0] = 21
    write_sbd_mat(sbd / "cls" / "2009_000002.mat", bad)
    # workers=2: the error raised in a worker process reaches the caller intact.
    with pytest.raises(DatasetError, match=r"2009_000002.mat has class value\(s\) 21"):
        prepare_voc(voc, sbd=sbd, workers=2)


def test_sbd_mask_of_wrong_size_names_both_files(voc: Path, sbd: Path) -> None:
    write_sbd_mat(sbd / "cls" / "2009_000001.mat", np.zeros((4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"2009_000001.mat is 4x4 but its image .* is 8x6"):
        prepare_voc(voc, sbd=sbd)


def test_missing_sbd_mask_and_missing_image_are_errors(voc: Path, sbd: Path) -> None:
    (sbd / "cls" / "2010_000003.mat").unlink()
    with pytest.raises(DatasetError, match=r"no mask for 1 ids of train_aug/val .*: 2010_000003"):
        prepare_voc(voc, sbd=sbd)
    (voc / "JPEGImages" / "2009_000001.jpg").unlink()
    with pytest.raises(DatasetError, match=r"1 listed ids have no image in .*: 2009_000001"):
        prepare_voc(voc, sbd=sbd)


def test_not_a_voc_root_names_what_is_missing(tmp_path: Path) -> None:
    (tmp_path / "VOC2012" / "JPEGImages").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"not a VOC 2012 root: missing SegmentationClass/, "
                                           r"Annotations/, ImageSets/Segmentation/train.txt"):
        prepare_voc(tmp_path / "VOC2012")
    with pytest.raises(DatasetError, match=r"SBD folder not found"):
        prepare_voc(make_voc(tmp_path / "v"), sbd=tmp_path / "nothing")


def test_outer_archive_folders_get_a_hint(tmp_path: Path) -> None:
    """VOCdevkit for VOCdevkit/VOC2012 and benchmark_RELEASE for benchmark_RELEASE/dataset
    are the usual slips: the error names the folder meant."""
    voc = make_voc(tmp_path / "VOCdevkit" / "VOC2012")
    meant = rf"\(did you mean {re.escape(str(voc))}\?\)$"
    with pytest.raises(DatasetError, match=rf"not a VOC 2012 root: missing .*{meant}"):
        prepare_voc(tmp_path / "VOCdevkit")
    with pytest.raises(DatasetError, match=rf"not a VOC 2012 root: missing .*{meant}"):
        prepare_voc(tmp_path)  # the folder that holds VOCdevkit/
    sbd = make_sbd(tmp_path / "benchmark_RELEASE" / "dataset")
    meant = rf"\(did you mean {re.escape(str(sbd))}\?\)$"
    with pytest.raises(DatasetError, match=rf"not SBD's .*{meant}"):
        prepare_voc(voc, sbd=tmp_path / "benchmark_RELEASE")


def test_resume_skips_masks_already_written(voc: Path, sbd: Path) -> None:
    prepare_voc(voc, sbd=sbd)
    aug = voc / AUG_MASK_DIR
    (aug / "2009_000002.png").unlink()
    # A mask already there is trusted (atomic writes): changing it shows it is not redone.
    marker = np.full(voc_mask("2007_000032").shape, 7, np.uint8)
    save_label_png(aug / "2007_000032.png", marker)
    (aug / ".2009_000001.png.abc.tmp").write_bytes(b"left by a killed run")
    manifest = prepare_voc(voc, sbd=sbd)
    assert manifest["details"]["mask_sources"]["written_now"] == 1
    assert manifest["details"]["mask_sources"]["kept"] == 7
    np.testing.assert_array_equal(load_mask(aug / "2009_000002.png", 21), sbd_mask("2009_000002"))
    np.testing.assert_array_equal(load_mask(aug / "2007_000032.png", 21), marker)
    assert not (aug / ".2009_000001.png.abc.tmp").exists()


def test_verify_names_every_problem(voc: Path, sbd: Path) -> None:
    prepare_voc(voc, sbd=sbd)
    (voc / "JPEGImages" / "2009_000002.jpg").unlink()
    (voc / AUG_MASK_DIR / "2007_000039.png").unlink()
    bad = voc_mask("2008_000008")
    bad[0, 0] = 30
    save_label_png(voc / AUG_MASK_DIR / "2008_000008.png", bad)
    train_aug = voc / "ImageSets" / "Segmentation" / "train_aug.txt"
    train_aug.write_text(train_aug.read_text() + "2007_000033\n")  # a val id
    problems, _ = verify(voc)
    text = "\n".join(problems)
    assert len(problems) == 6, text
    assert "train_aug.txt: changed since prepare (SHA-256 differs" in text
    assert "train_aug.txt: 7 ids, the manifest recorded 6" in text
    assert "image for id '2009_000002' not found" in text
    assert "mask for image id '2007_000039' not found" in text
    assert "2008_000008.png has value(s) 30" in text
    assert "train_aug and val share 1 ids (2007_000033); they must be disjoint" in text


def test_verify_mask_size_and_labels(voc: Path) -> None:
    prepare_voc(voc)
    save_label_png(voc / "SegmentationClass" / "2007_000033.png", np.zeros((2, 2), np.uint8))
    labels = json.loads((voc / "image_labels.json").read_text())
    labels["2007_000039"] = ["tv"]
    (voc / "image_labels.json").write_text(json.dumps(labels))
    problems, _ = verify(voc)
    text = "\n".join(problems)
    assert len(problems) == 3, text
    assert "image_labels.json: changed since prepare" in text
    assert "image id '2007_000039' has unknown class 'tv'" in text
    assert "2007_000033.png is 2x2 but its image" in text


def test_image_checksums_detect_a_changed_image(voc: Path, sbd: Path) -> None:
    manifest = prepare_voc(voc, sbd=sbd, checksum_images=True)
    assert manifest["image_checksums"] == IMAGE_CHECKSUMS_FILE
    lines = _lines(voc / IMAGE_CHECKSUMS_FILE)
    assert len(lines) == len(set(TRAIN_AUG) | set(VOC_VAL))
    digest, name = lines[0].split("  ")
    assert hashlib.sha256((voc / name).read_bytes()).hexdigest() == digest
    assert verify(voc)[0] == []
    image = voc / "JPEGImages" / "2007_000032.jpg"
    image.write_bytes(image.read_bytes() + b"\0")
    assert verify(voc)[0] == [
        f"JPEGImages/2007_000032.jpg: SHA-256 differs from {IMAGE_CHECKSUMS_FILE} (file changed)"
    ]


def test_interrupted_preparation_is_reported_by_verify(voc: Path, sbd: Path) -> None:
    (sbd / "cls" / "2010_000003.mat").write_bytes(b"corrupt")
    with pytest.raises(DatasetError, match=r"cannot read .*2010_000003.mat"):
        prepare_voc(voc, sbd=sbd)
    problems, _ = verify(voc)
    assert problems == [f"{voc / MANIFEST_FILE}: preparation did not finish; rerun "
                        "`cpal data prepare`"]


def test_cli_prepare_and_verify(voc: Path, sbd: Path, capsys: pytest.CaptureFixture) -> None:
    args = ["--root", str(voc), "--workers", "1", "--no-progress"]
    assert main(["data", "prepare", "voc", *args, "--sbd", str(sbd)]) == 0
    out, err = capsys.readouterr()
    assert "train_aug: 6 ids (standard 10,582), masks in SegmentationClassAug" in out
    assert "cpal: warning: val has 2 ids; the standard VOC 2012 has 1,449" in err
    assert main(["data", "verify", *args]) == 0
    assert "OK, matches cpal_manifest.json" in capsys.readouterr().out
    shutil.rmtree(voc / "JPEGImages")
    assert main(["data", "verify", *args]) == 2
    out, err = capsys.readouterr()
    assert f"problem: image folder not found: {voc / 'JPEGImages'}" in out
    assert "cpal: error: 1 problem(s) found" in err
    assert main(["data", "prepare", "voc", "--root", str(voc), "--workers", "0"]) == 2
    assert "--workers must be >= 1" in capsys.readouterr().err
