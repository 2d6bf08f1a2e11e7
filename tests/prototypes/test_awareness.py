from __future__ import annotations

import math

import pytest
import torch

from cpal.prototypes.awareness import context_aware_prototype, positiveness, select_top_k

P = torch.tensor([1.0, 0.0])
CTX = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 4.0]])


def test_positiveness_dot() -> None:
    torch.testing.assert_close(positiveness(P, CTX, "dot"), torch.tensor([2.0, 0.0, 3.0]))


def test_positiveness_cosine() -> None:
    torch.testing.assert_close(positiveness(P, CTX, "cosine"), torch.tensor([1.0, 0.0, 0.6]))


def test_positiveness_l2() -> None:
    expected = torch.tensor([-1.0, -math.sqrt(2.0), -math.sqrt(4.0 + 16.0)])
    # float32 distances of small integer vectors (<= 4.5): rounding ~5e-7 (measured 0).
    torch.testing.assert_close(positiveness(P, CTX, "l2"), expected, atol=1e-5, rtol=0)


def test_positiveness_per_channel_context() -> None:
    p = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (B=1, K=2, D)
    ctx = torch.stack([CTX, CTX.flip(1)])  # (K=2, k=3, D)
    s = positiveness(p, ctx, "dot")
    torch.testing.assert_close(s, torch.tensor([[[2.0, 0.0, 3.0], [2.0, 0.0, 3.0]]]))


def test_unknown_score_raises() -> None:
    with pytest.raises(ValueError):
        positiveness(P, CTX, "manhattan")  # type: ignore[arg-type]


def test_top_k_weights_equal_hand_softmax() -> None:
    scores = torch.tensor([0.1, 0.9, 0.5, 0.7])
    idx, w = select_top_k(scores, 2, temperature=0.5)
    assert idx.tolist() == [1, 3]
    e1, e2 = math.exp(0.9 / 0.5), math.exp(0.7 / 0.5)
    torch.testing.assert_close(w, torch.tensor([e1 / (e1 + e2), e2 / (e1 + e2)]))
    idx, w = select_top_k(scores, 10, temperature=1.0)  # k' = min(k, n)
    assert idx.shape == (4,) and abs(float(w.sum()) - 1.0) < 1e-6


def test_context_aware_prototype_hand() -> None:
    p = torch.tensor([1.0, 0.0])
    sel = torch.tensor([[0.0, 1.0], [0.0, -1.0]])
    w = torch.tensor([0.75, 0.25])
    p_star, ctx = context_aware_prototype(p, sel, w, alpha=0.5)
    torch.testing.assert_close(ctx, torch.tensor([0.0, 0.5]))
    expected = torch.nn.functional.normalize(torch.tensor([0.5, 0.25]), dim=0)
    torch.testing.assert_close(p_star, expected)
