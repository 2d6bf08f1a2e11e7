"""Decode images and index masks into the arrays the rest of cpal expects.

Every decode failure becomes a `DatasetError` naming the file, so a bad file in a
10,000-image dataset is reported as one line instead of a traceback deep in a worker.
Truncated files are errors: `PIL.ImageFile.LOAD_TRUNCATED_IMAGES` is never set here,
because a half-grey image silently trains on garbage.

Mask reading (`load_mask`) is kept apart from image reading (`load_rgb`, `image_size`):
training uses image-level labels only and must never touch segmentation masks.
"""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image

from cpal.errors import DatasetError
from cpal.io import IGNORE_INDEX, voc_palette

__all__ = ["image_size", "load_mask", "load_rgb"]

# What Pillow raises for unreadable, truncated or malformed files: UnidentifiedImageError
# and "image file is truncated" are OSError, "broken PNG file" is SyntaxError, short
# headers raise EOFError or struct.error, unsupported conversions raise ValueError.
_DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    Image.DecompressionBombError,
)

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
# Orientations 5-8 swap width and height.
_TRANSPOSING_ORIENTATIONS = frozenset({5, 6, 7, 8})


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _orientation(exif: Image.Exif) -> int:
    value = exif.get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


# What each EXIF orientation asks of the stored pixels (as ImageOps.exif_transpose).
_TRANSPOSES = {
    2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90,
}


def _header_orientation(image: Image.Image) -> int:
    """EXIF orientation from the file's header, before any pixel is decoded.

    A PNG's eXIf chunk belongs before its pixel data (the PNG specification's order), and
    that is the only one read here: `PngImageFile.getexif()` would decode the whole image
    to look behind IDAT, so the base implementation reads what the header parsing found.
    Sizes (`image_size`), images and masks thus agree on every file, a non-conforming PNG
    with its eXIf after IDAT included (read as upright by all three)."""
    if image.format == "PNG":
        return _orientation(Image.Image.getexif(image))
    return _orientation(image.getexif())


def _upright(image: Image.Image, orientation: int) -> Image.Image:
    """`image` rotated/flipped as `orientation` says (itself when upright)."""
    return image if orientation == 1 else image.transpose(_TRANSPOSES[orientation])


def _to_rgb(image: Image.Image, path: Path) -> np.ndarray:
    """Convert any supported Pillow mode to (H, W, 3) uint8.

    16-bit grey (I;16*, and I, which older Pillow uses for 16-bit PNGs) is scaled from
    0..65535 to 0..255. Transparent images (RGBA, LA, PA, and P/L/RGB with a
    `transparency` key) are composited onto black, so fully transparent pixels are 0
    whatever colour the file stores under them.
    """
    mode = image.mode
    if mode in _SIXTEEN_BIT_MODES:
        grey = np.clip(np.asarray(image).astype(np.int64), 0, 65535)
        grey8 = ((grey * 255 + 32767) // 65535).astype(np.uint8)
        return np.repeat(grey8[:, :, None], 3, axis=2)
    if mode == "F":
        raise DatasetError(
            f"cannot read image {path}: floating-point (mode F) images are not supported"
        )
    if mode in _ALPHA_MODES or "transparency" in image.info:
        rgba = np.asarray(image.convert("RGBA"))
        rgb = rgba[:, :, :3].astype(np.uint16)
        alpha = rgba[:, :, 3:4].astype(np.uint16)
        return ((rgb * alpha + 127) // 255).astype(np.uint8)
    if mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def load_rgb(path: Path) -> np.ndarray:
    """Decode an image fully as (H, W, 3) uint8 RGB, upright per its EXIF orientation.

    Grey (L, 1, I;16), palette, CMYK and other modes are converted; alpha is composited
    onto black (see `_to_rgb`). Missing, unreadable or truncated files raise
    `DatasetError` naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as image:
            orientation = _header_orientation(image)
            image.load()
            return _to_rgb(_upright(image, orientation), path)
    except FileNotFoundError as error:
        raise DatasetError(f"image file not found: {path}") from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot read image {path}: {_one_line(error)}") from error


def image_size(path: Path) -> tuple[int, int]:
    """(H, W) of an image as `load_rgb` would return it, reading headers only."""
    path = Path(path)
    try:
        with Image.open(path) as image:
            width, height = image.size
            if _header_orientation(image) in _TRANSPOSING_ORIENTATIONS:
                width, height = height, width
    except FileNotFoundError as error:
        raise DatasetError(f"image file not found: {path}") from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot read image {path}: {_one_line(error)}") from error
    return height, width


_PALETTE_CODES: np.ndarray | None = None
_PALETTE_ORDER: np.ndarray | None = None


def _palette_lookup() -> tuple[np.ndarray, np.ndarray]:
    """Sorted 24-bit codes of the VOC colours and the class index of each."""
    global _PALETTE_CODES, _PALETTE_ORDER
    if _PALETTE_CODES is None or _PALETTE_ORDER is None:
        palette = voc_palette(256).astype(np.uint32)
        codes = (palette[:, 0] << 16) | (palette[:, 1] << 8) | palette[:, 2]
        order = np.argsort(codes, kind="stable")
        _PALETTE_CODES, _PALETTE_ORDER = codes[order], order.astype(np.uint8)
    return _PALETTE_CODES, _PALETTE_ORDER


def _rgb_to_indices(rgb: np.ndarray, path: Path) -> np.ndarray:
    """Map a VOC-coloured RGB mask back to class indices; any other colour is an error."""
    rgb = rgb.astype(np.uint32)
    codes = (rgb[:, :, 0] << 16) | (rgb[:, :, 1] << 8) | rgb[:, :, 2]
    sorted_codes, indices = _palette_lookup()
    position = np.clip(np.searchsorted(sorted_codes, codes), 0, len(sorted_codes) - 1)
    unknown = sorted_codes[position] != codes
    if unknown.any():
        colours = np.unique(codes[unknown])
        shown = ", ".join(f"({c >> 16}, {(c >> 8) & 255}, {c & 255})" for c in colours[:5].tolist())
        more = f" and {len(colours) - 5} more" if len(colours) > 5 else ""
        raise DatasetError(
            f"mask {path} is RGB but has colours that are not VOC palette colours: "
            f"{shown}{more}; save masks as index (L) or palette (P) PNGs"
        )
    return indices[position]


def _mask_values(image: Image.Image, path: Path) -> np.ndarray:
    """Raw index values of a mask (any integer dtype; range checked by the caller)."""
    mode = image.mode
    if mode in ("P", "L"):
        return np.array(image, dtype=np.uint8)
    if mode == "1":
        return np.asarray(image).astype(np.uint8)
    if mode in _SIXTEEN_BIT_MODES:
        return np.asarray(image).astype(np.int64)
    if mode == "RGBA":
        rgba = np.asarray(image)
        if (rgba[:, :, 3] != 255).any():
            raise DatasetError(f"mask {path} has transparent pixels; masks must be opaque")
        return _rgb_to_indices(rgba[:, :, :3], path)
    if mode == "RGB":
        return _rgb_to_indices(np.asarray(image), path)
    raise DatasetError(
        f"mask {path} has unsupported mode {mode}; "
        "expected an index (L) or palette (P) PNG, or RGB in VOC colours"
    )


def load_mask(path: Path, num_classes: int) -> np.ndarray:
    """Read a segmentation mask as (H, W) uint8 class indices, 255 = ignore.

    P and L masks are read as raw indices (the palette is not consulted); RGB masks are
    mapped through the VOC colour palette. Values other than 0..num_classes-1 and 255
    raise `DatasetError` naming the file and the values.
    """
    if not 1 <= num_classes <= IGNORE_INDEX:
        raise ValueError(f"num_classes must be in 1..{IGNORE_INDEX}, got {num_classes}")
    path = Path(path)
    try:
        with Image.open(path) as image:
            orientation = _header_orientation(image)
            image.load()
            values = _mask_values(_upright(image, orientation), path)
    except FileNotFoundError as error:
        raise DatasetError(f"mask file not found: {path}") from error
    except _DECODE_ERRORS as error:
        raise DatasetError(f"cannot read mask {path}: {_one_line(error)}") from error
    bad = ((values < 0) | (values >= num_classes)) & (values != IGNORE_INDEX)
    if bad.any():
        found = np.unique(values[bad])
        shown = ", ".join(str(v) for v in found[:10].tolist())
        raise DatasetError(
            f"mask {path} has value(s) {shown} but the dataset has {num_classes} classes "
            f"(valid: 0..{num_classes - 1}, and {IGNORE_INDEX} = ignore)"
        )
    return np.ascontiguousarray(values, dtype=np.uint8)
