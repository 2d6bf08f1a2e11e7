"""DeepLab-v2 / v3+ shapes, MSC, optimiser groups and trunk weights (tiny widths)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpal.errors import CheckpointError
from cpal.models.deeplab_v2 import DeepLabV2, SummedASPP
from cpal.models.deeplab_v3plus import DeepLabV3Plus
from cpal.models.resnet import ResNet
from cpal.models.seg_base import msc_logits
from cpal.models.segmenter import build_segmenter, canonical_name, sgd_param_groups
from tests.models.test_weights import WIDTH, assert_loaded, fake_torchvision


def _dilations(layer: nn.Sequential) -> list[int]:
    return [block.conv2.dilation[0] for block in layer]


# ---------------------------------------------------------------------------------------
# Trunk options


def test_resnet_default_dilations_are_unchanged():
    os8 = ResNet("resnet50", width=WIDTH, output_stride=8)
    os16 = ResNet("resnet50", width=WIDTH, output_stride=16)
    assert _dilations(os8.layer3) == [2] * 6 and _dilations(os8.layer4) == [2] * 3
    assert _dilations(os16.layer3) == [1] * 6 and _dilations(os16.layer4) == [1] * 3
    assert os8.stage_strides == (4, 8, 8, 8) and os16.stage_strides == (4, 8, 16, 16)
    assert ResNet("resnet50", output_stride=32, width=WIDTH).stage_strides == (4, 8, 16, 32)


def test_resnet_dilations_and_multi_grid_keep_the_keys():
    plain = ResNet("resnet50", width=WIDTH, output_stride=16)
    grid = ResNet("resnet50", width=WIDTH, output_stride=16, dilations=(1, 2),
                  multi_grid=(1, 2, 4))
    assert _dilations(grid.layer4) == [2, 4, 8]
    assert grid.layer4[1].conv2.padding == (4, 4)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in grid.state_dict().items()}
    with pytest.raises(ValueError, match="multi_grid needs 2 positive factors"):
        ResNet("resnet18", multi_grid=(1, 2, 4))
    with pytest.raises(ValueError, match="dilations"):
        ResNet("resnet18", dilations=(0, 2))


# ---------------------------------------------------------------------------------------
# DeepLab-v2


@pytest.fixture(scope="module")
def v2() -> DeepLabV2:
    torch.manual_seed(0)
    return DeepLabV2(5, arch="resnet101", width=WIDTH)


def test_deeplab_v2_is_os8_with_dilations_2_and_4(v2):
    trunk = v2.backbone
    assert trunk.layer2[0].conv2.stride == (2, 2)
    assert all(b.conv2.stride == (1, 1) for b in [*trunk.layer3, *trunk.layer4])
    assert _dilations(trunk.layer3) == [2] * 23 and _dilations(trunk.layer4) == [4] * 3
    assert v2.logit_stride == 8
    v2.eval()
    with torch.no_grad():
        feats = trunk(torch.randn(1, 3, 64, 80))
        logits = v2.forward_logits(torch.randn(1, 3, 64, 80))
    assert feats[-1].shape == (1, int(2048 * WIDTH), 8, 10)
    assert logits.shape == (1, 5, 8, 10)
    os16 = DeepLabV2(3, arch="resnet18", width=WIDTH, output_stride=16, msc_scales=(1.0,))
    assert os16.eval()(torch.randn(1, 3, 64, 64)).shape == (1, 3, 4, 4)
    assert _dilations(os16.backbone.layer4) == [2, 2]


def test_aspp_has_four_biased_branches_that_are_summed():
    torch.manual_seed(1)
    aspp = SummedASPP(16, 3, (6, 12, 18, 24))
    assert [b.dilation[0] for b in aspp.branches] == [6, 12, 18, 24]
    assert [b.padding[0] for b in aspp.branches] == [6, 12, 18, 24]
    assert all(b.bias is not None and b.out_channels == 3 for b in aspp.branches)
    for b in aspp.branches:
        nn.init.normal_(b.bias)  # non-zero biases: each must be counted once
    x = torch.randn(2, 16, 9, 11)
    expected = sum(
        F.conv2d(x, b.weight, b.bias, padding=r, dilation=r)
        for b, r in zip(aspp.branches, (6, 12, 18, 24), strict=True)
    )
    out = aspp(x)
    assert out.shape == (2, 3, 9, 11)
    torch.testing.assert_close(out, expected)


def test_msc_returns_each_scale_and_their_max(v2):
    v2.train()
    x = torch.randn(2, 3, 65, 65)
    outs = v2(x, return_all=True)
    # 65 -> 9 logits; 0.75: 48 px -> 6; 0.5: 32 px -> 4; the max at scale 1's size
    assert [tuple(o.shape) for o in outs] == [(2, 5, 9, 9), (2, 5, 6, 6), (2, 5, 4, 4),
                                              (2, 5, 9, 9)]
    up = [F.interpolate(o, size=(9, 9), mode="bilinear", align_corners=False) for o in outs[1:3]]
    torch.testing.assert_close(outs[3], torch.maximum(torch.maximum(outs[0], up[0]), up[1]))
    with torch.no_grad():  # scale 0.5 sees the image resized as deeplab-pytorch's MSC does
        small = v2.forward_logits(F.interpolate(x, scale_factor=0.5, mode="bilinear",
                                                align_corners=False))
    torch.testing.assert_close(outs[2], small)
    v2.eval()
    with torch.no_grad():
        torch.testing.assert_close(v2(x), v2(x, return_all=True)[-1])


def test_one_scale_msc_is_the_logits_alone():
    calls = []

    def net(x):
        calls.append(x.shape[-1])
        return x[:, :2]

    x = torch.randn(1, 3, 8, 8)
    out = msc_logits(net, x, (1.0,))
    assert len(out) == 1 and calls == [8]
    torch.testing.assert_close(out[0], x[:, :2])


def test_deeplab_v2_param_groups_follow_deeplab_pytorch(v2):
    groups = sgd_param_groups(v2, 2.5e-4, 5e-4)
    by_name = {g["name"]: g for g in groups}
    assert list(by_name) == ["trunk", "aspp_weight", "aspp_bias"]
    assert (by_name["trunk"]["lr"], by_name["trunk"]["weight_decay"]) == (2.5e-4, 5e-4)
    assert by_name["aspp_weight"]["lr"] == pytest.approx(2.5e-3)
    assert by_name["aspp_weight"]["weight_decay"] == 5e-4
    assert by_name["aspp_bias"]["lr"] == pytest.approx(5e-3)
    assert by_name["aspp_bias"]["weight_decay"] == 0.0
    assert all(g["base_lr"] == g["lr"] for g in groups)  # the trainer's poly schedule key
    assert {id(p) for p in by_name["aspp_bias"]["params"]} == {
        id(b.bias) for b in v2.aspp.branches}
    # fixed BatchNorm (statistics and affine) is in no group; every other parameter is
    listed = {id(p) for g in groups for p in g["params"]}
    bn = [p for m in v2.modules() if isinstance(m, nn.BatchNorm2d) for p in m.parameters()]
    assert bn and not any(p.requires_grad or id(p) in listed for p in bn)
    assert listed == {id(p) for p in v2.parameters() if p.requires_grad}
    optimizer = torch.optim.SGD(groups, lr=2.5e-4, momentum=0.9)
    assert [g["lr"] for g in optimizer.param_groups] == [g["lr"] for g in groups]


def test_trainable_bn_goes_to_a_group_without_weight_decay():
    net = DeepLabV2(3, arch="resnet18", width=WIDTH, frozen_bn=False)
    by_name = {g["name"]: g for g in sgd_param_groups(net, 0.1, 1e-4)}
    assert by_name["trunk_norm"]["weight_decay"] == 0.0 and by_name["trunk_norm"]["lr"] == 0.1
    assert len(by_name["trunk_norm"]["params"]) == 2 * sum(
        isinstance(m, nn.BatchNorm2d) for m in net.backbone.modules())


# ---------------------------------------------------------------------------------------
# DeepLab-v3+


def test_deeplab_v3plus_shapes_os16_and_os8():
    torch.manual_seed(0)
    net = DeepLabV3Plus(4, arch="resnet50", width=WIDTH, aspp_channels=16,
                        low_level_channels=8)
    trunk = net.backbone
    assert trunk.output_stride == 16 and _dilations(trunk.layer4) == [2, 4, 8]
    assert [b[0].dilation[0] for b in net.aspp.branches[1:4]] == [6, 12, 18]
    assert len(net.aspp.branches) == 5  # 1x1, three atrous, image pooling
    assert net.aspp.project[0].in_channels == 5 * 16
    assert net.reduce[0].in_channels == trunk.stage_channels[0]
    assert net.decoder[0][0].in_channels == 16 + 8 and net.decoder[0][0].kernel_size == (3, 3)
    assert net.decoder[1][0].kernel_size == (3, 3) and net.decoder[2].out_channels == 4
    net.train()
    outs = net(torch.randn(2, 3, 64, 48), return_all=True)
    assert len(outs) == 1 and outs[0].shape == (2, 4, 16, 12) and net.logit_stride == 4
    os8 = DeepLabV3Plus(4, arch="resnet101", width=WIDTH, output_stride=8)
    assert [b[0].dilation[0] for b in os8.aspp.branches[1:4]] == [12, 24, 36]
    assert _dilations(os8.backbone.layer3) == [2] * 23
    assert _dilations(os8.backbone.layer4) == [4, 8, 16]
    assert net.aspp.branches[0][0].out_channels == 16
    assert os8.aspp.branches[0][0].out_channels == 32  # 256 x width by default
    assert os8.eval()(torch.randn(1, 3, 32, 32)).shape == (1, 4, 8, 8)


def test_deeplab_v3plus_param_groups():
    net = DeepLabV3Plus(4, arch="resnet50", width=WIDTH)
    by_name = {g["name"]: g for g in sgd_param_groups(net, 0.01, 1e-4)}
    assert list(by_name) == ["trunk", "trunk_norm", "head_weight", "head_norm_bias"]
    assert by_name["head_weight"]["lr"] == pytest.approx(0.1)
    assert by_name["head_norm_bias"]["weight_decay"] == 0.0
    assert all(p.ndim == 1 for p in by_name["head_norm_bias"]["params"])
    listed = [id(p) for g in by_name.values() for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in net.parameters())


def test_build_segmenter_by_name():
    assert canonical_name("DeepLab-v3+") == "deeplab_v3plus"
    assert canonical_name("deeplabv2") == "deeplab_v2"
    net, report = build_segmenter("deeplab_v2", 21, arch="resnet18", width=WIDTH)
    assert isinstance(net, DeepLabV2) and report is None and net.aspp.branches[0].out_channels == 21
    with pytest.raises(ValueError, match="unknown segmentation network 'pspnet'"):
        build_segmenter("pspnet", 21)
    with pytest.raises(ValueError, match=r"DeepLabV2: .*multi_grid"):
        build_segmenter("deeplab_v2", 21, multi_grid=(1, 2, 4))
    with pytest.raises(TypeError, match="expected a segmentation network"):
        sgd_param_groups(nn.Linear(2, 2), 0.1, 0.0)


# ---------------------------------------------------------------------------------------
# Trunk weights


def test_imagenet_torchvision_file_loads_into_the_deeplab_trunk(tmp_path):
    state = fake_torchvision("resnet101", counters=False, seed=4)
    path = tmp_path / "resnet101-5d3b4d8f.pth"
    torch.save(state, path)
    net = DeepLabV2(21, arch="resnet101", width=WIDTH)
    head = net.aspp.branches[2].weight.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean ImageNet file: no warning at all
        _, report = build_segmenter("deeplab_v2", 21, arch="resnet101", width=WIDTH,
                                    pretrained=path)
        net.load_trunk(path)
    assert report is not None and report.leaks == [] and report.loaded == len(state) - 2
    assert_loaded(net.backbone, state)
    torch.testing.assert_close(net.aspp.branches[2].weight, head)  # the head stays as built


def _deeplab_pytorch_state(prefix: str = "", head: str = "fc") -> dict[str, torch.Tensor]:
    """deeplab-pytorch's key layout (libs/models/resnet.py, convert.py): the Caffe ResNet-101
    as layer1 (stem: conv1.conv/conv1.bn), layer2..layer5 of blockN with reduce / conv3x3 /
    increase / shortcut, each .conv + .bn; `fc` for the COCO DeepLab-v1 init, `aspp.cN`
    (behind MSC's `base.`) for a trained DeepLab-v2. Tensors are small: keys matter here."""
    bn = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")
    keys = ["layer1.conv1.conv.weight"] + [f"layer1.conv1.bn.{k}" for k in bn]
    for layer, depth in enumerate((3, 4, 23, 3), start=2):
        for b in range(1, depth + 1):
            units = ["reduce", "conv3x3", "increase"] + (["shortcut"] if b == 1 else [])
            for unit in units:
                keys.append(f"layer{layer}.block{b}.{unit}.conv.weight")
                keys += [f"layer{layer}.block{b}.{unit}.bn.{k}" for k in bn]
    keys += ["fc.weight", "fc.bias"] if head == "fc" else [
        f"aspp.c{i}.{k}" for i in range(4) for k in ("weight", "bias")]
    return {prefix + k: torch.zeros(1 if k.endswith("tracked") else 2) for k in keys}


@pytest.mark.parametrize(
    ("name", "prefix", "head", "reason"),
    [
        ("deeplabv1_resnet101-coco.pth", "", "fc", "contains 'deeplab', 'coco'"),
        ("init.pth", "", "fc", "dense-prediction head (layer5.*"),  # renamed: keys tell
        ("checkpoint_final.pth", "base.", "aspp", "dense-prediction head (layer5.*"),
    ],
)
def test_deeplab_pytorch_files_warn_of_a_leak(tmp_path, capsys, name, prefix, head, reason):
    path = tmp_path / "run1" / name  # pytest's folder is named after the test: "deeplab"
    path.parent.mkdir()
    torch.save(_deeplab_pytorch_state(prefix, head), path)
    net = DeepLabV2(21, arch="resnet101", width=WIDTH)
    before = net.backbone.conv1.weight.clone()
    with pytest.raises(CheckpointError, match="keys do not match the resnet101 model"):
        net.load_trunk(path)
    (message,) = [line for line in capsys.readouterr().err.splitlines()
                  if line.startswith("cpal: warning: ")]
    assert reason in message and "possible pixel-label leak" in message
    if head == "aspp":
        assert "aspp.* (8 tensors)" in message
    assert torch.equal(net.backbone.conv1.weight, before)  # nothing half-loaded


def test_acknowledged_leak_still_prints_a_note(tmp_path, capsys):
    state = fake_torchvision("resnet101", counters=True)
    path = tmp_path / "deeplabv1_resnet101-coco.pth"
    torch.save(state, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, report = build_segmenter("deeplab_v2", 21, arch="resnet101", width=WIDTH,
                                    pretrained=path, allow_leak=True)
    assert report is not None and report.leaks
    assert "cpal: note:" in capsys.readouterr().err
