"""Refiners by name: how a localisation map becomes a cleaner label map.

A `Refiner` says what it takes (`inputs`, positional, in order), the function that does
it and its default parameters (a frozen dataclass). The dense CRF registers one refiner
per preset (`crf_irn`, `crf_clip_es`, `crf_deeplab`; the presets themselves are
`cpal.refine.crf.PRESETS`), the random walk `random_walk`. A refinement stage looks its
refiner up by name, so a new one (AMN's, a learned one) is a module plus a registration.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from cpal.registry import Registry


@dataclass(frozen=True)
class Refiner:
    name: str
    summary: str
    inputs: tuple[str, ...]
    """What `refine` takes positionally, e.g. ("image", "probabilities")."""
    refine: Callable[..., np.ndarray]
    """(*inputs, params=..., **options) -> (H, W) labels."""
    params: Any
    """The default parameters (replace fields with `dataclasses.replace`)."""

    def __call__(self, *inputs: Any, params: Any = None, **options: Any) -> np.ndarray:
        if len(inputs) != len(self.inputs):
            raise ValueError(f"refiner {self.name!r} takes {', '.join(self.inputs)}; got "
                             f"{len(inputs)} inputs")
        return self.refine(*inputs, params=self.params if params is None else params, **options)


REFINERS: Registry[Refiner] = Registry(
    "refiner", builtins=("cpal.refine.crf", "cpal.refine.random_walk"))


def register_refiner(refiner: Refiner) -> Refiner:
    return REFINERS.register(refiner.name, refiner)
