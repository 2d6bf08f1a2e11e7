"""Refinement of localisation maps into pseudo masks: dense CRF, IRN's relation labels
and affinities, and the random walk, as functions on numpy arrays and torch tensors that
a pipeline stage calls per image or per batch (`map_images` spreads images over worker
processes)."""

from __future__ import annotations

from cpal.refine.crf import (
    PRESETS,
    CRFParams,
    crf_labels,
    dense_crf,
    dense_crf_group,
    mean_field_exact,
    refine_label_group,
    refine_labels,
    refine_probabilities,
    unary_from_labels,
    unary_from_probabilities,
)
from cpal.refine.irn import (
    AffinityLabels,
    IRLabelParams,
    PairOffsets,
    affinity_from_boundary,
    affinity_labels,
    downsample_labels,
    ir_labels,
    pair_offsets,
    valid_pairs,
)
from cpal.refine.lattice import PermutohedralLattice
from cpal.refine.random_walk import (
    RandomWalkParams,
    random_walk,
    random_walk_dense,
    random_walk_labels,
    refine_by_random_walk,
    stack_for_walk,
    transition_stencil,
)
from cpal.refine.registry import REFINERS, Refiner, register_refiner
from cpal.refine.workers import map_images

__all__ = [
    "PRESETS",
    "REFINERS",
    "AffinityLabels",
    "CRFParams",
    "IRLabelParams",
    "PairOffsets",
    "PermutohedralLattice",
    "RandomWalkParams",
    "Refiner",
    "affinity_from_boundary",
    "affinity_labels",
    "crf_labels",
    "dense_crf",
    "dense_crf_group",
    "downsample_labels",
    "ir_labels",
    "map_images",
    "mean_field_exact",
    "pair_offsets",
    "random_walk",
    "random_walk_dense",
    "random_walk_labels",
    "refine_by_random_walk",
    "refine_label_group",
    "refine_labels",
    "refine_probabilities",
    "register_refiner",
    "stack_for_walk",
    "transition_stencil",
    "unary_from_labels",
    "unary_from_probabilities",
    "valid_pairs",
]
