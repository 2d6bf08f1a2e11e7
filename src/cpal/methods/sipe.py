"""`sipe`: CAM + image-specific prototypes + L_self = |CAM - PACAM| (SIPE, Chen et al.,
CVPR 2022), point by point as SIPE's official code does it (docs/method.md, "The base")."""

from cpal.methods.registry import MethodSpec, PrototypeBranch, register_method

SIPE = register_method(MethodSpec.with_prototypes(
    "sipe", "CAM + image-specific prototypes and L_self (SIPE): CPAL's base",
    PrototypeBranch(),
))
