"""Image and mask decoding: every Pillow mode lands as RGB uint8, bad files as DatasetError."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from cpal.data.images import image_size, load_mask, load_rgb
from cpal.errors import DatasetError
from cpal.io import save_label_png, voc_palette

ORIENTATION = 0x0112


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif


def _marked_rgb(height: int = 2, width: int = 4) -> np.ndarray:
    """Distinct colour per pixel so rotations are detectable exactly."""
    rgb = np.zeros((height, width, 3), dtype=np.uint8)
    rgb[..., 0] = np.arange(height * width, dtype=np.uint8).reshape(height, width) * 10
    rgb[..., 1] = 100
    rgb[0, 0] = (255, 0, 0)
    return rgb


# ---------------------------------------------------------------------------- modes


def test_rgb_png_round_trip(tmp_path: Path) -> None:
    rgb = _marked_rgb()
    path = tmp_path / "a.png"
    Image.fromarray(rgb).save(path)
    out = load_rgb(path)
    assert out.dtype == np.uint8 and out.shape == (2, 4, 3)
    np.testing.assert_array_equal(out, rgb)
    assert out.flags.writeable


def test_grey_l_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "grey.png"
    Image.fromarray(np.array([[0, 77], [200, 255]], dtype=np.uint8), mode="L").save(path)
    out = load_rgb(path)
    assert out.shape == (2, 2, 3) and out.dtype == np.uint8
    assert out[0, 1].tolist() == [77, 77, 77]
    assert out[1, 0].tolist() == [200, 200, 200]


def test_bilevel_loads_as_black_and_white(tmp_path: Path) -> None:
    path = tmp_path / "bits.png"
    Image.fromarray(np.array([[False, True]])).convert("1").save(path)
    with Image.open(path) as check:
        assert check.mode == "1"
    out = load_rgb(path)
    assert out.shape == (1, 2, 3)
    assert out[0, 0].tolist() == [0, 0, 0]
    assert out[0, 1].tolist() == [255, 255, 255]


def test_sixteen_bit_grey_scales_to_eight_bits(tmp_path: Path) -> None:
    path = tmp_path / "deep.png"
    values = np.array([[0, 65535, 257 * 100]], dtype=np.uint16)
    Image.fromarray(values).save(path)
    with Image.open(path) as check:
        assert check.mode.startswith("I")
    out = load_rgb(path)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 255, 100]
    assert (out[..., 0] == out[..., 2]).all()


def test_rgba_is_composited_onto_black(tmp_path: Path) -> None:
    path = tmp_path / "alpha.png"
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(path)
    out = load_rgb(path)
    assert out.shape == (1, 3, 3)
    assert out[0, 0].tolist() == [200, 100, 50]
    assert out[0, 1].tolist() == [0, 0, 0]
    assert out[0, 2].tolist() == [100, 50, 25]  # round(v * 128 / 255)


def test_grey_alpha_is_composited_onto_black(tmp_path: Path) -> None:
    path = tmp_path / "la.png"
    la = np.array([[[180, 255], [180, 0]]], dtype=np.uint8)
    Image.fromarray(la, mode="LA").save(path)
    out = load_rgb(path)
    assert out[0, 0].tolist() == [180, 180, 180]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_palette_image_uses_its_colours(tmp_path: Path) -> None:
    path = tmp_path / "pal.png"
    image = Image.fromarray(np.array([[0, 1, 2]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * (256 * 3 - 9))
    image.save(path)
    out = load_rgb(path)
    assert out.shape == (1, 3, 3)
    assert out[0].tolist() == [[10, 20, 30], [40, 50, 60], [70, 80, 90]]


def test_palette_transparency_is_composited_onto_black(tmp_path: Path) -> None:
    path = tmp_path / "pal_t.png"
    image = Image.fromarray(np.array([[0, 1]], dtype=np.uint8), mode="P")
    image.putpalette([10, 20, 30, 40, 50, 60] + [0] * (256 * 3 - 6))
    image.save(path, transparency=1)
    with Image.open(path) as check:
        assert "transparency" in check.info
    out = load_rgb(path)
    assert out[0, 0].tolist() == [10, 20, 30]
    assert out[0, 1].tolist() == [0, 0, 0]


def test_cmyk_loads_as_rgb(tmp_path: Path) -> None:
    path = tmp_path / "cmyk.tif"
    cmyk = np.array([[[0, 0, 0, 0], [255, 0, 0, 0], [0, 0, 0, 255]]], dtype=np.uint8)
    Image.fromarray(cmyk, mode="CMYK").save(path)
    out = load_rgb(path)
    assert out.shape == (1, 3, 3) and out.dtype == np.uint8
    assert out[0].tolist() == [[255, 255, 255], [0, 255, 255], [0, 0, 0]]


def test_jpeg_loads_approximately(tmp_path: Path) -> None:
    path = tmp_path / "photo.jpg"
    Image.new("RGB", (16, 8), (120, 60, 30)).save(path, quality=95)
    out = load_rgb(path)
    assert out.shape == (8, 16, 3)
    # JPEG quality 95 quantisation of a flat colour: a property of the format, not the CPU.
    assert np.abs(out.astype(int) - [120, 60, 30]).max() <= 3


# ---------------------------------------------------------------------------- EXIF


def test_exif_orientation_6_rotates_png_exactly(tmp_path: Path) -> None:
    rgb = _marked_rgb(2, 4)
    path = tmp_path / "rot.png"
    Image.fromarray(rgb).save(path, exif=_exif(6))
    out = load_rgb(path)
    assert out.shape == (4, 2, 3)
    # Orientation 6: displayed = stored rotated 90 degrees clockwise.
    np.testing.assert_array_equal(out, np.rot90(rgb, k=-1))
    assert out[0, 1].tolist() == [255, 0, 0]
    assert image_size(path) == (4, 2)


def test_exif_orientation_6_jpeg_transposes_shape(tmp_path: Path) -> None:
    path = tmp_path / "rot.jpg"
    Image.new("RGB", (40, 16), (10, 200, 10)).save(path, exif=_exif(6))
    assert load_rgb(path).shape == (40, 16, 3)
    assert image_size(path) == (40, 16)


def test_exif_orientation_3_keeps_shape_and_rotates(tmp_path: Path) -> None:
    rgb = _marked_rgb(2, 4)
    path = tmp_path / "r180.png"
    Image.fromarray(rgb).save(path, exif=_exif(3))
    out = load_rgb(path)
    np.testing.assert_array_equal(out, rgb[::-1, ::-1])
    assert image_size(path) == (2, 4)


def _png_chunks(data: bytes) -> list[tuple[bytes, bytes]]:
    chunks, pos = [], 8
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        chunk_type = data[pos + 4 : pos + 8]
        chunks.append((chunk_type, data[pos + 8 : pos + 8 + length]))
        pos += 12 + length
    return chunks


def _png_bytes(chunks: list[tuple[bytes, bytes]]) -> bytes:
    out = b"\x89PNG\r\n\x1a\n"
    for chunk_type, body in chunks:
        crc = zlib.crc32(chunk_type + body) & 0xFFFFFFFF
        out += struct.pack(">I", len(body)) + chunk_type + body + struct.pack(">I", crc)
    return out


def test_png_exif_after_pixel_data_is_read_alike_by_size_image_and_mask(tmp_path: Path) -> None:
    """The PNG specification puts eXIf before the pixel data; one after it is ignored by
    all three readers alike (the image is upright), so sizes always match the arrays."""
    source = tmp_path / "src.png"
    Image.fromarray(_marked_rgb(2, 4)).save(source, exif=_exif(6))
    chunks = _png_chunks(source.read_bytes())
    exif = [c for c in chunks if c[0] == b"eXIf"]
    rest = [c for c in chunks if c[0] not in (b"eXIf", b"IEND")]
    assert len(exif) == 1
    path = tmp_path / "late_exif.png"
    path.write_bytes(_png_bytes([*rest, *exif, (b"IEND", b"")]))
    with Image.open(path) as check:
        assert "exif" not in check.info  # really after IDAT
        check.load()
        assert check.getexif()[ORIENTATION] == 6  # and there
    np.testing.assert_array_equal(load_rgb(path), _marked_rgb(2, 4))
    assert image_size(path) == (2, 4)
    mask = tmp_path / "late_exif_mask.png"
    rest = [c for c in _png_chunks(_saved_mask_bytes(tmp_path)) if c[0] != b"IEND"]
    mask.write_bytes(_png_bytes([*rest, *exif, (b"IEND", b"")]))
    assert load_mask(mask, 3).shape == (2, 4)


def _saved_mask_bytes(tmp_path: Path) -> bytes:
    path = tmp_path / "plain_mask.png"
    save_label_png(path, np.array([[0, 1, 2, 1], [2, 1, 0, 255]], dtype=np.uint8))
    return path.read_bytes()


def test_image_size_reads_headers_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    jpg, png = tmp_path / "a.jpg", tmp_path / "b.png"
    Image.new("RGB", (30, 20)).save(jpg, exif=_exif(8))
    Image.new("RGB", (7, 5)).save(png)

    def no_decode(self: ImageFile.ImageFile) -> None:
        raise AssertionError("image_size decoded pixel data")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decode)
    assert image_size(jpg) == (30, 20)
    assert image_size(png) == (5, 7)


# ---------------------------------------------------------------------------- bad files


def test_truncated_jpeg_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.jpg"
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.jpg"):
        load_rgb(path)
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


def test_truncated_png_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "cut.png"
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DatasetError, match=r"cut\.png"):
        load_rgb(path)


def test_not_an_image_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "fake.jpg"
    path.write_text("this is not a jpeg")
    with pytest.raises(DatasetError, match=r"fake\.jpg"):
        load_rgb(path)
    with pytest.raises(DatasetError, match=r"fake\.jpg"):
        image_size(path)


def test_missing_image_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"nowhere\.png"):
        load_rgb(tmp_path / "nowhere.png")
    with pytest.raises(DatasetError, match=r"nowhere\.png"):
        image_size(tmp_path / "nowhere.png")


# ---------------------------------------------------------------------------- masks


def test_palette_mask_reads_raw_indices(tmp_path: Path) -> None:
    path = tmp_path / "m.png"
    label = np.array([[0, 1, 20], [255, 3, 0]], dtype=np.uint8)
    save_label_png(path, label)
    out = load_mask(path, num_classes=21)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, label)


def test_palette_mask_ignores_palette_colours(tmp_path: Path) -> None:
    path = tmp_path / "odd_palette.png"
    image = Image.fromarray(np.array([[0, 2, 255]], dtype=np.uint8), mode="P")
    image.putpalette([7] * (256 * 3))  # every index the same colour
    image.save(path)
    np.testing.assert_array_equal(load_mask(path, 3), [[0, 2, 255]])


def test_grey_mask_reads_raw_indices(tmp_path: Path) -> None:
    path = tmp_path / "m_l.png"
    label = np.array([[0, 2], [255, 1]], dtype=np.uint8)
    Image.fromarray(label, mode="L").save(path)
    np.testing.assert_array_equal(load_mask(path, num_classes=3), label)


def test_rgb_mask_maps_voc_colours(tmp_path: Path) -> None:
    palette = voc_palette()
    label = np.array([[0, 1, 15], [255, 20, 2]], dtype=np.uint8)
    path = tmp_path / "m_rgb.png"
    Image.fromarray(palette[label]).save(path)
    np.testing.assert_array_equal(load_mask(path, num_classes=21), label)


def test_rgb_mask_with_foreign_colour_is_rejected(tmp_path: Path) -> None:
    rgb = voc_palette()[np.array([[0, 1]])].copy()
    rgb[0, 1] = (1, 2, 3)
    path = tmp_path / "m_bad_rgb.png"
    Image.fromarray(rgb).save(path)
    with pytest.raises(DatasetError, match=r"m_bad_rgb\.png.*\(1, 2, 3\)"):
        load_mask(path, num_classes=21)


def test_mask_value_beyond_class_count_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "m_big.png"
    save_label_png(path, np.array([[0, 1, 5, 255]], dtype=np.uint8))
    assert load_mask(path, num_classes=6).tolist() == [[0, 1, 5, 255]]
    with pytest.raises(DatasetError, match=r"m_big\.png.*\b5\b"):
        load_mask(path, num_classes=5)


def test_sixteen_bit_mask_values_are_checked(tmp_path: Path) -> None:
    ok, bad = tmp_path / "m16.png", tmp_path / "m16_bad.png"
    Image.fromarray(np.array([[0, 2, 255]], dtype=np.uint16)).save(ok)
    Image.fromarray(np.array([[0, 300]], dtype=np.uint16)).save(bad)
    out = load_mask(ok, num_classes=3)
    assert out.dtype == np.uint8 and out.tolist() == [[0, 2, 255]]
    with pytest.raises(DatasetError, match=r"m16_bad\.png.*300"):
        load_mask(bad, num_classes=3)


def test_missing_and_broken_masks_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match=r"absent\.png"):
        load_mask(tmp_path / "absent.png", num_classes=21)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    with pytest.raises(DatasetError, match=r"broken\.png"):
        load_mask(broken, num_classes=21)
