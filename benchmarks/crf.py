"""Dense CRF throughput: images/s with 1 and 2 worker processes (one torch thread each).

Synthetic 320x480 images (a few coloured ellipses on a background, noise) with noisy 21-label
probability maps; each worker makes its image from a seed (as a stage's worker reads its
files), runs `cpal.refine.crf` with a preset and returns the labels. Rates are measured
after each worker's first image, so process start-up is not counted. Also prints the
single-image time for 3 labels (IRN's CRF runs over 1 + the image's classes), and
pydensecrf's time on the same inputs when it is installed (it is not a dependency). A
benchmark, not a test: it prints figures, it asserts nothing.

    OMP_NUM_THREADS=1 python benchmarks/crf.py [--images 8] [--workers 1 2] [--presets ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from functools import partial

import numpy as np
import torch

from cpal.refine.crf import PRESETS, refine_labels, refine_probabilities
from cpal.refine.workers import map_images

HEIGHT, WIDTH = 320, 480


def synthetic(seed: int, labels: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 RGB image of a few coloured regions and (labels, H, W) noisy probabilities
    that favour each region's label."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH].astype(np.float32)
    region = np.zeros((HEIGHT, WIDTH), dtype=np.int64)
    for index in range(1, min(labels, 6)):
        cy, cx = rng.uniform(0, HEIGHT), rng.uniform(0, WIDTH)
        ry, rx = rng.uniform(30, 120, size=2)
        region[((ys - cy) / ry) ** 2 + ((xs - cx) / rx) ** 2 < 1] = index
    colours = rng.uniform(20, 235, size=(labels, 3))
    image = colours[region] + rng.normal(0, 8, (HEIGHT, WIDTH, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = rng.normal(0, 1.0, (labels, HEIGHT, WIDTH)).astype(np.float32)
    logits += 2.0 * np.eye(labels, dtype=np.float32)[region].transpose(2, 0, 1)
    probs = np.exp(logits - logits.max(0))
    return image, probs / probs.sum(0)


def refine_one(seed: int, preset: str, labels: int) -> np.ndarray:
    image, probs = synthetic(seed, labels)
    params = PRESETS[preset]
    if params.unary == "labels":
        return refine_labels(image, probs.argmax(0), labels, params)
    return refine_probabilities(image, probs, params)


def pydensecrf_seconds(preset: str, labels: int, images: int) -> float | None:
    """Seconds per image of pydensecrf (if installed) on the same inputs, one process."""
    try:
        import pydensecrf.densecrf as dcrf
    except ImportError:
        return None
    params = PRESETS[preset]
    total = 0.0
    for seed in range(images):
        image, probs = synthetic(seed, labels)
        begin = time.perf_counter()
        if params.unary == "labels":
            unary = np.full((labels, HEIGHT * WIDTH), -np.log((1 - params.gt_prob) / (labels - 1)),
                            dtype=np.float32)
            unary[probs.argmax(0).reshape(-1), np.arange(HEIGHT * WIDTH)] = -np.log(params.gt_prob)
        else:
            unary = -np.log(np.clip(probs, params.clip, 1.0)).reshape(labels, -1)
        crf = dcrf.DenseCRF2D(WIDTH, HEIGHT, labels)
        crf.setUnaryEnergy(np.ascontiguousarray(unary, dtype=np.float32))
        crf.addPairwiseGaussian(sxy=params.gaussian_sxy, compat=params.gaussian_compat)
        crf.addPairwiseBilateral(sxy=params.bilateral_sxy, srgb=params.bilateral_srgb,
                                 rgbim=image, compat=params.bilateral_compat)
        np.array(crf.inference(params.iterations)).argmax(0)
        total += time.perf_counter() - begin
    return total / images


def images_per_second(preset: str, labels: int, images: int, workers: int) -> float:
    fn = partial(refine_one, preset=preset, labels=labels)
    stamps = []
    for _ in map_images(fn, range(images + workers), workers=workers, threads=1, prefetch=1):
        stamps.append(time.perf_counter())
    # Rate over the images after each worker's first (start-up and first-call costs).
    return images / (stamps[-1] - stamps[workers - 1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8, help="timed images per setting")
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--presets", nargs="+", default=["irn", "clip_es"])
    parser.add_argument("--labels", type=int, default=21)
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
          f"torch {torch.__version__}; {HEIGHT}x{WIDTH} images, 10 mean-field iterations; "
          f"load average before: {os.getloadavg()[0]:.1f}")
    for preset in args.presets:
        refine_one(0, preset, 3)  # warm-up
        begin = time.perf_counter()
        refine_one(1, preset, 3)
        small = time.perf_counter() - begin
        rates = {w: images_per_second(preset, args.labels, args.images, w) for w in args.workers}
        line = ", ".join(f"{w} worker{'s' if w > 1 else ''}: {rate:5.2f} images/s"
                         for w, rate in rates.items())
        base = rates.get(1)
        scale = "".join(f" (x{rates[w] / base:.2f} with {w})" for w in rates if base and w > 1)
        reference = pydensecrf_seconds(preset, args.labels, min(args.images, 4))
        versus = ("" if reference is None else
                  f" | pydensecrf: {1 / reference:5.2f} images/s (1 process)")
        print(f"{preset:>8} | {args.labels} labels: {line}{scale} | 3 labels: {small:.2f} "
              f"s/image{versus}")
    print(f"load average after: {', '.join(f'{v:.1f}' for v in os.getloadavg())} "
          "(other processes on these CPUs slow both figures)")


if __name__ == "__main__":
    main()
