"""`mctformer` (MCTformer-V2, Xu et al., CVPR 2022) and `mctformer-cpal` (the full CPAL
branch on its patch tokens and patch CAM): docs/transformers.md, docs/method.md."""

from cpal.methods.registry import MethodSpec, PrototypeBranch, register_method

MCTFORMER = register_method(MethodSpec(
    name="mctformer",
    summary="MCTformer-V2: class tokens on a DeiT, class-to-patch attention x patch CAM",
    network="mctformer",
))
MCTFORMER_CPAL = register_method(MethodSpec.with_prototypes(
    "mctformer-cpal", "MCTformer-V2 + CPAL on its patch tokens (context prototypes, "
    "awareness, alignment)",
    PrototypeBranch(bank=True, selection=True, alignment=True), ablation=False,
    network="mctformer",
))
