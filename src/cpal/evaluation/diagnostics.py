"""Diagnostics that test explanations of a result, not results themselves.

- Prototype separation: how far apart (cosine) an image's background prototype lies from
  its class prototypes, and how alike the prototypes of one class are across images
  compared with those of different classes. Prototype maps can only separate an object
  from the background that its prototypes separate.
- Border: the share of predicted object pixels that lie in a band along the image border,
  against the ground truth's share, to catch maps that learned the frame.
- Part / body recall (built-in data, whose generator knows each object's class part): how
  much of the discriminative part and how much of the rest of the body a labelling finds,
  to tell a map that misses bodies from one that misses parts.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from cpal.config import Config
from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout
from cpal.engine.identity import load_final_checkpoint
from cpal.engine.infer import PrototypeInference, _prototype_scale, load_trained_model
from cpal.engine.runtime import resolve_device
from cpal.io import IGNORE_INDEX
from cpal.models.cam_net import LocalisationNet

BORDER_FRACTION = 1 / 8
"""Width of the border band as a fraction of the image's shorter side."""


@dataclass
class PrototypeSeparation:
    """Means over images (and class pairs) of prototype cosines at scale 1."""

    bg_vs_class: float  # cos(p_bg, p_c) of an image, c present with a seed
    same_class: float  # cos(p_c(image i), p_c(image j)), i != j
    other_class: float  # cos(p_c(image i), p_d(image j)), c != d
    images: int

    def to_dict(self) -> dict[str, float | int]:
        return {"cos_background_vs_class": round(self.bg_vs_class, 4),
                "cos_same_class_across_images": round(self.same_class, 4),
                "cos_other_class_across_images": round(self.other_class, 4),
                "images": self.images}


@torch.inference_mode()
def prototype_separation(
    model: LocalisationNet, images: Sequence[torch.Tensor], labels: Sequence[torch.Tensor],
    proto: PrototypeInference,
) -> PrototypeSeparation:
    """Instance prototypes of each image at scale 1 with its flip, as inference makes them."""
    assert model.cpal is not None
    bg_cos: list[float] = []
    protos: list[tuple[int, torch.Tensor]] = []
    for image, label in zip(images, labels, strict=True):
        x = image[None]
        out = model.inference(torch.cat([x, x.flip(-1)]), torch.stack([label, label]))
        res = _prototype_scale(model, out, x, label[None], True, proto)
        p = F.normalize(res.prototypes[0].float(), dim=-1, eps=1e-8)
        filled = p.norm(dim=-1) > 0.5
        for c in torch.nonzero(label > 0.5).flatten().tolist():
            if filled[c + 1]:
                protos.append((c, p[c + 1]))
                if filled[0]:
                    bg_cos.append(float(p[0] @ p[c + 1]))
    same, other = [], []
    if len(protos) > 1:
        classes = torch.tensor([c for c, _ in protos])
        table = torch.stack([v for _, v in protos])
        cos = table @ table.T
        off = ~torch.eye(len(protos), dtype=torch.bool)
        equal = classes[:, None] == classes[None, :]
        same, other = cos[equal & off].tolist(), cos[~equal].tolist()

    def mean(values: list[float]) -> float:
        return float(np.mean(values)) if values else float("nan")

    return PrototypeSeparation(mean(bg_cos), mean(same), mean(other), len(images))


@dataclass(frozen=True)
class SeparationDiagnostic:
    """`prototype_separation` of a run's final network on a split, with its protocol."""

    result: PrototypeSeparation
    protocol: str

    def to_dict(self) -> dict[str, Any]:
        return {**self.result.to_dict(), "protocol": self.protocol}


def split_separation(config: Config, layout: VOCLayout, split: str) -> SeparationDiagnostic:
    """The prototype-separation diagnostic on the first `eval.diagnostic_images` images of
    `split`, with the run's final checkpoint."""
    device = resolve_device(config.device)
    _, ckpt = load_final_checkpoint(config)
    model = load_trained_model(ckpt, config, layout.num_foreground, device)
    ids = layout.split_ids(split)[: config.eval.diagnostic_images]
    images = [normalize(layout.load_image(i)).to(device) for i in ids]
    labels = torch.from_numpy(layout.image_labels(ids)).to(device)
    result = prototype_separation(model, images, list(labels), PrototypeInference.of(config))
    return SeparationDiagnostic(result, f"{split}, first {len(ids)} images, scale 1 + flip, "
                                "instance prototypes as inference makes them (no GT used)")


def border_band(shape: tuple[int, int], fraction: float = BORDER_FRACTION) -> np.ndarray:
    """Boolean (H, W): pixels within fraction x min(H, W) of the image border."""
    h, w = shape
    width = max(1, round(fraction * min(h, w)))
    band = np.zeros((h, w), dtype=bool)
    band[:width], band[-width:], band[:, :width], band[:, -width:] = True, True, True, True
    return band


def _percent(count: int, total: int) -> float | None:
    """100 x count / total to two decimals; None for an empty total."""
    return None if total == 0 else round(100 * count / total, 2)


@dataclass
class BorderShare:
    """Object pixels in the border band, summed over images."""

    predicted_in_band: int = 0
    predicted: int = 0
    gt_in_band: int = 0
    gt: int = 0

    def update(self, prediction: np.ndarray, gt: np.ndarray,
               ignore_index: int = IGNORE_INDEX) -> None:
        valid = gt != ignore_index
        band = border_band(gt.shape)
        pred_obj = (prediction > 0) & (prediction != ignore_index) & valid
        gt_obj = (gt > 0) & valid
        self.predicted += int(pred_obj.sum())
        self.predicted_in_band += int((pred_obj & band).sum())
        self.gt += int(gt_obj.sum())
        self.gt_in_band += int((gt_obj & band).sum())

    def to_dict(self) -> dict[str, float | None]:
        return {"predicted_object_in_border_band": _percent(self.predicted_in_band,
                                                            self.predicted),
                "gt_object_in_border_band": _percent(self.gt_in_band, self.gt),
                "band_fraction_of_short_side": BORDER_FRACTION}


@dataclass
class PartBodyRecall:
    """Object pixels found with their class, split into the objects' class parts and the
    rest of their bodies, summed over images (ignored GT pixels left out)."""

    part: int = 0
    part_found: int = 0
    body: int = 0
    body_found: int = 0
    predicted: int = 0
    predicted_correct: int = 0

    def update(self, prediction: np.ndarray, gt: np.ndarray, parts: np.ndarray,
               ignore_index: int = IGNORE_INDEX) -> None:
        """`prediction` and `gt`: (H, W) class indices; `parts`: (H, W) bool part pixels."""
        if not prediction.shape == gt.shape == parts.shape:
            raise ValueError(f"shapes differ: prediction {prediction.shape}, gt {gt.shape}, "
                             f"parts {parts.shape}")
        obj = (gt > 0) & (gt != ignore_index)
        found = obj & (prediction == gt)
        self.part += int((obj & parts).sum())
        self.part_found += int((found & parts).sum())
        self.body += int((obj & ~parts).sum())
        self.body_found += int((found & ~parts).sum())
        pred_obj = (prediction > 0) & (prediction != ignore_index) & (gt != ignore_index)
        self.predicted += int(pred_obj.sum())
        self.predicted_correct += int((pred_obj & (prediction == gt)).sum())

    def to_dict(self) -> dict[str, float | None]:
        return {"part_recall": _percent(self.part_found, self.part),
                "body_recall": _percent(self.body_found, self.body),
                "object_precision": _percent(self.predicted_correct, self.predicted),
                "part_share_of_objects": _percent(self.part, self.part + self.body)}
