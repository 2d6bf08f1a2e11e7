from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from cpal.config import AlignmentConfig, AwarenessConfig, BankConfig, PrototypeConfig
from cpal.methods import PrototypeBranch, method_spec
from cpal.prototypes.module import CPALModule
from cpal.prototypes.pacam import prototype_cam

CH = (8, 16)
C = 3


def branch(method: str) -> PrototypeBranch:
    spec = method_spec(method).branch
    assert spec is not None
    return spec


def make(method: str = "cpal", **kw) -> CPALModule:
    torch.manual_seed(0)
    return CPALModule(
        CH,
        C,
        branch(method),
        PrototypeConfig(features=kw.get("features", "hierarchical"), **kw.get("proto", {})),
        BankConfig(size=8, clusters=kw.get("clusters", 3), recluster_every=100, kmeans_iters=3),
        AwarenessConfig(top_k=2, temperature=0.5, alpha=0.5, **kw.get("awareness", {})),
        AlignmentConfig(beta=1.0, loss_weight=kw.get("loss_weight", 0.0)),
    )


def batch(seed: int, b: int = 2, requires_grad: bool = False):
    g = torch.Generator().manual_seed(seed)
    feats = [torch.randn(b, 8, 8, 8, generator=g), torch.randn(b, 16, 4, 4, generator=g)]
    cam = torch.randn(b, C, 4, 4, generator=g)
    if requires_grad:
        for t in [*feats, cam]:
            t.requires_grad_()
    labels = torch.zeros(b, C)
    labels[:, 0] = 1
    labels[0, 2] = 1
    return feats, cam, labels


def test_output_shapes_ranges_and_absent_zero() -> None:
    out = make("cpal", loss_weight=0.1)(*batch(0))
    assert out.pacam.shape == out.cam_norm.shape == (2, C + 1, 4, 4)
    pacam = out.pacam.detach()
    assert float(pacam.min()) >= 0 and float(pacam.max()) <= 1
    assert torch.all(out.pacam[1, 3] == 0) and torch.all(out.pacam[:, 2] == 0)
    assert out.valid.tolist() == [[True, True, False, True], [True, True, False, False]]
    assert set(out.losses) == {"self", "fda"}
    assert out.selected is not None and out.selected.shape == (2, C + 1, 2)
    assert set(make("sipe")(*batch(0)).losses) == {"self"}


def test_warm_up_then_context_changes_prototypes() -> None:
    m = make("cpal").train()
    out = m(*batch(0))  # empty bank: everything is SIPE
    torch.testing.assert_close(out.context_prototypes, out.prototypes)
    assert torch.all(out.selected == -1)
    # no shift before warm-up: PACAM is the plain prototype CAM of the instance prototypes
    z = m.head(batch(0)[0])
    torch.testing.assert_close(out.pacam, prototype_cam(z, out.prototypes, out.valid))
    assert m.bank is not None
    assert m.bank.counts().tolist() == [2, 2, 0, 1]  # bg + present classes only
    out = m(*batch(1))  # channels 0, 1 now hold 2 = top_k entries and got clustered
    ready = torch.tensor([True, True, False, False])
    assert bool(torch.all(out.selected[:, ready] >= 0))
    assert bool(torch.all(out.selected[:, ~ready] == -1))
    diff = (out.context_prototypes - out.prototypes).norm(dim=-1)
    assert bool(torch.all(diff[:, ready] > 1e-4))
    assert bool(torch.all(diff[:, ~ready] == 0))  # class 3 still warming up (1 entry)
    z = m.head(batch(1)[0])
    # Differs by construction (the prototypes differ by > 1e-4, asserted above).
    assert not torch.allclose(out.pacam, prototype_cam(z, out.context_prototypes, out.valid))


@pytest.mark.parametrize("method", ["cpal-mean", "cpal"])
def test_an_instance_background_keeps_its_own_prototype(method: str) -> None:
    """awareness.background=instance: past warm-up the classes get context, the background
    channel keeps the image's prototype (no context, no shift) in both branches."""
    shared = make(method).train()
    own = make(method, awareness={"background": "instance"}).train()
    for s in range(2):
        shared(*batch(s))
        own(*batch(s))
    a, b = shared(*batch(2)), own(*batch(2))
    torch.testing.assert_close(a.prototypes, b.prototypes)  # same weights, same inputs
    torch.testing.assert_close(b.context_prototypes[:, 0], b.prototypes[:, 0])
    assert bool(((a.context_prototypes[:, 0] - a.prototypes[:, 0]).norm(dim=-1) > 1e-4).all())
    torch.testing.assert_close(b.context_prototypes[:, 1], a.context_prototypes[:, 1])
    if b.selected is not None:
        assert bool((b.selected[:, 0] == -1).all()) and bool((b.selected[:, 1] >= 0).all())
    # The background's map is then SIPE's: the plain cosine with its own prototype.
    z = own.head(batch(2)[0])
    plain = prototype_cam(z, b.prototypes, b.valid)
    torch.testing.assert_close(b.pacam[:, 0], plain[:, 0])


@pytest.mark.parametrize("method", ["sipe", "cpal-mean", "cpal-topk", "cpal"])
def test_gradients_reach_embedding_and_cam(method: str) -> None:
    m = make(method).train()
    for s in range(3):  # get past warm-up
        m(*batch(s))
    feats, cam, labels = batch(5, requires_grad=True)
    out = m(feats, cam, labels)
    out.losses["self"].backward()
    assert cam.grad is not None and float(cam.grad.abs().sum()) > 0
    grad = m.head.sides[-1].weight.grad
    assert grad is not None and float(grad.abs().sum()) > 0
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)


def test_embedding_never_sends_gradients_into_the_backbone() -> None:
    m = make("cpal", features="layer4").train()
    feats, cam, labels = batch(0, requires_grad=True)
    m(feats, cam, labels).losses["self"].backward()
    assert all(f.grad is None for f in feats)  # side convs on detached maps (SIPE)
    assert cam.grad is not None


def test_eval_does_not_modify_bank() -> None:
    m = make("cpal").train()
    for s in range(3):
        m(*batch(s))
    before = {k: v.clone() for k, v in m.state_dict().items()}
    m.eval()
    with torch.no_grad():
        for s in range(3, 6):
            m(*batch(s))
    after = m.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_checkpoint_round_trip_gives_identical_outputs(tmp_path) -> None:
    m = make("cpal").train()
    for s in range(4):
        m(*batch(s))
    m.eval()
    path = tmp_path / "m.safetensors"
    save_file(m.state_dict(), str(path))
    for state in (m.state_dict(), load_file(str(path))):
        fresh = make("cpal")
        fresh.load_state_dict(state)
        fresh.eval()
        assert fresh.bank is not None and m.bank is not None
        for c in range(C + 1):
            torch.testing.assert_close(fresh.bank.context(c)[0], m.bank.context(c)[0])
        with torch.no_grad():
            a, b = m(*batch(9)), fresh(*batch(9))
        torch.testing.assert_close(a.pacam, b.pacam)
        assert torch.equal(a.selected, b.selected)


def _controlled(score: str, normalize: bool) -> CPALModule:
    """One class, D=2, identity embedding (z = the unit features), raw bank entries as
    context (clusters 0), top-1 selection: every number below is known by hand."""
    m = CPALModule(
        (2,), 1, branch("cpal-topk"),
        PrototypeConfig(features="layer4", projection=2, normalize=normalize, region="threshold"),
        BankConfig(size=4, clusters=0),
        AwarenessConfig(score=score, top_k=1),  # type: ignore[arg-type]
        AlignmentConfig(),
    )
    with torch.no_grad():  # side conv [I; 0] then projection [I 0]: z = the unit features
        side = torch.zeros(8, 2)
        side[:2] = torch.eye(2)
        m.head.sides[0].weight.copy_(side[:, :, None, None])
        assert m.head.proj is not None
        m.head.proj.weight.copy_(side.T[:, :, None, None])
    assert m.bank is not None
    # Context a: the instance's own direction, inconsistent (norm 0.56); b: 0.89 cosine
    # away but consistent (norm 0.95).
    m.bank.enqueue(torch.tensor([[0.5, 0.25], [0.95, 0.0]]), torch.tensor([1, 1]))
    m.refresh_context()
    return m.eval()


def _controlled_batch() -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor]:
    # Class region = pixels 0, 1 with embeddings (1, 0), (0.6, 0.8): raw p = (0.8, 0.4).
    feats = torch.tensor([[[[1.0, 0.6, 0.0, 0.0]], [[0.0, 0.8, 1.0, 1.0]]]])  # (1, 2, 1, 4)
    cam = torch.tensor([[[[1.0, 1.0, 0.0, 0.0]]]])
    return [feats], cam, torch.ones(1, 1)


def test_raw_prototypes_make_dot_and_cosine_rank_differently() -> None:
    picks = {}
    for score in ("dot", "cosine", "l2"):
        with torch.no_grad():
            out = _controlled(score, normalize=False)(*_controlled_batch())
        # A masked mean of 4 hand-set pixels: off by the CAM normalisation's 1e-5 eps
        # (measured 4e-6), float32 rounding is ~1e-7.
        torch.testing.assert_close(
            out.prototypes[0, 1], torch.tensor([0.8, 0.4]), atol=1e-4, rtol=0
        )
        assert out.selected is not None
        picks[score] = int(out.selected[0, 1, 0])
        pacam = out.pacam
        assert float(pacam.min()) >= 0 and float(pacam.max()) <= 1
        torch.testing.assert_close(out.context_prototypes[0, 1].norm(), torch.tensor(1.0))
    # dot: a 0.8*0.5 + 0.4*0.25 = 0.5 < b 0.76; cosine: a 1.0 > b 0.894;
    # l2: |p - a| = 0.335 < |p - b| = 0.427.
    assert picks == {"dot": 1, "cosine": 0, "l2": 0}
    # With unit prototypes (and a unit bank) dot and cosine cannot disagree.
    unit = {}
    for score in ("dot", "cosine"):
        m = _controlled(score, normalize=True)
        assert m.bank is not None
        m.bank.queue.copy_(F.normalize(m.bank.queue, dim=-1))
        m.refresh_context()
        with torch.no_grad():
            out = m(*_controlled_batch())
        assert out.selected is not None
        unit[score] = int(out.selected[0, 1, 0])
    assert unit["dot"] == unit["cosine"]


def test_raw_prototypes_train_and_fill_the_bank_with_their_norms() -> None:
    torch.manual_seed(0)
    m = CPALModule(
        CH, C, branch("cpal"),
        PrototypeConfig(normalize=False),
        BankConfig(size=8, clusters=3, recluster_every=2, kmeans_iters=3),
        AwarenessConfig(top_k=2, temperature=0.5), AlignmentConfig(loss_weight=0.1),
    ).train()
    for s in range(4):
        out = m(*batch(s))
    assert m.bank is not None
    rows = out.prototypes[out.valid].detach()
    norms = m.bank.entries(1).norm(dim=1)
    # z concatenates 2 unit side features (norm sqrt(2)); raw means are shorter.
    assert bool(torch.all(norms <= 2**0.5 + 1e-5)) and bool(torch.any(norms < 1.41))
    torch.testing.assert_close(m.bank.entries(1)[-2:], rows[[1, 4]])  # images 0, 1
    feats, cam, labels = batch(5, requires_grad=True)
    out = m(feats, cam, labels)
    assert out.selected is not None and bool(torch.any(out.selected >= 0))
    (out.losses["self"] + out.losses["fda"]).backward()
    assert cam.grad is not None and bool(torch.isfinite(cam.grad).all())
    assert all(torch.isfinite(p.grad).all() for p in m.parameters() if p.grad is not None)
    pacam = out.pacam.detach()
    assert float(pacam.min()) >= 0 and float(pacam.max()) <= 1


def test_sample_ids_become_bank_provenance_and_name_the_selected_context() -> None:
    m = make("cpal").train()
    for s in range(3):
        m(*batch(s), sample_ids=torch.tensor([10 * s, 10 * s + 1]))
    assert m.bank is not None
    # class 1 (channel 2) is present in both images of every batch; class 3 only in image 0
    assert m.bank.entry_sources(1).tolist() == [0, 1, 10, 11, 20, 21]
    assert m.bank.entry_sources(3).tolist() == [0, 10, 20]
    m(*batch(3))  # no ids: unknown
    assert m.bank.entry_sources(1).tolist()[-2:] == [-1, -1]
    m.eval()
    with torch.no_grad():
        out = m(*batch(4))
    assert out.selection_weights is not None and out.selected is not None
    pairs = m.context_sources(out, 0, 1)
    assert len(pairs) == int((out.selected[0, 1] >= 0).sum()) > 0
    assert abs(sum(w for w, _ in pairs) - 1.0) < 1e-5
    assert [w for w, _ in pairs] == sorted((w for w, _ in pairs), reverse=True)
    held = set(m.bank.entry_sources(1).tolist())
    assert all(src in held for _, src in pairs)
    # nearest entry, by hand: the held entry of highest cosine to each selected centroid
    table = m.bank.context_table()[0][1][out.selected[0, 1]]
    cos = F.normalize(table, dim=1) @ F.normalize(m.bank.entries(1), dim=1).T
    expected = m.bank.entry_sources(1)[cos.argmax(dim=1)].tolist()
    assert [src for _, src in pairs] == expected
    assert make("sipe").context_sources(make("sipe")(*batch(0)), 0, 1) == []
