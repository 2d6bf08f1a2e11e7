"""Random walk: the banded version equals IRN's dense matrix squaring; walls hold."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cpal.refine.random_walk import (
    RandomWalkParams,
    random_walk,
    random_walk_dense,
    random_walk_labels,
    stack_for_walk,
    transition_stencil,
)

# Float32 over 2^8 steps against float32 squarings: measured <= 1e-5 of the maps' peak.
RELATIVE_TOLERANCE = 1e-4


def _scene(seed: int, height: int, width: int, channels: int = 3) -> tuple[torch.Tensor,
                                                                            torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    boundary = torch.rand(height, width, generator=generator) * 0.4
    boundary[:, width // 2] = 0.97  # a near-wall: some flow still crosses it
    maps = torch.rand(channels, height, width, generator=generator)
    return maps, boundary


@pytest.mark.parametrize("exp_times", [0, 1, 4, 8])
def test_banded_walk_equals_dense_squaring(exp_times: int) -> None:
    maps, boundary = _scene(0, 18, 23)
    params = RandomWalkParams(exp_times=exp_times)
    fast = random_walk(maps, boundary, params)
    dense = random_walk_dense(maps, boundary, params)
    scale = dense.abs().max()
    assert ((fast - dense).abs().max() / scale) < RELATIVE_TOLERANCE
    np.testing.assert_array_equal(random_walk_labels(fast, [1, 2, 3], params=params),
                                  random_walk_labels(dense, [1, 2, 3], params=params))


@pytest.mark.parametrize(("radius", "beta"), [(3, 1.0), (5, 10.0), (7, 4.0)])
def test_other_radius_and_beta(radius: int, beta: float) -> None:
    maps, boundary = _scene(1, 15, 16, channels=2)
    params = RandomWalkParams(radius=radius, beta=beta, exp_times=5)
    fast = random_walk(maps, boundary, params)
    dense = random_walk_dense(maps, boundary, params)
    assert ((fast - dense).abs().max() / dense.abs().max()) < RELATIVE_TOLERANCE


def test_transition_preserves_mass_and_is_irns_column_normalisation() -> None:
    """x T with T = A D^-1 (columns sum to 1): a uniform map stays uniform where the
    boundary is 0."""
    boundary = torch.zeros(1, 9, 11)
    weights, neighbours = transition_stencil(boundary, radius=5, beta=10.0)
    assert weights.shape == (1, 2 * 34 + 1, 9, 11) and len(neighbours) == 69
    torch.testing.assert_close(weights.sum(dim=1), torch.ones(1, 9, 11))
    out = random_walk(torch.ones(2, 9, 11), torch.zeros(9, 11), RandomWalkParams(exp_times=3))
    torch.testing.assert_close(out, torch.ones(2, 9, 11))


def test_labels_do_not_cross_a_wall() -> None:
    """A closed wall splits the grid: class 1 seeded on the left, class 2 on the right.
    However long the walk, each side keeps its own class; pixels on the wall (boundary 1)
    carry nothing and stay background."""
    height, width, wall = 16, 21, 9
    boundary = torch.zeros(height, width)
    boundary[:, wall] = 1.0
    maps = torch.zeros(2, height, width)
    maps[0, 7, 2] = 1.0  # one seed pixel each, far from the wall
    maps[1, 3, 18] = 0.6
    params = RandomWalkParams(exp_times=10, bg_score=1e-6)
    out = random_walk(maps, boundary, params)
    assert (out[0, :, wall:] == 0).all() and (out[1, :, : wall + 1] == 0).all()
    labels = random_walk_labels(out, [1, 2], params=params)
    assert (labels[:, :wall] == 1).all()
    assert (labels[:, wall] == 0).all()
    assert (labels[:, wall + 1:] == 2).all()
    # The dense reference agrees.
    dense = random_walk_dense(maps, boundary, params)
    np.testing.assert_array_equal(random_walk_labels(dense, [1, 2], params=params), labels)


def test_batched_padded_walk_equals_one_image_at_a_time() -> None:
    items = [_scene(2, 12, 17, channels=2), _scene(3, 9, 20, channels=3)]
    maps, boundary = stack_for_walk([m for m, _ in items], [b for _, b in items])
    assert maps.shape == (2, 3, 12, 20) and boundary.shape == (2, 12, 20)
    params = RandomWalkParams(exp_times=6)
    batched = random_walk(maps, boundary, params)
    for i, (m, b) in enumerate(items):
        alone = random_walk(m, b, params)
        c, h, w = m.shape
        torch.testing.assert_close(batched[i, :c, :h, :w], alone, rtol=1e-5, atol=1e-7)
        assert (batched[i, c:] == 0).all()


def test_labels_upsample_crop_and_background_plane() -> None:
    """IRN's make_sem_seg_labels: x4 bilinear, crop to the image, divide by the global max,
    background plane 0.25, argmax, channel -> class."""
    propagated = torch.zeros(2, 3, 4)
    propagated[0, :, :2] = 2.0   # -> 1.0 after the global max
    propagated[1, :, 3] = 0.4    # -> 0.2 < 0.25: background
    labels = random_walk_labels(propagated, [5, 9], size=(10, 14))
    assert labels.shape == (10, 14) and labels.dtype == np.uint8
    assert (labels[:, :6] == 5).all() and (labels[:, 10:] == 0).all()
    assert set(np.unique(labels)) == {0, 5}
    propagated[1, :, 3] = 1.0    # -> 0.5: class 9 on the right
    assert (random_walk_labels(propagated, [5, 9], size=(10, 14))[:, 13] == 9).all()
    assert (random_walk_labels(torch.zeros(1, 3, 4), [5]) == 0).all()


def test_labels_with_the_maps_own_background_channel() -> None:
    """SIPE's make_seg_labels: channel 0 is the walked own background and takes the
    plane's place; a class at 0.2 of the peak (below IRN's 0.25) wins where it beats it."""
    propagated = torch.zeros(3, 2, 3)
    propagated[0] = 0.1              # own background, low everywhere
    propagated[1, :, 0] = 2.0        # class 5 at the peak
    propagated[2, :, 2] = 0.4        # class 9 at 0.2 of the peak, above the background
    labels = random_walk_labels(propagated, [5, 9], params=RandomWalkParams(stride=1),
                                own_background=True)
    np.testing.assert_array_equal(labels, [[5, 0, 9], [5, 0, 9]])
    planes = random_walk_labels(propagated[1:], [5, 9], params=RandomWalkParams(stride=1))
    np.testing.assert_array_equal(planes, [[5, 0, 0], [5, 0, 0]])
    with pytest.raises(ValueError, match="the first the background"):
        random_walk_labels(propagated, [5, 9, 11], own_background=True)


def test_bad_input_raises_naming_it() -> None:
    maps, boundary = _scene(4, 8, 9)
    with pytest.raises(ValueError, match="differ in batch or grid size"):
        random_walk(maps[None], boundary[None, :, :8])
    with pytest.raises(ValueError, match="boundary must be floating point"):
        random_walk(maps, (boundary > 0.5))
    with pytest.raises(ValueError, match="maps must be floating point"):
        random_walk(maps.long(), boundary)
    with pytest.raises(ValueError, match="must be a torch tensor"):
        random_walk(maps[None], boundary.numpy()[None])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="2 classes given for 3 channels"):
        random_walk_labels(maps, [1, 2])
    with pytest.raises(ValueError, match="beta"):
        RandomWalkParams(beta=0.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu() -> None:
    maps, boundary = _scene(5, 20, 24)
    cpu = random_walk(maps, boundary)
    cuda = random_walk(maps.cuda(), boundary.cuda()).cpu()
    assert ((cpu - cuda).abs().max() / cpu.abs().max()) < RELATIVE_TOLERANCE
