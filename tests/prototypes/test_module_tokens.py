"""The CPAL module on transformer tokens: MCTformer's patch tokens (B x D x h x w) with its
patch CAM, and CLIP-ES's frozen image features with its maps. The module is the same one
the ResNet methods use; it sees maps with channel counts, never the network."""

import torch

from cpal.config import load_config
from cpal.models.cam_net import build_network
from cpal.models.clip_es import ClipEs
from cpal.models.mctformer import MCTformer
from cpal.prototypes.module import CPALModule

C = 3
SMALL_BANK = ["bank.size=8", "bank.clusters=2", "bank.recluster_every=1", "awareness.top_k=1"]


def _labels() -> torch.Tensor:
    return torch.tensor([[1.0, 0, 1], [0, 1, 0]])


def test_mctformer_tokens_shapes_gradients_and_bank():
    cfg = load_config(None, ["method=mctformer-cpal", "model.arch=deit_tiny", "model.width=0.25",
                             "vit.depth=2", *SMALL_BANK])
    torch.manual_seed(0)
    net, _ = build_network(cfg, C)
    assert isinstance(net, MCTformer) and isinstance(net.cpal, CPALModule)
    assert net.cpal.head.in_channels == (net.vit.dim,)  # one map: the patch tokens
    net.train()
    x = torch.randn(2, 3, 64, 48)
    out = net(x, _labels(), torch.tensor([4, 7]))
    h, w = 4, 3
    assert out.features[0].shape == (2, net.vit.dim, h, w) and out.cam.shape == (2, C, h, w)
    assert out.cpal.pacam.shape == (2, C + 1, h, w)
    assert out.cpal.prototypes.shape == (2, C + 1, net.cpal.head.dim)
    out.cpal.losses["self"].backward()
    # L_self trains the prototype head and, through its CAM target M, the patch CAM and
    # the trunk under it (SIPE's GSC loss does the same to the ResNet).
    assert net.cpal.head.sides[0].weight.grad.abs().sum() > 0
    assert net.head.weight.grad.abs().sum() > 0
    assert net.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    # Present classes and the background enter the bank, with the images' ids.
    counts = net.cpal.bank.counts()
    assert counts[0] == 2 and counts[1:].tolist() == [1, 1, 1]


def test_clip_es_features_with_its_maps_as_the_cam():
    cfg = load_config(None, ["method=clip-es-cpal", "model.arch=clip_vit_b16",
                             "model.width=0.125", "vit.depth=2", *SMALL_BANK])
    net, _ = build_network(cfg, C, class_names=["cat", "dog", "sheep"])
    assert isinstance(net, ClipEs)
    net.train()
    assert not net.clip.training  # the frozen CLIP stays in eval mode
    labels = _labels()
    out = net(torch.randn(2, 3, 32, 48), labels, torch.tensor([0, 1]))
    assert out.scores == {}  # nothing to classify with: only the branch trains
    torch.testing.assert_close(out.cam, out.maps)  # CLIP-ES's maps are the branch's CAM
    assert out.features[0].shape == (2, net.clip.visual.dim, 2, 3)
    assert not out.cam.requires_grad and not out.features[0].requires_grad
    out.cpal.losses["self"].backward()
    assert net.cpal.head.sides[0].weight.grad.abs().sum() > 0
    trainable = {id(p) for params, _ in net.param_groups() for p in params}
    assert trainable == {id(p) for p in net.cpal.parameters() if p.requires_grad}
    assert all(not p.requires_grad for p in net.clip.parameters())
    # Checkpoints hold the branch (its bank too), never the frozen CLIP.
    state = net.state_dict()
    assert state and all(k.startswith("cpal.") for k in state)
    # Background and present classes with a seed entered the bank (at most 2 + 3 rows).
    assert 0 < int(net.cpal.bank.counts().sum()) <= 5
    rebuilt, _ = build_network(cfg, C, class_names=["cat", "dog", "sheep"])
    rebuilt.load_state_dict(state)  # strict: the frozen trunk is not missing
    for a, b in zip(rebuilt.clip.parameters(), net.clip.parameters(), strict=True):
        torch.testing.assert_close(a, b)  # the same random trunk from the run's seed
