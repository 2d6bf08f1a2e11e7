"""The CAM vs PACAM figure of prototype methods, recomputed from the final checkpoint:
the run stores one kind of map, and the figure's few images need both (and, for methods
that select context, the training images behind the selected context prototypes)."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from cpal.config import Config
from cpal.data.transforms import normalize
from cpal.data.voc import VOCLayout
from cpal.engine.identity import load_final_checkpoint
from cpal.engine.infer import (
    PrototypeInference,
    inference_scales,
    load_trained_model,
    normalised_maps,
)
from cpal.engine.runtime import resolve_device
from cpal.methods import CAM_MAP, PACAM_MAP
from cpal.models.cam_net import LocalisationNet
from cpal.viz.figures import ContextPanel, OverlayRow, overlay_grid


def comparison_figure(
    config: Config, layout: VOCLayout, rows: list[OverlayRow], target: Path
) -> None:
    """Image | GT | CAM | PACAM | pseudo label of `rows`' images, recomputed from the final
    checkpoint; for methods that select context (cpal-topk, cpal) also the training
    images behind the selected context."""
    device = resolve_device(config.device)
    _, ckpt = load_final_checkpoint(config)
    model = load_trained_model(ckpt, config, layout.num_foreground, device)
    selects = model.cpal is not None and model.cpal.uses_selection
    train_ids = layout.split_ids(config.data.train_split) if selects else []
    compared = []
    for row in rows:
        image = normalize(layout.load_image(row.image_id))[None].to(device)
        labels = torch.from_numpy(layout.image_labels([row.image_id])).to(device)
        scales = inference_scales(config, float(ckpt.meta.get("image_scale", 1.0)))
        maps = normalised_maps(model, image, labels, scales,
                               config.infer.flip, (CAM_MAP, PACAM_MAP),
                               PrototypeInference.of(config))
        present = torch.nonzero(labels[0] > 0.5).flatten()

        def heat(kind: str, present: torch.Tensor = present, maps: dict = maps) -> np.ndarray:
            chosen = maps[kind][0, present]
            return (chosen.amax(dim=0) if len(present) else chosen.sum(dim=0)).cpu().numpy()

        context = None
        if selects and len(present):
            context = context_panel(model, layout, train_ids, image, labels, row, present)
        compared.append(dataclasses.replace(row, heat=heat(CAM_MAP),
                                            more_heats={"PACAM": heat(PACAM_MAP)},
                                            context=context))
    overlay_grid(compared, target, layout.class_names, heat_title="CAM")


@torch.inference_mode()
def context_panel(
    model: LocalisationNet, layout: VOCLayout, train_ids: Sequence[str], image: torch.Tensor,
    labels: torch.Tensor, row: OverlayRow, present: torch.Tensor,
) -> ContextPanel:
    """For the image's main class (largest pseudo-label area among its present classes):
    each selected context prototype's weight and the training image of its nearest bank
    entry. One forward pass at scale 1 against the frozen bank, plus the few thumbnails."""
    assert model.cpal is not None
    areas = [int((row.pseudo == int(c) + 1).sum()) for c in present]
    channel = int(present[int(np.argmax(areas))]) + 1
    out = model(image, labels).cpal
    assert out is not None
    thumbnails: list[tuple[str, np.ndarray | None]] = []
    for weight, source in model.cpal.context_sources(out, 0, channel):
        if 0 <= source < len(train_ids):
            image_id = train_ids[source]
            thumbnails.append((f"w {weight:.2f}\n{image_id}", layout.load_image(image_id)))
        else:  # entries enqueued without sample ids (or from another dataset)
            thumbnails.append((f"w {weight:.2f}\nsource unknown", None))
    return ContextPanel(label=layout.class_names[channel], thumbnails=thumbnails)
