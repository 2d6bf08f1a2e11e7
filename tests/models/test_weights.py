"""ImageNet weight files in every layout cpal accepts (and the ones it must refuse).

The files are fakes with random tensors of the real shapes: each layout is derived from
our own model's state dict by renaming/dropping keys as torchvision and timm do, and the
key sets are checked against torchvision's structure written out independently.
"""

import warnings
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from cpal.errors import CheckpointError
from cpal.models.resnet import ResNet
from cpal.models.weights import (
    leak_reasons,
    load_backbone_weights,
    read_state_dict,
    read_weight_file,
)
from tests.helpers import tiny_overrides

WIDTH = 0.125  # real key sets, small tensors
DEPTHS = {"resnet50": (3, 4, 6, 3), "resnet101": (3, 4, 23, 3)}
BN = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def torchvision_keys(arch: str, *, counters: bool) -> set[str]:
    """torchvision's resnet50/101 state-dict keys, written out from its structure."""
    bn = BN if counters else BN[:4]
    keys = {"conv1.weight", "fc.weight", "fc.bias"} | {f"bn1.{k}" for k in bn}
    for layer, depth in enumerate(DEPTHS[arch], start=1):
        for b in range(depth):
            p = f"layer{layer}.{b}"
            for i in (1, 2, 3):
                keys.add(f"{p}.conv{i}.weight")
                keys |= {f"{p}.bn{i}.{k}" for k in bn}
            if b == 0:
                keys.add(f"{p}.downsample.0.weight")
                keys |= {f"{p}.downsample.1.{k}" for k in bn}
    return keys


def fake_torchvision(arch: str, *, counters: bool, seed: int = 0) -> OrderedDict:
    """Random tensors in torchvision's layout: v1 files (2017) lack the BN step counters."""
    gen = torch.Generator().manual_seed(seed)
    model = ResNet(arch, width=WIDTH)
    state = OrderedDict()
    for key, value in model.state_dict().items():
        if key.endswith("num_batches_tracked"):
            if counters:
                state[key] = torch.tensor(5004 + seed)
            continue
        state[key] = torch.rand(value.shape, generator=gen) + 0.5  # positive: valid variances
    state["fc.weight"] = torch.randn(1000, model.num_features, generator=gen)
    state["fc.bias"] = torch.randn(1000, generator=gen)
    return state


def fake_timm_deep_stem(arch: str = "resnet50") -> OrderedDict:
    """timm's resnet50d: a 3-conv stem (conv1.0/1/3/4/6) and avg-pool downsamples."""
    state = OrderedDict()
    stem = max(1, round(64 * WIDTH))
    half = stem // 2
    convs = (("conv1.0", (half, 3, 3, 3)), ("conv1.3", (half, half, 3, 3)),
             ("conv1.6", (stem, half, 3, 3)))
    for name, shape in convs:
        state[f"{name}.weight"] = torch.randn(shape)
    for name, ch in (("conv1.1", stem // 2), ("conv1.4", stem // 2)):
        state.update({f"{name}.{k}": torch.ones(ch) for k in BN[:4]})
    for key, value in fake_torchvision(arch, counters=False).items():
        if key == "conv1.weight":
            continue
        if ".downsample.1." in key:
            key = key.replace(".downsample.1.", ".downsample.2.")
        elif ".downsample.0." in key:
            key = key.replace(".downsample.0.", ".downsample.1.")
        state[key] = value
    return state


def assert_loaded(model: ResNet, state: dict) -> None:
    own = model.state_dict()
    for key, value in state.items():
        if not key.startswith("fc."):
            torch.testing.assert_close(own[key], value, rtol=0, atol=0, msg=key)  # copies: exact


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_torchvision_v1_file_without_step_counters(tmp_path, arch):
    state = fake_torchvision(arch, counters=False)
    assert set(state) == torchvision_keys(arch, counters=False)
    path = tmp_path / f"{arch}-19c8e357.pth"
    torch.save(state, path, _use_new_zipfile_serialization=False)  # the 2017 file format
    model = ResNet(arch, width=WIDTH, frozen_bn=True, frozen_stages=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean ImageNet file raises no warning at all
        report = load_backbone_weights(model, path)
    assert_loaded(model, state)
    assert report.missing == [] and report.unexpected == [] and report.leaks == []
    assert sorted(report.ignored) == ["fc.bias", "fc.weight"]
    assert report.loaded == len(state) - 2
    assert int(model.bn1.num_batches_tracked) == 0  # absent from the file: left as built


def test_pre_0_4_tensor_pickles_load_with_weights_only(tmp_path, monkeypatch):
    """resnet50-19c8e357.pth was written by PyTorch 0.2: tensors pickled through
    torch._utils._rebuild_tensor (not _v2) with legacy typed storages. Emulated here."""

    def reduce_like_pytorch_0_3(tensor, protocol):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # TypedStorage is deprecated
            storage = tensor.storage()
        args = (storage, tensor.storage_offset(), tuple(tensor.size()), tensor.stride())
        return torch._utils._rebuild_tensor, args

    state = fake_torchvision("resnet50", counters=False, seed=3)
    path = tmp_path / "resnet50-19c8e357.pth"
    with monkeypatch.context() as patch:
        patch.setattr(torch.Tensor, "__reduce_ex__", reduce_like_pytorch_0_3)
        torch.save(state, path, _use_new_zipfile_serialization=False)
    raw = path.read_bytes()
    assert b"_rebuild_tensor\n" in raw and b"_rebuild_tensor_v2" not in raw
    model = ResNet("resnet50", width=WIDTH)
    report = load_backbone_weights(model, path)
    assert_loaded(model, state)
    assert report.loaded == len(state) - 2 and report.leaks == []


@pytest.mark.parametrize("arch", ["resnet50", "resnet101"])
def test_torchvision_v2_file_with_step_counters(tmp_path, arch):
    state = fake_torchvision(arch, counters=True, seed=1)
    assert set(state) == torchvision_keys(arch, counters=True)
    path = tmp_path / f"{arch}-11ad3fa6.pth"
    torch.save(state, path)
    model = ResNet(arch, width=WIDTH)
    report = load_backbone_weights(model, path)
    assert_loaded(model, state)
    assert int(model.layer3[5].bn2.num_batches_tracked) == 5005
    assert report.loaded == len(state) - 2


@pytest.mark.parametrize("counters", [True, False])
def test_timm_hub_files_bin_and_safetensors(tmp_path, counters):
    state = fake_torchvision("resnet50", counters=counters, seed=2)
    snapshot = tmp_path / "models--timm--resnet50.a1_in1k" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    torch.save(state, snapshot / "pytorch_model.bin")
    save_file(dict(state), str(snapshot / "model.safetensors"), metadata={"format": "pt"})
    for name in ("pytorch_model.bin", "model.safetensors"):
        model = ResNet("resnet50", width=WIDTH)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            report = load_backbone_weights(model, snapshot / name)
        assert_loaded(model, state)
        assert report.leaks == [] and report.loaded == len(state) - 2


def test_training_wrappers_and_prefixes_are_unwrapped(tmp_path):
    state = fake_torchvision("resnet50", counters=True)
    wrapped = {"net": {f"module.{k}": v for k, v in state.items()}, "epoch": 5}
    path = tmp_path / "resnet50-wrapped.pth"
    torch.save(wrapped, path)
    loaded = read_weight_file(path)
    assert set(loaded.tensors) == set(state) and loaded.metadata == {"epoch": 5}
    model = ResNet("resnet50", width=WIDTH)
    load_backbone_weights(model, path)
    assert_loaded(model, state)


def test_timm_deep_stem_fails_with_clear_mismatch(tmp_path):
    path = tmp_path / "resnet50d_ra2-464e36ba.pth"
    torch.save(fake_timm_deep_stem(), path)
    model = ResNet("resnet50", width=WIDTH)
    before = model.layer1[0].conv1.weight.clone()
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(model, path)
    message = str(info.value)
    assert "\n" not in message and len(message) < 900
    assert message.startswith(f"{path}: keys do not match the resnet50 model")
    assert "missing" in message and "conv1.weight" in message
    assert "unexpected" in message and "conv1.0.weight" in message
    assert "deep stem" in message
    assert torch.equal(model.layer1[0].conv1.weight, before)  # nothing half-loaded


def test_mismatch_message_is_one_grouped_truncated_line(tmp_path):
    path = tmp_path / "resnet101-63fe2227.pth"
    torch.save(fake_torchvision("resnet101", counters=True), path)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(ResNet("resnet50", width=WIDTH), path)
    message = str(info.value)
    # 17 extra layer3 blocks x (3 convs + 3 BNs x 5) = 306 unexpected keys, shown in short
    assert "unexpected 306 (layer3.6.conv1.weight, layer3.6.bn1.{weight,bias," in message
    assert "more)" in message and "\n" not in message and len(message) < 700
    assert "missing none" in message
    assert message.endswith("check model.arch (resnet50 vs resnet101)")


def test_foreign_prefix_is_named(tmp_path):
    state = {f"Scale.{k}": v for k, v in fake_torchvision("resnet50", counters=False).items()}
    path = tmp_path / "resnet50-caffe.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"carry a 'Scale\.' prefix"):
        load_backbone_weights(ResNet("resnet50", width=WIDTH), path)


def test_shape_mismatch_names_key_and_both_shapes(tmp_path):
    state = fake_torchvision("resnet50", counters=True)
    state["layer2.0.conv2.weight"] = torch.zeros(16, 16, 5, 5)
    path = tmp_path / "resnet50-11ad3fa6.pth"
    torch.save(state, path)
    own = tuple(ResNet("resnet50", width=WIDTH).layer2[0].conv2.weight.shape)
    with pytest.raises(CheckpointError) as info:
        load_backbone_weights(ResNet("resnet50", width=WIDTH), path)
    assert str(info.value) == (
        f"{path}: shape mismatch for 1 tensors: layer2.0.conv2.weight file (16, 16, 5, 5) "
        f"vs model {own} - check model.arch (resnet50) and model.width"
    )


class Payload:
    """A non-tensor object: reading it back would need unpickling arbitrary code."""


@pytest.mark.parametrize(
    "content",
    [{"conv1.weight": Payload()}, {"state_dict": {"conv1.weight": torch.zeros(1)}, "x": Payload()}],
)
def test_non_tensor_pickles_are_refused(tmp_path, content):
    path = tmp_path / "resnet50-evil.pth"
    torch.save(content, path)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: refused, the file holds pickled Python objects")
    assert "Payload" in message and "\n" not in message


def test_non_tensor_entries_and_unreadable_files_are_named(tmp_path):
    entry = tmp_path / "entry.pth"
    torch.save({"conv1.weight": torch.zeros(1), "note": "hello"}, entry)
    with pytest.raises(CheckpointError, match=r"entry.pth: entry 'note' is a str, not a tensor"):
        read_state_dict(entry)
    empty = tmp_path / "empty.pth"
    empty.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty.pth: cannot read weights"):
        read_state_dict(empty)
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match=r"garbage.safetensors: cannot read weights"):
        read_state_dict(garbage)
    with pytest.raises(CheckpointError, match=r"nothere.pth: weight file not found"):
        read_state_dict(tmp_path / "nothere.pth")


# ---------------------------------------------------------------------------------------
# Pixel-label leaks


def _save_clean_trunk(path: Path, **extra) -> dict:
    state = fake_torchvision("resnet50", counters=True)
    torch.save({"state_dict": state, **extra} if extra else state, path)
    return state


def test_coco_deeplab_init_warns_once_but_loads(tmp_path, capsys):
    path = tmp_path / "MS_DeepLab_resnet_pretrained_COCO_init.pth"
    state = _save_clean_trunk(path)
    model = ResNet("resnet50", width=WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one line on stderr, not also a Python warning
        report = load_backbone_weights(model, path)
    assert report.leaks == [f"its name '{path.name}' contains 'deeplab', 'coco'"]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"cpal: warning: {path}: possible pixel-label")
    assert "POSSIBLE PIXEL-LABEL LEAK" in report.summary()
    assert_loaded(model, state)


def test_segmentation_head_in_keys_is_a_leak_and_a_mismatch(tmp_path, capsys):
    # torchvision's deeplabv3_resnet50: backbone.* (stripped), classifier.*, aux_classifier.*
    state = {f"backbone.{k}": v for k, v in fake_torchvision("resnet50", counters=True).items()
             if not k.startswith("fc.")}
    state["classifier.0.convs.0.0.weight"] = torch.zeros(8, 256, 1, 1)
    state["aux_classifier.4.weight"] = torch.zeros(21, 8, 1, 1)
    path = tmp_path / "r50_init.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointError, match=r"unexpected 2 .*segmentation head"):
        load_backbone_weights(ResNet("resnet50", width=WIDTH), path)
    err = capsys.readouterr().err
    assert "possible pixel-label leak" in err
    assert ("dense-prediction head (classifier.* (1 tensors), aux_classifier.* (1 tensors))"
            in err)


@pytest.mark.parametrize(
    ("saver", "expected"),
    [
        ("torch", "its metadata has dataset='VOC2012 + SBD'"),
        ("safetensors", "its metadata has training_data='coco_2017_train'"),
    ],
)
def test_stored_dataset_metadata_is_a_leak(tmp_path, capsys, saver, expected):
    if saver == "torch":
        path = tmp_path / "resnet50-finetuned.pth"
        _save_clean_trunk(path, dataset="VOC2012 + SBD", epoch=30)
    else:
        path = tmp_path / "resnet50-finetuned.safetensors"
        state = fake_torchvision("resnet50", counters=True)
        save_file(dict(state), str(path), metadata={"format": "pt",
                                                    "training_data": "coco_2017_train"})
    report = load_backbone_weights(ResNet("resnet50", width=WIDTH), path)
    assert report.leaks == [expected]
    assert capsys.readouterr().err.startswith(f"cpal: warning: {path}: possible pixel-label")


def test_folder_names_count_only_for_generic_file_names(tmp_path):
    weights = read_weight_file(_make(tmp_path / "voc_runs" / "resnet50-19c8e357.pth"))
    assert leak_reasons(tmp_path / "voc_runs" / "resnet50-19c8e357.pth", weights) == []
    snapshot = "0a1b2c3d4e5f60718293a4b5c6d7e8f901234567"  # 40 hex digits, as hubs name them
    hub = tmp_path / "models--someone--deeplabv3_r50_coco" / "snapshots" / snapshot / "model.pth"
    reasons = leak_reasons(_make(hub), weights)
    assert reasons == ["its name 'models--someone--deeplabv3_r50_coco' contains 'deeplab', 'coco'"]
    sipe = tmp_path / "exp_voc" / "ckpt" / "final.pth"
    assert leak_reasons(_make(sipe), weights) == ["its name 'exp_voc' contains 'voc'"]


def _make(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _save_clean_trunk(path)
    return path


@pytest.mark.parametrize(
    "where",
    [
        "data/voc/weights/resnet50-19c8e357.pth",  # stored in a dataset folder: not a sign
        "resnet50-3ade0f12.pth",  # 'ade' spelt by a hash, not ADE20K
        "models--timm--resnet50.a1_in1k/snapshots/9ade1f0c2b3d4e5f60718293a4b5c6d7e8f90123/"
        "model.safetensors",  # a hub snapshot whose hash holds 'ade'
        "voc_segmentation_project/pretrained/timm_resnet50/model.safetensors",  # a named folder
        "segment_experiments/resnet101-63fe2227.pth",
    ],
)
def test_clean_imagenet_files_do_not_warn_wherever_they_are(tmp_path, where):
    path = tmp_path / where
    path.parent.mkdir(parents=True, exist_ok=True)
    state = fake_torchvision("resnet50", counters=True)
    if path.suffix == ".safetensors":
        save_file(dict(state), str(path), metadata={"format": "pt"})
    else:
        torch.save({"state_dict": state, "git_commit": "3ade4f9e0c1b"}, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert leak_reasons(path, read_weight_file(path)) == []


@pytest.mark.parametrize(
    ("name", "words"),
    [
        ("deeplabv3_resnet50_coco-cd0a2569.pth", "'deeplab', 'coco'"),  # torchvision's
        ("resnet101_ade20k_upernet.pth", "'ade'"),
        ("r50_voc12aug_seg.pth", "'voc', 'seg'"),
    ],
)
def test_segmentation_file_names_are_still_leaks(tmp_path, name, words):
    path = _make(tmp_path / "weights" / name)
    assert leak_reasons(path, read_weight_file(path)) == [f"its name '{name}' contains {words}"]


def test_dense_head_behind_a_foreign_prefix_is_found(tmp_path):
    # Caffe-converted DeepLab-v2 (MS_DeepLab_resnet_pretrained_COCO_init.pth) keys its
    # ASPP classifier Scale.layer5.conv2d_list.*, renamed here so only the keys can tell.
    state = {f"Scale.{k}": v for k, v in fake_torchvision("resnet50", counters=False).items()}
    state["Scale.layer5.conv2d_list.0.weight"] = torch.zeros(21, 8, 3, 3)
    path = tmp_path / "init.pth"
    torch.save(state, path)
    assert leak_reasons(path, read_weight_file(path)) == [
        "it holds a dense-prediction head (layer5.* (1 tensors)) that ImageNet classifiers lack"
    ]


def test_allowed_leak_prints_a_note_without_warning(tmp_path, capsys):
    path = tmp_path / "resnet50_coco_seg.pth"
    state = _save_clean_trunk(path)
    model = ResNet("resnet50", width=WIDTH)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        report = load_backbone_weights(model, path, allow_leak=True)
    assert report.leaks == [f"its name '{path.name}' contains 'coco', 'seg'"]
    err = capsys.readouterr().err
    assert err.startswith(f"cpal: note: {path}: possible pixel-label leak") and "allowed" in err
    assert_loaded(model, state)


def test_a_cpal_training_checkpoint_initialises_the_trunk_only(tmp_path, capsys):
    # E.g. a classification run on other data as the init of an ablation (README): the
    # CAM classifier and prototype head are dropped, and are not mistaken for a dense head.
    from cpal.config import load_config
    from cpal.engine.checkpoint import save_checkpoint
    from cpal.models.cam_net import build_network

    cfg = load_config(None, ["method=sipe", "model.arch=resnet18", f"model.width={WIDTH}"])
    torch.manual_seed(0)
    trained, _ = build_network(cfg, 4)
    optimizer = torch.optim.SGD(trained.parameters(), lr=0.1, momentum=0.9)
    trained(torch.randn(2, 3, 64, 64)).logits.sum().backward()
    optimizer.step()  # momentum buffers: `optim.*` tensors in the file
    json_path = save_checkpoint(tmp_path / "run" / "checkpoints", epoch=1, step=1,
                                model=trained, optimizer=optimizer, meta={})
    fresh = ResNet("resnet18", width=WIDTH)
    report = load_backbone_weights(fresh, json_path.with_suffix(".safetensors"))
    assert report.loaded == len(fresh.state_dict()) and not report.leaks
    assert "possible pixel-label leak" not in capsys.readouterr().err
    for key, value in fresh.state_dict().items():
        # Loading copies tensors: exact, no arithmetic.
        torch.testing.assert_close(value, trained.backbone.state_dict()[key], rtol=0, atol=0)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"conv1.weight 0.1 0.2\nfc.bias 0.0\n", "a text file ('conv1.weight 0.1 0.2'...)"),
        (b"# my notes about resnet50\n", "a text file ("),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 9\n",
         "a Git LFS pointer, not the weights"),
        (b"\x80\x02}q\x00.", "cannot read weights (Invalid magic number"),
    ],
)
def test_a_text_file_as_pretrained_never_suggests_weights_only_false(tmp_path, capsys,
                                                                     tiny_dataset, content,
                                                                     expected):
    """torch.load on a text file raises a KeyError or a page recommending
    weights_only=False (which would run code from the file): cpal names what the file is."""
    from cpal.cli import main

    path = tmp_path / "resnet50.pth"
    path.write_bytes(content)
    with pytest.raises(CheckpointError) as info:
        read_state_dict(path)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and expected in message, message
    assert "weights_only" not in message and "\n" not in message
    config = tmp_path / "c.yaml"
    config.write_text("{}\n")
    assert main(["train", str(config), *tiny_overrides(tiny_dataset, tmp_path / "run"),
                 f"model.pretrained={path}", "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"cpal: error: {path}: ") and "weights_only" not in err
    assert "\n" not in err
