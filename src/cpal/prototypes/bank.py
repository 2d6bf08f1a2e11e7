"""The support bank: per-class FIFO queues of past prototypes and their context (steps 4-5)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from cpal.prototypes.kmeans import spherical_kmeans_batched


class SupportBank(nn.Module):
    """Per-class FIFO queues (background included) of detached prototypes.

    Everything is a buffer, so the bank and its context clusters are saved in state_dict /
    checkpoints and inference uses exactly the context the model was trained against.
    Buffers: queue (K, size, D), ptr (K,), count (K,) (total ever enqueued), sources
    (K, size) (the dataset sample index each entry came from, -1 unknown: provenance for
    figures), and the context ctx (K, kmax, D), ctx_count (K, kmax) (members = density),
    ctx_valid (K, kmax).
    kmax is `clusters` (or `size` when clusters == 0, raw entries); loading a checkpoint
    whose kmax differs resizes the context buffers to the checkpoint's.
    normalize=False (`prototype.normalize`) holds raw prototypes: context means and
    centroids are then raw member means, not projected onto the unit sphere.
    """

    queue: Tensor
    sources: Tensor
    ptr: Tensor
    count: Tensor
    ctx: Tensor
    ctx_count: Tensor
    ctx_valid: Tensor

    def __init__(
        self,
        num_channels: int,
        size: int,
        dim: int,
        clusters: int | None = None,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if size < 1 or num_channels < 1 or dim < 1:
            raise ValueError("SupportBank needs num_channels, size and dim >= 1")
        self.num_channels, self.size, self.dim = num_channels, size, dim
        self.normalize = normalize
        kmax = size if not clusters else min(clusters, size)
        self.register_buffer("queue", torch.zeros(num_channels, size, dim))
        self.register_buffer("sources", torch.full((num_channels, size), -1, dtype=torch.long))
        self.register_buffer("ptr", torch.zeros(num_channels, dtype=torch.long))
        self.register_buffer("count", torch.zeros(num_channels, dtype=torch.long))
        self.register_buffer("ctx", torch.zeros(num_channels, kmax, dim))
        self.register_buffer("ctx_count", torch.zeros(num_channels, kmax))
        self.register_buffer("ctx_valid", torch.zeros(num_channels, kmax, dtype=torch.bool))

    # -- queue ---------------------------------------------------------------------------

    @torch.no_grad()
    def enqueue(
        self, prototypes: Tensor, channels: Tensor, sources: Tensor | None = None
    ) -> None:
        """Append rows (N, D) to their channels' queues in row order; the oldest are overwritten.

        sources (N,): the dataset sample index of each row (None: unknown, stored as -1).
        """
        if prototypes.shape[0] == 0:
            return
        x = prototypes.detach().to(self.queue.dtype)
        ch = channels.to(self.queue.device).long()
        onehot = F.one_hot(ch, self.num_channels)  # (N, K)
        rank = (onehot.cumsum(0) * onehot).sum(1) - 1  # position among rows of its channel
        added = onehot.sum(0)  # (K,)
        # Only the last `size` rows of a channel survive; dropping the rest keeps writes unique.
        keep = rank >= (added[ch] - self.size)
        slot = (self.ptr[ch] + rank) % self.size
        self.queue[ch[keep], slot[keep]] = x[keep]
        if sources is None:
            sources = torch.full_like(ch, -1)
        self.sources[ch[keep], slot[keep]] = sources.to(ch.device).long()[keep]
        self.ptr.copy_((self.ptr + added) % self.size)
        self.count.add_(added)

    @torch.no_grad()
    def enqueue_synced(
        self, prototypes: Tensor, channels: Tensor, sources: Tensor | None = None
    ) -> None:
        """Enqueue the rows of all ranks, in rank order, on every rank (banks stay identical)."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            self.enqueue(prototypes, channels, sources)
            return
        world = dist.get_world_size()
        x = prototypes.detach().to(self.queue.dtype).contiguous()
        ch = channels.to(x.device).long()
        # Always gathered (-1 when unknown) so every rank runs the same collectives.
        src = torch.full_like(ch, -1) if sources is None else sources.to(x.device).long()
        n = torch.tensor([x.shape[0]], device=x.device, dtype=torch.long)
        sizes = [torch.zeros_like(n) for _ in range(world)]
        dist.all_gather(sizes, n)
        counts = [int(s.item()) for s in sizes]
        top = max(counts)
        if top == 0:
            return
        pad = top - x.shape[0]
        xp = torch.cat([x, x.new_zeros(pad, x.shape[1])]) if pad else x
        cp = torch.cat([ch, ch.new_zeros(pad)]) if pad else ch
        sp = torch.cat([src, src.new_full((pad,), -1)]) if pad else src
        xs = [torch.empty_like(xp) for _ in range(world)]
        cs = [torch.empty_like(cp) for _ in range(world)]
        ss = [torch.empty_like(sp) for _ in range(world)]
        dist.all_gather(xs, xp)
        dist.all_gather(cs, cp)
        dist.all_gather(ss, sp)
        self.enqueue(
            torch.cat([t[:c] for t, c in zip(xs, counts, strict=True)]),
            torch.cat([t[:c] for t, c in zip(cs, counts, strict=True)]),
            torch.cat([t[:c] for t, c in zip(ss, counts, strict=True)]),
        )

    def counts(self) -> Tensor:
        """(K,) number of entries held per channel: min(enqueued, size)."""
        return self.count.clamp_max(self.size)

    def _order(self) -> Tensor:
        """(K, size) slot of each queue position, oldest first."""
        ar = torch.arange(self.size, device=self.queue.device)
        full = self.count >= self.size
        start = torch.where(full, self.ptr, torch.zeros_like(self.ptr))
        return (start[:, None] + ar[None, :]) % self.size

    def ordered_queue(self) -> tuple[Tensor, Tensor]:
        """All queues oldest first (K, size, D) and which slots hold entries (K, size)."""
        idx = self._order()
        q = self.queue.gather(1, idx[:, :, None].expand(-1, -1, self.dim))
        ar = torch.arange(self.size, device=self.queue.device)
        return q, ar[None, :] < self.counts()[:, None]

    def entries(self, channel: int) -> Tensor:
        """(n, D) entries of one channel, oldest first."""
        n = int(self.counts()[channel])
        return self.queue[channel, self._order()[channel, :n]]

    def entry_sources(self, channel: int) -> Tensor:
        """(n,) sample index of each entry of one channel (-1 unknown), aligned with entries()."""
        n = int(self.counts()[channel])
        return self.sources[channel, self._order()[channel, :n]]

    @torch.no_grad()
    def nearest_sources(self, channel: int, targets: Tensor, n: int = 1) -> Tensor:
        """(m, n) sample indices of the n entries of `channel` nearest (cosine) to each target
        row (m, D), nearest first; -1 where unknown or where the queue holds fewer than n."""
        held = self.entries(channel)
        out = torch.full((targets.shape[0], n), -1, dtype=torch.long, device=held.device)
        if held.shape[0] == 0 or targets.shape[0] == 0:
            return out
        sim = F.normalize(targets.to(held.dtype), dim=1, eps=1e-12) @ F.normalize(
            held, dim=1, eps=1e-12
        ).T
        idx = sim.topk(min(n, held.shape[0]), dim=1).indices
        out[:, : idx.shape[1]] = self.entry_sources(channel)[idx]
        return out

    def mean_contexts(self) -> tuple[Tensor, Tensor]:
        """(K, D) queue means (normalised unless normalize=False) and (K,) counts (the
        cpal-mean context)."""
        n = self.counts()
        # Unused slots are zero (never written), so a plain sum is the sum of the entries.
        total = self.queue.sum(1)
        if not self.normalize:
            return total / n.clamp_min(1)[:, None].to(total.dtype), n
        return F.normalize(total, dim=1, eps=1e-12), n

    def mean_context(self, channel: int) -> Tensor:
        """(D,) mean of one channel's queue (as mean_contexts)."""
        return self.mean_contexts()[0][channel]

    # -- context -------------------------------------------------------------------------

    @torch.no_grad()
    def recluster(
        self, clusters: int, iters: int, generator: torch.Generator | None = None
    ) -> None:
        """Recompute every channel's context: spherical k-means centroids (+ member counts;
        raw member means when normalize=False), or with clusters == 0 the entries
        themselves (count 1 each)."""
        q, mask = self.ordered_queue()
        if clusters <= 0:
            kmax = self.size
            cent, cnt, valid = q, mask.to(q.dtype), mask
        else:
            kmax = min(clusters, self.size)
            cent, cnt, valid = spherical_kmeans_batched(
                q, mask, kmax, iters, generator, normalize=self.normalize
            )
        if self.ctx.shape[1] != kmax:
            self.ctx = q.new_zeros(self.num_channels, kmax, self.dim)
            self.ctx_count = q.new_zeros(self.num_channels, kmax)
            self.ctx_valid = torch.zeros_like(self.ctx_count, dtype=torch.bool)
        k = cent.shape[1]
        self.ctx.zero_()
        self.ctx_count.zero_()
        self.ctx_valid.zero_()
        self.ctx[:, :k] = cent * valid[..., None]
        self.ctx_count[:, :k] = cnt * valid
        self.ctx_valid[:, :k] = valid

    def context(self, channel: int) -> tuple[Tensor, Tensor]:
        """(k, D) context prototypes (unit norm unless normalize=False) and (k,) member
        counts (density)."""
        v = self.ctx_valid[channel]
        return self.ctx[channel][v], self.ctx_count[channel][v]

    def context_table(self) -> tuple[Tensor, Tensor, Tensor]:
        """Padded context of all channels: (K, kmax, D), counts (K, kmax), valid (K, kmax)."""
        return self.ctx, self.ctx_count, self.ctx_valid

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # The checkpoint's context is authoritative: adopt its kmax before copying.
        ctx = state_dict.get(prefix + "ctx")
        if ctx is not None and ctx.shape != self.ctx.shape and ctx.dim() == 3:
            kmax = ctx.shape[1]
            self.ctx = self.ctx.new_zeros(self.num_channels, kmax, self.dim)
            self.ctx_count = self.ctx_count.new_zeros(self.num_channels, kmax)
            self.ctx_valid = self.ctx_valid.new_zeros(self.num_channels, kmax)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
