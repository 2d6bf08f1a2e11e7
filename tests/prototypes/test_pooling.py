from __future__ import annotations

import torch

from cpal.prototypes.pooling import (
    cam_with_background,
    instance_prototypes,
    masked_average,
    region_weights,
    sipe_seeds,
)


def test_masked_average_hand_case() -> None:
    # z: D=2 on a 2x2 grid; pixel values (1,0), (0,1), (2,2), (4,0).
    z = torch.tensor([[[1.0, 0.0], [2.0, 4.0]], [[0.0, 1.0], [2.0, 0.0]]])[None]
    w = torch.tensor([[[1.0, 0.0], [0.0, 1.0]], [[0.0, 1.0], [3.0, 0.0]]])[None]
    out = masked_average(z, w, eps=0.0)
    # channel 0: ((1,0) + (4,0)) / 2; channel 1: ((0,1) + 3*(2,2)) / 4
    expected = torch.tensor([[[2.5, 0.0], [1.5, 1.75]]])
    torch.testing.assert_close(out, expected)


def test_cam_with_background_zeroes_absent_and_forms_bg() -> None:
    cam = torch.tensor([[[[2.0, 1.0]], [[4.0, 4.0]], [[0.0, -1.0]]]])  # (1, 3, 1, 2)
    labels = torch.tensor([[1.0, 0.0, 1.0]])
    m = cam_with_background(cam, labels, eps=1e-6)
    assert m.shape == (1, 4, 1, 2)
    close = {"atol": 1e-5, "rtol": 0}  # hand values / (max + eps 1e-6): off by ~5e-7
    torch.testing.assert_close(m[0, 1, 0], torch.tensor([1.0, 0.5]), **close)
    torch.testing.assert_close(m[0, 2], torch.zeros(1, 2))  # absent class zeroed
    torch.testing.assert_close(m[0, 3], torch.zeros(1, 2))  # relu -> 0 everywhere
    torch.testing.assert_close(m[0, 0, 0], torch.tensor([0.0, 0.5]), **close)  # 1 - max fg


def _cam_norm() -> torch.Tensor:
    # (1, 3, 2, 2): bg, class a (present), class b (absent)
    bg = torch.tensor([[0.9, 0.2], [0.1, 0.6]])
    a = torch.tensor([[0.1, 0.8], [0.3, 0.4]])  # only one pixel above 0.5
    b = torch.zeros(2, 2)
    return torch.stack([bg, a, b])[None]


def test_threshold_region_and_validity() -> None:
    z = torch.nn.functional.normalize(torch.randn(1, 4, 2, 2), dim=1)
    labels = torch.tensor([[1.0, 0.0]])
    protos, valid = instance_prototypes(
        z, _cam_norm(), labels, tau=0.5, tau_bg=0.5, region="threshold"
    )
    assert valid.tolist() == [[True, True, False]]
    # class a: single pixel (0, 1) above tau -> the prototype is that pixel's embedding.
    # Normalised (weighted) means of unit vectors: float32 rounding ~1e-7 (measured 6e-8).
    torch.testing.assert_close(protos[0, 1], z[0, :, 0, 1], atol=1e-4, rtol=0)
    # background: pixels (0,0) and (1,1) -> normalised mean.
    bg = torch.nn.functional.normalize(z[0, :, 0, 0] + z[0, :, 1, 1], dim=0)
    torch.testing.assert_close(protos[0, 0], bg, atol=1e-4, rtol=0)
    assert torch.all(protos[0, 2] == 0)


def test_empty_region_falls_back_to_cam_weighting() -> None:
    cam = _cam_norm()
    labels = torch.tensor([[1.0, 0.0]])
    w = region_weights(cam, labels, tau=0.9, tau_bg=0.5, region="threshold")
    # class a never exceeds 0.9: its weights are its CAM values.
    torch.testing.assert_close(w[0, 1], cam[0, 1])
    z = torch.nn.functional.normalize(torch.randn(1, 4, 2, 2), dim=1)
    protos, _ = instance_prototypes(z, cam, labels, tau=0.9, tau_bg=0.5, region="threshold")
    expected = (z[0] * cam[0, 1]).sum((1, 2))
    # The same weighted sum in another order: float32 rounding ~1e-7 (measured 6e-8).
    torch.testing.assert_close(
        protos[0, 1], torch.nn.functional.normalize(expected, dim=0), atol=1e-4, rtol=0
    )


def test_sipe_seeds_hand_case() -> None:
    # Two orthogonal feature groups: pixels 0,1 share feature e0; pixels 2,3 share e1.
    f = torch.tensor([[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0]]).view(1, 2, 2, 2)
    # CAM of class 1 covers pixels 2,3; background covers 0,1; class 2 is absent.
    cam = torch.tensor(
        [[1.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]
    ).view(1, 3, 2, 2)
    labels = torch.tensor([[1.0, 0.0]])
    for iou in ("product", "minmax"):
        seeds = sipe_seeds(f, cam, labels, iou=iou)
        # Background IoU is 1 * 0.5 on pixels 0,1 (still the best); class 2 (absent) never wins.
        assert seeds.tolist() == [[[0, 0], [1, 1]]], iou
    w = region_weights(
        cam, labels, tau=0.5, tau_bg=0.5, region="sipe_seeds", seeds=sipe_seeds(f, cam, labels)
    )
    assert w[0, 1].flatten().tolist() == [0.0, 0.0, 1.0, 1.0]
    assert torch.all(w[0, 2] == 0)


def test_raw_prototype_norm_measures_region_consistency() -> None:
    # Unit embeddings on a 1x3 grid: (1,0), (0,1), (1,0). Class 1's CAM covers pixels 0, 1
    # (two orthogonal embeddings), the background pixel 2 alone.
    z = torch.tensor([[[1.0, 0.0, 1.0]], [[0.0, 1.0, 0.0]]])[None]  # (1, 2, 1, 3)
    cam = cam_with_background(torch.tensor([[[[0.9, 0.8, 0.1]]]]), torch.tensor([[1.0]]))
    kw = {"tau": 0.5, "tau_bg": 0.5, "region": "threshold"}
    raw, valid = instance_prototypes(z, cam, torch.tensor([[1.0]]), normalize=False, **kw)
    assert valid.tolist() == [[True, True]]
    close = {"atol": 1e-4, "rtol": 0}  # weights are CAMs / (max + 1e-5): off by <= 1e-5
    torch.testing.assert_close(raw[0, 1], torch.tensor([0.5, 0.5]), **close)
    torch.testing.assert_close(raw[0, 1].norm(), torch.tensor(0.5**0.5), **close)  # 0.7071
    torch.testing.assert_close(raw[0, 0], torch.tensor([1.0, 0.0]), **close)  # consistent: 1
    unit, _ = instance_prototypes(z, cam, torch.tensor([[1.0]]), **kw)
    torch.testing.assert_close(unit[0, 1], torch.tensor([0.5**0.5, 0.5**0.5]), **close)
