"""A held-out VOC-layout dataset made from data this project did not design.

Objects are real handwritten digits (scikit-learn's bundled UCI digits, 1,797 images of
8x8 pixels, classes 0-9), upsampled to soft masks and filled with a random colour; the
backgrounds are random crops of real photographs (scikit-learn's and scikit-image's
bundled sample images). A digit's colour carries no class information, its shape does,
and backgrounds are real clutter. It exists to check recipes and methods on data whose
statistics nobody here chose to suit them (docs/results.md, "Held-out check").

    python benchmarks/heldout_digits.py OUT_DIR [--train 600] [--val 200] [--size 96]

Needs `pip install scikit-learn scikit-image` (not dependencies of cpal).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

PHOTOS_TRAIN = ("astronaut", "coffee", "chelsea", "rocket", "motorcycle_left", "hubble_deep_field",
                "retina", "gravel", "brick", "grass", "china")
PHOTOS_VAL = ("motorcycle_right", "coins", "ihc", "color", "flower", "immunohistochemistry")
CLASS_NAMES = ("background", *(f"digit{i}" for i in range(10)))


def _photos(names: tuple[str, ...]) -> list[np.ndarray]:
    import skimage.data as sd
    from sklearn.datasets import load_sample_images

    samples = dict(zip(("china", "flower"), load_sample_images().images, strict=True))
    out = []
    for name in names:
        if name in samples:
            img = samples[name]
        elif hasattr(sd, name):
            img = getattr(sd, name)()
        else:
            continue
        img = np.asarray(img)
        if img.ndim == 2:
            img = np.repeat(img[..., None], 3, axis=2)
        img = img[..., :3]
        if img.dtype != np.uint8:
            img = (255 * (img.astype(np.float64) / max(img.max(), 1))).astype(np.uint8)
        out.append(img)
    return out


def _background(rng: np.random.Generator, photos: list[np.ndarray], size: int) -> np.ndarray:
    photo = photos[int(rng.integers(len(photos)))]
    h, w = photo.shape[:2]
    side = int(rng.integers(size, max(size + 1, min(h, w))))
    y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
    crop = Image.fromarray(photo[y : y + side, x : x + side]).resize((size, size), Image.BILINEAR)
    return np.asarray(crop, dtype=np.float32)


def _digit_mask(digit: np.ndarray, px: int, rng: np.random.Generator) -> np.ndarray:
    """8x8 grey digit (0..16) -> soft (px, px) coverage in [0, 1], slightly rotated."""
    img = Image.fromarray((digit / 16 * 255).astype(np.uint8)).resize((px, px), Image.BICUBIC)
    img = img.rotate(float(rng.uniform(-20, 20)), resample=Image.BILINEAR)
    cover = np.asarray(img, dtype=np.float32) / 255
    return np.clip((cover - 0.35) * 4, 0, 1)


def render(rng: np.random.Generator, digits: np.ndarray, targets: np.ndarray,
           photos: list[np.ndarray], size: int) -> tuple[np.ndarray, np.ndarray]:
    canvas = _background(rng, photos, size)
    mask = np.zeros((size, size), dtype=np.uint8)
    count = 1 + int(rng.choice(3, p=[0.5, 0.35, 0.15]))
    placed: list[tuple[float, float, int]] = []
    for _ in range(count):
        k = int(rng.integers(len(digits)))
        px = int(rng.integers(int(size * 0.3), int(size * 0.48)))
        for _attempt in range(20):
            y, x = (int(v) for v in rng.integers(0, size - px + 1, size=2))
            if all(abs(y - py) + abs(x - pxx) > 0.6 * (px + pp) for py, pxx, pp in placed):
                break
        placed.append((y, x, px))
        cover = _digit_mask(digits[k], px, rng)
        colour = rng.uniform(0, 255, 3).astype(np.float32)
        shade = 1 + 0.15 * rng.standard_normal((px, px, 1)).astype(np.float32)
        region = canvas[y : y + px, x : x + px]
        region += (colour * shade - region) * cover[..., None]
        inside = cover >= 0.5
        mask[y : y + px, x : x + px][inside] = int(targets[k]) + 1
        edge = (cover > 0.15) & (cover < 0.85)
        mask[y : y + px, x : x + px][edge] = 255
    canvas += rng.normal(0, 3, canvas.shape).astype(np.float32)
    return np.clip(canvas, 0, 255).astype(np.uint8), mask


def generate(root: Path, num_train: int, num_val: int, size: int, seed: int) -> None:
    from sklearn.datasets import load_digits

    data = load_digits()
    order = np.random.default_rng(seed).permutation(len(data.target))
    half = len(order) // 2  # disjoint digit instances for train and val
    for d in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / d).mkdir(parents=True, exist_ok=True)
    labels: dict[str, list[str]] = {}
    palette = _palette()
    for split, count, idx, photos in (
        ("train", num_train, order[:half], _photos(PHOTOS_TRAIN)),
        ("val", num_val, order[half:], _photos(PHOTOS_VAL)),
    ):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1])
        ids = []
        for i in range(count):
            image, mask = render(rng, data.images[idx], data.target[idx], photos, size)
            image_id = f"{split}_{i:05d}"
            Image.fromarray(image).save(root / "JPEGImages" / f"{image_id}.png")
            m = Image.fromarray(mask, mode="P")
            m.putpalette(palette)
            m.save(root / "SegmentationClass" / f"{image_id}.png")
            present = sorted(set(np.unique(mask).tolist()) - {0, 255})
            labels[image_id] = [CLASS_NAMES[c] for c in present]
            ids.append(image_id)
        (root / "ImageSets/Segmentation" / f"{split}.txt").write_text("\n".join(ids) + "\n")
    (root / "classes.txt").write_text("\n".join(CLASS_NAMES) + "\n")
    (root / "image_labels.json").write_text(json.dumps(labels, indent=0))


def _palette() -> list[int]:
    pal = []
    for i in range(256):
        c, r, g, b = i, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        pal += [r, g, b]
    return pal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--train", type=int, default=600)
    parser.add_argument("--val", type=int, default=200)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    generate(args.out, args.train, args.val, args.size, args.seed)
    print(f"wrote {args.train} train / {args.val} val images of {args.size} px to {args.out}")


if __name__ == "__main__":
    main()
