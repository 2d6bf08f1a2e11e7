"""CPAL (Tang et al., CVPR 2024) and the two rungs between it and SIPE: `cpal-mean` (the
support bank's mean as context), `cpal-topk` (+ k-means context and top-K prototype
awareness) and `cpal` (+ feature distribution alignment); docs/method.md, steps 4-7."""

from cpal.methods.registry import MethodSpec, PrototypeBranch, register_method

CPAL_MEAN = register_method(MethodSpec.with_prototypes(
    "cpal-mean", "SIPE + a support bank whose mean is mixed into each prototype",
    PrototypeBranch(bank=True),
))
CPAL_TOPK = register_method(MethodSpec.with_prototypes(
    "cpal-topk", "SIPE + k-means context of the bank and top-K prototype awareness",
    PrototypeBranch(bank=True, selection=True),
))
CPAL = register_method(MethodSpec.with_prototypes(
    "cpal", "the full method: context prototypes, awareness and distribution alignment",
    PrototypeBranch(bank=True, selection=True, alignment=True),
))
