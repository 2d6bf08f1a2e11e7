from __future__ import annotations

import torch

from cpal.prototypes.head import EmbeddingHead, side_widths


def test_side_widths() -> None:
    assert side_widths((256, 512, 1024, 2048)) == (128, 128, 256, 256)
    assert side_widths((32, 64, 128, 256)) == (16, 32, 64, 128)
    assert side_widths((10,)) == (8,)


def test_hierarchical_shapes_norm_and_detached_inputs() -> None:
    head = EmbeddingHead([4, 8, 16], dim=6, mode="hierarchical")
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    for f in feats:
        f.requires_grad_()
    z = head(feats)
    assert z.shape == (2, 6, 4, 4)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 4))
    z.sum().backward()
    assert all(f.grad is None for f in feats)  # side convs see detached maps (SIPE)
    assert head.proj.weight.grad is not None


def test_layer4_uses_last_map_with_gradient() -> None:
    head = EmbeddingHead([4, 384], dim=5, mode="layer4")
    f = torch.randn(1, 384, 3, 3, requires_grad=True)
    z = head([torch.randn(1, 4, 6, 6), f])
    assert z.shape == (1, 5, 3, 3)
    (z * torch.randn_like(z)).sum().backward()
    assert f.grad is not None and float(f.grad.abs().sum()) > 0
