"""Tests of the built-in synthetic dataset: determinism, layout, faithful masks, caching."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cpal.data import synthetic
from cpal.data.synthetic import (
    CLASS_NAMES,
    GENERATOR_VERSION,
    ensure_dataset,
    generate,
    render_sample,
    rendering,
    store,
)
from cpal.errors import ConfigError, DatasetError
from cpal.io import IGNORE_INDEX

SPEC = {"seed": 3, "num_train": 24, "num_val": 8, "image_size": 64}


def _ids(root: Path, split: str) -> list[str]:
    return (root / "ImageSets" / "Segmentation" / f"{split}.txt").read_text().split()


def _image(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "JPEGImages" / f"{image_id}.png") as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def _mask(root: Path, image_id: str) -> np.ndarray:
    with Image.open(root / "SegmentationClass" / f"{image_id}.png") as mask:
        assert mask.mode == "P"
        return np.asarray(mask)


def _all_ids(root: Path) -> list[str]:
    return _ids(root, "train") + _ids(root, "val")


def _neighbours(a: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
    """Pairs of 4-adjacent pixel values (horizontal and vertical)."""
    return [(a[:, :-1], a[:, 1:]), (a[:-1, :], a[1:, :])]


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synthetic") / "small"
    generate(root, **SPEC)
    return root


@pytest.fixture(scope="module")
def large(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Enough images for frequency statistics, at a small size to stay fast."""
    root = tmp_path_factory.mktemp("synthetic") / "large"
    generate(root, seed=0, num_train=300, num_val=20, image_size=48)
    return root


def test_class_names() -> None:
    assert CLASS_NAMES[0] == "background"
    assert 8 <= len(CLASS_NAMES) - 1 <= 12
    assert len(set(CLASS_NAMES)) == len(CLASS_NAMES)
    for name in CLASS_NAMES:
        assert name == name.lower() and name.isalpha() and len(name) <= 10


def test_layout_and_counts(small: Path) -> None:
    train, val = _ids(small, "train"), _ids(small, "val")
    assert train == [f"train_{i:05d}" for i in range(1, 25)]
    assert val == [f"val_{i:05d}" for i in range(1, 9)]
    assert (small / "classes.txt").read_text().splitlines() == list(CLASS_NAMES)
    for image_id in train + val:
        assert _image(small, image_id).shape == (64, 64, 3)
        assert _mask(small, image_id).shape == (64, 64)
    assert len(list((small / "JPEGImages").iterdir())) == 32
    assert len(list((small / "SegmentationClass").iterdir())) == 32
    labels = json.loads((small / "image_labels.json").read_text())
    assert set(labels) == set(train + val)
    manifest = json.loads((small / "manifest.json").read_text())
    assert manifest["generator_version"] == GENERATOR_VERSION
    assert manifest["seed"] == 3 and manifest["image_size"] == 64
    assert manifest["counts"] == {"train": 24, "val": 8}
    assert manifest["class_names"] == list(CLASS_NAMES)
    for name in CLASS_NAMES[1:]:
        images_with = sum(name in names for names in labels.values())
        assert manifest["class_image_counts"][name] == images_with
    objects = json.loads((small / "objects.json").read_text())
    assert set(objects) == set(labels)
    # No temporary files left behind by the atomic writes.
    assert not [p for p in small.rglob("*") if p.name.startswith(".")]


def test_same_seed_is_identical_and_other_seed_differs(small: Path, tmp_path: Path) -> None:
    again = tmp_path / "again"
    generate(again, **SPEC)
    other = tmp_path / "other"
    generate(other, **{**SPEC, "seed": 4})
    for image_id in _all_ids(small):
        np.testing.assert_array_equal(_image(small, image_id), _image(again, image_id))
        np.testing.assert_array_equal(_mask(small, image_id), _mask(again, image_id))
    assert (small / "image_labels.json").read_bytes() == (again / "image_labels.json").read_bytes()
    assert (small / "manifest.json").read_bytes() == (again / "manifest.json").read_bytes()
    differing = sum(not np.array_equal(_image(small, i), _image(other, i)) for i in _all_ids(small))
    assert differing == len(_all_ids(small))


def test_image_depends_only_on_seed_split_and_index(small: Path, tmp_path: Path) -> None:
    fewer = tmp_path / "fewer"
    generate(fewer, **{**SPEC, "num_train": 5, "num_val": 2})
    for image_id in _all_ids(fewer):
        np.testing.assert_array_equal(_image(small, image_id), _image(fewer, image_id))
        np.testing.assert_array_equal(_mask(small, image_id), _mask(fewer, image_id))
    # The same index in the two splits is a different image.
    assert not np.array_equal(_image(small, "train_00001"), _image(small, "val_00001"))


def test_labels_are_exactly_the_classes_in_the_mask(small: Path, large: Path) -> None:
    for root in (small, large):
        labels = json.loads((root / "image_labels.json").read_text())
        for image_id in _all_ids(root):
            mask = _mask(root, image_id)
            values = set(np.unique(mask).tolist())
            assert values <= set(range(len(CLASS_NAMES))) | {IGNORE_INDEX}
            present = [CLASS_NAMES[v] for v in sorted(values - {0, IGNORE_INDEX})]
            assert labels[image_id] == present, image_id
            assert 1 <= len(present) <= 3, image_id
            # A labelled class is clearly visible, not a few stray pixels.
            for v in values - {0, IGNORE_INDEX}:
                assert np.count_nonzero(mask == v) >= synthetic.MIN_VISIBLE_PIXELS


def test_objects_record_matches_labels(large: Path) -> None:
    labels = json.loads((large / "image_labels.json").read_text())
    objects = json.loads((large / "objects.json").read_text())
    occluded = 0
    for image_id, records in objects.items():
        assert 1 <= len(records) <= 3
        listed = {r["class"] for r in records if r["labelled"]}
        assert sorted(listed, key=CLASS_NAMES.index) == labels[image_id]
        assert records[-1]["occluded"] == 0  # the last drawn object is on top
        for r in records:
            assert r["labelled"] == (r["visible_pixels"] >= synthetic.MIN_VISIBLE_PIXELS)
        occluded += sum(r["occluded"] > 0.05 for r in records)
    assert occluded >= 20  # objects do overlap


def test_border_band_separates_objects_from_background(small: Path) -> None:
    for image_id in _all_ids(small):
        mask = _mask(small, image_id)
        border = mask == IGNORE_INDEX
        assert border.any(), image_id
        for a, b in _neighbours(mask):
            # No object pixel touches background or another object directly.
            fg_a, fg_b = (a > 0) & (a != IGNORE_INDEX), (b > 0) & (b != IGNORE_INDEX)
            assert not np.any(fg_a & (b == 0)) and not np.any(fg_b & (a == 0)), image_id
            assert not np.any(fg_a & fg_b & (a != b)), image_id
        # The band is thin: few border pixels have a border-only 3x3 neighbourhood.
        padded = np.pad(border, 1)
        interior = np.ones_like(border)
        for dy in range(3):
            for dx in range(3):
                interior &= padded[dy : dy + 64, dx : dx + 64]
        assert np.count_nonzero(interior) <= 0.1 * np.count_nonzero(border), image_id
        # Border pixels lie along objects (thin tips of a shape may be all border).
        fg = np.pad((mask > 0) & (mask != IGNORE_INDEX), 3)
        near = np.zeros_like(border)
        for dy in range(7):
            for dx in range(7):
                near |= fg[dy : dy + 64, dx : dx + 64]
        assert np.count_nonzero(border & ~near) <= 0.05 * np.count_nonzero(border), image_id


def test_background_is_cluttered(small: Path) -> None:
    """Background pixels vary as much as object bodies: colour alone cannot separate them."""
    for image_id in _all_ids(small):
        image, mask = _image(small, image_id).astype(float), _mask(small, image_id)
        background = image[mask == 0]
        assert background.std(axis=0).mean() > 8, image_id


def test_modes_are_skewed_and_all_classes_appear(large: Path) -> None:
    manifest = json.loads((large / "manifest.json").read_text())
    class_counts = manifest["class_image_counts"]
    assert set(class_counts) == set(CLASS_NAMES[1:])
    assert min(class_counts.values()) > 0
    totals = np.zeros(3)
    for name in CLASS_NAMES[1:]:
        counts = list(manifest["mode_counts"][name].values())
        assert len(counts) == 3
        assert counts[0] > counts[1] > 0 and counts[0] > counts[2] > 0, (name, counts)
        totals += counts
    fractions = totals / totals.sum()
    assert 0.58 < fractions[0] < 0.72, fractions
    assert 0.18 < fractions[1] < 0.32, fractions
    assert 0.05 < fractions[2] < 0.15, fractions
    per_split = manifest["splits"]
    assert sum(per_split["train"]["labels_per_image"].values()) == 300
    assert all(per_split["train"]["labels_per_image"][k] > 0 for k in ("1", "2", "3"))


def test_every_part_lies_inside_its_body_and_the_crop() -> None:
    """Guards edits of the class table: parts must sit on their body, bodies in their crop."""
    size, radius = 256, 70.0
    for cls, spec in enumerate(synthetic.CLASSES):
        assert spec.pattern in synthetic.PATTERNS
        for mode_index, mode in enumerate(spec.modes):
            assert mode.body in synthetic.BODY_FAMILIES
            for angle in (0.0, 0.6, 1.3, 2.5):
                obj = rendering._place(
                    cls, mode_index, 128.0, 128.0, radius, angle, size, with_part=True
                )
                part = rendering._coverage(rendering._part_sdf(mode, obj.u, obj.v) * radius)
                inside = np.count_nonzero((part >= 0.5) & (obj.body >= 0.5))
                assert inside >= 0.97 * np.count_nonzero(part >= 0.5), (spec.name, mode.name)
                area = rendering._part_area(mode, radius)
                # Pixel-grid discretisation of an analytic area (numpy only, no kernel).
                assert math.isclose(np.count_nonzero(part >= 0.5), area, rel_tol=0.05)
                edges = (obj.body[0], obj.body[-1], obj.body[:, 0], obj.body[:, -1])
                assert max(edge.max() for edge in edges) == 0, (spec.name, mode.name)


def test_tiny_images_still_have_labels(tmp_path: Path) -> None:
    root = tmp_path / "tiny"
    generate(root, seed=1, num_train=30, num_val=1, image_size=32)
    labels = json.loads((root / "image_labels.json").read_text())
    assert all(1 <= len(names) <= 3 for names in labels.values())


def test_generate_refuses_non_empty_root_and_bad_specs(tmp_path: Path) -> None:
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(DatasetError, match="not empty"):
        generate(tmp_path, **SPEC)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(ConfigError, match="image_size"):
        generate(tmp_path / "a", **{**SPEC, "image_size": 16})
    with pytest.raises(ConfigError, match="per split"):
        generate(tmp_path / "b", **{**SPEC, "num_val": 0})
    with pytest.raises(ConfigError, match="seed"):
        generate(tmp_path / "c", **{**SPEC, "seed": -1})


def _spec_kwargs() -> dict[str, int]:
    return {"seed": 5, "num_train": 6, "num_val": 2, "image_size": 48}


def test_ensure_dataset_is_idempotent(tmp_path: Path) -> None:
    root = ensure_dataset(tmp_path, **_spec_kwargs())
    assert root == tmp_path / f"synthetic-v{GENERATOR_VERSION}-seed5-6x2-48px"
    manifest, image = root / "manifest.json", root / "JPEGImages" / "train_00001.png"
    before = (manifest.stat().st_mtime_ns, image.stat().st_mtime_ns, image.stat().st_ino)
    os.utime(image, ns=(1, 1))  # a regeneration would rewrite it with a fresh mtime
    assert ensure_dataset(tmp_path, **_spec_kwargs()) == root
    assert manifest.stat().st_mtime_ns == before[0]
    assert image.stat().st_mtime_ns == 1 and image.stat().st_ino == before[2]
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]  # no temporaries


@pytest.mark.parametrize("damage", ["version", "missing", "garbage"])
def test_ensure_dataset_regenerates_stale_folders(tmp_path: Path, damage: str) -> None:
    root = ensure_dataset(tmp_path, **_spec_kwargs())
    reference = _image(root, "val_00002").copy()
    manifest = root / "manifest.json"
    if damage == "version":
        data = json.loads(manifest.read_text())
        data["generator_version"] = GENERATOR_VERSION - 1
        manifest.write_text(json.dumps(data))
    elif damage == "missing":
        manifest.unlink()
    else:
        manifest.write_text("{not json")
    (root / "JPEGImages" / "val_00002.png").unlink()
    (root / "stray.txt").write_text("left over from the stale folder")
    assert ensure_dataset(tmp_path, **_spec_kwargs()) == root
    assert json.loads(manifest.read_text())["generator_version"] == GENERATOR_VERSION
    np.testing.assert_array_equal(_image(root, "val_00002"), reference)
    assert not (root / "stray.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [root.name]


def test_ensure_dataset_adopts_the_winner_of_a_race(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Another process finishes first: its folder is kept and ours is discarded."""
    real_generate = synthetic.generate
    target = tmp_path / synthetic.dataset_name(**_spec_kwargs())

    def racing_generate(root: Path, **kwargs: int) -> None:
        real_generate(root, **kwargs)
        shutil.copytree(root, target)  # the other process renames its copy in first
        (target / "winner.txt").write_text("theirs")

    monkeypatch.setattr(store, "generate", racing_generate)
    assert ensure_dataset(tmp_path, **_spec_kwargs()) == target
    assert (target / "winner.txt").read_text() == "theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


def test_killed_generation_leaves_no_dataset(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_render = synthetic.render_sample

    def failing_render(seed: int, split: str, index: int, image_size: int,
                       family: str = "parts") -> synthetic.Sample:
        if split == "val":
            raise KeyboardInterrupt
        return real_render(seed, split, index, image_size, family)

    monkeypatch.setattr(store, "render_sample", failing_render)
    with pytest.raises(KeyboardInterrupt):
        ensure_dataset(tmp_path, **_spec_kwargs())
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setattr(store, "render_sample", real_render)
    root = ensure_dataset(tmp_path, **_spec_kwargs())
    assert len(_all_ids(root)) == 8


def test_sample_grid(small: Path, tmp_path: Path) -> None:
    out = tmp_path / "grid.png"
    synthetic.sample_grid(small, out, num_images=8, split="val")
    with Image.open(out) as grid:
        width, height = grid.size
        pixels = np.asarray(grid.convert("RGB")).astype(int)
    assert width > 6 * 64 and height > 2 * (2 * 64)  # two rows of image-above-mask cells
    # The first cell holds the first val image (up to palette quantisation), its mask below.
    first = _image(small, "val_00001").astype(int)
    errors = [
        np.abs(pixels[y : y + 64, x : x + 64] - first).mean() for y in range(8) for x in range(8)
    ]
    y, x = divmod(int(np.argmin(errors)), 8)
    assert min(errors) < 6
    with Image.open(small / "SegmentationClass" / "val_00001.png") as mask:
        colour_mask = np.asarray(mask.convert("RGB")).astype(int)
    below = pixels[y + 66 : y + 130, x : x + 64]
    assert np.abs(below - colour_mask).mean() < 6
    with pytest.raises(DatasetError):
        synthetic.sample_grid(small, tmp_path / "x.png", split="missing")


# ----------------------------------------------------------------------------- families


def test_attributes_family_keeps_the_objects_and_changes_their_appearance() -> None:
    for index in range(1, 6):
        parts = synthetic.render_sample(3, "train", index, 64, "parts")
        attrs = synthetic.render_sample(3, "train", index, 64, "attributes")
        assert np.array_equal(parts.mask, attrs.mask) and parts.labels == attrs.labels
        assert not np.array_equal(parts.image, attrs.image)
        assert all(r["appearance"] in (0, 1, 2) for r in attrs.objects)
        assert all("appearance" not in r for r in parts.objects)


def test_attribute_modes_are_the_documented_table() -> None:
    # Rare mode of class c = class (c + 3) mod 10's second mode: a shared attribute.
    for c in range(len(synthetic.CLASSES)):
        assert synthetic.class_appearance(c, 2) == synthetic.class_appearance((c + 3) % 10, 1)
    own = {synthetic.class_appearance(c, m)[0] for c in range(10) for m in (0, 1)}
    assert len(own) == 20  # every class's own modes are distinct colours
    assert synthetic.ATTRIBUTE_PROBS == (0.6, 0.3, 0.1)


def test_families_are_cached_apart(tmp_path: Path) -> None:
    a = ensure_dataset(tmp_path, **_spec_kwargs())
    b = ensure_dataset(tmp_path, **_spec_kwargs(), family="attributes")
    assert a != b and "attributes" in b.name
    manifest = json.loads((b / "manifest.json").read_text())
    assert manifest["family"] == "attributes" and "appearances" in manifest
    assert ensure_dataset(tmp_path, **_spec_kwargs(), family="attributes") == b
    with pytest.raises(ConfigError, match="unknown family"):
        synthetic.render_sample(0, "train", 1, 48, "stripes")


def test_part_mask_marks_only_labelled_object_pixels() -> None:
    """The diagnostics' part mask: inside labelled objects (never background, border or an
    unlabelled object), present in every image, a small share of the object pixels."""
    part_pixels = object_pixels = 0
    for index in range(1, 21):
        sample = render_sample(0, "train", index, 128, "parts")
        assert sample.parts.shape == sample.mask.shape and sample.parts.dtype == bool
        inside = sample.mask[sample.parts]
        assert ((inside > 0) & (inside != 255)).all()
        assert sample.parts.any()
        part_pixels += int(sample.parts.sum())
        object_pixels += int(((sample.mask > 0) & (sample.mask != 255)).sum())
    assert 0.02 < part_pixels / object_pixels < 0.4


def test_part_mask_is_the_same_for_both_families() -> None:
    """The families share their objects and differ in appearance only: so do their parts."""
    a, b = render_sample(3, "val", 7, 96, "parts"), render_sample(3, "val", 7, 96, "attributes")
    assert np.array_equal(a.parts, b.parts) and np.array_equal(a.mask, b.mask)
    assert not np.array_equal(a.image, b.image)
