"""MCTformer-V2 on our ViT: the two image scores, the maps computed again from the
attention maps the trunk returns, each fusion, and the class tokens from a DeiT file."""

import pytest
import torch

from cpal.config import MCTformerConfig, load_config
from cpal.models.cam_net import build_network
from cpal.models.mctformer import MCTformer
from cpal.models.vit import VIT_ARCHS, VisionTransformer
from tests.models.test_vit import fake_deit

C = 3
SPEC = VIT_ARCHS["deit_small"].scaled(1 / 16, depth=4)  # 6 heads of 4: dim 24


def _net(**settings) -> MCTformer:
    torch.manual_seed(0)
    vit = VisionTransformer(SPEC, prefix=C)
    return MCTformer(vit, C, MCTformerConfig(**settings)).eval()


def test_scores_are_class_token_means_and_pooled_patch_cam():
    net = _net()
    x = torch.randn(2, 3, 48, 64)
    with torch.no_grad():
        out = net(x)
        tokens = net.vit(x).tokens
    torch.testing.assert_close(out.scores["cls"], tokens[:, :C].mean(-1))
    assert out.cam.shape == (2, C, 3, 4)
    torch.testing.assert_close(out.scores["patch"], out.cam.mean(dim=(2, 3)))
    assert out.features[0].shape == (2, SPEC.dim, 3, 4)
    assert not net.vit.norm.weight.requires_grad  # never used, so never trained
    groups = {role for _, role in net.param_groups()}
    assert groups == {"backbone", "head"}


@pytest.mark.parametrize("fusion", ["fused", "attention", "patch_cam"])
@pytest.mark.parametrize("refine", [True, False])
def test_maps_from_the_attention_maps(fusion, refine):
    net = _net(fusion=fusion, patch_refine=refine, class_attention_blocks=3)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        out = net.inference(x)
        trunk = net.vit(x, return_attention=True)
    mean = [a.mean(dim=1) for a in trunk.attentions]  # over heads: (B, L, L) per block
    attention = sum(m[:, :C, C:] for m in mean[-3:]).reshape(2, C, 2, 3)
    cam = torch.relu(net.head(trunk.patch_map()))
    expected = {"fused": attention * cam, "attention": attention, "patch_cam": cam}[fusion]
    if refine:
        patch = sum(m[:, C:, C:] for m in mean)  # every block
        flat = expected.flatten(2)
        refined = torch.einsum("bij,bcj->bci", patch, flat)
        expected = refined.reshape(2, C, 2, 3)
    torch.testing.assert_close(out.maps, expected, rtol=1e-5, atol=1e-6)
    assert (out.maps >= 0).all()


def test_class_tokens_from_a_deit_file_and_the_recipe_config(tmp_path):
    path = tmp_path / "deit_small_patch16_224-cd65a155.pth"
    torch.save({"model": fake_deit(SPEC)}, path)
    cfg = load_config(None, ["method=mctformer", "model.arch=deit_small", "model.width=0.0625",
                             "vit.depth=4", f"model.pretrained={path}"])
    net, report = build_network(cfg, C)
    assert report is not None and report.loaded == 6 + 12 * 4
    state = fake_deit(SPEC)
    for c in range(C):
        torch.testing.assert_close(net.vit.cls_token[0, c], state["cls_token"][0, 0])
    with pytest.raises(ValueError, match="needs 3 class tokens"):
        MCTformer(VisionTransformer(SPEC, prefix=1), C, MCTformerConfig())


def test_vit_section_shapes_the_trunk():
    cfg = load_config(None, ["method=mctformer", "model.arch=deit_small", "model.width=0.0625",
                             "vit.depth=2", "vit.patch_size=8", "vit.image_size=64",
                             "vit.drop_path=0.1"])
    net, _ = build_network(cfg, C)
    spec = net.vit.spec
    assert (spec.dim, spec.depth, spec.patch, spec.grid) == (24, 2, 8, 8)
    assert net.vit.blocks[-1].drop_path.p == pytest.approx(0.1)
    with torch.no_grad():
        out = net.eval()(torch.randn(1, 3, 64, 64))
    assert out.cam.shape == (1, C, 8, 8)
