from __future__ import annotations

import torch

from cpal.prototypes.head import EmbeddingHead, side_widths


def test_side_widths() -> None:
    assert side_widths((256, 512, 1024, 2048)) == (128, 128, 256, 256)
    assert side_widths((32, 64, 128, 256)) == (16, 32, 64, 128)
    assert side_widths((10,)) == (8,)


def test_hierarchical_concatenates_unit_sides_of_detached_maps() -> None:
    head = EmbeddingHead([4, 8, 16], "hierarchical")
    assert head.dim == 8 + 8 + 8
    feats = [torch.randn(2, 4, 16, 16), torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    for f in feats:
        f.requires_grad_()
    z = head(feats)
    assert z.shape == (2, 24, 4, 4)
    # Each side is unit length per pixel before the resize; bilinear downsampling of unit
    # vectors shrinks them (never grows), so the concatenation has norm <= sqrt(3).
    assert float(z.detach()[:, 16:].norm(dim=1).sub(1).abs().max()) < 1e-4  # last side: no resize
    assert float(z.detach().norm(dim=1).max()) <= 3**0.5 + 1e-4
    z.sum().backward()
    assert all(f.grad is None for f in feats)  # side convs see detached maps (SIPE)
    assert all(conv.weight.grad is not None for conv in head.sides)


def test_resize_is_bilinear_without_align_corners() -> None:
    head = EmbeddingHead([4, 4], "hierarchical")
    f0 = torch.randn(1, 4, 8, 8)
    z = head([f0, torch.randn(1, 4, 4, 4)])
    side = head.sides[0](f0)
    side = side / (side.norm(dim=1, keepdim=True) + 1e-5)
    expected = torch.nn.functional.interpolate(side, size=(4, 4), mode="bilinear",
                                               align_corners=False)
    torch.testing.assert_close(z[:, :8], expected)


def test_projection_gives_unit_embeddings_and_init_switch() -> None:
    head = EmbeddingHead([4, 8], "hierarchical", projection=6)
    z = head([torch.randn(2, 4, 8, 8), torch.randn(2, 8, 4, 4)])
    assert z.shape == (2, 6, 4, 4) and head.dim == 6
    torch.testing.assert_close(z.norm(dim=1), torch.ones(2, 4, 4))
    torch.manual_seed(0)
    default = EmbeddingHead([64], "layer4").sides[0].weight.detach().std()
    torch.manual_seed(0)
    kaiming = EmbeddingHead([64], "layer4", init="kaiming").sides[0].weight.detach().std()
    # PyTorch's default (kaiming_uniform, a=sqrt(5)) has std 1/sqrt(3 fan_in) = 0.072;
    # Kaiming fan-out normal sqrt(2 / fan_out) = 0.25 for 32 outputs (2,048 samples each).
    assert 0.06 < float(default) < 0.085 and 0.22 < float(kaiming) < 0.28


def test_layer4_uses_only_the_last_map() -> None:
    head = EmbeddingHead([4, 384], "layer4")
    z = head([torch.randn(1, 4, 6, 6), torch.randn(1, 384, 3, 3)])
    assert z.shape == (1, 192, 3, 3) and len(head.sides) == 1
