"""`cam`: the classification branch alone, IRN's CAM recipe (Ahn et al., CVPR 2019)."""

from cpal.methods.registry import MethodSpec, register_method

CAM = register_method(MethodSpec(
    name="cam",
    summary="the CAM of the classification network alone (IRN's recipe): the baseline",
    ablation=True,
))
