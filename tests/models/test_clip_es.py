"""CLIP-ES's pieces: softmax-GradCAM computed by hand on a two-class toy, the attention
affinity's invariants, CLIP-ES's boxes on hand-drawn maps, the refinement, the CRF labels,
and the network's maps (random weights) under inference mode."""

import numpy as np
import pytest
import torch

from cpal.config import load_config
from cpal.models.cam_net import build_network
from cpal.models.clip_es import (
    attention_affinity,
    box_mask,
    class_texts,
    clip_es_crf_labels,
    connected_components,
    grad_cam,
    refine_maps,
)


def test_softmax_grad_cam_by_hand_on_a_two_class_toy():
    # One CLS token and two patch tokens of 2 channels; image feature m = mean of the
    # patches; logits z = W m; p = softmax(z). For class c:
    #   d p_c / d a_n = (p_c / N) (W_c - sum_k p_k W_k), the same for both patches,
    # so the channel weights are that vector and map_n = relu(weights . a_n).
    a = torch.tensor([[[9.0, 9.0], [1.0, 2.0], [3.0, -1.0]]], requires_grad=True)
    w = torch.tensor([[1.0, 0.5], [-0.5, 2.0]])
    m = a[:, 1:].mean(dim=1)
    p = (m @ w.T).softmax(dim=-1)
    cams = grad_cam(a, p, [0, 1], skip=1)
    # m = (2, 0.5): z = (2.25, 0.0), p0 = 1 / (1 + e^-2.25)
    p0 = 1 / (1 + np.exp(-2.25))
    p1 = 1 - p0
    mix = p0 * np.array([1.0, 0.5]) + p1 * np.array([-0.5, 2.0])
    for c, (row, pc) in enumerate(zip(w.numpy(), (p0, p1), strict=True)):
        weights = pc / 2 * (row - mix)
        expected = np.maximum([weights @ [1.0, 2.0], weights @ [3.0, -1.0]], 0)
        np.testing.assert_allclose(cams[0, c].numpy(), expected, rtol=1e-6, atol=1e-7)
    assert cams[0, 0, 1] > 0 and cams[0, 1, 1] == 0  # patch 2 speaks for class 0 only


def test_affinity_is_symmetric_non_negative_and_nearly_doubly_stochastic():
    torch.manual_seed(0)
    attention = torch.rand(2, 12, 12).softmax(dim=-1)  # rows of an attention map
    t = attention_affinity(attention, iterations=3, squarings=1)
    torch.testing.assert_close(t, t.transpose(1, 2))
    assert (t >= 0).all()
    # Sinkhorn converges fast on a positive matrix: rows and columns sum to ~1.
    torch.testing.assert_close(t.sum(dim=2), torch.ones(2, 12), rtol=0, atol=1e-4)
    once = attention_affinity(attention, iterations=3, squarings=0)
    torch.testing.assert_close(t, once @ once)


def test_refinement_never_crosses_between_patches_that_do_not_attend():
    # Two groups of patches (left 2 columns, right 2 columns) that never attend across.
    group = (torch.arange(8) % 4 < 2).float()
    same = (group[:, None] == group[None, :]).float()
    attention = (same + 0.1 * torch.rand(8, 8)) * same
    t = attention_affinity(attention[None])
    maps = torch.zeros(1, 2, 2, 4)
    maps[0, 0, 0, 0] = 1.0  # class 0: the left group only
    maps[0, 1] = torch.rand(2, 4)
    out = refine_maps(maps, t, torch.tensor([[True, False]]), threshold=0.4)
    assert (out[0, 0, :, 2:] == 0).all() and out[0, 0, :, :2].max() > 0
    assert (out[0, 1] == 0).all()  # an absent class stays 0
    # Identity affinity: the refinement is the box-masked map, normalised again.
    eye = torch.eye(8)[None]
    maps = torch.rand(1, 1, 2, 4)
    boxed = maps * box_mask(maps[0], 0.4)[None]
    lo, hi = boxed.min(), boxed.max()
    torch.testing.assert_close(refine_maps(maps, eye, torch.tensor([[True]]), 0.4),
                               (boxed - lo) / (hi - lo + 1e-7))


def test_components_are_8_connected():
    grid = torch.tensor([[1, 0, 0, 0],
                         [0, 1, 0, 1],
                         [0, 0, 0, 1]], dtype=torch.bool)
    labels = connected_components(grid[None])[0]
    assert labels[0, 0] == labels[1, 1] != 0  # diagonal neighbours join
    assert labels[1, 3] == labels[2, 3] != labels[0, 0]
    assert (labels[~grid] == 0).all()


def test_boxes_as_clip_es_draws_them():
    m = torch.zeros(6, 6)
    m[1, 1] = m[2, 2] = 1.0  # region A: rows 1-2, columns 1-2
    m[4, 4] = m[5, 5] = 0.9  # region B touches the last row and column
    m[0, 5] = 0.3  # below 0.4 x max: no region
    got = box_mask(m[None], 0.4)[0]
    expected = torch.zeros(6, 6)
    expected[1:3, 1:3] = 1  # rows y0 .. y_max, as cv2.boundingRect + slicing give
    expected[4:5, 4:5] = 1  # cropped to h - 1 = 5 (exclusive): the last row/column lost
    torch.testing.assert_close(got, expected)
    assert box_mask(torch.zeros(1, 3, 3), 0.4).sum() == 0  # no region, no box


def test_crf_labels_map_channels_to_the_image_classes():
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, size=(12, 16, 3), dtype=np.uint8)
    maps = np.zeros((2, 12, 16), dtype=np.float32)
    maps[0, :, :8], maps[1, :, 8:] = 1.0, 1.0
    labels = clip_es_crf_labels(image, maps, np.array([5, 9]))
    assert set(np.unique(labels)) <= {0, 5, 9, 255}
    assert (labels[:, :6] == 5).mean() > 0.9 and (labels[:, 10:] == 9).mean() > 0.9


def test_class_texts_use_clip_es_synonyms_and_overrides():
    assert class_texts(["person", "cat", "tv"]) == [
        "person with clothes,people,human", "cat", "tvmonitor screen"]
    assert class_texts(["a", "b"], ["x", "y"]) == ["x", "y"]
    with pytest.raises(Exception, match="2 texts for 3 classes"):
        class_texts(["a", "b", "c"], ["x", "y"])


def test_network_maps_under_inference_mode_with_random_weights():
    cfg = load_config(None, ["method=clip-es", "model.arch=clip_vit_b16", "model.width=0.125",
                             "vit.depth=2"])
    net, report = build_network(cfg, 3, class_names=["cat", "dog", "person"])
    assert report is None and net.param_groups() == []
    x = torch.randn(2, 3, 40, 56)  # not multiples of 16: resized to 48 x 64 inside
    labels = torch.tensor([[1.0, 0, 1], [0, 1, 0]])
    with torch.inference_mode():
        out = net.inference(x, labels)
    assert out.maps.shape == (2, 3, 3, 4) and out.features[0].shape[-2:] == (3, 4)
    assert (out.maps[labels == 0] == 0).all()
    for b, c in ((0, 0), (0, 2), (1, 1)):  # min-max normalised (up to CLIP-ES's eps 1e-7)
        assert 0.5 < out.maps[b, c].max() <= 1.0 and out.maps[b, c].min() == 0.0
    assert net.state_dict() == {}  # the frozen CLIP is never saved
    with pytest.raises(ValueError, match="pass its labels"):
        net.inference(x)
