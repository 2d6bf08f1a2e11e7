from __future__ import annotations

import torch
import torch.nn.functional as F

from cpal.prototypes.kmeans import spherical_kmeans, spherical_kmeans_batched


def _three_clusters(seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    centres = torch.eye(8)[:3]
    sizes = [10, 20, 30]
    x = torch.cat(
        [F.normalize(centres[i] + 0.05 * torch.randn(n, 8, generator=g), dim=1)
         for i, n in enumerate(sizes)]
    )
    perm = torch.randperm(x.shape[0], generator=g)
    return x[perm], centres


def test_recovers_separated_clusters_with_counts() -> None:
    x, centres = _three_clusters()
    cent, counts = spherical_kmeans(x, 3, 10, torch.Generator().manual_seed(0))
    assert cent.shape == (3, 8)
    torch.testing.assert_close(cent.norm(dim=1), torch.ones(3))
    match = (cent @ centres.T).argmax(dim=1)  # which true centre each centroid sits on
    assert sorted(match.tolist()) == [0, 1, 2]
    assert float((cent @ centres.T).max(dim=1).values.min()) > 0.98
    by_centre = {int(m): int(c) for m, c in zip(match, counts, strict=True)}
    assert by_centre == {0: 10, 1: 20, 2: 30}


def test_deterministic_given_generator_and_k_capped() -> None:
    x, _ = _three_clusters()
    a = spherical_kmeans(x, 5, 5, torch.Generator().manual_seed(3))
    b = spherical_kmeans(x, 5, 5, torch.Generator().manual_seed(3))
    torch.testing.assert_close(a[0], b[0])
    assert a[0].shape == (5, 8) and int(a[1].sum()) == 60
    few = spherical_kmeans(x[:2], 5, 5)
    assert few[0].shape == (2, 8) and few[1].tolist() == [1.0, 1.0]


def test_batched_respects_masks() -> None:
    x, _ = _three_clusters()
    xs = torch.stack([x, x.flip(0)])
    mask = torch.ones(2, 60, dtype=torch.bool)
    mask[1, 4:] = False  # second group: only 4 real rows
    cent, counts, valid = spherical_kmeans_batched(xs, mask, 6, 5)
    assert valid[0].all() and valid[1].tolist() == [True] * 4 + [False] * 2
    assert counts[0].sum() == 60 and counts[1].sum() == 4
    assert torch.all(cent[1, 4:] == 0)


def test_raw_centroids_are_member_means() -> None:
    # Two direction clusters with members of different norms (raw prototypes).
    a = torch.tensor([[0.5, 0.0, 0.0], [0.9, 0.1, 0.0]])
    b = torch.tensor([[0.0, 0.2, 0.0], [0.0, 0.6, 0.1], [0.0, 0.4, -0.1]])
    x = torch.cat([a, b])[torch.tensor([2, 0, 3, 1, 4])]
    cent, counts = spherical_kmeans(x, 2, 5, torch.Generator().manual_seed(0), normalize=False)
    order = cent[:, 0].argsort(descending=True)  # cluster a first
    torch.testing.assert_close(cent[order], torch.tensor([[0.7, 0.05, 0.0], [0.0, 0.4, 0.0]]))
    assert counts[order].tolist() == [2.0, 3.0]
    unit, _ = spherical_kmeans(x, 2, 5, torch.Generator().manual_seed(0))
    torch.testing.assert_close(unit.norm(dim=1), torch.ones(2))  # default: projected


def test_raw_mode_drops_clusters_without_members() -> None:
    x = torch.tensor([[0.3, 0.4]]).expand(3, 2).clone()  # duplicates: one real cluster
    cent, counts = spherical_kmeans(x, 2, 3, normalize=False)
    torch.testing.assert_close(cent, torch.tensor([[0.3, 0.4]]))
    assert counts.tolist() == [3.0]
