"""Prototype awareness: positiveness, top-K soft selection, context-aware prototype (step 6)."""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Score = Literal["dot", "cosine", "l2"]


def positiveness(p: Tensor, context: Tensor, score: Score) -> Tensor:
    """Score of each context prototype for an instance prototype (higher = more positive).

    p (..., D); context (k, D), or (..., k, D) broadcastable against p's leading dims
    (e.g. p (B, K, D) with a per-channel context (K, k, D)). Returns (..., k).
    dot = p.c (the paper's best), cosine = normalised dot, l2 = -||p - c||. Note: with unit
    p and unit context (the bank under `prototype.normalize: true`) dot == cosine, and
    l2 = -sqrt(2 - 2 cos) ranks the same, so only l2's softmax weights differ. With raw
    prototypes (normalize false) the norms, i.e. how consistent a region or cluster is,
    enter dot and l2 and the three scores rank differently.
    """
    if score == "cosine":
        p = F.normalize(p, dim=-1, eps=1e-8)
        context = F.normalize(context, dim=-1, eps=1e-8)
    dot = torch.matmul(context, p.unsqueeze(-1)).squeeze(-1)
    if score in ("dot", "cosine"):
        return dot
    if score == "l2":
        # Expanded form avoids a (..., k, D) difference tensor (raw banks have k = size).
        d2 = (p * p).sum(-1, keepdim=True) + (context * context).sum(-1) - 2 * dot
        return -torch.sqrt(d2.clamp_min(0) + 1e-12)
    raise ValueError(f"unknown positiveness score {score!r}")


def select_top_k(scores: Tensor, k: int, temperature: float) -> tuple[Tensor, Tensor]:
    """(..., n) -> indices (..., k') of the k' = min(k, n) best, weights softmax(top / t)."""
    k = min(k, scores.shape[-1])
    top, idx = scores.topk(k, dim=-1)
    return idx, torch.softmax(top / temperature, dim=-1)


def context_aware_prototype(
    p: Tensor, selected_context: Tensor, weights: Tensor, alpha: float
) -> tuple[Tensor, Tensor]:
    """p (..., D), selected (..., k, D), weights (..., k) -> (p*, ctx).

    ctx = sum_j w_j c_j is the weighted context mean (also the target of the alignment
    shift); p* = normalise((1 - alpha) p + alpha ctx) keeps the instance's own attributes
    while pulling it towards the class's matching context.
    """
    ctx = (weights.unsqueeze(-1) * selected_context).sum(-2)
    p_star = F.normalize((1.0 - alpha) * p + alpha * ctx, dim=-1, eps=1e-8)
    return p_star, ctx
