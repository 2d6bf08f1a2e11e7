import pytest
import torch

from cpal.config import ModelConfig
from cpal.errors import CheckpointError
from cpal.models.cam_net import CAMNet, build_cam_net, normalized_cam
from cpal.models.resnet import ResNet
from cpal.models.weights import load_backbone_weights, read_state_dict
from tests.models.test_weights import torchvision_keys


def test_resnet50_keys_match_torchvision_layout():
    model = ResNet("resnet50")
    expected = torchvision_keys("resnet50", counters=True) - {"fc.weight", "fc.bias"}
    assert set(model.state_dict()) == expected
    assert model.state_dict()["layer4.0.conv2.weight"].shape == (512, 512, 3, 3)
    assert model.num_features == 2048


@pytest.mark.parametrize(
    ("arch", "os_", "channels"),
    [("resnet18", 16, 512), ("resnet34", 8, 512), ("resnet50", 16, 2048), ("resnet101", 16, 2048),
     ("resnet50", 32, 2048)],
)
def test_output_stride_and_channels(arch, os_, channels):
    width = 0.25
    model = ResNet(arch, width=width, output_stride=os_).eval()
    with torch.no_grad():
        feats = model(torch.randn(1, 3, 64, 96))
    assert [f.shape[-2:] for f in feats[:2]] == [(16, 24), (8, 12)]
    assert feats[-1].shape == (1, int(channels * width), 64 // os_, 96 // os_)


def test_frozen_bn_keeps_running_stats_and_affine_trains():
    model = ResNet("resnet18", width=0.25, frozen_bn=True)
    model.train()
    before = model.bn1.running_mean.clone()
    model(torch.randn(2, 3, 32, 32) * 5 + 3)
    assert torch.equal(model.bn1.running_mean, before)
    assert model.bn1.weight.requires_grad


def test_frozen_stages_get_no_gradient():
    model = ResNet("resnet18", width=0.25, frozen_stages=3)
    model.train()
    model(torch.randn(2, 3, 32, 32))[-1].sum().backward()
    assert model.conv1.weight.grad is None
    assert model.layer2[0].conv1.weight.grad is None
    assert model.layer3[0].conv1.weight.grad is not None


def test_cam_logits_are_gap_of_cam():
    net = CAMNet(ResNet("resnet18", width=0.25), num_classes=5).eval()
    out = net(torch.randn(2, 3, 64, 64))
    assert out.cam.shape == (2, 5, 4, 4)
    torch.testing.assert_close(out.logits, out.cam.mean(dim=(2, 3)))  # the same op: equal
    assert net.classifier.bias is None


def test_normalized_cam_range():
    cam = torch.tensor([[[[-1.0, 2.0], [4.0, 0.0]]]])
    expected = torch.tensor([[[[0.0, 0.5], [1.0, 0.0]]]])
    # Divided by (max + 1e-5): off by <= 1e-5 x value (measured 2.5e-6), not by rounding.
    torch.testing.assert_close(normalized_cam(cam), expected, atol=1e-5, rtol=0)


def test_load_torchvision_style_file(tmp_path):
    source = ResNet("resnet50", width=0.25)
    state = {f"module.{k}": v for k, v in source.state_dict().items()}
    state["fc.weight"] = torch.zeros(1000, 512)
    state["fc.bias"] = torch.zeros(1000)
    path = tmp_path / "resnet50-ish.pth"
    torch.save({"state_dict": state}, path)
    target = ResNet("resnet50", width=0.25)
    report = load_backbone_weights(target, path)
    assert report.ignored == ["fc.weight", "fc.bias"]
    assert report.missing == [] and report.unexpected == []
    torch.testing.assert_close(target.layer3[1].conv2.weight, source.layer3[1].conv2.weight)


def test_load_reports_missing_and_unexpected(tmp_path):
    state = ResNet("resnet18", width=0.25).state_dict()
    del state["layer1.0.conv1.weight"]
    state["extra.weight"] = torch.zeros(1)
    path = tmp_path / "w.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"missing 1 \(layer1.0.conv1.weight\).*extra.weight"):
        load_backbone_weights(ResNet("resnet18", width=0.25), path)
    report = load_backbone_weights(ResNet("resnet18", width=0.25), path, strict=False)
    assert report.missing == ["layer1.0.conv1.weight"] and report.unexpected == ["extra.weight"]


def test_shape_mismatch_names_width(tmp_path):
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(ResNet("resnet18", width=0.5).state_dict(), str(path))
    with pytest.raises(CheckpointError, match=r"model\.width"):
        load_backbone_weights(ResNet("resnet18", width=0.25), path)


class Payload:
    """A non-tensor object: loading it would need unpickling arbitrary code."""


def test_pickled_objects_are_refused(tmp_path):
    path = tmp_path / "evil.pth"
    torch.save({"obj": Payload()}, path)
    with pytest.raises(CheckpointError, match=r"evil\.pth"):
        read_state_dict(path)


def test_build_cam_net_from_config(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(ResNet("resnet18", width=0.25).state_dict(), path)
    cfg = ModelConfig(arch="resnet18", width=0.25, pretrained=str(path))
    net, report = build_cam_net(cfg, num_classes=3)
    assert report is not None and report.loaded > 0
    groups = dict((role, params) for params, role in net.param_groups())
    assert set(groups) == {"backbone", "head"}  # no prototype branch in a plain CAM net
    assert len(groups["head"]) == 1 and len(groups["backbone"]) > 10
