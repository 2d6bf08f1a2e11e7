"""MCTformer-V2 (Xu et al., CVPR 2022): a DeiT with one class token per class.

Training: the class tokens start as copies of DeiT's CLS token (and its position); the
patch tokens of the last block, before the final LayerNorm (which MCTformer never
applies), go through a 3x3 convolution to C channels: the patch CAM. Two image scores
are each trained by a multilabel soft margin loss: each class token's mean over its
channels, and the average-pooled patch CAM.

Maps (`MCTformer.inference`, settings in the `mctformer` config section): the
class-to-patch attention, averaged over heads and summed over the last K blocks (3),
times relu(patch CAM); refined by the patch-to-patch attention (averaged over heads,
summed over all blocks): map_c(i) = sum_j A(i, j) map_c(j). The attention is reduced as
each block runs, so no block's maps are kept.

For the `mctformer-cpal` method the prototype branch reads the chosen blocks' patch
tokens (B, D, h, w) as its feature maps and the patch CAM as its CAM; docs/method.md.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.config import Config, MCTformerConfig
from cpal.models.cam_net import CAMOutput, MapNorm, build_cpal_module, valid_area
from cpal.models.registry import NetworkSpec, register_network
from cpal.models.vit import VIT_ARCHS, VisionTransformer, ViTOutput, deit_layout, vit_spec
from cpal.models.weights import LoadReport, load_weights
from cpal.prototypes.module import CPALModule


class MCTformer(nn.Module):
    """MCTformer-V2 on our ViT, optionally with the CPAL prototype branch."""

    align_to_stride = False  # the patch grid is resized straight to the image (MCTformer)
    map_norm: MapNorm = "min_max"

    def __init__(self, vit: VisionTransformer, num_classes: int, settings: MCTformerConfig,
                 feature_blocks: Sequence[int] = (-1,), cpal: CPALModule | None = None
                 ) -> None:
        super().__init__()
        if vit.prefix != num_classes:
            raise ValueError(f"MCTformer needs {num_classes} class tokens, the trunk has "
                             f"{vit.prefix}")
        self.vit = vit
        # The final LayerNorm is loaded with the DeiT file but never used: frozen, so that
        # no trainable parameter is left without a gradient (data-parallel training).
        self.vit.norm.requires_grad_(False)
        self.num_classes = num_classes
        self.head = nn.Conv2d(vit.dim, num_classes, 3, padding=1)
        self.settings = settings
        self.feature_blocks = vit.feature_blocks(feature_blocks)
        self.cpal = cpal

    @property
    def output_stride(self) -> int:
        return self.vit.spec.patch

    def _outputs(self, out: ViTOutput) -> CAMOutput:
        c = self.num_classes
        token_scores = out.tokens[:, :c].mean(dim=-1)  # (B, C): each class token's mean
        cam = self.head(out.patch_map())
        patch_scores = cam.mean(dim=(2, 3))
        features = [out.patch_map(out.hidden[i]) for i in self.feature_blocks]
        return CAMOutput(logits=(token_scores + patch_scores) / 2, cam=cam, features=features,
                         scores={"cls": token_scores, "patch": patch_scores})

    def forward(self, x: Tensor, labels: Tensor | None = None,
                sample_ids: Tensor | None = None, valid: Tensor | None = None) -> CAMOutput:
        out = self._outputs(self.vit(x, keep=self.feature_blocks))
        if self.cpal is not None and labels is not None:
            out.cpal = self.cpal(out.features, out.cam, labels, sample_ids,
                                 valid_area(valid, out.cam), x)
        return out

    def inference(self, x: Tensor, labels: Tensor | None = None) -> CAMOutput:
        """The scores, the patch CAM and MCTformer's maps (`maps`, >= 0, on the patch grid)."""
        s, c, depth = self.settings, self.num_classes, self.vit.depth
        sums: dict[str, Tensor] = {}
        first_cls = depth - min(s.class_attention_blocks, depth)
        first_patch = depth - min(s.refine_blocks or depth, depth)

        def reduce(index: int, weights: Tensor) -> None:
            mean = weights.mean(dim=1)  # over heads: (B, L, L)
            if index >= first_cls:
                add(sums, "cls", mean[:, :c, c:])
            if s.patch_refine and index >= first_patch:
                add(sums, "patch", mean[:, c:, c:])

        vit_out = self.vit(x, keep=self.feature_blocks, on_attention=reduce)
        out = self._outputs(vit_out)
        b, h, w = x.shape[0], *vit_out.grid
        attention = sums["cls"].reshape(b, c, h, w)
        cam = F.relu(out.cam)
        maps = {"fused": attention * cam, "attention": attention, "patch_cam": cam}[s.fusion]
        if s.patch_refine:
            flat = maps.flatten(2)  # (B, C, N): map_c(i) = sum_j A(i, j) map_c(j)
            maps = torch.bmm(flat, sums["patch"].transpose(1, 2)).reshape(b, c, h, w)
        out.maps = maps
        return out

    def param_groups(self) -> list[tuple[list[nn.Parameter], str]]:
        """The trunk (backbone role), the conv head (head) and the prototype branch."""
        groups = [([p for p in self.vit.parameters() if p.requires_grad], "backbone"),
                  ([p for p in self.head.parameters() if p.requires_grad], "head")]
        if self.cpal is not None:
            groups.append(([p for p in self.cpal.parameters() if p.requires_grad], "prototype"))
        return [(params, role) for params, role in groups if params]


def add(sums: dict[str, Tensor], key: str, value: Tensor) -> None:
    sums[key] = value if key not in sums else sums[key] + value


def build_mctformer(config: Config, num_classes: int, *, pretrained: bool = True,
                    class_names: Sequence[str] | None = None
                    ) -> tuple[MCTformer, LoadReport | None]:
    spec = vit_spec(config, VIT_ARCHS[config.model.arch])
    vit = VisionTransformer(spec, prefix=num_classes, drop_path=config.vit.drop_path)
    report = None
    if pretrained and config.model.pretrained:
        report = load_weights(vit, config.model.pretrained, deit_layout(vit),
                              allow_leak=config.model.pretrained_allow_leak)
    blocks = config.vit.feature_blocks or [-1]
    net = MCTformer(vit, num_classes, config.mctformer, blocks)
    net.cpal = build_cpal_module(config, [spec.dim] * len(blocks), num_classes)
    return net, report


register_network(NetworkSpec("mctformer", build_mctformer, archs=lambda: VIT_ARCHS,
                             map_sections=("mctformer",)))
