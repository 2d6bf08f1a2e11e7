"""SIPE's inference fusion of prototype maps: flip sum before the prototypes, raw maps of
every scale summed and normalised once; and the earlier choices as switches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cpal.config import load_config
from cpal.engine.infer import PrototypeInference, multiscale_maps, normalised_maps
from cpal.models.cam_net import build_network
from cpal.prototypes.module import CPALOutput


def _net(*extra: str):
    cfg = load_config(None, ["method=sipe", "model.arch=resnet18", "model.width=0.125",
                             "model.frozen_bn=false", *extra])
    torch.manual_seed(0)
    net, _ = build_network(cfg, 2)
    return net.eval()


def _fake_branch(maps: list[torch.Tensor]):
    """prototype_maps stand-in returning the given raw maps, one per call (scale)."""
    calls = {"n": 0}

    def branch(z, cam, labels, seed_features, **_):
        sim = maps[calls["n"]].expand(z.shape[0], -1, -1, -1)
        calls["n"] += 1
        valid = torch.ones(sim.shape[:2], dtype=torch.bool)
        return CPALOutput(pacam=sim / sim.flatten(2).amax(2)[..., None, None], cam_norm=sim,
                          losses={}, prototypes=torch.zeros(1), context_prototypes=torch.zeros(1),
                          valid=valid, selected=None, similarity=sim)

    return branch


def test_raw_maps_of_every_scale_are_summed_then_normalised_once(monkeypatch) -> None:
    net = _net()
    image = torch.randn(1, 3, 16, 32)
    # Scale 1 gives a 1x2 grid, scale 2 a 2x4 grid (output stride 16). Channel 1's raw
    # maps: weak at scale 1 (peak 0.2), strong at scale 2 (peak 0.9).
    s1 = torch.tensor([[[[0.5, 0.5]], [[0.2, 0.0]], [[0.1, 0.3]]]])
    s2 = torch.tensor([[[[0.4] * 4] * 2, [[0.0, 0.0, 0.9, 0.9]] * 2, [[0.3] * 4] * 2]])
    monkeypatch.setattr(net.cpal, "prototype_maps", _fake_branch([s1, s2]))
    labels = torch.ones(1, 2)
    out = normalised_maps(net, image, labels, (1.0, 2.0), False, ("pacam",))
    up = [F.interpolate(s, size=(16, 32), mode="bilinear", align_corners=False)
          for s in (s1, s2)]
    total = up[0] + up[1]
    expected = total / (total.flatten(2).amax(2)[..., None, None] + 1e-5)
    torch.testing.assert_close(out["pacam"], expected[:, 1:])
    torch.testing.assert_close(out["pacam_background"], expected[:, :1])
    # By hand, channel 1 along x (pixel centres x + 0.5): scale 1 falls from 0.2 (x <= 8)
    # to 0 (x >= 24), scale 2 rises from 0 (x <= 12) to 0.9 (x >= 20); the sum peaks at
    # x = 20.5 with 0.9 + 0.2 * 3.5 / 16; the left edge holds 0.2 + 0.
    peak = 0.9 + 0.2 * 3.5 / 16
    assert out["pacam"][0, 0, 0, 0].item() == pytest.approx(0.2 / peak, abs=1e-4)
    # Per-scale normalisation gives the weak scale the strong one's weight: on the left
    # 1.0 (0.2 / 0.2) + 0 before the final normalisation, about 0.8 after it, not 0.21.
    monkeypatch.setattr(net.cpal, "prototype_maps", _fake_branch([s1, s2]))
    old = normalised_maps(net, image, labels, (1.0, 2.0), False, ("pacam",),
                          PrototypeInference(maps="per_scale"))
    assert old["pacam"][0, 0, 0, 0].item() > 3 * out["pacam"][0, 0, 0, 0].item()


def test_flip_is_fused_by_summing_embeddings_and_cams(monkeypatch) -> None:
    net = _net()
    seen = {}

    def record(z, cam, labels, seed_features, **kw):
        seen.update(z=z, cam=cam, seed=seed_features, image=kw["image"])
        sim = torch.ones(1, 3, *z.shape[-2:])
        return CPALOutput(pacam=sim, cam_norm=sim, losses={}, prototypes=torch.zeros(1),
                          context_prototypes=torch.zeros(1), valid=torch.ones(1, 3).bool(),
                          selected=None, similarity=sim)

    monkeypatch.setattr(net.cpal, "prototype_maps", record)
    image = torch.randn(1, 3, 32, 48)
    multiscale_maps(net, image, (1.0,), True, torch.ones(1, 2), ("pacam",))
    with torch.no_grad():
        out = net(torch.cat([image, image.flip(-1)]))
        z = net.cpal.embed(out.features)
    torch.testing.assert_close(seen["z"], z[:1] + z[1:].flip(-1))
    torch.testing.assert_close(seen["cam"], out.cam[:1] + out.cam[1:].flip(-1))
    assert seen["seed"] is seen["z"]  # SIPE's inference seeds use the hierarchical feature
    # The earlier choice averages backbone features before embedding, seeds from layer4.
    multiscale_maps(net, image, (1.0,), True, torch.ones(1, 2), ("pacam",),
                    PrototypeInference(flip_fusion="backbone", seed_features="layer4"))
    feats = [(f[:1] + f[1:].flip(-1)) / 2 for f in out.features]
    torch.testing.assert_close(seen["z"], net.cpal.embed(feats))
    torch.testing.assert_close(seen["seed"], feats[-1])


def test_pcm_seed_source_trains_and_infers() -> None:
    net = _net("prototype.seed_source=pcm", "prototype.bg_factor=0.3").train()
    x = torch.randn(2, 3, 64, 64)
    labels = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    out = net(x, labels, None, torch.ones(2, 64, 64))
    assert out.cpal is not None and out.cpal.seeds is not None
    out.cpal.losses["self"].backward()
    assert net.cpal.pcm.weight.grad is not None  # the correlation guide learns from L_self
    net.eval()
    maps = normalised_maps(net, x, labels, (1.0, 0.5), True, ("pacam",))
    assert maps["pacam"].shape == (2, 2, 64, 64)
    assert bool(torch.isfinite(maps["pacam"]).all())


@pytest.mark.parametrize("kind", ["cam", "pacam"])
def test_present_only_maps_equal_the_full_ones_on_each_images_classes(kind) -> None:
    """present_only upsamples each image's own classes alone: on those channels the same
    numbers as the full maps, absent channels 0 (an image without any label too)."""
    cfg = load_config(None, ["method=sipe", "model.arch=resnet18", "model.width=0.125",
                             "model.frozen_bn=false"])
    torch.manual_seed(0)
    net, _ = build_network(cfg, 4)
    net.eval()
    images = torch.randn(3, 3, 40, 56)
    labels = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    with torch.no_grad():
        full = multiscale_maps(net, images, (1.0, 0.5), True, labels, (kind,))
        part = multiscale_maps(net, images, (1.0, 0.5), True, labels, (kind,),
                               present_only=True)
    present = labels.bool()
    assert part[kind].shape == full[kind].shape == (3, 4, 40, 56)
    torch.testing.assert_close(part[kind][present], full[kind][present], rtol=0, atol=0)
    assert float(part[kind][~present].abs().max()) == 0.0
    if kind == "pacam":
        torch.testing.assert_close(part["pacam_background"], full["pacam_background"],
                                   rtol=0, atol=0)
