"""A preview grid of the built-in dataset (the image in docs/synthetic.md)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw, ImageFont

from cpal.data.synthetic.families import CLASS_NAMES
from cpal.data.voc import IMAGE_DIR, LABELS_FILE, MASK_DIR, SPLIT_DIR
from cpal.errors import DatasetError
from cpal.io import IGNORE_INDEX, atomic_path, voc_palette

GRID_COLUMNS = 6

# ----------------------------------------------------------------------------- preview grid


def _open_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error}") from error


def _wrap(draw: ImageDraw.ImageDraw, words: list[str], font: Any, width: int) -> list[str]:
    lines: list[str] = []
    for word in words:
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def sample_grid(root: Path, path: Path, *, num_images: int = 12, split: str = "train") -> None:
    """Write a PNG grid (image above its colour mask, with the class names) for the docs.

    The grid is palette-quantised: it is for looking at, not a lossless copy of the data.
    """
    root = Path(root)
    split_file = root / SPLIT_DIR / f"{split}.txt"
    try:
        ids = split_file.read_text(encoding="utf-8").split()[:num_images]
        labels = json.loads((root / LABELS_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise DatasetError(f"cannot read the synthetic dataset at {root}: {error}") from error
    if not ids:
        raise DatasetError(f"{split_file} lists no images")
    images = [_open_rgb(root / IMAGE_DIR / f"{i}.png") for i in ids]
    masks = [_open_rgb(root / MASK_DIR / f"{i}.png") for i in ids]
    size = images[0].width
    font = ImageFont.load_default()
    scratch = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    line_h = int(font.getbbox("Ag")[3]) + 3
    gap = 6
    captions = [_wrap(scratch, labels.get(i, []), font, size) for i in ids]
    text_h = line_h * max(len(c) for c in captions) + gap
    cols = min(GRID_COLUMNS, len(ids))
    rows = math.ceil(len(ids) / cols)
    cell_w, cell_h = size + gap, 2 * size + 2 + text_h

    palette = voc_palette().tolist()
    legend = [(name, tuple(palette[k])) for k, name in enumerate(CLASS_NAMES) if k > 0]
    legend.append(("border (255)", tuple(palette[IGNORE_INDEX])))
    legend_w = gap + cols * cell_w
    legend_lines: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    x = gap
    for entry in legend:
        width = line_h + 4 + int(scratch.textlength(entry[0], font=font)) + 12
        if x + width > legend_w and legend_lines[-1]:
            legend_lines.append([])
            x = gap
        legend_lines[-1].append(entry)
        x += width
    canvas = Image.new(
        "RGB", (legend_w, gap + rows * cell_h + len(legend_lines) * line_h + gap), "white"
    )
    draw = ImageDraw.Draw(canvas)
    for k, (image, mask, caption) in enumerate(zip(images, masks, captions, strict=True)):
        x, y = gap + (k % cols) * cell_w, gap + (k // cols) * cell_h
        canvas.paste(image, (x, y))
        canvas.paste(mask, (x, y + size + 2))
        for n, line in enumerate(caption):
            draw.text((x, y + 2 * size + 4 + n * line_h), line, fill="black", font=font)
    y = gap + rows * cell_h
    for entries in legend_lines:
        x = gap
        for name, colour in entries:
            draw.rectangle((x, y, x + line_h - 3, y + line_h - 3), fill=colour, outline="black")
            draw.text((x + line_h + 1, y), name, fill="black", font=font)
            x += line_h + 4 + int(draw.textlength(name, font=font)) + 12
        y += line_h
    # A dithered 256-colour palette keeps the docs' images ~3x smaller at no visible cost;
    # mask and text colours are reserved entries, so they stay exact (and undithered).
    reserved = [(0, 0, 0), (255, 255, 255), *(colour for _, colour in legend)]
    learned = canvas.quantize(colors=256 - len(reserved), method=Image.Quantize.MAXCOVERAGE)
    colours = [c for rgb in reserved for c in rgb] + learned.getpalette()[: 3 * 256]
    palette_image = Image.new("P", (1, 1))
    palette_image.putpalette(colours[: 3 * 256])
    quantised = canvas.quantize(palette=palette_image, dither=Image.Dither.FLOYDSTEINBERG)
    with atomic_path(path) as tmp:
        quantised.save(tmp, format="PNG", optimize=True)
