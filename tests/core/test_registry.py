"""Registries: names, aliases, "did you mean", and what is registered in each."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpal.config import load_config
from cpal.errors import ConfigError
from cpal.methods import METHODS, MethodSpec, PrototypeBranch, ablation_ladder, method_spec
from cpal.models.cam_net import build_network
from cpal.models.registry import BACKBONES, NETWORKS, SEGMENTERS, build_backbone
from cpal.refine import REFINERS
from cpal.registry import Registry, UnknownNameError


def test_a_registry_names_the_close_entry_and_all_of_them():
    colours: Registry[int] = Registry("colour", normalize=str.lower)
    colours.register("red", 1, aliases=("crimson",))
    colours.register("green", 2)
    assert colours.get("RED") == colours["crimson"] == 1
    assert colours.names() == ("red", "green") and "Green" in colours and len(colours) == 2
    with pytest.raises(UnknownNameError, match=r"^unknown colour 'gren' \(did you mean "
                                               r"'green'\?\); choose one of red, green$"):
        colours.get("gren")
    with pytest.raises(ConfigError, match=r"^'paint\.colour': unknown colour 'blue'; choose"):
        colours.check("blue", "paint.colour")
    with pytest.raises(ValueError, match="registered twice"):
        colours.register("crimson", 3)


def test_methods_declare_what_the_pipeline_asks():
    assert ablation_ladder() == ("cam", "sipe", "cpal-mean", "cpal-topk", "cpal")
    cam, sipe, full = method_spec("cam"), method_spec("sipe"), method_spec("cpal")
    assert not cam.has_prototypes and cam.maps == ("cam",) and cam.default_map == "cam"
    assert sipe.branch == PrototypeBranch() and sipe.default_map == "pacam"
    assert full.branch == PrototypeBranch(bank=True, selection=True, alignment=True)
    assert METHODS.get("cpal-topk").branch == PrototypeBranch(bank=True, selection=True)
    assert load_config(None, ["method=sipe"]).map_kind == "pacam"


def test_a_method_spec_that_cannot_work_is_refused():
    with pytest.raises(ValueError, match="prototype maps need a prototype branch"):
        MethodSpec("x", "CAM only, yet PACAM", maps=("cam", "pacam"))
    with pytest.raises(ValueError, match="hold the default"):
        MethodSpec("y", "", PrototypeBranch(), default_map="fused", maps=("cam",))
    with pytest.raises(ValueError, match="read the support bank"):
        PrototypeBranch(selection=True)


@pytest.mark.parametrize("method", METHODS.names())
def test_every_method_builds_its_network(method):
    arch = NETWORKS.get(method_spec(method).network).archs().names()[0]
    cfg = load_config(None, [f"method={method}", f"model.arch={arch}", "model.width=0.125",
                             "vit.depth=2"])
    net, _ = build_network(cfg, 3, class_names=["a", "b", "c"])
    branch = method_spec(method).branch
    assert (net.cpal is None) == (branch is None)
    if net.cpal is not None:
        assert (net.cpal.bank is not None) == branch.bank


@pytest.mark.parametrize("arch", BACKBONES.names())
def test_every_backbone_builds(arch):
    trunk = build_backbone(arch, width=0.125, output_stride=16)
    outputs = trunk(torch.zeros(1, 3, 32, 32))
    assert [o.shape[1] for o in outputs] == list(trunk.stage_channels)


def test_segmenters_accept_their_spellings():
    assert SEGMENTERS.canonical("DeepLab-v3+") == "deeplab_v3plus"
    assert SEGMENTERS.canonical("deeplabv2") == "deeplab_v2"


def test_every_refiner_runs_on_one_small_image():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)
    probs = rng.dirichlet(np.ones(3), size=(12, 16)).transpose(2, 0, 1).astype(np.float32)
    inputs = {
        "image": image, "probabilities": probs, "labels": probs.argmax(0), "num_labels": 3,
        "maps": torch.from_numpy(probs[1:]), "boundary": torch.zeros(12, 16),
        "classes": [1, 2], "size": None,
    }
    assert set(REFINERS.names()) == {"crf_irn", "crf_clip_es", "crf_deeplab", "random_walk"}
    for name, refiner in REFINERS.items():
        labels = refiner(*(inputs[key] for key in refiner.inputs))
        assert labels.shape == (12, 16), name
    with pytest.raises(ValueError, match="takes image, probabilities"):
        REFINERS.get("crf_deeplab")(image)


@pytest.mark.parametrize("method", METHODS.names())
def test_a_methods_refiner_and_network_are_registered(method):
    from cpal.refine import REFINERS

    spec = method_spec(method)
    assert spec.network in NETWORKS
    assert spec.refiner is None or spec.refiner in REFINERS
