"""WSSS methods by name (`method: cam | sipe | cpal-mean | cpal-topk | cpal` on a ResNet,
`mctformer | mctformer-cpal`, `clip-es | clip-es-cpal`); see `cpal.methods.registry` for
what a method declares and how to add one."""

from __future__ import annotations

from cpal.methods.registry import (
    CAM_MAP,
    DEFAULT_METHOD,
    FUSED_MAP,
    MAP_KINDS,
    METHODS,
    PACAM_MAP,
    MethodSpec,
    PrototypeBranch,
    ablation_ladder,
    method_spec,
    register_method,
)

__all__ = [
    "CAM_MAP",
    "DEFAULT_METHOD",
    "FUSED_MAP",
    "MAP_KINDS",
    "METHODS",
    "PACAM_MAP",
    "MethodSpec",
    "PrototypeBranch",
    "ablation_ladder",
    "method_spec",
    "register_method",
]
