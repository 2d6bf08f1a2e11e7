"""Regenerate pydensecrf_reference.npz: inputs and pydensecrf2 1.1 marginals for three CRF
parameter sets, so that tests pin cpal.refine.crf to the reference implementation without
depending on it. Needs only numpy and pydensecrf2 (not cpal):

    python tests/refine/data/make_pydensecrf_reference.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydensecrf.densecrf as dcrf
from pydensecrf.utils import unary_from_labels, unary_from_softmax

HEIGHT, WIDTH, LABELS = 36, 52, 4

# name: (gaussian sxy, compat, bilateral sxy, srgb, compat, unary kind)
PRESETS = {
    "irn": (3.0, 3.0, 50.0, 5.0, 10.0, "labels"),
    "clip_es": (1.0, 3.0, 67.0, 3.0, 4.0, "probabilities"),
    "small": (2.0, 2.0, 5.0, 10.0, 5.0, "probabilities"),
}


def inputs(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A four-region image with noise, noisy probabilities and their argmax labels."""
    rng = np.random.default_rng(seed)
    ys, xs = np.mgrid[0:HEIGHT, 0:WIDTH]
    region = (ys >= HEIGHT // 2).astype(int) * 2 + (xs >= WIDTH // 3).astype(int)
    colours = np.array([[200, 40, 40], [40, 180, 60], [30, 60, 200], [220, 220, 90]])
    image = colours[region] + rng.normal(0, 12, (HEIGHT, WIDTH, 3))
    image = np.clip(image, 0, 255).astype(np.uint8)
    logits = 2.0 * np.eye(LABELS)[region].transpose(2, 0, 1) + rng.normal(0, 1.2, (LABELS,
                                                                               HEIGHT, WIDTH))
    probs = np.exp(logits) / np.exp(logits).sum(0, keepdims=True)
    return image, probs.astype(np.float32), probs.argmax(0).astype(np.int64)


def main() -> None:
    image, probs, labels = inputs()
    out = {"image": image, "probs": probs, "labels": labels}
    for name, (gsxy, gw, bsxy, bsrgb, bw, kind) in PRESETS.items():
        d = dcrf.DenseCRF2D(WIDTH, HEIGHT, LABELS)
        if kind == "labels":
            unary = unary_from_labels(labels, LABELS, gt_prob=0.7, zero_unsure=False)
        else:
            unary = unary_from_softmax(probs)
        d.setUnaryEnergy(np.ascontiguousarray(unary))
        d.addPairwiseGaussian(sxy=gsxy, compat=gw)
        d.addPairwiseBilateral(sxy=bsxy, srgb=bsrgb, rgbim=np.ascontiguousarray(image),
                               compat=bw)
        for iterations in (1, 10):
            q = np.array(d.inference(iterations)).reshape(LABELS, HEIGHT, WIDTH)
            out[f"{name}_q{iterations}"] = q.astype(np.float32)
    np.savez_compressed(Path(__file__).with_name("pydensecrf_reference.npz"), **out)


if __name__ == "__main__":
    main()
