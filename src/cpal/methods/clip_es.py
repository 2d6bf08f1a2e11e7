"""`clip-es` (CLIP-ES, Lin et al., CVPR 2023: training-free maps from a frozen CLIP) and
`clip-es-cpal` (CPAL's headline setting as this library reconstructs it: the CPAL branch
trained on frozen CLIP features against the CLIP-ES maps): docs/transformers.md,
docs/method.md. Both name CLIP-ES's CRF as their refiner."""

import dataclasses

from cpal.methods.registry import MethodSpec, PrototypeBranch, register_method

CLIP_ES = register_method(MethodSpec(
    name="clip-es",
    summary="CLIP-ES: softmax-GradCAM of text prompts on a frozen CLIP + attention affinity",
    network="clip_es",
    trains=False,
    refiner="crf_clip_es",
))
CLIP_ES_CPAL = register_method(dataclasses.replace(MethodSpec.with_prototypes(
    "clip-es-cpal", "CLIP-ES maps as the CAM of CPAL's prototype branch on frozen CLIP "
    "features (only the branch trains)",
    PrototypeBranch(bank=True, selection=True, alignment=True), ablation=False,
    network="clip_es",
), refiner="crf_clip_es"))
