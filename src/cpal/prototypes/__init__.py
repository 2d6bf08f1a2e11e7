"""CPAL's prototype branch: embeddings, instance prototypes, support bank, context awareness,
feature distribution alignment and the prototype-aware CAM (docs/method.md, steps 2-10)."""

from __future__ import annotations

from cpal.prototypes.alignment import alignment_shift, compactness_loss, shift_features
from cpal.prototypes.awareness import context_aware_prototype, positiveness, select_top_k
from cpal.prototypes.bank import SupportBank
from cpal.prototypes.head import EmbeddingHead
from cpal.prototypes.kmeans import spherical_kmeans, spherical_kmeans_batched
from cpal.prototypes.module import CPALModule, CPALOutput
from cpal.prototypes.pacam import prototype_cam, self_supervision_loss, shifted_prototype_cam
from cpal.prototypes.pooling import (
    affinity_iou,
    background_and_classes,
    cam_with_background,
    channel_valid,
    masked_average,
    pcm_refine,
    region_prototypes,
    region_weights,
    sipe_seeds,
)

__all__ = [
    "CPALModule",
    "CPALOutput",
    "EmbeddingHead",
    "SupportBank",
    "affinity_iou",
    "alignment_shift",
    "background_and_classes",
    "cam_with_background",
    "channel_valid",
    "compactness_loss",
    "context_aware_prototype",
    "masked_average",
    "pcm_refine",
    "positiveness",
    "prototype_cam",
    "region_prototypes",
    "region_weights",
    "select_top_k",
    "self_supervision_loss",
    "shift_features",
    "shifted_prototype_cam",
    "sipe_seeds",
    "spherical_kmeans",
    "spherical_kmeans_batched",
]
